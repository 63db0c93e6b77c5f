"""One dataset per task (`--datasets`) with `--task_mixing=joint`: each step one batch of every task, one update.

What this file proves, on the small headline model (outputs `main_output`,
weight 1.0, and `aux_output`, weight 0.2, both binary cross-entropy):

- Two tasks reading ONE file with one batch size train exactly as the
  single-dataset run on that file: per-step losses, final weights and the
  validation values (sample weights, a shuffle buffer; and with --epochs).
  The same with an adaptive method: `dwa` (loss-based) and `upgrad` (gradient).
- Two DIFFERENT files with DIFFERENT batch sizes train as a plain
  `tf.GradientTape` loop written here: each output's loss on its own task's
  batch, divided by that batch's examples, `1.0 L_main + 0.2 L_aux`, one SGD
  update; the --epochs task read in passes (its partial batch last), the
  other endless with wraparound. On one device, under the session's
  MirroredStrategy (2 replicas, the partial batch split 2 + 1) and under two
  local workers.
- Each task validates on its own file: `val_<output>_loss` is the exact mean
  over that file, `val_loss` their weighted total; `mto-evaluate
  --datasets --eval_data='{TASK: ...}'` gives the same values.
- A joint run resumed from a checkpoint ends bit for bit where an
  uninterrupted one ends (each task's shuffled data continues where it was).
- Bad tasks and sources are refused with one line naming the flag, before
  anything is written.

No expected number comes from mto_tf itself: the references are Keras's own
loss functions and optimizer, driven here.
"""

import json
import re
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import (HEADLINE, LOSS_RTOL, SMALL_MODEL, VALUE_RTOL, Launch, exact_means, max_weight_difference, once,
                     run_in_process, small_config, write_npz)
from mto_tf import TrainConfig, train
from mto_tf.core.models import build_headline
from mto_tf.errors import ConfigError

MAIN, AUX = "main_output", "aux_output"
LOSS_WEIGHTS = {MAIN: 1.0, AUX: 0.2}  # The headline model's own: what every run here trains with.
LOSS_NAMES = ("loss", f"{MAIN}_loss", f"{AUX}_loss")
LEARNING_RATE = 0.1  # SGD: bit-level parity (Adam amplifies the rounding of near-zero gradients).

# One file both tasks read: 40 examples, batches of 16 (the endless stream's batches straddle passes).
SHARED_EXAMPLES, SHARED_BATCH, SHARED_STEPS = 40, 16, 6
# Two files: the main task 19 examples in batches of 8, read by --epochs=2 in passes of 8, 8 and 3 (split
# 2 + 1 on two replicas); the aux task 10 examples in batches of 4, endless: rows 8, 9, 0, 1 share a batch.
MAIN_EXAMPLES, MAIN_BATCH, AUX_EXAMPLES, AUX_BATCH, EPOCHS = 19, 8, 10, 4, 2
TWO_FILE_STEPS = EPOCHS * 3
# Each task's validation file: 21 examples in batches of 8 (the last 5: 3 + 2 on two replicas), 13 in
# batches of 4 (the last 1: 1 + 0).
MAIN_VALIDATION_EXAMPLES, AUX_VALIDATION_EXAMPLES = 21, 13

# Final weights: the same float32 operations on the same batches, summed in the same or another order (a
# forward pass per task instead of one; partial sums over replicas): rounding only. Measured: joint against
# the single-dataset run 2.2e-8 (fixed and dwa; upgrad 0), against the tape loop 1.9e-9 on one device and
# 1.5e-8 mirrored (API.md: 3e-8). What a wrong batch or divisor does in these 6 steps is 1e-2 (measured: the
# aux task read in passes 1.1e-2, its loss divided by the main task's batch size 2.1e-2, aux_output's loss
# on the main task's batch 2.8e-2): 1e-6 lets rounding through and nothing else.
WEIGHT_ATOL = 1e-6
# Per-step losses: helpers.LOSS_RTOL (1e-6), reported as sums of replica shares (measured 0 on one device,
# 9e-8 mirrored). Validation values: helpers.VALUE_RTOL (1e-5), sums over batches (and replicas) against
# NumPy's one sum over the file (measured 0 here; elsewhere in the suite a few ulps).


# --- Data, initial weights and configs ----------------------------------------------------------------------------


def data() -> Path:
    """The directory holding every npz file and `init.weights.h5`, written once per test process."""

    def write(directory):
        write_npz(directory / "shared.npz", num_examples=SHARED_EXAMPLES, with_sample_weights=True, seed=0)
        write_npz(directory / "shared_validation.npz", num_examples=20, with_sample_weights=True, seed=1)
        # Each file also holds the other output's labels and weights: another task's, ignored.
        write_npz(directory / "main.npz", num_examples=MAIN_EXAMPLES, with_sample_weights=True, seed=2)
        write_npz(directory / "aux.npz", num_examples=AUX_EXAMPLES, with_sample_weights=True, seed=3)
        write_npz(directory / "main_validation.npz", num_examples=MAIN_VALIDATION_EXAMPLES, with_sample_weights=True,
                  seed=4)
        write_npz(directory / "aux_validation.npz", num_examples=AUX_VALIDATION_EXAMPLES, with_sample_weights=True,
                  seed=5)
        keras.utils.set_random_seed(0)
        build_headline(small_config(directory)).save_weights(directory / "init.weights.h5")
        return directory

    return once("task datasets: data", write)


def arrays(name: str) -> dict[str, np.ndarray]:
    with np.load(data() / f"{name}.npz") as file:
        return {key: file[key] for key in file.files}


def npz(name: str) -> str:
    return f"npz:{data() / f'{name}.npz'}"


def config(model_dir, **overrides) -> TrainConfig:
    """The small headline model from the shared initial weights, SGD, a record every step, quiet."""
    settings = dict(model_dir=str(model_dir), init_weights=str(data() / "init.weights.h5"), optimizer="sgd",
                    learning_rate=LEARNING_RATE, progress="quiet")
    if "datasets" in overrides:  # small_config sets synthetic_headlines' sizes for its default dataset only.
        settings.update(synthetic_train_examples=10000, synthetic_validation_examples=1000)
    if overrides.get("epochs"):  # The run is counted in passes: no --train_steps (small_config sets 6).
        settings.update(train_steps=None)
    settings.update(overrides)
    return small_config(Path(model_dir).parent, **settings)


def one_file_tasks() -> dict[str, str]:
    return {MAIN: npz("shared"), AUX: npz("shared")}


# --epochs counts the main task's passes: by default here (the task with the most examples), by
# --epochs_of=main_output on the two workers' command line.
TWO_FILES = dict(batch_size={MAIN: MAIN_BATCH, AUX: AUX_BATCH}, epochs=EPOCHS)
TWO_VALIDATION_FILES = {MAIN: "main_validation", AUX: "aux_validation"}


def two_file_config(model_dir, **overrides) -> TrainConfig:
    return config(model_dir, datasets={MAIN: npz("main"), AUX: npz("aux")},
                  validation_data={task: npz(name) for task, name in TWO_VALIDATION_FILES.items()},
                  **TWO_FILES, **overrides)


def saved_weights(model_dir) -> list[np.ndarray]:
    model = build_headline(small_config(data()))
    model.load_weights(Path(model_dir) / "model.weights.h5")
    return model.get_weights()


def records_of(model_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(model_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_losses_close(records, expected_records):
    """Every logged step's losses: LOSS_RTOL (the reported values are sums of replica shares, a few ulps)."""
    assert [record["step"] for record in records] == [record["step"] for record in expected_records]
    for record, expected in zip(records, expected_records, strict=True):
        for name in LOSS_NAMES:
            np.testing.assert_allclose(record[name], expected[name], rtol=LOSS_RTOL,
                                       err_msg=f"step {record['step']} {name}")


# --- 1. Two tasks reading one file: the single-dataset run --------------------------------------------------------


def assert_same_training(joint, single):
    assert max_weight_difference(joint.model.get_weights(), single.model.get_weights()) <= WEIGHT_ATOL
    assert_losses_close(joint.history, single.history)


def test_two_tasks_reading_one_file_train_and_validate_as_the_single_dataset_run(tmp_path):
    # Sample weights (zeros included), a shuffle buffer smaller than the file (so the order matters), and the
    # endless stream's batches straddling passes (40 examples, batches of 16).
    settings = dict(batch_size=SHARED_BATCH, shuffle_buffer=24, seed=7, train_steps=SHARED_STEPS,
                    validation_data=npz("shared_validation"))
    single = train(config(tmp_path / "single", dataset=npz("shared"), **settings))
    joint = train(config(tmp_path / "joint", datasets=one_file_tasks(), **settings))

    assert [record["step"] for record in joint.history] == list(range(1, SHARED_STEPS + 1))
    assert_same_training(joint, single)
    # Validation on the shared file: each task evaluates its outputs on it, in batches of its size; the same
    # sums as one evaluation's, formed per task (measured equal): VALUE_RTOL.
    validated = [name for name in single.history[-1] if name.startswith("val_")]
    assert {"val_loss", f"val_{MAIN}_loss", f"val_{AUX}_loss"} <= set(validated)
    assert {name for name in joint.history[-1] if name.startswith("val_")} == set(validated)
    for name in validated:
        np.testing.assert_allclose(joint.history[-1][name], single.history[-1][name], rtol=VALUE_RTOL, err_msg=name)


@pytest.mark.slow
def test_with_epochs_two_tasks_reading_one_file_train_as_the_single_dataset_run(tmp_path):
    # With --epochs the task --epochs counts is read in passes, each ending with its partial batch, and the
    # other task ENDLESSLY in full batches: with a partial batch the other task's batch would hold the next
    # pass's first examples where the single run's holds the partial batch, so the two runs would differ by
    # design (that case is the hand-written reference's, below: two files, a partial batch). With a batch
    # size that divides the file (40 = 2 x 20) every batch is full, the endless stream's passes are the
    # passes, reshuffled alike (the same seed): the single-dataset run is then the exact reference.
    settings = dict(batch_size=20, epochs=2, shuffle_buffer=24, seed=7)
    single = train(config(tmp_path / "single", dataset=npz("shared"), **settings))
    joint = train(config(tmp_path / "joint", datasets=one_file_tasks(), **settings))
    assert [record["step"] for record in joint.history] == [1, 2, 3, 4]  # 2 passes of 2 batches.
    assert_same_training(joint, single)


# --- 2. Two files, two batch sizes: a plain tf.GradientTape loop ---------------------------------------------------


def epoch_rows(num_examples, batch_size, epochs) -> list[np.ndarray]:
    """The rows of each batch of `epochs` passes in file order, each pass ending with its partial batch."""
    return [np.arange(start, min(start + batch_size, num_examples))
            for _ in range(epochs) for start in range(0, num_examples, batch_size)]


def endless_rows(num_examples, batch_size, steps) -> list[np.ndarray]:
    """The rows of `steps` full batches of the file repeated in order: a pass's last rows share a batch with
    the next pass's first."""
    return [(step * batch_size + np.arange(batch_size)) % num_examples for step in range(steps)]


def task_batch(task_arrays, rows, output):
    inputs = {"main_input": task_arrays["main_input"][rows].astype("int32"),
              "aux_input": task_arrays["aux_input"][rows]}
    return inputs, task_arrays[output].reshape(-1, 1)[rows], task_arrays[f"sample_weight/{output}"][rows]


def tape_reference():
    """SGD on one device over the two files' batches, written out with Keras's loss function (computed once).

    Each step: the model on the main task's batch gives main_output's loss,
    on the aux task's batch aux_output's, each sum(sample weight x binary
    cross-entropy) / the examples of ITS batch (sum_over_batch_size per
    task); total = 1.0 L_main + 0.2 L_aux; one gradient, one update.
    Returns each step's losses (before its update, as a step logs them) and
    the final weights.
    """
    main_arrays, aux_arrays = arrays("main"), arrays("aux")
    directory = data()

    assert dict(HEADLINE.loss_weights) == LOSS_WEIGHTS  # What mto_tf trains the headline model with.

    def compute(_):
        main_rows = epoch_rows(MAIN_EXAMPLES, MAIN_BATCH, EPOCHS)
        aux_rows = endless_rows(AUX_EXAMPLES, AUX_BATCH, len(main_rows))
        assert [len(rows) for rows in main_rows] == [8, 8, 3] * EPOCHS and list(aux_rows[2]) == [8, 9, 0, 1]
        model = build_headline(small_config(directory))
        model.load_weights(directory / "init.weights.h5")
        optimizer = keras.optimizers.SGD(LEARNING_RATE)
        records = []
        for step, rows in enumerate(zip(main_rows, aux_rows), start=1):
            with tf.GradientTape() as tape:
                record = {"step": step}
                for output, task_arrays, task_rows in ((MAIN, main_arrays, rows[0]), (AUX, aux_arrays, rows[1])):
                    inputs, labels, sample_weights = task_batch(task_arrays, task_rows, output)
                    predictions = model(inputs, training=True)[output]
                    per_example = keras.losses.binary_crossentropy(labels, predictions)
                    record[f"{output}_loss"] = tf.reduce_sum(per_example * sample_weights) / len(task_rows)
                total = sum(LOSS_WEIGHTS[output] * record[f"{output}_loss"] for output in (MAIN, AUX))
            gradients = tape.gradient(total, model.trainable_variables)
            optimizer.apply_gradients(zip(gradients, model.trainable_variables))
            records.append({**{name: float(value) for name, value in record.items()}, "loss": float(total)})
        return records, model.get_weights()

    return once("task datasets: tape reference", compute)


def assert_equals_the_tape_reference(records, final_weights):
    expected_records, expected_weights = tape_reference()
    assert_losses_close(records, expected_records)
    assert max_weight_difference(final_weights, expected_weights) <= WEIGHT_ATOL


def assert_validation_is_each_tasks_exact_mean(record, final_weights):
    """`val_<output>_loss` over its own task's file, `val_loss` their weighted total (l2=0: no regularization).

    NumPy sums over every example of the file at once, the run sums batch
    by batch (and replica by replica): VALUE_RTOL, float32 rounding.
    Returns the exact means.
    """
    model = build_headline(small_config(data()))
    model.set_weights(final_weights)
    expected = {output: exact_means(model, arrays(TWO_VALIDATION_FILES[output]))[output] for output in (MAIN, AUX)}
    for output, value in expected.items():
        np.testing.assert_allclose(record[f"val_{output}_loss"], value, rtol=VALUE_RTOL, err_msg=output)
    np.testing.assert_allclose(record["val_loss"], sum(LOSS_WEIGHTS[name] * expected[name] for name in expected),
                               rtol=VALUE_RTOL)
    return expected


# The tests that read the two-file run share one process, so that it trains once.
TWO_FILE_RUN_GROUP = pytest.mark.xdist_group("task_datasets_two_file_run")


def two_file_run():
    """The two-file joint run on one device, with each task's validation file: (its result, its model_dir),
    trained once per test process (not to be changed)."""
    data()  # Outside: `once` computes one thing at a time.
    return once("task datasets: two-file run",
                lambda directory: (train(two_file_config(directory / "run")), directory / "run"))


@TWO_FILE_RUN_GROUP
def test_two_files_with_their_own_batch_sizes_train_as_a_plain_tape_loop_on_one_device():
    result, _ = two_file_run()
    # 2 passes of the main task's 3 batches; the validation at the end only.
    assert [record["step"] for record in result.history] == list(range(1, TWO_FILE_STEPS + 1))
    assert_equals_the_tape_reference(result.history, result.model.get_weights())


@pytest.mark.slow
def test_two_files_with_their_own_batch_sizes_under_mirrored_equal_the_tape_loop(tmp_path, mirrored_strategy):
    # 2 replicas: the main task's batches 4 + 4 and its partial one 2 + 1, the aux task's 2 + 2; validation
    # batches 3 + 2 and 1 + 0 last.
    result = train(two_file_config(tmp_path / "run", strategy="mirrored", num_cpu_devices=2),
                   strategy=mirrored_strategy)
    assert_equals_the_tape_reference(result.history, result.model.get_weights())
    assert_validation_is_each_tasks_exact_mean(result.history[-1], result.model.get_weights())


def two_file_flags(model_dir) -> list[str]:
    """The two-file run as a command line."""
    return [*(f"--{name}={value}" for name, value in SMALL_MODEL.items()),
            f"--datasets={json.dumps({MAIN: npz('main'), AUX: npz('aux')})}",
            f"--batch_size={json.dumps(TWO_FILES['batch_size'])}", f"--epochs={EPOCHS}", f"--epochs_of={MAIN}",
            f"--validation_data={json.dumps({task: npz(name) for task, name in TWO_VALIDATION_FILES.items()})}",
            f"--init_weights={data() / 'init.weights.h5'}", "--optimizer=sgd", f"--learning_rate={LEARNING_RATE}",
            "--steps_per_loop=1", "--log_every=1", f"--checkpoint_every={TWO_FILE_STEPS}", "--progress=quiet",
            f"--model_dir={model_dir}"]


@pytest.mark.slow
@pytest.mark.xdist_group("multi_worker")  # One launch on 127.0.0.1 at a time, with test_multi_worker.py's.
def test_two_files_with_their_own_batch_sizes_under_two_workers_equal_the_tape_loop(tmp_path):
    model_dir = tmp_path / "run"
    # Each worker one replica: worker 0 takes the first half of each task's global batch, worker 1 the rest.
    launch = Launch(*two_file_flags(model_dir), base_flags=["--strategy=multi_worker"])
    assert launch.wait() == 0, launch.output[-4000:]
    assert "2 replica(s)" in launch.output
    found = re.findall(r"\[worker (\d)\] .*Final weights fingerprint: (\w+)", launch.output)
    assert sorted(worker for worker, _ in found) == ["0", "1"] and found[0][1] == found[1][1]
    final_weights = saved_weights(model_dir)
    records = records_of(model_dir)
    assert_equals_the_tape_reference(records, final_weights)
    assert_validation_is_each_tasks_exact_mean(records[-1], final_weights)


# --- 3. An adaptive method with joint steps -------------------------------------------------------------------------

# dwa weighs by the losses (its period a logging window: one step here); upgrad by the outputs' gradients of
# the shared weights, each output's on its own task's batch. Both tasks read the same file in the same order:
# the same losses and gradients as the single-dataset run's, so the same weights to rounding (WEIGHT_ATOL; the
# factors, like the losses, LOSS_RTOL).
# Both in CI only: the inner loop has the methods' own tests and a joint run of fixed weights.
@pytest.mark.slow
@pytest.mark.parametrize("method", ["dwa", "upgrad"])
def test_an_adaptive_method_with_two_tasks_reading_one_file_trains_as_the_single_dataset_run(tmp_path, method):
    settings = dict(batch_size=SHARED_BATCH, shuffle_buffer=24, seed=7, train_steps=SHARED_STEPS,
                    loss_weighting=method)
    single = train(config(tmp_path / "single", dataset=npz("shared"), **settings))
    joint = train(config(tmp_path / "joint", datasets=one_file_tasks(), **settings))

    assert_same_training(joint, single)
    for name in (f"loss_weight/{MAIN}", f"loss_weight/{AUX}"):
        np.testing.assert_allclose([record[name] for record in joint.history],
                                   [record[name] for record in single.history], rtol=LOSS_RTOL, err_msg=name)
    # The method did weigh: its factors change from step to step (measured 0.87 to 1.13 for dwa).
    factors = {(record[f"loss_weight/{MAIN}"], record[f"loss_weight/{AUX}"]) for record in joint.history}
    assert len(factors) > 1, factors


# --- 4. and 5. Validation per task; mto-evaluate ------------------------------------------------------------------


@TWO_FILE_RUN_GROUP
def test_each_task_validates_on_its_own_file_and_val_loss_is_their_weighted_total():
    result, _ = two_file_run()
    assert [record["step"] for record in result.history if "val_loss" in record] == [TWO_FILE_STEPS]
    expected = assert_validation_is_each_tasks_exact_mean(result.history[-1], result.model.get_weights())
    # Each output was measured on ITS file: on the other task's file its mean is another number.
    other = exact_means(result.model, arrays("aux_validation"))[MAIN]
    assert abs(other - expected[MAIN]) > 1e-3


def _evaluate(*flags):
    from mto_tf.programs import evaluate
    from mto_tf.programs import flags as mto_flags

    return run_in_process("mto-evaluate", evaluate.evaluate_main, *flags, define_flags=mto_flags.define_evaluate_flags)


def evaluate_flags(model_dir) -> list[str]:
    """mto-evaluate reads the model, data and loss flags of the run: the tasks and their batch sizes."""
    return [*(f"--{name}={value}" for name, value in SMALL_MODEL.items()),
            f"--datasets={json.dumps({MAIN: npz('main'), AUX: npz('aux')})}",
            f"--batch_size={json.dumps(TWO_FILES['batch_size'])}", f"--model_dir={model_dir}"]


@TWO_FILE_RUN_GROUP
def test_mto_evaluate_with_datasets_gives_the_runs_final_validation(tmp_path):
    result, model_dir = two_file_run()
    eval_data = {task: npz(name) for task, name in TWO_VALIDATION_FILES.items()}
    process = _evaluate(*evaluate_flags(model_dir), f"--eval_data={json.dumps(eval_data)}",
                        f"--output_json={tmp_path / 'values.json'}")
    assert process.returncode == 0, process.stderr[-3000:]
    values = json.loads((tmp_path / "values.json").read_text())
    # The run's last weights (saved as model.weights.h5) on the same files in the same batches: the same
    # float32 sums (measured equal); VALUE_RTOL, as every validation value. The metrics too.
    final = result.history[-1]
    validated = [name.removeprefix("val_") for name in final if name.startswith("val_")]
    assert {*LOSS_NAMES, f"{MAIN}_binary_accuracy", f"{AUX}_binary_accuracy"} <= set(validated)
    for name in validated:
        np.testing.assert_allclose(values[name], final[f"val_{name}"], rtol=VALUE_RTOL, err_msg=name)
    assert values["examples"] == {MAIN: MAIN_VALIDATION_EXAMPLES, AUX: AUX_VALIDATION_EXAMPLES}
    assert f"{MAIN}_loss" in process.stdout


@TWO_FILE_RUN_GROUP
def test_mto_evaluate_eval_data_naming_an_unknown_task_is_one_line_and_exit_2(tmp_path):
    _, model_dir = two_file_run()
    process = _evaluate(*evaluate_flags(model_dir),
                        f"--eval_data={json.dumps({MAIN: npz('main_validation'), 'nope': npz('aux_validation')})}")
    assert process.returncode == 2, process.stderr[-3000:]
    assert process.stderr.strip().splitlines()[-1].startswith(
        "mto-evaluate: error: --eval_data: unknown task 'nope'"), process.stderr


@TWO_FILE_RUN_GROUP
def test_mto_evaluate_eval_split_of_npz_tasks_is_one_line_and_exit_2(tmp_path):
    _, model_dir = two_file_run()
    process = _evaluate(*evaluate_flags(model_dir), "--eval_split=test")
    assert process.returncode == 2, process.stderr[-3000:]
    assert process.stderr.strip().splitlines()[-1].startswith(
        f"mto-evaluate: error: --eval_split: task '{MAIN}': --dataset=npz:"), process.stderr


# --- 6. Resume ----------------------------------------------------------------------------------------------------


def test_a_joint_run_resumed_from_a_checkpoint_ends_bit_for_bit_as_an_uninterrupted_one(tmp_path):
    # Two files, two batch sizes, each task's own shuffle buffer: the data position matters, each task's
    # shuffled stream must continue where it stopped (restarting them instead was measured to move the
    # weights by 1.7e-2). SGD: Adam's slots coming back is test_resume.py's.
    settings = dict(datasets={MAIN: npz("main"), AUX: npz("aux")}, batch_size={MAIN: MAIN_BATCH, AUX: AUX_BATCH},
                    shuffle_buffer={MAIN: 12, AUX: 6}, seed=3, checkpoint_every=3)
    whole = train(config(tmp_path / "whole", train_steps=7, **settings))
    train(config(tmp_path / "resumed", train_steps=3, **settings))
    resumed = train(config(tmp_path / "resumed", train_steps=7, **settings))

    # The same operations on the same batches from exactly restored variables: bit for bit.
    for expected, actual in zip(whole.model.get_weights(), resumed.model.get_weights(), strict=True):
        np.testing.assert_array_equal(actual, expected)
    records = records_of(tmp_path / "resumed")
    assert [record["step"] for record in records] == list(range(1, 8))
    for expected, actual in zip(whole.history, records, strict=True):
        assert {name: actual[name] for name in LOSS_NAMES} == {name: expected[name] for name in LOSS_NAMES}


# --- 7. Bad tasks and sources -------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (lambda: dict(datasets={MAIN: npz("shared"), f"{MAIN},{AUX}": npz("shared")}),
     rf"^--datasets: output '{MAIN}' is in two tasks, '{MAIN}' and '{MAIN},{AUX}'"),
    (lambda: dict(batch_size={MAIN: 8}), rf"^--batch_size: no batch size for task '{AUX}'"),
    (lambda: dict(loop="fit"), r"^--datasets: model.fit takes one dataset"),
    (lambda: dict(batch_size={MAIN: 8, AUX: 0}), rf"^--batch_size: task '{AUX}': expected an integer > 0, got 0"),
    (lambda: dict(batch_size={MAIN: 8, AUX: True}), rf"^--batch_size: task '{AUX}': expected an integer > 0"),
    (lambda: dict(feature_map={MAIN: {AUX: "label"}}),
     rf"^--feature_map: task '{MAIN}': '{AUX}' is another task's output"),
    (lambda: dict(feature_map={"main_input": "tokens"}), r"^--feature_map: serves a tfds:NAME or multi_digits or "
                                                         r"mmoe_synthetic source; no task"),
    (lambda: dict(validation_split="test"), r"^--validation_split: serves a tfds:NAME or synthetic_headlines"),
    (lambda: dict(task_mixing="uniform", xla_update=True), r"^--xla_update: not with --task_mixing=uniform"),
], ids=["output in two tasks", "batch size missing a task", "loop fit", "batch size 0", "batch size true",
        "feature map of another task's output", "shared feature map no tfds reads", "split no source has",
        "xla update with turns"])
def test_bad_tasks_are_refused_by_train_config(tmp_path, overrides, message):
    settings = dict(datasets=one_file_tasks(), batch_size=SHARED_BATCH)
    settings.update(overrides())
    with pytest.raises(ConfigError, match=message):
        config(tmp_path / "run", **settings)


def without(name, *keys) -> str:
    """`name`.npz without `keys`, written once per test process."""
    # Read outside: `once` computes one thing at a time.
    kept = {key: value for key, value in arrays(name).items() if key not in keys}

    def write(directory):
        np.savez(directory / f"{name}.npz", **kept)
        return f"npz:{directory / f'{name}.npz'}"

    return once(("task datasets: without", name, keys), write)


@pytest.mark.parametrize("datasets, message, more", [
    (lambda: {MAIN: npz("main"), AUX: npz("aux"), "nope": npz("aux")},
     r"^--datasets: task 'nope': unknown output 'nope'; model 'headline' has outputs", None),
    (lambda: {MAIN: npz("main")}, rf"^--datasets: output '{AUX}' is in no task", None),
    (lambda: {MAIN: npz("main"), AUX: without("aux", "aux_input")},
     rf"^--datasets: task '{AUX}': npz file '.*aux\.npz', key 'aux_input': missing", None),
    (lambda: {MAIN: npz("main"), AUX: without("aux", AUX, f"sample_weight/{AUX}")},
     rf"^--datasets: task '{AUX}': npz file '.*aux\.npz', key '{AUX}': missing", None),
    (lambda: {MAIN: npz("main"), AUX: npz("aux")},
     r"^--save_best: 'val_aux_output_loss' is not a value the evaluation reports",
     dict(validation_data={MAIN: npz("main_validation")}, save_best="val_aux_output_loss")),
    (lambda: {MAIN: npz("main"), AUX: npz("aux")},
     rf"^--datasets: task '{AUX}': every output's loss is null \(--losses\): a turn of it would train nothing",
     dict(task_mixing="uniform", losses={MAIN: "binary_crossentropy", AUX: None}, loss_weights={MAIN: 1.0})),
], ids=["unknown output", "output in no task", "source missing an input", "source missing its label",
        "save best of a task without validation", "a turn of a task with no loss"])
def test_bad_tasks_and_sources_are_refused_by_train_before_anything_is_written(tmp_path, datasets, message, more):
    run_config = config(tmp_path / "run", datasets=datasets(), batch_size=SHARED_BATCH, **(more or {}))
    with pytest.raises(ConfigError, match=message):
        train(run_config)
    assert not (tmp_path / "run").exists()


def test_a_model_adding_losses_in_its_call_is_refused_with_datasets(tmp_path):
    # Keras keeps a call's add_loss / activity-regularizer losses only until the next call (measured: after two
    # calls, only the second's); with a forward per task, all but the last task's would be dropped.
    def build():
        main_input = keras.Input((SMALL_MODEL["sequence_length"],), dtype="int32", name="main_input")
        aux_input = keras.Input((5,), name="aux_input")
        hidden = keras.layers.Dense(4, activity_regularizer="l2")(aux_input)
        words = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(SMALL_MODEL["vocab_size"], 4)(main_input))
        both = keras.layers.Concatenate()([hidden, words])
        return keras.Model({"main_input": main_input, "aux_input": aux_input},
                           {MAIN: keras.layers.Dense(1, activation="sigmoid")(both),
                            AUX: keras.layers.Dense(1, activation="sigmoid")(hidden)})

    run_config = TrainConfig(model=build, datasets={MAIN: npz("main"), AUX: npz("aux")}, batch_size=SHARED_BATCH,
                             losses={MAIN: "binary_crossentropy", AUX: "binary_crossentropy"},
                             model_dir=str(tmp_path / "run"), train_steps=2)
    with pytest.raises(ConfigError, match=r"^--datasets: model '.*' adds losses in its call \(add_loss, an "
                                          r"activity_regularizer\)"):
        train(run_config)
    assert not (tmp_path / "run").exists()
