"""The run's train step: the fixed weighted sum, or `--loss_weighting`'s method, with the run's optimizer and settings.

The one place where a run chooses how each replica's gradient is computed
(`core/step.py`'s one parameter), and, with a sampled `--task_mixing`, which
task each step trains (`core/task_sampling.py`); the loops only call the step.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from mto_tf.core import step, task_sampling, weighting
from mto_tf.core.objective import Objective
from mto_tf.run.setup import Run


def make_train_step(run: Run) -> Callable[[object], dict[str, tf.Tensor]]:
    """`step.make_train_step` for the run: its objective, gradient function, optimizer, accumulation and XLA.

    Sampled turns: one such step per task, on its losses alone; each step
    runs the drawn task's (and reads its iterator: `{task: iterator}`).
    """
    if not run.sampler:
        return _train_step(run, run.objective, global_batch_size=run.setup.global_batch_sizes)
    task_steps = {task.name: _train_step(run, run.objective.of_task(task.name), global_batch_size=task.batch_size)
                  for task in run.setup.tasks}
    return task_sampling.sampled_turns(task_steps, run.sampler, run.measurement_names)


def _train_step(run: Run, objective: Objective, *, global_batch_size) -> Callable[[object], dict[str, tf.Tensor]]:
    config, setup = run.config, run.setup
    what_is_trained = dict(
        objective=objective, optimizer=run.optimizer, output_metrics=run.metrics.training,
        # By --epochs, each pass ends with a partial batch: the step counts its examples.
        global_batch_size=global_batch_size)
    if run.method:
        gradient_function = weighting.adaptive_weights(run.method, strategy=setup.strategy,
                                                       representation=run.representation, **what_is_trained)
    else:
        gradient_function = step.fixed_weights(**what_is_trained)
    return step.make_train_step(gradient_function=gradient_function, optimizer=run.optimizer,
                                strategy=setup.strategy, accumulation=run.accumulation,
                                jit_compile=config.jit_compile, compile_update=config.xla_update)
