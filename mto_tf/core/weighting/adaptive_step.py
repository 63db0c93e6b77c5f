"""The train step's gradient function for an adaptive `--loss_weighting` method, exact under every strategy.

It plugs into `core/step.py` where `fixed_weights` would. Loss-based
methods multiply each weighted loss `w_k L_k` by a factor set from the
global losses, and then it is one gradient, as with `fixed`. Gradient
methods take one gradient per output (one backward pass each), sum each
over replicas and workers FIRST (so the Gramian is that of the global
gradients, as on one device), form `G = J J^T` over the shared weights,
normalize it (`method_weights`), ask the method for `a`, and update the
shared weights by `sum_k a_k g_k`; a weight only one output reaches gets
that output's gradient.
"""

from __future__ import annotations

from collections.abc import Mapping

import keras
import tensorflow as tf

from mto_tf.core.objective import Objective, as_measurements
from mto_tf.core.replicas import summed_over_replicas
from mto_tf.core.step import GradientFunction
from mto_tf.core.weighting import gramian
from mto_tf.core.weighting.methods import Method
from mto_tf.core.weighting.representation import Representation, gradients_through_representation
from mto_tf.errors import ConfigError


def adaptive_weights(method: Method, *, objective: Objective, optimizer: keras.optimizers.Optimizer,
                     global_batch_size: int | None, output_metrics: Mapping[str, tuple[str, keras.metrics.Metric]],
                     strategy: tf.distribute.Strategy, representation: Representation | None = None
                     ) -> GradientFunction:
    """The step's gradient function for `method`: its gradients are of the model's weights, then of `method.trainable`.

    `representation`: a gradient method's Gramian is of that layer's output (MGDA-UB).
    """
    names = list(objective.terms)
    model = objective.model

    def gradient_on_batch(batch):
        """On one replica's slice: the update's gradients (summed over replicas) and the step's measurements."""
        seen = {}

        def forward_seeing_the_representation(inputs, training):
            seen["z"], predictions = representation.probe(inputs, training=training)
            return predictions

        with tf.GradientTape(persistent=method.uses_gradients) as tape:
            # `labelled`: which outputs have a labelled example in the global batch (the others take no part).
            output_losses, labelled = objective.losses_and_labelled(
                batch, examples_in_batch=global_batch_size, metrics=output_metrics,
                forward=forward_seeing_the_representation if representation else None)
            loss_weights = objective.loss_weights.in_force()  # A schedule's value at this step.
            weighted_losses = [loss_weights[name] * output_losses[name] for name in names]
            weighted = tf.stack(weighted_losses)
            # mixed_float16: each loss times the loss scale, inside the tape (1 otherwise).
            scaled_losses = [optimizer.scale_loss(loss) for loss in weighted_losses] if method.uses_gradients else []
            factors, extra_losses = method.loss_factors(global_values(weighted), labelled)
            # Regularization and uncertainty's log-variance term: every replica computes them whole; each adds
            # its share.
            regularization = ([tf.nn.scale_regularization_loss(tf.add_n([*model.losses, *extra_losses]))]
                              if model.losses or extra_losses else [])
            scaled_loss = optimizer.scale_loss(tf.add_n([tf.reduce_sum(factors * weighted), *regularization]))
            scaled_regularization = optimizer.scale_loss(regularization[0]) if regularization else None
        if method.uses_gradients:
            gradients, weights = combined_gradients(
                tape=tape, method=method, weighted_losses=weighted_losses, scaled_losses=scaled_losses,
                scaled_regularization=scaled_regularization, variables=model.trainable_variables,
                optimizer=optimizer, representation=representation, z=seen.get("z"), present=labelled)
            factors = tf.cast(weights, weighted.dtype)
        else:
            gradients = summed_over_replicas(tape.gradient(scaled_loss, model.trainable_variables + method.trainable))
        # Factors are the same on every replica: each reports its share, so that the sum is the factor.
        share = 1.0 / strategy.num_replicas_in_sync
        loss = tf.add_n([tf.reduce_sum(tf.stop_gradient(factors) * weighted), *regularization])
        return gradients, {**as_measurements(loss, output_losses),
                           **{f"loss_weight/{name}": factors[k] * share for k, name in enumerate(names)},
                           # For `after_update`: the weights this step used, and where there were labels.
                           **{f"weight_in_force/{name}": loss_weights[name] * share for name in names},
                           **{f"labelled/{name}": tf.cast(labelled[k], tf.float32) * share
                              for k, name in enumerate(names)}}

    def weighted(measurements, output_losses=None) -> tf.Tensor:
        """`w_k L_k` with the weights the step used (`output_losses`: other values of `L_k`)."""
        output_losses = output_losses or {name: measurements[f"{name}_loss"] for name in names}
        return tf.stack([measurements[f"weight_in_force/{name}"] * output_losses[name] for name in names])

    def present(measurements) -> tf.Tensor:
        """The outputs with a labelled example in the step's global batch."""
        return tf.stack([measurements[f"labelled/{name}"] > 0.5 for name in names])

    def losses_after_update(batch, measurements) -> tf.Tensor:
        """`w_k L_k` on the same batch at the updated weights, in inference mode (nothing updated): FAMO's."""
        shares = strategy.run(lambda batch: objective.output_losses(
            batch, examples_in_batch=global_batch_size, training=False), args=(batch,))
        return weighted(measurements, {name: strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)
                                       for name, value in shares.items()})

    def after_update(batch, measurements):
        """Across replicas, after the update: the method's state follows the global weighted losses."""
        method.after_step(weighted(measurements), present(measurements),
                          losses_after_update=lambda: losses_after_update(batch, measurements))

    return GradientFunction(on_replica=gradient_on_batch, variables=model.trainable_variables + method.trainable,
                            after_update=after_update)


def global_values(shares: tf.Tensor) -> tf.Tensor:
    """This replica's shares summed over every replica and worker (held constant: no gradient flows through)."""
    return summed_over_replicas(tf.stop_gradient(shares))


def method_weights(method: Method, gram: tf.Tensor, weighted_losses: tf.Tensor, present: tf.Tensor
                   ) -> tuple[tf.Tensor, list]:
    """The method's weights `a` of the outputs' gradients, from their Gramian `G`: the one place a method reads `G`.

    Every method reads `G / trace(G)` (the Gramian of `J / |J|_F`), so that
    its weights do not depend on the gradients' scale: a regression on large
    targets has gradients a million times those of a classifier, and a
    solver's tolerances hold at one scale only. The scale itself
    (`gram_scale`) goes along, for GradNorm, whose loss is of the gradients'
    own norms. An output absent from the batch (`present` False: no
    labelled example of it in the global batch) has no gradient: its row
    and column are zeros (the trace is the present outputs' alone), its
    weight is 0, and the method weighs the m present outputs as if it did
    not exist. A Gramian of zeros (no present output's loss has a gradient
    on the shared weights) is read as `I / m` on the present outputs, m
    orthogonal gradients of equal norm: each method gives its weights for
    gradients that do not conflict, and the update of the shared weights is
    zero whatever they are. A Gramian that overflowed (mixed_float16) gives
    weights of ones (0 for an absent output), and the loss-scale optimizer
    skips the step, as with `fixed`.
    """
    finite = tf.reduce_all(tf.math.is_finite(gram))
    # Exactly zero, whatever reached an absent output's row (its gradient is 0 by definition).
    gram = tf.where(present[:, None] & present[None, :], gram, 0.0)
    scale = tf.where(finite, tf.linalg.trace(gram), 0.0)
    usable = scale > 0
    ones_where_present = tf.cast(present, gram.dtype)
    no_gradient = tf.linalg.diag(ones_where_present) / tf.maximum(tf.reduce_sum(ones_where_present), 1.0)
    normalized = tf.where(usable, gram / tf.where(usable, scale, 1.0), no_gradient)
    weights, own_gradients = method.gradient_weights(normalized, weighted_losses, present, gram_scale=scale)
    return tf.where(finite, weights, ones_where_present), own_gradients


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
    present: tf.Tensor,
) -> tuple[list, tf.Tensor]:
    """The update's gradients (summed over replicas, as the optimizer takes them), and the weights `a`.

    The gradients are those of `variables` (the model's), then of the
    method's own `method.trainable`. `weighted_losses`: this replica's share
    of each `w_k L_k`; `scaled_losses`: the same times the loss scale
    (mixed_float16), read inside the persistent `tape`;
    `scaled_regularization`: its share of the regularization, likewise (its
    gradient is added whole, as with `fixed`). With a `representation`, `z`
    is its layer's output in the forward. `present`: `(K,)` bool, the outputs
    with a labelled example in the global batch (`method_weights`).
    """
    # mixed_float16: every gradient is of a scaled loss; the Gramian is unscaled before the method reads it.
    loss_scale = tf.cast(optimizer.scale_loss(tf.constant(1.0)), tf.float64)
    global_losses = global_values(tf.stack(weighted_losses))
    if representation is not None:
        gram, update = gradients_through_representation(tape=tape, representation=representation, z=z,
                                                        scaled_losses=scaled_losses, variables=variables)
        weights, own_gradients = method_weights(method, gram / loss_scale ** 2, global_losses, present)
        gradients = update(weights)
    else:
        outputs = gramian.all_reduced(gramian.output_gradients(tape, scaled_losses, variables))
        if not outputs.shared:
            raise ConfigError("loss_weighting", f"{method.weighting.name} weighs the gradients of weights several "
                                                f"outputs share; this model's outputs share none")
        blocks = gramian.shared_blocks(outputs, variables)
        weights, own_gradients = method_weights(method, gramian.gramian(blocks) / loss_scale ** 2, global_losses,
                                                present)
        gradients = [None] * len(variables)
        for v, gradient in zip(outputs.shared, gramian.combined(blocks, weights)):
            gradients[v] = gradient
        for v, output in outputs.own.items():
            gradients[v] = outputs.per_output[output][v]
    if scaled_regularization is not None:
        regularization_gradients = summed_over_replicas(tape.gradient(scaled_regularization, variables))
        gradients = [_add(g, r) for g, r in zip(gradients, regularization_gradients)]
    # The method's own variables (GradNorm's logits): scaled as the optimizer expects, identical on every replica.
    scale = tf.cast(loss_scale, tf.float32)
    return gradients + [g * scale for g in own_gradients], weights


def _add(gradient, more):
    if more is None:
        return gradient
    if gradient is None:
        return more
    if isinstance(gradient, tf.IndexedSlices) or isinstance(more, tf.IndexedSlices):
        return tf.convert_to_tensor(gradient) + tf.convert_to_tensor(more)
    return gradient + more
