"""The one total loss a multi-output model is trained on, computed on one replica's slice of a global batch.

    loss = sum_i w_i * loss_i  +  regularization

`loss_i` is output i's per-example loss times its sample (and class)
weight, summed over the replica's examples and divided by the number of
examples in the GLOBAL batch, so that the replicas' shares add up to the
global-batch mean (`losses.py`). The train step, the evaluation step and
the gradient shares all compute the forward pass and these shares here,
with `Objective.output_losses`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import keras
import tensorflow as tf

from mto_tf.core import losses
from mto_tf.core.replicas import summed_over_replicas
from mto_tf.core.signature import ModelSignature


@dataclasses.dataclass(frozen=True)
class Objective:
    """The model and what its total loss is made of: each trained output's per-example loss and weight."""

    model: keras.Model
    signature: ModelSignature
    loss_fns: Mapping[str, keras.losses.Loss]  # Keras losses with reduction "none", for the trained outputs.
    loss_weights: Mapping[str, float]

    def output_losses(self, batch, *, examples_in_batch: int | tf.Tensor | None, training: bool = True,
                      metrics: Mapping[str, tuple[str, keras.metrics.Metric]] | None = None,
                      forward: Callable | None = None) -> dict[str, tf.Tensor]:
        """Forward, and each output's share of its global-batch loss: on one replica's slice `batch`.

        Args:
          batch: `(inputs, labels)` or `(inputs, labels, sample_weights)`, this replica's slice.
          examples_in_batch: the examples in the whole global batch; None: counted across replicas.
          training: Dropout drops, BatchNorm normalizes by the batch and updates its
            moving statistics; False changes nothing.
          metrics: `{log name: (output, metric)}` to update with this slice's predictions.
          forward: `forward(inputs, training)`, the predictions, instead of the model's call.
        """
        inputs, labels, sample_weights = keras.utils.unpack_x_y_sample_weight(batch)
        # A pass's last batch may be partial and split unevenly across
        # replicas: dividing by the examples the WHOLE global batch holds
        # keeps the exact single-device mean (Keras's fit divides each
        # replica's local mean by the number of replicas instead).
        if examples_in_batch is None:
            examples_in_batch = examples_in_global_batch(labels)
        predictions = self.signature.as_output_dict((forward or self.model)(inputs, training=training))
        for output_name, metric in (metrics or {}).values():
            metric.update_state(labels[output_name], predictions[output_name])
        return losses.per_output_losses(loss_fns=self.loss_fns, labels=labels, predictions=predictions,
                                        sample_weights=sample_weights, global_batch_size=examples_in_batch)

    def total_loss(self, output_losses: Mapping[str, tf.Tensor], *, replicas_share: bool = True) -> tf.Tensor:
        """`sum_i w_i * loss_i` plus this replica's share of the regularization (all of it: `replicas_share=False`).

        `model.losses` recomputes the regularizers from the current weights:
        inside a tape, call this inside it too.
        """
        return losses.weighted_total_loss(output_losses=output_losses, loss_weights=self.loss_weights,
                                          regularization_losses=self.model.losses, replicas_share=replicas_share)


def examples_in_global_batch(labels) -> tf.Tensor:
    """The number of examples in the global batch: this replica's, summed over every replica."""
    return summed_over_replicas(tf.shape(tf.nest.flatten(labels)[0], out_type=tf.int64)[0])


def as_measurements(loss: tf.Tensor, output_losses: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """`loss` and each `<output>_loss`, named as `fit`'s history names them."""
    return {"loss": loss, **{f"{name}_loss": value for name, value in output_losses.items()}}
