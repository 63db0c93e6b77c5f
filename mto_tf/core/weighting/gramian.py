"""The outputs' gradients of the shared weights, their Gramian `G = J J^T`, and the combined update `sum_k a_k g_k`.

`J` stacks, one row per output, the output's (weighted) loss gradient with
respect to every weight that more than one output reaches. It is never
built: each variable contributes its block's `K x K` product to `G`, and
its combined gradient is `a` times its block. An embedding's gradient is a
`tf.IndexedSlices` with one row per looked-up token, duplicates not summed:
the rows of each index are summed first, so dot products and the combined
update are those of the dense gradients, and the update stays sparse for
Keras's optimizers.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from mto_tf.core.replicas import summed_over_replicas


@dataclasses.dataclass(frozen=True)
class OutputGradients:
    """Each output's gradient of each variable, split by who reaches the variable."""

    shared: list[int]  # Variables more than one output reaches: their update is `sum_k a_k g_k`.
    own: dict[int, int]  # Variable -> the one output that reaches it (a head): its gradient, unweighted by `a`.
    per_output: list[list]  # per_output[k][v]: output k's gradient of variable v (None where it does not reach it).


def output_gradients(tape: tf.GradientTape, output_losses: list[tf.Tensor], variables: list[tf.Variable]
                     ) -> OutputGradients:
    """One backward pass per output through what it reaches (the tape must be persistent)."""
    per_output = [tape.gradient(loss, variables) for loss in output_losses]
    reached_by = [[k for k, gradients in enumerate(per_output) if gradients[v] is not None]
                  for v in range(len(variables))]  # Known when the step is traced.
    return OutputGradients(shared=[v for v, outputs in enumerate(reached_by) if len(outputs) > 1],
                           own={v: outputs[0] for v, outputs in enumerate(reached_by) if len(outputs) == 1},
                           per_output=per_output)


def all_reduced(gradients: OutputGradients) -> OutputGradients:
    """Every output's gradients summed over replicas and workers: the global gradients, before any Gramian."""
    return dataclasses.replace(gradients, per_output=summed_over_replicas(gradients.per_output))


@dataclasses.dataclass(frozen=True)
class Block:
    """One shared variable's K gradients (rows summed per index for a sparse one), each in its own tensor."""

    rows: list[tf.Tensor]  # Output k's gradient: the variable's shape, or (unique indices, row...) when sparse.
    indices: tf.Tensor | None  # A sparse gradient's unique row indices; None for a dense one.
    dense_shape: tf.Tensor | None


def shared_blocks(gradients: OutputGradients, variables: list[tf.Variable]) -> list[Block]:
    """The shared variables' blocks; an output that does not reach a shared variable contributes zeros."""
    blocks = []
    for v in gradients.shared:
        column = [row[v] for row in gradients.per_output]
        if all(g is None or isinstance(g, tf.IndexedSlices) for g in column):
            blocks.append(_sparse_block(column))
        else:
            blocks.append(Block(rows=[tf.zeros_like(variables[v]) if g is None else tf.convert_to_tensor(g)
                                      for g in column], indices=None, dense_shape=None))
    return blocks


def _sparse_block(column: list[tf.IndexedSlices | None]) -> Block:
    """Each output's rows summed per index, over the union of the indices all outputs touched."""
    present = [g for g in column if g is not None]
    indices, positions = tf.unique(tf.concat([g.indices for g in present], axis=0))
    num_rows = tf.shape(indices)[0]
    row_shape = tf.shape(present[0].values)[1:]
    rows, offset = [], 0
    for g in column:
        if g is None:
            rows.append(tf.zeros(tf.concat([[num_rows], row_shape], 0), present[0].values.dtype))
            continue
        count = tf.shape(g.indices)[0]
        rows.append(tf.math.unsorted_segment_sum(g.values, positions[offset:offset + count], num_rows))
        offset += count
    return Block(rows=rows, indices=indices, dense_shape=present[0].dense_shape)


def gramian(blocks: list[Block]) -> tf.Tensor:
    """`G[i, j] = g_i . g_j` over every shared weight, `(K, K)`, in float64 for the methods' small solves.

    Each product is one pass over the two gradients (no copy of them
    stacked); float32 products summed as TensorFlow sums, then float64.
    """
    k = len(blocks[0].rows)
    entries = [[None] * k for _ in range(k)]
    for i in range(k):
        for j in range(i, k):
            entries[i][j] = entries[j][i] = tf.add_n([tf.reduce_sum(b.rows[i] * b.rows[j]) for b in blocks])
    return tf.cast(tf.stack([tf.stack(row) for row in entries]), tf.float64)


def combined(blocks: list[Block], weights: tf.Tensor) -> list:
    """`sum_k a_k g_k` for each shared variable, in its gradient's form (sparse stays sparse)."""
    combined_gradients = []
    for block in blocks:
        a = tf.unstack(tf.cast(weights, block.rows[0].dtype))
        values = tf.add_n([a_k * row for a_k, row in zip(a, block.rows)])
        combined_gradients.append(values if block.indices is None else
                                  tf.IndexedSlices(values, block.indices, block.dense_shape))
    return combined_gradients
