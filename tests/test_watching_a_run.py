"""A run a person can watch and trust: progress, quiet logs, a stop on non-finite values, damaged checkpoints."""

import dataclasses
import logging
import os
import pty
import re
import subprocess

import numpy as np
import pytest
import tensorflow as tf

from helpers import (BATCH_SIZE, MODEL_FLAGS, SMALL_FLAGS, TIMEOUT_SECONDS, Launch, data_dir, mto_train_in_process, run_cli,
                     small_config, write_npz)
from mto_tf import train
from mto_tf.errors import ConfigError, NonFiniteError

# What TensorFlow, TFDS and absl print unless told to be quiet (seen before mto-train hid it).
CHATTER = re.compile(r"dataset_info\.py|functional_saver\.py|Load dataset info|Sharding callback|"
                     r"All log messages before absl|^[IWE]\d{4} ", re.MULTILINE)
CONTROL_CHARACTERS = re.compile(r"[\r\b\x1b]")
# A huge learning rate makes the loss or the weights non-finite first, depending on the numbers.
DIVERGED = (r"(loss, (aux_output_loss, )?(main_output_loss )?not finite in step \d+|weights or optimizer state "
            r"became NaN or infinite by step \d+, while the losses were finite); the checkpoint of step \d+ is kept, "
            r"and no final model")


def _all_checkpoint_values_finite(model_dir) -> list[str]:
    """Each checkpoint's name, after checking that every float it holds is finite."""
    names = []
    for index in sorted((model_dir / "checkpoints").glob("ckpt-*.index")):
        reader = tf.train.load_checkpoint(str(index).removesuffix(".index"))
        for key, dtype in reader.get_variable_to_dtype_map().items():
            if dtype.is_floating:
                assert np.isfinite(reader.get_tensor(key)).all(), (index.name, key)
        names.append(index.name.removesuffix(".index"))
    return names


@pytest.mark.slow
def test_on_a_terminal_the_progress_line_updates_in_place_and_the_run_ends_with_a_summary(tmp_path):
    controller, terminal = pty.openpty()
    process = subprocess.Popen(["mto-train", *SMALL_FLAGS, f"--data_dir={data_dir()}",
                                f"--model_dir={tmp_path / 'run'}", "--train_steps=40", "--steps_per_loop=2",
                                "--log_every=20"],
                               stdout=terminal, stderr=subprocess.PIPE,
                               # A wide terminal: the line is cut to the terminal's width.
                               env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", COLUMNS="250"))
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # The terminal closed: the process ended.
            break
        if not chunk:
            break
        shown += chunk
    assert process.wait(timeout=TIMEOUT_SECONDS) == 0, process.stderr.read()[-3000:]
    screen = shown.decode()
    # Redrawn in place after every call of 2 steps: a carriage return, no new line.
    redraws = re.findall(r"\rstep (\d+)/40 \[[=.]{20}\] \d\d:\d\d elapsed, ETA \d\d:\d\d, [\d.]+ steps/s \| "
                         r"loss [\d.]+ aux_output_loss [\d.]+ main_output_loss [\d.]+", screen)
    assert [int(step) for step in redraws][:3] == [2, 4, 6] and len(redraws) >= 19
    # Each window's line stays, and the summary ends it.
    lines = [line.split("\r")[-1] for line in screen.replace("\r\n", "\n").split("\n")]
    assert [line.split(":")[0] for line in lines if re.match(r"step \d+/40:", line)] == ["step 20/40", "step 40/40"]
    # synthetic_headlines has a validation split: the run ends with an evaluation on it.
    assert re.search(r"Trained to step 40 in \d\d:\d\d\.\n  last window: loss [\d.]+ \| aux_output: loss [\d.]+, "
                     r"binary_accuracy [\d.]+ \| main_output: loss [\d.]+, binary_accuracy [\d.]+\n"
                     r"  validation at step 40: loss [\d.]+ \| aux_output: loss [\d.]+, binary_accuracy [\d.]+ \| "
                     r"main_output: loss [\d.]+, binary_accuracy [\d.]+\n  files in .*run: "
                     r"model.keras, model.weights.h5, metrics.jsonl, checkpoints/, tensorboard/, config.json\n$",
                     screen.replace("\r\n", "\n")), screen[-600:]


@pytest.mark.slow
def test_without_a_terminal_plain_lines_and_none_of_the_libraries_chatter(tmp_path):
    process = run_cli(*SMALL_FLAGS, f"--data_dir={data_dir()}", f"--model_dir={tmp_path / 'run'}",
                      "--train_steps=20", "--steps_per_loop=2", "--log_every=10")
    assert process.returncode == 0, process.stderr[-3000:]
    assert not CONTROL_CHARACTERS.search(process.stdout)
    assert [line.split(":")[0] for line in process.stdout.splitlines()[:2]] == ["step 10/20", "step 20/20"]
    assert process.stdout.splitlines()[2].startswith("Trained to step 20 in ")
    # stderr: mto-train's own lines only.
    assert not CHATTER.search(process.stderr), process.stderr
    assert process.stderr.splitlines()[0].startswith("Training headline on synthetic_headlines with default")
    quiet = mto_train_in_process(*SMALL_FLAGS, f"--data_dir={data_dir()}",
                           f"--model_dir={tmp_path / 'quiet'}", "--train_steps=2", "--progress=quiet")
    assert quiet.returncode == 0 and quiet.stdout == ""


@pytest.mark.slow
def test_nan_in_the_data_stops_with_status_3_naming_the_step_and_output_and_keeps_the_good_checkpoints(tmp_path):
    arrays = write_npz(tmp_path / "data.npz")
    # A label in step 3's batch: its loss is NaN (Keras clips predictions, not labels).
    arrays["aux_output"][2 * BATCH_SIZE + 5] = np.nan
    np.savez(tmp_path / "data.npz", **arrays)
    # SGD: Keras 3.15's RMSprop (the default) fails inside its sparse update
    # of the embedding on NaN gradients (InvalidArgumentError, plain fit too).
    # In this process (status 3 from fresh processes: the two-worker test below).
    process = mto_train_in_process(*MODEL_FLAGS, f"--dataset=npz:{tmp_path / 'data.npz'}",
                             f"--model_dir={tmp_path / 'run'}", "--optimizer=sgd", "--train_steps=6",
                             "--steps_per_loop=1", "--log_every=1", "--checkpoint_every=1")
    assert process.returncode == 3, process.stderr[-3000:]
    assert process.stderr.splitlines()[-1] == (
        "mto-train: error: loss, aux_output_loss not finite in step 3; the checkpoint of step 2 is kept, and no "
        "final model. Lower --learning_rate, or look for NaN or infinite values in the data")
    assert "Traceback" not in process.stderr
    assert not (tmp_path / "run" / "model.weights.h5").exists() and not (tmp_path / "run" / "model.keras").exists()
    assert _all_checkpoint_values_finite(tmp_path / "run") == ["ckpt-1", "ckpt-2"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy_name", ["default", "mirrored"])
def test_a_huge_learning_rate_stops_before_any_non_finite_checkpoint(tmp_path, strategy_name, request):
    overrides, strategy = {}, tf.distribute.get_strategy()
    if strategy_name == "mirrored":
        overrides, strategy = dict(strategy="mirrored", num_cpu_devices=2), request.getfixturevalue("mirrored_strategy")
    config = small_config(tmp_path, learning_rate=1e30, train_steps=10, checkpoint_every=1, **overrides)
    with pytest.raises(NonFiniteError, match="^" + DIVERGED):
        train(config, strategy=strategy)
    assert not (tmp_path / "run" / "model.weights.h5").exists()
    assert _all_checkpoint_values_finite(tmp_path / "run")  # At least one, all finite.


@pytest.mark.slow
def test_two_workers_diverging_stop_together_with_status_3_and_are_not_restarted(tmp_path):
    launch = Launch(f"--model_dir={tmp_path / 'run'}", "--learning_rate=1e30", "--optimizer=sgd",
                    "--train_steps=10", "--checkpoint_every=1", "--log_every=1", "--steps_per_loop=1",
                    f"--data_dir={data_dir()}", "--synthetic_train_examples=128",
                    "--synthetic_validation_examples=32", restarts=1)
    assert launch.wait() == 3, launch.output[-4000:]
    stopped = {match.group(1): match.group(2) for match in
               re.finditer(r"\[worker (\d)\] mto-train: error: (" + DIVERGED + ")", launch.output)}
    # Both stopped, at the same step with the same words: losses are all-reduced, weights mirrored.
    assert sorted(stopped) == ["0", "1"] and stopped["0"] == stopped["1"]
    assert "restarting" not in launch.output
    assert not (tmp_path / "run" / "model.weights.h5").exists()
    assert _all_checkpoint_values_finite(tmp_path / "run")


@pytest.mark.slow
def test_a_truncated_latest_checkpoint_is_passed_over_and_the_run_ends_as_an_uninterrupted_one(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mto_tf")
    settings = dict(optimizer="adam", learning_rate=0.01, checkpoint_every=2, log_every=2)
    uninterrupted = train(small_config(tmp_path, train_steps=8, model_dir=str(tmp_path / "whole"), **settings))
    config = small_config(tmp_path, train_steps=6, **settings)
    train(config)
    data_file = tmp_path / "run" / "checkpoints" / "ckpt-6.data-00000-of-00001"
    data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])  # A crash mid-write.

    resumed = train(dataclasses.replace(config, train_steps=8))
    assert "ckpt-6 cannot be read" in caplog.text and re.search(r"Restored .*ckpt-4\b", caplog.text)
    for whole, split in zip(uninterrupted.model.get_weights(), resumed.model.get_weights(), strict=True):
        np.testing.assert_array_equal(whole, split)
    assert [record["step"] for record in resumed.history] == [6, 8]

    for data_file in (tmp_path / "run" / "checkpoints").glob("*.data-*"):
        data_file.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"^--model_dir: no checkpoint in .*checkpoints can be read "
                                          r"\(newest: .*ckpt-8\); move the directory away to start afresh$"):
        train(dataclasses.replace(config, train_steps=10))


def test_a_model_dir_that_cannot_be_written_is_one_error_naming_the_flag(tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    with pytest.raises(ConfigError, match=r"^--model_dir: cannot write .*a_file/run/\.lock: "):
        train(small_config(tmp_path, model_dir=str(tmp_path / "a_file" / "run")))
