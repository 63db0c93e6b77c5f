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
from mto_tf.data import batching
from mto_tf.data.examples import Examples
from mto_tf.run.model_setup import ModelSetup


class Evaluation:
    """A model's evaluation on some examples: `evaluation()` returns every value, each named with a prefix."""

    def __init__(self, setup: ModelSetup, examples: Examples, *, metric_identifiers: dict[str, list],
                 prefix: str = "", max_steps: int | None = None, objective: Objective | None = None):
        """Builds the evaluation of `setup`'s model on `examples`, its metrics made in the strategy's scope.

        Args:
          setup: the model, its losses and strategy; batches of `--batch_size` examples.
          examples: what to evaluate on, every example of it.
          metric_identifiers: each output's metrics, as `compile` takes them.
          prefix: before each value's name (`val_` during training).
          max_steps: evaluate the first `max_steps` batches only (`--eval_steps`).
          objective: what to weigh the losses by (a run's weights in force); default `setup.objective`.
        """
        self._setup, self._examples, self._prefix = setup, examples, prefix
        with setup.strategy.scope():
            self.metrics: dict[str, tuple[str, keras.metrics.Metric]] = {  # By log name, prefix included.
                prefix + name: output_metric for name, output_metric in metrics_lib.make_output_metrics(
                    metric_identifiers, y_true=setup.labels_spec, y_pred=setup.signature.outputs).items()}
        self._evaluate = step.make_evaluate(objective=objective or setup.objective, output_metrics=self.metrics,
                                            strategy=setup.strategy)
        self.num_examples = examples.count()
        self._num_steps = batching.steps_per_pass(self.num_examples, setup.config.batch_size)
        if max_steps is not None and max_steps < self._num_steps:
            self._num_steps, self.num_examples = max_steps, max_steps * setup.config.batch_size
        self._batches = None  # Made at the first evaluation: a run through model.fit never needs them.

    def __call__(self) -> dict[str, float | list]:
        """The losses and metrics, each an exact mean over the evaluated examples; the metrics then start again."""
        setup = self._setup
        if self._batches is None:
            self._batches = batching.distributed_batches(setup.strategy, self._examples, signature=setup.signature,
                                                         batching=batching.Batching.for_evaluation(setup.config))
        values = self._evaluate(iter(self._batches), tf.constant(self._num_steps))
        return {**{self._prefix + name: float(values[name]) for name in setup.losses.names},
                **metrics_lib.results_and_reset(self.metrics)}
