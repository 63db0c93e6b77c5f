"""Examples read by index: each input pipeline gathers only the rows of its own replicas' slices.

A source whose rows can be read by number (an npz file's or an npy
directory's arrays of numbers) is given to
the batching as its row numbers: `tf.data.Dataset.range(n)` is shuffled,
repeated, batched and split across replicas exactly as the records would be
(shuffling `range(n)` with a buffer and seed gives the same permutation as
shuffling the records: tf.data's shuffle draws positions, not values), and a
batch of row numbers is turned into feature dicts only after the split
(`batching.replica_slices` parses after slicing). So each worker reads the
rows it trains on, not the whole global batch, and the global batches are
the ones the records would give, row for row.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import tensorflow as tf

from mto_tf.data.examples import Examples


def can_gather(arrays: Mapping[str, np.ndarray]) -> bool:
    """Whether every array holds numbers (text is read as records, whole)."""
    return all(np.dtype(array.dtype).kind in "biuf" for array in arrays.values())


def examples_by_index(arrays: Mapping[str, np.ndarray]) -> Examples:
    """`arrays` (one row per example, each indexable by an array of row numbers) as examples read by index."""
    keys = list(arrays)
    num_examples = len(arrays[keys[0]])
    # Floats as float32, what Keras computes in (a mapped file's rows are cast as they are read).
    dtypes = [tf.float32 if np.dtype(arrays[key].dtype).kind == "f" else tf.as_dtype(arrays[key].dtype)
              for key in keys]

    def gather(rows: np.ndarray) -> list[np.ndarray]:
        # Fancy indexing: only these rows are read.
        return [np.asarray(arrays[key][rows]).astype(dtype.as_numpy_dtype, copy=False)
                for key, dtype in zip(keys, dtypes)]

    def parse_batch(rows: tf.Tensor) -> dict[str, tf.Tensor]:
        values = tf.numpy_function(gather, [rows], dtypes, stateful=False)
        # As many rows as row numbers: a full batch keeps its static size, which the traced step wants.
        return {key: tf.ensure_shape(value, [rows.shape[0], *arrays[key].shape[1:]])
                for key, value in zip(keys, values)}

    return Examples(records=tf.data.Dataset.range(num_examples), parse_batch=parse_batch, num_examples=num_examples)
