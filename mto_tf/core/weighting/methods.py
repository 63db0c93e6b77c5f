"""Each method's state and its part of the step: the loss factors, or the weights of the outputs' gradients.

A method is a `tf.Module` (its variables go into every checkpoint), made
inside the strategy's scope from its description in
`mto_tf/loss_weighting.py` (`make_method`). The step calls, on each replica:

- `loss_factors(weighted_losses, present)` inside the tape: each output's
  factor (loss-based methods; gradient methods return ones);
- `gradient_weights(gram, weighted_losses, present, gram_scale=...)` after
  the per-output gradients (gradient methods): `a` and the gradients of its
  own trainable variables. `gram` is the Gramian divided by its trace
  `gram_scale` (`adaptive_step.method_weights` normalizes it, once, for all);

and once per step, across replicas, `after_step(weighted_losses, present,
...)`. `weighted_losses` are the global values of `w_k L_k` (summed over
replicas), so every replica computes the same factors and weights.

`present` `(K,)` bool: whether each output has a labelled example in the
global batch (the same on every replica). An absent output's loss and
gradient are exactly 0, and it takes no part in the step: its factor or
weight is 0, the present outputs get what the method gives them alone (as
if the others did not exist), and no state follows a loss that was not
measured. All present, every method computes what it computed before
`present` existed, operation for operation.
"""

from __future__ import annotations

import importlib

import keras
import tensorflow as tf

from mto_tf.core.weighting import gradient_methods, solvers
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

    def loss_factors(self, weighted_losses: tf.Tensor, present: tf.Tensor) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """Each output's factor (0 if absent), and extra loss terms (divided by the replicas, as regularization is)."""
        return tf.cast(present, tf.float32), []

    def gradient_weights(self, gram: tf.Tensor, weighted_losses: tf.Tensor, present: tf.Tensor, *,
                         gram_scale: tf.Tensor) -> tuple[tf.Tensor, list]:
        """`a` (0 for an absent output, whose row and column of `gram` are zeros) and the own variables' gradients."""
        raise NotImplementedError  # Gradient methods only.

    def after_step(self, weighted_losses: tf.Tensor, present: tf.Tensor, losses_after_update=None) -> None:
        """Once per step, across replicas, after the update: state that follows the (present outputs') losses."""
        self.steps.assign_add(1)


def _softmax_of_present(logits: tf.Tensor, present: tf.Tensor) -> tf.Tensor:
    """The softmax of the present outputs' logits alone, 0 for the others (all 0 if none is present)."""
    # The lowest float, not -inf: exp gives exactly 0, and no output present gives no 0 / 0.
    masked = tf.where(present, logits, tf.as_dtype(logits.dtype).min)
    return tf.where(present, tf.nn.softmax(masked), 0.0)



class Uncertainty(Method):
    """Kendall et al. 2018: total `sum_k exp(-s_k) L_k / 2 + s_k / 2`, `s_k` trained by the run's optimizer.

    An absent output's terms are left out, both: its `s_k` gets no gradient.
    """

    def __init__(self, weighting, **kwargs):
        super().__init__(weighting, **kwargs)
        self.log_variances = keras.Variable(tf.zeros([self.num_outputs]), name="log_variances")
        self.trainable = [self.log_variances]

    def loss_factors(self, weighted_losses, present):
        factors = tf.where(present, tf.exp(-self.log_variances) / 2.0, 0.0)
        return factors, [tf.reduce_sum(tf.where(present, self.log_variances, 0.0)) / 2.0]


class DynamicWeightAverage(Method):
    """Liu et al. 2019: `K softmax(r / T)`, r_k the ratio of output k's mean loss over the last two periods.

    A period is a pass over the data (with --epochs) or a logging window;
    the weights are 1 for the first two periods. Each output's mean is over
    the steps that measured it (it was present), and a period that never
    measured it leaves its last mean and ratio as they were; its ratio is
    its last two measured periods'. The weights of a step are `m softmax(r
    / T)` over its m present outputs (r = 1 for one without a ratio yet),
    and exactly 1 until a present output has a ratio.
    """

    def __init__(self, weighting, **kwargs):
        super().__init__(weighting, **kwargs)
        k = self.num_outputs
        self.ratios = tf.Variable(tf.ones([k]), trainable=False, name="ratios")
        self.period_sums = tf.Variable(tf.zeros([k]), trainable=False, name="period_sums")
        self.period_counts = tf.Variable(tf.zeros([k]), trainable=False, name="period_counts")  # Measured steps.
        self.last_means = tf.Variable(tf.zeros([k]), trainable=False, name="last_means")
        self.measured_periods = tf.Variable(tf.zeros([k], tf.int64), trainable=False, name="measured_periods")

    def loss_factors(self, weighted_losses, present):
        temperature = self.weighting.parameters["temperature"]
        weights = solvers.present_count(present, tf.float32) * _softmax_of_present(self.ratios / temperature, present)
        has_ratio = present & (self.measured_periods >= 2)
        return tf.where(tf.reduce_any(has_ratio), weights, tf.cast(present, tf.float32)), []

    def after_step(self, weighted_losses, present, losses_after_update=None):
        super().after_step(weighted_losses, present)
        sums = self.period_sums + tf.where(present, weighted_losses, 0.0)
        counts = self.period_counts + tf.cast(present, tf.float32)
        ended = tf.equal(self.steps % self.period_steps, 0)
        measured = ended & (counts > 0)  # The outputs whose mean this period gives.
        means = sums / tf.maximum(counts, 1.0)
        # The ratio needs two measured periods' means: a weight changes from an output's third period on. A
        # last mean of 0 (its loss weight annealed to 0) gives no ratio: 1, as for a loss that did not change.
        had_loss = self.last_means > 0
        ratios = tf.where(had_loss, means / tf.where(had_loss, self.last_means, 1.0), 1.0)
        self.ratios.assign(tf.where(measured & (self.measured_periods >= 1), ratios, self.ratios))
        self.last_means.assign(tf.where(measured, means, self.last_means))
        self.measured_periods.assign_add(tf.cast(measured, tf.int64))
        self.period_sums.assign(tf.where(ended, tf.zeros_like(sums), sums))
        self.period_counts.assign(tf.where(ended, tf.zeros_like(counts), counts))


class RandomLossWeighting(Method):
    """Lin et al. 2022: `softmax` of K standard normal draws, drawn again every step.

    The m present outputs take the first m draws, in order: the draws of a
    run with only them (a stateless draw of m numbers is the first m of K).
    """

    def loss_factors(self, weighted_losses, present):
        draws = tf.random.stateless_normal([self.num_outputs], seed=self.stateless_seed())
        place = tf.cumsum(tf.cast(present, tf.int32), exclusive=True)  # A present output's index among the present.
        return _softmax_of_present(tf.gather(draws, place), present), []


class FastAdaptiveMultitask(Method):
    """Liu et al. 2023 (FAMO): the loss `sum_k z_k log L_k / c`, z = softmax(xi); xi follows the losses' decrease.

    Its gradient is `sum_k (z_k / (c L_k)) grad L_k`, c = sum_k z_k / L_k:
    factors `z_k / (c L_k)`, held constant (they sum to 1). After the update
    the losses on the same batch, at the new weights, give
    `delta_k = log L_k(before) - log L_k(after)`, and xi takes one Adam step
    on `J_softmax^T delta + decay * xi` (the paper's Algorithm 2: PyTorch's
    Adam with L2 weight decay). With absent outputs, z is the softmax of the
    present ones' logits, and only those take the Adam step; Adam's bias
    correction counts each logit's own steps.
    """

    _EPSILON = 1e-8  # The paper's, added to each loss (its lower bound is 0).
    _BETA_1, _BETA_2, _ADAM_EPSILON = 0.9, 0.999, 1e-8  # PyTorch's Adam defaults.

    def __init__(self, weighting, **kwargs):
        super().__init__(weighting, **kwargs)
        k = self.num_outputs
        self.logits = tf.Variable(tf.zeros([k]), trainable=False, name="logits")
        self.first_moment = tf.Variable(tf.zeros([k]), trainable=False, name="first_moment")
        self.second_moment = tf.Variable(tf.zeros([k]), trainable=False, name="second_moment")
        self.measured_steps = tf.Variable(tf.zeros([k]), trainable=False, name="measured_steps")  # Adam's t, each.

    def loss_factors(self, weighted_losses, present):
        z = _softmax_of_present(self.logits, present)
        shifted = weighted_losses + self._EPSILON
        c = tf.reduce_sum(z / shifted)
        return tf.math.divide_no_nan(z, c * shifted), []  # No output present: z = 0 and c = 0.

    def after_step(self, weighted_losses, present, losses_after_update=None):
        super().after_step(weighted_losses, present)
        delta = tf.math.log(weighted_losses + self._EPSILON) - tf.math.log(losses_after_update() + self._EPSILON)
        z = _softmax_of_present(self.logits, present)
        gradient = z * (delta - tf.reduce_sum(z * delta))  # J_softmax^T delta (the Jacobian is symmetric).
        gradient += self.weighting.parameters["decay"] * self.logits
        self.first_moment.assign(tf.where(
            present, self._BETA_1 * self.first_moment + (1 - self._BETA_1) * gradient, self.first_moment))
        self.second_moment.assign(tf.where(
            present, self._BETA_2 * self.second_moment + (1 - self._BETA_2) * gradient ** 2, self.second_moment))
        self.measured_steps.assign_add(tf.cast(present, tf.float32))
        t = self.measured_steps
        # An output never measured has no moments (0): no 0 / 0 for it.
        first = tf.math.divide_no_nan(self.first_moment, 1 - self._BETA_1 ** t)
        second = tf.math.divide_no_nan(self.second_moment, 1 - self._BETA_2 ** t)
        step = self.weighting.parameters["learning_rate"] * first / (tf.sqrt(second) + self._ADAM_EPSILON)
        self.logits.assign_sub(tf.where(present, step, 0.0))


class GramianMethod(Method):
    """A gradient method that is a function of the Gramian alone: `function(G, **hyper-parameters)`."""

    def __init__(self, weighting, *, function, **kwargs):
        super().__init__(weighting, **kwargs)
        self._function = function

    def gradient_weights(self, gram, weighted_losses, present, *, gram_scale):
        return self._function(gram, present, **self.weighting.parameters), []


class ProjectingConflictingGradients(Method):
    """Yu et al. 2020 (PCGrad): the Gramian, and each output's own random order of the others, drawn each step."""

    def gradient_weights(self, gram, weighted_losses, present, *, gram_scale):
        orders = gradient_methods.random_orders(present, self.stateless_seed())
        return gradient_methods.pcgrad(gram, orders, present), []


class GradNorm(Method):
    """Chen et al. 2018: weights `K softmax(logits)`; the logits trained (by the run's optimizer) on GradNorm's loss.

    The losses of the first step are the initial losses; `|g_k|` is the
    norm of output k's (weighted) gradient of the shared weights. With
    absent outputs: the weights are `m softmax` of the present outputs'
    logits, GradNorm's loss is over the present outputs (an absent logit
    gets no gradient), and an output's initial loss is its first measured one.
    """

    def __init__(self, weighting, **kwargs):
        super().__init__(weighting, **kwargs)
        k = self.num_outputs
        self.logits = keras.Variable(tf.zeros([k]), name="logits")
        self.trainable = [self.logits]
        self.initial_losses = tf.Variable(tf.ones([k]), trainable=False, name="initial_losses")
        self.measured_steps = tf.Variable(tf.zeros([k], tf.int64), trainable=False, name="measured_steps")

    def gradient_weights(self, gram, weighted_losses, present, *, gram_scale):
        # Measured for the first time: this loss is the initial one.
        initial = tf.where(self.measured_steps > 0, self.initial_losses, weighted_losses)
        # Absent, and never measured: 0 / 0; its ratio takes no part (0).
        loss_ratios = tf.math.divide_no_nan(weighted_losses, initial)
        # The gradients' own norms, not the normalized ones: the logits learn at their rate, as in the paper.
        norms = tf.cast(tf.sqrt(tf.linalg.diag_part(gram) * gram_scale), tf.float32)
        with tf.GradientTape() as tape:
            weights = solvers.present_count(present, tf.float32) * _softmax_of_present(self.logits, present)
            loss = gradient_methods.gradnorm_loss(weights, norms, loss_ratios, self.weighting.parameters["alpha"],
                                                  present)
        return tf.cast(weights, tf.float64), tape.gradient(loss, [self.logits])

    def after_step(self, weighted_losses, present, losses_after_update=None):
        first_measured = present & (self.measured_steps == 0)
        self.initial_losses.assign(tf.where(first_measured, weighted_losses, self.initial_losses))
        self.measured_steps.assign_add(tf.cast(present, tf.int64))
        super().after_step(weighted_losses, present)


def make_method(weighting: LossWeighting, *, num_outputs: int, seed: int, period_steps: int) -> Method:
    """The run's method, made in the strategy's scope (its variables mirrored), by its description's `computed_by`."""
    module_name, _, name = weighting.description.computed_by.partition(":")
    computed_by = getattr(importlib.import_module(f"mto_tf.core.weighting.{module_name}"), name)
    arguments = dict(num_outputs=num_outputs, seed=seed, period_steps=period_steps)
    if isinstance(computed_by, type) and issubclass(computed_by, Method):
        return computed_by(weighting, **arguments)
    return GramianMethod(weighting, function=computed_by, **arguments)
