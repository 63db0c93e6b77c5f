"""Input pipelines: examples from a source, batched to GLOBAL batches.

`model.fit` takes global batches and splits each across its replicas; the
custom loop builds per-replica batches that, in one process, hold the very
same examples. With several workers each reads its own shard.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras
import tensorflow as tf

from mto_tf.config import TrainConfig
from mto_tf.data import npz, synthetic_headlines


@dataclasses.dataclass(frozen=True)
class Examples:
    """A dataset's examples: one record each, and how a batch of records becomes feature dicts.

    Parsing after batching does the per-example work once per batch.
    """

    records: tf.data.Dataset
    parse_batch: Callable[[object], dict[str, tf.Tensor]]


def load_examples(config: TrainConfig, model: keras.Model, *, split: str = "train") -> Examples:
    """Returns `config.dataset`'s examples.

    The model gives the input shapes and output names the data must match.
    """
    if config.dataset == "synthetic_headlines":
        return synthetic_headlines.load(config, split)
    # TrainConfig only admits "synthetic_headlines" and "npz:PATH".
    records = npz.load(
        config.dataset.removeprefix("npz:"),
        input_shapes={name: tuple(model.input[name].shape[1:]) for name in model.input},
        input_dtypes={name: model.input[name].dtype for name in model.input},
        output_names=list(model.output),
    )
    return Examples(records=records, parse_batch=lambda batch: batch)  # Already feature dicts.


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
    input_names, output_names = list(model.input), list(model.output)

    def to_tuple(records):
        batch = examples.parse_batch(records)
        inputs = {name: batch[name] for name in input_names}
        labels = {name: batch[name] for name in output_names}
        sample_weights = {name: batch[npz.SAMPLE_WEIGHT_PREFIX + name] for name in output_names
                          if npz.SAMPLE_WEIGHT_PREFIX + name in batch}
        return (inputs, labels, sample_weights) if sample_weights else (inputs, labels)

    dataset = examples.records
    if config.shuffle_buffer:
        dataset = dataset.shuffle(config.shuffle_buffer, seed=config.seed, reshuffle_each_iteration=True)
    # Only full batches for now (drop_remainder): every step then sees the
    # same global batch size, which the loss divides by.
    dataset = dataset.repeat().batch(batch_size, drop_remainder=True)
    # Parsed and regrouped once per batch, not per example: per-example work
    # competes with training for the CPU.
    dataset = dataset.skip(skip_batches).map(to_tuple, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.prefetch(tf.data.AUTOTUNE)
