"""`mto_tf.LossWeightScheduler`: loss weights set by a Keras callback, per epoch, as `LearningRateScheduler` sets the rate.

    def schedule(epoch, weights):          # weights: {term: its weight now}
        return {"aux_output": 0.3 * 0.5 ** epoch}   # the terms to change

    mto_tf.train(config, callbacks=[mto_tf.LossWeightScheduler(schedule)])

An epoch is a pass with `--epochs`, else a `--log_every` window (as for
every callback of the custom loop). Any other callback may set the weights
too, through `mto_tf.loss_weight_variables(self.model)` (a class attribute
`sets_loss_weights = True` has them logged as `loss_weight/<term>`). They are
variables in the run's checkpoints, so a resumed run goes on with them.
"""

from __future__ import annotations

import math

import keras

from mto_tf.core.loss_weights import variables_of


class LossWeightScheduler(keras.callbacks.Callback):
    """At the beginning of every epoch, `schedule(epoch, weights)` returns the weights of the terms to change."""

    sets_loss_weights = True  # The run logs the weights in force, as loss_weight/<term>. Any callback may say so.

    def __init__(self, schedule, verbose: int = 0):
        """`schedule(epoch, weights) -> {term: weight}`: `epoch` counts from 0; `weights` maps every term
        (an output, or an `--extra_losses` term) not given a schedule in `--loss_weights` to its weight now."""
        super().__init__()
        self.schedule = schedule
        self.verbose = verbose

    def on_epoch_begin(self, epoch, logs=None):
        variables = variables_of(self.model)
        changes = self.schedule(epoch, {name: float(variable.numpy()) for name, variable in variables.items()})
        if not isinstance(changes, dict):
            raise ValueError(f"LossWeightScheduler: the schedule must return a dict {{term: weight}}, got {changes!r}")
        for name, weight in changes.items():
            if name not in variables:
                raise ValueError(f"LossWeightScheduler: {name!r} is not a term whose weight a callback sets; "
                                 f"those are {sorted(variables)} (a weight given as a schedule follows it)")
            if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
                raise ValueError(f"LossWeightScheduler: the weight of {name!r} must be a finite number >= 0, "
                                 f"got {weight!r}")
            variables[name].assign(float(weight))
        if self.verbose and changes:
            print(f"\nEpoch {epoch + 1}: LossWeightScheduler setting "
                  + ", ".join(f"{name} to {weight:g}" for name, weight in changes.items()) + ".")
