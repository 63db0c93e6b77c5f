"""The small convex problems MGDA, UPGrad and CAGrad pose on the Gramian, solved in the graph, exactly.

Each problem is over K weights (K outputs), and each is solved two ways:

- By enumeration, for K up to `ENUMERATION_MAX_OUTPUTS`. The solution is
  the solution of a linear system on the right subset S of the weights
  (those not at their bound), so all 2^K subsets are tried at once, as a
  batch of small systems; each candidate is checked for feasibility, and
  the feasible one with the lowest objective is the answer.
- By an active-set method, above it (for any K): the same linear systems,
  on one subset at a time, the next chosen by the KKT conditions of the
  last, in a `tf.while_loop` of about K steps (at most 4K + 10: none of
  the stress runs at K = 16, 40 and 100 reached it; at the cap the answer
  is feasible, but its KKT conditions are not checked). MGDA and
  UPGrad become nonnegative quadratic problems, solved by Lawson and
  Hanson's method; CAGrad's solution is followed along a path in its
  multiplier (a parametric active set). Each ends on the subset whose KKT
  conditions hold to `KKT_TOLERANCE` relative to the scale of their terms
  (with trace(G) = 1: each `(G w)_i` within a few 1e-10, times the sum of
  the weights, of where the conditions put it), and its answer is that
  subset's linear system solved: exact to rounding, where an iterative
  solver like Frank-Wolfe (as LibMTL and TorchJD use for MGDA) stops near
  it. They solve for G shifted by its negative eigenvalue, if it has one
  (rounding of a float32 Gramian, which makes the problems non-convex).

An output absent from the batch (`present` False: no labelled example of
it) has a zero row and column of G, and each problem is posed on the
present outputs alone: an absent output's weight is held at 0 (at its
bound, for UPGrad). `present=None`, all outputs, is the problem as it was
before `present` existed, operation for operation.

The train step hands every method G divided by its trace
(`adaptive_step.method_weights`), so both see trace(G) = 1. The active-set
methods assume no scale (each tolerance is relative to G's); the
enumeration's check of its systems' residuals is absolute, right for
trace(G) from ~1e-6 to ~1e4 (at 1e6 it can miss MGDA's answer).
Both are float64 and run inside a `tf.function`, also with `jit_compile`
(but on CPU, XLA's batched Cholesky is 20 times slower than TensorFlow's:
UPGrad at K = 40 takes 0.47 s instead of 13 ms). Neither raises on a
singular or ill-conditioned Gramian: a system that Cholesky cannot factor
is solved by its eigendecomposition instead.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import numpy as np
import tensorflow as tf

# Enumeration up to this K, the active-set methods above it: whichever is
# cheaper, by docs/experiments/solver_cost.py (docs/figures/solver_cost.json:
# median call in a tf.function, Gramian of trace 1; Intel Xeon, 2 cores,
# TF 2.21, no XLA). Up to K = 6 the enumeration is faster for all three
# problems (at 6: 0.58-0.89 ms against 0.78-1.2 ms); at 7 the faster one
# depends on the problem; from 8 on, the active-set methods are (1.0-1.3 ms
# against 1.4-2.5 ms), and the enumeration's cost doubles with each output
# (8-14 ms at K = 10, 1.7-3.6 s at 16; theirs 1.4-3.9 ms).
ENUMERATION_MAX_OUTPUTS = 6
# The active-set methods stop when no KKT condition is violated by more
# than this, relative to the scale of the terms compared: 10^4 times the
# rounding of those terms at K = 100, so rounding never passes for a
# violation, and small enough that the answers are exact to rounding.
KKT_TOLERANCE = 1e-10
_INFINITY = np.float64(np.inf)  # Not np.inf: a Python float would become a float32 tensor.
_FEASIBILITY_TOLERANCE = 1e-9  # Relative to the weights' scale (they sum to about 1).
# A Cholesky pivot this small relative to the matrix's scale: singular to working precision.
_SINGULAR_PIVOT = 1e-13
# The eigendecomposition's pseudo-inverse drops eigenvalues this small relative to the largest.
_PSEUDO_INVERSE_CUTOFF = 1e-12


# --- Each problem: enumeration for small K, the active-set method above ----------------------------------------


def min_norm_in_simplex(gram: tf.Tensor, present: tf.Tensor | None = None) -> tf.Tensor:
    """`argmin_{w >= 0, sum w = 1} w^T G w`: the weights of the min-norm point of the gradients' convex hull.

    Args:
        gram: `G`, the `(K, K)` float64 Gramian of the K gradients.
        present: `(K,)` bool, the outputs that take part (the others' weights are 0); all if None.

    Returns:
        The `(K,)` weights (all 0 if no output is present).
    """
    if gram.shape[0] <= ENUMERATION_MAX_OUTPUTS:
        return min_norm_in_simplex_by_enumeration(gram, present)
    return min_norm_in_simplex_iterative(gram, present)


def project_onto_dual_cone(gram: tf.Tensor, lower: tf.Tensor, present: tf.Tensor | None = None) -> tf.Tensor:
    """`argmin_{v >= u} v^T G v` for each row `u` of `lower`: the weights of `J^T u` projected onto the dual cone.

    The projection of `J^T u` onto `{x : J x >= 0}` is `J^T v` with `v` the
    solution of this dual problem (Quinton and Rey 2024, Proposition 1).

    Args:
        gram: `G`, the `(K, K)` float64 Gramian of the K gradients.
        lower: `(R, K)` float64, one problem per row (0 in the columns of absent outputs).
        present: `(K,)` bool, the outputs that take part (the others' weights stay at their bound); all if None.

    Returns:
        The `(R, K)` weights, one row per row of `lower`.
    """
    if gram.shape[0] <= ENUMERATION_MAX_OUTPUTS:
        return project_onto_dual_cone_by_enumeration(gram, lower, present)
    return project_onto_dual_cone_iterative(gram, lower, present)


def conflict_averse(gram: tf.Tensor, c: float, present: tf.Tensor | None = None) -> tf.Tensor:
    """CAGrad's `argmin_{w in simplex} g_w . g_0 + c |g_0| |g_w|` (g_0 the mean gradient, g_w = J^T w).

    Args:
        gram: `G`, the `(K, K)` float64 Gramian of the K gradients.
        c: CAGrad's `c`, in [0, 1).
        present: `(K,)` bool, the outputs that take part (g_0 is their mean; the others' weights are 0); all if
            None.

    Returns:
        The `(K,)` weights (all 0 if no output is present).
    """
    if gram.shape[0] <= ENUMERATION_MAX_OUTPUTS:
        return conflict_averse_by_enumeration(gram, c, present)
    return conflict_averse_iterative(gram, c, present)


def mean_gradient_products(gram: tf.Tensor, present: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
    """`g_i . g_0` for each i, and `|g_0|^2`: g_0 the mean of the present outputs' gradients.

    The means over all K outputs times K / m: an absent output's entries of
    G are 0. All present, the factor is exactly 1.
    """
    # None present: G is 0, and so are both.
    to_present = gram.shape[0] / present_count(_all_if_none(present, gram))
    return tf.reduce_mean(gram, axis=1) * to_present, tf.reduce_mean(gram) * to_present ** 2


def present_count(present: tf.Tensor, dtype: tf.DType = tf.float64) -> tf.Tensor:
    """m, the number of present outputs; 1 when there are none, so that dividing by it is safe."""
    return tf.maximum(tf.reduce_sum(tf.cast(present, dtype)), 1.0)


def _all_if_none(present: tf.Tensor | None, gram: tf.Tensor) -> tf.Tensor:
    """`present`, or every output of `gram` if it is None."""
    return tf.ones([gram.shape[0]], tf.bool) if present is None else present


# --- Enumeration of every subset --------------------------------------------------------------------------------


def subsets(k: int, *, include_empty: bool) -> tf.Tensor:
    """Every subset of K items as a 0/1 mask, `(2^K [- 1], K)` float64."""
    masks = [bits for bits in itertools.product((0.0, 1.0), repeat=k) if include_empty or any(bits)]
    return tf.constant(np.array(masks), tf.float64)


def _within(masks: tf.Tensor, present: tf.Tensor) -> tf.Tensor:
    """For each subset (a row of 0/1 `masks`), whether it holds present outputs only."""
    return tf.reduce_all((masks == 0.0) | present[None, :], axis=1)


def _lowest_feasible(candidates: tf.Tensor, objective: tf.Tensor, feasible: tf.Tensor) -> tf.Tensor:
    """The candidate (a row) with the lowest objective among the feasible ones; zeros if none is (none present)."""
    lowest = tf.gather(candidates, tf.argmin(tf.where(feasible, objective, np.inf)))
    return tf.where(tf.reduce_any(feasible), lowest, tf.zeros_like(lowest))


def _quadratic(weights: tf.Tensor, gram: tf.Tensor) -> tf.Tensor:
    """`w^T G w` for each row `w`."""
    return tf.einsum("ci,ij,cj->c", weights, gram, weights)


def min_norm_in_simplex_by_enumeration(gram: tf.Tensor, present: tf.Tensor | None = None) -> tf.Tensor:
    """`min_norm_in_simplex` by trying all 2^K - 1 supports (those of present outputs only)."""
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
    feasible = ((tf.reduce_min(weights, axis=1) >= -_FEASIBILITY_TOLERANCE) & (residual <= 1e-6)
                & _within(masks, _all_if_none(present, gram)))
    return _project_to_simplex(_lowest_feasible(weights, _quadratic(weights, gram), feasible))


def project_onto_dual_cone_by_enumeration(gram: tf.Tensor, lower: tf.Tensor, present: tf.Tensor | None = None
                                          ) -> tf.Tensor:
    """`project_onto_dual_cone` by trying all 2^K supports (of present outputs only), for every row of `lower`."""
    k = gram.shape[0]
    masks = subsets(k, include_empty=True)  # S: the weights above their bound.
    # For each S: (G v)_i = 0 for i in S, v_i = lower_i outside S.
    systems = masks[:, :, None] * gram + tf.linalg.diag(1.0 - masks)
    inverse = tf.linalg.pinv(systems)  # (subsets, K, K)
    rhs = (1.0 - masks)[None, :, :] * lower[:, None, :]  # (R, subsets, K)
    candidates = tf.einsum("sij,rsj->rsi", inverse, rhs)
    residual = tf.norm(tf.einsum("sij,rsj->rsi", systems, candidates) - rhs, axis=2)
    feasible = ((tf.reduce_min(candidates - lower[:, None, :], axis=2) >= -_FEASIBILITY_TOLERANCE) & (residual <= 1e-6)
                & _within(masks, _all_if_none(present, gram))[None, :])
    objective = tf.einsum("rsi,ij,rsj->rs", candidates, gram, candidates)
    best = tf.argmin(tf.where(feasible, objective, np.inf), axis=1)
    return tf.gather(candidates, best, batch_dims=1)


def conflict_averse_by_enumeration(gram: tf.Tensor, c: float, present: tf.Tensor | None = None) -> tf.Tensor:
    """`conflict_averse` by trying all 2^K - 1 supports (those of present outputs only).

    On a subset S, stationarity gives `w_S` proportional to
    `G_SS^-1 (mu 1 - a_S)` (a_i = g_i . g_0), and `|g_w| = c |g_0|` fixes mu
    by a quadratic; each candidate's objective is then evaluated directly.
    """
    k = gram.shape[0]
    present = _all_if_none(present, gram)
    masks = subsets(k, include_empty=False)
    a, g_0_squared = mean_gradient_products(gram, present)  # g_i . g_0, |g_0|^2
    rho = c * tf.sqrt(tf.maximum(g_0_squared, 0.0))  # c |g_0|
    outer = masks[:, :, None] * masks[:, None, :]
    inverse = masks[:, :, None] * tf.linalg.pinv(outer * gram) * masks[:, None, :]  # G_SS^-1, zero outside S.
    p = tf.reduce_sum(inverse, axis=2)  # G_SS^-1 1
    q = tf.linalg.matvec(inverse, a)  # G_SS^-1 a_S
    sum_p, sum_q, a_q = tf.reduce_sum(p, 1), tf.reduce_sum(q, 1), tf.linalg.matvec(q, a)
    discriminant = sum_q ** 2 - sum_p * (a_q - rho ** 2)
    mu = (sum_q + tf.sqrt(tf.maximum(discriminant, 0.0))) / tf.where(sum_p > 0, sum_p, 1.0)
    denominator = mu[:, None] * p - q
    weights = denominator / tf.reduce_sum(denominator, axis=1, keepdims=True)
    # The vertices, and MGDA's point (where g_w may vanish), are candidates too: of present outputs only.
    weights = tf.concat([weights, tf.eye(k, dtype=tf.float64),
                         min_norm_in_simplex_by_enumeration(gram, present)[None, :]], axis=0)
    well_posed = tf.concat([(discriminant >= 0) & (sum_p > 0) & _within(masks, present), present,
                            tf.reduce_any(present)[None]], axis=0)
    return _lowest_conflict_averse(weights, gram, a, rho, well_posed)


def _lowest_conflict_averse(weights: tf.Tensor, gram: tf.Tensor, a: tf.Tensor, rho: tf.Tensor,
                            well_posed: tf.Tensor) -> tf.Tensor:
    """Among candidate weights (rows), the one in the simplex with the lowest CAGrad objective (`a_i = g_i . g_0`)."""
    feasible = well_posed & tf.reduce_all(tf.math.is_finite(weights), axis=1) & (
        tf.reduce_min(weights, axis=1) >= -_FEASIBILITY_TOLERANCE)
    weights = tf.where(feasible[:, None], weights, 0.0)
    objective = tf.linalg.matvec(weights, a) + rho * tf.sqrt(tf.maximum(_quadratic(weights, gram), 0.0))
    return _project_to_simplex(_lowest_feasible(weights, objective, feasible))


def _project_to_simplex(weights: tf.Tensor) -> tf.Tensor:
    """Rounding off: weights within the tolerance of 0 made 0, and the sum made exactly 1 (zeros stay zeros)."""
    weights = tf.maximum(weights, 0.0)
    return tf.math.divide_no_nan(weights, tf.reduce_sum(weights))


# --- The active-set methods -------------------------------------------------------------------------------------


def min_norm_in_simplex_iterative(gram: tf.Tensor, present: tf.Tensor | None = None) -> tf.Tensor:
    """`min_norm_in_simplex` as a nonnegative quadratic problem (Lawson and Hanson's least distance programming).

    At the solution w*, `(G w*)_i >= w*^T G w* = delta`, with equality where
    `w*_i > 0`. So `x = w* / (s + delta)` satisfies the KKT conditions of
    `argmin_{x >= 0} 1/2 x^T (G + s 1 1^T) x - 1^T x` for any s > 0, and
    `w* = x / sum(x)`. With s the mean of G's diagonal, the two terms have
    the same scale; x stays bounded even when 0 is in the convex hull.
    Absent outputs are held at 0.
    """
    k = gram.shape[0]
    gram = _positive_semidefinite(gram)
    lift = _mean_diagonal(gram)
    x = nonnegative_quadratic(gram + lift, tf.ones([1, k], tf.float64), allowed=present)[0]
    return _project_to_simplex(x)


def project_onto_dual_cone_iterative(gram: tf.Tensor, lower: tf.Tensor, present: tf.Tensor | None = None
                                     ) -> tf.Tensor:
    """`project_onto_dual_cone` with `v = u + x`: `argmin_{x >= 0} 1/2 x^T G x + (G u)^T x`, all rows at once.

    Absent outputs' `x_i` are held at 0 (their weights at their bound).
    """
    gram = _positive_semidefinite(gram)
    return lower + nonnegative_quadratic(gram, -tf.linalg.matmul(lower, gram), allowed=present)


def conflict_averse_iterative(gram: tf.Tensor, c: float, present: tf.Tensor | None = None) -> tf.Tensor:
    """`conflict_averse` by following its solution along its multiplier (see `_conflict_averse_path`).

    Like the enumeration, the vertices and MGDA's point are candidates too:
    where the answer's `g_w` vanishes (0 on the boundary of the convex hull)
    the path does not reach it. Absent outputs never enter the path, nor
    are their vertices candidates.
    """
    k = gram.shape[0]
    present = _all_if_none(present, gram)
    a, g_0_squared = mean_gradient_products(gram, present)  # g_i . g_0, |g_0|^2
    rho = c * tf.sqrt(tf.maximum(g_0_squared, 0.0))  # c |g_0|
    x = _conflict_averse_path(_positive_semidefinite(gram), a, rho, present)
    total = tf.reduce_sum(x)
    path = x / tf.where(total > 0, total, 1.0)
    weights = tf.concat([path[None], tf.eye(k, dtype=tf.float64), min_norm_in_simplex_iterative(gram, present)[None]],
                        axis=0)
    well_posed = tf.concat([[total > 0], present, tf.reduce_any(present)[None]], axis=0)
    return _lowest_conflict_averse(weights, gram, a, rho, well_posed)


class _ActiveSet(NamedTuple):
    """Lawson and Hanson's state for each problem (a row of each field)."""

    x: tf.Tensor  # The iterate, >= 0, and 0 outside the passive set.
    passive: tf.Tensor  # The indices free to be > 0.
    rejected: tf.Tensor  # The indices barred from entering until x moves.
    done: tf.Tensor  # Whether x is the solution.


def nonnegative_quadratic(q: tf.Tensor, c: tf.Tensor, allowed: tf.Tensor | None = None) -> tf.Tensor:
    """`argmin_{x >= 0} 1/2 x^T Q x - c^T x` for each row of `c`, by Lawson and Hanson's active-set method.

    The Gram form of NNLS (Bro and De Jong's fast NNLS). Each problem keeps
    a passive set P (the x_i free to be > 0) and an x >= 0 that is 0
    outside P. Each step solves `Q_PP s_P = c_P`; if `s_P > 0`, x = s, and
    the index outside P with the largest residual `(c - Q x)_i` (the most
    negative partial derivative) enters P, unless none exceeds
    `KKT_TOLERANCE` times the scale of the terms, when x is the solution;
    otherwise x moves towards s as far as x >= 0 allows, and the indices
    that reach 0 leave P. Finite in exact arithmetic (each entry lowers the
    objective, so no P repeats); capped at a few times K steps. An index
    that enters and must leave at once (only rounding does that, on a
    column nearly dependent on P's) may not enter again until x moves, as
    in Lawson and Hanson's code. An index not `allowed` never enters: it is
    held at 0, which is the problem without it.

    Args:
        q: `Q`, `(K, K)` float64, symmetric positive semi-definite.
        c: `(B, K)` float64, one problem per row, all sharing `Q`.
        allowed: `(K,)` bool, the indices that may leave 0; all if None.

    Returns:
        `x`, `(B, K)`.
    """
    k = q.shape[0]
    held_at_zero = ~_all_if_none(allowed, q)[None, :]
    unit = _mean_diagonal(q)
    largest_entry = tf.reduce_max(tf.linalg.diag_part(q))  # |Q_ij| <= max_i Q_ii for a PSD Q.

    def step(state: _ActiveSet) -> tuple[_ActiveSet]:
        x, passive, rejected, done = state
        s = _solve_on_support(q, passive, c[:, :, None], unit)[:, :, 0]
        interior = tf.reduce_all((s > 0) | ~passive, axis=1)
        # Where s is interior: x = s, and an index enters.
        residual = c - tf.linalg.matmul(s, q)
        # The rounding of c - Q s is below eps times the size of its terms.
        tolerance = KKT_TOLERANCE * (tf.reduce_max(tf.abs(c), axis=1) + largest_entry * tf.reduce_sum(tf.abs(s), 1))
        still_rejected = rejected & ~tf.reduce_any(s != x, axis=1, keepdims=True)
        candidates = tf.where(passive | still_rejected | held_at_zero, -_INFINITY, residual)
        enters = tf.reduce_max(candidates, axis=1) > tolerance
        entry = tf.one_hot(tf.argmax(candidates, axis=1), k, on_value=True, off_value=False) & enters[:, None]
        # Elsewhere: x moves to the boundary. A step of length 0 can only be the index that just entered
        # leaving at once, which rounding alone causes (Lawson and Hanson): it may not enter again until x moves.
        x_at_boundary, leaving, stalled = _step_to_boundary(x, s, passive)
        rejected_at_boundary = (rejected | leaving) & stalled[:, None]
        after = _ActiveSet(x=tf.where(interior[:, None], s, x_at_boundary),
                           passive=tf.where(interior[:, None], passive | entry, passive & ~leaving),
                           rejected=tf.where(interior[:, None], still_rejected, rejected_at_boundary),
                           done=done | (interior & ~enters))
        return (tf.nest.map_structure(lambda before, now: _where_rows(done, before, now), state, after),)

    def unfinished(state: _ActiveSet) -> tf.Tensor:
        return ~tf.reduce_all(state.done)

    no = tf.zeros_like(c, dtype=tf.bool)
    start = _ActiveSet(x=tf.zeros_like(c), passive=no, rejected=no, done=tf.zeros_like(c[:, 0], tf.bool))
    (solved,) = tf.while_loop(unfinished, step, (start,), maximum_iterations=_step_cap(k))
    return solved.x


def _where_rows(rows: tf.Tensor, if_true: tf.Tensor, if_false: tf.Tensor) -> tf.Tensor:
    """Row i of `if_true` where `rows[i]`, else of `if_false`."""
    return tf.where(tf.reshape(rows, [-1] + [1] * (if_true.shape.rank - 1)), if_true, if_false)


def _step_to_boundary(x: tf.Tensor, s: tf.Tensor, passive: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """From x towards s as far as x >= 0 allows: the new x, the indices that reach 0, and whether x stayed."""
    blocking = passive & (s <= 0)
    gap = x - s  # > 0 where blocking, unless x_i = s_i = 0.
    ratio = tf.where(blocking, tf.math.divide_no_nan(x, tf.where(blocking, gap, 1.0)), _INFINITY)
    length = tf.reduce_min(ratio, axis=1)
    length = tf.where(tf.math.is_finite(length), length, 0.0)
    moved = x + length[:, None] * (s - x)
    # The index that blocks is exactly 0; others may round to just above or below.
    leaving = (tf.one_hot(tf.argmin(ratio, axis=1), x.shape[1], on_value=True, off_value=False) & blocking) | (
        passive & (moved <= 0))
    return tf.where(leaving, tf.zeros_like(moved), moved), leaving, length == 0


class _Path(NamedTuple):
    """Where CAGrad's path is."""

    mu: tf.Tensor  # The multiplier.
    support: tf.Tensor  # S, the indices where x(mu) > 0 (or about to be).
    x: tf.Tensor  # x(mu).
    done: tf.Tensor  # Whether x^T G x has reached rho^2 (or the path cannot go on).


def _conflict_averse_path(gram: tf.Tensor, a: tf.Tensor, rho: tf.Tensor, present: tf.Tensor) -> tf.Tensor:
    """CAGrad's weights times `rho / |g_w|`, by following `x(mu) = argmin_{x >= 0} 1/2 x^T G x + (a - mu 1)^T x`.

    The KKT conditions of CAGrad's problem say that `x = (rho / |g_w|) w`
    solves this nonnegative quadratic problem for some mu (CAGrad's optimal
    value) with `x^T G x = rho^2`. Below `mu = min_i a_i`, x(mu) = 0; as mu
    grows, on a support S, `x_S = mu p - q` with `p = G_SS^-1 1` and
    `q = G_SS^-1 a_S`, until an `x_i` reaches 0 (i leaves S) or a residual
    `mu - a_j - (G x)_j` outside S reaches 0 (j enters). `x^T G x` grows
    with mu (its derivative is `2 sum x`); the path stops where, on its
    segment, `x^T G x = mu^2 sum(p) - 2 mu sum(q) + a_S . q = rho^2`:
    there x is the enumeration's closed form on S. A segment per event, at
    most a few times K. Only present outputs enter S.
    """
    k = gram.shape[0]
    unit = _mean_diagonal(gram)
    ones_and_a = tf.stack([tf.ones_like(a), a], axis=1)[None]  # (1, K, 2)

    def segment(path: _Path) -> tuple[_Path]:
        p, q = tf.unstack(_solve_on_support(gram, path.support[None], ones_and_a, unit)[0], axis=1)
        stop_at = tf.maximum(_where_norm_reaches(rho, a, p, q), path.mu)
        event_at = _events(gram, a, p, q, path.support, present)
        # Rounding may put an event just behind mu: it happens now.
        next_event = tf.maximum(tf.reduce_min(event_at), path.mu)
        stops = stop_at <= next_event
        mu = tf.where(stops, stop_at, next_event)
        # Entering and leaving both flip the index's place in S.
        flipped = tf.one_hot(tf.argmin(event_at) % k, k, on_value=True, off_value=False) & ~stops
        support = tf.math.logical_xor(path.support, flipped)
        goes_on = tf.math.is_finite(mu)  # Else nothing lies ahead (a singular G_SS): x stays, the last point.
        after = _Path(mu=mu, support=support, done=stops | ~goes_on,
                      x=tf.where(goes_on, tf.where(support, tf.maximum(mu * p - q, 0.0), 0.0), path.x))
        return (tf.nest.map_structure(lambda before, now: tf.where(path.done, before, now), path, after),)

    def unfinished(path: _Path) -> tf.Tensor:
        return ~path.done

    first = tf.argmin(tf.where(present, a, _INFINITY))
    start = _Path(mu=a[first], support=tf.one_hot(first, k, on_value=True, off_value=False), x=tf.zeros_like(a),
                  done=tf.constant(False))
    (end,) = tf.while_loop(unfinished, segment, (start,), maximum_iterations=_step_cap(k))
    return end.x


def _where_norm_reaches(rho: tf.Tensor, a: tf.Tensor, p: tf.Tensor, q: tf.Tensor) -> tf.Tensor:
    """The mu at which `x = mu p - q` has `x^T G x = rho^2` (the larger root), or infinity if none."""
    sum_p, sum_q = tf.reduce_sum(p), tf.reduce_sum(q)
    discriminant = sum_q ** 2 - sum_p * (tf.tensordot(a, q, 1) - rho ** 2)
    root = (sum_q + tf.sqrt(tf.maximum(discriminant, 0.0))) / tf.where(sum_p > 0, sum_p, 1.0)
    return tf.where(sum_p > 0, root, _INFINITY)


def _events(gram: tf.Tensor, a: tf.Tensor, p: tf.Tensor, q: tf.Tensor, support: tf.Tensor, present: tf.Tensor
            ) -> tf.Tensor:
    """The mu at which each present index outside S would enter, then each in S leave: `(2K,)`, infinity if never."""
    # Each derivative in mu is ~1 for an index that moves; one that is 0 but for rounding (a duplicated
    # gradient: G p = 1 there too) moves never.
    rounding = KKT_TOLERANCE * (1.0 + tf.reduce_max(tf.linalg.diag_part(gram)) * tf.reduce_sum(tf.abs(p)))
    slope = 1.0 - tf.linalg.matvec(gram, p)  # d/dmu of the residual mu - a_j - (G x)_j.
    rises = ~support & present & (slope > rounding)
    enter_at = tf.where(rises, (a - tf.linalg.matvec(gram, q)) / tf.where(rises, slope, 1.0), _INFINITY)
    falls = support & (p < -rounding * tf.reduce_max(tf.abs(p)))  # p = d/dmu of x on S.
    leave_at = tf.where(falls, q / tf.where(falls, p, -1.0), _INFINITY)
    return tf.concat([enter_at, leave_at], axis=0)


def _positive_semidefinite(gram: tf.Tensor) -> tf.Tensor:
    """G shifted by its most negative eigenvalue, if any: rounding of its entries, which makes the problems non-convex.

    A Gramian has no negative eigenvalue, but one of float32 products (as
    `gramian.gramian` computes it) has them, of ~1e-8 of its trace, where
    its gradients are nearly dependent; UPGrad's problem is then unbounded
    below along the eigenvector. The shift is of the size of that rounding.
    """
    smallest = tf.reduce_min(tf.linalg.eigvalsh(gram))
    return gram + tf.maximum(-smallest, 0.0) * tf.eye(gram.shape[0], dtype=gram.dtype)


def _step_cap(k: int) -> int:
    """The most steps an active-set method takes: they take about K (one per index that enters; few leave)."""
    return 4 * k + 10


def _mean_diagonal(matrix: tf.Tensor) -> tf.Tensor:
    """The mean of the diagonal (the scale of a Gramian's entries), or 1 where it is 0."""
    mean = tf.reduce_mean(tf.linalg.diag_part(matrix))
    return tf.where(mean > 0, mean, 1.0)


def _solve_on_support(matrix: tf.Tensor, support: tf.Tensor, rhs: tf.Tensor, unit: tf.Tensor) -> tf.Tensor:
    """`matrix_SS^-1 rhs_S`, 0 outside S, for each row of `support` `(B, K)` (bool) and `rhs` `(B, K, M)`.

    Each system is `matrix` on S and `unit` times the identity elsewhere
    (`unit`, the scale of `matrix`, leaves the conditioning as it is),
    solved by Cholesky; where a pivot is zero to working precision (a
    singular or, from rounding, slightly indefinite `matrix_SS`), by the
    eigendecomposition's pseudo-inverse instead, all of the batch at once.
    """
    k = matrix.shape[0]
    both_in_support = support[:, :, None] & support[:, None, :]
    system = tf.where(both_in_support, matrix, unit * tf.eye(k, dtype=matrix.dtype))
    rhs = tf.where(support[:, :, None], rhs, 0.0)

    def by_cholesky() -> tf.Tensor:
        factor = tf.linalg.cholesky(system)  # Where it fails, NaN (TF 2.21 on CPU logs a warning; it does not raise).
        factored = tf.reduce_all(tf.linalg.diag_part(factor) ** 2 > _SINGULAR_PIVOT * unit)  # False for NaN.
        return tf.cond(factored, lambda: tf.linalg.cholesky_solve(factor, rhs),
                       lambda: _pseudo_inverse_solve(system, rhs))

    # A zero on S's diagonal (an output with no gradient) makes a system singular before any factoring:
    # straight to the eigendecomposition, without Cholesky's failure and warning.
    zero_diagonal = tf.reduce_any(support & (tf.linalg.diag_part(matrix)[None, :] <= _SINGULAR_PIVOT * unit))
    solution = tf.cond(zero_diagonal, lambda: _pseudo_inverse_solve(system, rhs), by_cholesky)
    return tf.where(support[:, :, None], solution, 0.0)


def _pseudo_inverse_solve(system: tf.Tensor, rhs: tf.Tensor) -> tf.Tensor:
    """`system^+ rhs` for symmetric systems, eigenvalues within `_PSEUDO_INVERSE_CUTOFF` of 0 taken as 0."""
    eigenvalues, vectors = tf.linalg.eigh(system)
    kept = eigenvalues > _PSEUDO_INVERSE_CUTOFF * tf.reduce_max(tf.abs(eigenvalues), axis=1, keepdims=True)
    inverse = tf.where(kept, 1.0 / tf.where(kept, eigenvalues, 1.0), 0.0)
    return tf.linalg.matmul(vectors, inverse[:, :, None] * tf.linalg.matmul(vectors, rhs, transpose_a=True))
