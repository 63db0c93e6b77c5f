"""Evaluation: a model's losses and metrics as exact means over every example, under any strategy.

Built here, once, for validation during training (named `val_...`, as
`fit` names them) and for `mto-evaluate`. Every example counts once: the
last batch may be partial and split unevenly across replicas and workers,
and each term's sums are added over replicas and batches before they are
divided (`core/step.py`'s `make_evaluate`).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from mto_tf.core import metrics as metrics_lib
from mto_tf.core import step
from mto_tf.core.objective import Objective
from mto_tf.data import batching, sources
from mto_tf.data.examples import Examples
from mto_tf.data.tasks import Task
from mto_tf.errors import ConfigError
from mto_tf.run.model_setup import ModelSetup


class Evaluation:
    """A model's evaluation on some examples: `evaluation()` returns every value, each named with a prefix."""

    def __init__(self, setup: ModelSetup, examples: Examples, *, metric_identifiers: dict[str, list],
                 prefix: str = "", max_steps: int | None = None, objective: Objective | None = None,
                 task: Task | None = None):
        """Builds the evaluation of `setup`'s model on `examples`, its metrics made in the strategy's scope.

        Args:
          setup: the model, its losses and strategy; batches of `--batch_size` examples.
          examples: what to evaluate on, every example of it.
          metric_identifiers: each output's metrics, as `compile` takes them.
          prefix: before each value's name (`val_` during training).
          max_steps: evaluate the first `max_steps` batches only (`--eval_steps`).
          objective: what to weigh the losses by (a run's weights in force); default `setup.objective`.
          task: with --datasets, the task `examples` are of: its outputs alone are evaluated, in batches of
            its batch size.
        """
        self._setup, self.examples, self._prefix = setup, examples, prefix
        objective = objective or setup.objective
        self._signature, config = (task.signature, task.config) if task else (setup.signature, setup.config)
        if task:
            objective = objective.of_task(task.name)
            metric_identifiers = {name: metric_identifiers[name] for name in task.outputs if name in metric_identifiers}
        self._batching = batching.Batching.for_evaluation(config)
        with setup.strategy.scope():
            self.metrics: dict[str, tuple[str, keras.metrics.Metric]] = {  # By log name, prefix included.
                prefix + name: output_metric for name, output_metric in metrics_lib.make_output_metrics(
                    metric_identifiers, y_true=setup.labels_spec, y_pred=setup.signature.outputs).items()}
        self._evaluate = step.make_evaluate(objective=objective, output_metrics=self.metrics, strategy=setup.strategy)
        self.num_examples = examples.count()
        self._num_steps = batching.steps_per_pass(self.num_examples, config.batch_size)
        if max_steps is not None and max_steps < self._num_steps:
            self._num_steps, self.num_examples = max_steps, max_steps * config.batch_size
        self._batches = None  # Made at the first evaluation: a run through model.fit never needs them.
        # As fit names them; a task's evaluation reports each of its terms' (its total is not the run's).
        self._names = ["loss", *(f"{name}_loss" for name in objective.terms)] if task else setup.losses.names
        self.loss_names = [prefix + name for name in self._names]  # What it reports, prefix included.

    def __call__(self) -> dict[str, float | list]:
        """The losses and metrics, each an exact mean over the evaluated examples; the metrics then start again.

        With a task, `loss` is its outputs' weighted total (and the regularization)."""
        setup = self._setup
        if self._batches is None:
            self._batches = batching.distributed_batches(setup.strategy, self.examples, signature=self._signature,
                                                         batching=self._batching)
        values = self._evaluate(iter(self._batches), tf.constant(self._num_steps))
        return {**{self._prefix + name: float(values[name]) for name in self._names},
                **metrics_lib.results_and_reset(self.metrics)}


class TaskEvaluations:
    """With --datasets: each task's evaluation on its own examples; `loss` is the weighted total of every
    evaluated output's loss (and the regularization, once), as one dataset's `loss` is."""

    def __init__(self, evaluations: dict[str, Evaluation], *, objective: Objective, reported: list[str],
                 prefix: str = ""):
        """`reported`: the loss names a run reports (`loss`, and each term's when there are several)."""
        self._evaluations, self._objective, self._prefix = evaluations, objective, prefix
        self._reported = {prefix + name for name in reported}
        self.metrics = {name: metric for evaluation in evaluations.values() for name, metric in
                        evaluation.metrics.items()}
        self.num_examples = {task: evaluation.num_examples for task, evaluation in evaluations.items()}
        self.loss_names = [prefix + "loss", *sorted({name for evaluation in evaluations.values()
                                                     for name in evaluation.loss_names} & self._reported)]

    def __call__(self) -> dict[str, float | list]:
        values = {}
        for evaluation in self._evaluations.values():
            values.update(evaluation())
        term_losses = {name: tf.constant(values[f"{self._prefix}{name}_loss"], tf.float32)
                       for name in self._objective.terms if f"{self._prefix}{name}_loss" in values}
        total = self._objective.total_loss(term_losses, replicas_share=False)
        # Each task's own total is not the run's; a term's loss is reported as one dataset's run reports it.
        unreported = {self._prefix + "loss", *(f"{self._prefix}{term}_loss" for term in self._objective.terms
                                               if f"{self._prefix}{term}_loss" not in self._reported)}
        return {self._prefix + "loss": float(total),
                **{name: value for name, value in values.items() if name not in unreported}}


def validation_of(setup: ModelSetup, *, metric_identifiers: dict[str, list], objective: Objective,
                  max_steps: int | None = None) -> Evaluation | TaskEvaluations | None:
    """The evaluation of the run's validation data (`val_` values), if there is any.

    `--validation_data`, else the dataset's validation split; with --datasets,
    each task's (its own --validation_data, or its dataset's split), where it
    has some.
    """
    return _evaluation_of(setup, lambda task, config, signature: sources.load_validation_examples(config, signature),
                          metric_identifiers=metric_identifiers, objective=objective, max_steps=max_steps,
                          prefix="val_")


def evaluation_of(setup: ModelSetup, *, data, split: str | None, metric_identifiers: dict[str, list]
                  ) -> Evaluation | TaskEvaluations | None:
    """mto-evaluate's: of `data` (`npz:PATH`; with --datasets, `{task: npz:PATH}`) or `split` of the dataset (of
    each task's dataset)."""

    def examples_of(task, config, signature):
        task_data = data.get(task) if isinstance(data, dict) else data
        if task_data is None and split is None:  # A task --eval_data leaves out.
            return None
        examples = sources.load_evaluation_examples(config, signature, data=task_data, split=split,
                                                    split_must_exist=True, data_flag="eval_data",
                                                    split_flag="eval_split")
        if examples is None:  # A split of a source without splits (npz, a Python dataset).
            raise ConfigError("eval_split", f"--dataset={config.describe()['dataset']} has no splits; give "
                                            f"--eval_data=npz:PATH")
        return examples

    return _evaluation_of(setup, examples_of, metric_identifiers=metric_identifiers, objective=setup.objective)


def _evaluation_of(setup: ModelSetup, examples_of, *, metric_identifiers: dict[str, list], objective: Objective,
                   max_steps: int | None = None, prefix: str = "") -> Evaluation | TaskEvaluations | None:
    """The evaluation of the examples `examples_of(task, config, signature)` gives (task None without
    --datasets; else of each task)."""
    common = dict(metric_identifiers=metric_identifiers, prefix=prefix, max_steps=max_steps, objective=objective)
    if not setup.tasks:
        examples = examples_of(None, setup.config, setup.signature)
        return Evaluation(setup, examples, **common) if examples is not None else None
    evaluations = {}
    for task in setup.tasks:
        try:
            examples = examples_of(task.name, task.config, task.signature)
        except ConfigError as error:
            raise error.about_task(task.name) from None
        if examples is not None:
            evaluations[task.name] = Evaluation(setup, examples, task=task, **common)
    return (TaskEvaluations(evaluations, objective=objective, reported=setup.losses.names, prefix=prefix)
            if evaluations else None)
