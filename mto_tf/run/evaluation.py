"""Evaluation: a model's losses and metrics as exact means over every example, under any strategy.

Built here, once, for validation during training (named `val_...`, as
`fit` names them) and for `mto-evaluate`. Every example counts once: the
last batch may be partial and split unevenly across replicas and workers,
and each replica divides its sums by the number of examples evaluated
(`core/step.py`'s `make_evaluate`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras
import tensorflow as tf

from mto_tf.core import metrics as metrics_lib
from mto_tf.core import step
from mto_tf.data import batching
from mto_tf.data.examples import Examples
from mto_tf.run.model_setup import ModelSetup


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """`evaluation()`: the values over the examples (`num_examples` of them), each named with `prefix`."""

    metrics: dict[str, tuple[str, keras.metrics.Metric]]  # `{log name: (output, metric)}`, prefix included.
    num_examples: int
    prefix: str
    _evaluate: Callable[[], dict[str, float | list]]

    def __call__(self) -> dict[str, float | list]:
        return self._evaluate()


def make_evaluation(setup: ModelSetup, examples: Examples, *, metric_identifiers: dict[str, list], prefix: str = "",
                    max_steps: int | None = None) -> Evaluation:
    """The evaluation of `setup`'s model on `examples`, its metrics made in the strategy's scope.

    Args:
      setup: the model, its losses and strategy; batches of `--batch_size` examples.
      examples: what to evaluate on, every example of it.
      metric_identifiers: each output's metrics, as `compile` takes them.
      prefix: before each value's name (`val_` during training).
      max_steps: evaluate the first `max_steps` batches only (`--eval_steps`).
    """
    config, strategy = setup.config, setup.strategy
    with strategy.scope():
        output_metrics = {prefix + name: output_metric for name, output_metric in metrics_lib.make_output_metrics(
            metric_identifiers, y_true=setup.labels_spec, y_pred=setup.signature.outputs).items()}
    evaluate = step.make_evaluate(objective=setup.objective, output_metrics=output_metrics, strategy=strategy)
    num_examples = examples.count()
    num_steps = batching.steps_per_pass(num_examples, config.batch_size)
    if max_steps is not None and max_steps < num_steps:
        num_steps, num_examples = max_steps, max_steps * config.batch_size
    distributed = []  # Made at the first evaluation: a run through model.fit never needs them.

    def evaluate_once() -> dict[str, float | list]:
        if not distributed:
            distributed.append(batching.distributed_batches(strategy, examples, signature=setup.signature,
                                                            batching=batching.Batching.for_evaluation(config)))
        values = evaluate(iter(distributed[0]), tf.constant(num_steps), tf.constant(num_examples, tf.int64))
        return {**{prefix + name: float(values[name]) for name in setup.losses.names},
                **metrics_lib.results_and_reset(output_metrics)}

    return Evaluation(metrics=output_metrics, num_examples=num_examples, prefix=prefix, _evaluate=evaluate_once)
