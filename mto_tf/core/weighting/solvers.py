"""The small convex problems MGDA, UPGrad and CAGrad pose on the Gramian, solved exactly in the graph.

Each problem is over K weights (K outputs). Its solution is the solution of
a linear system on the right subset S of the weights (those not at their
bound), so every subset is tried at once, as a batch of `(K+1) x (K+1)`
systems, each candidate is checked for feasibility, and the feasible one
with the lowest objective is the answer: exact, where an iterative solver
(Frank-Wolfe, as LibMTL and TorchJD use for MGDA) stops near it. 2^K
candidates: mto_tf allows these methods up to
`loss_weighting.MAX_OUTPUTS_FOR_EXACT_SOLVERS` outputs.
"""

from __future__ import annotations

import itertools

import numpy as np
import tensorflow as tf

_FEASIBILITY_TOLERANCE = 1e-9  # Relative to the weights' scale (they sum to about 1).


def subsets(k: int, *, include_empty: bool) -> tf.Tensor:
    """Every subset of K items as a 0/1 mask, `(2^K [- 1], K)` float64."""
    masks = [bits for bits in itertools.product((0.0, 1.0), repeat=k) if include_empty or any(bits)]
    return tf.constant(np.array(masks), tf.float64)


def _lowest_feasible(candidates: tf.Tensor, objective: tf.Tensor, feasible: tf.Tensor) -> tf.Tensor:
    """The candidate (a row) with the lowest objective among the feasible ones."""
    return tf.gather(candidates, tf.argmin(tf.where(feasible, objective, np.inf)))


def _quadratic(weights: tf.Tensor, gram: tf.Tensor) -> tf.Tensor:
    """`w^T G w` for each row `w`."""
    return tf.einsum("ci,ij,cj->c", weights, gram, weights)


def min_norm_in_simplex(gram: tf.Tensor) -> tf.Tensor:
    """`argmin_{w >= 0, sum w = 1} w^T G w`: the weights of the min-norm point of the gradients' convex hull."""
    k = gram.shape[0]
    masks = subsets(k, include_empty=False)  # S: the weights that may be > 0.
    # For each S: G_SS w_S = mu 1, sum w_S = 1, w_i = 0 outside S; unknowns (w, mu).
    outer = masks[:, :, None] * masks[:, None, :]
    top = tf.concat([outer * gram + tf.linalg.diag(1.0 - masks), -masks[:, :, None]], axis=2)
    bottom = tf.concat([masks, tf.zeros_like(masks[:, :1])], axis=1)[:, None, :]
    systems = tf.concat([top, bottom], axis=1)
    rhs = tf.concat([tf.zeros_like(masks), tf.ones_like(masks[:, :1])], axis=1)
    solutions = tf.linalg.matvec(tf.linalg.pinv(systems), rhs)
    weights = solutions[:, :k]
    residual = tf.norm(tf.linalg.matvec(systems, solutions) - rhs, axis=1)
    feasible = (tf.reduce_min(weights, axis=1) >= -_FEASIBILITY_TOLERANCE) & (residual <= 1e-6)
    return _project_to_simplex(_lowest_feasible(weights, _quadratic(weights, gram), feasible))


def project_onto_dual_cone(gram: tf.Tensor, lower: tf.Tensor) -> tf.Tensor:
    """`argmin_{v >= lower} v^T G v` for each row of `lower` `(R, K)`: the weights of `J^T lower` projected onto the dual cone.

    The projection of `J^T u` onto `{x : J x >= 0}` is `J^T v` with `v` the
    solution of this dual problem (Quinton and Rey 2024, Proposition 1).
    """
    k = gram.shape[0]
    masks = subsets(k, include_empty=True)  # S: the weights above their bound.
    # For each S: (G v)_i = 0 for i in S, v_i = lower_i outside S.
    systems = masks[:, :, None] * gram + tf.linalg.diag(1.0 - masks)
    inverse = tf.linalg.pinv(systems)  # (subsets, K, K)
    rhs = (1.0 - masks)[None, :, :] * lower[:, None, :]  # (R, subsets, K)
    candidates = tf.einsum("sij,rsj->rsi", inverse, rhs)
    residual = tf.norm(tf.einsum("sij,rsj->rsi", systems, candidates) - rhs, axis=2)
    feasible = (tf.reduce_min(candidates - lower[:, None, :], axis=2) >= -_FEASIBILITY_TOLERANCE) & (residual <= 1e-6)
    objective = tf.einsum("rsi,ij,rsj->rs", candidates, gram, candidates)
    best = tf.argmin(tf.where(feasible, objective, np.inf), axis=1)
    return tf.gather(candidates, best, batch_dims=1)


def conflict_averse(gram: tf.Tensor, c: float) -> tf.Tensor:
    """CAGrad's `argmin_{w in simplex} g_w . g_0 + c |g_0| |g_w|` (g_0 the mean gradient, g_w = J^T w).

    On a subset S, stationarity gives `w_S` proportional to
    `G_SS^-1 (mu 1 - a_S)` (a = G 1/K), and `|g_w| = c |g_0|` fixes mu by a
    quadratic; each candidate's objective is then evaluated directly.
    """
    k = gram.shape[0]
    masks = subsets(k, include_empty=False)
    a = tf.reduce_mean(gram, axis=1)  # g_i . g_0
    rho = c * tf.sqrt(tf.maximum(tf.reduce_mean(gram), 0.0))  # c |g_0|
    outer = masks[:, :, None] * masks[:, None, :]
    inverse = masks[:, :, None] * tf.linalg.pinv(outer * gram) * masks[:, None, :]  # G_SS^-1, zero outside S.
    p = tf.reduce_sum(inverse, axis=2)  # G_SS^-1 1
    q = tf.linalg.matvec(inverse, a)  # G_SS^-1 a_S
    sum_p, sum_q, a_q = tf.reduce_sum(p, 1), tf.reduce_sum(q, 1), tf.linalg.matvec(q, a)
    discriminant = sum_q ** 2 - sum_p * (a_q - rho ** 2)
    mu = (sum_q + tf.sqrt(tf.maximum(discriminant, 0.0))) / tf.where(sum_p > 0, sum_p, 1.0)
    denominator = mu[:, None] * p - q
    weights = denominator / tf.reduce_sum(denominator, axis=1, keepdims=True)
    # The vertices, and MGDA's point (where g_w may vanish), are candidates too.
    weights = tf.concat([weights, tf.eye(k, dtype=tf.float64), min_norm_in_simplex(gram)[None, :]], axis=0)
    well_posed = tf.concat([(discriminant >= 0) & (sum_p > 0), tf.ones([k + 1], tf.bool)], axis=0)
    feasible = well_posed & tf.reduce_all(tf.math.is_finite(weights), axis=1) & (
        tf.reduce_min(weights, axis=1) >= -_FEASIBILITY_TOLERANCE)
    weights = tf.where(feasible[:, None], weights, 0.0)
    objective = tf.linalg.matvec(weights, a) + rho * tf.sqrt(tf.maximum(_quadratic(weights, gram), 0.0))
    return _project_to_simplex(_lowest_feasible(weights, objective, feasible))


def _project_to_simplex(weights: tf.Tensor) -> tf.Tensor:
    """Rounding off: weights within the tolerance of 0 made 0, and the sum made exactly 1."""
    weights = tf.maximum(weights, 0.0)
    return weights / tf.reduce_sum(weights)
