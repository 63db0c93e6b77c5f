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

from mto_tf import _compat
from mto_tf.errors import ConfigError, describe_error


def per_example_loss(identifier, *, output: str, y_true: tf.TensorSpec, y_pred: tf.TensorSpec) -> keras.losses.Loss:
    """Output `output`'s Keras loss, returning per-example values (reduction "none").

    Built by compile's own `get_loss`, so a loss here is the very object
    `fit` would use; only its reduction differs: the custom loop reduces it
    itself, over the global batch (`per_output_losses`).
    """
    try:
        loss = _compat.get_loss(identifier, y_true, y_pred)
        if loss is identifier:  # A Loss object passed from Python keeps its own reduction: change a copy.
            loss = copy.copy(loss)
    except Exception as error:  # Keras raises ValueError, TypeError, ... for unknown names and bad configs.
        raise ConfigError("losses", f"output {output!r}: Keras cannot make a loss of {identifier!r} "
                                    f"({describe_error(error)})") from None
    loss.reduction = "none"
    return loss


def class_weight_table(class_weights: Mapping[int, float], *, output: str, prediction) -> tf.Tensor:
    """Output `output`'s weight of each class it can produce (1.0 where not given), indexed by class id.

    A `(batch, K)` output produces classes 0..K-1; a `(batch, 1)` or
    `(batch,)` output (one sigmoid or logit) classes 0 and 1.
    """
    shape = tuple(prediction.shape)  # A KerasTensor's shape is a tuple.
    num_classes = shape[-1] if len(shape) > 1 and shape[-1] not in (None, 1) else 2
    for class_id in class_weights:
        if class_id >= num_classes:
            raise ConfigError("class_weights", f"output {output!r} produces classes 0 to {num_classes - 1} "
                                               f"(predictions of shape {tuple(shape)}), not class {class_id}")
    return tf.constant([float(class_weights.get(class_id, 1.0)) for class_id in range(num_classes)], tf.float32)


def class_weights_of(labels: tf.Tensor, table: tf.Tensor) -> tf.Tensor:
    """Each example's class weight, its class read from its label as Keras reads it for `class_weight`.

    One-hot labels `(batch, K)`: the argmax; a single column `(batch, 1)` or
    `(batch,)` (binary labels or class ids): the rounded value
    (keras/src/trainers/data_adapters/tf_dataset_adapter.py, `make_class_weight_map_fn`).
    """
    if labels.shape.rank >= 2 and labels.shape[-1] != 1:
        class_ids = tf.argmax(labels, axis=-1, output_type=tf.int32)
    else:
        class_ids = tf.cast(tf.round(tf.reshape(labels, [-1])), tf.int32)
    return tf.gather(table, class_ids)


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
    replicas_share: bool = True,
) -> tf.Tensor:
    """sum_i w_i * loss_i, plus this replica's share of the regularization.

    Every replica computes the same regularization from the same (mirrored)
    weights; dividing it by the number of replicas makes the summed gradient
    count it once. `replicas_share=False` (losses already summed over
    replicas) adds it whole.
    """
    # Summed one by one in output order, as `CompileLoss` sums its flat
    # losses (`sum(loss_values)`); an order that differs changes rounding only.
    total = tf.constant(0.0)
    for name, output_loss in output_losses.items():
        total += loss_weights[name] * output_loss
    if regularization_losses:
        regularization = tf.add_n(regularization_losses)
        total += tf.nn.scale_regularization_loss(regularization) if replicas_share else regularization
    return total
