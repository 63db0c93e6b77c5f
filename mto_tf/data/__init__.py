"""Input pipelines: examples from a source, batched to GLOBAL batches.

A strategy splits each global batch across its replicas
(`strategy.experimental_distribute_dataset`), and `model.fit` does the same,
so both loops consume the very same batches.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from mto_tf.config import TrainConfig
from mto_tf.data import npz, synthetic_headlines


def load_examples(config: TrainConfig, model: keras.Model, *, split: str = "train") -> tf.data.Dataset:
    """Returns `config.dataset` as a dataset of feature dicts, one per example.

    The model gives the input shapes and output names the data must match.
    """
    if config.dataset == "synthetic_headlines":
        return synthetic_headlines.load(config, split)
    # TrainConfig only admits "synthetic_headlines" and "npz:PATH".
    return npz.load(
        config.dataset.removeprefix("npz:"),
        input_shapes={name: tuple(model.input[name].shape[1:]) for name in model.input},
        input_dtypes={name: model.input[name].dtype for name in model.input},
        output_names=list(model.output),
    )


def to_keras_batches(examples: tf.data.Dataset, *, model: keras.Model, config: TrainConfig,
                     skip_batches: int = 0) -> tf.data.Dataset:
    """Endless global batches as `(inputs, labels)` or `(inputs, labels, sample_weights)`.

    The tuple is what `model.fit` takes, and `keras.utils.unpack_x_y_sample_weight`
    unpacks it in the custom loop, so both loops read the same structure.

    Args:
      examples: feature dicts, one per example.
      model: gives the input and output names.
      config: `batch_size` (global), `shuffle_buffer` and `seed`.
      skip_batches: batches to skip, to resume where a checkpointed run
        stopped; the pipeline is deterministic for a given --seed.
    """
    input_names, output_names = list(model.input), list(model.output)

    def to_tuple(example):
        inputs = {name: example[name] for name in input_names}
        labels = {name: example[name] for name in output_names}
        sample_weights = {name: example[npz.SAMPLE_WEIGHT_PREFIX + name] for name in output_names
                          if npz.SAMPLE_WEIGHT_PREFIX + name in example}
        return (inputs, labels, sample_weights) if sample_weights else (inputs, labels)

    dataset = examples.map(to_tuple, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if config.shuffle_buffer:
        dataset = dataset.shuffle(config.shuffle_buffer, seed=config.seed, reshuffle_each_iteration=True)
    # Only full batches for now (drop_remainder): every step then sees the
    # same global batch size, which the loss divides by.
    dataset = dataset.repeat().batch(config.batch_size, drop_remainder=True)
    return dataset.skip(skip_batches).prefetch(tf.data.AUTOTUNE)
