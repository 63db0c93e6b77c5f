"""Adaptive loss weighting: the methods of `--loss_weighting`, exact under every tf.distribute strategy.

One design for every gradient method: `combined_gradients` takes each
output's gradient (one backward pass per output), sums each over replicas
and workers FIRST (so the Gramian is that of the global gradients, as on
one device), forms `G = J J^T` over the shared weights, asks the method for
`a = f(G, state)`, and updates the shared weights by `sum_k a_k g_k`; a
weight only one output reaches gets that output's gradient. Loss-based
methods only set a factor per loss (`methods.Method.loss_factors`), from
the global losses. The names and hyper-parameters are in
`mto_tf/loss_weighting.py`.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from mto_tf.core.weighting import gramian
from mto_tf.core.weighting.methods import Method, make_method
from mto_tf.core.weighting.representation import Representation, gradients_through_representation, make_representation
from mto_tf.errors import ConfigError

__all__ = ["Method", "Representation", "make_method", "make_representation", "make_step_parts", "combined_gradients",
           "global_values"]


def make_step_parts(method: Method, losses_on_batch, *, model: keras.Model, loss_weights: dict[str, float],
                    optimizer: keras.optimizers.Optimizer, strategy: tf.distribute.Strategy,
                    representation: Representation | None = None):
    """The train step's two parts for an adaptive method: `gradient_on_batch(batch)`, `after_step(batch, measurements)`.

    `losses_on_batch(batch, training, forward)` is the step's forward: each
    output's share of its loss (`forward(inputs, training)` the model's
    predictions). Loss-based methods multiply each weighted loss
    `w_k L_k` by a factor set from the global losses, and then it is one
    gradient, as with `fixed`. Gradient methods take one gradient per
    output, summed over replicas before their Gramian is formed
    (`combined_gradients`).
    """
    names = list(loss_weights)
    variables = model.trainable_variables + method.trainable

    def gradient_on_batch(batch):
        """On one replica's slice: the update's gradients (summed over replicas) and the step's measurements."""
        seen = {}

        def forward_seeing_the_representation(inputs, training):
            seen["z"], predictions = representation.probe(inputs, training=training)
            return predictions

        with tf.GradientTape(persistent=method.uses_gradients) as tape:
            output_losses = losses_on_batch(batch, forward=forward_seeing_the_representation if representation
                                            else None)
            weighted_losses = [loss_weights[name] * output_losses[name] for name in names]
            weighted = tf.stack(weighted_losses)
            # mixed_float16: each loss times the loss scale, inside the tape (1 otherwise).
            scaled_losses = [optimizer.scale_loss(loss) for loss in weighted_losses] if method.uses_gradients else []
            factors, extra_losses = method.loss_factors(global_values(weighted))
            # Regularization and uncertainty's log-variance term: every replica computes them whole; each adds its share.
            regularization = ([tf.nn.scale_regularization_loss(tf.add_n([*model.losses, *extra_losses]))]
                              if model.losses or extra_losses else [])
            scaled_loss = optimizer.scale_loss(tf.add_n([tf.reduce_sum(factors * weighted), *regularization]))
            scaled_regularization = optimizer.scale_loss(regularization[0]) if regularization else None
        if method.uses_gradients:
            gradients, weights = combined_gradients(
                tape=tape, method=method, weighted_losses=weighted_losses, scaled_losses=scaled_losses,
                scaled_regularization=scaled_regularization, variables=model.trainable_variables,
                optimizer=optimizer, representation=representation, z=seen.get("z"))
            factors = tf.cast(weights, weighted.dtype)
        else:
            gradients = tape.gradient(scaled_loss, variables)
            if strategy.num_replicas_in_sync > 1:
                gradients = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, gradients)
        # Factors are the same on every replica: each reports its share, so that the sum is the factor.
        share = 1.0 / strategy.num_replicas_in_sync
        return gradients, {"loss": tf.add_n([tf.reduce_sum(tf.stop_gradient(factors) * weighted), *regularization]),
                           **{f"{name}_loss": output_losses[name] for name in names},
                           **{f"loss_weight/{name}": factors[k] * share for k, name in enumerate(names)}}

    def weighted(measurements) -> tf.Tensor:
        return tf.stack([loss_weights[name] * measurements[f"{name}_loss"] for name in names])

    def losses_after_update(batch) -> tf.Tensor:
        """`w_k L_k` on the same batch at the updated weights, in inference mode (nothing updated): FAMO's."""
        shares = strategy.run(lambda batch: losses_on_batch(batch, training=False), args=(batch,))
        return weighted({f"{name}_loss": strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)
                         for name, value in shares.items()})

    def after_step(batch, measurements):
        """Across replicas, after the update: the method's state follows the global weighted losses."""
        method.after_step(weighted(measurements), losses_after_update=lambda: losses_after_update(batch))

    return gradient_on_batch, after_step


def global_values(shares: tf.Tensor) -> tf.Tensor:
    """This replica's shares summed over every replica and worker (held constant: no gradient flows through)."""
    shares = tf.stop_gradient(shares)
    context = tf.distribute.get_replica_context()
    return context.all_reduce(tf.distribute.ReduceOp.SUM, shares) if context.num_replicas_in_sync > 1 else shares


def combined_gradients(
    *,
    tape: tf.GradientTape,
    method: Method,
    weighted_losses: list[tf.Tensor],
    scaled_losses: list[tf.Tensor],
    scaled_regularization: tf.Tensor | None,
    variables: list[tf.Variable],
    optimizer: keras.optimizers.Optimizer,
    representation: Representation | None = None,
    z: tf.Tensor | None = None,
) -> tuple[list, tf.Tensor]:
    """The update's gradients (summed over replicas, as the optimizer takes them), and the weights `a`.

    The gradients are those of `variables` (the model's), then of the
    method's own `method.trainable`. `weighted_losses`: this replica's share
    of each `w_k L_k`; `scaled_losses`: the same times the loss scale
    (mixed_float16), read inside the persistent `tape`;
    `scaled_regularization`: its share of the regularization, likewise (its
    gradient is added whole, as with `fixed`). With a `representation`, `z`
    is its layer's output in the forward.
    """
    # mixed_float16: every gradient is of a scaled loss; the Gramian is unscaled before the method reads it.
    loss_scale = tf.cast(optimizer.scale_loss(tf.constant(1.0)), tf.float64)
    global_losses = global_values(tf.stack(weighted_losses))
    if representation is not None:
        gram, update = gradients_through_representation(tape=tape, representation=representation, z=z,
                                                        scaled_losses=scaled_losses, variables=variables)
        weights, own_gradients = _weights_of(method, gram / loss_scale ** 2, global_losses)
        gradients = update(weights)
    else:
        outputs = gramian.all_reduced(gramian.output_gradients(tape, scaled_losses, variables))
        if not outputs.shared:
            raise ConfigError("loss_weighting", f"{method.weighting.name} weighs the gradients of weights several "
                                                f"outputs share; this model's outputs share none")
        blocks = gramian.shared_blocks(outputs, variables)
        weights, own_gradients = _weights_of(method, gramian.gramian(blocks) / loss_scale ** 2, global_losses)
        gradients = [None] * len(variables)
        for v, gradient in zip(outputs.shared, gramian.combined(blocks, weights)):
            gradients[v] = gradient
        for v, output in outputs.own.items():
            gradients[v] = outputs.per_output[output][v]
    if scaled_regularization is not None:
        regularization_gradients = gramian.all_reduced(gramian.OutputGradients(
            shared=[], own={}, per_output=[tape.gradient(scaled_regularization, variables)]))
        gradients = [_add(g, r) for g, r in zip(gradients, regularization_gradients.per_output[0])]
    # The method's own variables (GradNorm's logits): scaled as the optimizer expects, identical on every replica.
    scale = tf.cast(loss_scale, tf.float32)
    return gradients + [g * scale for g in own_gradients], weights


def _weights_of(method: Method, gram: tf.Tensor, global_losses: tf.Tensor) -> tuple[tf.Tensor, list]:
    """The method's weights; ones when the gradients overflowed (mixed_float16 then skips the update, as with fixed)."""
    finite = tf.reduce_all(tf.math.is_finite(gram))
    weights, own_gradients = method.gradient_weights(tf.where(finite, gram, tf.eye(gram.shape[0], dtype=gram.dtype)),
                                                     global_losses)
    return tf.where(finite, weights, tf.ones_like(weights)), own_gradients


def _add(gradient, more):
    if more is None:
        return gradient
    if gradient is None:
        return more
    if isinstance(gradient, tf.IndexedSlices) or isinstance(more, tf.IndexedSlices):
        return tf.convert_to_tensor(gradient) + tf.convert_to_tensor(more)
    return gradient + more
