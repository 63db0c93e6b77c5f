"""What a person watching a run sees: a line updated in place on a terminal, plain lines elsewhere, a summary.

- `bar` (a terminal): one line redrawn after every `tf.function` call (step
  / total, a bar, elapsed time, ETA, steps per second, the latest losses);
  each logging window's line is printed above it and stays.
- `lines` (a file, CI, a launcher that prefixes lines): one plain line per
  logging window, no control characters.
- `quiet`: nothing; warnings and errors still show (on stderr).
`auto` picks `bar` when stdout is a terminal, else `lines`.

Keras's `Progbar` is not used: it times steps from the first step of its
own count, so a resumed run's ETA would be wrong, and shows either the ETA
or the elapsed time, not both.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Mapping

_BAR_WIDTH = 20


class Progress:
    """Shows a run's progress from `start_step` to `total_steps` on `stream`."""

    def __init__(self, mode: str, *, start_step: int, total_steps: int, stream=None):
        self._stream = stream or sys.stdout
        if mode == "auto":
            mode = "bar" if self._stream.isatty() else "lines"
        self.mode = mode
        self._start_step, self._total_steps = start_step, total_steps
        self._start_time = time.perf_counter()
        self._line_width = 0  # Of the line drawn in place, to clear it.

    def update(self, step: int, latest_losses: Mapping[str, float]) -> None:
        """After each call of the train loop: redraws the line in place (bar mode only)."""
        if self.mode != "bar":
            return
        done = (step - self._start_step) / max(1, self._total_steps - self._start_step)
        filled = int(_BAR_WIDTH * min(1.0, done))
        elapsed = time.perf_counter() - self._start_time
        rate = (step - self._start_step) / elapsed if elapsed > 0 else 0.0
        eta = (self._total_steps - step) / rate if rate > 0 else 0.0
        losses = " ".join(f"{name} {shown(value, '.4f')}" for name, value in latest_losses.items())
        line = (f"step {step}/{self._total_steps} [{'=' * filled}{'.' * (_BAR_WIDTH - filled)}] "
                f"{_clock(elapsed)} elapsed, ETA {_clock(eta)}, {rate:.1f} steps/s | {losses}")
        self._draw(line[:shutil.get_terminal_size().columns - 1])

    def window(self, step: int, record: Mapping[str, float]) -> None:
        """At the end of each logging window: a line that stays."""
        if self.mode == "quiet":
            return
        # Not the per-layer gradient shares (grad_share/<layer>/<output>): metrics.jsonl and TensorBoard have them.
        values = ", ".join(f"{name}={shown(value)}" for name, value in record.items()
                           if name != "step" and "/" not in name)
        if values:
            self._print_line(f"step {step}/{self._total_steps}: {values}")

    def summary(self, lines: list[str]) -> None:
        """At the end of the run."""
        if self.mode != "quiet":
            for line in lines:
                self._print_line(line)

    def _draw(self, line: str) -> None:
        self._stream.write("\r" + line + " " * max(0, self._line_width - len(line)))
        self._stream.flush()
        self._line_width = len(line)

    def _print_line(self, line: str) -> None:
        if self._line_width:  # Replace the line drawn in place; it is drawn again on the next update.
            self._stream.write("\r" + " " * self._line_width + "\r")
            self._line_width = 0
        self._stream.write(line + "\n")
        self._stream.flush()


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes:02d}:{seconds:02d}"


def shown(value, spec: str = ".4g") -> str:
    """A value as a line shows it; a value per class as its mean, saying so."""
    if isinstance(value, list | tuple) or getattr(value, "ndim", 0):
        parts = [float(part) for part in (value.ravel() if hasattr(value, "ravel") else value)]
        return f"{format(sum(parts) / len(parts), spec)} (mean of {len(parts)} classes)"
    return format(value, spec)


def summary_lines(*, step: int, seconds: float, records: list[Mapping[str, float]], output_names: list[str],
                  model_dir: str, files: list[str]) -> list[str]:
    """The end of a run in a few lines: the last training window's and evaluation's values by output, and the files."""
    lines = [f"Trained to step {step} in {_clock(seconds)}."]
    last_window = next((record for record in reversed(records) if "loss" in record), None)
    last_evaluation = next((record for record in reversed(records) if "val_loss" in record), None)
    if last_window:
        lines.append("  last window: " + _by_output(last_window, output_names, prefix=""))
    if last_evaluation:
        lines.append(f"  validation at step {last_evaluation['step']}: "
                     + _by_output(last_evaluation, output_names, prefix="val_"))
    lines.append(f"  files in {model_dir}: {', '.join(files)}")
    return lines


def _by_output(record: Mapping[str, float], output_names: list[str], *, prefix: str) -> str:
    """`loss 0.5 | aux_output: loss 0.6, binary_accuracy 0.7 | ...` from the keys that start with `prefix`.

    Training values also show an adaptive method's factor of each loss
    (`loss_weight/<output>`) as `loss weight`.
    """
    by_output = {name: [] for name in output_names}
    for key, value in record.items():
        if not prefix and key.removeprefix("loss_weight/") in by_output:  # An adaptive --loss_weighting's factor.
            by_output[key.removeprefix("loss_weight/")].append(f"loss weight {shown(value)}")
            continue
        if not key.startswith(prefix):
            continue
        key = key.removeprefix(prefix)
        # Longest output name first: an output may be named like the start of another.
        owner = next((name for name in sorted(output_names, key=len, reverse=True) if key.startswith(name + "_")),
                     None)
        if owner:
            by_output[owner].append(f"{key.removeprefix(owner + '_')} {shown(value)}")
    # An output with no value here (with --datasets, a task without validation data, or not drawn) is left out.
    parts = [f"loss {record[prefix + 'loss']:.4g}"] + [f"{name}: {', '.join(values)}"
                                                      for name, values in by_output.items() if values]
    return " | ".join(parts)
