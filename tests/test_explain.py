"""How each output's loss trains each layer: `mto-explain`, gradient shares during training, the sweep."""

import json
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import SMALL_FLAGS, data_dir, mto_train_in_process, run_cli, run_config, run_in_process, small_config
from mto_tf import train
from mto_tf.core import gradient_shares
from mto_tf.data import batching
from mto_tf.programs import explain, sweep
from mto_tf.programs import flags as mto_flags
from mto_tf.run.model_setup import build_model_setup

pytestmark = pytest.mark.slow

MAIN_ONLY = ("main_dense_0", "main_dense_1", "main_dense_2", "main_output")
SHARED = ("embedding", "lstm")
# float32 gradients of sums of a few hundred terms: |grad(L) - sum_i w_i grad(L_i)|
# is rounding only (measured about 1e-8 against gradients of about 1e-2).
LINEARITY_ATOL = 1e-6
# Shares are float64 ratios of float32 sums; they add up to 1 up to that rounding.
SHARES_SUM_ATOL = 1e-5


def _explain(config, strategy=None, batches=3):
    return explain.explain(config, strategy=strategy or tf.distribute.get_strategy(), explain_batches=batches)


def _layers(report):
    return {layer["name"]: layer for layer in report["layers"]}


def test_headline_shares_are_the_gradient_taken_apart(tmp_path):
    report = _explain(small_config(tmp_path))
    layers = _layers(report)

    assert report["outputs"] == ["aux_output", "main_output"] and report["loss_weights"]["aux_output"] == 0.2
    assert report["linearity_max_abs_error"] < LINEARITY_ATOL
    assert list(layers) == ["embedding", "lstm", *MAIN_ONLY[:3], "aux_output", "main_output"]  # Model order.
    for layer in report["layers"]:
        assert sum(layer["share"].values()) == pytest.approx(1.0, abs=SHARES_SUM_ATOL), layer["name"]
    # The auxiliary loss does not reach the main head: exactly zero there.
    for name in MAIN_ONLY:
        assert layers[name]["grad_norm"]["aux_output"] == 0.0 and layers[name]["share"]["aux_output"] == 0.0
        assert not layers[name]["shared"] and layers[name]["cosine"] is None
    # It reaches the shared trunk.
    for name in SHARED:
        assert layers[name]["shared"] and layers[name]["reached_by"] == ["aux_output", "main_output"]
        assert layers[name]["grad_norm"]["aux_output"] > 0 and layers[name]["grad_norm"]["main_output"] > 0
        assert -1.0 <= layers[name]["cosine"]["aux_output/main_output"] <= 1.0
    assert layers["aux_output"]["share"] == {"aux_output": 1.0, "main_output": 0.0}


def test_the_numbers_are_the_gradients_numpy_would_take_apart(tmp_path):
    """Shares and norms from the contributions, recomputed here by hand for the LSTM."""
    config = small_config(tmp_path)
    setup = build_model_setup(config, tf.distribute.get_strategy())
    contributions = gradient_shares.make_gradient_contributions(
        objective=setup.objective, strategy=tf.distribute.get_strategy(), global_batch_size=config.batch_size)
    batch = next(iter(batching.global_batches(setup.examples, signature=setup.signature,
                                              batching=batching.Batching.for_training(config))))
    parts = contributions(batch)
    report = gradient_shares.layer_report(setup.model, parts, loss_weights=setup.losses.weights)
    lstm = setup.model.get_layer("lstm")
    positions = [index for index, variable in enumerate(setup.model.trainable_variables)
                 if any(variable is weight for weight in lstm.trainable_weights)]

    def flat(gradients):
        return np.concatenate([gradients[i].ravel() for i in positions]).astype(np.float64)

    total, aux = flat(parts.total), flat(parts.by_output["aux_output"])
    layer = _layers(report)["lstm"]
    assert layer["share"]["aux_output"] == pytest.approx(aux @ total / (total @ total), rel=1e-9)
    assert layer["grad_norm"]["aux_output"] == pytest.approx(np.linalg.norm(aux), rel=1e-9)
    # And the total is the gradient of the whole loss, taken with its own tape.
    with tf.GradientTape() as tape:
        inputs, labels, _ = keras.utils.unpack_x_y_sample_weight(batch)
        predictions = setup.model(inputs, training=True)
        loss = sum(setup.losses.weights[name]
                   * tf.reduce_mean(setup.losses.terms[name].loss_fn(labels[name], predictions[name]))
                   for name in setup.losses.terms)
    expected = tape.gradient(loss, lstm.trainable_weights)
    np.testing.assert_allclose(flat(parts.total), np.concatenate([g.numpy().ravel() for g in expected]), atol=1e-6)


def test_with_aux_weight_zero_the_aux_share_is_zero_everywhere(tmp_path):
    report = _explain(small_config(tmp_path, loss_weights={"main_output": 1.0, "aux_output": 0.0}))
    for layer in report["layers"]:
        assert layer["grad_norm"]["aux_output"] == 0.0, layer["name"]
        if layer["name"] == "aux_output":  # Nothing trains the auxiliary head at all: no shares to give.
            assert layer["grad_norm"]["total"] == 0.0 and layer["share"] == {"aux_output": None, "main_output": None}
        else:
            assert layer["share"]["aux_output"] == 0.0, layer["name"]
    # Still reached, structurally: a zero contribution has no direction.
    assert _layers(report)["lstm"]["cosine"] == {"aux_output/main_output": None}


def test_mirrored_gives_the_single_device_report(tmp_path, mirrored_strategy):
    one_device = _explain(small_config(tmp_path))
    mirrored = _explain(small_config(tmp_path, strategy="mirrored", num_cpu_devices=2), mirrored_strategy)
    assert mirrored["outputs"] == one_device["outputs"]
    for a, b in zip(one_device["layers"], mirrored["layers"], strict=True):
        assert (a["name"], a["shared"], a["reached_by"]) == (b["name"], b["shared"], b["reached_by"])
        # Half-batch gradients summed instead of one batch's: float32 rounding.
        for key in ("grad_norm", "share"):
            for name, value in a[key].items():
                assert b[key][name] == pytest.approx(value, rel=1e-4, abs=1e-7), (a["name"], key, name)


def test_a_user_model_with_three_outputs(tmp_path):
    def build():
        tokens = keras.Input((6,), dtype="int32", name="tokens")
        trunk = keras.layers.Dense(8, activation="relu", name="trunk")(
            keras.layers.Flatten()(keras.layers.Embedding(20, 4, name="embed")(tokens)))
        head_b = keras.layers.Dense(4, activation="relu", name="b_hidden")(trunk)
        return keras.Model(tokens, {"a": keras.layers.Dense(1, activation="sigmoid", name="a")(trunk),
                                    "b": keras.layers.Dense(3, activation="softmax", name="b")(head_b),
                                    "c": keras.layers.Dense(1, name="c")(trunk)})

    rng = np.random.default_rng(0)
    dataset = tf.data.Dataset.from_tensor_slices((
        {"tokens": rng.integers(0, 20, (48, 6)).astype("int32")},
        {"a": rng.integers(0, 2, (48, 1)).astype("float32"), "b": rng.integers(0, 3, (48,)).astype("int32"),
         "c": rng.standard_normal((48, 1)).astype("float32")}))
    config = run_config(tmp_path, model=build, dataset=dataset, loss_weights={"a": 1.0, "b": 0.5, "c": 0.1},
                        losses={"a": "binary_crossentropy", "b": "sparse_categorical_crossentropy", "c": "mse"})
    report = _explain(config)
    layers = _layers(report)
    assert report["outputs"] == ["a", "b", "c"] and report["linearity_max_abs_error"] < LINEARITY_ATOL
    assert set(layers["trunk"]["cosine"]) == {"a/b", "a/c", "b/c"}
    assert layers["b_hidden"]["reached_by"] == ["b"] and not layers["b_hidden"]["shared"]
    assert layers["b_hidden"]["share"]["b"] == pytest.approx(1.0, abs=SHARES_SUM_ATOL)
    for layer in report["layers"]:
        assert sum(layer["share"].values()) == pytest.approx(1.0, abs=SHARES_SUM_ATOL), layer["name"]


def test_shares_during_training_mirrored_equal_one_device_and_change_nothing(tmp_path, mirrored_strategy):
    settings = dict(train_steps=4, log_every=2, log_gradient_shares_every=2, validation_split="")
    plain = train(small_config(tmp_path, train_steps=4, log_every=2, validation_split="",
                               model_dir=str(tmp_path / "plain")))
    one_device = train(small_config(tmp_path, model_dir=str(tmp_path / "one"), **settings))
    mirrored = train(small_config(tmp_path, model_dir=str(tmp_path / "mirrored"), strategy="mirrored",
                                  num_cpu_devices=2, **settings), strategy=mirrored_strategy)
    # Measuring trains nothing: the same weights as a run that does not measure.
    for a, b in zip(plain.model.get_weights(), one_device.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    records = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [2, 4]
    for record, mirrored_record in zip(records, mirrored.history, strict=True):
        assert record["grad_share/main_dense_0/aux_output"] == 0.0
        assert record["grad_share/lstm/aux_output"] + record["grad_share/lstm/main_output"] == pytest.approx(1.0)
        shares = {key: value for key, value in record.items() if key.startswith("grad_")}
        assert len(shares) == 7 * 2 + 7 * 3  # 7 layers: 2 shares, 2 norms and the total's norm each.
        for key, value in shares.items():
            assert mirrored_record[key] == pytest.approx(value, rel=1e-4, abs=1e-7), key
    # TensorBoard has them too.
    event_files = list((tmp_path / "one" / "tensorboard").iterdir())
    tags = {value.tag for path in event_files for event in tf.compat.v1.train.summary_iterator(str(path))
            for value in event.summary.value}
    assert "grad_share/embedding/aux_output" in tags


def test_mto_explain_command_line_writes_json_and_png(tmp_path):
    data_flags = [*SMALL_FLAGS, f"--data_dir={data_dir()}"]
    # Trained in this process; explained by the program, in a fresh one.
    trained = mto_train_in_process(*data_flags, f"--model_dir={tmp_path / 'run'}",
                             "--train_steps=4", "--log_every=2")
    assert trained.returncode == 0, trained.stderr[-2000:]
    process = _run_explain(*data_flags, f"--model_dir={tmp_path / 'run'}", "--explain_batches=2",
                           f"--output_json={tmp_path / 'shares.json'}", f"--output_png={tmp_path / 'shares.png'}")
    assert process.returncode == 0, process.stderr[-3000:]
    report = json.loads((tmp_path / "shares.json").read_text())
    assert report["batches"] == 2 and {layer["name"] for layer in report["layers"]} >= set(SHARED + MAIN_ONLY)
    assert "embedding" in process.stdout and "linearity" in process.stdout
    image = (tmp_path / "shares.png").read_bytes()
    assert image.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.image
    height, width, _ = matplotlib.image.imread(tmp_path / "shares.png").shape
    assert height > 200 and width > 400


# One case of each program in a fresh process: the exit status a shell sees and the one line, from a flag
# absl itself refuses (found before TensorFlow starts); the others in this process.
def _fresh_process(*case):
    return pytest.param(*case, id="fresh_process")


@pytest.mark.parametrize("flags, message", [
    _fresh_process(["--no_such_flag=1"], "mto-explain: error: Unknown command line flag 'no_such_flag'"),
    (["--optimizer=adam"], "mto-explain: error: --optimizer: mto-explain does not train"),
    (["--explain_batches=0"], "mto-explain: error: --explain_batches: expected an integer > 0"),
    (["--model_dir=/nonexistent/run"], "mto-explain: error: --model_dir: '/nonexistent/run/model.weights.h5' not found"),
    (["--output_png=/nonexistent/dir/x.png"], "mto-explain: error: --output_png: no directory to write"),
    (["--loss_weights=main_output=1,nope=2"], "mto-explain: error: --loss_weights: unknown output 'nope'"),
])
def test_mto_explain_bad_flags(tmp_path, flags, message, request):
    run = _run_explain if "fresh_process" in request.node.name else _run_explain_in_process
    process = run(*SMALL_FLAGS, f"--data_dir={data_dir()}", *flags)
    assert process.returncode == 2 and message in process.stderr, process.stderr[-2000:]
    assert "Traceback" not in process.stderr


def _run_explain(*flags):
    return run_cli(*flags, entry_point=(sys.executable, "-m", "mto_tf.explain"))


def _run_explain_in_process(*flags):
    return run_in_process("mto-explain", explain.explain_main, *flags, define_flags=mto_flags.define_explain_flags)


def _run_sweep(*flags):
    return run_cli(*flags, entry_point=(sys.executable, "-m", "mto_tf.sweep"))


def _run_sweep_in_process(*flags):
    return run_in_process("mto_tf.sweep", sweep.sweep_main, *flags, define_flags=mto_flags.define_sweep_flags)


def test_sweep_trains_one_run_per_weight_and_writes_table_json_and_plot(tmp_path):
    sweep_dir = tmp_path / "sweep"
    # In this process (the sweep in a fresh process: test_sweep_bad_flags's first case).
    process = _run_sweep_in_process("--loss_weight=aux_output=0,0.5", f"--sweep_dir={sweep_dir}", *SMALL_FLAGS,
                         f"--data_dir={data_dir()}", "--train_steps=4", "--log_every=2", "--progress=quiet")
    assert process.returncode == 0, process.stderr[-3000:]
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    assert summary["output"] == "aux_output" and summary["loss_weights"]["main_output"] == 1.0
    assert [run["weight"] for run in summary["runs"]] == [0.0, 0.5]
    for run in summary["runs"]:
        assert run["step"] == 4 and "val_loss" not in run["values"]
        assert {"val_main_output_loss", "val_aux_output_loss"} <= set(run["values"])
        # Each run is an mto-train run of its own, with that weight.
        settings = json.loads((sweep_dir / f"aux_output={run['weight']:g}" / "config.json").read_text())
        assert settings["loss_weights"] == {"aux_output": run["weight"], "main_output": 1.0}
    # Same seed and data: weight 0 and 0.5 differ only through the auxiliary loss's pull on the trunk.
    assert summary["runs"][0]["values"] != summary["runs"][1]["values"]
    assert "aux_output weight" in process.stdout and "val_main_output_loss" in process.stdout
    assert (sweep_dir / "sweep.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("flags, message", [
    _fresh_process(["--no_such_flag=1"], "Unknown command line flag 'no_such_flag'"),
    (["--loss_weight=aux_output"], "--loss_weight: expected OUTPUT=W1,W2,..."),
    (["--loss_weight=aux_output=1,-1"], "--loss_weight: expected OUTPUT=W1,W2,... with weights >= 0"),
    (["--loss_weight=nope=1,2"], "--loss_weight: unknown output 'nope'"),
    (["--loss_weight=aux_output=1,2", "--validation_split="], "--loss_weight: the sweep compares final validation"),
    (["--loss_weight=aux_output=1,2", "--model_dir=/tmp/x"], "--model_dir: the sweep gives each run its own"),
])
def test_sweep_bad_flags(tmp_path, flags, message, request):
    run = _run_sweep if "fresh_process" in request.node.name else _run_sweep_in_process
    process = run(f"--sweep_dir={tmp_path / 'sweep'}", *SMALL_FLAGS, f"--data_dir={data_dir()}", *flags)
    assert process.returncode == 2 and f"mto_tf.sweep: error: {message}" in process.stderr, process.stderr[-2000:]
    assert not (tmp_path / "sweep").exists()
