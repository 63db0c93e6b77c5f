"""Each method's state and its part of the step: the loss factors, or the weights of the outputs' gradients.

A method is a `tf.Module` (its variables go into every checkpoint), made
inside the strategy's scope from its description in
`mto_tf/loss_weighting.py` (`make_method`). The step calls, on each replica:

- `loss_factors(weighted_losses)` inside the tape: each output's factor
  (loss-based methods; gradient methods return ones);
- `gradient_weights(gram, weighted_losses, gram_scale=...)` after the
  per-output gradients (gradient methods): `a` and the gradients of its own
  trainable variables. `gram` is the Gramian divided by its trace
  `gram_scale` (`adaptive_step.method_weights` normalizes it, once, for all);

and once per step, across replicas, `after_step(...)`. `weighted_losses` are
the global values of `w_k L_k` (summed over replicas), so every replica
computes the same factors and weights.
"""

from __future__ import annotations

import importlib

import keras
import tensorflow as tf

from mto_tf.core.weighting import gradient_methods
from mto_tf.loss_weighting import LossWeighting


class Method(tf.Module):
    """What every method has: its outputs, its step counter (for seeded draws) and seed."""

    def __init__(self, weighting: LossWeighting, *, num_outputs: int, seed: int, period_steps: int):
        super().__init__(name=weighting.name)
        self.weighting = weighting
        self.num_outputs = num_outputs
        self.seed = seed
        self.period_steps = period_steps  # A pass over the data (with --epochs) or a logging window: DWA's period.
        self.steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="steps")
        self.trainable: list[keras.Variable] = []  # Trained by the run's optimizer, beside the model's weights.

    @property
    def uses_gradients(self) -> bool:
        """As its description says: it needs each output's gradient, not the losses alone."""
        return self.weighting.uses_gradients

    def stateless_seed(self) -> tf.Tensor:
        """`(--seed, step)`: the same draw on every replica and worker, and again after a resume."""
        return tf.stack([tf.constant(self.seed, tf.int64), self.steps.read_value()])

    def loss_factors(self, weighted_losses: tf.Tensor) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """Each output's factor and any extra loss terms (divided by the replicas, as regularization is)."""
        return tf.ones([self.num_outputs]), []

    def gradient_weights(self, gram: tf.Tensor, weighted_losses: tf.Tensor, *,
                         gram_scale: tf.Tensor) -> tuple[tf.Tensor, list]:
        raise NotImplementedError  # Gradient methods only.

    def after_step(self, weighted_losses: tf.Tensor, losses_after_update=None) -> None:
        """Once per step, across replicas, after the update: state that follows the losses."""
        self.steps.assign_add(1)


class Uncertainty(Method):
    """Kendall et al. 2018: total `sum_k exp(-s_k) L_k / 2 + s_k / 2`, `s_k` trained by the run's optimizer."""

    def __init__(self, weighting, **kwargs):
        super().__init__(weighting, **kwargs)
        self.log_variances = keras.Variable(tf.zeros([self.num_outputs]), name="log_variances")
        self.trainable = [self.log_variances]

    def loss_factors(self, weighted_losses):
        return tf.exp(-self.log_variances) / 2.0, [tf.reduce_sum(self.log_variances) / 2.0]


class DynamicWeightAverage(Method):
    """Liu et al. 2019: `K softmax(r / T)`, r_k the ratio of output k's mean loss over the last two periods.

    A period is a pass over the data (with --epochs) or a logging window;
    the weights are 1 for the first two periods.
    """

    def __init__(self, weighting, **kwargs):
        super().__init__(weighting, **kwargs)
        k = self.num_outputs
        self.weights = tf.Variable(tf.ones([k]), trainable=False, name="weights")
        self.period_sums = tf.Variable(tf.zeros([k]), trainable=False, name="period_sums")
        self.last_means = tf.Variable(tf.zeros([k]), trainable=False, name="last_means")
        self.periods = tf.Variable(0, dtype=tf.int64, trainable=False, name="periods")

    def loss_factors(self, weighted_losses):
        return self.weights.read_value(), []

    def after_step(self, weighted_losses, losses_after_update=None):
        super().after_step(weighted_losses)
        sums = self.period_sums + weighted_losses
        ended = tf.equal(self.steps % self.period_steps, 0)
        means = sums / self.period_steps
        # The ratio needs two periods' means: the weights change from the third period on.
        new_weights = self.num_outputs * tf.nn.softmax(means / self.last_means / self.weighting.parameters["temperature"])
        self.weights.assign(tf.where(ended & (self.periods >= 1), new_weights, self.weights))
        self.last_means.assign(tf.where(ended, means, self.last_means))
        self.periods.assign_add(tf.cast(ended, tf.int64))
        self.period_sums.assign(tf.where(ended, tf.zeros_like(sums), sums))


class RandomLossWeighting(Method):
    """Lin et al. 2022: `softmax` of K standard normal draws, drawn again every step."""

    def loss_factors(self, weighted_losses):
        draws = tf.random.stateless_normal([self.num_outputs], seed=self.stateless_seed())
        return tf.nn.softmax(draws), []


class FastAdaptiveMultitask(Method):
    """Liu et al. 2023 (FAMO): the loss `sum_k z_k log L_k / c`, z = softmax(xi); xi follows the losses' decrease.

    Its gradient is `sum_k (z_k / (c L_k)) grad L_k`, c = sum_k z_k / L_k:
    factors `z_k / (c L_k)`, held constant (they sum to 1). After the update
    the losses on the same batch, at the new weights, give
    `delta_k = log L_k(before) - log L_k(after)`, and xi takes one Adam step
    on `J_softmax^T delta + decay * xi` (the paper's Algorithm 2: PyTorch's
    Adam with L2 weight decay).
    """

    _EPSILON = 1e-8  # The paper's, added to each loss (its lower bound is 0).
    _BETA_1, _BETA_2, _ADAM_EPSILON = 0.9, 0.999, 1e-8  # PyTorch's Adam defaults.

    def __init__(self, weighting, **kwargs):
        super().__init__(weighting, **kwargs)
        k = self.num_outputs
        self.logits = tf.Variable(tf.zeros([k]), trainable=False, name="logits")
        self.first_moment = tf.Variable(tf.zeros([k]), trainable=False, name="first_moment")
        self.second_moment = tf.Variable(tf.zeros([k]), trainable=False, name="second_moment")

    def loss_factors(self, weighted_losses):
        z = tf.nn.softmax(self.logits)
        shifted = weighted_losses + self._EPSILON
        c = tf.reduce_sum(z / shifted)
        return z / (c * shifted), []

    def after_step(self, weighted_losses, losses_after_update=None):
        super().after_step(weighted_losses)
        delta = tf.math.log(weighted_losses + self._EPSILON) - tf.math.log(losses_after_update() + self._EPSILON)
        z = tf.nn.softmax(self.logits)
        gradient = z * (delta - tf.reduce_sum(z * delta))  # J_softmax^T delta (the Jacobian is symmetric).
        gradient += self.weighting.parameters["decay"] * self.logits
        self.first_moment.assign(self._BETA_1 * self.first_moment + (1 - self._BETA_1) * gradient)
        self.second_moment.assign(self._BETA_2 * self.second_moment + (1 - self._BETA_2) * gradient ** 2)
        t = tf.cast(self.steps, tf.float32)
        first = self.first_moment / (1 - self._BETA_1 ** t)
        second = self.second_moment / (1 - self._BETA_2 ** t)
        self.logits.assign_sub(self.weighting.parameters["learning_rate"] * first
                               / (tf.sqrt(second) + self._ADAM_EPSILON))


class GramianMethod(Method):
    """A gradient method that is a function of the Gramian alone: `function(G, **hyper-parameters)`."""

    def __init__(self, weighting, *, function, **kwargs):
        super().__init__(weighting, **kwargs)
        self._function = function

    def gradient_weights(self, gram, weighted_losses, *, gram_scale):
        return self._function(gram, **self.weighting.parameters), []


class ProjectingConflictingGradients(Method):
    """Yu et al. 2020 (PCGrad): the Gramian, and each output's own random order of the others, drawn each step."""

    def gradient_weights(self, gram, weighted_losses, *, gram_scale):
        return gradient_methods.pcgrad(gram, gradient_methods.random_orders(self.num_outputs,
                                                                            self.stateless_seed())), []


class GradNorm(Method):
    """Chen et al. 2018: weights `K softmax(logits)`; the logits trained (by the run's optimizer) on GradNorm's loss.

    The losses of the first step are the initial losses; `|g_k|` is the
    norm of output k's (weighted) gradient of the shared weights.
    """

    def __init__(self, weighting, **kwargs):
        super().__init__(weighting, **kwargs)
        k = self.num_outputs
        self.logits = keras.Variable(tf.zeros([k]), name="logits")
        self.trainable = [self.logits]
        self.initial_losses = tf.Variable(tf.ones([k]), trainable=False, name="initial_losses")

    def gradient_weights(self, gram, weighted_losses, *, gram_scale):
        initial = tf.where(self.steps == 0, weighted_losses, self.initial_losses)
        # The gradients' own norms, not the normalized ones: the logits learn at their rate, as in the paper.
        norms = tf.cast(tf.sqrt(tf.linalg.diag_part(gram) * gram_scale), tf.float32)
        with tf.GradientTape() as tape:
            weights = self.num_outputs * tf.nn.softmax(self.logits)
            loss = gradient_methods.gradnorm_loss(weights, norms, weighted_losses / initial,
                                                  self.weighting.parameters["alpha"])
        return tf.cast(weights, tf.float64), tape.gradient(loss, [self.logits])

    def after_step(self, weighted_losses, losses_after_update=None):
        self.initial_losses.assign(tf.where(self.steps == 0, weighted_losses, self.initial_losses))
        super().after_step(weighted_losses)


def make_method(weighting: LossWeighting, *, num_outputs: int, seed: int, period_steps: int) -> Method:
    """The run's method, made in the strategy's scope (its variables mirrored), by its description's `computed_by`."""
    module_name, _, name = weighting.description.computed_by.partition(":")
    computed_by = getattr(importlib.import_module(f"mto_tf.core.weighting.{module_name}"), name)
    arguments = dict(num_outputs=num_outputs, seed=seed, period_steps=period_steps)
    if isinstance(computed_by, type) and issubclass(computed_by, Method):
        return computed_by(weighting, **arguments)
    return GramianMethod(weighting, function=computed_by, **arguments)
