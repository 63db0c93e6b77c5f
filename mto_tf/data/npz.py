"""`--dataset=npz:PATH`: one `.npz` file holding inputs, labels and sample weights.

Keys are the model's input names and output names; per-output sample weights,
if any, live under `sample_weight/<output_name>`. Every array has one row per
example. Each key is checked against the model before training starts, so a
missing or mis-shaped key is an error that names it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import tensorflow as tf

from mto_tf.config import ConfigError

SAMPLE_WEIGHT_PREFIX = "sample_weight/"


def load(path: str, *, input_shapes: Mapping[str, tuple[int, ...]], input_dtypes: Mapping[str, str],
         output_names: list[str]) -> tf.data.Dataset:
    """Reads and checks `path`; returns a dataset of feature dicts, one per example (held in memory).

    Args:
      path: the `.npz` file.
      input_shapes: each input's shape per example, e.g. `{"main_input": (100,)}`.
      input_dtypes: each input's dtype ("int32", "float32").
      output_names: the model's outputs; each needs labels, shape (N,) or (N, 1).
    """
    arrays = _read(path)
    examples = {}
    for name, shape in input_shapes.items():
        array = _require(arrays, name, path)
        if array.shape[1:] != tuple(shape):
            _fail(path, name, f"expected shape (N, {', '.join(map(str, shape))}), got {array.shape}")
        if np.issubdtype(np.dtype(input_dtypes[name]), np.integer) and not np.issubdtype(array.dtype, np.integer):
            _fail(path, name, f"expected integer token ids, got dtype {array.dtype}")
        examples[name] = array.astype(input_dtypes[name])
    for name in output_names:
        # Labels as (N, 1), like the model's (batch, 1) predictions, so that
        # per-example losses are computed row by row, not broadcast.
        examples[name] = _column(arrays, name, path, "labels")
        weight_key = SAMPLE_WEIGHT_PREFIX + name
        if weight_key in arrays:
            examples[weight_key] = _column(arrays, weight_key, path, "sample weights")[:, 0]
            if (examples[weight_key] < 0).any() or not np.isfinite(examples[weight_key]).all():
                _fail(path, weight_key, "expected finite sample weights >= 0")
    unexpected = sorted(set(arrays) - set(examples))
    if unexpected:
        _fail(path, unexpected[0], f"not an input, an output or {SAMPLE_WEIGHT_PREFIX}<output> of the model "
                                   f"(inputs {sorted(input_shapes)}, outputs {sorted(output_names)})")
    num_examples = {name: len(array) for name, array in examples.items()}
    first = next(iter(num_examples))
    for name, rows in num_examples.items():
        if rows != num_examples[first]:
            _fail(path, name, f"has {rows} rows but {first!r} has {num_examples[first]}")
    if num_examples[first] == 0:
        _fail(path, first, "has no rows")
    return tf.data.Dataset.from_tensor_slices(examples)


def _read(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as error:
        raise ConfigError("dataset", f"cannot read npz file {path!r}: {error}") from None


def _require(arrays: Mapping[str, np.ndarray], key: str, path: str) -> np.ndarray:
    if key not in arrays:
        _fail(path, key, f"missing (the file has {sorted(arrays)})")
    return arrays[key]


def _column(arrays: Mapping[str, np.ndarray], key: str, path: str, what: str) -> np.ndarray:
    array = _require(arrays, key, path)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or array.shape[1] != 1:
        _fail(path, key, f"expected {what} of shape (N,) or (N, 1), got {array.shape}")
    if not np.issubdtype(array.dtype, np.number):
        _fail(path, key, f"expected numbers, got dtype {array.dtype}")
    return array.astype(np.float32)


def _fail(path: str, key: str, message: str):
    raise ConfigError("dataset", f"npz file {path!r}, key {key!r}: {message}")
