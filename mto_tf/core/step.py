"""The train step: how a multi-output model is trained, in one screen; and the evaluation step.

One total loss (the weighted sum of the per-output losses, plus
regularization), one gradient of it with respect to every trainable weight,
one optimizer update. Layered as Keras's own trainer is: one batch on one
replica -> one step across replicas -> N steps in one `tf.function` call.
Evaluation computes the same losses and metrics and updates nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import keras
import tensorflow as tf

from mto_tf.core import losses, optimization, weighting
from mto_tf.core.signature import ModelSignature


def make_train_step(
    *,
    model: keras.Model,
    signature: ModelSignature,
    optimizer: keras.optimizers.Optimizer,
    loss_fns: Mapping[str, keras.losses.Loss],
    loss_weights: Mapping[str, float],
    output_metrics: Mapping[str, tuple[str, keras.metrics.Metric]],
    global_batch_size: int | None,
    strategy: tf.distribute.Strategy,
    accumulation: optimization.GradientAccumulation | None = None,
    jit_compile: bool = False,
    compile_update: bool = False,
    method: weighting.Method | None = None,
    representation: weighting.Representation | None = None,
) -> Callable[[object], dict[str, tf.Tensor]]:
    """Returns `train_step(batch)`: one step on one global batch, split across replicas.

    It returns the step's measurements: `loss` (the weighted total, as `fit`
    reports it) and `<output>_loss` (unweighted); with an adaptive `method`
    (`--loss_weighting`), also `loss_weight/<output>`, the factor its
    weighted loss had. Metrics accumulate in `output_metrics`; the caller
    reads and resets them. `loss_fns` return per-example losses (Keras
    losses with reduction "none"). `global_batch_size` None: batches may
    hold fewer examples (a pass's last one), so each step counts them.
    `optimizer` is made by `optimization.make_optimizer(...,
    takes_all_reduced_gradients=True)`; with a `method`, it was built for
    `model.trainable_variables + method.trainable` too. `representation`:
    a gradient method's Gramian is of that layer's output (MGDA-UB).
    """

    def losses_on_batch(batch, training=True, forward=None):
        """Forward (by `model`, or `forward`), and each output's share of its global-batch loss: on one replica's slice."""
        inputs, labels, sample_weights = keras.utils.unpack_x_y_sample_weight(batch)
        # A pass's last batch may be partial and split unevenly across
        # replicas: dividing by the examples the WHOLE global batch holds
        # keeps the exact single-device mean (Keras's fit divides each
        # replica's local mean by the number of replicas instead).
        examples_in_batch = global_batch_size or examples_across_replicas(labels)
        # Training: Dropout drops, BatchNorm normalizes by the batch and updates
        # its moving statistics. training=False (FAMO's second look at the
        # batch) changes nothing and counts in no metric.
        predictions = signature.as_output_dict((forward or model)(inputs, training=training))
        for output_name, metric in output_metrics.values() if training else ():
            metric.update_state(labels[output_name], predictions[output_name])
        return losses.per_output_losses(loss_fns=loss_fns, labels=labels, predictions=predictions,
                                        sample_weights=sample_weights, global_batch_size=examples_in_batch)

    def gradient_on_batch(batch):
        """Weighted loss, one gradient, summed over replicas: on one replica's slice."""
        with tf.GradientTape() as tape:
            output_losses = losses_on_batch(batch)
            # model.losses recomputes the regularizers from the current
            # weights, so it must be read inside the tape.
            loss = losses.weighted_total_loss(
                output_losses=output_losses, loss_weights=loss_weights,
                regularization_losses=model.losses)
            # mixed_float16: times the loss scale, so float16 gradients do not underflow; 1 otherwise.
            scaled_loss = optimizer.scale_loss(loss)
        # One gradient of the total: the auxiliary term reaches the shared
        # trunk here, and no main-only layer (it does not depend on them).
        gradients = tape.gradient(scaled_loss, model.trainable_variables)
        # Summed over every replica and worker HERE, before the optimizer
        # clips, checks for overflow or accumulates: each replica's loss was
        # its share of the global-batch loss, so the sum is the gradient one
        # device would compute (Keras's fit clips each replica's part instead).
        if strategy.num_replicas_in_sync > 1:
            gradients = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, gradients)
        return gradients, {"loss": loss, **{f"{name}_loss": value for name, value in output_losses.items()}}

    # --loss_weighting other than fixed: the same forward, each loss times a
    # factor the method sets, or one gradient per output combined by it.
    adaptive = method is not None and method.weighting.name != "fixed"
    on_batch, after_step = weighting.make_step_parts(
        method, losses_on_batch, model=model, loss_weights=loss_weights, optimizer=optimizer, strategy=strategy,
        representation=representation) if adaptive else (gradient_on_batch, None)
    variables = model.trainable_variables + (method.trainable if adaptive else [])

    def apply(gradients):
        """The optimizer's update, identical on every replica: unscale, clip, update, as on one device."""
        optimizer.apply_gradients(zip(gradients, variables))

    # The update of every weight and slot is many element-wise ops: XLA
    # fuses them into one pass over memory (the same mathematics, rounded
    # in another order). Keras's own ops, sparse gradients included: making
    # an embedding's gradient dense would change what Adam or RMSprop compute.
    apply = tf.function(apply, jit_compile=True) if compile_update else apply

    def one_step_on_data(batch):
        """One global batch: each replica takes its slice; one update; the shares of each measurement summed."""
        gradients, per_replica = strategy.run(on_batch, args=(batch,))
        if accumulation:  # Every K-th batch applies the mean of K batches' gradients.
            accumulation.add_or_apply(strategy, gradients, apply)
        else:
            strategy.run(apply, args=(gradients,))
        # Each replica's value is its share of the global-batch value, so the
        # SUM over replicas is the value `fit` reports for the whole batch.
        measurements = {name: strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)
                        for name, value in per_replica.items()}
        if adaptive:  # The method's state follows the global losses (FAMO's, after the update too).
            after_step(batch, measurements)
        return measurements

    # XLA compiles one step (as `compile(jit_compile=True)` does in Keras);
    # reading the iterator stays outside, where XLA cannot go.
    return tf.function(one_step_on_data, jit_compile=jit_compile)


def examples_across_replicas(labels) -> tf.Tensor:
    """The number of examples in the global batch: this replica's, summed over every replica."""
    examples_here = tf.shape(tf.nest.flatten(labels)[0], out_type=tf.int64)[0]
    return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, examples_here)


def make_evaluate(
    *,
    model: keras.Model,
    signature: ModelSignature,
    loss_fns: Mapping[str, keras.losses.Loss],
    loss_weights: Mapping[str, float],
    output_metrics: Mapping[str, tuple[str, keras.metrics.Metric]],
    strategy: tf.distribute.Strategy,
) -> Callable[[object, tf.Tensor, tf.Tensor], dict[str, tf.Tensor]]:
    """Returns `evaluate(iterator, num_steps, num_examples)`: the losses over `num_steps` global batches.

    The batches hold `num_examples` examples in all (the last batch may be
    partial, split unevenly across replicas or workers). Each output's loss
    is the exact mean over those examples of sample weight times loss, as
    `fit`'s `val_loss` is; `loss` weighs them and adds the regularization.
    Metrics accumulate in `output_metrics`. Nothing is trained.
    """

    def one_step_on_batch(batch, num_examples):
        """This replica's share of each output's mean over all evaluated examples."""
        inputs, labels, sample_weights = keras.utils.unpack_x_y_sample_weight(batch)
        # training=False: Dropout off, BatchNorm by its moving statistics, nothing updated.
        predictions = signature.as_output_dict(model(inputs, training=False))
        for output_name, metric in output_metrics.values():
            metric.update_state(labels[output_name], predictions[output_name])
        return losses.per_output_losses(loss_fns=loss_fns, labels=labels, predictions=predictions,
                                        sample_weights=sample_weights, global_batch_size=num_examples)

    @tf.function
    def evaluate(iterator, num_steps, num_examples):
        """Shares summed over replicas and batches: the means over all `num_examples`."""
        output_losses = {name: tf.constant(0.0) for name in loss_fns}
        for _ in tf.range(num_steps):
            shares = strategy.run(one_step_on_batch, args=(next(iterator), num_examples))
            output_losses = {name: output_losses[name] + strategy.reduce(tf.distribute.ReduceOp.SUM, share, axis=None)
                             for name, share in shares.items()}
        loss = losses.weighted_total_loss(output_losses=output_losses, loss_weights=loss_weights,
                                          regularization_losses=model.losses, replicas_share=False)
        return {"loss": loss, **{f"{name}_loss": value for name, value in output_losses.items()}}

    return evaluate


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
