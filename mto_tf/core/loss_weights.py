"""Each term's weight `w_i` in the total loss: a number, a Keras schedule of the step, or a variable a callback sets.

Keras 3's `compile(loss_weights=...)` takes floats only
(keras-team/keras#20294); warming an auxiliary loss up or annealing it
away needs weights that change. Here a weight is:

- a number: constant, unless a callback assigns its variable
  (`mto_tf.LossWeightScheduler`, or any callback, through `variables_of`);
- a Keras schedule (`keras.optimizers.schedules.LearningRateSchedule`, e.g.
  `PiecewiseConstantDecay`): evaluated at each optimizer step exactly as
  Keras evaluates a learning-rate schedule, at `optimizer.iterations` (0 at
  the first step), so a resumed run continues it where it stopped.

The variables are checkpointed with the run; the step reads `in_force()`.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping

import keras
import tensorflow as tf

Schedule = keras.optimizers.schedules.LearningRateSchedule

# model -> its run's LossWeights: how a callback, which holds the model, finds the weights it may set.
_OF_MODEL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class LossWeights(tf.Module):
    """The weights of the total loss's terms, in the terms' order."""

    def __init__(self, weights: Mapping[str, float | Schedule], *, step: tf.Variable | None = None,
                 assignable: bool = False, set_by_callback: bool = False):
        """Call inside the strategy's scope (the variables are mirrored).

        Args:
          weights: each term's number or schedule.
          step: the optimizer's `iterations`, which the schedules read; None: they are read at step 0
            (`mto-evaluate`, `mto-explain`: no training step).
          assignable: numbers become variables a callback may assign (and the checkpoint keeps).
          set_by_callback: a callback says it sets them (`sets_loss_weights`): the step logs them.
        """
        super().__init__(name="loss_weights")
        self.names = list(weights)
        self.schedules = {name: weight for name, weight in weights.items() if isinstance(weight, Schedule)}
        numbers = {name: float(weight) for name, weight in weights.items() if name not in self.schedules}
        self.assignable = assignable
        self.set_by_callback = set_by_callback and assignable
        self.weights = ({name: tf.Variable(value, trainable=False, name=f"loss_weight_{index}")
                         for index, (name, value) in enumerate(numbers.items())} if assignable else numbers)

        def current_step():
            return 0 if step is None else step

        # Read through a function: the step is the optimizer's variable, checkpointed with it, not here again.
        self._current_step = current_step

    @property
    def may_change(self) -> bool:
        """Whether a weight changes during training (a schedule, a callback that says it sets them): then the
        step logs them, as `loss_weight/<term>`."""
        return bool(self.schedules) or self.set_by_callback

    def in_force(self) -> dict[str, tf.Tensor]:
        """Each term's weight now: a schedule's value at the current optimizer step, else the number."""
        step = self._current_step()
        return {name: tf.cast(self.schedules[name](step), tf.float32) if name in self.schedules
                else tf.convert_to_tensor(self.weights[name], tf.float32) for name in self.names}

    def numbers(self) -> dict[str, float]:
        """The weights in force, as numbers (eagerly): what `compile` takes and a report shows.

        A constant weight is the number as given (0.2, not its float32 0.20000000298)."""
        return {name: self.weights[name] if isinstance(self.weights.get(name), float) else float(value)
                for name, value in self.in_force().items()}

    def attach_to(self, model: keras.Model) -> None:
        """Lets any callback of `model` find these weights (`variables_of(model)`)."""
        _OF_MODEL[model] = self


def variables_of(model: keras.Model) -> dict[str, tf.Variable]:
    """The loss-weight variables of the run training `model`, by term: what a callback may assign.

    A term whose weight is a schedule has no variable (its schedule sets it).
    Raises ValueError when no run with assignable weights trains `model`.
    """
    loss_weights = _OF_MODEL.get(model)
    if loss_weights is None or not loss_weights.assignable:
        raise ValueError("no mto_tf run trains this model with loss weights a callback may set: pass the callback "
                         "to mto_tf.train (or --callbacks) with --loop=custom")
    return dict(loss_weights.weights)

