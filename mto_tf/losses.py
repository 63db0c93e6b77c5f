"""Per-output losses, their weighted sum, and its scaling for distribution.

The total loss of a multi-output model, as `model.fit` computes it
(keras/src/trainers/compile_utils.py, `CompileLoss.call`):

    loss = sum_i w_i * sum_b(sample_weight_b * l_i(b)) / batch_size  + sum(model.losses)

Under a strategy with R replicas each replica sees batch_size / R examples.
Its share of the total is its per-output sums divided by the GLOBAL batch
size, and the regularization divided by R. The optimizer sums gradients
across replicas, so the update equals one device training on the global batch.

Each output's loss is resolved as `compile` resolves it (Keras's own
`get_loss`): a name (`"binary_crossentropy"`, or `"crossentropy"`, chosen
from the label and prediction shapes), a config
(`{"class_name": "BinaryCrossentropy", "config": {"from_logits": true}}`),
`MODULE:FUNCTION` for a function `(y_true, y_pred) -> per-example loss`, or,
from Python, a function or a `keras.losses.Loss`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import keras
import tensorflow as tf
from keras.src.trainers import compile_utils  # get_loss: exactly compile()'s resolution.

from mto_tf import user_code
from mto_tf.config import ConfigError


def per_example_loss(identifier, *, output: str, y_true: tf.TensorSpec, y_pred: tf.TensorSpec) -> keras.losses.Loss:
    """Output `output`'s Keras loss, returning per-example values (reduction "none").

    Built by compile's own `get_loss`, so a loss here is the very object
    `fit` would use; only its reduction differs: the custom loop reduces it
    itself, over the global batch (`per_output_losses`).
    """
    try:
        loss = compile_utils.get_loss(identifier, y_true, y_pred)
        if loss is identifier:  # A Loss object passed from Python keeps its own reduction: change a copy.
            loss = copy.copy(loss)
    except Exception as error:  # Keras raises ValueError, TypeError, ... for unknown names and bad configs.
        raise ConfigError("losses", f"output {output!r}: Keras cannot make a loss of {identifier!r} "
                                    f"({user_code.describe_error(error)})") from None
    loss.reduction = "none"
    return loss


def per_output_losses(
    *,
    loss_fns: Mapping[str, keras.losses.Loss],
    labels: Mapping[str, tf.Tensor],
    predictions: Mapping[str, tf.Tensor],
    sample_weights: Mapping[str, tf.Tensor] | None,
    global_batch_size: int,
) -> dict[str, tf.Tensor]:
    """Each output's unweighted loss: this replica's share of the global-batch mean.

    Dividing by the GLOBAL batch size (not this replica's) makes the shares
    add up, across replicas, to the mean over the whole global batch.
    """
    sample_weights = sample_weights or {}
    output_losses = {}
    for name, loss_fn in loss_fns.items():
        per_example = loss_fn(labels[name], predictions[name])
        if per_example.shape.rank > 1:
            # A loss with a value per time step (or pixel): Keras's
            # "sum_over_batch_size" divides by every element, so each example
            # contributes the mean of its values.
            per_example = tf.reduce_mean(per_example, axis=range(1, per_example.shape.rank))
        output_losses[name] = tf.nn.compute_average_loss(
            per_example, sample_weight=sample_weights.get(name), global_batch_size=global_batch_size)
    return output_losses


def weighted_total_loss(
    *,
    output_losses: Mapping[str, tf.Tensor],
    loss_weights: Mapping[str, float],
    regularization_losses: list[tf.Tensor],
) -> tf.Tensor:
    """sum_i w_i * loss_i, plus this replica's share of the regularization.

    Every replica computes the same regularization from the same (mirrored)
    weights; dividing it by the number of replicas makes the summed gradient
    count it once.
    """
    # Summed one by one in output order, as `CompileLoss` sums its flat
    # losses (`sum(loss_values)`); an order that differs changes rounding only.
    total = tf.constant(0.0)
    for name, output_loss in output_losses.items():
        total += loss_weights[name] * output_loss
    if regularization_losses:
        total += tf.nn.scale_regularization_loss(tf.add_n(regularization_losses))
    return total
