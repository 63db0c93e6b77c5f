"""`--loop=fit`: the same run through `model.compile` + `model.fit`.

Same model, optimizer, data, checkpoints and files as the custom loop, so a
user can put the two side by side. One fit "epoch" is one logging window of
`--log_every` steps: Keras averages its logs over an epoch, as the custom
loop averages over a window.
"""

from __future__ import annotations

import logging
import math
import time

import keras
import tensorflow as tf

from mto_tf import data, models, outputs
from mto_tf.trainer import Run

logger = logging.getLogger(__name__)


class _WriteOutputs(keras.callbacks.Callback):
    """Logs each window and checkpoints like the custom loop does."""

    def __init__(self, run: Run):
        super().__init__()
        self._run = run
        self._log_names = ["loss", *(f"{name}_loss" for name in run.losses), *run.output_metrics]
        self._val_names = [f"val_{name}" for name in self._log_names]
        self.last_step = run.start_step

    def on_epoch_begin(self, epoch, logs=None):
        self._window_start = time.perf_counter()
        self._epoch = epoch  # One epoch per window: it starts at step epoch * log_every.

    def on_train_batch_end(self, batch, logs=None):
        current_step = self._epoch * self._run.config.log_every + batch + 1
        self._run.progress.update(current_step, {name: logs[name] for name in self._log_names if name in logs})

    def on_epoch_end(self, epoch, logs=None):
        config = self._run.config
        # Batches, not the optimizer's iterations (fewer with --grad_accum_steps or skipped float16 steps).
        current_step = self.last_step = (epoch + 1) * config.log_every
        not_finite = [name for name in self._log_names if not math.isfinite(logs[name])]
        if not_finite:  # As the custom loop stops: before logging or checkpointing the window.
            raise outputs.NonFiniteError(f"{', '.join(not_finite)} not finite in the window ending at step "
                                         f"{current_step}", kept_step=self._run.checkpoints.latest_step)
        measurements = {name: logs[name] for name in self._log_names}
        measurements["examples_per_sec"] = (config.log_every * config.batch_size
                                            / (time.perf_counter() - self._window_start))
        stop_early = False
        if "val_loss" in logs:  # fit evaluated after this window.
            measurements.update({name: logs[name] for name in self._val_names})
            if self._run.best_value:
                measurements.update(self._run.best_value.update(current_step, measurements, self.model))
                stop_early = self._run.best_value.patience_exhausted
        record = self._run.metrics_log.write(current_step, measurements)
        self._run.progress.window(current_step, record)
        if current_step % config.checkpoint_every == 0 or current_step == self._run.total_steps or stop_early:
            self._run.checkpoints.save(current_step)
        if stop_early:
            logger.info("Early stopping at step %d: %s", current_step, self._run.best_value.describe_stop())
            self.model.stop_training = True


def compile_model(run: Run, *, keras_defaults: bool = False) -> None:
    """`model.compile` with the run's losses, weights, metrics and optimizer.

    With the run's steps per call and XLA setting, or, for comparison, with
    Keras's defaults for those two.
    """
    config = run.config
    settings = {} if keras_defaults else dict(jit_compile=config.jit_compile, steps_per_execution=config.steps_per_loop)
    with run.strategy.scope():
        run.model.compile(
            optimizer=run.optimizer,
            loss={name: _configured(identifier, keras.losses.get) for name, identifier in run.losses.items()},
            loss_weights=run.loss_weights,
            metrics={name: [_configured(identifier, keras.metrics.get) for identifier in identifiers]
                     for name, identifiers in run.metrics.items()},
            **settings,
        )


def _configured(identifier, get):
    """A Keras config (a dict) as the object it describes: `compile` would read a dict as one entry per key."""
    return get(identifier) if isinstance(identifier, dict) else identifier


def fit_batches(run: Run, *, skip_batches: int = 0) -> tf.data.Dataset:
    """The run's global batches, shaped for `fit`.

    A model built with list outputs takes labels and sample weights as
    tuples in output order: Keras 3.15's `fit` fails on dict sample weights
    there (`KeyError: 0` in `compile_utils`). Outputs without sample weights
    then get ones, which leave their losses as they are.
    """
    return _as_fit_takes(run, data.global_batches(run.examples, model=run.model,
                                                  batching=data.Batching.for_training(run.config),
                                                  skip_batches=skip_batches))


def _as_fit_takes(run: Run, batches: tf.data.Dataset) -> tf.data.Dataset:
    if isinstance(run.model.output, dict):
        return batches
    names = models.output_names(run.model)

    def as_tuples(inputs, labels, sample_weights=None):
        labels = tuple(labels[name] for name in names)
        if sample_weights is None:
            return inputs, labels
        ones = tf.ones_like(next(iter(sample_weights.values())))
        return inputs, labels, tuple(sample_weights.get(name, ones) for name in names)

    return batches.map(as_tuples)


def run_fit(run: Run) -> int:
    """Trains `run.model` with `model.fit` from `run.start_step` to `total_steps`; returns the step it ended at."""
    config = run.config
    compile_model(run)
    # TrainConfig checks that train_steps, checkpoint_every and eval_every
    # are multiples of log_every (so a restored step is on a window
    # boundary), and log_every a multiple of steps_per_loop (so executions fill a window).
    windows = run.total_steps // config.log_every
    validation = {}
    if run.validation:
        evaluated_windows = [window for window in range(1, windows + 1) if window == windows or (
            config.eval_every and window * config.log_every % config.eval_every == 0)]
        validation = dict(
            validation_data=_as_fit_takes(run, data.global_batches(
                run.validation, model=run.model, batching=data.Batching.for_evaluation(config))),
            validation_steps=config.eval_steps, validation_freq=evaluated_windows)
    write_outputs = _WriteOutputs(run)
    run.model.fit(
        fit_batches(run, skip_batches=run.start_step),
        initial_epoch=run.start_step // config.log_every,
        epochs=windows,
        steps_per_epoch=config.log_every,
        callbacks=[write_outputs],
        shuffle=False,  # The dataset is already in the order the custom loop reads.
        verbose=0,
        **validation,
    )
    return write_outputs.last_step
