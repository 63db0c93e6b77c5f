"""The optimizer as Keras configures it, and what the custom step adds: the all-reduce before clipping, accumulation.

`--optimizer` is any Keras optimizer name or config, `--learning_rate` a
number or a Keras schedule config; `--clipnorm`, `--global_clipnorm`,
`--clipvalue` keep Keras's meanings, and `--precision=mixed_float16` wraps
the optimizer in Keras's `LossScaleOptimizer`, as `compile` would.

One difference from `fit` under a strategy, on purpose. Keras's optimizer
clips each replica's PARTIAL gradient and sums the replicas afterwards
(keras/src/optimizers/base_optimizer.py: `_backend_apply_gradients` clips,
then keras/src/backend/tensorflow/optimizer.py: `_backend_update_step`
all-reduces), so a clipped step depends on the number of replicas. The
custom step sums first (step.py) and hands the optimizer the global
gradient, which the optimizer then clips, checks for overflow and applies
exactly as it would on one device.

Gradient accumulation is `GradientAccumulation` here rather than Keras's
`gradient_accumulation_steps`: Keras's version calls the update inside a
`tf.cond` in replica context, which MirroredStrategy cannot do
("merge_call called while defining a new graph"), and it would accumulate
partial gradients. `GradientAccumulation` sums global gradients and applies
their mean every K batches, as Keras does on one device.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import keras
import tensorflow as tf

from mto_tf import _compat
from mto_tf.config import TrainConfig
from mto_tf.errors import ConfigError, describe_error

# Settings with a flag of their own (Keras's name -> the flag): inside
# --optimizer's config they would bypass what the custom step does with them.
_OWN_FLAGS = {"clipnorm": "clipnorm", "global_clipnorm": "global_clipnorm", "clipvalue": "clipvalue",
              "gradient_accumulation_steps": "grad_accum_steps"}


def set_precision(config: TrainConfig) -> None:
    """Keras's dtype policy for every layer built from now on (so: before the model is built).

    Global in Keras, so it is set for every run, float32 included.
    """
    keras.config.set_dtype_policy(config.precision)


def make_optimizer(config: TrainConfig, *, takes_all_reduced_gradients: bool) -> keras.optimizers.Optimizer:
    """`--optimizer` with `--learning_rate` and clipping, as Keras builds it from its config.

    `takes_all_reduced_gradients`: for the custom step, which sums gradients
    over replicas before it calls the optimizer (see the module's doc). The
    optimizer then does not sum them again, and accumulation is left to
    `GradientAccumulation`. Otherwise (`--loop=fit`): Keras's own behaviour,
    with `gradient_accumulation_steps=--grad_accum_steps`.
    """
    optimizer = _keras_optimizer(config.optimizer)
    settings = optimizer.get_config()
    for key, flag in _OWN_FLAGS.items():
        if settings.get(key) is not None:
            raise ConfigError("optimizer", f"give {key} as --{flag}, not inside the optimizer's config")
    given = {key: getattr(config, key) for key in ("clipnorm", "global_clipnorm", "clipvalue")
             if getattr(config, key) is not None}
    if config.learning_rate is not None and "learning_rate" in _config_of(config.optimizer):
        raise ConfigError("learning_rate", "the --optimizer config sets learning_rate already; give it once")
    # A number or a schedule, from --learning_rate, else from the optimizer's config.
    learning_rate = learning_rate_of(config) if config.learning_rate is not None else settings["learning_rate"]
    if isinstance(learning_rate, dict):
        learning_rate = keras.optimizers.schedules.deserialize(learning_rate)
    if config.grad_accum_steps > 1 and takes_all_reduced_gradients:
        learning_rate = _counting_batches(learning_rate, config.grad_accum_steps)
    elif config.grad_accum_steps > 1:
        given["gradient_accumulation_steps"] = config.grad_accum_steps
    optimizer = type(optimizer).from_config({**settings, **given, "learning_rate": learning_rate})
    if config.precision == "mixed_float16":
        # Dynamic loss scaling, as compile() adds it under this policy: the
        # step scales the loss up (scale_loss) so that float16 gradients do
        # not underflow; apply() unscales them, and skips a step whose
        # gradients overflowed while it halves the scale.
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    if takes_all_reduced_gradients:
        # The step has summed the gradients over replicas already (see the module's doc).
        _compat.apply_gradients_without_all_reduce(getattr(optimizer, "inner_optimizer", optimizer))
    return optimizer


def learning_rate_of(config: TrainConfig) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """`--learning_rate`: a number, or the Keras schedule its config describes."""
    if not isinstance(config.learning_rate, dict):
        return float(config.learning_rate)
    try:
        schedule = keras.optimizers.schedules.deserialize(copy.deepcopy(config.learning_rate))
    except Exception as error:  # Keras raises ValueError, TypeError, ... for unknown names and bad configs.
        schedule = error
    if not isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
        # Keras hands back an unknown class_name as a plain string.
        reason = (describe_error(schedule) if isinstance(schedule, Exception)
                  else "not a keras.optimizers.schedules class")
        raise ConfigError("learning_rate", f"Keras cannot make a learning rate schedule of "
                                           f"{config.learning_rate!r} ({reason})")
    return schedule


def _config_of(identifier) -> dict:
    """The settings a Keras config (`{"class_name": ..., "config": {...}}`) gives; none for a name."""
    return (identifier.get("config") or {}) if isinstance(identifier, dict) else {}


def _keras_optimizer(identifier) -> keras.optimizers.Optimizer:
    try:
        # A copy: keras.optimizers.get rewrites a config's class_name.
        optimizer = keras.optimizers.get(copy.deepcopy(identifier))
    except Exception as error:  # ValueError for unknown names and arguments, TypeError for wrong types.
        raise ConfigError("optimizer", f"Keras cannot make an optimizer of {identifier!r} "
                                       f"({describe_error(error)})") from None
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        raise ConfigError("optimizer", "give --precision=mixed_float16 for loss scaling, not a LossScaleOptimizer")
    return optimizer


class _CountingBatches(keras.optimizers.schedules.LearningRateSchedule):
    """A schedule read at the batch count, as Keras reads it while it accumulates.

    With `gradient_accumulation_steps=K`, Keras's optimizer counts every
    batch and evaluates the schedule at update n at batch count n*K - 1.
    `GradientAccumulation` calls the optimizer once per update, so its count
    at update n is n - 1: this maps one to the other.
    """

    def __init__(self, schedule: keras.optimizers.schedules.LearningRateSchedule, steps: int):
        self.schedule = schedule
        self.steps = steps

    def __call__(self, step):
        return self.schedule(step * self.steps + self.steps - 1)

    def get_config(self):
        return {"schedule": keras.optimizers.schedules.serialize(self.schedule), "steps": self.steps}


def _counting_batches(learning_rate, steps: int):
    if isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule):
        return _CountingBatches(learning_rate, steps)
    return learning_rate  # A constant rate: the same at every count.


class GradientAccumulation(tf.Module):
    """Sums the global gradients of `steps` batches; every `steps`-th batch applies their mean, as Keras does.

    Keras (`_backend_apply_gradients`): batch k of a cycle adds its gradient
    to the sums; the last computes `(gradient + sums) / steps`, clips it,
    applies it, and zeroes the sums. The sums and the batch count are
    variables, so a checkpoint taken in the middle of a cycle resumes it.
    Build it in the strategy's scope: every replica keeps the same sums.
    """

    def __init__(self, steps: int, variables: list):
        super().__init__(name="gradient_accumulation")
        self.steps = steps
        self.batches = tf.Variable(0, dtype=tf.int64, trainable=False, name="batches")
        self.sums = [tf.Variable(tf.zeros(variable.shape, variable.dtype), trainable=False,
                                 name=f"sum_{index}") for index, variable in enumerate(variables)]

    def add_or_apply(self, strategy: tf.distribute.Strategy, gradients,
                     apply: Callable[[list], None]) -> None:
        """Called in cross-replica context with each replica's (all-reduced) `gradients`."""
        self.batches.assign_add(1)
        # The choice is made outside the replicas: MirroredStrategy cannot
        # synchronize (apply) inside a tf.cond in replica context.
        tf.cond(self.batches % self.steps == 0,
                lambda: strategy.run(self._apply_mean, args=(gradients, apply)),
                lambda: strategy.run(self._add, args=(gradients,)))

    def _add(self, gradients):
        for total, gradient in zip(self.sums, gradients):
            total.assign_add(tf.convert_to_tensor(gradient))

    def _apply_mean(self, gradients, apply):
        apply([(gradient + total) / self.steps for gradient, total in zip(gradients, self.sums)])
        for total in self.sums:
            total.assign(tf.zeros_like(total))
