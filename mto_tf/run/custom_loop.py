"""The custom loop: drives the explicit train step, `--steps_per_loop` steps per `tf.function` call.

It knows nothing about losses (that is `mto_tf/core/step.py`, wired in
`train_step.py`); the step knows nothing about checkpoints or logs (those
are the actions at a window's end, `driver.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from mto_tf.core import metrics as metrics_lib
from mto_tf.core import step
from mto_tf.run import driver
from mto_tf.run.callbacks import KerasCallbacks
from mto_tf.run.gradient_share_log import make_gradient_share_measurement
from mto_tf.run.preemption import PreemptionWatcher
from mto_tf.run.setup import Run
from mto_tf.run.train_step import make_train_step


def run_custom_loop(run: Run, *, actions: Sequence[driver.Action] = ()) -> int:
    """Drives the explicit train step from `run.start_step` to `run.total_steps`; returns the step it ended at.

    Each `tf.function` call trains up to the next step where something is
    due (`driver.Schedule`); there the window's record is made, and
    `driver.WindowEnds` does the rest (`actions` after the record is
    written). The Keras callbacks are called as `fit` calls them; one of
    them, or `--early_stopping_patience`, may end the run early.
    """
    config, setup = run.config, run.setup
    schedule = driver.Schedule.of(run)
    train_loop = step.make_train_loop(make_train_step(run), run.measurement_names,
                                      reads_iterator=run.sampler is not None)
    batches = run.training_input()
    measure_shares = make_gradient_share_measurement(run) if config.log_gradient_shares_every else None
    callbacks, timer = KerasCallbacks(run), driver.WindowTimer()
    window_ends = driver.WindowEnds(run, schedule=schedule, timer=timer, first=[callbacks.on_window_end],
                                    then=actions)
    preemption = PreemptionWatcher(setup.strategy)
    try:
        current_step, window = run.start_step, driver.StepSums(run.counted_by)
        callbacks.train_begins()
        while current_step < run.total_steps:
            num_steps = schedule.steps_in_call(current_step)
            callbacks.call_begins(current_step)
            # A tensor, not a Python int: a new count must not retrace the loop.
            loop_totals = {name: value.numpy() for name, value in train_loop(batches, tf.constant(num_steps)).items()}
            # Fetched anyway, so checked for free; all-reduced, so every worker stops at the same call.
            driver.check_finite(loop_totals, run=run, where=_steps(current_step + 1, current_step + num_steps))
            current_step += num_steps
            window.add(loop_totals, num_steps)
            callbacks.call_ends(current_step, loop_totals, num_steps)
            call = driver.StepSums(run.counted_by)
            call.add(loop_totals, num_steps)
            run.progress.update(current_step, call.means())
            # SIGTERM or Ctrl-C on any worker: every worker stops here.
            boundary = schedule.boundary(current_step, preempted=None if current_step == run.total_steps
                                         else preemption.stop_agreed())
            if boundary.window_ended:
                callbacks.keep_epoch_metrics()  # Before the window's training metrics are read and reset.
                untrained = run.outputs_not_trained(window.totals)  # Sampled turns: a task drawn by no step.
                metrics = {name: value for name, value in metrics_lib.results_and_reset(run.metrics.training).items()
                           if run.metrics.training[name][0] not in untrained}
                boundary.record.update({**window.means(), **metrics,
                                        "examples_per_sec": timer.examples_per_sec(run.examples_in(window.totals,
                                                                                                   window.steps))})
                window = driver.StepSums(run.counted_by)
            if measure_shares and schedule.gradient_shares_due(current_step):
                boundary.record.update(measure_shares())
            if run.evaluation and schedule.evaluation_due(current_step):
                boundary.record.update(callbacks.evaluate(run.evaluation))
            if window_ends(boundary):
                break
        callbacks.train_ends()
        return current_step
    finally:
        preemption.close()


def _steps(first: int, last: int) -> str:
    return f"step {last}" if first == last else f"steps {first} to {last}"
