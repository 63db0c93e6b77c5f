"""`--dataset=npz:PATH` and `npy:DIR`: arrays of inputs, labels and sample weights, for any model.

Keys are the model's input names and output names; per-output sample weights,
if any, live under `sample_weight/<output_name>`. Every array has one row per
example. An npz file is one `.npz` (read into memory); an npy directory holds
one `.npy` file per key (`sample_weight/<output>.npy` in a `sample_weight/`
subdirectory), memory-mapped, so that a worker reads only the rows it
gathers. Each key is checked against the model before training starts, so a
missing or mis-shaped key is an error that names it.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from mto_tf.core.signature import ModelSignature
from mto_tf.data import features
from mto_tf.errors import ConfigError


def load(path: str, signature: ModelSignature, *, flag: str = "dataset") -> dict[str, np.ndarray]:
    """Reads npz file `path` and checks it against the model's `signature`; returns its arrays, by key (in memory).

    `flag` (`dataset` or `validation_data`) is what an error names.
    """
    return checked_arrays(floats_as_float32(_read(path, flag)), signature, flag=flag,
                          where=lambda key: f"npz file {path!r}, key {key!r}")


def load_directory(directory: str, signature: ModelSignature, *, flag: str = "dataset") -> dict[str, np.ndarray]:
    """Maps each `.npy` file of npy directory `directory`, checked against the model's `signature`, by key.

    Nothing is read but the headers (and the sample weights, to check them):
    the rows are read when they are gathered (floats then become float32).
    """
    arrays = {}
    for root, _, names in os.walk(directory):
        for name in sorted(names):
            if name.endswith(".npy"):
                path = os.path.join(root, name)
                key = os.path.relpath(path, directory).removesuffix(".npy").replace(os.sep, "/")
                try:
                    arrays[key] = np.load(path, mmap_mode="r", allow_pickle=False)
                except (OSError, ValueError) as error:
                    raise ConfigError(flag, f"cannot read npy file {path!r}: {error}") from None
    return checked_arrays(arrays, signature, flag=flag,
                    where=lambda key: f"npy directory {directory!r}, file {key + '.npy'!r}")


def floats_as_float32(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Float arrays as float32, what Keras computes in (NumPy would give float64)."""
    return {key: array.astype(np.float32, copy=False) if array.dtype.kind == "f" else array  # No copy of float32.
            for key, array in arrays.items()}


def checked_arrays(arrays: dict[str, np.ndarray], signature: ModelSignature, *, flag: str,
             where: Callable[[str], str]) -> dict[str, np.ndarray]:
    """`arrays` checked against the model (rows, names, shapes, dtypes, sample weights); labels shaped as the
    predictions; another task's labels dropped."""

    def fail(key: str, message: str):
        raise ConfigError(flag, f"{where(key)}: {message}")

    rows = {key: len(array) if array.ndim else 0 for key, array in arrays.items()}
    first = next(iter(rows), None)
    if first is None or rows[first] == 0:
        fail(first or "(none)", "has no rows")
    for key, count in rows.items():
        if count != rows[first]:
            fail(key, f"has {count} rows but {first!r} has {rows[first]}")
    features.check({key: tf.TensorSpec(array.shape[1:], tf.as_dtype(array.dtype) if array.dtype.kind in "biuf"
                                       else tf.string) for key, array in arrays.items()},
                   signature, flag=flag, where=where)
    for name in signature.other_outputs:  # Another task's labels: not read.
        arrays.pop(name, None)
        arrays.pop(features.SAMPLE_WEIGHT_PREFIX + name, None)
    for name, tensor in signature.outputs.items():
        # Labels (N,) for a (batch, 1) output become (N, 1), like the
        # predictions, so that per-example losses are computed row by row.
        if arrays[name].ndim == 1 and tuple(tensor.shape[1:]) == (1,):
            arrays[name] = arrays[name][:, None]  # A view: a mapped file stays mapped.
        weight_key = features.SAMPLE_WEIGHT_PREFIX + name
        if weight_key in arrays:
            arrays[weight_key] = np.asarray(arrays[weight_key]).reshape(-1).astype(np.float32)
            if (arrays[weight_key] < 0).any() or not np.isfinite(arrays[weight_key]).all():
                fail(weight_key, "expected finite sample weights >= 0")
    return arrays


def _read(path: str, flag: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as error:
        raise ConfigError(flag, f"cannot read npz file {path!r}: {error}") from None
