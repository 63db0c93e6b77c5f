"""Where the examples come from: `--dataset` and `--validation_data`, each checked against the model's signature.

Sources: the local `synthetic_headlines`, `npz:PATH`, `tfds:NAME` (with
`--feature_map`), or from Python a `tf.data.Dataset` of unbatched
`(inputs, labels)` or `(inputs, labels, sample_weights)` dicts.
"""

from __future__ import annotations

import tensorflow as tf

from mto_tf.config import TrainConfig
from mto_tf.core.signature import ModelSignature
from mto_tf.data import features, indexed, npz, synthetic_headlines, tfds_dataset
from mto_tf.data.examples import Examples
from mto_tf.errors import ConfigError


def load_examples(config: TrainConfig, signature: ModelSignature) -> Examples:
    """Returns `config.dataset`'s training examples, checked against the model's signature.

    The signature gives the input shapes and output names the data must match.
    """
    if not isinstance(config.dataset, str):
        return _python_examples(config.dataset, signature, flag="dataset")
    if config.dataset == "synthetic_headlines":
        examples = synthetic_headlines.load(config, "train")
        features.check(synthetic_headlines.feature_specs(config), signature, flag="dataset",
                       where=lambda key: f"synthetic_headlines feature {key!r}")
        return examples
    if config.dataset.startswith(("npz:", "npy:")):
        return _array_examples(config.dataset, signature, flag="dataset")
    # TrainConfig admits only these forms; this one is "tfds:NAME".
    return _tfds_examples(config, signature, split=config.train_split, split_flag="train_split")


def load_validation_examples(config: TrainConfig, signature: ModelSignature) -> Examples | None:
    """The validation examples (`--validation_data`, or the dataset's validation split), or None."""
    return load_evaluation_examples(config, signature, data=config.validation_data,
                                    split=config.validation_split_or_default,
                                    split_must_exist=config.validation_split is not None,
                                    data_flag="validation_data", split_flag="validation_split")


def load_evaluation_examples(config: TrainConfig, signature: ModelSignature, *, data, split: str | None,
                             split_must_exist: bool, data_flag: str, split_flag: str) -> Examples | None:
    """Examples to evaluate on: `data` (`npz:PATH`, or from Python a dataset), else `split` of the run's dataset.

    None when there is neither (or `split` is not `split_must_exist` and the
    dataset has no such split). Errors name `data_flag` or `split_flag`.
    """
    if data is not None:
        if not isinstance(data, str):
            return _python_examples(data, signature, flag=data_flag)
        return _array_examples(data, signature, flag=data_flag)
    if split is None or not isinstance(config.dataset, str) or config.dataset.startswith(("npz:", "npy:")):
        return None
    if config.dataset == "synthetic_headlines":
        if split not in ("train", "validation"):
            raise ConfigError(split_flag, f"synthetic_headlines has splits train and validation, not {split!r}")
        return synthetic_headlines.load(config, split)
    name = config.dataset.removeprefix("tfds:")
    if not split_must_exist and split not in tfds_dataset.split_names(name, data_dir=config.data_dir):
        return None
    return _tfds_examples(config, signature, split=split, split_flag=split_flag)


def _array_examples(source: str, signature: ModelSignature, *, flag: str) -> Examples:
    """`npz:PATH` or `npy:DIR`."""
    if source.startswith("npy:"):  # Memory-mapped numbers: read by index always.
        arrays = npz.load_directory(source.removeprefix("npy:"), signature, flag=flag)
        if not indexed.can_gather(arrays):
            raise ConfigError(flag, f"{source}: an npy directory holds numbers, read by index; keep text in an npz "
                                    f"file")
        return indexed.examples_by_index(arrays)
    arrays = npz.load(source.removeprefix("npz:"), signature, flag=flag)
    if indexed.can_gather(arrays):  # Each worker gathers the rows of its replicas only.
        return indexed.examples_by_index(arrays)
    records = tf.data.Dataset.from_tensor_slices(arrays)
    return Examples(records=records, parse_batch=lambda batch: batch,  # Already feature dicts.
                    num_examples=int(records.cardinality()))


def _tfds_examples(config: TrainConfig, signature: ModelSignature, *, split: str, split_flag: str) -> Examples:
    records, feature_paths, num_examples, absent_labels = tfds_dataset.load(
        config.dataset.removeprefix("tfds:"), data_dir=config.data_dir, split=split,
        split_flag=split_flag, feature_map=config.feature_map, signature=signature)
    return Examples(records=records, parse_batch=lambda batch: tfds_dataset.select(batch, feature_paths),
                    num_examples=num_examples, absent_labels=absent_labels)


def _python_examples(dataset: tf.data.Dataset, signature: ModelSignature, *, flag: str) -> Examples:
    """A `tf.data.Dataset` of `(inputs, labels[, sample_weights])` dicts, one example each."""
    spec = dataset.element_spec
    if not (isinstance(spec, tuple) and len(spec) in (2, 3) and all(isinstance(part, dict) for part in spec)):
        raise ConfigError(flag, f"expected a tf.data.Dataset of unbatched (inputs, labels) or "
                                f"(inputs, labels, sample_weights) dicts, got elements {spec}")
    keys = [name for part in spec[:2] for name in part]
    keys += [features.SAMPLE_WEIGHT_PREFIX + name for name in (spec[2] if len(spec) == 3 else {})]
    if len(set(keys)) != len(keys):
        raise ConfigError(flag, f"an input and an output share a name in the dataset's dicts ({keys})")

    def flatten(batch):
        inputs, labels, *sample_weights = batch
        weights = sample_weights[0] if sample_weights else {}
        return {**inputs, **labels, **{features.SAMPLE_WEIGHT_PREFIX + name: value for name, value in weights.items()}}

    features.check(flatten(spec), signature, flag=flag, where=lambda key: f"dataset element {key!r}")
    return Examples(records=dataset, parse_batch=lambda batch: flatten(batch))


