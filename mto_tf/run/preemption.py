"""SIGTERM on any worker -> every worker stops after the same step, checkpointed.

A preempted machine gets SIGTERM shortly before it is taken away. Workers
train in lock step, so they must agree on where to stop: after every loop
they add up their "SIGTERM received" flags in one tiny all-reduce, and all
stop together when the sum is non-zero. (TensorFlow's
`PreemptionCheckpointHandler` does the same through its coordination service,
but first probes for a cloud metadata server over the network.)
"""

from __future__ import annotations

import logging
import signal
import threading

import tensorflow as tf

logger = logging.getLogger(__name__)


class PreemptionWatcher:
    """Notes SIGTERM in this process; `stop_agreed()` asks all workers (a collective: call it on every worker)."""

    def __init__(self, strategy: tf.distribute.Strategy):
        self._signal_received = False
        self._previous_handler = None
        if threading.current_thread() is threading.main_thread():  # Python only signals the main thread.
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

        # One process needs no agreement; asking would cost a second
        # function call per loop, as much as a small model's step.
        self._count_workers_signalled = None
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):

            @tf.function
            def count_workers_signalled(flag):
                per_replica = strategy.run(lambda: tf.identity(flag))
                return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

            self._count_workers_signalled = count_workers_signalled

    def _on_sigterm(self, signum, frame):
        del signum, frame
        logger.warning("SIGTERM received: stopping after the current loop, with a checkpoint")
        self._signal_received = True

    def stop_agreed(self) -> bool:
        """True when any worker has received SIGTERM; the same answer on every worker."""
        if self._count_workers_signalled is None:
            return self._signal_received
        flag = tf.constant(1.0 if self._signal_received else 0.0)
        return bool(self._count_workers_signalled(flag) > 0)

    def close(self) -> None:
        """Gives SIGTERM back to whoever handled it before."""
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None
