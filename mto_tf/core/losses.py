"""The terms of the total loss: each output's Keras loss and each extra term, and how each is reduced.

The total loss of a multi-output model, as `model.fit` computes it
(keras/src/trainers/compile_utils.py, `CompileLoss.call`):

    loss = sum_i w_i * reduce_i(sample_weight * l_i)  + sum(model.losses)

where `reduce_i` is the reduction output i's loss carries
(keras/src/losses/loss.py, `reduce_values`):

- `sum_over_batch_size` (Keras's default; `mean` is its other name): the
  sum over the batch divided by the number of examples;
- `sum`: the sum over the batch;
- `mean_with_sample_weight`: the sum divided by the sum of the sample
  weights (the mean over the labelled examples, when the weights are 0/1).

Under a strategy with R replicas each replica sees batch_size / R
examples. Each replica's share of a term is its own sum divided by the
GLOBAL divisor (the examples, or the sample weights, of the whole global
batch, summed over every replica and worker), so that the shares add up to
the single-device value and the summed gradients equal one device's.
Keras's `fit` divides by each replica's own sample weights instead
(`mean_with_sample_weight` then differs from one device when the labelled
examples fall unevenly). A divisor of 0 (no labelled example of that output
in the global batch) gives 0, never 0/0, as Keras's `divide_no_nan` does.

Each output's loss is resolved as `compile` resolves it (Keras's own
`get_loss`): a name (`"binary_crossentropy"`, or `"crossentropy"`, chosen
from the label and prediction shapes), a config
(`{"class_name": "BinaryCrossentropy", "config": {"from_logits": true,
"reduction": "sum"}}`), `MODULE:FUNCTION` for a function
`(y_true, y_pred) -> per-example loss`, or, from Python, a function or a
`keras.losses.Loss`. An extra term (`--extra_losses`) is a function of the
`(labels, predictions, sample_weights)` dicts with one value per example.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping

import keras
import tensorflow as tf

from mto_tf import _compat
from mto_tf.errors import ConfigError, describe_error

SUM_OVER_BATCH_SIZE, SUM, MEAN_WITH_SAMPLE_WEIGHT = "sum_over_batch_size", "sum", "mean_with_sample_weight"
REDUCTIONS = (SUM_OVER_BATCH_SIZE, SUM, MEAN_WITH_SAMPLE_WEIGHT)
_KERAS_NAMES = {"mean": SUM_OVER_BATCH_SIZE}  # Keras's other name for the same reduction.


@dataclasses.dataclass(frozen=True)
class OutputLoss:
    """Output `output`'s Keras loss (reduction "none": per-example values) and the reduction it carried."""

    output: str
    loss_fn: keras.losses.Loss
    reduction: str  # One of REDUCTIONS.

    def per_example(self, labels, predictions, sample_weights) -> tuple[tf.Tensor, tf.Tensor | None]:
        """One value per example, and its weight (None: every example counts 1)."""
        values = self.loss_fn(labels[self.output], predictions[self.output])
        weights = sample_weights.get(self.output)
        if values.shape.rank > 1:
            # A value per time step (or pixel): Keras reduces every element.
            # `sum` adds them; `sum_over_batch_size` divides by every element,
            # so each example counts its elements' mean; so does
            # `mean_with_sample_weight` without weights, and with weights it
            # divides the sum over every element by the examples' weights.
            adds = self.reduction == SUM or (self.reduction == MEAN_WITH_SAMPLE_WEIGHT and weights is not None)
            values = (tf.reduce_sum if adds else tf.reduce_mean)(values, axis=range(1, values.shape.rank))
        return values, weights


@dataclasses.dataclass(frozen=True)
class ExtraLoss:
    """An `--extra_losses` term: `function(labels, predictions, sample_weights)`, one value per example."""

    name: str
    function: Callable
    reduction: str = SUM_OVER_BATCH_SIZE

    def per_example(self, labels, predictions, sample_weights) -> tuple[tf.Tensor, None]:
        return tf.cast(self.function(labels, predictions, sample_weights), tf.float32), None


LossTerm = OutputLoss | ExtraLoss


def output_loss(identifier, *, output: str, y_true: tf.TensorSpec, y_pred: tf.TensorSpec,
                reduction: str | None = None) -> OutputLoss:
    """Output `output`'s Keras loss, returning per-example values, and the reduction it carries.

    Built by compile's own `get_loss`, so a loss here is the very object
    `fit` would use; only its reduction is taken out, to be applied over the
    global batch (`replica_sums`). `reduction`: instead of the loss's own
    (`--loss_reduction=mean_over_labelled`).
    """
    try:
        loss = _compat.get_loss(identifier, y_true, y_pred)
        if loss is identifier:  # A Loss object passed from Python keeps its own reduction: change a copy.
            loss = copy.copy(loss)
    except Exception as error:  # Keras raises ValueError, TypeError, ... for unknown names and bad configs.
        raise ConfigError("losses", f"output {output!r}: Keras cannot make a loss of {identifier!r} "
                                    f"({describe_error(error)})") from None
    carried = _KERAS_NAMES.get(loss.reduction, loss.reduction)
    if carried not in REDUCTIONS:
        raise ConfigError("losses", f"output {output!r}: reduction {loss.reduction!r} gives a value per example; "
                                    f"the total needs one number: expected one of {', '.join(REDUCTIONS)}")
    loss.reduction = "none"
    return OutputLoss(output=output, loss_fn=loss, reduction=reduction or carried)


@dataclasses.dataclass(frozen=True)
class ReplicaSums:
    """One term on one replica's slice: what its loss is made of, before the sums over replicas."""

    weighted_sum: tf.Tensor  # sum_b weight_b * value_b.
    divisor: tf.Tensor  # This replica's part of the divisor: its examples, or its weights' sum (0 for `sum`).
    labelled: tf.Tensor  # Its examples with a weight other than 0.


def replica_sums(term: LossTerm, labels, predictions, sample_weights) -> ReplicaSums:
    """`term` on this replica's slice: its weighted sum and its parts of the divisor and of the labelled count."""
    values, weights = term.per_example(labels, predictions, sample_weights)
    examples = tf.cast(tf.shape(values)[0], values.dtype)
    if weights is None:
        weighted_sum, labelled = tf.reduce_sum(values), examples
        weight_sum = examples
    else:
        weights = tf.cast(weights, values.dtype)
        weighted_sum = tf.reduce_sum(values * weights)
        labelled = tf.reduce_sum(tf.cast(weights != 0, values.dtype))
        weight_sum = tf.reduce_sum(weights)
    divisor = {SUM_OVER_BATCH_SIZE: examples, SUM: tf.zeros_like(examples),
               MEAN_WITH_SAMPLE_WEIGHT: weight_sum}[term.reduction]
    return ReplicaSums(weighted_sum=weighted_sum, divisor=divisor, labelled=labelled)


def reduced(weighted_sum: tf.Tensor, divisor: tf.Tensor | None, reduction: str) -> tf.Tensor:
    """A term's value from its weighted sum and GLOBAL divisor; 0 when there is nothing to divide by (never 0/0)."""
    return weighted_sum if reduction == SUM else tf.math.divide_no_nan(weighted_sum, divisor)


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
