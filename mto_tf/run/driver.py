"""The end of a logging window, written once for the custom loop and `--loop=fit`.

Each loop measures its window its own way (the custom loop sums its
steps' losses and reads its metrics; `fit` hands over its epoch's logs);
from there on both do the same, in this order:

1. the best value so far (`--save_best`), when the window ended with an
   evaluation, and whether patience ran out (`--early_stopping_patience`);
2. the record: `metrics.jsonl`, TensorBoard, and the progress line;
3. the window-end hooks, with the record (the benchmark passes its turn here);
4. the next window's timer starts: evaluating and logging are not training;
5. a checkpoint, when one is due, at the end, on SIGTERM, or when stopping early
   (patience ran out, or a Keras callback set `model.stop_training`);
6. SIGTERM raises `Preempted`, Ctrl-C `Interrupted`; an early stop is logged, and the loop told to stop.

Losses are checked for NaN and infinity before any of it (`check_finite`),
so nothing non-finite is logged or saved.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence

import keras
import numpy as np

from mto_tf.errors import Interrupted, NonFiniteError, Preempted
from mto_tf.run.setup import Run

logger = logging.getLogger(__name__)

# Called with the step and the record just written, after every record a loop writes.
WindowEndHook = Callable[[int, dict], None]


def check_finite(values: Mapping[str, float], *, where: str, run: Run) -> None:
    """Raises `NonFiniteError` naming the values that are NaN or infinite, and `where` (the steps)."""
    not_finite = [name for name, value in values.items() if not np.all(np.isfinite(value))]
    if not_finite:
        raise NonFiniteError(f"{', '.join(not_finite)} not finite in {where}", kept_step=run.checkpoints.latest_step)


def metric_results(output_metrics: Mapping[str, tuple[str, keras.metrics.Metric]]) -> dict[str, float | list]:
    """Each metric's result since it was last read, by log name; the metrics start again from zero.

    A result with a value per class (F1Score, FBetaScore with `average=None`) is a list of floats.
    """
    results = {}
    for log_name, (_, metric) in output_metrics.items():
        results[log_name] = log_value(metric.result())
        metric.reset_state()
    return results


def log_value(result) -> float | list:
    """A metric's result as the logs hold it: a float, or a list of floats for a value per class."""
    result = np.asarray(result, dtype=np.float64)
    return float(result) if result.ndim == 0 else result.ravel().tolist()


class StepSums:
    """Each step measurement's sum over some steps (a logging window, an epoch), and their number."""

    def __init__(self):
        self.totals: dict[str, np.float32] = {}
        self.steps = 0

    def add(self, loop_totals: Mapping[str, np.float32], num_steps: int) -> None:
        # Added in float32, as inside the loop, so that how steps are
        # grouped into loops does not change the logged numbers.
        self.totals = {name: self.totals.get(name, np.float32(0)) + value for name, value in loop_totals.items()}
        self.steps += num_steps

    def means(self) -> dict[str, float]:
        """Each measurement's mean over the steps."""
        return {name: float(total) / self.steps for name, total in self.totals.items()}


class WindowEnds:
    """What both loops do at the end of a logging window (see the module's doc), and the window's timer."""

    def __init__(self, run: Run, *, hooks: Sequence[WindowEndHook] = ()):
        self._run = run
        self._hooks = list(hooks)
        self.restart_timer()

    def restart_timer(self) -> None:
        """The window being trained starts now."""
        self._started = time.perf_counter()

    def examples_per_sec(self, num_steps: int) -> float:
        """Training throughput of the window so far, which trained `num_steps` global batches."""
        return num_steps * self._run.config.batch_size / (time.perf_counter() - self._started)

    def __call__(self, step: int, record: dict[str, float], *, window_ended: bool, finished: bool,
                 preempted: str | None = None, stop_requested: bool = False) -> bool:
        """After the call or epoch that reached `step`; returns True when the loop must stop early.

        Args:
          step: the step just trained.
          record: what to log at `step` (empty: nothing), in the order to log it.
          window_ended: a logging window ended here (its means are in `record`).
          finished: `step` is the run's last.
          preempted: the signal every worker agreed to stop on ("SIGTERM" or "SIGINT"), or None.
          stop_requested: a Keras callback set `model.stop_training` (the window has ended).

        Raises:
          Preempted: after the checkpoint, on SIGTERM; Interrupted on SIGINT (Ctrl-C).
        """
        run = self._run
        stop_early = False
        if run.best_value and "val_loss" in record:  # The window ended with an evaluation.
            record = {**record, **run.best_value.update(step, record, run.setup.model)}
            stop_early = run.best_value.patience_exhausted
        if record:
            record = run.metrics_log.write(step, record)
            run.progress.window(step, record)
            for hook in self._hooks:
                hook(step, record)
        if window_ended:
            self.restart_timer()
        if step % run.config.checkpoint_every == 0 or finished or preempted or stop_early or stop_requested:
            run.checkpoints.save(step)
        if preempted:
            raise Interrupted(step) if preempted == "SIGINT" else Preempted(step)
        if stop_early:
            logger.info("Early stopping at step %d: %s", step, run.best_value.describe_stop())
        elif stop_requested and not finished:
            logger.info("Stopping at step %d: a callback set model.stop_training", step)
        return stop_early or stop_requested
