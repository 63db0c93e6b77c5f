"""Sampled turns (`--task_mixing=uniform|proportional|annealed`): each step draws one task and trains on it alone.

Model Garden's `MultiTaskInterleavingTrainer`, with its three samplers
(`official/modeling/multitask/task_sampler.py`), made exact and resumable:

- the draw is a stateless function of `--seed` and the step, computed once
  per step outside the replicas, so every replica and worker takes the same
  task (no random state to keep in step);
- only the drawn task's batches are read, and each task's count of draws is a
  variable in every checkpoint: a resumed run skips exactly the batches each
  task had read, and draws the same tasks from there on.

Each draw inverts the cumulative distribution of the task probabilities at
that step; the last task takes any rounding gap at the top, so every draw
trains a task.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from mto_tf.errors import ConfigError
from mto_tf.task_mixing import TaskMixing


class TaskSampler(tf.Module):
    """Draws each step's task; its counts (draws so far, and each task's) are checkpointed."""

    def __init__(self, mixing: TaskMixing, *, task_examples: Mapping[str, int], seed: int, steps_per_epoch: int,
                 total_steps: int):
        """`task_examples`: each task's number of training examples (`proportional` and `annealed` weigh by
        them); `steps_per_epoch` and `total_steps`: `annealed`'s schedule, unless its parameters set them."""
        super().__init__(name="task_sampler")
        self.task_names = tuple(task_examples)
        self.mixing = mixing
        self._log_examples = tf.constant(np.log(list(task_examples.values())), tf.float32)
        self._seed = seed
        steps_per_epoch = mixing.parameters.get("steps_per_epoch") or steps_per_epoch
        total_steps = mixing.parameters.get("total_steps") or total_steps
        if mixing.name == "annealed" and total_steps < 2 * steps_per_epoch:
            # One epoch or less: 1 / (E - 1) is huge or negative (Model Garden's formula has no guard).
            raise ConfigError("task_mixing", f"annealed anneals over epochs of {steps_per_epoch} steps and needs two "
                                             f"at least; its total_steps is {total_steps}: give a smaller "
                                             f"steps_per_epoch or a larger total_steps (or --train_steps)")
        # annealed's (steps per epoch, total steps), checkpointed: a run resumed with another --train_steps
        # (its default total) anneals, and draws, as it began.
        self.schedule = tf.Variable([steps_per_epoch, total_steps], dtype=tf.float32, trainable=False,
                                    name="schedule")
        self.draws = tf.Variable(0, dtype=tf.int64, trainable=False, name="draws")  # Steps drawn so far.
        # Each task's draws: the batches of its data read so far.
        self.task_draws = tf.Variable(tf.zeros([len(self.task_names)], tf.int64), trainable=False, name="task_draws")

    def probabilities(self, step) -> tf.Tensor:
        """Each task's probability at `step` (0-based), as Model Garden's samplers compute it."""
        if self.mixing.name == "uniform":
            return tf.fill([len(self.task_names)], 1.0 / len(self.task_names))
        if self.mixing.name == "proportional":
            alpha = tf.constant(self.mixing.parameters["alpha"], tf.float32)
        else:  # annealed: AnnealingTaskSampler's alpha, 1 at (0-based) epoch 1, falling 0.8 / (E - 1) per epoch.
            steps_per_epoch, total_steps = tf.unstack(self.schedule)
            epoch = tf.floor(tf.cast(step, tf.float32) / steps_per_epoch)
            total_epochs = total_steps / steps_per_epoch
            # Past its total_steps (a longer run than the schedule's) it would turn negative and favour the
            # smallest task: it stops at 0 (uniform) instead.
            alpha = tf.maximum(1.0 - 0.8 * (epoch - 1.0) / (total_epochs - 1.0 + 1e-10), 0.0)
        # n_t^alpha / sum_s n_s^alpha, as a softmax of alpha log n_t (no overflow for large n or alpha).
        return tf.nn.softmax(alpha * self._log_examples)

    def draw(self) -> tf.Tensor:
        """The task of the next step (its index), the same on every replica and worker; counts it."""
        step = self.draws.read_value()
        uniform = tf.random.stateless_uniform([], seed=tf.stack([tf.constant(self._seed, tf.int64), step]))
        cumulative = tf.cumsum(self.probabilities(step))
        task = tf.minimum(tf.searchsorted(cumulative, uniform[None], side="right")[0], len(self.task_names) - 1)
        self.draws.assign_add(1)
        self.task_draws.assign_add(tf.one_hot(task, len(self.task_names), dtype=tf.int64))
        return task


def sampled_turns(task_steps: Mapping[str, Callable[[object], dict[str, tf.Tensor]]], sampler: TaskSampler,
                  measurement_names: Sequence[str]) -> Callable[[Mapping[str, object]], dict[str, tf.Tensor]]:
    """Returns `train_step(iterators)`: one step of the drawn task on the next batch of its own iterator.

    `task_steps`: each task's train step (`core/step.py`'s, on that task's
    losses alone). Each is traced in a branch of the switch as a plain
    function (its `python_function`): a `tf.function` called there under
    MirroredStrategy left its inputs unfed ("You must feed a value for
    placeholder tensor", measured). Every measurement of
    `measurement_names` is returned, 0 for the other tasks' losses;
    `steps/<task>` is 1 for the drawn task, so that summed over a window
    they count each task's steps.
    """
    names = list(task_steps)

    def train_step(iterators):
        def turn(task):
            def run_task():
                step = getattr(task_steps[task], "python_function", task_steps[task])
                measured = step(next(iterators[task]))  # Only the drawn task's data advances.
                return {name: measured[name] if name in measured else tf.constant(float(name == f"steps/{task}"))
                        for name in measurement_names}
            return run_task

        # Every replica and worker takes the same branch: the draw is made once, outside the replicas.
        return tf.switch_case(tf.cast(sampler.draw(), tf.int32), [turn(task) for task in names])

    return train_step
