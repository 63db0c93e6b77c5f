"""What a Keras user reaches for around a run: one run per `--model_dir`, Ctrl-C that keeps the work, and more."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from helpers import SMALL_FLAGS, TIMEOUT_SECONDS, data_dir, mto_train_in_process

# Holds `.lock` as a run's chief does, prints its pid, and waits to be killed (not `time.sleep(600)`:
# test_launch_local looks for leftover processes by that text).
HOLD_THE_LOCK = textwrap.dedent("""
    import fcntl, os, sys, time
    os.makedirs(sys.argv[1], exist_ok=True)
    lock = open(os.path.join(sys.argv[1], ".lock"), "a+")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    lock.truncate(0); lock.write(str(os.getpid())); lock.flush()
    print("held", flush=True)
    time.sleep(3600)
""")


def _hold_the_lock(model_dir) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(model_dir)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def _train(model_dir, *flags):
    return mto_train_in_process(*SMALL_FLAGS, f"--data_dir={data_dir()}", f"--model_dir={model_dir}",
                                "--train_steps=2", "--progress=quiet", *flags)


def test_a_second_run_into_a_held_model_dir_stops_before_writing_naming_the_holder(tmp_path):
    model_dir = tmp_path / "run"
    holder = _hold_the_lock(model_dir)
    try:
        process = _train(model_dir)
        assert process.returncode == 2
        assert process.stderr.strip().splitlines()[-1] == (
            f"mto-train: error: --model_dir: '{model_dir}' is in use by another run (pid {holder.pid}); wait for "
            f"it to end, or use another --model_dir")
        assert sorted(os.listdir(model_dir)) == [".lock"]  # Nothing written.
        # Reading a run takes no lock: mto-explain works while it is held.
        from helpers import run_in_process
        from mto_tf.programs import explain
        from mto_tf.programs import flags as mto_flags
        explained = run_in_process("mto-explain", explain.explain_main, *SMALL_FLAGS, f"--data_dir={data_dir()}",
                                   "--explain_batches=1", define_flags=mto_flags.define_explain_flags)
        assert explained.returncode == 0, explained.stderr[-2000:]
    finally:
        holder.kill()
        holder.wait()
    # The kernel released the killed holder's lock: its lock file does not block the next run.
    assert _train(model_dir).returncode == 0
    assert (model_dir / "model.keras").exists()


@pytest.mark.slow  # A fresh TensorFlow process.
def test_two_runs_started_into_one_model_dir_one_trains_the_other_is_refused(tmp_path):
    model_dir = tmp_path / "run"
    first = subprocess.Popen(["mto-train", *SMALL_FLAGS, f"--data_dir={data_dir()}", f"--model_dir={model_dir}",
                              "--train_steps=400", "--steps_per_loop=1", "--log_every=50", "--progress=lines"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    try:
        assert first.stdout.readline().startswith("step 50/400")  # Training, holding the lock.
        second = _train(model_dir, "--train_steps=400")
        assert second.returncode == 2 and f"in use by another run (pid {first.pid})" in second.stderr
        assert first.wait(timeout=TIMEOUT_SECONDS) == 0, first.stderr.read()[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
    steps = [json.loads(line)["step"] for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(50, 401, 50))  # Each step logged once, by the one run.


# --- Ctrl-C, as a terminal sends it ----------------------------------------------------------------------------------


class UnderATerminal:
    """`mto-train` on a pseudo-terminal, in its own session: SIGINT to its process group is a terminal's Ctrl-C."""

    def __init__(self, *flags):
        import pty
        controller, terminal = pty.openpty()
        self.process = subprocess.Popen(["mto-train", *flags], stdin=terminal, stdout=terminal, stderr=terminal,
                                        start_new_session=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        os.close(terminal)
        self._controller = controller
        self.screen = ""

    def wait_for(self, pattern: str) -> None:
        import re
        deadline = time.monotonic() + TIMEOUT_SECONDS
        while not re.search(pattern, self.screen):
            assert time.monotonic() < deadline and self.process.poll() is None, self.screen[-3000:]
            self._read()

    def ctrl_c(self) -> None:
        os.killpg(self.process.pid, signal.SIGINT)

    def wait(self) -> int:
        status = self.process.wait(timeout=TIMEOUT_SECONDS)
        while self._read():
            pass
        os.close(self._controller)
        return status

    def _read(self) -> bool:
        import select
        if not select.select([self._controller], [], [], 1)[0]:
            return True
        try:
            chunk = os.read(self._controller, 65536)
        except OSError:  # The terminal closed: the process ended.
            return False
        self.screen += chunk.decode(errors="replace")
        return bool(chunk)


@pytest.mark.slow  # A fresh TensorFlow process.
def test_ctrl_c_checkpoints_says_how_to_resume_exits_130_and_the_resumed_run_ends_as_an_uninterrupted_one(tmp_path):
    from helpers import small_config
    from mto_tf import train

    flags = [*SMALL_FLAGS, f"--data_dir={data_dir()}", "--train_steps=600", "--steps_per_loop=5", "--log_every=50",
             "--checkpoint_every=1000", "--optimizer=adam", "--learning_rate=0.01"]
    run = UnderATerminal(*flags, f"--model_dir={tmp_path / 'run'}")
    run.wait_for(r"step 100/600")
    run.ctrl_c()
    assert run.wait() == 130, run.screen[-3000:]
    assert "Traceback" not in run.screen
    assert "Ctrl-C: stopping after the current call, with a checkpoint" in run.screen
    stopped = int(__import__("re").search(r"Interrupted: stopped by Ctrl-C after step (\d+), checkpoint saved; "
                                          r"rerun the same command to resume", run.screen).group(1))
    assert 100 <= stopped < 600 and (tmp_path / "run" / "checkpoints" / f"ckpt-{stopped}.index").exists()
    assert not (tmp_path / "run" / "model.keras").exists()

    # The same command resumes it; it ends with the weights of an uninterrupted run, bit for bit.
    resumed = _train(tmp_path / "run", *flags[len(SMALL_FLAGS) + 1:])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole = train(small_config(tmp_path, train_steps=600, steps_per_loop=5, log_every=50, checkpoint_every=1000,
                               optimizer="adam", learning_rate=0.01, model_dir=str(tmp_path / "whole")))
    import numpy as np
    from mto_tf.core.models import build_headline
    model = build_headline(small_config(tmp_path))
    model.load_weights(tmp_path / "run" / "model.weights.h5")
    for expected, got in zip(whole.model.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.slow  # A fresh TensorFlow process.
def test_a_second_ctrl_c_stops_without_a_traceback_and_the_newest_checkpoint_reads(tmp_path):
    import tensorflow as tf

    run = UnderATerminal(*SMALL_FLAGS, f"--data_dir={data_dir()}", f"--model_dir={tmp_path / 'run'}",
                         "--train_steps=100000", "--steps_per_loop=200", "--log_every=200", "--checkpoint_every=200")
    run.wait_for(r"step 400/100000")
    run.ctrl_c()
    run.wait_for("Ctrl-C: stopping after the current call")  # The first was handled: the second is a second.
    run.ctrl_c()
    assert run.wait() == 130, run.screen[-3000:]
    assert "Traceback" not in run.screen
    # At once if it landed before the run stopped; after the run stopped it changes nothing.
    assert ("Interrupted: stopped at once by a second Ctrl-C; the newest complete checkpoint is kept" in run.screen
            or "Interrupted: stopped by Ctrl-C after step" in run.screen), run.screen[-2000:]
    latest = tf.train.latest_checkpoint(str(tmp_path / "run" / "checkpoints"))
    assert latest and tf.train.load_checkpoint(latest).get_variable_to_shape_map()


def test_a_second_ctrl_c_while_the_run_goes_on_stops_it_at_once(tmp_path):
    import tensorflow as tf

    from mto_tf.errors import InterruptedAtOnce
    from mto_tf.run.preemption import PreemptionWatcher

    before = signal.getsignal(signal.SIGINT)  # Python's default, or what the test runner set.
    watcher = PreemptionWatcher(tf.distribute.get_strategy())
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert watcher.stop_agreed() == "SIGINT"
        with pytest.raises(InterruptedAtOnce):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # Python runs the handler here, at once.
    finally:
        watcher.close()
    # After a Ctrl-C stop, Ctrl-C is ignored until the run has ended and gives it back.
    from mto_tf.run import preemption
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    preemption.restore_after_interrupt()
    assert signal.getsignal(signal.SIGINT) == before


# --- A compiled model.keras ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", ["custom", "fit"])
def test_model_keras_loads_compiled_and_evaluates_as_mto_tf_computes(tmp_path, loop):
    import keras
    import numpy as np

    from helpers import BATCH_SIZE, OUTPUTS, VALUE_RTOL, exact_means, small_config, write_npz
    from mto_tf import train

    arrays = write_npz(tmp_path / "data.npz", num_examples=4 * BATCH_SIZE, with_sample_weights=True)
    result = train(small_config(tmp_path, dataset=f"npz:{tmp_path / 'data.npz'}", loop=loop, optimizer="adam",
                                learning_rate=0.01, train_steps=4, log_every=2, steps_per_loop=2,
                                loss_weights={"main_output": 1.0, "aux_output": 0.3},
                                metrics={"main_output": ("binary_accuracy",), "aux_output": ("auc",)}))
    loaded = keras.models.load_model(tmp_path / "run" / "model.keras")
    assert loaded.compiled and isinstance(loaded.optimizer, keras.optimizers.Adam)
    # The optimizer as fit saves it: the run's step count and slots.
    assert int(loaded.optimizer.iterations) == 4
    run_slots = {v.path.split("/", 1)[1]: v.numpy() for v in result.optimizer.variables}
    for variable in loaded.optimizer.variables:
        np.testing.assert_array_equal(variable.numpy(), run_slots[variable.path.split("/", 1)[1]])
    # Keras's evaluate is exact on full batches: it equals the NumPy means of the trained model.
    inputs = {"main_input": arrays["main_input"].astype("int32"), "aux_input": arrays["aux_input"]}
    labels = {name: arrays[name].reshape(-1, 1) for name in OUTPUTS}
    weights = {name: arrays[f"sample_weight/{name}"] for name in OUTPUTS}
    evaluated = loaded.evaluate(inputs, labels, sample_weight=weights, batch_size=BATCH_SIZE, return_dict=True,
                                verbose=0)
    means = exact_means(result.model, arrays)
    for name in OUTPUTS:
        assert evaluated[f"{name}_loss"] == pytest.approx(means[name], rel=VALUE_RTOL)
    assert evaluated["loss"] == pytest.approx(means["main_output"] + 0.3 * means["aux_output"], rel=VALUE_RTOL)
    assert {"main_output_binary_accuracy", "aux_output_auc"} <= set(evaluated)


USER_LOSSES = """
import keras

@keras.saving.register_keras_serializable(package="my_losses")
def doubled_bce(y_true, y_pred):
    return 2.0 * keras.losses.binary_crossentropy(y_true, y_pred)

def unregistered_mae(y_true, y_pred):
    return keras.ops.mean(keras.ops.abs(y_true - y_pred), axis=-1)
"""


def test_a_registered_user_loss_reloads_compiled_and_an_unregistered_one_leaves_model_keras_uncompiled(
        tmp_path, monkeypatch, caplog):
    import keras

    from helpers import BATCH_SIZE, OUTPUTS, VALUE_RTOL, exact_means, small_config, write_npz
    from mto_tf import train

    (tmp_path / "my_losses.py").write_text(USER_LOSSES)
    monkeypatch.syspath_prepend(str(tmp_path))
    arrays = write_npz(tmp_path / "data.npz", num_examples=4 * BATCH_SIZE, with_sample_weights=True)
    settings = dict(dataset=f"npz:{tmp_path / 'data.npz'}", train_steps=2, log_every=2)
    result = train(small_config(tmp_path, **settings, metrics={}, losses={"main_output": "my_losses:doubled_bce",
                                                              "aux_output": "binary_crossentropy"}))
    # Keras finds a registered function again once its module is imported (this test imported it).
    loaded = keras.models.load_model(tmp_path / "run" / "model.keras")
    assert loaded.compiled
    inputs = {"main_input": arrays["main_input"].astype("int32"), "aux_input": arrays["aux_input"]}
    evaluated = loaded.evaluate(inputs, {name: arrays[name].reshape(-1, 1) for name in OUTPUTS},
                                sample_weight={name: arrays[f"sample_weight/{name}"] for name in OUTPUTS},
                                batch_size=BATCH_SIZE, return_dict=True, verbose=0)
    assert evaluated["main_output_loss"] == pytest.approx(2 * exact_means(result.model, arrays)["main_output"],
                                                          rel=VALUE_RTOL)

    with caplog.at_level("WARNING"):
        train(small_config(tmp_path, **settings, model_dir=str(tmp_path / "unregistered"),
                           metrics={"aux_output": ("my_losses:unregistered_mae",)}))
    assert "model.keras is saved uncompiled: Keras cannot reload a compile config with my_losses:unregistered_mae " \
           "(output 'aux_output')" in caplog.text
    assert not keras.models.load_model(tmp_path / "unregistered" / "model.keras").compiled


# --- An output that is not trained ---------------------------------------------------------------------------------


def test_a_null_loss_predicts_and_measures_the_output_but_trains_only_the_others_as_fit_does(tmp_path):
    import keras
    import numpy as np
    import tensorflow as tf

    from helpers import run_config
    from mto_tf import train

    rng = np.random.default_rng(0)
    data = {"features": rng.normal(size=(32, 3)).astype("float32"),
            "priority": rng.normal(size=(32, 1)).astype("float32"), "department": rng.normal(size=(32, 1)).astype(
                "float32")}
    np.savez(tmp_path / "data.npz", **data)

    def build():
        keras.utils.set_random_seed(1)
        features = keras.Input((3,), name="features")
        trunk = keras.layers.Dense(4, name="trunk")(features)
        return keras.Model(features, {"priority": keras.layers.Dense(1, name="priority_head")(trunk),
                                      "department": keras.layers.Dense(1, name="department_head")(trunk)})

    losses = {"priority": None, "department": "mse"}
    result = train(run_config(tmp_path, model=build, dataset=f"npz:{tmp_path / 'data.npz'}", losses=losses,
                              metrics={"priority": ("mae",), "department": ("mae",)}, train_steps=4,
                              log_every=2, progress="quiet", validation_data=f"npz:{tmp_path / 'data.npz'}"))
    reference = build()
    initial_head = reference.get_layer("priority_head").get_weights()
    reference.compile(optimizer=keras.optimizers.SGD(0.1), loss=losses,
                      metrics={"priority": ["mae"], "department": ["mae"]})
    history = reference.fit(tf.data.Dataset.from_tensor_slices(({"features": data["features"]}, {
        name: data[name] for name in losses})).batch(16).repeat(), epochs=2, steps_per_epoch=2, verbose=0,
        shuffle=False).history
    # Trained as fit trains it; the untrained output's own layer is not moved at all.
    for layer in ("trunk", "priority_head", "department_head"):
        for got, expected in zip(result.model.get_layer(layer).get_weights(), reference.get_layer(layer).get_weights()):
            np.testing.assert_allclose(got, expected, atol=1e-6, err_msg=layer)
    for got, initial in zip(result.model.get_layer("priority_head").get_weights(), initial_head):
        np.testing.assert_array_equal(got, initial)
    # Logged as fit's history names it: no per-output loss for a single trained output; the metric of both.
    logged = result.history[-1]
    assert set(history) == {"loss", "priority_mae", "department_mae"}
    assert set(history) <= set(logged) and "priority_loss" not in logged and "department_loss" not in logged
    assert logged["priority_mae"] == pytest.approx(history["priority_mae"][-1], rel=1e-5)
    assert {"val_loss", "val_priority_mae"} <= set(logged) and "val_priority_loss" not in logged


def test_null_losses_that_cannot_work_are_refused_naming_the_flag(tmp_path):
    for flags, message in [
        (['--losses={"main_output": null, "aux_output": null}'], "--losses: every output's loss is null"),
        (['--losses={"main_output": "binary_crossentropy", "aux_output": null}',
          "--loss_weights=main_output=1,aux_output=0.5"], "--loss_weights: output 'aux_output' has no loss"),
        (['--losses={"main_output": "binary_crossentropy", "aux_output": null}', "--loss_weighting=mgda"],
         "--loss_weighting: mgda weighs several outputs' losses; model 'headline' has one to train"),
    ]:
        process = _train(tmp_path / "run", *flags)
        assert process.returncode == 2 and f"mto-train: error: {message}" in process.stderr, process.stderr[-1500:]
        assert not (tmp_path / "run" / "config.json").exists()


# --- Every metric Keras has: a value per class ----------------------------------------------------------------------


def test_a_metric_with_a_value_per_class_is_logged_as_fits_history_holds_it_by_both_loops(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    logged = {}
    for loop in ("custom", "fit"):
        model_dir = tmp_path / loop
        process = _train(model_dir, "--metrics=main_output=accuracy,aux_output=f1_score", "--train_steps=4",
                         "--log_every=2", "--steps_per_loop=2", f"--loop={loop}", "--progress=lines")
        assert process.returncode == 0, process.stderr[-3000:]
        records = logged[loop] = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
        # F1Score's default average=None: a value per class (one sigmoid unit: one class), a list as fit's history.
        assert all(isinstance(record["aux_output_f1_score"], list) and len(record["aux_output_f1_score"]) == 1
                   for record in records), loop
        assert isinstance(records[-1]["val_aux_output_f1_score"], list)
        assert isinstance(records[-1]["main_output_accuracy"], float)
        events = event_accumulator.EventAccumulator(str(model_dir / "tensorboard"), size_guidance={"tensors": 0})
        events.Reload()
        assert {"aux_output_f1_score/0", "val_aux_output_f1_score/0"} <= set(events.Tags()["tensors"])
        assert "(mean of 1 classes)" in process.stdout
    for custom, fit in zip(logged["custom"], logged["fit"], strict=True):
        assert custom["aux_output_f1_score"] == pytest.approx(fit["aux_output_f1_score"], rel=1e-5, abs=1e-6)


def test_a_per_class_value_cannot_be_save_best(tmp_path):
    process = _train(tmp_path / "run", "--metrics=aux_output=f1_score", "--save_best=val_aux_output_f1_score")
    assert process.returncode == 2 and "--save_best: val_aux_output_f1_score has a value per class" in process.stderr
    assert not (tmp_path / "run").exists()


# --- mto-evaluate ----------------------------------------------------------------------------------------------------


def _evaluate(*flags):
    from helpers import run_in_process
    from mto_tf.programs import evaluate
    from mto_tf.programs import flags as mto_flags

    return run_in_process("mto-evaluate", evaluate.evaluate_main, *flags, define_flags=mto_flags.define_evaluate_flags)


def test_mto_evaluate_gives_exact_means_over_every_example_and_keras_agrees_where_it_is_exact(tmp_path,
                                                                                             mirrored_strategy):
    import keras

    from helpers import BATCH_SIZE, OUTPUTS, VALUE_RTOL, exact_means, small_config, write_npz
    from mto_tf.core.models import build_headline
    from mto_tf.programs import evaluate

    assert _train(tmp_path / "run", "--train_steps=4", "--save_best=val_loss", "--eval_every=2",
                  "--checkpoint_every=2").returncode == 0
    # 40 examples, batch 16: the last batch holds 8 (Keras's evaluate averages per-output losses over batches).
    partial = write_npz(tmp_path / "partial.npz", num_examples=40, with_sample_weights=True, seed=5)
    full = write_npz(tmp_path / "full.npz", num_examples=2 * BATCH_SIZE, with_sample_weights=True, seed=6)
    model = build_headline(small_config(tmp_path))
    model.load_weights(tmp_path / "run" / "model.weights.h5")
    flags = [*SMALL_FLAGS, f"--data_dir={data_dir()}", f"--model_dir={tmp_path / 'run'}"]
    before = {path: path.stat().st_mtime_ns for path in (tmp_path / "run").rglob("*")}

    process = _evaluate(*flags, f"--eval_data=npz:{tmp_path / 'partial.npz'}", f"--output_json={tmp_path / 'e.json'}")
    assert process.returncode == 0, process.stderr[-2000:]
    values = json.loads((tmp_path / "e.json").read_text())
    means = exact_means(model, partial)  # NumPy, every example counted once.
    for name in OUTPUTS:
        assert values[f"{name}_loss"] == pytest.approx(means[name], rel=VALUE_RTOL)
    assert values["loss"] == pytest.approx(means["main_output"] + 0.2 * means["aux_output"], rel=VALUE_RTOL)
    assert values["examples"] == 40 and "main_output_binary_accuracy" in values
    assert "main_output_loss" in process.stdout

    # The compiled model.keras, evaluated by Keras on full batches, says the same.
    loaded = keras.models.load_model(tmp_path / "run" / "model.keras")
    inputs = {"main_input": full["main_input"].astype("int32"), "aux_input": full["aux_input"]}
    keras_values = loaded.evaluate(inputs, {name: full[name].reshape(-1, 1) for name in OUTPUTS},
                                   sample_weight={name: full[f"sample_weight/{name}"] for name in OUTPUTS},
                                   batch_size=BATCH_SIZE, return_dict=True, verbose=0)
    ours = evaluate.evaluate(small_config(tmp_path, dataset=f"npz:{tmp_path / 'full.npz'}"),
                             strategy=tf_default_strategy(), eval_data=f"npz:{tmp_path / 'full.npz'}", eval_split=None,
                             weights=str(tmp_path / "run" / "model.weights.h5"))
    for name in ("loss", *(f"{output}_loss" for output in OUTPUTS)):
        assert ours[name] == pytest.approx(keras_values[name], rel=VALUE_RTOL), name
    # Our metrics are weighted by the sample weights, as compile's weighted_metrics are (so an example of
    # weight 0, no label, is skipped); model.keras was trained without sample weights, so compiled with plain
    # metrics, which count every example: Keras's own weighted metric is ours, its evaluate's is not.
    labels = full["main_output"].reshape(-1, 1)
    predicted = loaded.predict(inputs, batch_size=BATCH_SIZE, verbose=0)["main_output"]
    weighted = keras.metrics.BinaryAccuracy()(labels, predicted, sample_weight=full["sample_weight/main_output"])
    assert ours["main_output_binary_accuracy"] == pytest.approx(float(weighted), rel=VALUE_RTOL)
    assert ours["main_output_binary_accuracy"] != pytest.approx(keras_values["main_output_binary_accuracy"],
                                                                rel=VALUE_RTOL)
    # Mirrored (2 replicas, the partial batch split unevenly) equals one device.
    mirrored = evaluate.evaluate(small_config(tmp_path, strategy="mirrored", num_cpu_devices=2),
                                 strategy=mirrored_strategy, eval_data=f"npz:{tmp_path / 'partial.npz'}",
                                 eval_split=None, weights=str(tmp_path / "run" / "model.weights.h5"))
    for name in OUTPUTS:
        assert mirrored[f"{name}_loss"] == pytest.approx(values[f"{name}_loss"], rel=VALUE_RTOL)

    # Other weights of the run: best, a checkpoint's; a split of the dataset.
    for weights in ("best", "step:2"):
        other = _evaluate(*flags, "--eval_split=validation", f"--weights={weights}")
        assert other.returncode == 0 and "loss" in other.stdout, other.stderr[-2000:]
    # It only read the run: no file added or changed, no lock taken.
    assert {path: path.stat().st_mtime_ns for path in (tmp_path / "run").rglob("*")} == before


def tf_default_strategy():
    import tensorflow as tf
    return tf.distribute.get_strategy()


@pytest.mark.parametrize("flags, message", [
    ([], "--eval_data: give the examples to evaluate"),
    (["--eval_data=test.npz"], "--eval_data: expected npz:PATH"),
    (["--eval_split=validation", "--weights=last"], "--weights: expected final, best or step:N, got 'last'"),
    (["--eval_split=validation", "--weights=step:7"], "--weights: no checkpoint of step 7"),
    (["--eval_split=validation", "--train_steps=3"], "--train_steps: mto-evaluate does not train"),
    (["--eval_split=test"], "--eval_split: synthetic_headlines has splits train and validation, not 'test'"),
])
def test_mto_evaluate_bad_flags_are_one_line_and_exit_2(tmp_path, flags, message):
    assert _train(tmp_path / "run").returncode == 0
    process = _evaluate(*SMALL_FLAGS, f"--data_dir={data_dir()}", f"--model_dir={tmp_path / 'run'}", *flags)
    assert process.returncode == 2
    assert process.stderr.strip().splitlines()[-1].startswith(f"mto-evaluate: error: {message}"), process.stderr
