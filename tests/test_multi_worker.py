"""MultiWorkerMirroredStrategy: real worker processes on 127.0.0.1, started by launch/local.py.

Keras 3.15's `fit` cannot run under this strategy (keras-team/keras#20585),
so the reference is single-process `fit` on the same global batches.
"""

import json
import os
import re
import signal
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import (BATCH_SIZE, HEADLINE, HEADLINES_FEATURE_MAP, OUTPUTS, VALUE_RTOL, Launch, keras_optimizer,
                     max_weight_difference, once, prepare_tfds_headlines, small_config, write_npz)
from helpers import evaluate_with_keras as _evaluate
from helpers import exact_means as _exact_means
from mto_tf.core.models import build_headline

# One process: the workers of one test at a time on 127.0.0.1, and one uninterrupted run for the module.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multi_worker")]

NUM_EXAMPLES = 72


def fingerprints(output: str) -> dict[int, list[str]]:
    """Each worker's logged final-weights fingerprints."""
    found: dict[int, list[str]] = {}
    for worker, value in re.findall(r"\[worker (\d)\] .*Final weights fingerprint: (\w+)", output):
        found.setdefault(int(worker), []).append(value)
    return found


def global_batches(*, steps):
    """The global batches every worker reads (keeping its replicas' slices): the file's rows in order, repeated."""
    return np.stack([(step * BATCH_SIZE + np.arange(BATCH_SIZE)) % NUM_EXAMPLES for step in range(steps)])


def single_process_fit(tmp_path, arrays, *, steps):
    """Keras fit on one device on the same global batches; returns its final weights (computed once per process)."""
    return once(("multi-worker reference fit", steps), lambda _: _fit(tmp_path, arrays, steps))


def _fit(tmp_path, arrays, steps):
    """Keras fit on one device on the same global batches; returns its final weights."""
    rows = global_batches(steps=steps)
    inputs = {"main_input": arrays["main_input"][rows].astype("int32"), "aux_input": arrays["aux_input"][rows]}
    labels = {name: arrays[name].reshape(-1, 1)[rows] for name in ("main_output", "aux_output")}
    config = small_config(tmp_path, optimizer="adam", learning_rate=0.01)
    model = build_headline(config)
    model.load_weights(tmp_path / "init.weights.h5")
    model.compile(optimizer=keras_optimizer(config), loss=dict(HEADLINE.losses), loss_weights=dict(HEADLINE.loss_weights))
    model.fit(tf.data.Dataset.from_tensor_slices((inputs, labels)), epochs=steps, steps_per_epoch=1,
              shuffle=False, verbose=0)
    return model.get_weights()


def _data(tmp_path):
    arrays = write_npz(tmp_path / "data.npz", num_examples=NUM_EXAMPLES)
    keras.utils.set_random_seed(0)  # The same initial weights in every test, so they share one reference.
    build_headline(small_config(tmp_path)).save_weights(tmp_path / "init.weights.h5")
    return arrays, [f"--dataset=npz:{tmp_path / 'data.npz'}", f"--init_weights={tmp_path / 'init.weights.h5'}"]


def _final_weights(tmp_path, model_dir):
    model = build_headline(small_config(tmp_path))
    model.load_weights(Path(model_dir) / "model.weights.h5")
    return model.get_weights()


@pytest.mark.parametrize("replicas_per_worker", [1, 2])
def test_workers_agree_and_match_single_process_fit_on_the_same_global_batches(tmp_path, replicas_per_worker):
    arrays, data_flags = _data(tmp_path)
    steps = 6
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    launch = Launch(*data_flags, f"--model_dir={tmp_path / 'run'}", f"--train_steps={steps}", "--log_every=3",
                    "--checkpoint_every=3", f"--num_cpu_devices={replicas_per_worker}", scratch_dir=scratch)
    assert launch.wait() == 0, launch.output[-4000:]
    assert f"{2 * replicas_per_worker} replica(s)" in launch.output
    # Only the chief's checkpoints are kept; the other worker's scratch copies are gone.
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.index")) == ["ckpt-3.index",
                                                                                          "ckpt-6.index"]
    assert not [p for p in scratch.iterdir() if p.name.startswith("mto_tf_worker_checkpoint_")]

    # Both workers end with the same weights, bit for bit.
    found = fingerprints(launch.output)
    assert sorted(found) == [0, 1] and found[0] == found[1]
    reference = single_process_fit(tmp_path, arrays, steps=steps)
    # The same arithmetic, but the global batch's sum is formed from 2 or 4
    # partial sums across replicas: float32 rounding only (3e-8 measured upstream for 2 x 1).
    assert max_weight_difference(_final_weights(tmp_path, tmp_path / "run"), reference) <= 1e-6


TRAIN_STEPS = 150  # Long enough that the signal sent after step 50 lands mid-run.
FAULT_FLAGS = [f"--train_steps={TRAIN_STEPS}", "--steps_per_loop=5", "--log_every=10", "--checkpoint_every=20"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """An uninterrupted 2-worker run: (tmp_path, data flags, final weights, metrics steps)."""
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    _, data_flags = _data(tmp_path)
    launch = Launch(*data_flags, *FAULT_FLAGS, f"--model_dir={tmp_path / 'run'}")
    assert launch.wait() == 0, launch.output[-4000:]
    return tmp_path, data_flags, _final_weights(tmp_path, tmp_path / "run")


def _logged_steps(model_dir):
    return [int(step) for step in re.findall(r'"step": (\d+)', (Path(model_dir) / "metrics.jsonl").read_text())]


def _signal_worker_1_mid_run(data_flags, model_dir, signum) -> Launch:
    """Starts a run that may restart once, sends `signum` to worker 1 after step 50, waits for the end."""
    launch = Launch(*data_flags, *FAULT_FLAGS, f"--model_dir={model_dir}", restarts=1)
    pid = int(launch.wait_for_line(r"launch: worker 1 started, pid (\d+)").group(1))
    launch.wait_for_line(r"\[worker 0\] step 50/")  # Only the chief shows progress.
    os.kill(pid, signum)
    assert launch.wait() == 0, launch.output[-4000:]
    return launch


def test_worker_killed_mid_run_is_restarted_with_the_others_and_ends_like_an_uninterrupted_run(uninterrupted):
    tmp_path, data_flags, expected_weights = uninterrupted
    model_dir = tmp_path / "killed"
    launch = _signal_worker_1_mid_run(data_flags, model_dir, signal.SIGKILL)

    assert "launch: worker 1 was killed by signal 9" in launch.output
    assert "launch: restarting all workers" in launch.output
    restored = int(re.search(r"\[worker 0\] .*Restored .*ckpt-(\d+)", launch.output).group(1))
    assert 40 <= restored < TRAIN_STEPS
    # Records past the restored checkpoint were dropped and logged again once.
    assert _logged_steps(model_dir) == list(range(10, TRAIN_STEPS + 1, 10))
    for whole, resumed in zip(expected_weights, _final_weights(tmp_path, model_dir), strict=True):
        np.testing.assert_array_equal(whole, resumed)


@pytest.mark.parametrize("source", ["npy", "array_record"])
def test_workers_reading_an_npy_directory_or_an_array_record_dataset_by_index_resume_bit_for_bit(uninterrupted,
                                                                                                 source):
    """The same rows as the npz file, read by index from another source: a worker killed mid-run and restarted
    ends bit for bit as the uninterrupted run on the npz file."""
    tmp_path, data_flags, expected_weights = uninterrupted
    arrays = dict(np.load(tmp_path / "data.npz"))
    source_dir = tmp_path / source
    if source == "npy":
        source_dir.mkdir()
        for key, array in arrays.items():
            np.save(source_dir / f"{key}.npy", array)
        source_flags = [f"--dataset=npy:{source_dir}"]
    else:
        prepare_tfds_headlines(arrays, source_dir, file_format="array_record")
        source_flags = ["--dataset=tfds:headlines", f"--data_dir={source_dir}",
                        f"--feature_map={HEADLINES_FEATURE_MAP}", "--validation_split="]
    flags = [*source_flags, *[flag for flag in data_flags if not flag.startswith("--dataset=")]]
    launch = _signal_worker_1_mid_run(flags, tmp_path / f"killed_{source}", signal.SIGKILL)
    assert "launch: restarting all workers" in launch.output
    assert re.search(r"\[worker 1\] .*Input: read by index", launch.output), launch.output[-3000:]
    for whole, resumed in zip(expected_weights, _final_weights(tmp_path, tmp_path / f"killed_{source}"), strict=True):
        np.testing.assert_array_equal(whole, resumed)


def test_sigterm_checkpoints_at_an_agreed_step_and_the_restart_loses_or_repeats_none(uninterrupted):
    tmp_path, data_flags, expected_weights = uninterrupted
    model_dir = tmp_path / "preempted"
    launch = _signal_worker_1_mid_run(data_flags, model_dir, signal.SIGTERM)

    stopped = {int(worker): int(step) for worker, step in
               re.findall(r"\[worker (\d)\] .*Preempted: stopped by SIGTERM after step (\d+)", launch.output)}
    assert sorted(stopped) == [0, 1] and stopped[0] == stopped[1]  # Both stopped after the same step.
    step = stopped[0]
    assert "launch: worker" in launch.output and "exited with status 143" in launch.output
    assert re.search(rf"\[worker 0\] .*Restored .*ckpt-{step}\b", launch.output)
    # Every step logged exactly once: the partial window up to the stop, then on.
    logged = _logged_steps(model_dir)
    assert logged == sorted(set(logged)) and logged[-1] == TRAIN_STEPS and step in logged
    assert set(range(10, TRAIN_STEPS + 1, 10)) <= set(logged)
    for whole, resumed in zip(expected_weights, _final_weights(tmp_path, model_dir), strict=True):
        np.testing.assert_array_equal(whole, resumed)


def test_ctrl_c_to_the_launcher_stops_every_worker_at_the_same_step_with_status_130_and_a_rerun_resumes(
        uninterrupted):
    tmp_path, data_flags, expected_weights = uninterrupted
    model_dir = tmp_path / "interrupted"
    launch = Launch(*data_flags, *FAULT_FLAGS, f"--model_dir={model_dir}")
    launch.wait_for_line(r"\[worker 0\] step 50/")
    launch.process.send_signal(signal.SIGINT)  # As a terminal's Ctrl-C reaches launch/local.py.
    assert launch.wait() == 130, launch.output[-4000:]
    stopped = {int(worker): int(step) for worker, step in re.findall(
        r"\[worker (\d)\] .*Interrupted: stopped by Ctrl-C after step (\d+), checkpoint saved", launch.output)}
    assert sorted(stopped) == [0, 1] and stopped[0] == stopped[1], launch.output[-3000:]
    assert "launch: stopped on request (SIGINT)" in launch.output and "Traceback" not in launch.output
    rerun = Launch(*data_flags, *FAULT_FLAGS, f"--model_dir={model_dir}")
    assert rerun.wait() == 0, rerun.output[-4000:]
    for whole, resumed in zip(expected_weights, _final_weights(tmp_path, model_dir), strict=True):
        np.testing.assert_array_equal(whole, resumed)


def test_worker_that_cannot_start_stops_the_launch_within_seconds_naming_it(tmp_path):
    model_dir = tmp_path / "never"
    started = time.monotonic()
    launch = Launch(f"--model_dir={model_dir}", "--precision=float64", restarts=2)
    status = launch.wait()
    assert status == 2 and time.monotonic() - started < 60
    assert re.search(r"launch: worker \d exited with status 2", launch.output)
    assert "mto-train: error: flag --precision=float64" in launch.output
    assert "attempt 2" not in launch.output  # A bad setting is not retried.
    pids = [int(pid) for pid in re.findall(r"launch: worker \d started, pid (\d+)", launch.output)]
    assert len(pids) == 2 and not any(Path(f"/proc/{pid}").exists() for pid in pids)
    assert not model_dir.exists()


# Each worker's on_epoch_end logs, to epochs-<task index>.json beside the module.
EPOCH_LOGS_MODULE = """
import json, os
import keras

def epoch_logs():
    worker = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    path = os.path.join(os.path.dirname(__file__), f"epochs-{worker}.json")
    logs = []
    def on_epoch_end(epoch, epoch_logs):
        logs.append([epoch, epoch_logs])
        with open(path, "w") as file:
            json.dump(logs, file)
    return [keras.callbacks.LambdaCallback(on_epoch_end=on_epoch_end)]
"""


def test_validation_under_two_workers_evaluates_every_example_once_as_one_device_would(tmp_path, monkeypatch):
    _, data_flags = _data(tmp_path)
    # 37 examples, batches of 16: the last holds 5, split 3 + 2 across the two workers.
    arrays = write_npz(tmp_path / "validation.npz", num_examples=37, with_sample_weights=True, seed=1)
    # And Keras callbacks on each worker, with the logs the chief writes.
    (tmp_path / "epoch_logs.py").write_text(EPOCH_LOGS_MODULE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    launch = Launch(*data_flags, f"--model_dir={tmp_path / 'run'}", "--train_steps=4", "--log_every=2",
                    "--eval_every=2", f"--validation_data=npz:{tmp_path / 'validation.npz'}",
                    "--callbacks=epoch_logs:epoch_logs")
    assert launch.wait() == 0, launch.output[-4000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records if "val_loss" in record] == [2, 4]
    for worker in (0, 1):
        epochs = json.loads((tmp_path / f"epochs-{worker}.json").read_text())
        assert [epoch for epoch, _ in epochs] == [0, 1]
        for (_, logs), record in zip(epochs, records, strict=True):
            assert logs == {name: record[name] for name in logs}, worker  # All-reduced: the same everywhere.
    model = build_headline(small_config(tmp_path))
    model.load_weights(tmp_path / "run" / "model.weights.h5")
    exact = _exact_means(model, arrays)
    for name in OUTPUTS:
        np.testing.assert_allclose(records[-1][f"val_{name}_loss"], exact[name], rtol=VALUE_RTOL, err_msg=name)
    np.testing.assert_allclose(records[-1]["val_loss"], _evaluate(model, arrays)["loss"], rtol=VALUE_RTOL)


@pytest.mark.parametrize("weighting", ["upgrad", "rlw"])
def test_adaptive_loss_weighting_under_two_workers_equals_one_process(tmp_path, weighting):
    # A gradient method (per-output gradients summed over both workers before
    # the Gramian) and a loss-based one with a seeded draw per step (the same
    # on every worker): both end where one process ends.
    from mto_tf import train

    _, data_flags = _data(tmp_path)
    steps = 6
    launch = Launch(*data_flags, f"--model_dir={tmp_path / 'run'}", f"--train_steps={steps}", "--log_every=3",
                    "--checkpoint_every=3", f"--loss_weighting={weighting}")
    assert launch.wait() == 0, launch.output[-4000:]
    found = fingerprints(launch.output)
    assert sorted(found) == [0, 1] and found[0] == found[1]
    one_process = train(small_config(tmp_path, dataset=f"npz:{tmp_path / 'data.npz'}",
                                     init_weights=str(tmp_path / "init.weights.h5"), optimizer="adam",
                                     learning_rate=0.01, train_steps=steps, log_every=3, checkpoint_every=3,
                                     model_dir=str(tmp_path / "one"), loss_weighting=weighting, progress="quiet"))
    # Sums over two workers in another order: float32 rounding only.
    assert max_weight_difference(_final_weights(tmp_path, tmp_path / "run"), one_process.model.get_weights()) <= 1e-6
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for workers, one in zip(logged, one_process.history, strict=True):
        assert workers["loss_weight/main_output"] == pytest.approx(one["loss_weight/main_output"], rel=1e-6)


def test_two_workers_reading_through_the_input_service_match_one_process_on_the_same_batches(tmp_path):
    """synthetic_headlines is read in order: the service reads each global batch once, each worker gets its rows."""
    from mto_tf import train

    settings = dict(train_steps=4, shuffle_buffer=40, validation_split="", optimizer="adam", learning_rate=0.01)
    launch = Launch(f"--model_dir={tmp_path / 'run'}", "--synthetic_train_examples=128", "--input_service=local",
                    *[f"--{name}={value}" for name, value in settings.items()])
    assert launch.wait() == 0, launch.output[-4000:]
    assert re.search(r"launch: input service started at 127\.0\.0\.1:\d+", launch.output)
    assert re.search(r"\[worker 1\] .*Input: read in order, once, by the tf.data service at 127\.0\.0\.1:",
                     launch.output), launch.output[-4000:]
    one_process = train(small_config(tmp_path, model_dir=str(tmp_path / "one"), synthetic_train_examples=128,
                                     **settings))
    # The same global batches; the sum over two replicas rounds differently (as above).
    assert max_weight_difference(_final_weights(tmp_path, tmp_path / "run"), one_process.model.get_weights()) <= 1e-6
