"""Keras callbacks in the custom loop: called as `model.fit` calls them, with the same logs, doing what they do."""

import csv
import dataclasses
import json

import keras
import numpy as np
import pytest

from helpers import LOSS_RTOL, SMALL_FLAGS, data_dir, mto_train_in_process, small_config
from mto_tf import train
from mto_tf.errors import ConfigError

# Two windows of two calls each, an evaluation after each window.
WINDOWS = dict(train_steps=8, log_every=4, steps_per_loop=2, eval_every=4, eval_steps=2, optimizer="adam",
               learning_rate=0.01)
NO_VALIDATION = dict(eval_every=0, eval_steps=None, validation_split="")


class Recorder(keras.callbacks.Callback):
    """Every call a callback gets, with its argument and logs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def _record(self, method, index=None, logs=None):
        self.calls.append((method, index, dict(logs or {})))


for _method in ("on_train_begin", "on_train_end", "on_test_begin", "on_test_end"):
    setattr(Recorder, _method, lambda self, logs=None, _method=_method: self._record(_method, None, logs))
for _method in ("on_epoch_begin", "on_epoch_end", "on_train_batch_begin", "on_train_batch_end",
                "on_test_batch_begin", "on_test_batch_end"):
    setattr(Recorder, _method, lambda self, index, logs=None, _method=_method: self._record(_method, index, logs))


def _custom_and_fit(tmp_path, make_callbacks, **settings):
    """The same run in the custom loop and `--loop=fit`, each with callbacks of its own from `make_callbacks(loop)`."""
    config = small_config(tmp_path, **{**WINDOWS, **settings})
    results = {}
    for loop in ("custom", "fit"):
        callbacks = make_callbacks(loop)
        result = train(dataclasses.replace(config, loop=loop, model_dir=str(tmp_path / loop)), callbacks=callbacks)
        results[loop] = result, callbacks
    return results


def _assert_logs_equal(custom_logs, fit_logs, where):
    assert custom_logs.keys() == fit_logs.keys(), where
    for name, value in fit_logs.items():
        # Means: fit's Mean trackers against a float32 sum over steps (and a
        # metric's state summed over windows), so the last bits may differ.
        assert custom_logs[name] == pytest.approx(value, rel=LOSS_RTOL), (where, name)


def test_a_recording_callback_sees_the_same_calls_and_logs_in_the_custom_loop_as_in_fit(tmp_path):
    epochs = []  # (loop, epoch, loss), from a LambdaCallback.

    def make_callbacks(loop):
        return [Recorder(), keras.callbacks.CSVLogger(str(tmp_path / f"{loop}.csv")), keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: epochs.append((loop, epoch, logs["loss"])))]

    results = _custom_and_fit(tmp_path, make_callbacks)
    (custom, [custom_recorder, *_]), (_, [fit_recorder, *_]) = results["custom"], results["fit"]
    assert custom_recorder.params == fit_recorder.params == {"verbose": 0, "epochs": 2, "steps": 4}

    def without_test_batches(calls):
        return [call for call in calls if not call[0].startswith("on_test_batch")]

    custom_calls, fit_calls = without_test_batches(custom_recorder.calls), without_test_batches(fit_recorder.calls)
    assert [call[:2] for call in custom_calls] == [call[:2] for call in fit_calls] == [
        ("on_train_begin", None),
        *[call for epoch in range(2) for call in [
            ("on_epoch_begin", epoch),
            ("on_train_batch_begin", 0), ("on_train_batch_end", 1),
            ("on_train_batch_begin", 2), ("on_train_batch_end", 3),
            ("on_test_begin", None), ("on_test_end", None),
            ("on_epoch_end", epoch)]],
        ("on_train_end", None)]
    for (method, index, custom_logs), (_, _, fit_logs) in zip(custom_calls, fit_calls, strict=True):
        _assert_logs_equal(custom_logs, fit_logs, (method, index))
    epoch_end = custom_calls[-2][2]
    assert {"loss", "main_output_loss", "aux_output_loss", "val_loss", "val_main_output_loss"} <= epoch_end.keys()
    # The window's record holds the same values as the callback's logs.
    assert all(custom.history[-1][name] == pytest.approx(value, rel=1e-12) for name, value in epoch_end.items())

    # The one difference: the custom loop evaluates in one tf.function call (one
    # on_test_batch pair), fit in one per steps_per_execution=2 batches.
    def test_batches(calls):
        return [call[:2] for call in calls if call[0].startswith("on_test_batch")]

    assert test_batches(custom_recorder.calls) == 2 * [("on_test_batch_begin", 0), ("on_test_batch_end", 0)]
    assert test_batches(fit_recorder.calls) == 2 * [("on_test_batch_begin", 0), ("on_test_batch_end", 1)]

    # CSVLogger writes the same rows from both loops, a LambdaCallback gets the same epochs.
    rows = {}
    for loop in ("custom", "fit"):
        with open(tmp_path / f"{loop}.csv") as file:
            rows[loop] = list(csv.DictReader(file))
    assert [row["epoch"] for row in rows["custom"]] == [row["epoch"] for row in rows["fit"]] == ["0", "1"]
    for custom_row, fit_row in zip(rows["custom"], rows["fit"], strict=True):
        _assert_logs_equal({name: float(value) for name, value in custom_row.items()},
                           {name: float(value) for name, value in fit_row.items()}, custom_row["epoch"])
    by_loop = {loop: [(epoch, loss) for name, epoch, loss in epochs if name == loop] for loop in ("custom", "fit")}
    assert [epoch for epoch, _ in by_loop["custom"]] == [epoch for epoch, _ in by_loop["fit"]] == [0, 1]
    assert [loss for _, loss in by_loop["custom"]] == pytest.approx([loss for _, loss in by_loop["fit"]],
                                                                   rel=LOSS_RTOL)


def test_early_stopping_stops_both_loops_after_the_same_epoch_with_a_checkpoint_and_the_final_model(tmp_path):
    # min_delta larger than any change: the second epoch does not improve, and patience 0 stops there.
    results = _custom_and_fit(
        tmp_path, lambda _: [keras.callbacks.EarlyStopping(monitor="val_loss", patience=0, min_delta=1e9)],
        train_steps=16)
    for loop, (result, [early_stopping]) in results.items():
        assert early_stopping.stopped_epoch == 1, loop
        assert [record["step"] for record in result.history] == [4, 8], loop
        assert (tmp_path / loop / "model.keras").exists()
        assert (tmp_path / loop / "checkpoints" / "ckpt-8.index").exists()
    for a, b in zip(results["custom"][0].model.get_weights(), results["fit"][0].model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)  # As test_fit_loop's parity.


def test_stop_training_set_mid_window_stops_both_loops_at_the_end_of_that_window(tmp_path, caplog):
    def stop_at_the_first_batch(_):
        callback = keras.callbacks.LambdaCallback()
        callback.on_train_batch_end = lambda batch, logs=None: setattr(callback.model, "stop_training", True)
        return [callback]

    with caplog.at_level("INFO"):
        results = _custom_and_fit(tmp_path, stop_at_the_first_batch, **NO_VALIDATION)
    for loop, (result, _) in results.items():
        assert [record["step"] for record in result.history] == [4], loop
        assert (tmp_path / loop / "checkpoints" / "ckpt-4.index").exists()
    assert caplog.text.count("Stopping at step 4: a callback set model.stop_training") == 2


@pytest.mark.slow  # Inner loop: the recording parity above covers the calls and logs.
def test_reduce_lr_on_plateau_lowers_the_rate_in_both_loops_and_the_rate_survives_a_resume(tmp_path):
    # Nothing improves by 1e9: after each epoch but the first, the rate halves.
    results = _custom_and_fit(
        tmp_path, lambda _: [keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0, min_delta=1e9)],
        train_steps=12, **NO_VALIDATION)
    for loop, (result, _) in results.items():
        assert float(result.optimizer.learning_rate) == pytest.approx(0.01 * 0.5 ** 2), loop
        saved = keras.models.load_model(tmp_path / loop / "model.keras")
        assert float(saved.optimizer.learning_rate) == pytest.approx(0.01 * 0.5 ** 2), loop
    for a, b in zip(results["custom"][0].model.get_weights(), results["fit"][0].model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)

    # Resumed without the callback, the run goes on at the rate it had set, in the checkpoint.
    config = small_config(tmp_path, **{**WINDOWS, **NO_VALIDATION, "train_steps": 16,
                                       "model_dir": str(tmp_path / "custom")})
    assert float(train(config).optimizer.learning_rate) == pytest.approx(0.01 * 0.5 ** 2)


def test_with_epochs_an_epoch_is_a_pass_and_its_logs_are_the_pass_over_several_windows(tmp_path):
    # 128 examples in batches of 48: 3 steps a pass, the last of 32 examples.
    # Logged every step, each pass has three windows whose metric states the
    # epoch adds up; logged once a pass (log_every=3), the window is the pass.
    passes = {}
    for log_every in (1, 3):
        recorder = Recorder()
        config = small_config(tmp_path, batch_size=48, epochs=2, train_steps=None, log_every=log_every,
                              validation_split="", model_dir=str(tmp_path / f"log_every_{log_every}"))
        result = train(config, callbacks=[recorder])
        passes[log_every] = recorder, result
    recorder, result = passes[1]
    assert recorder.params == {"verbose": 0, "epochs": 2, "steps": 3}
    assert [call[:2] for call in recorder.calls if "epoch" in call[0]] == [
        ("on_epoch_begin", 0), ("on_epoch_end", 0), ("on_epoch_begin", 1), ("on_epoch_end", 1)]
    epoch_ends = [logs for method, _, logs in recorder.calls if method == "on_epoch_end"]
    # The pass's mean loss: the mean of its steps' (each step's loss is a mean over its batch, as fit's is).
    for epoch, logs in enumerate(epoch_ends):
        steps = result.history[3 * epoch:3 * epoch + 3]
        assert logs["loss"] == pytest.approx(np.mean([record["loss"] for record in steps]), rel=1e-6)
    once_a_pass = passes[3][1].history
    assert [record["step"] for record in once_a_pass] == [3, 6]
    for logs, record in zip(epoch_ends, once_a_pass, strict=True):
        for name, value in logs.items():
            assert value == pytest.approx(record[name], rel=1e-6), name  # Accuracy over the pass, as one window.
    # How often a run logs does not change what it trains.
    for a, b in zip(passes[1][1].model.get_weights(), passes[3][1].model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # Inner loop: the recording parity above covers the calls and logs.
def test_under_mirrored_the_callbacks_get_the_logs_of_one_device(tmp_path, mirrored_strategy):
    # Metric states summed over replicas (sync-on-read variables) and over windows.
    config = small_config(tmp_path, train_steps=4, log_every=1, optimizer="adam", learning_rate=0.01,
                          **NO_VALIDATION)
    logs = {}
    for name, strategy in (("one device", None), ("mirrored", mirrored_strategy)):
        recorder = Recorder()
        config = dataclasses.replace(config, epochs=2, train_steps=None, batch_size=48,
                                     model_dir=str(tmp_path / name.replace(" ", "_")))
        train(config, strategy=strategy, callbacks=[recorder])
        logs[name] = [call for call in recorder.calls if call[0] in ("on_train_batch_end", "on_epoch_end")]
    assert len(logs["mirrored"]) == 8
    for (method, index, one_device), (_, _, mirrored) in zip(logs["one device"], logs["mirrored"], strict=True):
        assert one_device.keys() == mirrored.keys()
        for name, value in one_device.items():
            # Sums over replicas in another order: float32 rounding.
            assert mirrored[name] == pytest.approx(value, rel=1e-5), (method, index, name)


def test_a_rate_changing_callback_is_refused_with_a_schedule_before_anything_is_written(tmp_path):
    config = small_config(tmp_path, learning_rate={"class_name": "ExponentialDecay", "config": {
        "initial_learning_rate": 0.1, "decay_steps": 10, "decay_rate": 0.5}})
    with pytest.raises(ConfigError, match=r"^--callbacks: ReduceLROnPlateau sets the optimizer's learning rate, "
                                          r"but it is a schedule \(--learning_rate\)"):
        train(config, callbacks=[keras.callbacks.ReduceLROnPlateau()])
    with pytest.raises(ConfigError, match=r"^--callbacks: expected keras.callbacks.Callback objects, got 'x'"):
        train(config, callbacks=["x"])
    assert not (tmp_path / "run").exists()


CALLBACKS_MODULE = '''
import json
import keras

def epochs_to_file():
    """Writes each epoch's loss to epochs.json in the current directory."""
    epochs = []
    def on_epoch_end(epoch, logs):
        epochs.append([epoch, logs["loss"]])
        with open("epochs.json", "w") as file:
            json.dump(epochs, file)
    return [keras.callbacks.LambdaCallback(on_epoch_end=on_epoch_end)]

def not_a_list():
    return keras.callbacks.CSVLogger("x.csv")

def fails():
    raise RuntimeError("no callbacks today")
'''


def test_callbacks_from_the_command_line_and_what_they_refuse(tmp_path, monkeypatch):
    (tmp_path / "my_callbacks.py").write_text(CALLBACKS_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)

    def mto_train(*flags):
        return mto_train_in_process(*SMALL_FLAGS, f"--data_dir={data_dir()}", "--progress=quiet", "--train_steps=4",
                                    "--log_every=2", *flags)

    process = mto_train("--callbacks=my_callbacks:epochs_to_file", f"--model_dir={tmp_path / 'run'}")
    assert process.returncode == 0, process.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = json.loads((tmp_path / "epochs.json").read_text())
    assert [epoch for epoch, _ in epochs] == [0, 1]
    assert [loss for _, loss in epochs] == pytest.approx([record["loss"] for record in records], rel=1e-12)

    for flag, message in [
            ("--callbacks=my_callbacks", "--callbacks: expected MODULE:FUNCTION (a function returning a list of "
                                         "keras.callbacks.Callback), got 'my_callbacks'"),
            ("--callbacks=my_callbacks:not_a_list", "--callbacks: my_callbacks:not_a_list returned a CSVLogger; "
                                                    "expected a list of keras.callbacks.Callback"),
            ("--callbacks=my_callbacks:fails", "--callbacks: my_callbacks:fails raised RuntimeError: no callbacks "
                                               "today"),
            ("--callbacks=my_callbacks:missing", "--callbacks: module 'my_callbacks' has no 'missing' (from "
                                                 "'my_callbacks:missing')")]:
        process = mto_train(flag, f"--model_dir={tmp_path / 'refused'}")
        assert process.returncode == 2, flag
        assert process.stderr.strip().splitlines()[-1] == f"mto-train: error: {message}"
        assert not (tmp_path / "refused").exists()
