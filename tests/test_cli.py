"""`mto-train` run as a user runs it: flags, files on disk, one-line errors; in a fresh process where that matters."""

import json
import os
import socket
import sys

import keras
import numpy as np
import pytest

from helpers import MODEL_FLAGS, SMALL_FLAGS, data_dir, mto_train_in_process, run_cli, small_config, write_npz
from mto_tf.core.models import build_headline


@pytest.mark.slow
def test_short_run_from_a_flagfile_writes_metrics_weights_model_checkpoints_and_tensorboard(tmp_path):
    model_dir = tmp_path / "run"
    flagfile = tmp_path / "run.flags"
    flagfile.write_text("\n".join([*SMALL_FLAGS, f"--data_dir={data_dir()}", f"--model_dir={model_dir}",
                                   "--strategy=mirrored", "--num_cpu_devices=2", "--train_steps=12",
                                   "--steps_per_loop=3", "--log_every=6", "--checkpoint_every=6"]) + "\n")
    process = run_cli(f"--flagfile={flagfile}", entry_point=(sys.executable, "-m", "mto_tf"))
    assert process.returncode == 0, process.stderr[-3000:]
    assert "2 replica(s)" in process.stderr

    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [6, 12]
    assert set(records[0]) == {"step", "loss", "main_output_loss", "aux_output_loss", "main_output_binary_accuracy",
                               "aux_output_binary_accuracy", "examples_per_sec"}
    for record in records:
        # The total is the weighted sum of the per-output losses (no L2 here).
        assert record["loss"] == pytest.approx(record["main_output_loss"] + 0.2 * record["aux_output_loss"],
                                               rel=1e-5)

    config = small_config(tmp_path)
    model = build_headline(config)
    model.load_weights(model_dir / "model.weights.h5")
    loaded = keras.models.load_model(model_dir / "model.keras")
    for from_weights, from_model in zip(model.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(from_weights, from_model)
    assert sorted(name for name in os.listdir(model_dir / "checkpoints") if name.endswith(".index")) == [
        "ckpt-12.index", "ckpt-6.index"]
    assert any(name.startswith("events.") for name in os.listdir(model_dir / "tensorboard"))


def _npz_without(tmp_path, key):
    arrays = write_npz(tmp_path / "full.npz")
    del arrays[key]
    np.savez(tmp_path / "partial.npz", **arrays)
    return f"--dataset=npz:{tmp_path / 'partial.npz'}"


def _callbacks_module(tmp_path, body):
    """`--callbacks=` a function of a module written in `tmp_path` (the test puts it on sys.path)."""
    (tmp_path / "cli_table_callbacks.py").write_text(f"import mto_tf\n\n\ndef callbacks():\n    {body}\n")
    return "--callbacks=cli_table_callbacks:callbacks"


def _npz_with_integer_labels(tmp_path, key):
    arrays = write_npz(tmp_path / "full.npz")
    np.savez(tmp_path / "integer_labels.npz", **{**arrays, key: arrays[key].astype(np.int32)})
    return f"--dataset=npz:{tmp_path / 'integer_labels.npz'}"


def _datasets(tmp_path, *tasks):
    """--datasets naming `tasks`, each reading one small npz file (it holds every output's labels)."""
    write_npz(tmp_path / "full.npz")
    return "--datasets=" + json.dumps({task: f"npz:{tmp_path / 'full.npz'}" for task in tasks})


BOTH_TASKS = ("main_output", "aux_output")

def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _npy_without(tmp, key: str) -> str:
    """An npy directory of `write_npz`'s arrays without `key`."""
    for name, array in write_npz(tmp / "data.npz").items():
        if name != key:
            np.save(tmp / f"{name}.npy", array)
    return f"--dataset=npy:{tmp}"


BAD_INPUTS = {
    "unknown output": (lambda tmp: ["--loss_weights=main_output=1.0,aux=0.2"],
                       "--loss_weights: unknown output 'aux'; model 'headline' has outputs ['aux_output', 'main_output']"),
    "not a number": (lambda tmp: ["--loss_weights=main_output=heavy,aux_output=0.2"],
                     "--loss_weights: expected a number or a Keras schedule config for 'main_output', got 'heavy'"),
    "negative weight": (lambda tmp: ["--loss_weights=main_output=1.0,aux_output=-0.2"],
                        "--loss_weights: weight of 'aux_output' must be a finite number >= 0 or a Keras schedule "
                                        "config, got -0.2"),
    "uneven batch": (lambda tmp: ["--strategy=mirrored", "--num_cpu_devices=2", "--batch_size=15"],
                     "--batch_size: the global batch size 15 does not split evenly across 2 replicas"),
    "missing key": (lambda tmp: [_npz_without(tmp, "aux_output")], "key 'aux_output': missing"),
    "missing labels of an unknown output": (
        lambda tmp: ["--missing_labels=unknown_output=1"],
        "--missing_labels: unknown output 'unknown_output'; model 'headline' has outputs ['aux_output', "
        "'main_output']"),
    "nan for integer labels": (
        lambda tmp: [_npz_with_integer_labels(tmp, "main_output"), "--missing_labels=main_output=nan"],
        "--missing_labels: output 'main_output' has int32 labels; expected an integer in [-2147483648, 2147483647], "
        "got nan"),
    "a value int32 labels cannot hold": (
        lambda tmp: [_npz_with_integer_labels(tmp, "main_output"), "--missing_labels=main_output=1e12"],
        "--missing_labels: output 'main_output' has int32 labels; expected an integer in [-2147483648, 2147483647], "
        "got 1000000000000.0"),
    "a schedule starting below 0": (
        lambda tmp: ['--loss_weights={"main_output": 1.0, "aux_output": {"class_name": "PiecewiseConstantDecay", '
                     '"config": {"boundaries": [2], "values": [-1.0, 1.0]}}}'],
        "--loss_weights: 'aux_output': the schedule's weight at step 0 must be a finite number >= 0, got -1.0"),
    "reduction none": (
        lambda tmp: [('--losses={"main_output": {"class_name": "BinaryCrossentropy", "config": {"reduction": '
                      '"none"}}, "aux_output": "binary_crossentropy"}')],
        "--losses: output 'main_output': reduction 'none' gives a value per example; the total needs one number"),
    # What only the custom loop does, refused by --loop=fit by name.
    "a schedule of loss weights with fit": (
        lambda tmp: ["--loop=fit", ('--loss_weights={"main_output": 1.0, "aux_output": {"class_name": '
                                    '"PiecewiseConstantDecay", "config": {"boundaries": [2], "values": [0.2, 1.5]}}}')],
        "--loss_weights: aux_output: Keras 3.15's compile takes a number for each loss weight, not a schedule "
        "(keras-team/keras#20294); use --loop=custom"),
    "an extra loss term with fit": (
        lambda tmp: ["--loop=fit", "--extra_losses=consistency=my_terms:consistency"],
        "--extra_losses: compile's losses each read one output's labels and predictions; a term of several is the "
        "custom loop's: use --loop=custom"),
    "LossWeightScheduler with fit": (
        lambda tmp: ["--loop=fit", _callbacks_module(tmp, "return [mto_tf.LossWeightScheduler(lambda epoch, weights: "
                                                          "{})]")],
        "--callbacks: LossWeightScheduler sets the custom loop's loss weights; Keras 3.15's compile takes numbers "
        "(keras-team/keras#20294): use --loop=custom"),
    # One dataset per task, and how each step mixes the tasks.
    "an unknown task mixing": (
        lambda tmp: [_datasets(tmp, *BOTH_TASKS), "--task_mixing=round_robin"],
        "--task_mixing: unknown mixing 'round_robin'; expected one of joint, uniform, proportional, annealed"),
    "proportional with a negative alpha": (
        lambda tmp: [_datasets(tmp, *BOTH_TASKS), '--task_mixing={"name": "proportional", "alpha": -1}'],
        "--task_mixing: proportional's alpha must be a number >= 0, got -1"),
    "a task mixing without datasets": (
        lambda tmp: ["--task_mixing=uniform"],
        "--task_mixing: chooses among the tasks of --datasets; give --datasets too"),
    "a task of an unknown output": (
        lambda tmp: [_datasets(tmp, "main_output", "aux")],
        "--datasets: task 'aux': unknown output 'aux'; model 'headline' has outputs ['aux_output', 'main_output']"),
    "an output in no task": (
        lambda tmp: [_datasets(tmp, "main_output")],
        "--datasets: output 'aux_output' is in no task; every output's labels come from one task's dataset "
        "(tasks ['main_output'])"),
    "a batch size per task without datasets": (
        lambda tmp: ['--batch_size={"main_output": 16, "aux_output": 16}'],
        "--batch_size: a value per task ({TASK: value}) needs --datasets"),
    "epochs with a sampled mixing": (
        lambda tmp: [_datasets(tmp, *BOTH_TASKS), "--task_mixing=uniform", "--epochs=2"],
        "--epochs: with --task_mixing=uniform, how many steps a pass over a task takes depends on the draws; give "
        "--train_steps"),
    # Where each worker's share of the input comes from.
    "an input service nobody runs": (
        lambda tmp: [f"--input_service=127.0.0.1:{_free_port()}"],
        "--input_service: no tf.data service answers at 127.0.0.1:"),
    "an npy directory missing a key": (
        lambda tmp: [_npy_without(tmp, "aux_input")],
        "file 'aux_input.npy': missing; model 'headline' needs input 'aux_input'"),
}
# In a fresh process: the exit status the shell sees, and no traceback from anywhere
# (found before TensorFlow is imported: the process ends within a second).
IN_A_FRESH_PROCESS = "negative weight"


@pytest.mark.parametrize("case", [pytest.param(case, marks=pytest.mark.slow) if case == IN_A_FRESH_PROCESS else case
                                  for case in BAD_INPUTS])
def test_bad_input_is_one_line_naming_the_flag_and_writes_nothing(tmp_path, case, mirrored_strategy, monkeypatch):
    from mto_tf.programs import mto_train

    # The session's MirroredStrategy: a process holds one well (see conftest).
    make_strategy = mto_train.make_strategy
    monkeypatch.setattr(mto_train, "make_strategy",
                        lambda config: mirrored_strategy if config.strategy == "mirrored" else make_strategy(config))
    make_args, expected_error = BAD_INPUTS[case]
    model_dir = tmp_path / "never_written"
    args = make_args(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # For a module a case wrote there.
    # Synthetic sizes only with the synthetic dataset: a setting nothing reads is refused.
    base_flags = MODEL_FLAGS if any(arg.startswith(("--dataset=", "--datasets=")) for arg in args) else SMALL_FLAGS
    flags = [*base_flags, f"--data_dir={data_dir()}", f"--model_dir={model_dir}", *args]
    if case == IN_A_FRESH_PROCESS:
        process = run_cli(*flags)
    else:
        process = mto_train_in_process(*flags)
    assert process.returncode == 2
    assert "mto-train: error: " in process.stderr and expected_error in process.stderr, process.stderr[-2000:]
    assert "Traceback" not in process.stderr
    assert not model_dir.exists()
