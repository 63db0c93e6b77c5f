"""Each output's contribution to each layer's gradient: the mathematics behind `mto-explain` and
`--log_gradient_shares_every`.

The total loss is `L = sum_i w_i * L_i (+ regularization)`, and a gradient
is linear: `grad(L) = sum_i w_i * grad(L_i)`. So the one update the
optimizer applies is a sum of one contribution per output, and each layer's
gradient can be taken apart:

- `grad_norm[output]`: the norm of the output's contribution `w_i * grad(L_i)`
  to the layer's gradient; zero exactly where the output does not depend on
  the layer (in `headline`, the auxiliary loss and the main head's Dense layers);
- `share[output]`: the contribution's projection on the total gradient,
  `<w_i grad(L_i), grad(L)> / |grad(L)|^2`; a layer's shares sum to 1;
- `cosine`: for a layer that several outputs reach, the cosine between each
  pair of contributions: near 1 they pull the same way, below 0 they conflict;
- `linearity_max_abs_error`: the largest `|grad(L) - sum_i w_i grad(L_i)|`
  over every weight, each side computed on its own: float32 rounding, nothing more.

With an adaptive `--loss_weighting` method the update is not `grad(L)`:
each contribution is the method's `a_i * w_i grad(L_i)` (for a gradient
method, `a_i` weighs the shared weights' part; a head keeps its output's
gradient), the total is their sum, and `method_weights` are each output's
`a_i`, averaged over the batches.

It costs one backward pass per output (and one for the total, which checks
linearity), not one per layer. Gradients are summed over replicas and
workers, as the train step sums them, so every strategy gives the same numbers.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping

import keras
import numpy as np
import tensorflow as tf

from mto_tf.core import weighting
from mto_tf.core.objective import Objective
from mto_tf.core.replicas import summed_over_replicas
from mto_tf.core.weighting import gramian

REGULARIZATION = "regularization"  # The contribution of model.losses, when the model has any.


@dataclasses.dataclass
class Contributions:
    """Each output's weighted gradient `w_i * grad(L_i)` and the total `grad(L)`, per trainable variable."""

    by_output: dict[str, list[np.ndarray]]  # Also REGULARIZATION, when the model has regularization losses.
    total: list[np.ndarray]
    reaches: dict[str, list[bool]]  # Whether each output's loss depends on each variable at all.
    method_weights: list[np.ndarray] | None = None  # An adaptive method's a_i, one array per batch.


def make_gradient_contributions(*, objective: Objective, strategy: tf.distribute.Strategy,
                                global_batch_size: int | None, method: weighting.Method | None = None):
    """Returns `contributions(batch)`: each output's weighted gradient and the total, summed over replicas.

    The forward pass is the train step's (`training=True`), but it changes
    nothing: the model's non-trainable state (BatchNorm statistics, dropout
    seeds) is put back afterwards, so measuring during training leaves the
    training itself as it was.
    """
    model = objective.model
    variables = model.trainable_variables
    reaches: dict[str, list[bool]] = {}  # Known when the function is traced.

    def on_replica(batch):
        state = [tf.identity(variable) for variable in model.non_trainable_variables]
        with tf.GradientTape(persistent=True) as tape:
            output_losses, labelled = objective.losses_and_labelled(batch, examples_in_batch=global_batch_size)
            loss_weights = objective.loss_weights.in_force()
            terms = {name: loss_weights[name] * output_losses[name] for name in output_losses}
            if model.losses:  # This replica's share of the regularization, as in the train step.
                terms[REGULARIZATION] = tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            total = objective.total_loss(output_losses)
        # One backward pass per term, one for the total.
        gradients = {name: tape.gradient(term, variables) for name, term in terms.items()}
        for name, term_gradients in gradients.items():
            reaches[name] = [gradient is not None for gradient in term_gradients]
        gradients["total"] = tape.gradient(total, variables)
        del tape
        dense = {name: [tf.zeros_like(variable) if gradient is None else tf.convert_to_tensor(gradient)
                        for gradient, variable in zip(term_gradients, variables)]
                 for name, term_gradients in gradients.items()}
        with tf.control_dependencies(tf.nest.flatten(dense)):
            for variable, value in zip(model.non_trainable_variables, state):
                variable.assign(value)
        dense = summed_over_replicas(dense)
        if method is not None:
            dense = _weighted_by(method, dense, weighting.global_values(tf.stack(
                [terms[name] for name in output_losses])), list(output_losses), reaches, labelled)
        return dense

    @tf.function
    def contributions_on_batch(batch):
        per_replica = strategy.run(on_replica, args=(batch,))
        # Equal on every replica after the all-reduce: take the first's.
        return tf.nest.map_structure(lambda value: strategy.experimental_local_results(value)[0], per_replica)

    def contributions(batch) -> Contributions:
        """The batch's contributions, as NumPy arrays."""
        computed = contributions_on_batch(batch)
        method_weights = computed.pop("method_weights", None)
        values = {name: [gradient.numpy() for gradient in term_gradients] for name, term_gradients in computed.items()}
        total = values.pop("total")
        return Contributions(by_output=values, total=total, reaches=dict(reaches),
                             method_weights=None if method_weights is None else [method_weights.numpy()])

    return contributions


def added(a: Contributions, b: Contributions) -> Contributions:
    return Contributions(by_output={name: [x + y for x, y in zip(a.by_output[name], b.by_output[name])]
                                    for name in a.by_output},
                         total=[x + y for x, y in zip(a.total, b.total)], reaches=a.reaches,
                         method_weights=None if a.method_weights is None else a.method_weights + b.method_weights)


def layer_report(model: keras.Model, contributions: Contributions, *, loss_weights: Mapping[str, float]) -> dict:
    """Norms, shares and cosines per layer with trainable weights, in model order (the JSON of `mto-explain`)."""
    index = {id(variable): position for position, variable in enumerate(model.trainable_variables)}
    names = list(contributions.by_output)
    linearity = max(float(np.max(np.abs(total - sum(contributions.by_output[name][position] for name in names))))
                    for position, total in enumerate(contributions.total))
    layers = []
    for layer in model.layers:
        positions = [index[id(variable)] for variable in layer.trainable_weights if id(variable) in index]
        if not positions:
            continue

        def flat(gradients):
            return np.concatenate([gradients[position].ravel() for position in positions]).astype(np.float64)

        total = flat(contributions.total)
        parts = {name: flat(contributions.by_output[name]) for name in names}
        reached = [name for name in names if any(contributions.reaches[name][position] for position in positions)]
        total_squared = float(total @ total)
        layers.append({
            "name": layer.name,
            "shared": len([name for name in reached if name != REGULARIZATION]) > 1,
            "reached_by": reached,
            "grad_norm": {**{name: float(np.linalg.norm(parts[name])) for name in names},
                          "total": math.sqrt(total_squared)},
            # None for a layer whose total gradient is exactly zero: nothing to share.
            "share": {name: float(parts[name] @ total) / total_squared if total_squared else None for name in names},
            "cosine": _cosines(parts, [name for name in reached if name != REGULARIZATION]),
        })
    report = {"outputs": [name for name in names if name != REGULARIZATION],
              "loss_weights": dict(loss_weights), "layers": layers, "linearity_max_abs_error": linearity}
    if contributions.method_weights is not None:
        mean = np.mean(contributions.method_weights, axis=0)
        report["method_weights"] = {name: float(value) for name, value in zip(report["outputs"], mean)}
    return report


def _weighted_by(method: weighting.Method, dense: dict, weighted_losses: tf.Tensor, names: list[str],
                 reaches: dict[str, list[bool]], present: tf.Tensor) -> dict:
    """Each output's contribution times the method's `a_i` (a gradient method's: on the shared weights), and their sum."""
    if method.uses_gradients:
        shared = [v for v in range(len(dense["total"])) if sum(reaches[name][v] for name in names) > 1]
        # The train step's Gramian, of these dense gradients: the same products, so the same weights.
        blocks = [gramian.Block(rows=[dense[name][v] for name in names], indices=None, dense_shape=None)
                  for v in shared]
        weights, _ = weighting.method_weights(method, gramian.gramian(blocks), weighted_losses, present)
        scaled = {name: [tf.cast(weights[k], g.dtype) * g if v in shared else g for v, g in enumerate(dense[name])]
                  for k, name in enumerate(names)}
    else:
        weights, _ = method.loss_factors(weighted_losses, present)
        scaled = {name: [tf.cast(weights[k], g.dtype) * g for g in dense[name]] for k, name in enumerate(names)}
    terms = [*names, *([REGULARIZATION] if REGULARIZATION in dense else [])]
    total = [tf.add_n([(scaled.get(name) or dense[name])[v] for name in terms]) for v in range(len(dense["total"]))]
    return {**dense, **scaled, "total": total, "method_weights": tf.cast(weights, tf.float32)}


def _cosines(parts: Mapping[str, np.ndarray], reached: list[str]) -> dict[str, float | None] | None:
    """`{"a/b": cosine}` for each pair of outputs reaching the layer; None if fewer than two do."""
    if len(reached) < 2:
        return None
    cosines = {}
    for a, b in itertools.combinations(reached, 2):
        norms = np.linalg.norm(parts[a]) * np.linalg.norm(parts[b])
        cosines[f"{a}/{b}"] = float(parts[a] @ parts[b] / norms) if norms else None  # A zero contribution: none.
    return cosines


def as_record(report: dict) -> dict[str, float]:
    """A report as log values: `grad_share/<layer>/<output>`, `grad_norm/<layer>/<output or total>`."""
    record = {}
    for layer in report["layers"]:
        for name, share in layer["share"].items():
            if share is not None:
                record[f"grad_share/{layer['name']}/{name}"] = share
        for name, norm in layer["grad_norm"].items():
            record[f"grad_norm/{layer['name']}/{name}"] = norm
    return record
