"""Per-output losses, their weighted sum, and its scaling for distribution.

The total loss of a multi-output model, as `model.fit` computes it
(keras/src/trainers/compile_utils.py, `CompileLoss.call`):

    loss = sum_i w_i * sum_b(sample_weight_b * l_i(b)) / batch_size  + sum(model.losses)

Under a strategy with R replicas each replica sees batch_size / R examples.
Its share of the total is its per-output sums divided by the GLOBAL batch
size, and the regularization divided by R. The optimizer sums gradients
across replicas, so the update equals one device training on the global batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import keras
import tensorflow as tf

from mto_tf.config import ConfigError

LossFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


def get_loss_fn(name: str, *, flag: str = "losses") -> LossFn:
    """Returns the Keras loss *function* called `name` (per-example, no reduction).

    `model.compile(loss=name)` wraps this same function in a
    `LossFunctionWrapper`; calling it directly gives the per-example losses
    that the wrapper would average.
    """
    try:
        loss_fn = keras.losses.get(name)
    except ValueError:
        loss_fn = None
    if loss_fn is None or isinstance(loss_fn, keras.losses.Loss) or not callable(loss_fn):
        raise ConfigError(flag, f"expected a Keras loss function name such as 'binary_crossentropy' "
                                f"or 'mean_squared_error', got {name!r}")
    return loss_fn


def per_output_losses(
    *,
    loss_fns: Mapping[str, LossFn],
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
    return {
        name: tf.nn.compute_average_loss(
            loss_fn(labels[name], predictions[name]),
            sample_weight=sample_weights.get(name),
            global_batch_size=global_batch_size,
        )
        for name, loss_fn in loss_fns.items()
    }


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
    total = tf.add_n([loss_weights[name] * loss for name, loss in output_losses.items()])
    if regularization_losses:
        total += tf.nn.scale_regularization_loss(tf.add_n(regularization_losses))
    return total
