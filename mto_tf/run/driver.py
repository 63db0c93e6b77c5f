"""What the custom loop and `--loop=fit` share: what is due when, and one list of actions at each window's end.

`Schedule` answers what is due at a step (a log, an epoch's end, an
evaluation, gradient shares, a checkpoint) with one predicate, `due(step,
every)`, as big_vision's `itstime`. Whenever a loop stops between steps
(the end of a `tf.function` call, or of a `fit` epoch), it describes that
moment as a `Boundary` (its step, the record to log there, whether a window
or an epoch ended) and hands it to `WindowEnds`, which passes it to one
ordered list of actions, as Orbit's controller passes its outputs to its
actions. Every reaction to a window's end is one of them, in this order:

1. the user's Keras callbacks' epoch end (custom loop; `fit` calls them itself);
2. the best value so far (`--save_best`) and early stopping;
3. the record: `metrics.jsonl`, TensorBoard, and the progress line;
4. any actions the caller adds (the benchmark passes its turn here);
5. the next window's timer starts: evaluating and logging are not training;
6. a checkpoint, when one is due, at the end, on SIGTERM, or when the run stops early.

An action may set `boundary.stop`: the run then ends there, with a
checkpoint. SIGTERM raises `Preempted`, Ctrl-C `Interrupted`, after the
checkpoint. Losses are checked for NaN and infinity before any of it
(`check_finite`), so nothing non-finite is logged or saved.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from mto_tf.errors import Interrupted, NonFiniteError, Preempted
from mto_tf.run.setup import Run

logger = logging.getLogger(__name__)


def due(step: int, every: int | None) -> bool:
    """Whether what happens every `every` steps happens at `step`; never when `every` is 0 or None."""
    return bool(every) and step % every == 0


@dataclasses.dataclass(frozen=True)
class Schedule:
    """What is due at each step of a run, and so where each `tf.function` call of the custom loop must end."""

    total_steps: int
    steps_per_loop: int
    log_every: int
    epoch_steps: int  # A pass over the data with --epochs, else a logging window (Keras callbacks' epoch).
    checkpoint_every: int
    eval_every: int  # 0: at the end only.
    gradient_shares_every: int  # 0: never.
    # Each pass's last step in a call of its own (--epochs, several replicas, a partial last batch): in one
    # tf.function call, MirroredStrategy pairs the collectives of successive steps by order, and those of a
    # partial batch's sparse gradients have another shape ("Shape mismatch in the collective instance", measured).
    partial_step_alone: bool = False

    @classmethod
    def of(cls, run: Run) -> Schedule:
        config = run.config
        # Counted last: a Python dataset of unknown size is read to count it.
        partial_step_alone = bool(config.epochs and run.setup.strategy.num_replicas_in_sync > 1
                                  and run.setup.examples.count() % run.setup.pass_batch_size)
        return cls(total_steps=run.total_steps, steps_per_loop=config.steps_per_loop, log_every=config.log_every,
                   epoch_steps=run.epoch_steps, checkpoint_every=config.checkpoint_every,
                   eval_every=config.eval_every, gradient_shares_every=config.log_gradient_shares_every,
                   partial_step_alone=partial_step_alone)

    def steps_in_call(self, step: int) -> int:
        """How many steps the call after `step` trains: up to the next step where anything is due, the end at most."""
        boundaries = (self.log_every, self.epoch_steps, self.checkpoint_every, self.eval_every,
                      self.gradient_shares_every)
        steps = [every - step % every for every in boundaries if every]
        if self.partial_step_alone:  # Also stop before each pass's last step.
            steps.append(self.epoch_steps - (step + 1) % self.epoch_steps)
        return min(self.steps_per_loop, self.total_steps - step, *steps)

    def window_ends(self, step: int) -> bool:
        """A logging window ends each --log_every steps, with each pass over the data (--epochs), and at the end."""
        return due(step, self.log_every) or self.epoch_ends(step)

    def epoch_ends(self, step: int) -> bool:
        return due(step, self.epoch_steps) or step == self.total_steps

    def evaluation_due(self, step: int) -> bool:
        return due(step, self.eval_every) or step == self.total_steps

    def gradient_shares_due(self, step: int) -> bool:
        return due(step, self.gradient_shares_every)

    def checkpoint_due(self, step: int) -> bool:
        """Each --checkpoint_every steps and at the end (and wherever the run stops early: `WindowEnds`)."""
        return due(step, self.checkpoint_every) or step == self.total_steps

    def boundary(self, step: int, *, preempted: str | None = None) -> Boundary:
        """The boundary after `step`, with an empty record; a preempted run's window ends where it stopped."""
        return Boundary(step, record={}, window_ended=self.window_ends(step) or preempted is not None,
                        epoch_ended=self.epoch_ends(step), finished=step == self.total_steps, preempted=preempted)


@dataclasses.dataclass
class Boundary:
    """A step at which a loop stops to do what is due: what the actions at a window's end read and write."""

    step: int  # The step just trained.
    record: dict[str, float | list]  # What to log at `step` (empty: nothing), in the order to log it.
    window_ended: bool  # A logging window ended here (its means are in `record`).
    epoch_ended: bool  # A pass over the data (--epochs) or, without --epochs, a window ended here.
    finished: bool  # `step` is the run's last.
    preempted: str | None = None  # The signal every worker agreed to stop on ("SIGTERM" or "SIGINT").
    stop: str | None = None  # Set by an action: the run stops here, and this says why (logged).


# An action at a window's end (Orbit's): reads the boundary, may add to its record or set its stop.
Action = Callable[[Boundary], None]


class WindowTimer:
    """The training time of the window being trained, for `examples_per_sec`."""

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        """The window being trained starts now."""
        self._started = time.perf_counter()

    def examples_per_sec(self, examples: int) -> float:
        """Training throughput of the window so far, which trained `examples` examples."""
        return examples / (time.perf_counter() - self._started)


class WindowEnds:
    """The actions at each boundary, in the order of the module's doc; `timer` is the loop's window timer."""

    def __init__(self, run: Run, *, schedule: Schedule, timer: WindowTimer, first: Sequence[Action] = (),
                 then: Sequence[Action] = ()):
        """`first`: before the best value (the Keras callbacks' epoch end); `then`: after the record is written."""
        self._run = run
        self._schedule = schedule
        self._timer = timer
        self.actions: list[Action] = [*first, *([self._keep_best] if run.best_value else []), self._write_record,
                                      *then, self._restart_timer, self._save_checkpoint]

    def __call__(self, boundary: Boundary) -> bool:
        """Runs the actions; returns True when the run must stop here.

        Raises:
          Preempted: after the checkpoint, on SIGTERM; Interrupted on SIGINT (Ctrl-C).
        """
        for action in self.actions:
            action(boundary)
        if boundary.preempted:
            raise Interrupted(boundary.step) if boundary.preempted == "SIGINT" else Preempted(boundary.step)
        if boundary.stop:
            logger.info("%s", boundary.stop)
        return boundary.stop is not None

    def _keep_best(self, boundary: Boundary) -> None:
        """After an evaluation: the best value so far, its weights saved; stop once patience has run out."""
        best_value = self._run.best_value
        if "val_loss" in boundary.record:
            boundary.record.update(best_value.update(boundary.step, boundary.record, self._run.setup.model))
            if best_value.patience_exhausted:
                boundary.stop = f"Early stopping at step {boundary.step}: {best_value.describe_stop()}"

    def _write_record(self, boundary: Boundary) -> None:
        if boundary.record:
            boundary.record = self._run.metrics_log.write(boundary.step, boundary.record)
            self._run.progress.window(boundary.step, boundary.record)

    def _restart_timer(self, boundary: Boundary) -> None:
        if boundary.window_ended:
            self._timer.restart()

    def _save_checkpoint(self, boundary: Boundary) -> None:
        if self._schedule.checkpoint_due(boundary.step) or boundary.preempted or boundary.stop:
            self._run.checkpoints.save(boundary.step)


def check_finite(values: Mapping[str, float], *, where: str, run: Run) -> None:
    """Raises `NonFiniteError` naming the values that are NaN or infinite, and `where` (the steps)."""
    not_finite = [name for name, value in values.items() if not np.all(np.isfinite(value))]
    if not_finite:
        raise NonFiniteError(f"{', '.join(not_finite)} not finite in {where}", kept_step=run.checkpoints.latest_step)


class StepSums:
    """Each step measurement's sum over some steps (a logging window, an epoch), and their number.

    `counted_by` (sampled turns of tasks): a measurement that only its
    task's steps make -> the measurement counting those steps (`steps/<task>`,
    summed, not averaged): its mean is over its task's steps, and it is left
    out when the task had none.
    """

    def __init__(self, counted_by: Mapping[str, str] | None = None):
        self.totals: dict[str, np.float32] = {}
        self.steps = 0
        self._counted_by = counted_by or {}

    def add(self, loop_totals: Mapping[str, np.float32], num_steps: int) -> None:
        # Added in float32, as inside the loop, so that how steps are
        # grouped into loops does not change the logged numbers.
        self.totals = {name: self.totals.get(name, np.float32(0)) + value for name, value in loop_totals.items()}
        self.steps += num_steps

    def means(self) -> dict[str, float]:
        """Each measurement's mean over the steps (over its task's steps; a count of steps, summed)."""
        counts = set(self._counted_by.values())
        means = {}
        for name, total in self.totals.items():
            if name in counts:
                means[name] = float(total)
            elif name not in self._counted_by:
                means[name] = float(total) / self.steps
            elif self.totals[self._counted_by[name]]:
                means[name] = float(total) / float(self.totals[self._counted_by[name]])
        return means
