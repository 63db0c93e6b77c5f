"""One dataset per task: what a task is, and how each step mixes the tasks (`--task_mixing`).

With `--datasets` (`TrainConfig.datasets`), each task (an output, or several
joined by `,`) has its own data. This module reads and checks the task names
and `--task_mixing`, before TensorFlow is imported; the sampler's
mathematics is in `mto_tf/core/task_sampling.py`.

- `joint` (the default): each step takes a global batch of every task and
  trains on `sum_i w_i L_i` over all of them, one gradient, one update
  (Model Garden's `MultiTaskBaseTrainer`).
- sampled turns (Model Garden's `MultiTaskInterleavingTrainer`): each step
  draws one task and trains on its losses alone. `uniform`: every task
  alike; `proportional`: task t with probability `n_t^alpha / sum_s n_s^alpha`
  (`n_t` its number of training examples); `annealed`: the same with
  `alpha` falling over the epochs, `alpha = 1 - 0.8 (e - 1) / (E - 1)` at
  0-based epoch e of E (Stickland and Murray 2019, as Model Garden's
  `AnnealingTaskSampler` computes it: 1 + 0.8 / (E - 1) at the first epoch,
  1 at the second, 0.2 + 0.8 / (E - 1) at the last; at least 0).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from mto_tf.errors import ConfigError

# Each mixing's parameters -> (default, what a value must be). An annealed
# schedule's epoch and length default to the run's (0: a pass over the
# largest task's data, and --train_steps).
MIXINGS: dict[str, dict[str, tuple[float, str]]] = {
    "joint": {},
    "uniform": {},
    "proportional": {"alpha": (1.0, "a number >= 0")},
    "annealed": {"steps_per_epoch": (0, "an integer >= 0 (0: a pass over the largest task)"),
                 "total_steps": (0, "an integer >= 0 (0: --train_steps)")},
}


@dataclasses.dataclass(frozen=True)
class TaskMixing:
    """A mixing by name, with every parameter's value (defaults filled in)."""

    name: str
    parameters: Mapping[str, float]

    @property
    def sampled(self) -> bool:
        """Each step trains one drawn task (else every task, jointly)."""
        return self.name != "joint"

    def describe(self) -> str:
        given = ", ".join(f"{key}={value:g}" for key, value in self.parameters.items())
        return f"{self.name}({given})" if given else self.name


def parse(value: object) -> TaskMixing:
    """`--task_mixing`'s value (a name or `{"name": ..., ...}`) as a `TaskMixing`; ConfigError if it is bad."""
    given = {"name": value.strip()} if isinstance(value, str) else value
    if not isinstance(given, Mapping):
        raise ConfigError("task_mixing", f"expected a name or {{\"name\": ..., ...}}, got {value!r}")
    name = given.get("name")
    if name not in MIXINGS:
        raise ConfigError("task_mixing", f"unknown mixing {name!r}; expected one of {', '.join(MIXINGS)}")
    unknown = sorted(set(given) - {"name"} - set(MIXINGS[name]))
    if unknown:
        takes = ", ".join(MIXINGS[name]) or "no parameters"
        raise ConfigError("task_mixing", f"{name} takes {takes}; not {unknown[0]!r}")
    parameters = {}
    for key, (default, expected) in MIXINGS[name].items():
        number = given.get(key, default)
        is_number = isinstance(number, int | float) and not isinstance(number, bool) and math.isfinite(number)
        integer_wanted = expected.startswith("an integer")
        if not (is_number and number >= 0 and (not integer_wanted or float(number).is_integer())):
            raise ConfigError("task_mixing", f"{name}'s {key} must be {expected}, got {number!r}")
        parameters[key] = int(number) if integer_wanted else float(number)
    return TaskMixing(name=name, parameters=parameters)


def task_outputs(task: str) -> tuple[str, ...]:
    """The outputs a task names: `main_output`, or several joined by `,`."""
    return tuple(part.strip() for part in task.split(","))


def check_task_names(datasets: Mapping[str, object]) -> None:
    """Each task names its outputs, and no output twice (the model checks that they are its outputs)."""
    seen: dict[str, str] = {}
    for task in datasets:
        outputs = task_outputs(task) if isinstance(task, str) else ("",)
        if not all(outputs):
            raise ConfigError("datasets", f"task {task!r}: expected an output name, or several joined by ','")
        for output in outputs:
            if output in seen:
                raise ConfigError("datasets", f"output {output!r} is in two tasks, {seen[output]!r} and {task!r}; "
                                              f"each output's labels come from one dataset")
            seen[output] = task
