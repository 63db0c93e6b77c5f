"""The train step: how a multi-output model is trained, in one screen.

One total loss (the weighted sum of the per-output losses, plus
regularization), one gradient of it with respect to every trainable weight,
one optimizer update. Layered as Keras's own trainer is: one batch on one
replica -> one step across replicas -> N steps in one `tf.function` call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import keras
import tensorflow as tf

from mto_tf import losses, models


def make_train_step(
    *,
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    loss_fns: Mapping[str, keras.losses.Loss],
    loss_weights: Mapping[str, float],
    output_metrics: Mapping[str, tuple[str, keras.metrics.Metric]],
    global_batch_size: int,
    strategy: tf.distribute.Strategy,
    jit_compile: bool = False,
) -> Callable[[object], dict[str, tf.Tensor]]:
    """Returns `train_step(batch)`: one step on one global batch, split across replicas.

    It returns the step's measurements: `loss` (the weighted total, as `fit`
    reports it) and `<output>_loss` (unweighted). Metrics accumulate in
    `output_metrics`; the caller reads and resets them. `loss_fns` return
    per-example losses (Keras losses with reduction "none").
    """

    def one_step_on_batch(batch):
        """Forward, weighted loss, one gradient, one update: on one replica's slice."""
        inputs, labels, sample_weights = keras.utils.unpack_x_y_sample_weight(batch)
        with tf.GradientTape() as tape:
            # training=True: Dropout drops, BatchNorm normalizes by the batch and updates its moving statistics.
            predictions = models.as_output_dict(model, model(inputs, training=True))
            output_losses = losses.per_output_losses(
                loss_fns=loss_fns, labels=labels, predictions=predictions,
                sample_weights=sample_weights, global_batch_size=global_batch_size)
            # model.losses recomputes the regularizers from the current
            # weights, so it must be read inside the tape.
            loss = losses.weighted_total_loss(
                output_losses=output_losses, loss_weights=loss_weights,
                regularization_losses=model.losses)
        # One gradient of the total: the auxiliary term reaches the shared
        # trunk here, and no main-only layer (it does not depend on them).
        gradients = tape.gradient(loss, model.trainable_variables)
        # The optimizer all-reduces gradients with SUM across replicas; the
        # loss was scaled so that this sum is the global-batch gradient.
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        for output_name, metric in output_metrics.values():
            metric.update_state(labels[output_name], predictions[output_name])
        return {"loss": loss, **{f"{name}_loss": value for name, value in output_losses.items()}}

    def one_step_on_data(batch):
        """One global batch: each replica takes its slice; shares are summed."""
        per_replica = strategy.run(one_step_on_batch, args=(batch,))
        # Each replica's value is its share of the global-batch value, so the
        # SUM over replicas is the value `fit` reports for the whole batch.
        return {name: strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)
                for name, value in per_replica.items()}

    # XLA compiles one step (as `compile(jit_compile=True)` does in Keras);
    # reading the iterator stays outside, where XLA cannot go.
    return tf.function(one_step_on_data, jit_compile=jit_compile)


def make_train_loop(train_step: Callable[[object], dict[str, tf.Tensor]],
                    measurement_names: list[str]) -> Callable[[object, tf.Tensor], dict[str, tf.Tensor]]:
    """Returns `train_loop(iterator, num_steps)`: `num_steps` steps, and the SUM of each measurement."""

    @tf.function
    def train_loop(iterator, num_steps):
        """`num_steps` steps in one call: Python and dispatch overhead paid once."""
        totals = {name: tf.constant(0.0) for name in measurement_names}
        for _ in tf.range(num_steps):
            measurements = train_step(next(iterator))
            totals = {name: totals[name] + measurements[name] for name in totals}
        return totals

    return train_loop
