"""A user's own model (`--model=MODULE:FUNCTION`) trains as `model.fit` trains it.

The model is written by the test into its tmp directory, the way a user
keeps one in a file: list inputs (one of unknown length), list outputs of
three kinds (a logits output with a JSON loss config, a multi-hot
softmax-free output with categorical cross-entropy, a softmax output with
integer labels), metrics named as `fit` names them. The reference is plain
Keras `compile` + `fit` on the same builder, weights and npz arrays.
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import (BATCH_SIZE, MODULE_NAME, MODULE_SOURCE, max_weight_difference, mto_train_in_process, once, run_cli,
                     run_config, write_ticket_npz)
from helpers import NUM_TICKETS as NUM_EXAMPLES
from helpers import TICKET_LOSSES as LOSSES
from mto_tf import train
from mto_tf.errors import ConfigError

pytestmark = pytest.mark.slow

LOSS_WEIGHTS = {"urgent": 1.0, "tags": 0.5, "department": 0.3}
METRICS = {"urgent": ({"class_name": "BinaryAccuracy", "config": {"threshold": 0.0, "name": "acc_logit"}},),
           "tags": ("accuracy", "mae"), "department": ("accuracy",)}
# What fit's history calls them: <output>_<name as written, or the config's name>.
METRIC_NAMES = {"urgent_acc_logit", "tags_accuracy", "tags_mae", "department_accuracy"}
LOSS_NAMES = {"loss", "urgent_loss", "tags_loss", "department_loss"}
OUTPUT_ORDER = ("urgent", "tags", "department")  # The model's list order.

# Tolerances, as in test_parity_with_fit: one device does the same float32
# operations as fit (0.0 measured); two replicas add two half sums, which
# rounds differently by a few ulps.
WEIGHT_ATOL = 1e-6
LOSS_RTOL = 1e-6


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """The module file, importable from the current directory as a user's would be."""
    (tmp_path / f"{MODULE_NAME}.py").write_text(MODULE_SOURCE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    return importlib.import_module(MODULE_NAME)


def _setup(tmp_path, user_module, **overrides):
    arrays = write_ticket_npz(tmp_path / "tickets.npz")
    keras.utils.set_random_seed(0)
    user_module.build().save_weights(tmp_path / "init.weights.h5")
    settings = dict(model=f"{MODULE_NAME}:build", dataset=f"npz:{tmp_path / 'tickets.npz'}",
                    init_weights=str(tmp_path / "init.weights.h5"), losses=LOSSES, loss_weights=LOSS_WEIGHTS,
                    metrics=METRICS, optimizer="adam", learning_rate=0.01)
    config = run_config(tmp_path, **{**settings, **overrides})
    return config, arrays


def reference_fit(arrays, user_module, tmp_path, strategy, steps):
    """Plain Keras on the user's builder; computed once per test process for each strategy (the initial weights
    are seeded, the same in every test)."""
    return once(("user model fit", strategy.__class__.__name__, steps),
                lambda _: _fit(arrays, user_module, tmp_path, strategy, steps))


def _fit(arrays, user_module, tmp_path, strategy, steps):
    """Plain Keras on the user's builder: list outputs take tuples of labels and sample weights."""
    inputs = {"tokens": arrays["tokens"], "extra": arrays["extra"]}
    labels = tuple(arrays[name] for name in OUTPUT_ORDER)
    ones = np.ones(NUM_EXAMPLES, np.float32)
    sample_weights = (ones, ones, arrays["sample_weight/department"])
    dataset = tf.data.Dataset.from_tensor_slices((inputs, labels, sample_weights)).repeat().batch(
        BATCH_SIZE, drop_remainder=True)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = user_module.build()
        model.load_weights(tmp_path / "init.weights.h5")
        model.compile(optimizer=keras.optimizers.Adam(learning_rate=0.01),
                      loss={"urgent": keras.losses.BinaryCrossentropy(from_logits=True),
                            "tags": "categorical_crossentropy", "department": "sparse_categorical_crossentropy"},
                      loss_weights=LOSS_WEIGHTS,
                      # Weighted by the sample weights, as mto_tf's metrics are (ones: unweighted).
                      weighted_metrics={name: list(metrics) for name, metrics in METRICS.items()})
    history = model.fit(dataset, epochs=steps, steps_per_epoch=1, shuffle=False, verbose=0)
    return history.history, model.get_weights()


def assert_matches_fit(result, fit_history, fit_weights):
    assert set(result.history[0]) - {"step", "examples_per_sec"} == set(fit_history) == LOSS_NAMES | METRIC_NAMES
    for name in fit_history:
        np.testing.assert_allclose([record[name] for record in result.history], fit_history[name],
                                   rtol=LOSS_RTOL, atol=1e-7, err_msg=name)
    difference = max_weight_difference(result.model.get_weights(), fit_weights)
    assert difference <= WEIGHT_ATOL
    return difference


def test_user_model_from_module_function_matches_fit_on_one_device(tmp_path, user_module):
    config, arrays = _setup(tmp_path, user_module)
    result = train(config)
    fit_history, fit_weights = reference_fit(arrays, user_module, tmp_path, tf.distribute.get_strategy(),
                                             config.train_steps)
    assert_matches_fit(result, fit_history, fit_weights)
    # The run trained, and left the user's own model behind: same layers, same weights file layout.
    assert max_weight_difference(result.model.get_weights(), user_module.build().get_weights()) > 1e-3
    reloaded = keras.models.load_model(tmp_path / "run" / "model.keras")
    assert reloaded.name == "ticket_router" and reloaded.output_names == list(OUTPUT_ORDER)
    from_file = user_module.build()
    from_file.load_weights(tmp_path / "run" / "model.weights.h5")
    assert max_weight_difference(from_file.get_weights(), result.model.get_weights()) == 0.0


def test_user_model_under_mirrored_matches_mirrored_fit_and_one_device_fit(tmp_path, user_module,
                                                                           mirrored_strategy):
    config, arrays = _setup(tmp_path, user_module, strategy="mirrored", num_cpu_devices=2)
    result = train(config, strategy=mirrored_strategy)
    assert_matches_fit(result, *reference_fit(arrays, user_module, tmp_path, mirrored_strategy, config.train_steps))
    assert_matches_fit(result, *reference_fit(arrays, user_module, tmp_path, tf.distribute.get_strategy(),
                                              config.train_steps))


def test_loop_fit_trains_a_user_model_with_list_outputs_and_sample_weights(tmp_path, user_module):
    config, _ = _setup(tmp_path, user_module, loop="fit")
    fit_result = train(config)
    custom_result = train(run_config(tmp_path, **{**config.__dict__, "loop": "custom",
                                                   "model_dir": str(tmp_path / "custom")}))
    # --loop=fit is plain fit: the custom loop equals it here as above.
    assert_matches_fit(custom_result, {name: [record[name] for record in fit_result.history]
                                       for name in LOSS_NAMES | METRIC_NAMES}, fit_result.model.get_weights())


def test_python_builder_and_tf_data_dataset_train_like_the_same_model_from_flags(tmp_path, user_module):
    config, arrays = _setup(tmp_path, user_module)
    from_flags = train(config)
    # The same examples as a tf.data.Dataset of unbatched (inputs, labels, sample_weights) dicts.
    examples = tf.data.Dataset.from_tensor_slices((
        {"tokens": arrays["tokens"], "extra": arrays["extra"]},
        {"urgent": arrays["urgent"][:, None], "tags": arrays["tags"], "department": arrays["department"]},
        {"department": arrays["sample_weight/department"]}))
    # From Python a loss may also be a Keras object; mto_tf must not change the caller's object.
    logits_loss = keras.losses.BinaryCrossentropy(from_logits=True)
    from_python = train(run_config(tmp_path, **{**config.__dict__, "model": user_module.build, "dataset": examples,
                                                "losses": {**LOSSES, "urgent": logits_loss},
                                                "model_dir": str(tmp_path / "python")}))
    assert logits_loss.reduction == "sum_over_batch_size"
    assert max_weight_difference(from_python.model.get_weights(), from_flags.model.get_weights()) == 0.0
    assert [record["loss"] for record in from_python.history] == [record["loss"] for record in from_flags.history]
    saved = json.loads((tmp_path / "python" / "config.json").read_text())
    assert saved["model"] == f"{MODULE_NAME}:build" and saved["dataset"] == "python:_TensorSliceDataset"


@pytest.mark.parametrize("overrides, message", [
    (dict(model="no_such_module:build"), "^--model: cannot import module 'no_such_module'"),
    (dict(model=f"{MODULE_NAME}:missing"), f"^--model: module '{MODULE_NAME}' has no 'missing'"),
    (dict(model=f"{MODULE_NAME}:NOT_CALLABLE"), "^--model: .*NOT_CALLABLE' is a int, expected a function"),
    (dict(model=f"{MODULE_NAME}:broken"), f"^--model: {MODULE_NAME}:broken raised RuntimeError: the GPU is on fire"),
    (dict(model=f"{MODULE_NAME}:not_a_model"), "^--model: .*not_a_model returned a str, expected a keras.Model"),
    (dict(model=f"{MODULE_NAME}:one_output"), r"^--model: .*one_output returned a model with one output \['y'\]"),
    (dict(losses={"urgent": "binary_crossentropy", "tags": "mse"}), "^--losses: no entry for output 'department'"),
    (dict(losses={**LOSSES, "tags": f"{MODULE_NAME}:no_such_loss"}), f"^--losses: module '{MODULE_NAME}' has no"),
    (dict(loss_weights={"urgent": 1.0}), "^--loss_weights: no entry for output 'tags'"),
    (dict(metrics={"tags": ("accuracy", "precison")}), "^--metrics: output 'tags': Keras cannot make a metric"),
    (dict(lstm_units=8), "^--lstm_units: --model=ticket_model:build with --dataset=npz:.* does not read it"),
])
def test_bad_user_model_settings_name_the_flag_and_write_nothing(tmp_path, user_module, overrides, message):
    config, _ = _setup(tmp_path, user_module)
    with pytest.raises(ConfigError, match=message):
        train(run_config(tmp_path, **{**config.__dict__, **overrides}))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("corrupt, message", [
    (lambda a: a.pop("tags"), r"key 'tags': missing; model 'ticket_router' needs labels for output 'tags'"),
    (lambda a: a.update(tags=a["tags"][:, :3]),
     r"key 'tags': expected labels of per-example shape \(4,\) for output 'tags' \(or \(\) class ids\), got \(3,\)"),
    (lambda a: a.update(extra=a["extra"][:, None]), r"key 'extra': expected per-example shape \(3,\) for input"),
])
def test_npz_keys_are_checked_against_the_user_model(tmp_path, user_module, corrupt, message):
    config, arrays = _setup(tmp_path, user_module)
    corrupt(arrays)
    np.savez(tmp_path / "tickets.npz", **arrays)
    with pytest.raises(ConfigError, match="^--dataset: npz file .*tickets.npz', " + message):
        train(config)
    assert not (tmp_path / "run").exists()


def test_metric_functions_of_the_users_own_are_named_after_the_function_as_fit_names_them(tmp_path, user_module):
    config, arrays = _setup(tmp_path, user_module, metrics={"tags": (f"{MODULE_NAME}:worst_tag_error",)},
                            train_steps=1)
    result = train(config)
    # The step's metric sees the predictions of the initial weights, on the first batch.
    model = user_module.build()
    model.load_weights(tmp_path / "init.weights.h5")
    first_batch = {"tokens": arrays["tokens"][:BATCH_SIZE], "extra": arrays["extra"][:BATCH_SIZE]}
    predicted_tags = model.predict(first_batch, verbose=0)[OUTPUT_ORDER.index("tags")]
    expected = np.max(np.abs(arrays["tags"][:BATCH_SIZE] - predicted_tags), axis=-1).mean()
    # fit names a metric function by its __name__.
    assert result.history[0]["tags_worst_tag_error"] == pytest.approx(float(expected), rel=1e-5)


def test_command_line_trains_a_user_model_from_its_directory_with_json_losses_and_init_weights(tmp_path,
                                                                                              user_module):
    config, _ = _setup(tmp_path, user_module)
    losses = {**LOSSES, "tags": f"{MODULE_NAME}:tags_loss"}  # A loss function of the user's own.
    process = run_cli(f"--model={MODULE_NAME}:build", "--dataset=npz:tickets.npz", f"--losses={json.dumps(losses)}",
                      "--loss_weights=urgent=1,tags=0.5,department=0.3",
                      '--metrics={"department": ["accuracy"], "tags": "mae"}',
                      "--init_weights=init.weights.h5", "--model_dir=run", "--train_steps=4", "--log_every=2",
                      "--batch_size=16", cwd=tmp_path)
    assert process.returncode == 0, process.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert set(records[-1]) == LOSS_NAMES | {"step", "examples_per_sec", "department_accuracy", "tags_mae"}
    model = user_module.build()
    model.load_weights(tmp_path / "run" / "model.weights.h5")
    reloaded = keras.models.load_model(tmp_path / "run" / "model.keras")
    assert max_weight_difference(model.get_weights(), reloaded.get_weights()) == 0.0


@pytest.mark.parametrize("args, expected", [
    (["--model=no_such_module:build"], "mto-train: error: --model: cannot import module 'no_such_module'"),
    ([f"--model={MODULE_NAME}:broken"],
     f"mto-train: error: --model: {MODULE_NAME}:broken raised RuntimeError: the GPU is on fire"),
    ([f"--model={MODULE_NAME}:build", "--dataset=npz:tickets.npz", '--losses={"urgent": "binary_crossentropy",'
      ' "tags": {"class_name": "NoSuchLoss"}, "department": "mse"}'],
     "mto-train: error: --losses: output 'tags': Keras cannot make a loss of"),
])
def test_command_line_bad_user_model_is_one_line_exit_2_and_writes_nothing(tmp_path, user_module, args, expected):
    write_ticket_npz(tmp_path / "tickets.npz")
    # In this process, from the user's directory (a fresh process's exit status: test_cli).
    process = mto_train_in_process(*args, "--model_dir=never_written")
    assert process.returncode == 2 and expected in process.stderr, process.stderr[-2000:]
    assert "Traceback" not in process.stderr
    assert not (tmp_path / "never_written").exists()
