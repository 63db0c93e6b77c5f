"""One dataset per task (`--datasets`): each task's examples, checked against the model, and their batches.

A task is one output, or several joined by `,`, whose labels come from one
source. Each task's data is loaded, checked and batched exactly as a run's
one dataset is (`sources.py`, `batching.py`), with the task's own settings
(`TrainConfig.task_config`) and against the model's inputs and the task's
outputs only (`ModelSignature.with_outputs`): its batches hold its outputs'
labels and sample weights, and nothing of the other tasks'.

Joint steps read one global batch of every task: a dict `{task: batch}`,
each task's split across replicas and workers as a single dataset's is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import tensorflow as tf

from mto_tf import task_mixing
from mto_tf.config import TrainConfig
from mto_tf.core.signature import ModelSignature
from mto_tf.data import batching, sources
from mto_tf.data.examples import Examples
from mto_tf.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Task:
    """One task: its outputs, its settings and its training examples."""

    name: str  # As --datasets names it: an output, or several joined by ",".
    config: TrainConfig  # The run's settings with this task's source as --dataset, its batch size, ...
    signature: ModelSignature  # The model's inputs and this task's outputs.
    examples: Examples

    @property
    def outputs(self) -> list[str]:
        return self.signature.output_names

    @property
    def batch_size(self) -> int:
        """The task's GLOBAL batch size."""
        return self.config.batch_size


def load_tasks(config: TrainConfig, signature: ModelSignature) -> tuple[Task, ...]:
    """Each task of `config.datasets`, its examples checked against the model; every output in one task."""
    tasks = []
    for name in config.datasets:
        outputs = task_mixing.task_outputs(name)
        unknown = [output for output in outputs if output not in signature.outputs]
        if unknown:
            raise ConfigError("datasets", f"task {name!r}: unknown output {unknown[0]!r}; model "
                                          f"{signature.model_name!r} has outputs {signature.output_names}")
        task_config = config.task_config(name)
        task_signature = signature.with_outputs(outputs)
        try:
            examples = sources.load_examples(task_config, task_signature)
        except ConfigError as error:  # Named as --dataset would be: say which task's source it is.
            raise error.about_task(name) from None
        tasks.append(Task(name=name, config=task_config, signature=task_signature, examples=examples))
    in_a_task = {output for task in tasks for output in task.outputs}
    missing = [output for output in signature.output_names if output not in in_a_task]
    if missing:
        raise ConfigError("datasets", f"output {missing[0]!r} is in no task; every output's labels come from one "
                                      f"task's dataset (tasks {list(config.datasets)})")
    return tuple(tasks)


def epochs_task(config: TrainConfig, tasks: tuple[Task, ...]) -> Task:
    """The task whose passes --epochs counts: --epochs_of, else the one with the most examples (the first of
    equals)."""
    if config.epochs_of is not None:
        return next(task for task in tasks if task.name == config.epochs_of)
    return max(tasks, key=lambda task: task.examples.count())


def training_batching(task: Task, *, by_epoch: bool) -> batching.Batching:
    """How a task's examples become training batches: passes (its partial batches included) for the task
    --epochs counts, else endless full batches."""
    training = batching.Batching.for_training(task.config)
    return training if by_epoch else dataclasses.replace(training, mode="endless")


def joint_batches(strategy: tf.distribute.Strategy, tasks: tuple[Task, ...], *,
                  batchings: Mapping[str, batching.Batching], skip_batches: int = 0
                  ) -> tf.distribute.DistributedDataset:
    """Each step's global batch of every task, as `{task: batch}`: each replica's slices of each."""

    def dataset_fn(input_context: tf.distribute.InputContext) -> tf.data.Dataset:
        return tf.data.Dataset.zip({task.name: batching.replica_slices(
            input_context, task.examples, signature=task.signature, batching=batchings[task.name],
            skip_batches=skip_batches) for task in tasks})

    return strategy.distribute_datasets_from_function(dataset_fn)
