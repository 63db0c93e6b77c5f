"""Input pipelines: examples from a source, batched to GLOBAL batches.

Sources: the local `synthetic_headlines`, `npz:PATH`, `tfds:NAME` (with
`--feature_map`), or from Python a `tf.data.Dataset` of unbatched
`(inputs, labels)` or `(inputs, labels, sample_weights)` dicts. Each is
checked against the built model before anything is written.

`model.fit` takes global batches and splits each across its replicas; the
custom loop builds per-replica batches that, in one process, hold the very
same examples. With several workers each reads its own shard.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras
import tensorflow as tf

from mto_tf import models
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


def load_examples(config: TrainConfig, model: keras.Model) -> Examples:
    """Returns `config.dataset`'s training examples, checked against `model`.

    The model gives the input shapes and output names the data must match.
    """
    if not isinstance(config.dataset, str):
        return _python_examples(config.dataset, model)
    if config.dataset == "synthetic_headlines":
        examples = synthetic_headlines.load(config, "train")
        features.check(synthetic_headlines.feature_specs(config), model, flag="dataset",
                       where=lambda key: f"synthetic_headlines feature {key!r}")
        return examples
    if config.dataset.startswith("npz:"):
        records = npz.load(config.dataset.removeprefix("npz:"), model)
        return Examples(records=records, parse_batch=lambda batch: batch)  # Already feature dicts.
    # TrainConfig admits only these forms; this one is "tfds:NAME".
    records, feature_paths = tfds_dataset.load(
        config.dataset.removeprefix("tfds:"), data_dir=config.data_dir, split=config.train_split,
        split_flag="train_split", feature_map=config.feature_map, model=model)
    return Examples(records=records, parse_batch=lambda batch: tfds_dataset.select(batch, feature_paths))


def _python_examples(dataset: tf.data.Dataset, model: keras.Model) -> Examples:
    """A `tf.data.Dataset` of `(inputs, labels[, sample_weights])` dicts, one example each."""
    spec = dataset.element_spec
    if not (isinstance(spec, tuple) and len(spec) in (2, 3) and all(isinstance(part, dict) for part in spec)):
        raise ConfigError("dataset", f"expected a tf.data.Dataset of unbatched (inputs, labels) or "
                                     f"(inputs, labels, sample_weights) dicts, got elements {spec}")
    keys = [name for part in spec[:2] for name in part]
    keys += [features.SAMPLE_WEIGHT_PREFIX + name for name in (spec[2] if len(spec) == 3 else {})]
    if len(set(keys)) != len(keys):
        raise ConfigError("dataset", f"an input and an output share a name in the dataset's dicts ({keys})")

    def flatten(batch):
        inputs, labels, *sample_weights = batch
        weights = sample_weights[0] if sample_weights else {}
        return {**inputs, **labels, **{features.SAMPLE_WEIGHT_PREFIX + name: value for name, value in weights.items()}}

    features.check(flatten(spec), model, flag="dataset", where=lambda key: f"dataset element {key!r}")
    return Examples(records=dataset, parse_batch=lambda batch: flatten(batch))


def global_batches(examples: Examples, *, model: keras.Model, config: TrainConfig,
                   skip_batches: int = 0) -> tf.data.Dataset:
    """Endless global batches as `(inputs, labels)` or `(inputs, labels, sample_weights)`: what `model.fit` takes.

    Args:
      examples: from `load_examples`.
      model: gives the input and output names.
      config: `batch_size` (global), `shuffle_buffer` and `seed`.
      skip_batches: batches to skip, to resume where a checkpointed run
        stopped; the pipeline is deterministic for a given --seed.
    """
    return _batches(examples, model=model, config=config, batch_size=config.batch_size, skip_batches=skip_batches)


def distributed_batches(strategy: tf.distribute.Strategy, examples: Examples, *, model: keras.Model,
                        config: TrainConfig, skip_steps: int = 0) -> tf.distribute.DistributedDataset:
    """What the custom loop iterates: one per-replica batch per replica per step.

    Each input pipeline (one per worker) reads every n-th example (its shard)
    and batches them to the per-replica batch size; the strategy hands its
    replicas consecutive batches. With one pipeline, step k's replicas
    together hold exactly global batch k, as `model.fit` would split it.
    """

    def dataset_fn(input_context: tf.distribute.InputContext) -> tf.data.Dataset:
        shard = examples
        if input_context.num_input_pipelines > 1:
            shard = dataclasses.replace(examples, records=examples.records.shard(
                input_context.num_input_pipelines, input_context.input_pipeline_id))
        replicas_per_pipeline = input_context.num_replicas_in_sync // input_context.num_input_pipelines
        return _batches(shard, model=model, config=config,
                        batch_size=input_context.get_per_replica_batch_size(config.batch_size),
                        skip_batches=skip_steps * replicas_per_pipeline)

    return strategy.distribute_datasets_from_function(dataset_fn)


def _batches(examples: Examples, *, model: keras.Model, config: TrainConfig, batch_size: int,
             skip_batches: int) -> tf.data.Dataset:
    # The tuple is what `model.fit` takes, and `keras.utils.unpack_x_y_sample_weight`
    # unpacks it in the custom loop, so both loops read the same structure.
    input_dtypes = {name: tensor.dtype for name, tensor in models.input_tensors(model).items()}
    output_names = models.output_names(model)

    def to_tuple(*records):
        # tf.data passes a tuple element (a Python dataset's) as separate arguments.
        batch = examples.parse_batch(records if len(records) > 1 else records[0])
        # Inputs as the model declares them (e.g. uint8 images -> float32).
        inputs = {name: tf.cast(batch[name], dtype) for name, dtype in input_dtypes.items()}
        labels = {name: batch[name] for name in output_names}
        sample_weights = {name: tf.reshape(tf.cast(batch[features.SAMPLE_WEIGHT_PREFIX + name], tf.float32), [-1])
                          for name in output_names if features.SAMPLE_WEIGHT_PREFIX + name in batch}
        return (inputs, labels, sample_weights) if sample_weights else (inputs, labels)

    dataset = examples.records
    if config.shuffle_buffer:
        dataset = dataset.shuffle(config.shuffle_buffer, seed=config.seed, reshuffle_each_iteration=True)
    # Only full batches for now (drop_remainder): every step then sees the
    # same global batch size, which the loss divides by. Examples of
    # different lengths (a sequence feature) are padded to the longest.
    dataset = dataset.repeat()
    if all(spec.shape.is_fully_defined() for spec in tf.nest.flatten(dataset.element_spec)):
        dataset = dataset.batch(batch_size, drop_remainder=True)
    else:
        dataset = dataset.padded_batch(batch_size, drop_remainder=True)
    # Parsed and regrouped once per batch, not per example: per-example work
    # competes with training for the CPU.
    dataset = dataset.skip(skip_batches).map(to_tuple, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.prefetch(tf.data.AUTOTUNE)
