"""`--loop=fit`: the same run through `model.compile` + `model.fit`.

Same model, optimizer, data, checkpoints and files as the custom loop, so a
user can put the two side by side. One fit "epoch" is one logging window of
`--log_every` steps: Keras averages its logs over an epoch, as the custom
loop averages over a window, and a callback hands each epoch's logs to the
same window end as the custom loop's (`driver.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf

from mto_tf.data import batching
from mto_tf.run import compiling, driver
from mto_tf.run.setup import Run


class _WindowEndsOfEpochs(keras.callbacks.Callback):
    """Ends each window (logs, best value, checkpoint) as the custom loop does, at the end of each fit epoch.

    It comes after the run's own callbacks: what they do at an epoch's end
    (a new learning rate, `stop_training`) is in the window's checkpoint.
    """

    def __init__(self, run: Run, *, schedule: driver.Schedule, actions: Sequence[driver.Action]):
        super().__init__()
        self._run = run
        self._timer = driver.WindowTimer()
        self._window_ends = driver.WindowEnds(run, schedule=schedule, timer=self._timer, then=actions)
        self._log_names = [*run.setup.loss_names, *run.metrics.training]
        self._val_names = [f"val_{name}" for name in self._log_names]
        self.last_step = run.start_step
        self._stop_requested = False

    def on_epoch_begin(self, epoch, logs=None):
        self._timer.restart()
        self._epoch = epoch  # One epoch per window: it starts at step epoch * log_every.

    def on_train_batch_end(self, batch, logs=None):
        current_step = self._epoch * self._run.config.log_every + batch + 1
        self._run.progress.update(current_step, {name: logs[name] for name in self._log_names if name in logs})
        if self.model.stop_training:
            # fit would cut the epoch short; as in the custom loop, the window ends first.
            self._stop_requested, self.model.stop_training = True, False

    def on_epoch_end(self, epoch, logs=None):
        config = self._run.config
        # Batches, not the optimizer's iterations (fewer with --grad_accum_steps or skipped float16 steps).
        current_step = self.last_step = (epoch + 1) * config.log_every
        record = {name: logs[name] for name in self._log_names}
        # As the custom loop stops: before logging or checkpointing the window.
        driver.check_finite(record, where=f"the window ending at step {current_step}", run=self._run)
        record["examples_per_sec"] = self._timer.examples_per_sec(config.log_every * config.batch_size)
        if "val_loss" in logs:  # fit evaluated after this window.
            record.update({name: logs[name] for name in self._val_names})
        finished = current_step == self._run.total_steps
        boundary = driver.Boundary(current_step, record=record, window_ended=True, epoch_ended=True,
                                   finished=finished)
        if (self._stop_requested or self.model.stop_training) and not finished:
            boundary.stop = f"Stopping at step {current_step}: a callback set model.stop_training"
        if self._window_ends(boundary):
            self.model.stop_training = True


def fit_batches(run: Run, *, skip_batches: int = 0) -> tf.data.Dataset:
    """The run's global batches, shaped for `fit`.

    A model built with list outputs takes labels and sample weights as
    tuples in output order: Keras 3.15's `fit` fails on dict sample weights
    there (`KeyError: 0` in `compile_utils`). Outputs without sample weights
    then get ones, which leave their losses as they are.
    """
    setup = run.setup
    return _as_fit_takes(run, batching.global_batches(setup.examples, signature=setup.signature,
                                                      batching=batching.Batching.for_training(run.config),
                                                      skip_batches=skip_batches))


def _as_fit_takes(run: Run, batches: tf.data.Dataset) -> tf.data.Dataset:
    signature = run.setup.signature
    if signature.outputs_are_dict:
        return batches
    names = signature.output_names

    def as_tuples(inputs, labels, sample_weights=None):
        labels = tuple(labels[name] for name in names)
        if sample_weights is None:
            return inputs, labels
        ones = tf.ones_like(next(iter(sample_weights.values())))
        return inputs, labels, tuple(sample_weights.get(name, ones) for name in names)

    return batches.map(as_tuples)


def run_fit(run: Run, *, actions: Sequence[driver.Action] = ()) -> int:
    """Trains `run.setup.model` with `model.fit` from `run.start_step` to `total_steps`; returns the step it ended at."""
    config, setup = run.config, run.setup
    compiling.compile_model(run)
    # TrainConfig checks that train_steps, checkpoint_every and eval_every
    # are multiples of log_every (so a restored step is on a window
    # boundary), and log_every a multiple of steps_per_loop (so executions fill a window).
    windows = run.total_steps // config.log_every
    schedule = driver.Schedule.of(run)
    validation = {}
    if run.validation:
        evaluated_windows = [window for window in range(1, windows + 1)
                             if schedule.evaluation_due(window * config.log_every)]
        validation = dict(
            validation_data=_as_fit_takes(run, batching.global_batches(
                run.validation, signature=setup.signature, batching=batching.Batching.for_evaluation(config))),
            validation_steps=config.eval_steps, validation_freq=evaluated_windows)
    window_ends = _WindowEndsOfEpochs(run, schedule=schedule, actions=actions)
    setup.model.fit(
        fit_batches(run, skip_batches=run.start_step),
        initial_epoch=run.start_step // config.log_every,
        epochs=windows,
        steps_per_epoch=config.log_every,
        callbacks=[*run.callbacks, window_ends],
        shuffle=False,  # The dataset is already in the order the custom loop reads.
        verbose=0,
        **validation,
    )
    return window_ends.last_step
