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
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return gradients
    present = [[g for g in row if g is not None] for row in gradients.per_output]
    reduced = context.all_reduce(tf.distribute.ReduceOp.SUM, present)
    per_output = []
    for row, reduced_row in zip(gradients.per_output, reduced):
        values = iter(reduced_row)
        per_output.append([None if g is None else next(values) for g in row])
    return dataclasses.replace(gradients, per_output=per_output)


@dataclasses.dataclass(frozen=True)
class Block:
    """One shared variable's K gradients as a `(K, n)` matrix (rows summed per index for a sparse one)."""

    rows: tf.Tensor  # (K, n): output k's gradient, flattened.
    indices: tf.Tensor | None  # A sparse gradient's unique row indices; None for a dense one.
    shape: tf.Tensor  # The gradient's shape: the variable's, or (unique rows, row width) when sparse.
    dense_shape: tf.Tensor | None


def shared_blocks(gradients: OutputGradients, variables: list[tf.Variable]) -> list[Block]:
    """The shared variables' blocks; an output that does not reach a shared variable contributes zeros."""
    blocks = []
    for v in gradients.shared:
        column = [row[v] for row in gradients.per_output]
        if all(g is None or isinstance(g, tf.IndexedSlices) for g in column):
            blocks.append(_sparse_block(column))
        else:
            dense = [tf.zeros_like(variables[v]) if g is None else tf.convert_to_tensor(g) for g in column]
            stacked = tf.stack(dense)
            blocks.append(Block(rows=tf.reshape(stacked, [len(column), -1]), indices=None,
                                shape=tf.shape(variables[v]), dense_shape=None))
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
    stacked = tf.stack(rows)
    return Block(rows=tf.reshape(stacked, [len(column), -1]), indices=indices,
                 shape=tf.shape(stacked)[1:], dense_shape=present[0].dense_shape)


def gramian(blocks: list[Block]) -> tf.Tensor:
    """`G[i, j] = g_i . g_j` over every shared weight, `(K, K)`, in float64 for the methods' small solves."""
    return tf.add_n([tf.matmul(tf.cast(b.rows, tf.float64), tf.cast(b.rows, tf.float64), transpose_b=True)
                     for b in blocks])


def combined(blocks: list[Block], weights: tf.Tensor) -> list:
    """`sum_k a_k g_k` for each shared variable, in its gradient's form (sparse stays sparse)."""
    combined_gradients = []
    for block in blocks:
        flat = tf.linalg.matvec(block.rows, tf.cast(weights, block.rows.dtype), transpose_a=True)
        values = tf.reshape(flat, block.shape)
        combined_gradients.append(values if block.indices is None else
                                  tf.IndexedSlices(values, block.indices, block.dense_shape))
    return combined_gradients
