"""The train step: how a multi-output model is trained, in one screen; and the evaluation step.

One total loss (the weighted sum of the per-output losses, plus
regularization), one gradient of it with respect to every trainable weight,
one optimizer update. Layered as Keras's own trainer is: one batch on one
replica -> one step across replicas -> N steps in one `tf.function` call.
How a replica turns its slice of the batch into gradients is the step's
one parameter: `fixed_weights` below, the seed's answer and `fit`'s step,
or an adaptive `--loss_weighting` method's (`mto_tf/core/weighting/`).
Evaluation computes the same losses and metrics and updates nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import keras
import tensorflow as tf

from mto_tf.core import losses, optimization
from mto_tf.core.objective import Objective, as_measurements
from mto_tf.core.replicas import summed_over_replicas


@dataclasses.dataclass(frozen=True)
class GradientFunction:
    """How each replica's slice of a batch becomes the update's gradients, and the step's measurements.

    `on_replica(batch)` returns the gradients of `variables`, summed over
    replicas (so the same on every replica), and each measurement's share
    on this replica (the step sums the shares). `after_update(batch,
    measurements)`, if any, runs once per step across replicas after the
    update, with the global measurements: state a method keeps follows them.
    """

    on_replica: Callable[[object], tuple[list, dict[str, tf.Tensor]]]
    variables: list  # What the gradients are of, in order: the model's trainable weights (and a method's own).
    after_update: Callable[[object, dict[str, tf.Tensor]], None] | None = None


def fixed_weights(*, objective: Objective, optimizer: keras.optimizers.Optimizer, global_batch_size: int | None,
                  output_metrics: Mapping[str, tuple[str, keras.metrics.Metric]]) -> GradientFunction:
    """The seed's answer, `fit`'s step: one gradient of `sum_i w_i L_i + regularization`.

    `global_batch_size` None: batches may hold fewer examples (a pass's last
    one), so each step counts them. `output_metrics` accumulate; the caller
    reads and resets them.
    """

    def gradient_on_batch(batch):
        """On one replica's slice: the gradient of the weighted total loss, summed over replicas."""
        with tf.GradientTape() as tape:
            output_losses = objective.output_losses(           # each sum(l * sw) reduced over the GLOBAL batch
                batch, examples_in_batch=global_batch_size, metrics=output_metrics)
            loss = objective.total_loss(output_losses)         # sum_i w_i * loss_i + regularization / replicas
            scaled_loss = optimizer.scale_loss(loss)           # mixed_float16 only: times the loss scale
        # One gradient of the total: the auxiliary term reaches the shared
        # trunk here, and no main-only layer (it does not depend on them).
        gradients = tape.gradient(scaled_loss, objective.model.trainable_variables)
        # Summed over every replica and worker HERE, before the optimizer
        # clips, checks for overflow or accumulates: each replica's loss was
        # its share of the global-batch loss, so the sum is the gradient one
        # device would compute (Keras's fit clips each replica's part instead).
        gradients = summed_over_replicas(gradients)          # The global-batch gradient, on every replica.
        return gradients, {**as_measurements(loss, output_losses), **objective.changing_weights()}

    return GradientFunction(on_replica=gradient_on_batch, variables=objective.model.trainable_variables)


def make_train_step(
    *,
    gradient_function: GradientFunction,
    optimizer: keras.optimizers.Optimizer,
    strategy: tf.distribute.Strategy,
    accumulation: optimization.GradientAccumulation | None = None,
    jit_compile: bool = False,
    compile_update: bool = False,
) -> Callable[[object], dict[str, tf.Tensor]]:
    """Returns `train_step(batch)`: one step on one global batch, split across replicas; its measurements.

    `gradient_function`: `fixed_weights(...)`, or an adaptive method's.
    `optimizer` is made by `optimization.make_optimizer(...,
    takes_all_reduced_gradients=True)` and built for the gradient function's
    variables. `accumulation`: --grad_accum_steps; `jit_compile`: XLA
    compiles the step; `compile_update`: XLA compiles the update alone.
    """

    def apply(gradients):
        """The optimizer's update, identical on every replica: unscale, clip, update, as on one device."""
        # A weight this step's loss does not reach (another task's head in a sampled turn) has no gradient
        # and is not updated: Keras would skip it too, with a warning.
        optimizer.apply_gradients((gradient, variable) for gradient, variable in
                                  zip(gradients, gradient_function.variables) if gradient is not None)

    # The update of every weight and slot is many element-wise ops: XLA
    # fuses them into one pass over memory (the same mathematics, rounded
    # in another order). Keras's own ops, sparse gradients included: making
    # an embedding's gradient dense would change what Adam or RMSprop compute.
    apply = tf.function(apply, jit_compile=True) if compile_update else apply

    def one_step_on_data(batch):
        """One global batch: each replica takes its slice; one update; the shares of each measurement summed."""
        gradients, per_replica = strategy.run(gradient_function.on_replica, args=(batch,))
        if accumulation:  # Every K-th batch applies the mean of K batches' gradients.
            accumulation.add_or_apply(strategy, gradients, apply)
        else:
            strategy.run(apply, args=(gradients,))
        # Each replica's value is its share of the global-batch value, so the
        # SUM over replicas is the value `fit` reports for the whole batch.
        measurements = {name: strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)
                        for name, value in per_replica.items()}
        if gradient_function.after_update:
            gradient_function.after_update(batch, measurements)
        return measurements

    # XLA compiles one step (as `compile(jit_compile=True)` does in Keras);
    # reading the iterator stays outside, where XLA cannot go.
    return tf.function(one_step_on_data, jit_compile=jit_compile)


def make_evaluate(
    *,
    objective: Objective,
    output_metrics: Mapping[str, tuple[str, keras.metrics.Metric]],
    strategy: tf.distribute.Strategy,
) -> Callable[[object, tf.Tensor], dict[str, tf.Tensor]]:
    """Returns `evaluate(iterator, num_steps)`: the losses over `num_steps` global batches.

    Each term is reduced over every evaluated example as its loss reduces a
    batch: its weighted sums and divisors are summed over every replica and
    batch (the last batch may be partial, split unevenly across replicas or
    workers), then divided, once. So `sum_over_batch_size` is the exact mean
    of sample weight times loss over the examples, as `fit`'s `val_loss` is;
    `loss` weighs them and adds the regularization. Metrics accumulate in
    `output_metrics`. Nothing is trained.
    """

    def sums_on_batch(batch):
        """This replica's weighted sum and divisor of each term."""
        # training=False: Dropout off, BatchNorm by its moving statistics, nothing updated.
        sums = objective.replica_sums(batch, training=False, metrics=output_metrics)
        return {name: tf.stack([part.weighted_sum, part.divisor]) for name, part in sums.items()}

    @tf.function
    def evaluate(iterator, num_steps):
        """Sums over replicas and batches, divided at the end."""
        totals = {name: tf.zeros([2]) for name in objective.terms}
        for _ in tf.range(num_steps):
            sums = strategy.run(sums_on_batch, args=(next(iterator),))
            totals = {name: totals[name] + strategy.reduce(tf.distribute.ReduceOp.SUM, part, axis=None)
                      for name, part in sums.items()}
        output_losses = {}
        for name, total in totals.items():
            weighted_sum, divisor = tf.unstack(total)
            output_losses[name] = losses.reduced(weighted_sum, divisor, objective.terms[name].reduction)
        return as_measurements(objective.total_loss(output_losses, replicas_share=False), output_losses)

    return evaluate


def make_train_loop(train_step: Callable[[object], dict[str, tf.Tensor]], measurement_names: list[str], *,
                    reads_iterator: bool = False) -> Callable[[object, tf.Tensor], dict[str, tf.Tensor]]:
    """Returns `train_loop(iterator, num_steps)`: `num_steps` steps, and the SUM of each measurement.

    `reads_iterator`: the step takes the iterator (a sampled turn's: `{task: iterator}`), not its next batch.
    """

    @tf.function
    def train_loop(iterator, num_steps):
        """`num_steps` steps in one call: Python and dispatch overhead paid once."""
        totals = {name: tf.constant(0.0) for name in measurement_names}
        for _ in tf.range(num_steps):
            measurements = train_step(iterator if reads_iterator else next(iterator))
            totals = {name: totals[name] + measurements[name] for name in totals}
        return totals

    return train_loop
