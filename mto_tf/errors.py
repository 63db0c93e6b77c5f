"""The errors a run ends with, each of which a program turns into one line and an exit status.

- `ConfigError`: a setting that cannot work, named by its flag (exit 2);
- `NonFiniteError`: a loss or weight became NaN or infinite (exit 3);
- `Preempted`: SIGTERM stopped the run after a checkpoint (exit 143);
  `Interrupted`, Ctrl-C did (exit 130); `InterruptedAtOnce`, a second Ctrl-C
  stopped it where it was (exit 130).

No TensorFlow here: the flags and `TrainConfig` use these too.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A setting that cannot work, named by its flag.

    Raised before anything is built or written, so the user sees one line
    (`--flag: what was expected`) instead of a traceback from TensorFlow.
    """

    def __init__(self, flag: str, message: str):
        super().__init__(f"--{flag}: {message}")
        self.flag = flag
        self.message = message

    def about_task(self, task: str) -> ConfigError:
        """The same error about one task of --datasets: it names the task (and --datasets for its source)."""
        return ConfigError("datasets" if self.flag == "dataset" else self.flag, f"task {task!r}: {self.message}")


class NonFiniteError(Exception):
    """Training produced a non-finite loss or weight; nothing after the last good checkpoint was kept."""

    def __init__(self, what: str, *, kept_step: int | None):
        kept = f"the checkpoint of step {kept_step} is kept" if kept_step else "no checkpoint was written"
        super().__init__(f"{what}; {kept}, and no final model. Lower --learning_rate, or look for NaN or "
                         f"infinite values in the data")


class Preempted(Exception):
    """Training stopped early on SIGTERM, after saving a checkpoint at `step`."""

    def __init__(self, step: int, *, by: str = "SIGTERM"):
        super().__init__(f"stopped by {by} after step {step}, checkpoint saved")
        self.step = step


class Interrupted(Preempted):
    """Ctrl-C (SIGINT): training stopped after the current call, with a checkpoint at `step` (exit 130)."""

    def __init__(self, step: int):
        super().__init__(step, by="Ctrl-C")


class InterruptedAtOnce(Exception):
    """A second Ctrl-C: training stopped at once; the newest complete checkpoint is kept (exit 130)."""

    def __init__(self):
        super().__init__("stopped at once by a second Ctrl-C; the newest complete checkpoint is kept")


def first_line(error: BaseException) -> str:
    """An error's message cut to one line, for one-line errors that quote TensorFlow or a user's code."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def describe_error(error: BaseException) -> str:
    """`TypeName: first line of the message`, for one-line errors about a user's code."""
    return f"{type(error).__name__}: {first_line(error)}"
