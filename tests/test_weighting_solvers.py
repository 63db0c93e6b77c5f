"""The solvers of MGDA, UPGrad and CAGrad (`core/weighting/solvers.py`): active set against enumeration, and alone.

- K = 2..10: each active-set method (called directly, so that small K runs
  it too) agrees with the enumeration of every support, on random
  Jacobians and on the hard cases: duplicated gradients, a gradient that is
  a convex combination of others, J of rank below K, 0 inside the convex
  hull, a vertex as the answer, CAGrad with c = 0.
- K = 16 and 40 (the public functions, which take the active-set methods
  there): the KKT conditions of each problem, checked in NumPy; MGDA's and
  UPGrad's updates conflict with no gradient; MGDA and CAGrad agree with a
  NumPy projected-gradient solver run to convergence.
- Singular and badly conditioned Gramians: no error, finite weights that
  satisfy the constraints.
- Under XLA, the active-set methods give what they give without it.

Each solver runs in a tf.function traced once per K and called with
tensors, as a training step calls it. Gramians of the K = 16 and 40 tests
are divided by their trace, the scale the solvers see in training (so the
tolerances below are relative to it); the small-K ones are not, as in the
direct calls of test_loss_weighting.py.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tensorflow as tf

from mto_tf.core.weighting import solvers

# Both methods end by solving the same support's linear system, so they
# agree to its rounding: ~1e-13 at worst on these cases (measured). 1e-5,
# the agreement that matters for training, also holds for supports whose
# systems are conditioned up to ~1e8.
AGREEMENT = 1e-5
# The KKT conditions at trace(G) = 1: the solvers stop when none is
# violated by more than solvers.KKT_TOLERANCE (1e-10) of the scale of its
# terms, and the answer is then a linear system solved to rounding (~1e-17
# here, measured); 1e-9 bounds both with a margin, and is far below any
# weight or product that matters (each ~1/K).
KKT = 1e-9
# Projected gradient run until it stops moving reaches the minimizer to
# rounding (~1e-15 from the solvers' answers here); this allows for
# problems conditioned up to ~1e5 times worse.
INDEPENDENT = 1e-10
CAGRAD_C = 0.5


def conflicting_jacobian(rng: np.random.Generator, k: int, n: int) -> np.ndarray:
    """K gradients sharing a direction, every fourth one (and the second) against it, with varying scales."""
    shared = rng.normal(size=n)
    signs = np.where((np.arange(k) % 4 == 3) | (np.arange(k) == 1), -1.0, 1.0)
    scales = np.exp(rng.normal(scale=0.5, size=k))
    return scales[:, None] * (signs[:, None] * shared + rng.normal(size=(k, n)))


def hard_jacobians(rng: np.random.Generator, k: int) -> dict[str, np.ndarray]:
    """Jacobians whose solutions sit on the problems' edge cases, by name."""
    n = 20
    conflicting = conflicting_jacobian(rng, k, n)
    duplicated = conflicting.copy()
    duplicated[-1] = duplicated[0]
    combination = conflicting.copy()
    combination[-1] = 0.3 * combination[0] + 0.7 * combination[1]  # k = 2: a duplicate.
    zero_in_hull = rng.normal(size=(k, n))
    zero_in_hull[-1] = -rng.uniform(0.2, 1.0, size=k - 1) @ zero_in_hull[:-1]
    # Row 0 along the others' shared direction, the others orthogonal to it beyond: MGDA's answer is vertex 0.
    direction = np.eye(n)[0]
    vertex = rng.normal(size=(k, n)) * (1.0 - direction) + direction
    vertex[0] = 0.1 * direction
    return {"conflicting": conflicting, "duplicated": duplicated, "convex_combination": combination,
            "rank_below_k": rng.normal(size=(k, max(1, k // 2))), "zero_in_hull": zero_in_hull, "vertex": vertex}


@functools.cache
def both_methods(k: int) -> tf.types.experimental.GenericFunction:
    """One tf.function of (G, c): each problem solved by enumeration and by the active-set method."""
    lower = tf.eye(k, dtype=tf.float64) / k

    @tf.function
    def solve(gram, c):
        return {"mgda": (solvers.min_norm_in_simplex_by_enumeration(gram),
                         solvers.min_norm_in_simplex_iterative(gram)),
                "upgrad": (solvers.project_onto_dual_cone_by_enumeration(gram, lower),
                           solvers.project_onto_dual_cone_iterative(gram, lower)),
                "cagrad": (solvers.conflict_averse_by_enumeration(gram, c),
                           solvers.conflict_averse_iterative(gram, c))}
    return solve


@functools.cache
def public_solvers(k: int) -> tf.types.experimental.GenericFunction:
    """One tf.function of (G, c): the three public functions (the active-set methods above the threshold)."""
    lower = tf.eye(k, dtype=tf.float64) / k

    @tf.function
    def solve(gram, c):
        return (solvers.min_norm_in_simplex(gram), solvers.project_onto_dual_cone(gram, lower),
                solvers.conflict_averse(gram, c))
    return solve


def solved(k: int, gram: np.ndarray, c: float = CAGRAD_C) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The public functions' MGDA, UPGrad (one row per gradient) and CAGrad weights, in NumPy."""
    answers = public_solvers(k)(tf.constant(gram), tf.constant(c, tf.float64))
    return tuple(answer.numpy() for answer in answers)


# --- The active-set methods against the enumeration, K = 2..10 ---------------------------------------------------


@pytest.mark.parametrize("k", range(2, 11))
def test_the_active_set_methods_agree_with_the_enumeration(k):
    rng = np.random.default_rng(k)
    cases = [*hard_jacobians(rng, k).items(), *((f"conflicting {draw}", conflicting_jacobian(rng, k, 20))
                                                for draw in range(1, 3))]
    for name, jacobian in cases:
        gram = jacobian @ jacobian.T
        # Where J has rank K, w -> J^T w is one to one, and the weights are unique; where not, only the update is.
        unique_weights = np.linalg.matrix_rank(jacobian) == k
        scale = np.max(np.linalg.norm(jacobian, axis=1))  # Of an update, next to its weights.
        for c in (CAGRAD_C, 0.0):
            answers = both_methods(k)(tf.constant(gram), tf.constant(c, tf.float64))
            for problem, (enumerated, iterative) in answers.items():
                enumerated, iterative = enumerated.numpy(), iterative.numpy()
                where = f"K={k} {name} c={c} {problem}"
                assert np.all(np.isfinite(iterative)), where
                np.testing.assert_allclose(iterative @ jacobian, enumerated @ jacobian, atol=AGREEMENT * scale,
                                           err_msg=where)
                if unique_weights:
                    np.testing.assert_allclose(iterative, enumerated, atol=AGREEMENT, err_msg=where)


def test_the_hard_cases_reach_the_answers_they_are_built_for():
    k = 6
    rng = np.random.default_rng(0)
    jacobians = hard_jacobians(rng, k)
    vertex = jacobians["vertex"]
    answers = both_methods(k)(tf.constant(vertex @ vertex.T), tf.constant(0.0, tf.float64))
    np.testing.assert_allclose(answers["mgda"][1].numpy(), np.eye(k)[0], atol=1e-12)
    # CAGrad with c = 0 minimizes g_0 . g_w: the vertex of the gradient least aligned with the mean one.
    np.testing.assert_allclose(answers["cagrad"][1].numpy(), np.eye(k)[np.argmin(vertex @ vertex.T @ np.ones(k))],
                               atol=1e-12)
    zero_in_hull = jacobians["zero_in_hull"]
    answers = both_methods(k)(tf.constant(zero_in_hull @ zero_in_hull.T), tf.constant(CAGRAD_C, tf.float64))
    # The min-norm point is 0 (~1e-15 measured, from gradients of norm ~10).
    assert np.linalg.norm(answers["mgda"][1].numpy() @ zero_in_hull) < 1e-12


def test_the_public_functions_switch_to_the_active_set_methods_above_the_threshold():
    for k, expected in [(solvers.ENUMERATION_MAX_OUTPUTS, solvers.min_norm_in_simplex_by_enumeration),
                        (solvers.ENUMERATION_MAX_OUTPUTS + 1, solvers.min_norm_in_simplex_iterative)]:
        jacobian = conflicting_jacobian(np.random.default_rng(k), k, 20)
        gram = tf.constant(jacobian @ jacobian.T)  # Eagerly: no tracing for two calls.
        np.testing.assert_array_equal(solvers.min_norm_in_simplex(gram).numpy(), expected(gram).numpy())


# --- K = 16 and 40: the KKT conditions, no conflict, an independent solver ---------------------------------------


def normalized_conflicting_jacobian(k: int, seed: int = 0) -> np.ndarray:
    """A conflicting Jacobian of n = 1000 columns scaled so that trace(J J^T) = 1."""
    jacobian = conflicting_jacobian(np.random.default_rng(seed), k, 1000)
    return jacobian / np.linalg.norm(jacobian)


def project_to_simplex(v: np.ndarray) -> np.ndarray:
    """The Euclidean projection onto the simplex (Held, Wolfe and Crowder's sort)."""
    u = np.sort(v)[::-1]
    cumulative = np.cumsum(u) - 1
    last = np.nonzero(u - cumulative / np.arange(1, len(v) + 1) > 0)[0][-1]
    return np.maximum(v - cumulative[last] / (last + 1), 0)


def projected_gradient(gradient, k: int, steps: int) -> np.ndarray:
    """`argmin` of a convex function on the simplex, by projected gradient descent with an adaptive step."""
    w, step = np.ones(k) / k, 1.0
    for _ in range(steps):
        while True:
            candidate = project_to_simplex(w - step * gradient(w))
            moved = candidate - w
            # The step is at most 1 / (the curvature along the move), read from the gradients (the objective's
            # values would cancel to rounding near the minimum, and stall it).
            if (gradient(candidate) - gradient(w)) @ moved <= moved @ moved / step:
                break
            step /= 2
        if np.array_equal(candidate, w):
            break
        w, step = candidate, step * 1.5
    return w


def assert_in_simplex(w: np.ndarray) -> None:
    assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-12, w


@pytest.mark.parametrize("k", [16, 40])
def test_mgda_satisfies_its_kkt_conditions_and_agrees_with_projected_gradient(k):
    jacobian = normalized_conflicting_jacobian(k)
    gram = jacobian @ jacobian.T
    w, _, _ = solved(k, gram)
    assert_in_simplex(w)
    # KKT of min w^T G w on the simplex: (G w)_i >= w^T G w, with equality where w_i > 0.
    slack = gram @ w - w @ gram @ w
    assert np.all(slack >= -KKT), slack.min()
    assert np.all(np.abs(slack[w > 0]) <= KKT), np.abs(slack[w > 0]).max()
    update = w @ jacobian
    assert np.all(jacobian @ update >= -KKT)
    reference = projected_gradient(lambda v: 2 * gram @ v, k, 5000)  # Still by about 3000 steps here.
    np.testing.assert_allclose(w, reference, atol=INDEPENDENT)


@pytest.mark.parametrize("k", [16, 40])
def test_upgrad_satisfies_its_kkt_conditions_and_conflicts_with_no_gradient(k):
    jacobian = normalized_conflicting_jacobian(k)
    gram = jacobian @ jacobian.T
    _, v, _ = solved(k, gram)
    lower = np.eye(k) / k
    # KKT of min v^T G v over v >= u: v >= u, G v >= 0, with (G v)_i = 0 where v_i > u_i.
    assert np.all(v >= lower)
    assert np.all(v @ gram >= -KKT), (v @ gram).min()
    assert np.all(np.abs((v @ gram)[v > lower]) <= KKT)
    update = v.sum(axis=0) @ jacobian
    assert np.all(jacobian @ update >= -KKT)
    assert (v > lower).any()  # Some gradient conflicts, so some projection moves.


@pytest.mark.parametrize("k", [16, 40])
def test_cagrad_satisfies_its_kkt_conditions_and_agrees_with_projected_gradient(k):
    jacobian = normalized_conflicting_jacobian(k, seed=1)
    gram = jacobian @ jacobian.T
    _, _, w = solved(k, gram)
    assert_in_simplex(w)
    a = gram.mean(axis=1)
    rho = CAGRAD_C * np.sqrt(gram.mean())

    def objective(v):
        return a @ v + rho * np.sqrt(v @ gram @ v)

    def gradient(v):
        return a + rho * gram @ v / np.sqrt(v @ gram @ v)

    # KKT on the simplex: each partial derivative >= their w-weighted mean, with equality where w_i > 0.
    slack = gradient(w) - w @ gradient(w)
    assert np.all(slack >= -KKT), slack.min()
    assert np.all(np.abs(slack[w > 0]) <= KKT), np.abs(slack[w > 0]).max()
    assert (w > 0).sum() > 1  # An answer inside the simplex, not one of the vertices the solver also tries.
    reference = projected_gradient(gradient, k, 5000)
    np.testing.assert_allclose(w, reference, atol=INDEPENDENT)
    assert objective(w) <= objective(reference) + 1e-15  # The objective's rounding is ~1e-18 here.


# --- Singular and badly conditioned input ------------------------------------------------------------------------


def assert_finite_and_feasible(k: int, gram: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three answers, checked finite and within their constraints."""
    mgda, upgrad, cagrad = solved(k, gram)
    for answer in (mgda, upgrad, cagrad):
        assert np.all(np.isfinite(answer))
    assert_in_simplex(mgda)
    assert_in_simplex(cagrad)
    assert np.all(upgrad >= np.eye(k) / k)
    return mgda, upgrad, cagrad


def test_two_gradients_equal_to_1e_12_give_the_answers_of_a_duplicate():
    k = 16
    jacobian = normalized_conflicting_jacobian(k)
    jacobian[1] = jacobian[0]
    near = jacobian.copy()
    near[1] += 1e-12 * np.random.default_rng(3).normal(size=jacobian.shape[1])
    exact = assert_finite_and_feasible(k, jacobian @ jacobian.T)
    answers = assert_finite_and_feasible(k, near @ near.T)
    # The Gramians differ by ~1e-12, and the updates are continuous in them (the weights are not: a duplicate's
    # split is arbitrary); measured, they differ by ~1e-13.
    for answer, reference in zip(answers, exact):
        np.testing.assert_allclose(answer @ jacobian, reference @ jacobian, atol=1e-10)
    mgda, upgrad, _ = answers
    assert np.all(jacobian @ (mgda @ jacobian) >= -KKT)
    assert np.all(jacobian @ (upgrad.sum(axis=0) @ jacobian) >= -KKT)


@pytest.mark.parametrize("signs", ["mixed", "positive"])
def test_a_gramian_of_rank_one(signs):
    k = 16
    rng = np.random.default_rng(4)
    lengths = rng.uniform(0.5, 2.0, size=k) * (np.where(np.arange(k) % 3 == 0, -1.0, 1.0) if signs == "mixed" else 1)
    jacobian = np.outer(lengths, rng.normal(size=50))
    jacobian /= np.linalg.norm(jacobian)
    mgda, upgrad, _ = assert_finite_and_feasible(k, jacobian @ jacobian.T)
    # Opposite gradients: 0 is in the hull; else the gradients are parallel, and the min-norm one is the shortest.
    expected_norm = 0.0 if signs == "mixed" else np.min(np.linalg.norm(jacobian, axis=1))
    assert abs(np.linalg.norm(mgda @ jacobian) - expected_norm) < 1e-9
    update = upgrad.sum(axis=0) @ jacobian
    assert np.all(jacobian @ update >= -KKT)
    if signs == "mixed":  # Opposite gradients: the dual cone is the plane orthogonal to them all.
        assert np.linalg.norm(update) < 1e-9


def test_an_all_zero_gramian():
    assert_finite_and_feasible(16, np.zeros((16, 16)))


# --- XLA ---------------------------------------------------------------------------------------------------------


def test_under_xla_the_active_set_methods_give_what_they_give_without_it():
    # CAGrad's runs both loops: MGDA's nonnegative quadratic problem (UPGrad's too) and its own path.
    k = 12
    jacobian = normalized_conflicting_jacobian(k)
    gram = tf.constant(jacobian @ jacobian.T)
    solve = functools.partial(solvers.conflict_averse_iterative, c=CAGRAD_C)
    with_xla, without = tf.function(solve, jit_compile=True)(gram), tf.function(solve)(gram)
    np.testing.assert_allclose(with_xla.numpy(), without.numpy(), atol=1e-12)  # Rounding only.
