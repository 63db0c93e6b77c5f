"""SIGTERM or Ctrl-C on any worker -> every worker stops after the same step, checkpointed.

Ctrl-C (SIGINT, as a terminal sends it) is taken like SIGTERM: the run stops
after the current `tf.function` call with a checkpoint. A second Ctrl-C
stops at once (`InterruptedAtOnce`), wherever Python is: a checkpoint being
written then never becomes the latest (TensorFlow's CheckpointManager
records a checkpoint only once it is complete).

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

from mto_tf.core import replicas
from mto_tf.errors import InterruptedAtOnce

logger = logging.getLogger(__name__)


# The signals as a worker notes them: Ctrl-C wins over SIGTERM.
SIGNALS = {1: "SIGTERM", 2: "SIGINT"}


class PreemptionWatcher:
    """Notes SIGTERM and SIGINT in this process; `stop_agreed()` asks all workers (a collective: call it on every worker)."""

    def __init__(self, strategy: tf.distribute.Strategy):
        self._received = 0  # A key of SIGNALS, or 0.
        self._previous_handlers = {}
        if threading.current_thread() is threading.main_thread():  # Python only signals the main thread.
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

        # One process needs no agreement; asking would cost a second
        # function call per loop, as much as a small model's step.
        self._workers_signalled = None
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            self._workers_signalled = replicas.summed_over_workers(strategy)

    def _on_signal(self, signum, frame):
        del frame
        if signum == signal.SIGINT:
            if self._received == 2:
                raise InterruptedAtOnce()
            logger.warning("Ctrl-C: stopping after the current call, with a checkpoint (Ctrl-C again: at once)")
            self._received = 2
        else:
            logger.warning("SIGTERM received: stopping after the current loop, with a checkpoint")
            self._received = max(self._received, 1)

    def stop_agreed(self) -> str | None:
        """The signal any worker received ("SIGINT" over "SIGTERM"), or None; the same answer on every worker."""
        if self._workers_signalled is None:
            return SIGNALS.get(self._received)
        # How many workers noted SIGTERM, and how many Ctrl-C: one tiny all-reduce.
        sigterm, sigint = self._workers_signalled(tf.constant([self._received == 1, self._received == 2], tf.float32))
        return "SIGINT" if sigint > 0 else "SIGTERM" if sigterm > 0 else None

    def close(self) -> None:
        """Gives the signals back to whoever handled them before.

        After a Ctrl-C the run is ending: a further Ctrl-C is ignored until
        `restore_after_interrupt()` (in `train`, once the run has ended), so
        that it cannot raise a KeyboardInterrupt in the middle of clean-up.
        """
        global _handler_before_interrupt
        for signum, handler in self._previous_handlers.items():
            if signum == signal.SIGINT and self._received == 2:
                _handler_before_interrupt = handler
                signal.signal(signum, signal.SIG_IGN)
            else:
                signal.signal(signum, handler)
        self._previous_handlers = {}


_handler_before_interrupt = None


def restore_after_interrupt() -> None:
    """Ctrl-C handled as before the run again (after a run that Ctrl-C stopped)."""
    global _handler_before_interrupt
    if _handler_before_interrupt is not None:
        signal.signal(signal.SIGINT, _handler_before_interrupt)
        _handler_before_interrupt = None
