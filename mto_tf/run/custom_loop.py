"""The custom loop: drives the explicit train step, `--steps_per_loop` steps per `tf.function` call.

It knows nothing about losses (that is `mto_tf/core/step.py`); the step knows
nothing about checkpoints or logs (that is here and in `driver.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import tensorflow as tf

from mto_tf.core import gradient_shares, step
from mto_tf.data import batching
from mto_tf.run import driver, evaluation
from mto_tf.run.callbacks import KerasCallbacks
from mto_tf.run.preemption import PreemptionWatcher
from mto_tf.run.setup import Run


def run_custom_loop(run: Run, *, on_window_end: Sequence[driver.WindowEndHook] = ()) -> int:
    """Drives the explicit train step from `run.start_step` to `run.total_steps`; returns the step it ended at.

    It ends early, with a checkpoint, once `--early_stopping_patience`
    evaluations have not improved `--save_best`'s value, or when a Keras
    callback sets `model.stop_training` (at the end of that window). The
    run's callbacks are called as `fit` calls them (see `callbacks.py`).
    """
    config, setup = run.config, run.setup
    train_loop = step.make_train_loop(make_train_step(run), run.measurement_names)
    iterator = iter(batching.distributed_batches(setup.strategy, setup.examples, signature=setup.signature,
                                                 batching=batching.Batching.for_training(config),
                                                 skip_batches=run.start_step))
    evaluate = evaluation.make_evaluation(run) if run.validation else None
    measure_shares = make_gradient_share_measurement(run) if config.log_gradient_shares_every else None
    window_ends = driver.WindowEnds(run, hooks=on_window_end)
    keras_callbacks = KerasCallbacks(run)
    preemption = PreemptionWatcher(setup.strategy)
    try:
        current_step = run.start_step
        window = driver.StepSums()
        keras_callbacks.train_begins()
        while current_step < run.total_steps:
            # Stop a loop at the next log, checkpoint, evaluation, epoch or the end, whichever is first.
            num_steps = min(config.steps_per_loop, run.total_steps - current_step,
                            _steps_to_next(current_step, config.log_every),
                            _steps_to_next(current_step, run.epoch_steps),
                            _steps_to_next(current_step, config.checkpoint_every),
                            _steps_to_next(current_step, config.eval_every or run.total_steps),
                            _steps_to_next(current_step, config.log_gradient_shares_every or run.total_steps))
            keras_callbacks.call_begins(current_step)
            # A tensor, not a Python int: a new count must not retrace the loop.
            loop_totals = {name: value.numpy() for name, value in train_loop(iterator, tf.constant(num_steps)).items()}
            # The sums were fetched anyway: checking them costs no extra sync.
            # They are all-reduced, so every worker stops at the same call.
            first_step, last_step = current_step + 1, current_step + num_steps
            driver.check_finite(loop_totals, run=run, where=f"step {last_step}" if first_step == last_step
                                else f"steps {first_step} to {last_step}")
            window.add(loop_totals, num_steps)
            current_step += num_steps
            keras_callbacks.call_ends(current_step, loop_totals, num_steps)
            run.progress.update(current_step, {name: value / num_steps for name, value in loop_totals.items()})
            finished = current_step == run.total_steps
            preempted = None if finished else preemption.stop_agreed()  # SIGTERM or Ctrl-C on any worker.
            # A window ends at each --log_every steps, and with each pass over the data (--epochs).
            window_ended = (current_step % config.log_every == 0 or current_step % run.epoch_steps == 0
                            or finished or preempted is not None)
            # A stop a callback asked for mid-window waits for the window's end.
            epoch_ended = (current_step % run.epoch_steps == 0 or finished
                           or window_ended and keras_callbacks.stop_requested) and not preempted
            record = {}
            if window_ended:
                keras_callbacks.window_ends()
                record.update(window.means())
                record.update(driver.metric_results(run.metrics.training))
                record["examples_per_sec"] = window_ends.examples_per_sec(window.steps)
                window = driver.StepSums()
            if measure_shares and current_step % config.log_gradient_shares_every == 0:
                record.update(measure_shares())
            if evaluate and (finished or (config.eval_every and current_step % config.eval_every == 0)):
                record.update(keras_callbacks.evaluate(evaluate))
            if epoch_ended:
                keras_callbacks.epoch_ends(record)  # EarlyStopping may set model.stop_training here.
            if window_ends(current_step, record, window_ended=window_ended, finished=finished, preempted=preempted,
                           stop_requested=window_ended and keras_callbacks.stop_requested):
                break
        keras_callbacks.train_ends()
        return current_step
    finally:
        preemption.close()


def make_train_step(run: Run):
    """The run's `step.make_train_step`, with its losses, weights and settings."""
    setup = run.setup
    return step.make_train_step(
        model=setup.model, signature=setup.signature, optimizer=run.optimizer,
        loss_fns=setup.losses.per_example, loss_weights=setup.losses.weights,
        output_metrics=run.metrics.training, strategy=setup.strategy,
        # By --epochs, each pass ends with a partial batch: the step counts its examples.
        global_batch_size=None if run.config.epochs else run.config.batch_size,
        accumulation=run.accumulation, jit_compile=run.config.jit_compile,
        compile_update=run.config.xla_update, method=run.method,
        representation=run.representation)


def make_gradient_share_measurement(run: Run) -> Callable[[], dict[str, float]]:
    """Returns `measure()`: each output's share of each layer's gradient at the current weights, as log values.

    On the next batch of its own pass over the training data, under the
    run's strategy (gradients summed over replicas); it changes neither the
    weights nor the training batches.
    """
    config, setup = run.config, run.setup
    contributions = gradient_shares.make_gradient_contributions(
        model=setup.model, signature=setup.signature, loss_fns=setup.losses.per_example,
        loss_weights=setup.losses.weights, strategy=setup.strategy,
        global_batch_size=None if config.epochs else config.batch_size, method=run.method)
    batches = iter(batching.distributed_batches(setup.strategy, setup.examples, signature=setup.signature,
                                                batching=batching.Batching.for_training(config)))

    def measure() -> dict[str, float]:
        report = gradient_shares.layer_report(setup.model, contributions(next(batches)),
                                              loss_weights=setup.losses.weights)
        return gradient_shares.as_record(report)

    return measure


def _steps_to_next(current_step: int, every: int) -> int:
    return every - current_step % every
