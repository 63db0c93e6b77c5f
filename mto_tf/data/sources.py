"""Where the examples come from: `--dataset` and `--validation_data`, each checked against the model's signature.

Sources: the datasets mto_tf generates (`synthetic_headlines`;
`multi_digits` and `mmoe_synthetic`, with `--feature_map`), `npz:PATH`,
`npy:DIR`, `tfds:NAME` (with `--feature_map`), or from Python a
`tf.data.Dataset` of unbatched `(inputs, labels)` or `(inputs, labels,
sample_weights)` dicts, or such a tuple of dicts of arrays (one row per
example, as `model.fit` takes them).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from mto_tf.config import PYTHON_DATA, TrainConfig
from mto_tf.core.signature import ModelSignature
from mto_tf.data import features, indexed, mmoe_synthetic, multi_digits, npz, synthetic_headlines, tfds_dataset
from mto_tf.data.examples import Examples
from mto_tf.errors import ConfigError

# The datasets mto_tf generates (config.GENERATED_DATASETS) -> their module: its SPLITS, `load` and `feature_specs`.
GENERATED = {"synthetic_headlines": synthetic_headlines, "multi_digits": multi_digits,
             "mmoe_synthetic": mmoe_synthetic}


def load_examples(config: TrainConfig, signature: ModelSignature) -> Examples:
    """Returns `config.dataset`'s training examples, checked against the model's signature.

    The signature gives the input shapes and output names the data must match.
    """
    if not isinstance(config.dataset, str):
        return _python_examples(config.dataset, signature, flag="dataset")
    if config.dataset in GENERATED:
        return _generated_examples(config, signature, split="train", split_flag="dataset")
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
    if config.dataset in GENERATED:
        return _generated_examples(config, signature, split=split, split_flag=split_flag)
    name = config.dataset.removeprefix("tfds:")
    if not split_must_exist and split not in tfds_dataset.split_names(name, data_dir=config.data_dir):
        return None
    return _tfds_examples(config, signature, split=split, split_flag=split_flag)


def _generated_examples(config: TrainConfig, signature: ModelSignature, *, split: str, split_flag: str) -> Examples:
    """Split `split` of a dataset mto_tf generates (generated on first use), checked against the model.

    synthetic_headlines' features are the headline model's inputs and
    outputs, all read. multi_digits' and mmoe_synthetic's are read as a TFDS
    dataset's: each model input and output reads the feature of its name or
    the one `--feature_map` names, and the other features are not read.
    """
    name = config.dataset
    module = GENERATED[name]
    if split not in module.SPLITS:
        *others, last = module.SPLITS
        raise ConfigError(split_flag, f"{name} has splits {', '.join(others)} and {last}, not {split!r}")
    specs = module.feature_specs(config)
    if module is synthetic_headlines:
        features.check(specs, signature, flag="dataset", where=lambda key: f"synthetic_headlines feature {key!r}")
        return module.load(config, split)
    feature_paths = tfds_dataset.checked_feature_paths(specs, feature_map=config.feature_map, signature=signature,
                                                       dataset=name, flag="feature_map" if config.feature_map
                                                       else "dataset")
    return module.load(config, split, feature_paths=feature_paths)


def _array_examples(source: str, signature: ModelSignature, *, flag: str) -> Examples:
    """`npz:PATH` or `npy:DIR`."""
    if source.startswith("npy:"):  # Memory-mapped numbers: read by index always.
        arrays = npz.load_directory(source.removeprefix("npy:"), signature, flag=flag)
        if not indexed.can_gather(arrays):
            raise ConfigError(flag, f"{source}: an npy directory holds numbers, read by index; keep text in an npz "
                                    f"file")
        return indexed.arrays_by_index(arrays)
    return _examples_of_arrays(npz.load(source.removeprefix("npz:"), signature, flag=flag))


def _examples_of_arrays(arrays: dict[str, np.ndarray]) -> Examples:
    """Arrays by key, one row per example: numbers are read by index (each worker gathers the rows of its
    replicas only), text as records."""
    if indexed.can_gather(arrays):
        return indexed.arrays_by_index(arrays)
    records = tf.data.Dataset.from_tensor_slices(arrays)
    return Examples(records=records, parse_batch=lambda batch: batch,  # Already feature dicts.
                    num_examples=int(records.cardinality()))


def _tfds_examples(config: TrainConfig, signature: ModelSignature, *, split: str, split_flag: str) -> Examples:
    return tfds_dataset.load(config.dataset.removeprefix("tfds:"), data_dir=config.data_dir, split=split,
                             split_flag=split_flag, feature_map=config.feature_map, signature=signature)


def _python_examples(data, signature: ModelSignature, *, flag: str) -> Examples:
    """A `tf.data.Dataset` of `(inputs, labels[, sample_weights])` dicts, one example each, or such a tuple of
    dicts of arrays, one row per example."""
    spec = data.element_spec if hasattr(data, "element_spec") else None
    parts = spec if spec is not None else data
    if not (isinstance(parts, tuple | list) and len(parts) in (2, 3) and all(isinstance(part, dict) for part in parts)):
        raise ConfigError(flag, f"expected {PYTHON_DATA}, got elements {spec}")
    keys = [name for part in parts[:2] for name in part]
    keys += [features.SAMPLE_WEIGHT_PREFIX + name for name in (parts[2] if len(parts) == 3 else {})]
    if len(set(keys)) != len(keys):
        raise ConfigError(flag, f"an input and an output share a name in the dataset's dicts ({keys})")

    def flatten(batch):
        inputs, labels, *sample_weights = batch
        weights = sample_weights[0] if sample_weights else {}
        return {**inputs, **labels, **{features.SAMPLE_WEIGHT_PREFIX + name: value for name, value in weights.items()}}

    if spec is None:  # Arrays: checked as an npz file's are (floats as float32).
        arrays = npz.floats_as_float32({key: np.asarray(value) for key, value in flatten(parts).items()})
        return _examples_of_arrays(npz.checked_arrays(arrays, signature, flag=flag, where=lambda key: f"array {key!r}"))
    features.check(flatten(spec), signature, flag=flag, where=lambda key: f"dataset element {key!r}")
    return Examples(records=data, parse_batch=lambda batch: flatten(batch))
