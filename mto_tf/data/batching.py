"""Examples -> GLOBAL batches, and each replica's slice of them.

`model.fit` takes global batches and splits each across its replicas. The
custom loop does the same under every strategy: each input pipeline (one per
worker) reads the global batches and keeps its replicas' slices of each. So
every step sees exactly the global batch one device would see, also a final
partial batch, and every worker runs the same number of steps.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import tensorflow as tf

from mto_tf.config import TrainConfig
from mto_tf.core import losses
from mto_tf.core.signature import ModelSignature
from mto_tf.data import features
from mto_tf.data.examples import Examples


@dataclasses.dataclass(frozen=True)
class ServedBy:
    """A tf.data service that reads and parses each global batch once and hands each input pipeline its share.

    `job_name` is the same in every worker of one run attempt and new in the
    next (a job keeps its position while the service lives).
    """

    address: str  # grpc://HOST:PORT
    job_name: str


@dataclasses.dataclass(frozen=True)
class Batching:
    """How examples become global batches.

    - `endless` (training by `--train_steps`): the examples repeat, and every
      batch is full: an epoch's last examples share a batch with the next's.
    - `by_epoch` (training by `--epochs`): pass after pass, each ending with
      its partial batch, reshuffled each pass.
    - `once` (evaluation): one pass in file order, ending with the partial batch.
    """

    mode: str  # "endless", "by_epoch" or "once".
    batch_size: int  # Global.
    shuffle_buffer: int = 0
    seed: int = 0
    class_weights: Mapping[str, Mapping[int, float]] = dataclasses.field(default_factory=dict)
    missing_labels: Mapping[str, float] = dataclasses.field(default_factory=dict)  # Output -> its "no label" value.
    served_by: ServedBy | None = None  # Training batches made once by a tf.data service (`--input_service`).

    @classmethod
    def for_training(cls, config: TrainConfig) -> Batching:
        return cls(mode="by_epoch" if config.epochs else "endless", batch_size=config.batch_size,
                   shuffle_buffer=config.shuffle_buffer, seed=config.seed, class_weights=config.class_weights,
                   missing_labels=config.missing_labels)

    @classmethod
    def for_evaluation(cls, config: TrainConfig) -> Batching:
        # Class weights, like Keras's class_weight, weigh training only; a missing label is missing everywhere.
        return cls(mode="once", batch_size=config.batch_size, missing_labels=config.missing_labels)

    @property
    def full_batches_only(self) -> bool:
        return self.mode == "endless"


def global_batches(examples: Examples, *, signature: ModelSignature, batching: Batching,
                   skip_batches: int = 0) -> tf.data.Dataset:
    """Global batches as `(inputs, labels)` or `(inputs, labels, sample_weights)`: what `model.fit` takes.

    Args:
      examples: from `load_examples`.
      signature: the model's input and output names and dtypes.
      batching: global batch size, shuffling, and where batches end.
      skip_batches: batches to skip, to resume where a checkpointed run
        stopped; the pipeline is deterministic for a given --seed.
    """
    parse = _parser(examples, signature=signature, batching=batching)
    records = _record_batches(examples, batching).skip(skip_batches)
    return records.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)


def distributed_batches(strategy: tf.distribute.Strategy, examples: Examples, *, signature: ModelSignature,
                        batching: Batching, skip_batches: int = 0) -> tf.distribute.DistributedDataset:
    """What the custom loop iterates: each replica's slice of each global batch.

    Every input pipeline (one per worker) reads the same global batches and
    keeps only its own replicas' slices (before parsing them): replica r of
    R takes rows [r * s, (r + 1) * s) with s = ceil(rows / R). A full batch
    splits evenly, as `fit` splits it; a final partial batch may leave a
    replica fewer rows, or none, and the step then divides by the rows the
    whole global batch holds. Every worker sees every batch, so all run the
    same number of steps and every example is used exactly once per pass.
    """
    return strategy.distribute_datasets_from_function(
        lambda input_context: replica_slices(input_context, examples, signature=signature, batching=batching,
                                             skip_batches=skip_batches))


def replica_slices(input_context: tf.distribute.InputContext, examples: Examples, *, signature: ModelSignature,
                   batching: Batching, skip_batches: int = 0) -> tf.data.Dataset:
    """One input pipeline's part of `distributed_batches`: its replicas' slices of each global batch, parsed."""
    if batching.served_by is not None:
        return _served_replica_slices(input_context, examples, signature=signature, batching=batching,
                                      skip_batches=skip_batches)
    parse = _parser(examples, signature=signature, batching=batching)
    replicas = input_context.num_replicas_in_sync
    local_replicas = replicas // input_context.num_input_pipelines
    first_replica = input_context.input_pipeline_id * local_replicas
    slice_shape = _slice_shape(batching, replicas)

    def slices(*records):
        record_batch = records if len(records) > 1 else records[0]
        rows = tf.shape(tf.nest.flatten(record_batch)[0], out_type=tf.int64)[0]

        def replica_slice(replica):
            start, end = _rows_of_replicas(replica, 1, rows=rows, replicas=replicas)
            return tf.nest.map_structure(lambda tensor: slice_shape(tensor[start:end]), record_batch)

        return tf.data.Dataset.range(first_replica, first_replica + local_replicas).map(replica_slice)

    records = _record_batches(examples, batching).skip(skip_batches)
    if replicas > 1:
        records = records.flat_map(slices)
    return records.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)


def _served_replica_slices(input_context: tf.distribute.InputContext, examples: Examples, *,
                           signature: ModelSignature, batching: Batching, skip_batches: int) -> tf.data.Dataset:
    """`replica_slices` through `batching.served_by`: the service reads and parses each global batch once and
    hands input pipeline p the rows of its replicas only, in the order one device reads them.

    The service's dataset yields, for each global batch, one element per
    input pipeline (`(global rows, its replicas' rows)`); with coordinated
    reads (`num_consumers`), pipeline p receives element p of every round of
    N, so every pipeline gets its share of the same global batch at the same
    step. (Coordinated reads need an endless dataset: training batches are,
    by steps or by passes.)
    """
    replicas = input_context.num_replicas_in_sync
    pipelines = input_context.num_input_pipelines
    local_replicas = replicas // pipelines
    parse = _parser(examples, signature=signature, batching=batching)
    slice_shape = _slice_shape(batching, replicas)

    def shares(*records):
        batch = parse(*records)  # Read and parsed once, by the service.
        rows = tf.shape(tf.nest.flatten(batch)[0], out_type=tf.int64)[0]

        def share(pipeline):
            start, end = _rows_of_replicas(pipeline * local_replicas, local_replicas, rows=rows, replicas=replicas)
            return rows, tf.nest.map_structure(lambda tensor: tensor[start:end], batch)

        return tf.data.Dataset.range(pipelines).map(share)

    def slices(rows, share):  # This pipeline's share -> one slice per local replica.
        def replica_slice(local_replica):
            start, end = _rows_of_replicas(local_replica, 1, rows=rows, replicas=replicas)
            return tf.nest.map_structure(lambda tensor: slice_shape(tensor[start:end]), share)

        return tf.data.Dataset.range(local_replicas).map(replica_slice)

    served = _record_batches(examples, batching).skip(skip_batches).flat_map(shares).apply(
        tf.data.experimental.service.distribute(
            processing_mode=tf.data.experimental.service.ShardingPolicy.OFF, service=batching.served_by.address,
            job_name=batching.served_by.job_name, consumer_index=input_context.input_pipeline_id,
            num_consumers=pipelines))
    return served.flat_map(slices).prefetch(tf.data.AUTOTUNE)


def _rows_of_replicas(first: tf.Tensor, count: int, *, rows: tf.Tensor, replicas: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Where replicas [first, first + count) of `replicas` find their rows of a global batch of `rows`:
    replica r takes [r * s, (r + 1) * s) with s = ceil(rows / replicas), clipped to the batch."""
    slice_rows = (rows + replicas - 1) // replicas
    start = tf.minimum(first * slice_rows, rows)
    return start, tf.minimum(start + count * slice_rows, rows)


def _slice_shape(batching: Batching, replicas: int):
    """A replica slice as the step wants it: full batches keep a static size (a step traced for an unknown batch
    size ran about 5 % slower); a pass's partial batch may leave a replica fewer rows."""
    if not batching.full_batches_only:
        return lambda tensor: tensor
    per_replica_rows = batching.batch_size // replicas  # The strategy checks it divides.
    return lambda tensor: tf.ensure_shape(tensor, [per_replica_rows, *tensor.shape[1:]])


def steps_per_pass(num_examples: int, batch_size: int) -> int:
    """Global batches in one pass over `num_examples` examples, the partial one included."""
    return -(-num_examples // batch_size)


def _record_batches(examples: Examples, batching: Batching) -> tf.data.Dataset:
    """Batches of unparsed records, `batching.batch_size` each (the last of a pass may hold fewer)."""
    dataset = examples.records
    if batching.shuffle_buffer:
        # Reshuffled each pass, the same way for the same seed (a resumed run replays it).
        dataset = dataset.shuffle(batching.shuffle_buffer, seed=batching.seed, reshuffle_each_iteration=True)
    if batching.mode == "endless":
        dataset = dataset.repeat()
    # Examples of different lengths (a sequence feature) are padded to the
    # longest in the batch, as Keras pads them.
    if all(spec.shape.is_fully_defined() for spec in tf.nest.flatten(dataset.element_spec)):
        dataset = dataset.batch(batching.batch_size, drop_remainder=batching.full_batches_only)
    else:
        dataset = dataset.padded_batch(batching.batch_size, drop_remainder=batching.full_batches_only)
    return dataset.repeat() if batching.mode == "by_epoch" else dataset


def _parser(examples: Examples, *, signature: ModelSignature, batching: Batching):
    """Batch of records -> the tuple `model.fit` takes (and `keras.utils.unpack_x_y_sample_weight` unpacks)."""
    input_dtypes = {name: spec.dtype for name, spec in signature.inputs.items()}
    output_names = signature.output_names
    class_weight_tables = {name: losses.class_weight_table(weights, output=name, prediction=signature.outputs[name])
                           for name, weights in batching.class_weights.items()}
    # The value a source reads where a label is absent (a TFDS optional feature's), and --missing_labels.
    missing_values = [*examples.absent_labels.items(), *batching.missing_labels.items()]

    def to_tuple(*records):
        # tf.data passes a tuple element (a Python dataset's) as separate arguments.
        batch = examples.parse_batch(records if len(records) > 1 else records[0])
        # Inputs as the model declares them (e.g. uint8 images -> float32).
        inputs = {name: tf.cast(batch[name], dtype) for name, dtype in input_dtypes.items()}
        labels = {name: batch[name] for name in output_names}
        sample_weights = {name: tf.reshape(tf.cast(batch[features.SAMPLE_WEIGHT_PREFIX + name], tf.float32), [-1])
                          for name in output_names if features.SAMPLE_WEIGHT_PREFIX + name in batch}
        for name, value in missing_values:
            labels[name], labelled = without_missing_labels(labels[name], value)
            sample_weights[name] = sample_weights[name] * labelled if name in sample_weights else labelled
        for name, table in class_weight_tables.items():
            # Class weights multiply the sample weights (Keras's class_weight replaces them, for one output only).
            weights = losses.class_weights_of(labels[name], table)
            sample_weights[name] = sample_weights[name] * weights if name in sample_weights else weights
        return (inputs, labels, sample_weights) if sample_weights else (inputs, labels)

    return to_tuple


def without_missing_labels(labels: tf.Tensor, missing_value: float) -> tuple[tf.Tensor, tf.Tensor]:
    """A batch's labels with each missing one (every element `missing_value`, or NaN for `nan`) set to 0,
    and each example's weight: 1 where labelled, 0 where missing.

    A missing label must not reach the loss even with weight 0: NaN times 0
    is NaN, and class id -1 is no class. Zero is a label every loss takes.
    """
    if math.isnan(missing_value):
        is_missing = tf.math.is_nan(labels)
    else:
        # Exactly the value, in the labels' own dtype (an int64 label's lowest value is not a float32's).
        value = int(missing_value) if labels.dtype.is_integer else missing_value
        is_missing = tf.equal(labels, tf.constant(value, labels.dtype))
    example_missing = tf.reduce_all(tf.reshape(is_missing, [tf.shape(labels)[0], -1]), axis=1)
    per_element = tf.reshape(example_missing, [-1] + [1] * (labels.shape.rank - 1))
    cleaned = tf.where(per_element, tf.zeros_like(labels), labels)
    return cleaned, 1.0 - tf.cast(example_missing, tf.float32)
