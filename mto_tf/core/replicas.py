"""Sums over replicas: the one all-reduce every exact result under a strategy rests on.

Each replica computes its share of a global-batch value (a loss divided by
the GLOBAL batch size, a gradient of such a loss), so the sum over every
replica and worker is the value one device would compute on the whole
batch. Called in replica context (inside `strategy.run`); on one replica
the value is already whole and nothing is sent.
"""

from __future__ import annotations

import tensorflow as tf


def summed_over_replicas(values):
    """`values` (a tensor, or a nest of them; None entries stay None) summed over every replica and worker."""
    context = tf.distribute.get_replica_context()
    if context is None:  # Cross-replica context: there is no replica's share to sum.
        raise RuntimeError("summed_over_replicas sums each replica's share: call it inside strategy.run")
    if context.num_replicas_in_sync == 1:
        return values
    flat = tf.nest.flatten(values)
    present = [value for value in flat if value is not None]  # A weight no loss reaches has no gradient.
    summed = iter(context.all_reduce(tf.distribute.ReduceOp.SUM, present))
    return tf.nest.pack_sequence_as(values, [None if value is None else next(summed) for value in flat])


def summed_over_workers(strategy: tf.distribute.Strategy):
    """A function of one host value (the same structure in every process) that returns its sum over every
    replica of every worker, the same on each: how workers agree on a number. A collective: every worker
    calls it, in the same order."""

    @tf.function
    def summed(value):
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.identity(value)), axis=None)

    return summed
