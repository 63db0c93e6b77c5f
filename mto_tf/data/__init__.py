"""Input pipelines: examples from a source (`sources.py`), batched to GLOBAL batches (`batching.py`).

Sources: the datasets generated locally (`generated.py`: `synthetic_headlines`,
`multi_digits`, `mmoe_synthetic`), `npz:PATH`, `npy:DIR`, `tfds:NAME` (with
`--feature_map`), or from Python a `tf.data.Dataset` of unbatched
`(inputs, labels)` or `(inputs, labels, sample_weights)` dicts. Each is
checked against the built model's signature (`features.py`) before anything
is written.
"""
