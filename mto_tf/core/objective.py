"""The one total loss a multi-output model is trained on, computed on one replica's slice of a global batch.

    loss = sum_i w_i * loss_i  +  regularization

`loss_i` is term i reduced as its Keras loss says (`losses.py`): the sum of
sample (and class) weight times per-example loss, divided by the examples
of the GLOBAL batch (`sum_over_batch_size`), by nothing (`sum`), or by the
sample weights of the GLOBAL batch (`mean_with_sample_weight`), so that the
replicas' shares add up to the single-device value. A term is an output's
loss or an `--extra_losses` term; `w_i` is the weight in force
(`loss_weights.py`). The train step, the evaluation step and the gradient
shares all compute the forward pass and these shares here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import keras
import tensorflow as tf

from mto_tf.core import losses
from mto_tf.core.loss_weights import LossWeights
from mto_tf.core.replicas import summed_over_replicas
from mto_tf.core.signature import ModelSignature


@dataclasses.dataclass(frozen=True)
class Objective:
    """The model and what its total loss is made of: its terms and their weights."""

    model: keras.Model
    signature: ModelSignature
    terms: Mapping[str, losses.LossTerm]  # Each trained output's loss, then each extra term, by name.
    loss_weights: LossWeights
    # With one dataset per task: each task's terms. A batch is then `{task: batch}`, each term computed on
    # its task's batch (one forward pass per task); None: one batch holds every term's labels.
    tasks: Mapping[str, tuple[str, ...]] | None = None

    def of_task(self, task: str) -> Objective:
        """The total loss of one task's terms, on a batch of that task alone (a sampled turn's step)."""
        return dataclasses.replace(self, terms={name: self.terms[name] for name in self.tasks[task]}, tasks=None)

    def replica_sums(self, batch, *, training: bool = True,
                     metrics: Mapping[str, tuple[str, keras.metrics.Metric]] | None = None,
                     forward: Callable | None = None) -> dict[str, losses.ReplicaSums]:
        """Forward on one replica's slice `batch`, and each term's sums on it (before any sum over replicas).

        Args:
          batch: `(inputs, labels)` or `(inputs, labels, sample_weights)`, this replica's slice (with
            `tasks`: `{task: slice}`).
          training: Dropout drops, BatchNorm normalizes by the batch and updates its
            moving statistics; False changes nothing.
          metrics: `{log name: (output, metric)}` to update with this slice's predictions.
          forward: `forward(inputs, training)`, the predictions, instead of the model's call.
        """
        if self.tasks is None:
            return self._sums_on(batch, list(self.terms), training=training, metrics=metrics, forward=forward)
        sums = {}
        for task, names in self.tasks.items():  # Each task's outputs, on a forward pass of its own batch.
            sums.update(self._sums_on(batch[task], names, training=training, metrics=metrics, forward=forward))
        return {name: sums[name] for name in self.terms}

    def _sums_on(self, batch, names, *, training, metrics, forward) -> dict[str, losses.ReplicaSums]:
        """Forward on one batch; the sums of the terms `names`, and the metrics of the outputs it has labels of."""
        inputs, labels, sample_weights = keras.utils.unpack_x_y_sample_weight(batch)
        sample_weights = sample_weights or {}
        predictions = self.signature.as_output_dict((forward or self.model)(inputs, training=training))
        for output_name, metric in (metrics or {}).values():
            if output_name not in labels:  # Another task's output.
                continue
            # Weighted by the sample weights, as compile's `weighted_metrics`:
            # an example whose weight is 0 has no label for this output, and
            # its metrics skip it (compile's plain `metrics` would count it).
            weights = sample_weights.get(output_name)
            if weights is not None:  # Shaped to broadcast against labels with a value per time step too.
                weights = tf.reshape(weights, [-1] + [1] * (labels[output_name].shape.rank - 1))
            metric.update_state(labels[output_name], predictions[output_name], sample_weight=weights)
        return {name: losses.replica_sums(self.terms[name], labels, predictions, sample_weights) for name in names}

    def output_losses(self, batch, *, examples_in_batch: int | tf.Tensor | None = None, training: bool = True,
                      metrics: Mapping[str, tuple[str, keras.metrics.Metric]] | None = None,
                      forward: Callable | None = None) -> dict[str, tf.Tensor]:
        """Forward, and each term's share of its global-batch loss: on one replica's slice `batch`.

        `examples_in_batch`: the examples in the whole global batch, when
        known (every batch full; with `tasks`, `{task: examples}`); None:
        counted across replicas. Other arguments as `replica_sums`.
        """
        sums = self.replica_sums(batch, training=training, metrics=metrics, forward=forward)
        return self._shares(sums, examples_in_batch=examples_in_batch, count_labelled=False)[0]

    def losses_and_labelled(self, batch, *, examples_in_batch: int | tf.Tensor | None = None, training: bool = True,
                            metrics: Mapping[str, tuple[str, keras.metrics.Metric]] | None = None,
                            forward: Callable | None = None) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
        """`output_losses`, and whether each term has a labelled example anywhere in the global batch ((K,) bool)."""
        sums = self.replica_sums(batch, training=training, metrics=metrics, forward=forward)
        return self._shares(sums, examples_in_batch=examples_in_batch, count_labelled=True)

    def _shares(self, sums: Mapping[str, losses.ReplicaSums], *, examples_in_batch, count_labelled: bool):
        """Each term's share: its weighted sum over its GLOBAL divisor; and (if counted) where it has labels."""
        # A pass's last batch may be partial and split unevenly across
        # replicas, and an output may be labelled on some replicas' rows only:
        # each replica divides by what the WHOLE global batch holds (Keras's
        # fit divides each replica's sums by its own). One all-reduce for every
        # divisor and count, and none when the batch size says it all (every
        # batch full: it is sum_over_batch_size's divisor; `sum` has none).
        known = self._known_divisors(examples_in_batch)
        global_divisors = global_labelled = None
        if count_labelled or any(term.reduction != losses.SUM and name not in known
                                 for name, term in self.terms.items()):
            global_divisors, global_labelled = tf.unstack(summed_over_replicas(tf.stack(
                [[part.divisor for part in sums.values()], [part.labelled for part in sums.values()]])))
        output_losses = {}
        for k, (name, part) in enumerate(sums.items()):
            if name in known:
                divisor = known[name]
            else:  # `sum`'s is None: it has no divisor.
                divisor = None if global_divisors is None else global_divisors[k]
            output_losses[name] = losses.reduced(part.weighted_sum, divisor, self.terms[name].reduction)
        return output_losses, (None if global_labelled is None else global_labelled > 0)

    def _known_divisors(self, examples_in_batch) -> dict[str, tf.Tensor]:
        """Each `sum_over_batch_size` term's divisor when the batch size says it: the examples of its batch."""
        if examples_in_batch is None:
            return {}
        task_of = {name: task for task, names in (self.tasks or {}).items() for name in names}
        return {name: tf.cast(examples_in_batch[task_of[name]] if self.tasks else examples_in_batch, tf.float32)
                for name, term in self.terms.items() if term.reduction == losses.SUM_OVER_BATCH_SIZE}

    def total_loss(self, output_losses: Mapping[str, tf.Tensor], *, replicas_share: bool = True) -> tf.Tensor:
        """`sum_i w_i * loss_i` plus this replica's share of the regularization (all of it: `replicas_share=False`).

        `model.losses` recomputes the regularizers from the current weights:
        inside a tape, call this inside it too.
        """
        return losses.weighted_total_loss(output_losses=output_losses, loss_weights=self.loss_weights.in_force(),
                                          regularization_losses=self.model.losses, replicas_share=replicas_share)

    def changing_weights(self) -> dict[str, tf.Tensor]:
        """This replica's share of each weight in force, as `loss_weight/<term>`, when weights change (a
        schedule, a callback); else nothing. The weights are the same on every replica: the shares sum to them."""
        if not self.loss_weights.may_change:
            return {}
        share = 1.0 / tf.distribute.get_replica_context().num_replicas_in_sync
        in_force = self.loss_weights.in_force()
        return {f"loss_weight/{name}": in_force[name] * share for name in self.terms}  # A task's turn: its own.


def as_measurements(loss: tf.Tensor, output_losses: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """`loss` and each `<term>_loss`, named as `fit`'s history names them."""
    return {"loss": loss, **{f"{name}_loss": value for name, value in output_losses.items()}}
