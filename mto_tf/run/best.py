"""Keep the best, stop early: `--save_best` and `--early_stopping_patience`.

Improvement is decided as Keras's `ModelCheckpoint` and `EarlyStopping`
decide it (keras/src/callbacks/monitor_callback.py, `_set_monitor_op`):
lower is better for a loss, and for a metric the direction the metric
declares (`_direction`: accuracy up, mean absolute error down); only a
strictly better value counts. The state lives in tf.Variables that every
checkpoint holds, so a resumed run (on every worker) knows the best value,
its step, and how many evaluations have passed without improvement.
"""

from __future__ import annotations

import math
import os

import keras
import tensorflow as tf

from mto_tf import _compat
from mto_tf.errors import ConfigError

BEST_WEIGHTS_FILE = "best.weights.h5"


def higher_is_better(val_name: str, *, val_loss_names: list[str], val_metrics: dict[str, keras.metrics.Metric]) -> bool:
    """Whether `val_name` improves upwards; a ConfigError naming --save_best if it is not a validation value."""
    if val_name in val_loss_names:
        return False
    metric = val_metrics.get(val_name)
    if metric is None:
        raise ConfigError("save_best", f"{val_name!r} is not a value the evaluation reports; it reports "
                                       f"{[*val_loss_names, *val_metrics]}")
    direction = _compat.metric_direction(metric)
    if direction not in ("up", "down"):
        raise ConfigError("save_best", f"Keras cannot tell whether {val_name!r} should go up or down "
                                       f"(metric {type(metric).__name__} declares no direction)")
    return direction == "up"


class BestValue(tf.Module):
    """The best value of one validation measurement so far, checkpointed with the model."""

    def __init__(self, val_name: str, *, higher_is_better: bool, patience: int | None, model_dir: str,
                 is_chief: bool):
        super().__init__(name="best_value")
        self.val_name = val_name
        self._higher_is_better = higher_is_better
        self._patience = patience
        self._path = os.path.join(model_dir, BEST_WEIGHTS_FILE)
        self._is_chief = is_chief
        self.value = tf.Variable(math.nan, dtype=tf.float64, trainable=False)  # NaN: no evaluation yet.
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.evaluations_without_improvement = tf.Variable(0, dtype=tf.int64, trainable=False)

    def update(self, step: int, measurements: dict[str, float], model: keras.Model) -> dict[str, float]:
        """After an evaluation at `step`: saves the weights if they are the best so far; returns what to log."""
        value, best = measurements[self.val_name], float(self.value.numpy())
        improved = math.isnan(best) or (value > best if self._higher_is_better else value < best)
        if improved:
            self.value.assign(value)
            self.step.assign(step)
            self.evaluations_without_improvement.assign(0)
            if self._is_chief:
                model.save_weights(self._path)
        else:
            self.evaluations_without_improvement.assign_add(1)
        return {"best_step": int(self.step.numpy())}

    @property
    def patience_exhausted(self) -> bool:
        """True once `--early_stopping_patience` evaluations in a row have not improved."""
        return self._patience is not None and int(self.evaluations_without_improvement.numpy()) >= self._patience

    def describe_stop(self) -> str:
        return (f"{self.val_name} has not improved for {int(self.evaluations_without_improvement.numpy())} "
                f"evaluations; best {float(self.value.numpy()):.6g} at step {int(self.step.numpy())}, "
                f"in {BEST_WEIGHTS_FILE}")
