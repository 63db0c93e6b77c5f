"""Adaptive methods with outputs absent from a batch: as if those outputs did not exist.

An output with no labelled example in the global batch has a loss of 0 and
a gradient of 0 (a zero row and column of the Gramian). It takes no part
in the step (docs/loss_weighting.md, "Outputs absent from a batch"): its
factor or weight is 0, the present outputs get what the method gives them
alone, and no state follows its unmeasured loss.

The reference for "alone" is the method itself, made for the m present
outputs and run on the reduced problem: the present rows and columns of
the Gramian, the present losses, and, for a method with state, its state
restricted to the present outputs. A run is a chain of single steps, so
checking every step from whatever state the run reached, with whichever
outputs are absent at it, checks every pattern of absences. At each step
an absent output's values must not count: the step is the same, bit for
bit, had its loss and gradient been anything else. What an absent output's
own state does (DWA's periods, FAMO's moments, GradNorm's initial loss,
uncertainty's log-variance) is tested method by method, and a fresh method
with fewer outputs, fed the present outputs' losses only, is checked too.
The method under test runs in a `tf.function` with `present` a tensor (as
in the train step; also on each replica of a MirroredStrategy), the
reference eagerly.

Tolerances: the gradient methods' weights (float64) agree to 1e-10, the
solvers' optimality tolerance (`solvers.KKT_TOLERANCE`); what is seen is
rounding, 1e-15, also where the method on K = 8 outputs uses the active-set
solvers and the reference on 5 the enumeration. Float32 values (loss-based
factors, GradNorm's weights, the methods' state) agree to 1e-6 relative: a
softmax over K entries, the absent ones exactly 0, sums its terms in
another order than one over m (one float32 rounding, 6e-8, is seen).
"""

from __future__ import annotations

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from mto_tf import loss_weighting as catalog
from mto_tf.core import weighting

SEED = 7
ADAPTIVE = [name for name in catalog.METHODS if name != "fixed"]
GRADIENT_METHODS = [name for name in ADAPTIVE if catalog.METHODS[name].uses_gradients]
# Methods with state, or draws seeded by the step: checked over a run of steps.
WITH_STATE = ["uncertainty", "dwa", "rlw", "famo", "gradnorm", "pcgrad"]
PERIOD_STEPS = 2  # DWA's period: its weights move from the third period on, within a few steps.

FLOAT64_ATOL = 1e-10
FLOAT32_RTOL, FLOAT32_ATOL = 1e-6, 1e-7


def _weights_tolerance(name: str) -> dict:
    """Float64 weights from the Gramian; GradNorm's and the loss-based methods' are float32 softmaxes."""
    if catalog.METHODS[name].uses_gradients and name != "gradnorm":
        return dict(rtol=0, atol=FLOAT64_ATOL)
    return dict(rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL)


# Which outputs are present (1) in the global batch. With 8 outputs the solvers take their active-set path; with 5
# present the reference enumerates, with 7 it takes the active-set path too. All present: the last tests below.
PRESENCE = {
    "none present": [0, 0, 0],
    "one present": [0, 1, 0],
    "one of three absent": [1, 0, 1],
    "three of eight absent": [1, 0, 1, 1, 0, 1, 0, 1],
    "one of eight absent": [1, 1, 1, 0, 1, 1, 1, 1],
}


def _make(name: str, k: int) -> weighting.Method:
    return weighting.make_method(catalog.parse(name), num_outputs=k, seed=SEED, period_steps=PERIOD_STEPS)


def _gramian(rng, present: np.ndarray) -> np.ndarray:
    """`J J^T` of conflicting gradients (rows 0 and 1 pull apart), an absent output's row of J zero."""
    k = len(present)
    J = rng.normal(size=(k, max(12, 2 * k)))
    J[1] = -0.8 * J[0] + 0.3 * J[1]
    J[~present] = 0.0
    return J @ J.T


def _losses(rng, present: np.ndarray) -> np.ndarray:
    """Positive weighted losses, 0 for an absent output (no labelled example: its loss is exactly 0)."""
    return np.where(present, rng.uniform(0.5, 2.0, size=len(present)), 0.0).astype(np.float32)


def _embedded(reduced: np.ndarray, present: np.ndarray) -> np.ndarray:
    """The present outputs' values in their places among K, 0 for the absent ones."""
    full = np.zeros(len(present), reduced.dtype)
    full[present] = reduced
    return full


# --- Gradient methods: the weights of one Gramian ----------------------------------------------------------------


@functools.cache
def _weigher(name: str, k: int):
    """A method on K outputs and its `method_weights` in a tf.function: `present` a tensor, one trace for all."""
    method = _make(name, k)
    return method, tf.function(lambda gram, losses, present: weighting.method_weights(method, gram, losses, present))


# The inner loop takes K = 3; CI takes the active-set cases (K = 8) too.
@pytest.mark.parametrize("case", [pytest.param(case, marks=pytest.mark.slow if "eight" in case else ())
                                  for case in PRESENCE])
@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_gradient_methods_weigh_the_present_outputs_as_if_alone(name, case):
    present = np.array(PRESENCE[case], bool)
    k, m = len(present), int(present.sum())
    rng = np.random.default_rng(k)
    method, weigh = _weigher(name, k)
    reduced = _make(name, max(m, 1))
    if name == "gradnorm":  # Learned logits, the same for the present outputs in both.
        method.logits.assign(rng.normal(size=k).astype(np.float32))
        reduced.logits.assign(method.logits.numpy()[present] if m else [0.0])
    losses = _losses(rng, present)
    # Conflicting gradients, and none at all (a Gramian of zeros, read as I / m on the present outputs).
    for gram in (_gramian(rng, present), np.zeros((k, k))):
        weights, own = weigh(tf.constant(gram), tf.constant(losses), tf.constant(present))
        weights = weights.numpy()
        assert np.all(np.isfinite(weights)) and np.all(weights[~present] == 0.0), weights
        if m:
            expected, expected_own = weighting.method_weights(
                reduced, tf.constant(gram[present][:, present]), tf.constant(losses[present]), tf.ones([m], tf.bool))
            np.testing.assert_allclose(weights, _embedded(expected.numpy(), present), **_weights_tolerance(name))
        if name == "gradnorm":  # Its logits' gradient: the reduced problem's, and none for an absent logit.
            own = tf.convert_to_tensor(own[0]).numpy()
            assert np.all(np.isfinite(own)) and np.all(own[~present] == 0.0)
            if m:
                np.testing.assert_allclose(own, _embedded(tf.convert_to_tensor(expected_own[0]).numpy(), present),
                                           rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL)


# --- Every method with state over a run of steps -----------------------------------------------------------------


def _one_step(method: weighting.Method, gram, losses, losses_after_update, present):
    """The method's part of a train step: its factors or weights (and own gradients), then `after_step`."""
    if method.uses_gradients:
        weights, own = weighting.method_weights(method, gram, losses, present)
        own = [tf.convert_to_tensor(gradient) for gradient in own]
    else:
        weights, own = method.loss_factors(losses, present)
    method.after_step(losses, present, losses_after_update=lambda: losses_after_update)
    return weights, own


def _state(method: weighting.Method) -> dict[str, np.ndarray]:
    """Every variable of the method, by its attribute name."""
    return {attribute: np.array(value.numpy()) for attribute, value in vars(method).items()
            if isinstance(value, tf.Variable | keras.Variable)}


def _restore(method: weighting.Method, state: dict[str, np.ndarray]) -> None:
    for attribute, value in state.items():
        getattr(method, attribute).assign(value)


def _restricted_copy(method: weighting.Method, name: str, present: np.ndarray) -> weighting.Method:
    """A method for the present outputs alone, in the state `method` has on them (the step counter shared)."""
    reduced = _make(name, int(present.sum()))
    _restore(reduced, {attribute: value[present] if value.ndim else value
                       for attribute, value in _state(method).items()})
    return reduced


def _step_inputs(rng, present: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A Gramian, the losses, and the losses after the update (FAMO's second look: lower, 0 where absent)."""
    losses = _losses(rng, present)
    return _gramian(rng, present), losses, losses * rng.uniform(0.7, 1.0, size=len(present)).astype(np.float32)


def _as_if_measured(rng, present: np.ndarray, gram, losses, later):
    """The same step with values where the absent outputs have none (had their losses been measured)."""
    k = len(present)
    both = present[:, None] & present[None, :]
    some = rng.uniform(3.0, 5.0, size=k).astype(np.float32)
    return (np.where(both, gram, rng.normal(size=(k, k))), np.where(present, losses, some),
            np.where(present, later, 0.9 * some))


def _check_as_if_alone(name, present, outputs, expected, state, reduced_state):
    """The present outputs' factors or weights, own gradients and state: those of the method on them alone."""
    (weights, own), (expected_weights, expected_own) = outputs, expected
    weights = np.array(weights)
    assert np.all(np.isfinite(weights)) and np.all(weights[~present] == 0.0), weights
    np.testing.assert_allclose(weights[present], expected_weights, **_weights_tolerance(name),
                               err_msg=f"{name}: weights")
    for gradient, expected_gradient in zip(own, expected_own):  # GradNorm's logits, and uncertainty's extra loss.
        gradient = np.array(gradient)
        if gradient.ndim:
            assert np.all(gradient[~present] == 0.0)
            gradient = gradient[present]
        np.testing.assert_allclose(gradient, expected_gradient, rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL, err_msg=name)
    for attribute, value in state.items():
        assert np.all(np.isfinite(value)), (name, attribute)
        np.testing.assert_allclose(value[present] if value.ndim else value, reduced_state[attribute],
                                   rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL, err_msg=f"{name}: {attribute}")


def _train_own_variables(method: weighting.Method, own: list) -> None:
    """What the run's optimizer does with GradNorm's logits' gradient (plain SGD here)."""
    if method.uses_gradients:
        for variable, gradient in zip(method.trainable, own):
            variable.assign_sub(0.5 * np.array(gradient))


@pytest.mark.parametrize("name", WITH_STATE)
def test_each_step_with_any_outputs_absent_is_the_method_on_the_present_ones(name):
    rng = np.random.default_rng(1)
    # Every pattern that matters: none present, one, some, all; an output absent for a whole period and back.
    presence = np.array([[1, 1, 1, 1], [1, 0, 1, 1], [0, 0, 0, 0], [1, 0, 0, 1], [0, 1, 1, 1], [1, 0, 1, 0],
                         [0, 0, 1, 0], [1, 1, 1, 1], [1, 0, 1, 1], [1, 1, 0, 1]], bool)
    method = _make(name, presence.shape[1])
    if name == "uncertainty":  # Learned log-variances, not all 0.
        method.log_variances.assign(rng.normal(size=presence.shape[1]).astype(np.float32))
    step = tf.function(lambda g, l, later, p: _one_step(method, g, l, later, p))
    for present in presence:
        inputs = _step_inputs(rng, present)
        before = _state(method)
        # Nothing of an absent output's loss or gradient counts: the step is the same had they been measured.
        if_measured = step(*map(tf.constant, _as_if_measured(rng, present, *inputs)), tf.constant(present))
        state_if_measured = _state(method)
        _restore(method, before)
        reduced = _restricted_copy(method, name, present) if present.any() else None
        weights, own = step(*map(tf.constant, inputs), tf.constant(present))
        for value, value_if_measured in zip([weights, *own], [if_measured[0], *if_measured[1]]):
            np.testing.assert_array_equal(value.numpy(), value_if_measured.numpy(), err_msg=name)
        for attribute, value in _state(method).items():
            np.testing.assert_array_equal(value, state_if_measured[attribute], err_msg=f"{name}: {attribute}")
        if reduced is None:  # Nothing present: every factor 0, and everything finite.
            assert np.all(weights.numpy() == 0.0) and all(np.all(np.isfinite(v)) for v in _state(method).values())
        else:
            gram, losses, later = inputs
            expected, expected_own = _one_step(
                reduced, tf.constant(gram[present][:, present]), tf.constant(losses[present]),
                tf.constant(later[present]), tf.ones([int(present.sum())], tf.bool))
            _check_as_if_alone(name, present, (weights, own), (expected.numpy(), [g.numpy() for g in expected_own]),
                               _state(method), _state(reduced))
        _train_own_variables(method, own)


@pytest.mark.parametrize("name", WITH_STATE)
def test_a_method_with_outputs_always_absent_runs_as_a_fresh_one_without_them(name):
    rng = np.random.default_rng(2)
    present = np.array([1, 0, 1, 1, 0], bool)
    method, fewer = _make(name, len(present)), _make(name, int(present.sum()))
    step = tf.function(lambda g, l, later, p: _one_step(method, g, l, later, p))
    for _ in range(4 * PERIOD_STEPS):  # Four of DWA's periods: its weights move in the last two.
        gram, losses, later = _step_inputs(rng, present)
        weights, own = step(tf.constant(gram), tf.constant(losses), tf.constant(later), tf.constant(present))
        expected, expected_own = _one_step(fewer, tf.constant(gram[present][:, present]), tf.constant(losses[present]),
                                           tf.constant(later[present]), tf.ones([int(present.sum())], tf.bool))
        _check_as_if_alone(name, present, (weights, own), (expected.numpy(), [g.numpy() for g in expected_own]),
                           _state(method), _state(fewer))
        _train_own_variables(method, own)
        _train_own_variables(fewer, expected_own)


# --- What an absent output's own state does, method by method ----------------------------------------------------


def test_dwa_takes_each_outputs_mean_over_the_steps_that_measured_it():
    # Periods of 2 steps. Output 1 is absent for the whole second period, and at the last step of the third:
    # its third mean is its one measured loss (1.5), and its ratio is over its first period's mean (4).
    method = _make("dwa", 2)
    losses = [[1.0, 4.0], [1.0, 4.0], [2.0, 0.0], [2.0, 0.0], [1.0, 1.5], [1.0, 0.0]]
    presence = [[True, True], [True, True], [True, False], [True, False], [True, True], [True, False]]
    for step_losses, present in zip(losses, presence):
        method.after_step(tf.constant(step_losses), tf.constant(present))
    np.testing.assert_allclose(method.ratios.numpy(), [1.0 / 2.0, 1.5 / 4.0])
    np.testing.assert_array_equal(method.measured_periods.numpy(), [3, 2])
    temperature = catalog.METHODS["dwa"].parameters["temperature"][0]
    r_over_t = np.array([0.5, 0.375]) / temperature
    factors, _ = method.loss_factors(tf.constant([1.0, 1.0]), tf.constant([True, True]))
    np.testing.assert_allclose(factors.numpy(), 2 * np.exp(r_over_t) / np.exp(r_over_t).sum(), rtol=FLOAT32_RTOL)


def test_dwa_with_a_loss_weighted_by_0_gives_finite_weights():
    # A loss weight annealed to 0 (or set to 0): its weighted loss is 0 period after period, 0 / 0 no ratio.
    method = _make("dwa", 2)
    for _ in range(4 * PERIOD_STEPS):
        method.after_step(tf.constant([1.0, 0.0]), tf.constant([True, True]))
    factors, _ = method.loss_factors(tf.constant([1.0, 0.0]), tf.constant([True, True]))
    np.testing.assert_array_equal(method.ratios.numpy(), [1.0, 1.0])
    np.testing.assert_allclose(factors.numpy(), [1.0, 1.0], rtol=FLOAT32_RTOL)


def test_famo_leaves_an_absent_outputs_logit_and_moments_and_counts_its_own_adam_steps():
    method = _make("famo", 3)
    losses, later = tf.constant([1.0, 2.0, 3.0]), tf.constant([0.5, 1.9, 2.0])
    method.after_step(losses * [1, 0, 1], tf.constant([True, False, True]),
                      losses_after_update=lambda: later * [1, 0, 1])
    after_first = _state(method)
    for attribute in ("logits", "first_moment", "second_moment", "measured_steps"):
        assert after_first[attribute][1] == 0.0 and np.all(after_first[attribute][[0, 2]] != 0.0), attribute
    method.after_step(losses, tf.constant([True, True, True]), losses_after_update=lambda: later)
    np.testing.assert_array_equal(method.measured_steps.numpy(), [2, 1, 2])
    # Output 1's first Adam step, at the run's second: by its own count (t = 1) Adam's first step of a
    # coordinate is the learning rate times the sign of its gradient, whatever the gradient's size.
    learning_rate = catalog.METHODS["famo"].parameters["learning_rate"][0]
    assert abs(method.logits.numpy()[1]) == pytest.approx(learning_rate, rel=1e-5)


def test_aligned_mtl_counts_the_present_gradients_in_its_rank_tolerance():
    # Five present gradients whose smallest eigenvalue is 8e-7 of the largest: above the rounding of a float32
    # Gramian of 5 gradients (5 eps = 6.0e-7), below that of 8 (9.5e-7). It is part of their rank, absent outputs
    # or not: the weights are those of the five alone.
    present = np.array(PRESENCE["three of eight absent"], bool)
    vectors, _ = np.linalg.qr(np.random.default_rng(4).normal(size=(5, 5)))
    reduced_gram = vectors @ np.diag([1.0, 0.6, 0.3, 0.1, 8e-7]) @ vectors.T
    gram = np.zeros((8, 8))
    gram[np.ix_(present, present)] = reduced_gram
    weights, _ = weighting.method_weights(_make("aligned_mtl", 8), tf.constant(gram), tf.ones([8]),
                                          tf.constant(present))
    expected, _ = weighting.method_weights(_make("aligned_mtl", 5), tf.constant(reduced_gram), tf.ones([5]),
                                           tf.ones([5], tf.bool))
    np.testing.assert_allclose(weights.numpy(), _embedded(expected.numpy(), present), rtol=0, atol=FLOAT64_ATOL)


def test_gradnorm_takes_an_outputs_first_measured_loss_as_its_initial_loss():
    method = _make("gradnorm", 2)
    method.after_step(tf.constant([3.0, 0.0]), tf.constant([True, False]))
    method.after_step(tf.constant([2.0, 5.0]), tf.constant([True, True]))
    method.after_step(tf.constant([1.0, 4.0]), tf.constant([True, True]))
    np.testing.assert_array_equal(method.initial_losses.numpy(), [3.0, 5.0])


def test_uncertainty_gives_an_absent_outputs_log_variance_no_gradient():
    method = _make("uncertainty", 3)
    method.log_variances.assign([0.2, -0.1, 0.4])
    losses, present = tf.constant([1.0, 0.0, 2.0]), tf.constant([True, False, True])
    with tf.GradientTape() as tape:
        factors, extra = method.loss_factors(losses, present)
        total = tf.reduce_sum(factors * losses) + tf.add_n(extra)
    gradient = tape.gradient(total, method.log_variances).numpy()
    s = np.array([0.2, -0.1, 0.4])
    np.testing.assert_allclose(gradient, np.where([1, 0, 1], 0.5 - np.exp(-s) / 2 * [1.0, 0.0, 2.0], 0.0),
                               rtol=FLOAT32_RTOL)


# --- All present: what the methods gave before `present` existed --------------------------------------------------

# Recorded from the code at commit b19091f (before `present`), on the inputs below, to 17 digits. Here the new code
# gives them bit for bit; the tolerances leave room for another CPU's rounding only: 1e-12 for float64 weights, and
# one float32 rounding for factors.
GOLDEN_STEPS = 7  # Loss-based methods: the factors of the seventh step (DWA's from its ratios, FAMO's learned).
TODAYS_WEIGHTS = {  # (method, K): the weights a (then GradNorm's logits' gradient).
    ("gradnorm", 3): [0.5856888890266418, 2.183199882507324, 0.23111101984977722, -3.5195932388305664,
        4.711526393890381, -1.1919337511062622],
    ("pcgrad", 3): [2.1764046734654943, 2.0798013429036857, 1.033789784997547],
    ("mgda", 3): [0.4640058291486462, 0.5046996779353888, 0.031294492915965005],
    ("cagrad", 3): [0.8683714482743521, 0.854912644649072, 0.3333333333333333],
    ("imtl", 3): [0.46516428503557905, 0.5061743515786801, 0.02866136338574088],
    ("aligned_mtl", 3): [0.9842379221639049, 1.0323456689450805, 0.22217586765516317],
    ("upgrad", 3): [0.7704459815648164, 0.7391388130779293, 0.3499090078414133],
    ("mgda", 8): [0.37098708951604326, 0.45642094400241595, 0.08130062142943137, 0.053379094052829514,
        0.002976875623745569, 0.018021923765918588, 0.016913451609615868, 0.0],
    ("cagrad", 8): [0.125, 0.24985763357979046, 0.125, 0.125, 0.125, 0.125, 0.125, 0.125],
    ("upgrad", 8): [0.2395492949251089, 0.4722239419717118, 0.21567403154048803, 0.2014148236405442,
        0.1565229159916712, 0.22290563547152653, 0.263816820787121, 0.23831750164797333],
}
TODAYS_FACTORS = {  # Each factor at the seventh step (then uncertainty's log-variance term).
    "uncertainty": [0.40936538577079773, 0.5525854825973511, 0.3351600170135498, 0.25],
    "dwa": [0.9763181805610657, 1.0204523801803589, 1.0032293796539307],
    "rlw": [0.33574414253234863, 0.5377941727638245, 0.1264617145061493],
    "famo": [0.42675304412841797, 0.1937822550535202, 0.379464715719223],
}


def _todays_gradient_inputs(k: int):
    rng = np.random.default_rng(100 + k)
    return _gramian(rng, np.ones(k, bool)), _losses(rng, np.ones(k, bool)), rng.normal(size=k).astype(np.float32)


def _todays_loss_inputs(k: int):
    rng = np.random.default_rng(200 + k)
    return [(_losses(rng, np.ones(k, bool)), rng.uniform(0.7, 1.0, size=k).astype(np.float32))
            for _ in range(GOLDEN_STEPS)]


@pytest.mark.parametrize("name, k", list(TODAYS_WEIGHTS))
def test_all_present_gives_the_weights_of_before(name, k):
    gram, losses, logits = _todays_gradient_inputs(k)
    method, weigh = _weigher(name, k)
    if name == "gradnorm":
        method.logits.assign(logits)
    weights, own = weigh(tf.constant(gram), tf.constant(losses), tf.ones([k], tf.bool))
    expected = TODAYS_WEIGHTS[name, k]
    np.testing.assert_allclose(weights.numpy(), expected[:k], rtol=1e-12, atol=0)
    if name == "gradnorm":  # And its logits' gradient.
        np.testing.assert_allclose(tf.convert_to_tensor(own[0]).numpy(), expected[k:], rtol=FLOAT32_RTOL)


@pytest.mark.parametrize("name", list(TODAYS_FACTORS))
def test_all_present_gives_the_factors_of_before(name):
    k = 3
    method = _make(name, k)
    if name == "uncertainty":
        method.log_variances.assign([0.2, -0.1, 0.4])
    step = tf.function(lambda l, later, p: _one_step(method, None, l, later, p))
    for losses, fall in _todays_loss_inputs(k):
        factors, extra = step(tf.constant(losses), tf.constant(losses * fall), tf.ones([k], tf.bool))
    seen = [*factors.numpy(), *(float(term) for term in extra)]  # Uncertainty's log-variance term too.
    np.testing.assert_allclose(seen, TODAYS_FACTORS[name], rtol=FLOAT32_RTOL, atol=0)


# --- On each replica ---------------------------------------------------------------------------------------------


@pytest.mark.slow  # The inner loop has the whole runs of test_weighting_with_unlabelled_batches.py.
@pytest.mark.parametrize("name", ["upgrad", "famo"])
def test_each_replica_computes_the_one_device_weights_with_outputs_absent(name, mirrored_strategy):
    # The train step asks for the factors and weights on every replica (a replica context), from global values.
    present = np.array(PRESENCE["three of eight absent"], bool)
    rng = np.random.default_rng(3)
    gram, losses = tf.constant(_gramian(rng, present)), tf.constant(_losses(rng, present))
    with mirrored_strategy.scope():
        method = _make(name, len(present))

    @tf.function
    def on_each_replica(present):
        def weights():
            if method.uses_gradients:
                return weighting.method_weights(method, gram, losses, present)[0]
            return method.loss_factors(losses, present)[0]
        return mirrored_strategy.experimental_local_results(mirrored_strategy.run(weights))

    one_device = _one_step(_make(name, len(present)), gram, losses, losses, tf.constant(present))[0].numpy()
    for replica in on_each_replica(tf.constant(present)):
        np.testing.assert_array_equal(replica.numpy(), one_device)
