"""Examples read by index: each input pipeline gathers only the rows of its own replicas' slices.

A source whose examples can be read by number (the arrays of an npz file, of
an npy directory or given from Python; a TFDS dataset stored as ArrayRecord)
is given to the batching as its example numbers: `tf.data.Dataset.range(n)`
is shuffled, repeated, batched and split across replicas exactly as the
records would be (shuffling `range(n)` with a buffer and seed gives the same
permutation as shuffling the records: tf.data's shuffle draws positions, not
values), and a batch of numbers is turned into feature dicts only after the
split (`batching.replica_slices` parses after slicing). So each worker reads
the examples it trains on, not the whole global batch, and the global
batches are the ones the records would give, row for row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import tensorflow as tf

from mto_tf.data.examples import Examples


def can_gather(arrays: Mapping[str, np.ndarray]) -> bool:
    """Whether every array holds numbers (text is read as records, whole)."""
    return all(np.dtype(array.dtype).kind in "biuf" for array in arrays.values())


def arrays_by_index(arrays: Mapping[str, np.ndarray]) -> Examples:
    """`arrays` (one row per example, each indexable by an array of row numbers) as examples read by index."""
    # Floats as float32, what Keras computes in (a mapped file's rows are cast as they are read).
    specs = {key: tf.TensorSpec(array.shape[1:], tf.float32 if np.dtype(array.dtype).kind == "f"
                                else tf.as_dtype(array.dtype)) for key, array in arrays.items()}
    # Fancy indexing: only these rows are read.
    return examples_by_index(len(next(iter(arrays.values()))), specs,
                             lambda rows: {key: array[rows] for key, array in arrays.items()})


def examples_by_index(num_examples: int, specs: Mapping[str, tf.TensorSpec],
                      gather: Callable[[np.ndarray], Mapping[str, np.ndarray]]) -> Examples:
    """Examples numbered 0 .. num_examples - 1, a batch of them read by `gather(numbers)` as `{key: array}`.

    `specs` gives each key's per-example shape and dtype; gathered values are
    converted to it.
    """
    keys = list(specs)
    dtypes = [specs[key].dtype for key in keys]

    def gather_in_order(numbers: np.ndarray) -> list[np.ndarray]:
        values = gather(numbers)
        return [np.asarray(values[key]).astype(dtype.as_numpy_dtype, copy=False) for key, dtype in zip(keys, dtypes)]

    def parse_batch(numbers: tf.Tensor) -> dict[str, tf.Tensor]:
        values = tf.numpy_function(gather_in_order, [numbers], dtypes, stateful=False)
        # As many rows as numbers: a full batch keeps its static size, which the traced step wants.
        return {key: tf.ensure_shape(value, [numbers.shape[0], *specs[key].shape])
                for key, value in zip(keys, values)}

    return numbered(num_examples, parse_batch)


def numbered(num_examples: int, parse_batch: Callable[[tf.Tensor], dict[str, tf.Tensor]]) -> Examples:
    """Examples whose records are their numbers: `parse_batch` reads a batch of numbers' examples."""
    return Examples(records=tf.data.Dataset.range(num_examples), parse_batch=parse_batch, num_examples=num_examples,
                    by_index=True)
