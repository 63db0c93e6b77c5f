"""The gradient-based methods: each a small function from the Gramian `G` (and its state) to the weights `a`.

The shared weights are then updated by `sum_k a_k g_k`, `g_k` output k's
gradient (of its loss already times its `--loss_weights` weight). `G` is
float64 `(K, K)`, the same on every replica; so are the weights.

`present` `(K,)` bool says which outputs take part (an output with no
labelled example in the batch does not): an absent output's row and column
of G are zeros, its weight is 0, and the present outputs get the method's
weights for them alone, as if the others did not exist (`m` below is their
number). All present, each function is the method as written, operation
for operation.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from mto_tf.core.weighting import solvers


def mgda(gram: tf.Tensor, present: tf.Tensor) -> tf.Tensor:
    """Sener and Koltun 2018: the min-norm point of the convex hull of the gradients (exact)."""
    return solvers.min_norm_in_simplex(gram, present)


def upgrad(gram: tf.Tensor, present: tf.Tensor) -> tf.Tensor:
    """Quinton and Rey 2024: the mean of each gradient projected onto the dual cone of all (`J d >= 0`)."""
    # Row i: the weights of g_i / m projected (a zero row for an absent output); the update is their sum.
    mean_of_each = tf.linalg.diag(_indicator(present)) / solvers.present_count(present)
    return tf.reduce_sum(solvers.project_onto_dual_cone(gram, mean_of_each, present), axis=0)


def cagrad(gram: tf.Tensor, present: tf.Tensor, *, c: float) -> tf.Tensor:
    """Liu et al. 2021, Algorithm 1: `d = g_0 + (c |g_0| / |g_w|) g_w`, g_0 the mean gradient."""
    w = solvers.conflict_averse(gram, c, present)
    g_w_norm = tf.sqrt(tf.maximum(tf.einsum("i,ij,j->", w, gram, w), 0.0))
    _, g_0_squared = solvers.mean_gradient_products(gram, present)
    g_0_norm = tf.sqrt(tf.maximum(g_0_squared, 0.0))
    # |g_w| = 0: a convex combination of the gradients vanishes (a Pareto-stationary point): no step.
    scale = tf.math.divide_no_nan(c * g_0_norm, g_w_norm)
    mean = _indicator(present) / solvers.present_count(present)  # g_0's weights.
    return tf.where(g_w_norm > 0, mean + scale * w, tf.zeros_like(mean))


def imtl(gram: tf.Tensor, present: tf.Tensor) -> tf.Tensor:
    """Liu et al. 2021, IMTL-G: weights summing to 1 whose update has equal projections on every unit gradient.

    With a reference output r: `a_{-r} = g_r U^T (D U^T)^-1`, `a_r = 1 -
    sum a_{-r}`, with rows `D_j = g_r - g_j`, `U_j = u_r - u_j`, `u_j = g_j /
    |g_j|`; every product is read from G. The reference is the largest
    gradient (the paper's first one: any gives the same weights). An output
    with no gradient (an absent one among them) has no unit gradient to be
    projected on: it gets weight 0, and the others are balanced among
    themselves.
    """
    k = gram.shape[0]
    norms = tf.sqrt(tf.maximum(tf.linalg.diag_part(gram), 0.0))
    has_gradient = norms > 0
    reference = tf.argmax(norms)
    g_dot_u = gram / tf.where(has_gradient, norms, 1.0)[None, :]  # (g_i . u_j) = G[i, j] / |g_j|.
    g_r_u = tf.gather(g_dot_u, reference)  # g_r . u_j
    g_u_r = tf.gather(g_dot_u, reference, axis=1)  # g_i . u_r
    # (g_r - g_i) . (u_r - u_j) at [i, j], and g_r . (u_r - u_j): the system and target of equation j.
    system = g_r_u[reference] - g_r_u[None, :] - g_u_r[:, None] + g_dot_u
    target = g_r_u[reference] - g_r_u
    unknown = has_gradient & ~tf.one_hot(reference, k, on_value=True, off_value=False)
    equations = tf.where(unknown[:, None] & unknown[None, :], tf.transpose(system), tf.eye(k, dtype=gram.dtype))
    # A least-squares solve: finite when gradients are linearly dependent (K above the rank of J), where the
    # equal projections do not determine `a`; the solution of the system wherever it has one.
    rest = tf.where(unknown, tf.linalg.matvec(tf.linalg.pinv(equations), tf.where(unknown, target, 0.0)), 0.0)
    # No output present: the reference is absent, and every weight 0.
    return tf.where(present, rest + tf.one_hot(reference, k, dtype=gram.dtype) * (1.0 - tf.reduce_sum(rest)), 0.0)


def aligned_mtl(gram: tf.Tensor, present: tf.Tensor) -> tf.Tensor:
    """Senushkin et al. 2023: the gradients' matrix made orthogonal with equal singular values (the smallest).

    `G = V diag(l) V^T`; the aligned update is `J^T B 1`, `B = sqrt(l_min) V diag(l)^-1/2 V^T`
    over the non-zero eigenvalues (the rank of J). An absent output's zero
    row and column add an eigenvalue 0, dropped with the others.
    """
    eigenvalues, vectors = tf.linalg.eigh(gram)
    # Zero within the rounding of a float32 Gramian of m gradients: the rank of J.
    tolerance = tf.reduce_max(eigenvalues) * solvers.present_count(present) * float(np.finfo(np.float32).eps)
    kept = eigenvalues > tolerance
    smallest = tf.reduce_min(tf.where(kept, eigenvalues, eigenvalues[-1]))
    inverse_sqrt = tf.where(kept, tf.math.rsqrt(tf.where(kept, eigenvalues, 1.0)), 0.0)
    balance = tf.sqrt(smallest) * (vectors * inverse_sqrt[None, :]) @ tf.transpose(vectors)
    return tf.where(present, tf.reduce_sum(balance, axis=1), 0.0)


def pcgrad(gram: tf.Tensor, order: tf.Tensor, present: tf.Tensor) -> tf.Tensor:
    """Yu et al. 2020: each gradient projected in turn off each conflicting other one (in `order[i]`); summed.

    `g_i^PC` is kept as coefficients `c_i` (g_i^PC = J^T c_i, row i of C),
    so each projection `g_i^PC -= (g_i^PC . g_j / |g_j|^2) g_j` reads G
    only; every output takes its next projection at once. `order[i]`: the
    other outputs, in output i's random order (`random_orders`). A
    projection off an absent output's zero gradient changes nothing, and an
    absent output's own row stays its own: only the present rows are summed.
    """
    k = gram.shape[0]
    coefficients = tf.eye(k, dtype=tf.float64)
    for position in range(k - 1):
        others = order[:, position]  # Output i's next other output, for each i.
        dots = tf.reduce_sum(coefficients * tf.gather(gram, others), axis=1)  # g_i^PC . g_j (G is symmetric)
        squared_norms = tf.gather(tf.linalg.diag_part(gram), others)
        conflicting = (dots < 0) & (squared_norms > 0)
        steps = tf.where(conflicting, dots / tf.where(squared_norms > 0, squared_norms, 1.0), 0.0)
        coefficients -= steps[:, None] * tf.one_hot(others, k, dtype=tf.float64)
    # Column j: the weight of g_j in sum_i g_i^PC over the present outputs i.
    return tf.reduce_sum(tf.where(present[:, None], coefficients, 0.0), axis=0)


def random_orders(present: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """For each output i, the other outputs in a random order, `(K, K-1)`; the same wherever `seed` is.

    The present outputs come first, in the order a run with those m outputs
    alone would draw: its keys are the first m * m draws of the same
    stateless stream (a stateless draw of n numbers is the first n of any
    longer one), read as its (m, m) matrix. The absent ones follow.
    """
    k = present.shape[0]
    m = tf.reduce_sum(tf.cast(present, tf.int32))
    place = tf.cumsum(tf.cast(present, tf.int32), exclusive=True)  # A present output's index among the present.
    draws = tf.random.stateless_uniform([k * k], seed=seed, dtype=tf.float64)
    keys = tf.gather(draws, place[:, None] * m + place[None, :])
    keys = tf.where(present[:, None] & present[None, :], keys, tf.constant(2.0, tf.float64))  # Absent: after.
    keys = tf.where(tf.eye(k, dtype=tf.bool), tf.constant(3.0, tf.float64), keys)  # Output i itself last.
    return tf.argsort(keys, axis=1)[:, :k - 1]


def gradnorm_loss(weights: tf.Tensor, gradient_norms: tf.Tensor, loss_ratios: tf.Tensor, alpha: float,
                  present: tf.Tensor) -> tf.Tensor:
    """Chen et al. 2018, eq. 2: `sum_i |w_i |g_i| - mean(w |g|) * r_i^alpha|`, the target held constant.

    `r_i` is output i's loss over its initial loss, relative to the mean of
    those ratios (its inverse training rate). Sums and means are over the
    present outputs (an absent one's weight is 0).
    """
    count = solvers.present_count(present, weights.dtype)
    weighted_norms = weights * gradient_norms
    mean_ratio = tf.reduce_sum(tf.where(present, loss_ratios, 0.0)) / count
    relative_rates = tf.math.divide_no_nan(loss_ratios, mean_ratio)  # No output present: no ratio, 0.
    target = tf.stop_gradient(tf.reduce_sum(weighted_norms) / count * relative_rates ** alpha)
    return tf.reduce_sum(tf.where(present, tf.abs(weighted_norms - target), 0.0))


def _indicator(present: tf.Tensor) -> tf.Tensor:
    """1.0 where present, 0.0 elsewhere (float64)."""
    return tf.cast(present, tf.float64)

