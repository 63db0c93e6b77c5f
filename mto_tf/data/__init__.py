"""Input pipelines: examples from a source, batched to GLOBAL batches.

Sources: the local `synthetic_headlines`, `npz:PATH`, `tfds:NAME` (with
`--feature_map`), or from Python a `tf.data.Dataset` of unbatched
`(inputs, labels)` or `(inputs, labels, sample_weights)` dicts. Each is
checked against the built model before anything is written.

`model.fit` takes global batches and splits each across its replicas. The
custom loop does the same under every strategy: each input pipeline (one per
worker) reads the global batches and keeps its replicas' slices of each. So
every step sees exactly the global batch one device would see, also a final
partial batch, and every worker runs the same number of steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import keras
import tensorflow as tf

from mto_tf import losses, models
from mto_tf.config import ConfigError, TrainConfig
from mto_tf.data import features, npz, synthetic_headlines, tfds_dataset


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

    def count(self) -> int:
        """How many examples there are (read once if the source does not say)."""
        if self.num_examples is not None:
            return self.num_examples
        cardinality = int(self.records.cardinality())
        if cardinality >= 0:
            return cardinality
        return int(self.records.reduce(tf.constant(0, tf.int64), lambda count, _: count + 1))


def load_examples(config: TrainConfig, model: keras.Model) -> Examples:
    """Returns `config.dataset`'s training examples, checked against `model`.

    The model gives the input shapes and output names the data must match.
    """
    if not isinstance(config.dataset, str):
        return _python_examples(config.dataset, model, flag="dataset")
    if config.dataset == "synthetic_headlines":
        examples = synthetic_headlines.load(config, "train")
        features.check(synthetic_headlines.feature_specs(config), model, flag="dataset",
                       where=lambda key: f"synthetic_headlines feature {key!r}")
        return examples
    if config.dataset.startswith("npz:"):
        return _npz_examples(config.dataset.removeprefix("npz:"), model, flag="dataset")
    # TrainConfig admits only these forms; this one is "tfds:NAME".
    return _tfds_examples(config, model, split=config.train_split, split_flag="train_split")


def load_validation_examples(config: TrainConfig, model: keras.Model) -> Examples | None:
    """The validation examples (`--validation_data`, or the dataset's validation split), or None."""
    if config.validation_data is not None:
        if not isinstance(config.validation_data, str):
            return _python_examples(config.validation_data, model, flag="validation_data")
        return _npz_examples(config.validation_data.removeprefix("npz:"), model, flag="validation_data")
    split = config.validation_split_or_default
    if split is None or not isinstance(config.dataset, str) or config.dataset.startswith("npz:"):
        return None
    explicit = config.validation_split is not None  # Else only if the dataset has that split.
    if config.dataset == "synthetic_headlines":
        if split not in ("train", "validation"):
            raise ConfigError("validation_split", f"synthetic_headlines has splits train and validation, "
                                                  f"not {split!r}")
        return synthetic_headlines.load(config, split)
    name = config.dataset.removeprefix("tfds:")
    if not explicit and split not in tfds_dataset.split_names(name, data_dir=config.data_dir):
        return None
    return _tfds_examples(config, model, split=split, split_flag="validation_split")


def _npz_examples(path: str, model: keras.Model, *, flag: str) -> Examples:
    records = npz.load(path, model, flag=flag)
    return Examples(records=records, parse_batch=lambda batch: batch,  # Already feature dicts.
                    num_examples=int(records.cardinality()))


def _tfds_examples(config: TrainConfig, model: keras.Model, *, split: str, split_flag: str) -> Examples:
    records, feature_paths, num_examples = tfds_dataset.load(
        config.dataset.removeprefix("tfds:"), data_dir=config.data_dir, split=split,
        split_flag=split_flag, feature_map=config.feature_map, model=model)
    return Examples(records=records, parse_batch=lambda batch: tfds_dataset.select(batch, feature_paths),
                    num_examples=num_examples)


def _python_examples(dataset: tf.data.Dataset, model: keras.Model, *, flag: str) -> Examples:
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

    features.check(flatten(spec), model, flag=flag, where=lambda key: f"dataset element {key!r}")
    return Examples(records=dataset, parse_batch=lambda batch: flatten(batch))


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

    @classmethod
    def for_training(cls, config: TrainConfig) -> Batching:
        return cls(mode="by_epoch" if config.epochs else "endless", batch_size=config.batch_size,
                   shuffle_buffer=config.shuffle_buffer, seed=config.seed, class_weights=config.class_weights)

    @classmethod
    def for_evaluation(cls, config: TrainConfig) -> Batching:
        # Class weights, like Keras's class_weight, weigh training only.
        return cls(mode="once", batch_size=config.batch_size)

    @property
    def full_batches_only(self) -> bool:
        return self.mode == "endless"


def global_batches(examples: Examples, *, model: keras.Model, batching: Batching,
                   skip_batches: int = 0) -> tf.data.Dataset:
    """Global batches as `(inputs, labels)` or `(inputs, labels, sample_weights)`: what `model.fit` takes.

    Args:
      examples: from `load_examples`.
      model: gives the input and output names.
      batching: global batch size, shuffling, and where batches end.
      skip_batches: batches to skip, to resume where a checkpointed run
        stopped; the pipeline is deterministic for a given --seed.
    """
    parse = _parser(examples, model=model, batching=batching)
    records = _record_batches(examples, batching).skip(skip_batches)
    return records.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)


def distributed_batches(strategy: tf.distribute.Strategy, examples: Examples, *, model: keras.Model,
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
    parse = _parser(examples, model=model, batching=batching)
    full = batching.full_batches_only

    def dataset_fn(input_context: tf.distribute.InputContext) -> tf.data.Dataset:
        replicas = input_context.num_replicas_in_sync
        local_replicas = replicas // input_context.num_input_pipelines
        first_replica = input_context.input_pipeline_id * local_replicas
        per_replica_rows = batching.batch_size // replicas  # Of a full batch (the strategy checks it divides).

        def replica_slices(*records):
            record_batch = records if len(records) > 1 else records[0]
            rows = tf.shape(tf.nest.flatten(record_batch)[0], out_type=tf.int64)[0]
            slice_rows = (rows + replicas - 1) // replicas

            def replica_slice(replica):
                start = tf.minimum(replica * slice_rows, rows)
                end = tf.minimum(start + slice_rows, rows)
                return tf.nest.map_structure(
                    # Full batches keep a static size: a step traced for an unknown
                    # batch size ran about 5 % slower.
                    lambda tensor: tf.ensure_shape(tensor[start:end], [per_replica_rows, *tensor.shape[1:]])
                    if full else tensor[start:end], record_batch)

            return tf.data.Dataset.range(first_replica, first_replica + local_replicas).map(replica_slice)

        records = _record_batches(examples, batching).skip(skip_batches)
        if replicas > 1:
            records = records.flat_map(replica_slices)
        return records.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)

    return strategy.distribute_datasets_from_function(dataset_fn)


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


def _parser(examples: Examples, *, model: keras.Model, batching: Batching):
    """Batch of records -> the tuple `model.fit` takes (and `keras.utils.unpack_x_y_sample_weight` unpacks)."""
    input_dtypes = {name: tensor.dtype for name, tensor in models.input_tensors(model).items()}
    output_names = models.output_names(model)
    predictions = models.output_tensors(model)
    class_weight_tables = {name: losses.class_weight_table(weights, output=name, prediction=predictions[name])
                           for name, weights in batching.class_weights.items()}

    def to_tuple(*records):
        # tf.data passes a tuple element (a Python dataset's) as separate arguments.
        batch = examples.parse_batch(records if len(records) > 1 else records[0])
        # Inputs as the model declares them (e.g. uint8 images -> float32).
        inputs = {name: tf.cast(batch[name], dtype) for name, dtype in input_dtypes.items()}
        labels = {name: batch[name] for name in output_names}
        sample_weights = {name: tf.reshape(tf.cast(batch[features.SAMPLE_WEIGHT_PREFIX + name], tf.float32), [-1])
                          for name in output_names if features.SAMPLE_WEIGHT_PREFIX + name in batch}
        for name, table in class_weight_tables.items():
            # Class weights multiply the sample weights (Keras's class_weight replaces them, for one output only).
            weights = losses.class_weights_of(labels[name], table)
            sample_weights[name] = sample_weights[name] * weights if name in sample_weights else weights
        return (inputs, labels, sample_weights) if sample_weights else (inputs, labels)

    return to_tuple
