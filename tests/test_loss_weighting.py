"""`--loss_weighting`: every method against an independent NumPy implementation of its paper's formula.

The model is small enough to differentiate by hand: a shared linear layer
`W` (the trunk) and one linear head per output, squared error per output:

    y_k = x W v_k,    L_k = mean_n (y_k - t_k)^2,
    dL_k/dW = 2/n x^T r_k v_k^T,    dL_k/dv_k = 2/n (x W)^T r_k,    r_k = y_k - t_k.

Each NumPy reference below is written from the paper (in float64, not
calling mto_tf); mto_tf trains the same model with SGD from the same
weights, and the weights after a few steps must agree.
"""

from __future__ import annotations

import itertools
import re
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import run_config
from mto_tf import TrainConfig, train
from mto_tf import loss_weighting as catalog
from mto_tf.core import weighting
from mto_tf.core.weighting import gradient_methods, gramian
from mto_tf.errors import ConfigError

N, P, H = 16, 3, 4  # Examples (one full batch), input width, trunk width.
OUTPUTS = ("first", "second")  # Sorted, as Keras orders a dict model's outputs.
USER_WEIGHTS = {"first": 1.0, "second": 0.5}  # --loss_weights scale each loss before any method sees it.
LEARNING_RATE = 0.1
STEPS = 3
SEED = 7
# float32 training against a float64 reference over a few steps: rounding only.
# The exact solvers and the closed forms agree to far better than this.
WEIGHT_ATOL = 2e-5


def _initial_weights():
    rng = np.random.default_rng(3)
    return {"trunk": rng.normal(size=(P, H)) * 0.5,
            "first": rng.normal(size=(H, 1)) * 0.5, "second": rng.normal(size=(H, 1)) * 0.5}


def _data(scale=1.0):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(N, P)).astype(np.float32)
    # Targets that pull the trunk apart: the two outputs' gradients of W conflict.
    data = {"features": x, "first": (x @ [[1.0], [-2.0], [0.5]]).astype(np.float32),
            "second": (-3.0 * x @ [[1.0], [-1.5], [0.5]] + 1.0).astype(np.float32)}
    return {key: (scale * value).astype(np.float32) for key, value in data.items()}


def build_linear_model():
    """The hand-differentiable model, from `_initial_weights()`."""
    initial = _initial_weights()
    features = keras.Input((P,), name="features")
    trunk = keras.layers.Dense(H, use_bias=False, name="trunk",
                               kernel_initializer=keras.initializers.Constant(initial["trunk"]))(features)
    outputs = {name: keras.layers.Dense(1, use_bias=False, name=f"{name}_head",
                                        kernel_initializer=keras.initializers.Constant(initial[name]))(trunk)
               for name in OUTPUTS}
    return keras.Model(features, outputs, name="linear")


def _config(tmp_path, weighting, data=None, **overrides) -> TrainConfig:
    tmp_path.mkdir(parents=True, exist_ok=True)
    np.savez(tmp_path / "data.npz", **(data or _data()))
    settings = dict(model=build_linear_model, dataset=f"npz:{tmp_path / 'data.npz'}", batch_size=N,
                    train_steps=STEPS, losses={name: "mse" for name in OUTPUTS}, loss_weights=USER_WEIGHTS,
                    metrics={}, loss_weighting=weighting, seed=SEED, learning_rate=LEARNING_RATE,
                    checkpoint_every=STEPS, progress="quiet")
    settings.update(overrides)
    return run_config(tmp_path, **settings)


def _trained(config, strategy=None) -> tuple[dict[str, np.ndarray], list[dict]]:
    result = train(config, strategy=strategy)
    weights = {layer: result.model.get_layer(layer).kernel.numpy() for layer in ("trunk", "first_head", "second_head")}
    return weights, result.history


# --- The NumPy side: gradients by hand, and each paper's formula --------------------------------------------------


def _losses_and_gradients(weights, data):
    """Each output's weighted loss w_k L_k, its gradient of W (flattened) and of its own head."""
    x = data["features"].astype(np.float64)
    hidden = x @ weights["trunk"]
    losses, trunk_gradients, head_gradients = [], [], []
    for name in OUTPUTS:
        w = USER_WEIGHTS[name]
        residual = hidden @ weights[name] - data[name]
        losses.append(w * np.mean(residual ** 2))
        trunk_gradients.append((w * 2 / N * x.T @ residual @ weights[name].T).ravel())
        head_gradients.append(w * 2 / N * hidden.T @ residual)
    return np.array(losses), np.stack(trunk_gradients), head_gradients


def _sgd(weights, trunk_direction, head_gradients):
    updated = {"trunk": weights["trunk"] - LEARNING_RATE * trunk_direction.reshape(P, H)}
    for name, gradient in zip(OUTPUTS, head_gradients):
        updated[name] = weights[name] - LEARNING_RATE * gradient
    return updated


def numpy_mgda(J, state):
    """Sener and Koltun 2018, Algorithm 1 for two tasks: gamma = clip((g2 - g1).g2 / |g1 - g2|^2, 0, 1)."""
    g1, g2 = J
    gamma = np.clip((g2 - g1) @ g2 / np.sum((g1 - g2) ** 2), 0.0, 1.0)
    return np.array([gamma, 1 - gamma])


def numpy_pcgrad(J, state):
    """Yu et al. 2020, Algorithm 1 (with two tasks the order of 'the others' is that one)."""
    g1, g2 = J
    p1 = g1 - min(g1 @ g2, 0.0) / (g2 @ g2) * g2
    p2 = g2 - min(g2 @ g1, 0.0) / (g1 @ g1) * g1
    return np.linalg.lstsq(J.T, p1 + p2, rcond=None)[0]  # As weights of J's rows.


def numpy_cagrad(J, state, c=0.5):
    """Liu et al. 2021, Algorithm 1: minimise over the simplex by golden-section search (convex in w)."""
    g0 = J.mean(axis=0)
    phi_sqrt = c * np.linalg.norm(g0)

    def objective(t):
        gw = t * J[0] + (1 - t) * J[1]
        return gw @ g0 + phi_sqrt * np.linalg.norm(gw)

    low, high = 0.0, 1.0
    ratio = (np.sqrt(5) - 1) / 2
    for _ in range(200):
        a, b = high - ratio * (high - low), low + ratio * (high - low)
        low, high = (low, b) if objective(a) < objective(b) else (a, high)
    t = (low + high) / 2
    gw = t * J[0] + (1 - t) * J[1]
    return np.array([0.5, 0.5]) + phi_sqrt / np.linalg.norm(gw) * np.array([t, 1 - t])


def numpy_imtl(J, state):
    """Liu et al. 2021, IMTL-G: alpha_2 = g1 U^T (D U^T)^-1, D = g1 - g2, U = u1 - u2."""
    g1, g2 = J
    u = (g1 / np.linalg.norm(g1)) - (g2 / np.linalg.norm(g2))
    alpha_2 = (g1 @ u) / ((g1 - g2) @ u)
    return np.array([1 - alpha_2, alpha_2])


def numpy_aligned_mtl(J, state):
    """Senushkin et al. 2023: J = U S V^T -> sigma_min U V^T; the update is its rows summed (from an SVD of J)."""
    u, s, vt = np.linalg.svd(J, full_matrices=False)
    aligned = s.min() * u @ vt
    return np.linalg.lstsq(J.T, aligned.sum(axis=0), rcond=None)[0]


def _project_onto_dual_cone(J, y):
    """argmin |x - y| s.t. J x >= 0, in the weights' space R^n: over every set of active constraints."""
    best = None
    for size in range(len(J) + 1):
        for active in itertools.combinations(range(len(J)), size):
            x = y.copy()
            if active:
                rows = J[list(active)]
                x = y - rows.T @ np.linalg.solve(rows @ rows.T, rows @ y)
            if np.all(J @ x >= -1e-10) and (best is None or np.linalg.norm(x - y) < np.linalg.norm(best - y)):
                best = x
    return best


def numpy_upgrad(J, state):
    """Quinton and Rey 2024: the mean of the rows, each projected onto the dual cone {x : J x >= 0}."""
    update = np.mean([_project_onto_dual_cone(J, g) for g in J], axis=0)
    return np.linalg.lstsq(J.T, update, rcond=None)[0]


GRAMIAN_REFERENCES = {"mgda": numpy_mgda, "pcgrad": numpy_pcgrad, "cagrad": numpy_cagrad, "imtl": numpy_imtl,
                      "aligned_mtl": numpy_aligned_mtl, "upgrad": numpy_upgrad}


def numpy_run(name, steps=STEPS, period_steps=1, data_scale=1.0):
    """The run by hand: the weights after `steps` SGD steps, and each step's factors or gradient weights."""
    weights, data = _initial_weights(), _data(data_scale)
    k = len(OUTPUTS)
    state = {"log_variances": np.zeros(k), "logits": np.zeros(k), "m": np.zeros(k), "v": np.zeros(k),
             "dwa": np.ones(k), "sums": np.zeros(k), "last": None, "periods": 0, "initial": None}
    factors_seen = []
    for step in range(steps):
        losses, J, heads = _losses_and_gradients(weights, data)
        if name in GRAMIAN_REFERENCES:
            a = GRAMIAN_REFERENCES[name](J, state)
            weights = _sgd(weights, a @ J, heads)  # Heads: their own gradient, as with fixed weights.
        elif name == "gradnorm":
            # Chen et al. 2018: weights K softmax(logits); L_grad = sum |w_i |g_i| - mean(w|g|) r_i^alpha|.
            if state["initial"] is None:
                state["initial"] = losses
            soft = np.exp(state["logits"]) / np.exp(state["logits"]).sum()
            a = k * soft
            norms = np.linalg.norm(J, axis=1)
            ratios = losses / state["initial"]
            target = np.mean(a * norms) * (ratios / ratios.mean()) ** 1.5
            d_loss_d_a = np.sign(a * norms - target) * norms
            d_a_d_logits = k * (np.diag(soft) - np.outer(soft, soft))
            weights = _sgd(weights, a @ J, heads)
            state["logits"] = state["logits"] - LEARNING_RATE * d_a_d_logits.T @ d_loss_d_a
        else:  # Loss-based: one gradient of sum_k factor_k w_k L_k.
            if name == "uncertainty":  # Kendall et al. 2018: sum exp(-s) L / 2 + s / 2.
                a = np.exp(-state["log_variances"]) / 2
                log_variance_gradient = -a * losses + 0.5
            elif name == "dwa":
                a = state["dwa"].copy()
            elif name == "rlw":  # Lin et al. 2022: softmax of standard normal draws (TensorFlow's stateless draw).
                draws = tf.random.stateless_normal([k], seed=tf.constant([SEED, step], tf.int64)).numpy()
                a = np.exp(draws) / np.exp(draws).sum()
            elif name == "famo":  # Liu et al. 2023: z_k / (c L_k), c = sum z / L.
                z = np.exp(state["logits"]) / np.exp(state["logits"]).sum()
                shifted = losses + 1e-8
                a = z / (np.sum(z / shifted) * shifted)
            else:
                raise AssertionError(name)
            weights = _sgd(weights, a @ J, [f * g for f, g in zip(a, heads)])
            if name == "uncertainty":
                state["log_variances"] = state["log_variances"] - LEARNING_RATE * log_variance_gradient
            elif name == "dwa":  # Liu et al. 2019: K softmax(r / T), r = last period's mean / the one before.
                state["sums"] = state["sums"] + losses
                if (step + 1) % period_steps == 0:
                    means = state["sums"] / period_steps
                    if state["last"] is not None:
                        r = means / state["last"] / 2.0
                        state["dwa"] = k * np.exp(r) / np.exp(r).sum()
                    state["last"], state["sums"] = means, np.zeros(k)
            elif name == "famo":  # Algorithm 2: delta of log losses on the same batch; Adam (L2 decay 1e-3).
                after, _, _ = _losses_and_gradients(weights, data)
                delta = np.log(losses + 1e-8) - np.log(after + 1e-8)
                gradient = z * (delta - z @ delta) + 1e-3 * state["logits"]
                state["m"] = 0.9 * state["m"] + 0.1 * gradient
                state["v"] = 0.999 * state["v"] + 0.001 * gradient ** 2
                m_hat, v_hat = state["m"] / (1 - 0.9 ** (step + 1)), state["v"] / (1 - 0.999 ** (step + 1))
                state["logits"] = state["logits"] - 0.025 * m_hat / (np.sqrt(v_hat) + 1e-8)
        factors_seen.append(a)
    return weights, np.array(factors_seen), state


ADAPTIVE = [name for name in catalog.METHODS if name != "fixed"]


@pytest.mark.parametrize("name", ADAPTIVE)
def test_each_method_equals_its_papers_formula_in_numpy(tmp_path, name):
    trained, history = _trained(_config(tmp_path, name))
    expected, factors, state = numpy_run(name)
    for layer, reference in (("trunk", "trunk"), ("first_head", "first"), ("second_head", "second")):
        np.testing.assert_allclose(trained[layer], expected[reference], atol=WEIGHT_ATOL, err_msg=layer)
    # Each step's factors (one step per logging window here), as logged.
    logged = np.array([[record[f"loss_weight/{output}"] for output in OUTPUTS] for record in history
                       if "loss_weight/first" in record])
    np.testing.assert_allclose(logged, factors, rtol=1e-5, atol=1e-6)
    # Learned state is in the checkpoint (the final one is at the last step).
    checkpoint = tf.train.load_checkpoint(str(tmp_path / "run" / "checkpoints"))
    saved = {key.split("/")[1]: checkpoint.get_tensor(key) for key in checkpoint.get_variable_to_shape_map()
             if key.startswith("loss_weighting/") and "OPTIMIZER" not in key}
    if name == "uncertainty":
        np.testing.assert_allclose(saved["log_variances"], state["log_variances"], atol=1e-6)
    if name in ("gradnorm", "famo"):
        np.testing.assert_allclose(saved["logits"], state["logits"], atol=1e-6)
    assert saved["steps"] == STEPS


def test_dwa_over_several_periods(tmp_path):
    # Periods of 2 steps (--log_every): weights 1 for two periods, then from the ratio of their means.
    trained, history = _trained(_config(tmp_path, "dwa", train_steps=8, log_every=2, checkpoint_every=8))
    expected, factors, _ = numpy_run("dwa", steps=8, period_steps=2)
    np.testing.assert_allclose(trained["trunk"], expected["trunk"], atol=WEIGHT_ATOL)
    logged = np.array([[record[f"loss_weight/{output}"] for output in OUTPUTS] for record in history])
    np.testing.assert_allclose(logged, factors.reshape(4, 2, 2).mean(axis=1), rtol=1e-5)
    assert np.all(logged[:2] == 1.0) and not np.allclose(logged[2], 1.0)


def test_gradnorm_and_famo_over_many_steps(tmp_path):
    for name in ("gradnorm", "famo"):
        trained, _ = _trained(_config(tmp_path / name, name, train_steps=12, checkpoint_every=12))
        expected, _, _ = numpy_run(name, steps=12)
        np.testing.assert_allclose(trained["trunk"], expected["trunk"], atol=5 * WEIGHT_ATOL, err_msg=name)


# The inner loop takes a method of each kind (from the losses, from the Gramian); CI takes every method.
INNER_LOOP = ("famo", "upgrad")


def _inner_loop_or_slow(names):
    return [pytest.param(name, marks=() if name in INNER_LOOP else pytest.mark.slow) for name in names]


@pytest.mark.parametrize("name", _inner_loop_or_slow(ADAPTIVE))
def test_mirrored_equals_one_device(tmp_path, name, mirrored_strategy):
    one_device, one_history = _trained(_config(tmp_path / "one", name))
    mirrored, mirrored_history = _trained(_config(tmp_path / "mirrored", name, strategy="mirrored",
                                                  num_cpu_devices=2), strategy=mirrored_strategy)
    for layer in one_device:
        # float32, summed over two replicas in another order: rounding only.
        np.testing.assert_allclose(mirrored[layer], one_device[layer], atol=1e-6, err_msg=layer)
    for one, other in zip(one_history, mirrored_history):
        for key in (f"loss_weight/{output}" for output in OUTPUTS):
            assert other[key] == pytest.approx(one[key], rel=1e-6, abs=1e-7)


# --- Properties on random Jacobians ------------------------------------------------------------------------------


def _conflicting_jacobian(rng, k, n=12):
    J = rng.normal(size=(k, n))
    J[1] = -0.8 * J[0] + 0.3 * rng.normal(size=n)  # Rows 0 and 1 conflict.
    return J


# Each property a gradient method claims in its description (mto_tf/loss_weighting.py) is tested for every
# method that claims it: the lists come from the catalog, not from here.


@pytest.mark.parametrize("name", [name for name in catalog.METHODS if name != "fixed"])
def test_each_description_names_the_code_that_computes_its_method(name):
    description = catalog.METHODS[name]
    method = weighting.make_method(catalog.parse(name), num_outputs=3, seed=SEED, period_steps=1)
    assert method.uses_gradients == description.uses_gradients and method.name == name
    if description.uses_gradients:  # A function of the Gramian, or a class computing from it.
        weights, _ = method.gradient_weights(tf.eye(3, dtype=tf.float64) / 3, tf.ones([3]), tf.ones([3], tf.bool),
                                             gram_scale=1.0)
    else:
        weights, _ = method.loss_factors(tf.ones([3]), tf.ones([3], tf.bool))
    assert weights.shape == (3,) and np.all(np.isfinite(weights.numpy()))


def _method_weights(name, gram):
    """`a` as the train step computes it: the method made from its description, `G` read by `method_weights`."""
    k = len(gram)
    method = weighting.make_method(catalog.parse(name), num_outputs=k, seed=SEED, period_steps=1)
    weights, _ = weighting.method_weights(method, tf.constant(gram, tf.float64), tf.ones([k]), tf.ones([k], tf.bool))
    return weights.numpy()


def _jacobians(seed, sizes):
    """`(K, J)` for each K of `sizes`: conflicting gradients of at least 2K weights (J of rank K)."""
    rng = np.random.default_rng(seed)
    return [(k, _conflicting_jacobian(rng, k, n=max(12, 2 * k))) for k in sizes]


@pytest.mark.parametrize("name", catalog.claimed(catalog.NON_CONFLICTING))
def test_methods_that_claim_it_increase_no_loss_to_first_order(name):
    for k, J in _jacobians(0, (2, 3, 5, 16)):
        a = _method_weights(name, J @ J.T)
        d = a @ J
        assert np.all(J @ d >= -1e-9 * np.linalg.norm(J) ** 2), (k, J @ d)
        assert np.linalg.norm(d) > 0 or name == "mgda"


@pytest.mark.parametrize("name", catalog.claimed(catalog.ORDER_INVARIANT))
def test_methods_that_claim_it_do_not_depend_on_the_order_of_the_outputs(name):
    for k, J in _jacobians(1, (4, 16)):
        weights = _method_weights(name, J @ J.T)
        order = [2, 0, 3, 1] if k == 4 else np.random.default_rng(k).permutation(k)
        permuted = _method_weights(name, J[order] @ J[order].T)
        np.testing.assert_allclose(permuted, weights[order], rtol=1e-6, atol=1e-9)


# Scales of the gradients: 1e-6 to 1e6 (the Gramian's entries 1e-12 to 1e12).
SCALES = [10.0 ** exponent for exponent in (-6, -4, -2, 2, 4, 6)]


@pytest.mark.parametrize("name", catalog.claimed(catalog.SCALE_INVARIANT))
def test_methods_that_claim_it_give_the_same_weights_at_every_scale(name):
    for k, J in _jacobians(5, (2, 3, 5, 16)):
        reference = _method_weights(name, J @ J.T)
        for scale in SCALES:
            # The Gramian is divided by its trace before a method reads it: float64 rounding, nothing more.
            np.testing.assert_allclose(_method_weights(name, (scale * J) @ (scale * J).T), reference, rtol=1e-5,
                                       atol=1e-5 * np.max(np.abs(reference)), err_msg=f"K={k}, scale {scale:g}")


# A Gramian of zeros is read as K orthogonal gradients of equal norm: each method's weights for gradients that
# do not conflict, as docs/loss_weighting.md states them (worked out by hand for G = I / K; GradNorm's are its
# softmax weights, 1 each before it has learned anything).
WEIGHTS_FOR_NO_GRADIENT = {"mgda": lambda k: 1 / k, "upgrad": lambda k: 1 / k, "imtl": lambda k: 1 / k,
                           "cagrad": lambda k: 1.5 / k, "aligned_mtl": lambda k: 1.0, "pcgrad": lambda k: 1.0,
                           "gradnorm": lambda k: 1.0}


@pytest.mark.parametrize("name", catalog.claimed(catalog.FINITE))
def test_methods_that_claim_it_give_finite_weights_and_their_documented_ones_for_no_gradient(name):
    for k, J in _jacobians(6, (2, 5, 16)):
        for scale in SCALES:
            assert np.all(np.isfinite(_method_weights(name, (scale * J) @ (scale * J).T))), (k, scale)
        dependent = np.concatenate([J, J[:1], J[:1] + J[1:2]])  # A gradient twice, and a sum of two: rank K.
        assert np.all(np.isfinite(_method_weights(name, dependent @ dependent.T))), k
        one_without = np.concatenate([J[:1] * 0, J[1:]])  # An output with no gradient in this batch.
        assert np.all(np.isfinite(_method_weights(name, one_without @ one_without.T))), k
        np.testing.assert_allclose(_method_weights(name, np.zeros((k, k))), WEIGHTS_FOR_NO_GRADIENT[name](k),
                                   rtol=1e-12, err_msg=f"K={k}")


@pytest.mark.slow  # Two short runs per method.
@pytest.mark.parametrize("name", catalog.claimed(catalog.SCALE_INVARIANT))
def test_gradients_a_million_times_larger_or_smaller_train_as_the_unscaled_ones(tmp_path, name):
    # Inputs and targets times s: every gradient times s^2 (1e6 or 1e-6), every loss too. With the learning rate
    # divided by s^2, SGD takes the unscaled run's steps, if the method's weights do not depend on the scale:
    # the weights after training are NumPy's for the unscaled data, and so are the logged factors.
    expected, factors, _ = numpy_run(name)
    for scale in (1e3, 1e-3):
        trained, history = _trained(_config(tmp_path / f"{scale:g}", name, data=_data(scale),
                                            learning_rate=LEARNING_RATE / scale ** 2))
        logged = np.array([[record[f"loss_weight/{output}"] for output in OUTPUTS] for record in history])
        np.testing.assert_allclose(logged, factors, rtol=1e-5, atol=1e-6, err_msg=f"scale {scale:g}")
        for layer, reference in (("trunk", "trunk"), ("first_head", "first"), ("second_head", "second")):
            # float32 rounding on data a thousand times larger or smaller, relative: as WEIGHT_ATOL at scale 1.
            np.testing.assert_allclose(trained[layer], expected[reference], atol=WEIGHT_ATOL,
                                       err_msg=f"{layer}, scale {scale:g}")


MANY = 16  # Outputs: more than the exact enumeration takes (2^K supports), as multi-task models often have.


@pytest.mark.slow  # One short run per gradient method.
@pytest.mark.parametrize("name", [name for name, description in catalog.METHODS.items() if description.uses_gradients])
def test_every_gradient_method_trains_a_model_with_many_outputs(tmp_path, name):
    # One step of a shared linear trunk with 16 linear heads: each head's squared error has a gradient of the
    # trunk computed here by hand; the logged weights are the method's for their Gramian.
    rng = np.random.default_rng(8)
    inputs, hidden_units = 5, 8  # 40 shared weights: 16 gradients in general position (IMTL needs rank K).
    x = rng.normal(size=(N, inputs)).astype(np.float32)
    targets = x @ rng.normal(size=(inputs, MANY))
    trunk, heads = rng.normal(size=(inputs, hidden_units)) * 0.5, rng.normal(size=(hidden_units, MANY)) * 0.5
    outputs = [f"out_{k:02d}" for k in range(MANY)]

    def build():
        features = keras.Input((inputs,), name="features")
        hidden = keras.layers.Dense(hidden_units, use_bias=False,
                                    kernel_initializer=keras.initializers.Constant(trunk))(features)
        return keras.Model(features, {output: keras.layers.Dense(1, use_bias=False, name=output, kernel_initializer=
                                                                 keras.initializers.Constant(heads[:, [k]]))(hidden)
                                      for k, output in enumerate(outputs)})

    data = {"features": x, **{output: targets[:, [k]].astype(np.float32) for k, output in enumerate(outputs)}}
    _, history = _trained_many(_config(tmp_path, name, data=data, model=build, train_steps=1, checkpoint_every=1,
                                       losses={output: "mse" for output in outputs},
                                       loss_weights={output: 1.0 for output in outputs}))
    residuals = x @ trunk @ heads - targets
    J = np.stack([(2 / N * x.T @ residuals[:, [k]] @ heads[:, [k]].T).ravel() for k in range(MANY)])
    logged = np.array([history[0][f"loss_weight/{output}"] for output in outputs])
    # The Gramian in float32 (the step's) against float64 (here): rounding only.
    np.testing.assert_allclose(logged, _method_weights(name, J @ J.T), rtol=1e-4, atol=1e-6)
    assert np.all(np.isfinite(logged))


def _trained_many(config):
    result = train(config)
    return result.model, result.history


def test_exact_solvers_against_numpy_with_three_outputs():
    rng = np.random.default_rng(2)
    J = _conflicting_jacobian(rng, 3)
    gram = tf.constant(J @ J.T)
    upgrad = np.mean([_project_onto_dual_cone(J, g) for g in J], axis=0)
    all_present = tf.ones([3], tf.bool)
    np.testing.assert_allclose(gradient_methods.upgrad(gram, all_present).numpy() @ J, upgrad, atol=1e-9)
    # MGDA: the min-norm point of the hull, by projected gradient descent on the simplex in NumPy.
    w = np.ones(3) / 3
    for _ in range(20000):
        w = _project_to_simplex(w - 0.01 * (J @ J.T) @ w / np.trace(J @ J.T))
    np.testing.assert_allclose(gradient_methods.mgda(gram, all_present).numpy() @ J, w @ J, atol=1e-6)


def _project_to_simplex(v):
    u = np.sort(v)[::-1]
    cumulative = np.cumsum(u) - 1
    rho = np.nonzero(u - cumulative / np.arange(1, len(v) + 1) > 0)[0][-1]
    return np.maximum(v - cumulative[rho] / (rho + 1), 0)


def test_pcgrad_orders_are_permutations_of_the_others_and_follow_the_seed():
    all_present = tf.ones([4], tf.bool)
    orders = gradient_methods.random_orders(all_present, tf.constant([SEED, 5], tf.int64)).numpy()
    for i, row in enumerate(orders):
        assert sorted(row) == sorted(set(range(4)) - {i})
    again = gradient_methods.random_orders(all_present, tf.constant([SEED, 5], tf.int64)).numpy()
    other_step = gradient_methods.random_orders(all_present, tf.constant([SEED, 6], tf.int64)).numpy()
    assert (orders == again).all() and not (orders == other_step).all()


def test_sparse_gradients_enter_the_gramian_as_their_dense_equivalents():
    # Two outputs' embedding gradients with repeated indices (as an Embedding gives them).
    table = tf.Variable(tf.zeros([6, 2]))
    first = tf.IndexedSlices(tf.constant([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]]), tf.constant([4, 1, 4]),
                             tf.constant([6, 2]))
    second = tf.IndexedSlices(tf.constant([[-2.0, 1.0], [1.0, 1.0]]), tf.constant([4, 0]), tf.constant([6, 2]))
    outputs = gramian.OutputGradients(shared=[0], own={}, per_output=[[first], [second]])
    blocks = gramian.shared_blocks(outputs, [table])
    dense = np.stack([tf.convert_to_tensor(g).numpy().ravel() for g in (first, second)])
    np.testing.assert_allclose(gramian.gramian(blocks).numpy(), dense @ dense.T)
    combined, = gramian.combined(blocks, tf.constant([0.25, 2.0], tf.float64))
    assert isinstance(combined, tf.IndexedSlices)  # Stays sparse for Keras's optimizers, duplicates summed.
    assert len(set(combined.indices.numpy())) == len(combined.indices.numpy())
    np.testing.assert_allclose(tf.convert_to_tensor(combined).numpy().ravel(), [0.25, 2.0] @ dense, rtol=1e-6)


# --- fixed, and what is refused ----------------------------------------------------------------------------------


def test_fixed_is_the_default_step_and_logs_no_weights(tmp_path):
    default, default_history = _trained(_config(tmp_path / "default", "fixed"))
    # `fixed` by hand: one gradient of sum_k w_k L_k, every weight (heads included) by it.
    expected, _, _ = numpy_run_fixed()
    for layer, reference in (("trunk", "trunk"), ("first_head", "first"), ("second_head", "second")):
        np.testing.assert_allclose(default[layer], expected[reference], atol=WEIGHT_ATOL)
    assert not any(key.startswith("loss_weight/") for record in default_history for key in record)


def numpy_run_fixed():
    weights, data = _initial_weights(), _data()
    for _ in range(STEPS):
        _, J, heads = _losses_and_gradients(weights, data)
        weights = _sgd(weights, J.sum(axis=0), heads)
    return weights, None, None


@pytest.mark.parametrize("value, message", [
    ("nope", "unknown method 'nope'; expected one of fixed, uncertainty"),
    ({"name": "cagrad", "c": 1.5}, "cagrad's c must be a number in [0, 1), got 1.5"),
    ({"name": "cagrad", "alpha": 1}, "cagrad takes c; not 'alpha'"),
    ({"name": "mgda", "c": 1}, "mgda takes no hyper-parameters; not 'c'"),
    ({"name": "famo", "learning_rate": "fast"}, "famo's learning_rate must be a number > 0, got 'fast'"),
    ({"c": 0.5}, "unknown method None"),
    (3, "expected a method name or"),
])
def test_bad_values_name_the_flag(tmp_path, value, message):
    with pytest.raises(ConfigError, match=f"^--loss_weighting: {_escaped(message)}"):
        _config(tmp_path, value)


@pytest.mark.parametrize("overrides, message", [
    (dict(loop="fit"), "mgda is the custom loop's: model.fit trains one fixed weighted sum"),
    (dict(grad_accum_steps=2), "mgda weighs each batch's losses or gradients; not with --grad_accum_steps=2"),
])
def test_options_a_method_cannot_combine_with_are_refused(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=f"^--loss_weighting: {_escaped(message)}"):
        _config(tmp_path, "mgda", **overrides)


def _escaped(text):
    import re
    return re.escape(text)


def test_the_command_line_takes_a_name_or_json(tmp_path):
    from mto_tf.programs import flags as flags_lib
    parse = flags_lib._TEXT_PARSERS["name_or_json"]
    assert parse("loss_weighting", "pcgrad") == "pcgrad"
    assert catalog.parse(parse("loss_weighting", json.dumps({"name": "cagrad", "c": 0.2}))).parameters == {"c": 0.2}


# --- --weighting_gradients=representation:LAYER --------------------------------------------------------------------


def _orthonormal_config(tmp_path, weighting, gradients):
    # One-hot inputs, one per example: x x^T = I, so each output's gradient of
    # W (x^T dz) has the Gramian of its gradient of the trunk's output dz,
    # and the trunk's update x^T (sum a_k dz_k) is sum a_k g_k: the two must agree.
    data = _data()
    data["features"] = np.eye(N, P * 6, dtype=np.float32)[np.random.default_rng(5).permutation(N)]

    def build():
        features = keras.Input((P * 6,), name="features")
        rng = np.random.default_rng(6)
        trunk = keras.layers.Dense(H, use_bias=False, name="trunk", kernel_initializer=keras.initializers.Constant(
            rng.normal(size=(P * 6, H))))(features)
        return keras.Model(features, {name: keras.layers.Dense(1, use_bias=False, name=f"{name}_head",
                                                               kernel_initializer=keras.initializers.Constant(
                                                                   rng.normal(size=(H, 1))))(trunk)
                                      for name in OUTPUTS})

    return _config(tmp_path, weighting, data=data, model=build, weighting_gradients=gradients)


@pytest.mark.parametrize("name", ["mgda", "upgrad", "gradnorm"])
def test_representation_agrees_with_shared_weights_where_it_must(tmp_path, name):
    shared, _ = _trained(_orthonormal_config(tmp_path / "shared", name, "shared_weights"))
    through_trunk, history = _trained(_orthonormal_config(tmp_path / "representation", name,
                                                           "representation:trunk"))
    for layer in shared:
        np.testing.assert_allclose(through_trunk[layer], shared[layer], atol=1e-6, err_msg=layer)
    assert "loss_weight/first" in history[-1]


@pytest.mark.slow  # The headline model under two strategies; the inner loop has the linear model's representation.
def test_representation_of_the_headline_lstm_trains_and_equals_mirrored(tmp_path, mirrored_strategy):
    from helpers import small_config
    one, _ = _trained_headline(small_config(tmp_path / "one", loss_weighting="mgda",
                                            weighting_gradients="representation:lstm"))
    mirrored, _ = _trained_headline(small_config(tmp_path / "mirrored", loss_weighting="mgda",
                                                 weighting_gradients="representation:lstm", strategy="mirrored",
                                                 num_cpu_devices=2), strategy=mirrored_strategy)
    for a, b in zip(one, mirrored):
        np.testing.assert_allclose(b, a, atol=1e-6)


def _trained_headline(config, strategy=None):
    result = train(config, strategy=strategy)
    return result.model.get_weights(), result.history


@pytest.mark.parametrize("overrides, message", [
    (dict(weighting_gradients="representation:nope"), "model 'linear' has no layer 'nope'; its layers: features, "
                                                       "trunk, first_head, second_head"),
    (dict(weighting_gradients="layer"), "expected shared_weights or representation:LAYER, got 'layer'"),
    (dict(weighting_gradients="representation:trunk", loss_weighting="dwa"),
     "representation:trunk serves the gradient methods; --loss_weighting=dwa weighs by the losses alone"),
])
def test_bad_weighting_gradients_name_the_flag(tmp_path, overrides, message):
    settings = dict(loss_weighting="mgda")
    settings.update(overrides)
    weighting = settings.pop("loss_weighting")
    with pytest.raises(ConfigError, match=f"^--weighting_gradients: {_escaped(message)}"):
        train(_config(tmp_path, weighting, **settings))
    assert not (tmp_path / "run").exists()


# --- State in checkpoints, mixed precision --------------------------------------------------------------------------

STATEFUL = ["uncertainty", "dwa", "rlw", "famo", "gradnorm", "pcgrad"]  # Learned values, histories or seeded draws.


@pytest.mark.parametrize("name", _inner_loop_or_slow(STATEFUL))
def test_resumed_mid_run_ends_bit_identical_to_an_uninterrupted_run(tmp_path, name):
    # Adam: the method's trainable variables have slots too. A DWA period of
    # 2 steps, the checkpoint at step 3: resumed in the middle of a period.
    settings = dict(optimizer="adam", learning_rate=0.01, log_every=2, checkpoint_every=3)
    whole, whole_history = _trained(_config(tmp_path / "whole", name, train_steps=6, **settings))
    _trained(_config(tmp_path / "split", name, train_steps=3, **settings))
    resumed, resumed_history = _trained(_config(tmp_path / "split", name, train_steps=6, **settings))
    for layer in whole:
        np.testing.assert_array_equal(resumed[layer], whole[layer], err_msg=layer)
    assert resumed_history[-1][f"loss_weight/{OUTPUTS[0]}"] == whole_history[-1][f"loss_weight/{OUTPUTS[0]}"]


def test_mixed_float16_unscales_before_the_method_sees_a_gradient(tmp_path):
    # Small data, so that float16 gradients times the initial loss scale
    # (2^15) do not overflow and no step is skipped. GradNorm's weights
    # follow its gradient norms: were they not unscaled, its logits would
    # move 2^15 times too far.
    scale = 0.05
    for name in ("mgda", "gradnorm"):
        mixed, history = _trained(_config(tmp_path / name, name, data=_data(scale), precision="mixed_float16",
                                          train_steps=6))
        expected, factors, _ = numpy_run(name, steps=6, data_scale=scale)
        logged = np.array([[record[f"loss_weight/{output}"] for output in OUTPUTS] for record in history])
        # float16 activations: float16's precision (about 1e-3), not float32's.
        np.testing.assert_allclose(logged, factors, atol=3e-3, err_msg=name)
        np.testing.assert_allclose(mixed["trunk"], expected["trunk"], atol=3e-3, err_msg=name)
    assert np.ptp(factors) > 0.01  # GradNorm moved its weights: the check above could fail.


# --- From the command line -----------------------------------------------------------------------------------------


def test_from_the_command_line_logged_each_window_and_in_the_summary(tmp_path):
    from helpers import SMALL_FLAGS, data_dir, mto_train_in_process
    from tensorboard.backend.event_processing import event_accumulator

    process = mto_train_in_process(*SMALL_FLAGS, f"--data_dir={data_dir()}", f"--model_dir={tmp_path / 'run'}",
                                   "--train_steps=4", "--log_every=2", '--loss_weighting={"name": "cagrad", "c": 0.3}',
                                   "--progress=lines")
    assert process.returncode == 0, process.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(key for key in record if key.startswith("loss_weight/")) for record in records] == [
        ["loss_weight/aux_output", "loss_weight/main_output"]] * 2
    summary = process.stdout[process.stdout.index("Trained to step 4"):]
    assert re.search(r"last window: loss [\d.]+ \| aux_output: loss [\d.]+, loss weight [\d.]+, binary_accuracy "
                     r"[\d.]+ \| main_output: loss [\d.]+, loss weight [\d.]+, binary_accuracy [\d.]+\n", summary), summary
    events = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert {"loss_weight/aux_output", "loss_weight/main_output"} <= set(events.Tags()["tensors"])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["loss_weighting"] == {"name": "cagrad", "c": 0.3}


@pytest.mark.parametrize("flag, message", [
    ("--loss_weighting=magic", "--loss_weighting: unknown method 'magic'; expected one of fixed, uncertainty, dwa"),
    ('--loss_weighting={"name": "dwa", "temperature": 0}', "--loss_weighting: dwa's temperature must be a number > 0"),
    ("--loss_weighting={oops", "--loss_weighting: not valid JSON"),
    ("--weighting_gradients=representation:", "--weighting_gradients: expected shared_weights or representation:LAYER"),
])
def test_bad_command_line_values_are_one_line_exit_2_and_nothing_written(tmp_path, flag, message):
    from helpers import SMALL_FLAGS, data_dir, mto_train_in_process

    process = mto_train_in_process(*SMALL_FLAGS, f"--data_dir={data_dir()}", f"--model_dir={tmp_path / 'run'}",
                                   "--loss_weighting=mgda", flag)
    assert process.returncode == 2
    assert process.stderr.strip().splitlines()[-1].startswith(f"mto-train: error: {message}"), process.stderr
    assert "Traceback" not in process.stderr and not (tmp_path / "run").exists()


def _sweep_in_process(*flags):
    from helpers import run_in_process
    from mto_tf.programs import flags as mto_flags
    from mto_tf.programs import sweep

    return run_in_process("mto_tf.sweep", sweep.sweep_main, *flags, define_flags=mto_flags.define_sweep_flags)


@pytest.mark.slow  # Eight short runs.
def test_the_sweep_over_methods_trains_one_run_each_with_the_same_seed_and_data(tmp_path):
    from helpers import SMALL_FLAGS, data_dir

    sweep_dir = tmp_path / "sweep"
    methods = ["fixed", "uncertainty", "dwa", "famo", "pcgrad", "mgda", "cagrad", "upgrad"]
    process = _sweep_in_process(f"--loss_weighting={','.join(methods)}", f"--sweep_dir={sweep_dir}", *SMALL_FLAGS,
                                f"--data_dir={data_dir()}", "--train_steps=2", "--log_every=2", "--progress=quiet")
    assert process.returncode == 0, process.stderr[-3000:]
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    assert [run["loss_weighting"] for run in summary["runs"]] == methods
    for run in summary["runs"]:
        settings = json.loads((sweep_dir / run["loss_weighting"] / "config.json").read_text())
        assert settings["loss_weighting"] == run["loss_weighting"] and settings["seed"] == 0
        # val_loss is the same sum of --loss_weights for every method: compared too.
        assert {"val_loss", "val_main_output_loss", "val_aux_output_loss"} <= set(run["values"])
    # Same start: the methods' steps differ, so their validation values do; but DWA weighs 1 each for its
    # first two periods (here the whole run), which is fixed's step exactly.
    values = {run["loss_weighting"]: run["values"]["val_aux_output_loss"] for run in summary["runs"]}
    assert values.pop("dwa") == values["fixed"]
    assert len(set(values.values())) == len(methods) - 1
    assert "loss weighting" in process.stdout.splitlines()[0] and "upgrad" in process.stdout
    assert (sweep_dir / "sweep.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("flags, message", [
    (["--loss_weighting=fixed,nope"], "--loss_weighting: unknown method 'nope'"),
    (["--loss_weighting=mgda,mgda"], "--loss_weighting: a method is given twice in 'mgda,mgda'"),
    (["--loss_weighting=fixed,mgda", "--loss_weight=aux_output=1,2"], "--loss_weighting: sweeps the method; "),
    (["--loss_weighting=fixed,mgda", "--loop=fit", "--train_steps=50"], "--loss_weighting: mgda is the custom "),
])
def test_the_sweep_over_methods_refuses_bad_flags(tmp_path, flags, message):
    from helpers import SMALL_FLAGS, data_dir

    process = _sweep_in_process(f"--sweep_dir={tmp_path / 'sweep'}", *SMALL_FLAGS, f"--data_dir={data_dir()}",
                                *flags)
    assert process.returncode == 2 and f"mto_tf.sweep: error: {message}" in process.stderr, process.stderr[-2000:]
    assert not (tmp_path / "sweep").exists()


# --- mto-explain with the run's method -----------------------------------------------------------------------------


def test_explain_reports_the_shares_of_the_methods_update(tmp_path):
    from mto_tf.programs import explain

    report = explain.explain(_config(tmp_path, "mgda"), strategy=tf.distribute.get_strategy(), explain_batches=1)
    _, J, _ = _losses_and_gradients(_initial_weights(), _data())
    a = numpy_mgda(J, None)
    update = a @ J
    trunk = next(layer for layer in report["layers"] if layer["name"] == "trunk")
    for k, output in enumerate(OUTPUTS):
        assert report["method_weights"][output] == pytest.approx(a[k], rel=1e-5)
        assert trunk["share"][output] == pytest.approx(a[k] * J[k] @ update / (update @ update), rel=1e-4)
        assert trunk["grad_norm"][output] == pytest.approx(a[k] * np.linalg.norm(J[k]), rel=1e-5)
    cosine = J[0] @ J[1] / np.linalg.norm(J[0]) / np.linalg.norm(J[1])
    assert trunk["cosine"]["first/second"] == pytest.approx(cosine, rel=1e-5)
    # A head keeps its own output's gradient: all its update is that output's.
    head = next(layer for layer in report["layers"] if layer["name"] == "first_head")
    assert head["share"] == {"first": 1.0, "second": 0.0}
    assert "update by --loss_weighting=mgda" in explain.format_table(report)


def test_explain_of_a_finished_run_reads_the_methods_state_from_its_checkpoint(tmp_path):
    from mto_tf.programs import explain

    config = _config(tmp_path, "uncertainty")
    _trained(config)
    report = explain.explain(config, strategy=tf.distribute.get_strategy(), explain_batches=1,
                             weights=str(tmp_path / "run" / "model.weights.h5"))
    checkpoint = tf.train.load_checkpoint(str(tmp_path / "run" / "checkpoints"))
    log_variances = checkpoint.get_tensor("loss_weighting/log_variances/.ATTRIBUTES/VARIABLE_VALUE")
    assert not np.allclose(log_variances, 0)  # Trained: reading the initial state would fail below.
    for k, output in enumerate(OUTPUTS):
        assert report["method_weights"][output] == pytest.approx(np.exp(-log_variances[k]) / 2, rel=1e-6)
