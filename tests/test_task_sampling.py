"""Sampled turns (`--datasets` with `--task_mixing=uniform|proportional|annealed`): each step trains one drawn task.

What this file proves:

- The sampler's probabilities are Model Garden's
  (`official/modeling/multitask/task_sampler.py`): uniform 1/K,
  proportional n_t^alpha / sum_s n_s^alpha against NumPy, annealed against
  the cumulative distributions Model Garden's own test expects
  (`task_sampler_test.py`, `test_annealing_sample_distribution`).
- The draws are the documented inversion of `stateless_uniform(seed=[seed,
  step])`, their counts follow the probabilities (binomial bounds), and the
  sequence is a function of (seed, step) alone.
- A run draws that sequence (the `steps/<task>` of every logged window), the
  same in every run; a run stopped after k steps and rerun to N into the same
  --model_dir ends bit for bit where the uninterrupted N-step run ends, its
  checkpointed counts of each task's draws restored (with a shuffle buffer, so
  where each task's data stands matters).
- Each step is one SGD step on the drawn task alone: its outputs' weighted
  losses, each the sample-weighted mean over the task's global batch, on the
  task's next batch (file order, endless, full batches). The reference is
  written here with tf.GradientTape and replays the draws of an eager
  `TaskSampler` built as the run builds it.
- Two replicas, and two workers each drawing in its own process, end where
  one device ends.
- What a sampled mixing cannot do is refused from Python (the command line's
  one-line errors are rows of tests/test_cli.py's BAD_INPUTS).

`uniform`'s one-task step is checked in the inner loop; its resume, the
`proportional` and `annealed` runs and the mirrored run are slow.
"""

import json
import math
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import HEADLINE, SMALL_MODEL, Launch, max_weight_difference, once, small_config, write_npz
from mto_tf import train
from mto_tf.core.models import build_headline
from mto_tf.core.task_sampling import TaskSampler
from mto_tf.errors import ConfigError
from mto_tf.task_mixing import parse

# --- The sampler's probabilities, against independent formulas ------------------------------------------------

# float32 logs, products and exponentials of values below 10 (the sampler's softmax of alpha * log n): a few ulps
# relative, far below any change of alpha or of a task's size.
PROBABILITY_RTOL = 1e-5


@pytest.mark.parametrize("num_tasks", [2, 3, 5])
def test_uniform_probabilities_are_one_over_the_number_of_tasks_at_every_step(num_tasks):
    sampler = TaskSampler(parse("uniform"), task_examples={f"task{k}": 10 * (k + 1) for k in range(num_tasks)},
                          seed=0, steps_per_epoch=1, total_steps=1)
    for step in (0, 1, 17, 10**6):
        np.testing.assert_allclose(sampler.probabilities(step).numpy(), np.full(num_tasks, 1 / num_tasks),
                                   rtol=PROBABILITY_RTOL)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0])
def test_proportional_probabilities_are_examples_to_the_alpha_normalized(alpha):
    examples = {"a": 40, "b": 24, "c": 7}
    sampler = TaskSampler(parse({"name": "proportional", "alpha": alpha}), task_examples=examples, seed=0,
                          steps_per_epoch=1, total_steps=1)
    powered = np.array(list(examples.values()), np.float64) ** alpha
    for step in (0, 5, 1000):  # No step dependence.
        np.testing.assert_allclose(sampler.probabilities(step).numpy(), powered / powered.sum(),
                                   rtol=PROBABILITY_RTOL)


def test_proportional_matches_model_gardens_test_and_takes_sizes_whose_powers_overflow_float32():
    # Model Garden's test_proportional_sample_distribution: weights 1, 2, 3 and alpha 2; its expected
    # cumulative distribution, to its own tolerance (tf.test's assertAllClose: 1e-6).
    sampler = TaskSampler(parse({"name": "proportional", "alpha": 2}), task_examples={"A": 1, "B": 2, "C": 3},
                          seed=0, steps_per_epoch=1, total_steps=1)
    np.testing.assert_allclose(np.cumsum(sampler.probabilities(0).numpy()), [0.07142857, 0.35714286, 1.0],
                               rtol=1e-6, atol=1e-6)
    # (10^6)^8 = 1e48 is beyond float32 (3.4e38): the distribution must still be the exact one.
    huge = TaskSampler(parse({"name": "proportional", "alpha": 8}), task_examples={"a": 10**6, "b": 10**5},
                       seed=0, steps_per_epoch=1, total_steps=1)
    # The small probability is exp(8 (log 1e5 - log 1e6)): each float32 log is rounded by ~1e-6 absolute,
    # times 8, so its relative error is ~1e-5; 1e-4 allows that and nothing like a wrong alpha.
    np.testing.assert_allclose(huge.probabilities(0).numpy(), [1 / (1 + 1e-8), 1e-8 / (1 + 1e-8)], rtol=1e-4)


# Model Garden's test_annealing_sample_distribution: task weights {A: 1, B: 2, C: 3}, 6 steps per epoch, 18 steps;
# the cumulative distribution at each step of epochs 0, 1 and 2 (alpha 1.4, 1.0, 0.6).
MODEL_GARDEN_ANNEALED = [[0.12056106, 0.4387236, 1.0], [0.16666667, 0.5, 1.0], [0.22477472, 0.5654695, 1.0]]


def test_annealed_cumulative_distributions_are_model_gardens_at_every_step():
    annealed = parse({"name": "annealed", "steps_per_epoch": 6, "total_steps": 18})
    # The schedule's parameters win over the run's (what a run passes: a pass over its largest task, and
    # --train_steps); with none given, the run's are used.
    given = TaskSampler(annealed, task_examples={"A": 1, "B": 2, "C": 3}, seed=0, steps_per_epoch=5,
                        total_steps=100)
    from_the_run = TaskSampler(parse("annealed"), task_examples={"A": 1, "B": 2, "C": 3}, seed=0, steps_per_epoch=6,
                               total_steps=18)
    for step in range(18):
        for sampler in (given, from_the_run):
            # Model Garden's own tolerance (tf.test's assertAllClose: 1e-6), on its printed 8 digits.
            np.testing.assert_allclose(np.cumsum(sampler.probabilities(step).numpy()),
                                       MODEL_GARDEN_ANNEALED[step // 6], rtol=1e-6, atol=1e-6, err_msg=f"step {step}")


# --- The draws ---------------------------------------------------------------------------------------------------

NUM_DRAWS = 4000


def traced_draws(sampler, count):
    """`count` draws of `sampler`, in a `tf.function` loop as the train loop draws them (4000 eager draws take
    ~10 s; the eager and traced sequences are compared below)."""

    @tf.function
    def draw_all():
        drawn = tf.TensorArray(tf.int32, size=count)
        for step in tf.range(count):
            drawn = drawn.write(step, tf.cast(sampler.draw(), tf.int32))
        return drawn.stack()

    return draw_all().numpy()


def eager_draws(sampler, count):
    return [int(sampler.draw()) for _ in range(count)]


def documented_draws(probabilities, *, seed, count):
    """The documented draw, independently: u = stateless_uniform([], seed=[seed, step]); the first task whose
    cumulative probability (NumPy, float64) is > u; the last task if none is."""

    @tf.function
    def uniforms():
        drawn = tf.TensorArray(tf.float32, size=count)
        for step in tf.range(count, dtype=tf.int64):
            drawn = drawn.write(tf.cast(step, tf.int32), tf.random.stateless_uniform(
                [], seed=tf.stack([tf.constant(seed, tf.int64), step])))
        return drawn.stack()

    cumulative = np.cumsum(np.asarray(probabilities, np.float64))
    return np.minimum(np.searchsorted(cumulative, uniforms().numpy(), side="right"), len(cumulative) - 1)


@pytest.mark.parametrize("mixing, examples", [
    ({"name": "proportional", "alpha": 1.0}, {"main_output": 40, "aux_output": 24}),
    ({"name": "proportional", "alpha": 0.5}, {"a": 50, "b": 30, "c": 20}),
    ("uniform", {"a": 50, "b": 30, "c": 20}),
])
def test_draws_are_the_documented_inversion_and_their_counts_follow_the_probabilities(mixing, examples):
    seed = 3
    sampler = TaskSampler(parse(mixing), task_examples=examples, seed=seed, steps_per_epoch=1, total_steps=1)
    sizes = np.array(list(examples.values()), np.float64)
    alpha = 0.0 if mixing == "uniform" else mixing["alpha"]
    probabilities = sizes**alpha / np.sum(sizes**alpha)

    drawn = traced_draws(sampler, NUM_DRAWS)
    np.testing.assert_array_equal(drawn, documented_draws(probabilities, seed=seed, count=NUM_DRAWS))
    counts = np.bincount(drawn, minlength=len(examples))
    # The sampler counts what it drew (what a checkpoint holds).
    assert int(sampler.draws.numpy()) == NUM_DRAWS
    np.testing.assert_array_equal(sampler.task_draws.numpy(), counts)
    # Each count is Binomial(4000, p): within 4 standard deviations of 4000 p. A correct sampler leaves that
    # band with probability 6e-5 per task for a random seed; a sampler whose probability is off by more than
    # ~0.03 (4 sigma / 4000 at p = 0.5) lands outside it.
    sigma = np.sqrt(NUM_DRAWS * probabilities * (1 - probabilities))
    assert np.all(np.abs(counts - NUM_DRAWS * probabilities) <= 4 * sigma), (counts, NUM_DRAWS * probabilities)
    # Drawn eagerly (as a test or a user may), the sequence is the same.
    again = TaskSampler(parse(mixing), task_examples=examples, seed=seed, steps_per_epoch=1, total_steps=1)
    assert eager_draws(again, 100) == drawn[:100].tolist()


def test_the_sequence_is_a_function_of_the_seed_and_the_step_only():
    def sampler(seed):
        return TaskSampler(parse("uniform"), task_examples={"a": 10, "b": 10, "c": 10}, seed=seed,
                           steps_per_epoch=1, total_steps=1)

    first, second = eager_draws(sampler(11), 40), eager_draws(sampler(11), 40)
    assert first == second
    assert len(set(first)) == 3  # Not a constant sequence.
    assert eager_draws(sampler(12), 40) != first  # 3^-40 to be equal by chance.
    # A sampler set to step 20 (as a restored checkpoint sets it) continues the sequence from there.
    resumed = sampler(11)
    resumed.draws.assign(20)
    assert eager_draws(resumed, 20) == first[20:]


# --- Runs: two tasks, two npz files, two batch sizes --------------------------------------------------------------

# Each task's training examples and GLOBAL batch size: neither divides, so a task's data wraps around within a
# batch (main_output's 5th, aux_output's 3rd: endless, full batches). Both even: two replicas split them. Sizes
# far apart, so that proportional and annealed draw otherwise than uniform (checked below).
TASK_EXAMPLES = {"main_output": 36, "aux_output": 14}
BATCH_SIZES = {"main_output": 8, "aux_output": 6}
NPZ_SEEDS = {"main_output": 1, "aux_output": 2}  # Different data in each file.
# Chosen (from eager TaskSampler draws, never from a run) so that every check below has something to check: see
# each test's preconditions.
SEED = 14
STEPS = 10
RESUME_AT = 5  # A window's end: the resumed run's records are the uninterrupted run's.
LOG_EVERY = 5
STEPS_PER_LOOP = 3  # Calls of 3 and 2 steps: one tf.function call draws several tasks.
LEARNING_RATE = 0.1  # small_config's SGD.
# The headline model's own losses and weights (what mto_tf trains on unless told otherwise): binary
# cross-entropy on each output, the Keras guide's weights 1.0 and 0.2.
LOSS_WEIGHTS = {"main_output": 1.0, "aux_output": 0.2}
# The annealed run's epoch: a pass over its largest task (main_output's 36 examples in batches of 8).
ANNEALED_STEPS_PER_EPOCH = math.ceil(TASK_EXAMPLES["main_output"] / BATCH_SIZES["main_output"])

# The reference's SGD steps are the run's operations on the same float32 values except for the order of a few
# sums (the loss over a batch, an embedding row's gradient gathered from an IndexedSlices): a few ulps per step
# (measured 7e-9), and 1e-6 allows that over 10 steps of rate 0.1 and nothing like a wrong batch, task or weight
# (measured: the shuffled order instead of file order moves the weights by 0.02, an aux loss not weighted by 0.2
# by 0.05).
WEIGHT_ATOL = 1e-6
# Window means of per-step losses of order 1 from those weights: the same few ulps (measured 4e-8 relative).
LOSS_RTOL = 1e-5


def shared_data():
    """Each task's npz file, its arrays, and the initial weights every run starts from (once per process)."""

    def make(directory):
        arrays = {task: write_npz(directory / f"{task}.npz", num_examples=TASK_EXAMPLES[task],
                                  with_sample_weights=True, seed=NPZ_SEEDS[task]) for task in TASK_EXAMPLES}
        build_headline(small_config(directory)).save_weights(directory / "init.weights.h5")
        return directory, arrays

    return once("task sampling: two tasks' data and initial weights", make)


def sampled_config(model_dir, task_mixing, *, shuffle_buffer, train_steps=STEPS, **overrides):
    """The small headline model on the two tasks' files, SGD, `task_mixing`; `overrides` win."""
    directory, _ = shared_data()
    return small_config(
        model_dir.parent, model_dir=str(model_dir), datasets={task: f"npz:{directory / f'{task}.npz'}"
                                                              for task in TASK_EXAMPLES},
        batch_size=dict(BATCH_SIZES), task_mixing=task_mixing, shuffle_buffer=shuffle_buffer, seed=SEED,
        init_weights=str(directory / "init.weights.h5"), train_steps=train_steps, steps_per_loop=STEPS_PER_LOOP,
        log_every=LOG_EVERY, progress="quiet",
        # Their defaults: small_config sets them for synthetic_headlines, which --datasets does not read.
        synthetic_train_examples=10000, synthetic_validation_examples=1000, **overrides)


def sampler_counts(model_dir):
    """The latest checkpoint's sampler counts: (steps drawn, each task's draws)."""
    reader = tf.train.load_checkpoint(str(model_dir / "checkpoints"))
    return (int(reader.get_tensor("task_sampler/draws/.ATTRIBUTES/VARIABLE_VALUE")),
            reader.get_tensor("task_sampler/task_draws/.ATTRIBUTES/VARIABLE_VALUE").tolist())


def sampled_run(mixing, *, shuffle_buffer, strategy=None):
    """One N-step run (once per process): its history, final weights and checkpointed sampler counts."""

    def run(directory):
        result = train(sampled_config(directory / "run", mixing, shuffle_buffer=shuffle_buffer), strategy=strategy)
        return result.history, result.model.get_weights(), sampler_counts(directory / "run")

    shared_data()  # Outside: `once` computes one thing at a time.
    return once(("task sampling: run", mixing, shuffle_buffer, strategy is not None), run)


def drawn_tasks(mixing, *, seed=SEED, steps_per_epoch=ANNEALED_STEPS_PER_EPOCH):
    """The tasks the run must draw: an eager TaskSampler built as the run builds it (each task weighed by its
    examples, the run's seed; annealed's epoch a pass over the largest task, its length --train_steps)."""
    sampler = TaskSampler(parse(mixing), task_examples=TASK_EXAMPLES, seed=seed, steps_per_epoch=steps_per_epoch,
                          total_steps=STEPS)
    return [sampler.task_names[int(sampler.draw())] for _ in range(STEPS)]


def windows(values):
    return [values[start:start + LOG_EVERY] for start in range(0, len(values), LOG_EVERY)]


def steps_per_window(tasks):
    return [{f"steps/{task}": float(window.count(task)) for task in TASK_EXAMPLES} for window in windows(tasks)]


def logged_steps(history):
    return [{f"steps/{task}": record[f"steps/{task}"] for task in TASK_EXAMPLES} for record in history]


def expected_counts(tasks):
    return len(tasks), [tasks.count(task) for task in TASK_EXAMPLES]


def wrapping_batch(task):
    """The 1-based number of the task's first batch that wraps around to its first examples (also: the steps of
    a pass over it)."""
    return math.ceil(TASK_EXAMPLES[task] / BATCH_SIZES[task])


# --- (a) The same draws in every run, and across a resume -----------------------------------------------------

# Shuffled: each task's batches depend on where its data stands, so a resumed run that read a task's data from
# its start, or from the global step, would train on other batches.
SHUFFLE_BUFFER = 64


def resumed_run(mixing):
    """RESUME_AT steps, then rerun to STEPS into the same --model_dir (once per process)."""

    def run(directory):
        model_dir = directory / "run"
        first_part = train(sampled_config(model_dir, mixing, shuffle_buffer=SHUFFLE_BUFFER, train_steps=RESUME_AT))
        counts_when_stopped = sampler_counts(model_dir)
        resumed = train(sampled_config(model_dir, mixing, shuffle_buffer=SHUFFLE_BUFFER))
        records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
        return (first_part.history, counts_when_stopped, records, resumed.model.get_weights(),
                sampler_counts(model_dir))

    shared_data()  # Outside: `once` computes one thing at a time.
    return once(("task sampling: resumed run", mixing), run)


def check_same_draws_and_exact_resume(mixing):
    tasks = drawn_tasks(mixing)
    history, weights, counts = sampled_run(mixing, shuffle_buffer=SHUFFLE_BUFFER)
    assert [record["step"] for record in history] == [5, 10]
    assert logged_steps(history) == steps_per_window(tasks)
    assert counts == expected_counts(tasks)

    first_part, counts_when_stopped, records, resumed_weights, resumed_counts = resumed_run(mixing)
    assert logged_steps(first_part) == steps_per_window(tasks[:RESUME_AT])
    assert counts_when_stopped == expected_counts(tasks[:RESUME_AT])
    assert resumed_counts == expected_counts(tasks)
    # Same ops on the same batches in the same order, the checkpoint restored exactly: bit for bit.
    for whole, split in zip(weights, resumed_weights, strict=True):
        np.testing.assert_array_equal(whole, split)
    assert [record["step"] for record in records] == [5, 10]
    for whole, split in zip(history, records, strict=True):
        assert {name: value for name, value in whole.items() if name != "examples_per_sec"} == {
            name: value for name, value in split.items() if name != "examples_per_sec"}


@pytest.mark.slow  # The inner loop resumes a joint run (test_task_datasets.py); CI runs this one too.
def test_uniform_turns_are_the_same_in_every_run_and_a_resumed_run_ends_bit_for_bit_where_a_whole_one_ends():
    tasks = drawn_tasks("uniform")
    # Preconditions (SEED chosen for them): both tasks in each window and before the resume; another seed
    # draws otherwise (a run that ignored --seed would fail).
    assert all(set(window) == set(TASK_EXAMPLES) for window in windows(tasks) + [tasks[:RESUME_AT]])
    assert drawn_tasks("uniform", seed=0) != tasks
    check_same_draws_and_exact_resume("uniform")


# --- (b) Each step: one SGD step on the drawn task's next batch and its losses alone ------------------------

def reference_run(mixing):
    """Replays the draws: for each step, an SGD step (tf.GradientTape) on the drawn task's next batch of its own
    file (file order, endless, full batches) and on its output's loss alone, the sample-weighted mean over its
    global batch times its loss weight. Returns the tasks, each step's (task loss, weighted loss), the weights."""
    directory, arrays = shared_data()
    assert dict(HEADLINE.losses) == {task: "binary_crossentropy" for task in TASK_EXAMPLES}
    assert dict(HEADLINE.loss_weights) == LOSS_WEIGHTS
    model = build_headline(small_config(directory))
    model.load_weights(directory / "init.weights.h5")
    tasks = drawn_tasks(mixing)
    batches_read = dict.fromkeys(TASK_EXAMPLES, 0)
    step_losses = []
    for task in tasks:
        task_arrays, batch_size = arrays[task], BATCH_SIZES[task]
        rows = (batches_read[task] * batch_size + np.arange(batch_size)) % TASK_EXAMPLES[task]  # Wraps around.
        batches_read[task] += 1
        inputs = {"main_input": task_arrays["main_input"][rows].astype(np.int32),
                  "aux_input": task_arrays["aux_input"][rows]}
        labels = task_arrays[task][rows].reshape(-1, 1)
        sample_weights = task_arrays[f"sample_weight/{task}"][rows]
        with tf.GradientTape() as tape:
            prediction = model(inputs, training=True)[task]
            per_example = keras.losses.binary_crossentropy(labels, prediction)
            task_loss = tf.reduce_sum(per_example * sample_weights) / batch_size
            weighted_loss = LOSS_WEIGHTS[task] * task_loss
        gradients = tape.gradient(weighted_loss, model.trainable_variables)
        for variable, gradient in zip(model.trainable_variables, gradients, strict=True):
            if gradient is not None:  # The other task's head: no gradient, no update.
                variable.assign_sub(LEARNING_RATE * tf.convert_to_tensor(gradient))
        step_losses.append((float(task_loss), float(weighted_loss)))
    return tasks, step_losses, model.get_weights()


def expected_records(tasks, step_losses):
    """Each window: `loss` the mean over its steps; `<output>_loss` the mean over its task's steps (absent
    without any); `steps/<task>` its task's steps."""
    records = []
    for window_tasks, window_losses in zip(windows(tasks), windows(step_losses), strict=True):
        record = {"loss": np.mean([weighted for _, weighted in window_losses])}
        for task in TASK_EXAMPLES:
            own = [task_loss for drawn, (task_loss, _) in zip(window_tasks, window_losses) if drawn == task]
            if own:
                record[f"{task}_loss"] = np.mean(own)
        records.append(record)
    return records


def check_steps_match_the_reference(mixing):
    tasks, step_losses, reference_weights = reference_run(mixing)
    history, weights, counts = sampled_run(mixing, shuffle_buffer=0)
    assert logged_steps(history) == steps_per_window(tasks)
    assert counts == expected_counts(tasks)
    assert max_weight_difference(weights, reference_weights) <= WEIGHT_ATOL
    for record, expected in zip(history, expected_records(tasks, step_losses), strict=True):
        assert {name for name in record if name.endswith("loss")} == set(expected), record
        # A metric too is logged only for the outputs whose task was drawn in the window (else it reads 0).
        assert {name for name in record if name.endswith("accuracy")} == {
            name.replace("_loss", "_binary_accuracy") for name in expected if name != "loss"}, record
        for name, value in expected.items():
            assert record[name] == pytest.approx(value, rel=LOSS_RTOL), (record["step"], name)


def test_uniform_turn_is_one_sgd_step_on_the_drawn_tasks_next_batch_and_its_losses_alone():
    tasks = drawn_tasks("uniform")
    # Precondition (SEED chosen for it): each task reads the batch where its data wraps around.
    assert all(tasks.count(task) >= wrapping_batch(task) for task in TASK_EXAMPLES)
    check_steps_match_the_reference("uniform")


# The other samplers: the same two checks. Annealed's schedule is --train_steps unless given: the run stopped
# after RESUME_AT steps must be given the whole run's length, and the reference run takes the default.
OTHER_MIXINGS = {
    "proportional": ({"name": "proportional", "alpha": 0.5}, {"name": "proportional", "alpha": 0.5}),
    "annealed": ({"name": "annealed", "total_steps": STEPS}, "annealed"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OTHER_MIXINGS))
def test_proportional_and_annealed_turns_resume_bit_for_bit_and_are_one_task_sgd_steps(name):
    resumable, default = OTHER_MIXINGS[name]
    tasks = drawn_tasks(default)
    # Both take the same draws: annealed's default length is --train_steps.
    assert drawn_tasks(resumable) == tasks
    # Preconditions (SEED chosen for them): both tasks before the resume; and the draws are not those of a
    # mixing or schedule wired wrongly: uniform; for annealed, an alpha that never anneals (proportional's 1),
    # or an epoch that is a pass over the smaller task.
    assert set(tasks[:RESUME_AT]) == set(TASK_EXAMPLES)
    wrong = [drawn_tasks("uniform")]
    if name == "annealed":
        wrong += [drawn_tasks("proportional"), drawn_tasks("annealed", steps_per_epoch=wrapping_batch("aux_output"))]
    assert tasks not in wrong
    check_same_draws_and_exact_resume(resumable)
    check_steps_match_the_reference(default)


# --- Two replicas --------------------------------------------------------------------------------------------------

# Each replica's gradient of its half of the batch, summed across replicas: the same sums in another order, a
# few float32 ulps per step (measured 3e-8 after 10 steps); 1e-6 as for the one-device reference above. The
# draws are made once, outside the replicas: the same task on both, the same sequence as one device.
MIRRORED_WEIGHT_ATOL = 1e-6


@pytest.mark.slow
def test_uniform_turns_on_two_replicas_end_where_one_device_ends(mirrored_strategy):
    history, weights, counts = sampled_run("uniform", shuffle_buffer=0)
    mirrored_history, mirrored_weights, mirrored_counts = sampled_run("uniform", shuffle_buffer=0,
                                                                      strategy=mirrored_strategy)
    assert logged_steps(mirrored_history) == logged_steps(history)
    assert mirrored_counts == counts
    assert max_weight_difference(mirrored_weights, weights) <= MIRRORED_WEIGHT_ATOL
    for record, mirrored in zip(history, mirrored_history, strict=True):
        for name in record:
            if name.endswith("loss"):
                assert mirrored[name] == pytest.approx(record[name], rel=LOSS_RTOL), name


# --- What a sampled mixing refuses, from Python ----------------------------------------------------------------

BAD_SETTINGS = {
    "unknown mixing": (dict(task_mixing="round_robin"),
                       r"^--task_mixing: unknown mixing 'round_robin'; expected one of joint, uniform, proportional, "
                       r"annealed"),
    "alpha below 0": (dict(task_mixing={"name": "proportional", "alpha": -0.5}),
                      r"^--task_mixing: proportional's alpha must be a number >= 0, got -0.5"),
    "annealed's epoch not an integer": (
        dict(task_mixing={"name": "annealed", "steps_per_epoch": 2.5}),
        r"^--task_mixing: annealed's steps_per_epoch must be an integer >= 0 .*, got 2.5"),
    "an adaptive loss weighting": (
        dict(task_mixing="uniform", loss_weighting="uncertainty"),
        r"^--loss_weighting: uncertainty weighs the tasks' losses .* use --task_mixing=joint"),
    "epochs": (dict(task_mixing="proportional", train_steps=None, epochs=2),
               r"^--epochs: with --task_mixing=proportional, how many steps a pass over a task takes depends on the "
               r"draws; give --train_steps"),
    "gradient accumulation": (dict(task_mixing="annealed", grad_accum_steps=2),
                              r"^--grad_accum_steps: not with --task_mixing=annealed: each step trains one task"),
    "XLA": (dict(task_mixing="uniform", jit_compile=True),
            r"^--jit_compile: not with --task_mixing=uniform: XLA cannot read the drawn task's batches"),
}


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_what_a_sampled_mixing_cannot_do_is_refused_by_name(tmp_path, case):
    settings, message = BAD_SETTINGS[case]
    with pytest.raises(ConfigError, match=message):
        sampled_config(tmp_path / "run", shuffle_buffer=0, **settings)


def test_an_annealed_schedule_of_less_than_two_epochs_is_refused_before_anything_is_written(tmp_path):
    # 1 / (E - 1) with E <= 1 epochs: alpha huge or negative (favouring the smallest task); Model Garden has no guard.
    config = sampled_config(tmp_path / "run", {"name": "annealed", "steps_per_epoch": 6, "total_steps": 10},
                            shuffle_buffer=0)
    with pytest.raises(ConfigError, match=r"^--task_mixing: annealed anneals over epochs of 6 steps and needs two at "
                                          r"least; its total_steps is 10"):
        train(config)
    assert not (tmp_path / "run").exists()


def test_an_annealed_schedule_is_checkpointed_so_a_resume_with_another_train_steps_draws_the_same_tasks(tmp_path):
    # --train_steps may change on resume and is annealed's default total: the restored schedule is the first's.
    first = TaskSampler(parse("annealed"), task_examples={"a": 30, "b": 10}, seed=0, steps_per_epoch=5,
                        total_steps=20)
    saved = tf.train.Checkpoint(sampler=first).write(str(tmp_path / "annealed"))
    resumed = TaskSampler(parse("annealed"), task_examples={"a": 30, "b": 10}, seed=0, steps_per_epoch=5,
                          total_steps=60)
    tf.train.Checkpoint(sampler=resumed).read(saved).assert_consumed()
    for step in (0, 7, 12, 19):
        np.testing.assert_array_equal(resumed.probabilities(step).numpy(), first.probabilities(step).numpy())


@pytest.mark.slow
@pytest.mark.xdist_group("multi_worker")  # One launch on 127.0.0.1 at a time, with test_multi_worker.py's.
def test_uniform_turns_on_two_workers_draw_the_same_tasks_and_end_where_one_device_ends(tmp_path):
    # Each worker draws in its own process: the same (seed, step), so the same task, or their collectives would
    # not pair (a hang, or the launcher's timeout).
    directory, _ = shared_data()
    datasets = {task: f"npz:{directory / (task + '.npz')}" for task in TASK_EXAMPLES}
    flags = [*(f"--{name}={value}" for name, value in SMALL_MODEL.items()), f"--datasets={json.dumps(datasets)}",
             f"--batch_size={json.dumps(BATCH_SIZES)}", "--task_mixing=uniform", f"--seed={SEED}",
             f"--init_weights={directory / 'init.weights.h5'}", "--optimizer=sgd", f"--learning_rate={LEARNING_RATE}",
             f"--train_steps={STEPS}", f"--steps_per_loop={STEPS_PER_LOOP}", f"--log_every={LOG_EVERY}",
             "--progress=quiet", f"--model_dir={tmp_path / 'run'}"]
    launch = Launch(*flags, base_flags=["--strategy=multi_worker"])
    assert launch.wait() == 0, launch.output[-4000:]
    found = re.findall(r"\[worker (\d)\] .*Final weights fingerprint: (\w+)", launch.output)
    assert sorted(worker for worker, _ in found) == ["0", "1"] and found[0][1] == found[1][1]
    model = build_headline(small_config(tmp_path))
    model.load_weights(tmp_path / "run" / "model.weights.h5")
    history, weights, counts = sampled_run("uniform", shuffle_buffer=0)
    # Each global batch split over two workers and its gradient summed across them: rounding only (WEIGHT_ATOL).
    assert max_weight_difference(model.get_weights(), weights) <= WEIGHT_ATOL
    assert sampler_counts(tmp_path / "run") == counts
