"""`--dataset=tfds:NAME[/CONFIG][:VERSION]`: any dataset prepared in `--data_dir`, read by TFDS.

TFDS reads a prepared dataset from its files even when its builder cannot be
imported (it makes a read-only builder from the dataset's metadata), so a
dataset prepared by another program trains as well as a catalogue one.
Nothing is downloaded: a dataset that is not in `--data_dir` is an error.

`--feature_map=NAME=FEATURE,...` says which feature feeds each model input,
output (labels) and `sample_weight/<output>`; by default a feature named like
the input or output. Nested features are `parent/child`. Only those features
are decoded (`tfds.decode.PartialDecoding`); `ClassLabel` features arrive as
integer class ids.

A dataset prepared as ArrayRecord (`file_format="array_record"`) is read by
index (`indexed.numbered`): each input pipeline reads, through TFDS's random-access
`as_data_source`, only the examples of its replicas' slices, and decodes
them as `as_dataset` decodes a TFRecord dataset's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mto_tf.core.signature import ModelSignature
from mto_tf.data import features, indexed
from mto_tf.data.examples import Examples
from mto_tf.errors import ConfigError, describe_error


def load(name: str, *, data_dir: str | None, split: str, split_flag: str, feature_map: Mapping[str, str],
         signature: ModelSignature) -> Examples:
    """Split `split` of TFDS dataset `name`, checked against the model's `signature`, as `Examples`.

    In file order, each example the decoded features the model needs, keyed
    by model name; the number of examples if the split's metadata says; and,
    for each output whose labels are an optional feature, the value TFDS
    reads where an example has none (`absent_label_value`).
    """
    builder = _builder(name, data_dir)
    info = builder.info
    if info.splits and split not in info.splits:
        raise ConfigError(split_flag, f"dataset {name!r} has no split {split!r}; it has {sorted(info.splits)}")

    available = dict(_all_features(info.features))
    feature_paths = checked_feature_paths(
        {path: tf.TensorSpec(feature.shape, feature.tf_dtype) for path, feature in available.items()},
        feature_map=feature_map, signature=signature, dataset=repr(name))
    num_examples = info.splits[split].num_examples if info.splits and split in info.splits else None
    absent = {output: absent_label_value(available[feature_paths[output]].get_tensor_info(), output=output)
              for output in signature.output_names if available[feature_paths[output]].get_tensor_info().optional}
    decoding = tfds.decode.PartialDecoding(_nested(feature_paths.values()))
    if info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
        examples = _read_by_index(builder, name=name, split=split, decoding=decoding, feature_paths=feature_paths)
        return dataclasses.replace(examples, absent_labels=absent)
    try:
        records = builder.as_dataset(split=split, shuffle_files=False, decoders=decoding)
    except Exception as error:  # Not prepared, or files missing.
        raise ConfigError("dataset", f"TFDS cannot read split {split!r} of {name!r} from --data_dir={data_dir} "
                                     f"({describe_error(error)})") from None
    return Examples(records=records, parse_batch=lambda batch: select(batch, feature_paths),
                    num_examples=num_examples or None, absent_labels=absent)


def _read_by_index(builder, *, name: str, split: str, decoding: tfds.decode.PartialDecoding,
                   feature_paths: Mapping[str, str]) -> Examples:
    """An ArrayRecord split read by index: a batch's serialized examples are fetched by number, then decoded
    one by one as `as_dataset` decodes them (the features `decoding` names only)."""
    try:
        source = builder.as_data_source(split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    except Exception as error:  # Files missing.
        raise ConfigError("dataset", f"TFDS cannot read split {split!r} of {name!r} from --data_dir="
                                     f"{builder.data_dir} ({describe_error(error)})") from None
    decoded_features = decoding.extract_features(builder.info.features)
    decoded_spec = decoded_features.get_tensor_spec()
    for key, path in feature_paths.items():
        if not select(decoded_spec, {key: path})[key].shape.is_fully_defined():
            raise ConfigError("dataset", f"{_describe(key, path)} of {name!r} varies in shape from example to "
                                         f"example: an ArrayRecord dataset is read by index, which needs fixed "
                                         f"shapes (pad it when preparing, or prepare it as TFRecord)")

    def decode(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
        return select(tf.map_fn(decoded_features.deserialize_example, serialized, fn_output_signature=decoded_spec),
                      feature_paths)

    def parse_batch(numbers: tf.Tensor) -> dict[str, tf.Tensor]:
        serialized = tf.numpy_function(lambda rows: np.asarray(source.__getitems__(rows.tolist()), dtype=object),
                                       [numbers], tf.string, stateful=False)
        return decode(tf.ensure_shape(serialized, numbers.shape))

    return indexed.numbered(len(source), parse_batch)


def absent_label_value(tensor_info, *, output: str) -> float:
    """What TFDS decodes where an example has no value for an optional feature (`Tensor(..., optional=True)`):
    the dtype's lowest value (`Tensor._default_value` in tensorflow_datasets/core/features/tensor_feature.py).

    So an example without that label is read as a missing label.
    """
    dtype = np.dtype(tf.as_dtype(tensor_info.dtype).as_numpy_dtype)
    if np.issubdtype(dtype, np.integer):
        return float(np.iinfo(dtype).min)
    if np.issubdtype(dtype, np.floating):
        return float(np.finfo(dtype).min)
    raise ConfigError("dataset", f"the labels of output {output!r} are an optional {dtype.name} feature: TFDS reads "
                                 f"an absent one as a value a label can have (False, or b''); store them as "
                                 f"numbers, or give unlabelled examples sample weight 0")


def split_names(name: str, *, data_dir: str | None) -> list[str]:
    """The splits of TFDS dataset `name` prepared in `data_dir`."""
    return sorted(_builder(name, data_dir).info.splits)


def _builder(name: str, data_dir: str | None):
    try:
        return tfds.builder(name, data_dir=data_dir)
    except Exception as error:  # TFDS raises its own errors for unknown names, versions and configs.
        raise ConfigError("dataset", f"TFDS cannot open {name!r} in --data_dir={data_dir} "
                                     f"({describe_error(error)}); prepare it there first") from None


def select(batch: dict, feature_paths: Mapping[str, str]) -> dict[str, tf.Tensor]:
    """A batch of decoded examples -> `{model name: tensor}`."""
    selected = {}
    for key, path in feature_paths.items():
        value = batch
        for part in path.split("/"):
            value = value[part]
        selected[key] = value
    return selected


def checked_feature_paths(available: Mapping[str, tf.TensorSpec], *, feature_map: Mapping[str, str],
                          signature: ModelSignature, dataset: str, flag: str = "feature_map") -> dict[str, str]:
    """Model name -> the feature that feeds it (`--feature_map`, else the feature of its name), each checked
    against the model's `signature` (the other features are not read).

    Args:
      available: each feature's per-example shape and dtype, by path (nested: `parent/child`).
      feature_map: `--feature_map`.
      signature: the built model's.
      dataset: how errors name the dataset.
      flag: what an error about a feature's shape or dtype names.
    """
    feature_paths = _feature_paths(feature_map, signature)
    for key, path in feature_paths.items():
        if path not in available:
            flag = "feature_map" if key in feature_map else "dataset"
            raise ConfigError(flag, f"{_describe(key, path)}: dataset {dataset} has no feature {path!r} "
                                    f"(it has {sorted(available)}); map it with --feature_map={key}=FEATURE")
    features.check({key: available[path] for key, path in feature_paths.items()},
                   signature, flag=flag, where=lambda key: _describe(key, feature_paths[key]))
    return feature_paths


def _feature_paths(feature_map: Mapping[str, str], signature: ModelSignature) -> dict[str, str]:
    known = features.expected_keys(signature)
    unknown = sorted(set(feature_map) - set(known))
    if unknown:
        raise ConfigError("feature_map", f"{unknown[0]!r} is not an input, an output or "
                                         f"{features.SAMPLE_WEIGHT_PREFIX}<output> of model {signature.model_name!r} "
                                         f"(inputs {signature.input_names}, outputs {signature.output_names})")
    wanted = [*signature.input_names, *signature.output_names,
              *(key for key in feature_map if key.startswith(features.SAMPLE_WEIGHT_PREFIX)
                and key.removeprefix(features.SAMPLE_WEIGHT_PREFIX) in signature.outputs)]
    return {key: feature_map.get(key, key) for key in wanted}


def _all_features(feature_dict, prefix: str = ""):
    """Yields `(path, feature)` for every leaf feature, nested ones as `parent/child`."""
    for key, feature in feature_dict.items():
        if isinstance(feature, tfds.features.FeaturesDict):
            yield from _all_features(feature, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", feature


def _nested(paths) -> dict:
    """`["a/b", "c"]` -> `{"a": {"b": True}, "c": True}`: what `PartialDecoding` takes."""
    tree: dict = {}
    for path in paths:
        *parents, leaf = path.split("/")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = True
    return tree


def _describe(key: str, path: str) -> str:
    return f"feature {path!r}" + (f" (for {key!r})" if key != path else "")
