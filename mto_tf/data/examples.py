"""`Examples`: a dataset's records, and how a batch of them becomes feature dicts."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Examples:
    """A dataset's examples: one record each, and how a batch of records becomes feature dicts.

    Parsing after batching does the per-example work once per batch. A
    parsed batch is keyed by the model's input and output names and
    `sample_weight/<output>`.
    """

    records: tf.data.Dataset
    parse_batch: Callable[[object], dict[str, tf.Tensor]]
    num_examples: int | None = None  # When the source knows it without reading every record.
    # Output -> the label value the source reads where an example has none (a TFDS optional feature's default).
    absent_labels: dict[str, float] = dataclasses.field(default_factory=dict)
    # The records are example numbers (`indexed`): a pipeline reads only the examples of its own replicas.
    by_index: bool = False

    def count(self) -> int:
        """How many examples there are (read once if the source does not say)."""
        return self._count

    @functools.cached_property
    def _count(self) -> int:
        if self.num_examples is not None:
            return self.num_examples
        cardinality = int(self.records.cardinality())
        if cardinality >= 0:
            return cardinality
        return int(self.records.reduce(tf.constant(0, tf.int64), lambda count, _: count + 1))


