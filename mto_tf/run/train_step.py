"""The run's train step: the fixed weighted sum, or `--loss_weighting`'s method, with the run's optimizer and settings.

The one place where a run chooses how each replica's gradient is computed
(`core/step.py`'s one parameter); the loops only call the step.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from mto_tf.core import step, weighting
from mto_tf.run.setup import Run


def make_train_step(run: Run) -> Callable[[object], dict[str, tf.Tensor]]:
    """`step.make_train_step` for the run: its objective, gradient function, optimizer, accumulation and XLA."""
    config, setup = run.config, run.setup
    what_is_trained = dict(
        objective=run.objective, optimizer=run.optimizer, output_metrics=run.metrics.training,
        # By --epochs, each pass ends with a partial batch: the step counts its examples.
        global_batch_size=None if config.epochs else config.batch_size)
    if run.method:
        gradient_function = weighting.adaptive_weights(run.method, strategy=setup.strategy,
                                                       representation=run.representation, **what_is_trained)
    else:
        gradient_function = step.fixed_weights(**what_is_trained)
    return step.make_train_step(gradient_function=gradient_function, optimizer=run.optimizer,
                                strategy=setup.strategy, accumulation=run.accumulation,
                                jit_compile=config.jit_compile, compile_update=config.xla_update)
