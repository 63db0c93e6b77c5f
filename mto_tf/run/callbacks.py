"""Keras callbacks in the custom loop, called as `model.fit` calls them.

Keras 3.15's `fit` (keras/src/backend/tensorflow/trainer.py) makes these
calls on one `keras.callbacks.CallbackList`, and `KerasCallbacks` makes
them from the custom loop:

    on_train_begin()
    each epoch:  on_epoch_begin(epoch)
        each tf.function call:  on_train_batch_begin(its first batch), on_train_batch_end(its last, logs)
        an evaluation:  on_test_begin(), on_test_batch_begin/end, on_test_end(logs)
        on_epoch_end(epoch, logs)
    on_train_end(the last epoch's logs)

An epoch is a pass over the training data with --epochs, else a logging
window of --log_every steps (as --loop=fit counts one). Batches are
numbered from 0 in each epoch; the logs are the epoch's means so far, named
as `fit` names them, and at the epoch's end its `val_` values when it ended
with an evaluation. The custom loop evaluates in one tf.function call: one
`on_test_batch_begin/end` pair, where `fit` makes one per
`steps_per_execution` batches.

The callbacks see the run's model, its `optimizer` the run's: ReduceLROnPlateau
and LearningRateScheduler set its learning rate, a variable in every
checkpoint, so the rate they set survives a resume. `model.stop_training =
True` (EarlyStopping sets it) ends the run at the end of the current
window, in both loops, with a checkpoint and the final model (`fit` alone
would cut the epoch short; a whole window keeps checkpoints where
--loop=fit resumes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import keras
import numpy as np

from mto_tf.core import metrics as metrics_lib
from mto_tf.run import driver
from mto_tf.run.setup import Run

_VAL_PREFIX = "val_"


class KerasCallbacks:
    """The run's callbacks in one `keras.callbacks.CallbackList`, called by the custom loop as `fit` calls them."""

    def __init__(self, run: Run):
        model = run.setup.model
        if run.callbacks and getattr(model, "optimizer", None) is None:
            # Not compiled (the custom loop): the callbacks reach the loop's
            # optimizer as fit's reach its. Only when there are callbacks:
            # a model with an optimizer saves it in every .weights.h5.
            model.optimizer = run.optimizer
        model.stop_training = False
        self._model = model
        self._calls_callbacks = bool(run.callbacks)  # Else the logs are not worth reading.
        self._training_metrics = run.metrics.training
        self._run = run
        self._steps_per_epoch = run.epoch_steps
        self._list = keras.callbacks.CallbackList(
            list(run.callbacks), model=model, verbose=0, steps=self._steps_per_epoch,
            epochs=math.ceil(run.total_steps / self._steps_per_epoch))
        self._epoch = None
        self._last_epoch_logs = None

    @property
    def stop_requested(self) -> bool:
        """A callback set `model.stop_training`."""
        return bool(self._model.stop_training)

    def train_begins(self) -> None:
        self._list.on_train_begin()

    def call_begins(self, step: int) -> None:
        """Before the tf.function call that trains the steps after `step`; an epoch begins on its boundary."""
        if self._epoch is None or step % self._steps_per_epoch == 0:
            self._epoch = step // self._steps_per_epoch
            self._sums = _EpochSums(self._training_metrics, self._run) if self._calls_callbacks else None
            self._list.on_epoch_begin(self._epoch)
        self._list.on_train_batch_begin(self._batch(step))

    def call_ends(self, step: int, loop_totals: Mapping[str, np.float32], num_steps: int) -> None:
        """After the call that reached `step`, with its measurements summed over its `num_steps` steps."""
        logs = None
        if self._calls_callbacks:
            self._sums.add(loop_totals, num_steps)
            logs = self._sums.logs()
        self._list.on_train_batch_end(self._batch(step - 1), logs)

    def keep_epoch_metrics(self) -> None:
        """Before the window's training metrics are read and reset: the epoch keeps what they hold."""
        if self._calls_callbacks:
            self._sums.keep_metrics()

    def evaluate(self, evaluate: Callable[[], dict]) -> dict:
        """`evaluate()` between `on_test_begin` and `on_test_end`, which get its values as `evaluate` names them."""
        self._list.on_test_begin()
        self._list.on_test_batch_begin(0)
        values = evaluate()
        logs = {name.removeprefix(_VAL_PREFIX): value for name, value in values.items()}
        self._list.on_test_batch_end(0, logs)
        self._list.on_test_end(logs)
        return values

    def on_window_end(self, boundary: driver.Boundary) -> None:
        """The window-end action: an epoch's end, with its `val_` values when it ended with an evaluation.

        A stop a callback asked for mid-window waits for the window's end;
        the window then ends the epoch too, and the run.
        """
        asked_before = boundary.window_ended and self.stop_requested  # In the window's calls.
        if (boundary.epoch_ended or asked_before) and not boundary.preempted:
            logs = self._sums.logs() if self._calls_callbacks else {}
            logs.update({name: value for name, value in boundary.record.items() if name.startswith(_VAL_PREFIX)})
            self._list.on_epoch_end(self._epoch, logs)  # EarlyStopping may set model.stop_training here.
            self._last_epoch_logs = logs
            self._epoch = None
        if boundary.window_ended and self.stop_requested and not boundary.finished:  # Asked now, too.
            boundary.stop = f"Stopping at step {boundary.step}: a callback set model.stop_training"

    def train_ends(self) -> None:
        self._list.on_train_end(self._last_epoch_logs)

    def _batch(self, step: int) -> int:
        return step - self._epoch * self._steps_per_epoch


class _EpochSums:
    """The epoch's measurements summed over its steps, and its training metrics' state over its windows.

    The metrics are reset at each window's end: the epoch adds their state
    up over its windows (a Keras metric's state is totals and counts), and
    `stateless_result` reads the epoch's result from the sum.
    """

    def __init__(self, training_metrics: Mapping[str, tuple[str, keras.metrics.Metric]], run: Run):
        self._metrics = {name: metric for name, (_, metric) in training_metrics.items()}
        self._outputs = {name: output for name, (output, _) in training_metrics.items()}
        self._run = run  # Sampled turns: the epoch's means are over each task's steps, its metrics its own.
        self._measurements = driver.StepSums(run.counted_by)
        self._kept = {name: [np.zeros(variable.shape, variable.dtype) for variable in metric.variables]
                      for name, metric in self._metrics.items()}

    def add(self, loop_totals: Mapping[str, np.float32], num_steps: int) -> None:
        self._measurements.add(loop_totals, num_steps)

    def keep_metrics(self) -> None:
        self._kept = {name: self._with_current(name) for name in self._metrics}

    def logs(self) -> dict[str, float | list]:
        logs = self._measurements.means()
        untrained = self._run.outputs_not_trained(self._measurements.totals)
        for name, metric in self._metrics.items():
            if self._outputs[name] in untrained:
                continue
            logs[name] = metrics_lib.log_value(metric.stateless_result(self._with_current(name)))
        return logs

    def _with_current(self, name: str) -> list[np.ndarray]:
        # convert_to_numpy reads a variable as a whole: summed over replicas under a strategy.
        return [kept + keras.ops.convert_to_numpy(variable) for kept, variable in
                zip(self._kept[name], self._metrics[name].variables)]
