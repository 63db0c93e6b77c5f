"""Evaluation on the validation data: the exact means over every example, named `val_...` as `fit` names them."""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from mto_tf.core import step
from mto_tf.data import batching
from mto_tf.run import driver
from mto_tf.run.setup import Run


def make_evaluation(run: Run) -> Callable[[], dict[str, float]]:
    """Returns `evaluate()`: the run's losses and metrics on its validation data, named `val_...` as `fit` names them."""
    config, setup = run.config, run.setup
    evaluate = step.make_evaluate(model=setup.model, signature=setup.signature, loss_fns=setup.losses.per_example,
                                  loss_weights=setup.losses.weights, output_metrics=run.metrics.validation,
                                  strategy=setup.strategy)
    batches = batching.distributed_batches(setup.strategy, run.validation, signature=setup.signature,
                                           batching=batching.Batching.for_evaluation(config))
    num_examples = run.validation.count()
    num_steps = batching.steps_per_pass(num_examples, config.batch_size)
    if config.eval_steps is not None and config.eval_steps < num_steps:
        num_steps, num_examples = config.eval_steps, config.eval_steps * config.batch_size

    def evaluate_once() -> dict[str, float]:
        values = evaluate(iter(batches), tf.constant(num_steps), tf.constant(num_examples, tf.int64))
        return {**{f"val_{name}": float(values[name]) for name in setup.losses.names},
                **driver.metric_results(run.metrics.validation)}

    return evaluate_once
