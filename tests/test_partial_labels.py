"""Real multi-task labels: each Keras loss reduction over the GLOBAL batch, and labels that are missing.

- Every reduction a loss can carry (`sum_over_batch_size`, its other name
  `mean`, `sum`, `mean_with_sample_weight`), with sample weights that zero
  90 % of one output's examples: the custom loop against `model.fit` on one
  device, fit written out here in plain Keras; per-step losses and final
  weights.
- `mean_with_sample_weight` (`--loss_reduction=mean_over_labelled`) where
  the labelled examples fall unevenly between replicas: two replicas and two
  workers against NumPy (a model differentiable by hand, below). Keras's
  mirrored `fit` divides each replica's sum by that replica's OWN sample
  weights (keras/src/losses/loss.py, `reduce_values`, then
  `scale_loss_for_distribution`): the same NumPy with that divisor is what
  it computes, and it ends elsewhere.
- `--missing_labels` (class id -1; NaN float labels): the same run as the
  same examples with sample weight 0; the metrics and validation values are
  those of the labelled examples alone; a NaN label NOT declared missing
  still stops the run (exit 3).

Both models live in a file of the user's (`MODELS_SOURCE`), so that the
command line and the worker processes can name them.
"""

import importlib
import json
import math
import re
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import (BATCH_SIZE, LOSS_RTOL, VALUE_RTOL, Launch, max_weight_difference, mto_train_in_process, once,
                     run_config)
from mto_tf import train

MODELS_MODULE = "partial_labels_models"
MODELS_SOURCE = '''
"""Two small two-output models, in a file of the user's; seeded, so every build starts from the same weights."""
import keras
import numpy as np

_RNG = np.random.default_rng(3)
# The linear model's initial weights: trunk W (3 x 4), and a head v (4 x 1) per output.
LINEAR_INITIAL = {"trunk": _RNG.normal(size=(3, 4)) * 0.5, "first": _RNG.normal(size=(4, 1)) * 0.5,
                  "second": _RNG.normal(size=(4, 1)) * 0.5}


def classifier():
    """Class ids 0..2 (softmax) and a binary flag (sigmoid), on one Dense trunk."""
    features = keras.Input(shape=(4,), name="features")
    trunk = keras.layers.Dense(8, activation="relu", name="trunk",
                               kernel_initializer=keras.initializers.GlorotUniform(seed=1))(features)
    kind = keras.layers.Dense(3, activation="softmax", name="kind",
                              kernel_initializer=keras.initializers.GlorotUniform(seed=2))(trunk)
    flag = keras.layers.Dense(1, activation="sigmoid", name="flag",
                              kernel_initializer=keras.initializers.GlorotUniform(seed=3))(trunk)
    return keras.Model({"features": features}, {"kind": kind, "flag": flag}, name="classifier")


def linear():
    """y_k = x W v_k, no biases: its gradients are written by hand in the tests."""
    features = keras.Input(shape=(3,), name="features")
    trunk = keras.layers.Dense(4, use_bias=False, name="trunk",
                               kernel_initializer=keras.initializers.Constant(LINEAR_INITIAL["trunk"]))(features)
    return keras.Model({"features": features}, {
        name: keras.layers.Dense(1, use_bias=False, name=name,
                                 kernel_initializer=keras.initializers.Constant(LINEAR_INITIAL[name]))(trunk)
        for name in ("first", "second")}, name="linear")
'''


def models():
    """The models' module, written once per test process into a directory put on sys.path; (module, directory)."""

    def write(directory):
        (directory / f"{MODELS_MODULE}.py").write_text(MODELS_SOURCE)
        sys.path.insert(0, str(directory))
        return importlib.import_module(MODELS_MODULE), directory

    return once("partial labels: the models' module", write)


# --- Each reduction against fit, on one device -----------------------------------------------------------------

REDUCTIONS = ("sum_over_batch_size", "mean", "sum", "mean_with_sample_weight")
CLASSIFIER_EXAMPLES = 80
# The flag's sample weights: 8 of the 80 examples labelled (90 % zeroed), unevenly weighted. The 6 global
# batches of 16 hold 2, 0, 4, 0, 2 and 2 of them (rows 0-15, ..., 64-79, then 0-15 again): a batch with no
# labelled flag divides 0 by 0, which Keras's divide_no_nan makes 0, and so must mto_tf.
FLAG_LABELLED = {3: 1.0, 7: 2.0, 37: 0.5, 40: 1.0, 41: 3.0, 45: 1.0, 70: 1.5, 77: 1.0}
CLASSIFIER_LOSS_WEIGHTS = {"kind": 1.0, "flag": 0.7}
CLASSIFIER_STEPS = 6
# SGD, not Adam: Adam's step hardly depends on the loss's scale, so `sum` (16 times the mean) would train
# almost as sum_over_batch_size does (measured 4e-5 apart with Adam) and hide a reduction not applied.
CLASSIFIER_LEARNING_RATE = 0.05
# One device: the custom step reduces with the same float32 operations as
# Keras's (sum(l * sw), then divide_no_nan by the batch's examples, by its
# weights' sum, or not at all) and takes gradients of the same graph;
# measured 0.0 for every reduction (losses and weights), and 1e-6 allows only
# float32 rounding of a few ulps, as the parity tests do.
SINGLE_DEVICE_WEIGHT_ATOL = 1e-6
# What a change of reduction moves the weights by in 6 SGD steps (measured
# 0.39 for `sum`, 0.027 for `mean_with_sample_weight`) is far above this;
# rounding far below.
DIFFERENT = 1e-4


def classifier_arrays():
    rng = np.random.default_rng(5)
    flag_weights = np.zeros(CLASSIFIER_EXAMPLES, np.float32)
    flag_weights[list(FLAG_LABELLED)] = list(FLAG_LABELLED.values())
    return {"features": rng.standard_normal((CLASSIFIER_EXAMPLES, 4)).astype(np.float32),
            "kind": rng.integers(0, 3, CLASSIFIER_EXAMPLES).astype(np.int32),
            "flag": rng.integers(0, 2, (CLASSIFIER_EXAMPLES, 1)).astype(np.float32),
            # Uneven, zeros included.
            "sample_weight/kind": rng.choice([0.0, 0.5, 1.0, 3.0], CLASSIFIER_EXAMPLES).astype(np.float32),
            "sample_weight/flag": flag_weights}


def classifier_npz():
    """The arrays, and the npz file holding them (written once per test process)."""

    def write(directory):
        arrays = classifier_arrays()
        np.savez(directory / "classifier.npz", **arrays)
        return arrays, directory / "classifier.npz"

    return once("partial labels: classifier data", write)


def keras_losses(reduction):
    return {"kind": keras.losses.SparseCategoricalCrossentropy(reduction=reduction),
            "flag": keras.losses.BinaryCrossentropy(reduction=reduction)}


def classifier_fit(reduction):
    """Plain Keras: compile with each loss carrying `reduction`, fit one step per epoch; (history, weights)."""

    arrays, _ = classifier_npz()  # Outside: `once` computes one thing at a time.
    classifier = models()[0].classifier

    def fit(_):
        model = classifier()
        model.compile(optimizer=keras.optimizers.SGD(CLASSIFIER_LEARNING_RATE), loss=keras_losses(reduction),
                      loss_weights=CLASSIFIER_LOSS_WEIGHTS)
        elements = ({"features": arrays["features"]}, {"kind": arrays["kind"], "flag": arrays["flag"]},
                    {name: arrays[f"sample_weight/{name}"] for name in ("kind", "flag")})
        dataset = tf.data.Dataset.from_tensor_slices(elements).repeat().batch(BATCH_SIZE, drop_remainder=True)
        history = model.fit(dataset, epochs=CLASSIFIER_STEPS, steps_per_epoch=1, shuffle=False, verbose=0)
        return history.history, model.get_weights()

    return once(("partial labels: classifier fit", reduction), fit)


@pytest.mark.parametrize("reduction", [reduction if reduction == "mean_with_sample_weight"
                                       else pytest.param(reduction, marks=pytest.mark.slow)
                                       for reduction in REDUCTIONS])
def test_each_keras_reduction_matches_fit_on_one_device_with_90_percent_of_one_output_unlabelled(
        tmp_path, reduction):
    _, npz = classifier_npz()
    # One loss a Python Loss object (its own reduction), the other a config as --losses takes it.
    losses = {"kind": keras_losses(reduction)["kind"],
              "flag": {"class_name": "BinaryCrossentropy", "config": {"reduction": reduction}}}
    result = train(run_config(tmp_path, model=models()[0].classifier, dataset=f"npz:{npz}", losses=losses,
                              loss_weights=CLASSIFIER_LOSS_WEIGHTS, metrics={}, optimizer="sgd",
                              learning_rate=CLASSIFIER_LEARNING_RATE, train_steps=CLASSIFIER_STEPS, progress="quiet"))
    history, fit_weights = classifier_fit(reduction)

    for name in ("loss", "kind_loss", "flag_loss"):
        np.testing.assert_allclose([record[name] for record in result.history], history[name], rtol=LOSS_RTOL,
                                   err_msg=name)
    assert max_weight_difference(result.model.get_weights(), fit_weights) <= SINGLE_DEVICE_WEIGHT_ATOL
    # The batch without a labelled flag: 0 under every reduction, not NaN (fit's own value too).
    for step in (2, 4):
        assert history["flag_loss"][step - 1] == 0.0 and result.history[step - 1]["flag_loss"] == 0.0
    # The reduction was applied: `sum` and `mean_with_sample_weight` train elsewhere than the default, and
    # `mean`, its other name, does not.
    _, default_fit_weights = classifier_fit("sum_over_batch_size")
    difference = max_weight_difference(result.model.get_weights(), default_fit_weights)
    if reduction in ("mean", "sum_over_batch_size"):
        assert difference <= SINGLE_DEVICE_WEIGHT_ATOL
    else:
        assert difference > DIFFERENT


# --- mean_over_labelled under two replicas and two workers, against NumPy ---------------------------------------
#
# The linear model y_k = x W v_k with squared error; under mean_with_sample_weight
#     L_k = sum_n c_n r_n^2,   r_n = y_k(x_n) - t_n,   c_n = sw_n / divisor_n,
#     dL_k/dW = x^T (2 c r) v_k^T,   dL_k/dv_k = (x W)^T (2 c r),
# where divisor_n is the sum of the sample weights over the GLOBAL batch (one
# device; mto_tf under every strategy), or, in Keras's mirrored fit, over n's
# own replica's slice times the R replicas; 0 gives c = 0 (divide_no_nan).

LINEAR_OUTPUTS = ("first", "second")
LINEAR_LOSS_WEIGHTS = {"first": 1.0, "second": 0.5}
LINEAR_EXAMPLES, LINEAR_STEPS, LINEAR_LEARNING_RATE = 32, 4, 0.1
# `second` is labelled (not NaN) on these rows. Each global batch of 16 splits
# into rows 0-7 | 8-15 and 16-23 | 24-31 on two replicas (or two workers):
# 1 | 6 labelled, then 5 | 0.
SECOND_LABELLED = [2, 8, 9, 10, 12, 13, 15, 16, 17, 19, 20, 22]
# 29 validation examples: a full batch (rows 0-7 | 8-15 on two replicas: 4 | 1 labelled), then a partial one
# (16-22 | 23-28: 3 | 1). Each value is one division over all 29, not a mean of the batches' values.
VALIDATION_EXAMPLES, VALIDATION_LABELLED = 29, [0, 2, 3, 5, 11, 17, 18, 20, 27]
# float32 training against a float64 reference over 4 steps: rounding only
# (measured 1.1e-7, mirrored and two workers alike; 2e-5 as in
# test_loss_weighting.py); a per-replica divisor moves the weights by 0.2.
NUMPY_WEIGHT_ATOL = 2e-5
# Keras's per-replica divisor against the global one, after the 4 steps: measured 0.198; rounding is 1e-7.
PER_REPLICA_GAP = 1e-2


def linear_arrays(num_examples, labelled, seed):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(num_examples, 3)).astype(np.float32)
    second = features @ [[-1.0], [1.5], [0.5]] + 1.0 + 0.1 * rng.normal(size=(num_examples, 1))
    second[np.setdiff1d(np.arange(num_examples), labelled)] = np.nan  # No label.
    # Weights 2 on each batch's first half and 0.5 on its second, three of them 0: the halves weigh unevenly.
    first_weights = np.where(np.arange(num_examples) % BATCH_SIZE < BATCH_SIZE // 2, 2.0, 0.5)
    first_weights[[3, 11, num_examples - 5]] = 0.0
    return {"features": features, "first": (features @ [[1.0], [-2.0], [0.5]]).astype(np.float32),
            "second": second.astype(np.float32), "sample_weight/first": first_weights.astype(np.float32)}


def linear_npz():
    """(training arrays, validation arrays, directory holding train.npz and validation.npz), written once."""

    def write(directory):
        arrays = linear_arrays(LINEAR_EXAMPLES, SECOND_LABELLED, seed=11)
        validation = linear_arrays(VALIDATION_EXAMPLES, VALIDATION_LABELLED, seed=12)
        np.savez(directory / "train.npz", **arrays)
        np.savez(directory / "validation.npz", **validation)
        return arrays, validation, directory

    return once("partial labels: linear data", write)


def targets_and_weights(arrays, name, rows):
    """Output `name`'s labels (NaN: 0) and sample weights (a NaN label: 0) on `rows`, in float64."""
    labels = arrays[name][rows].astype(np.float64)
    weights = arrays.get(f"sample_weight/{name}", np.ones(len(arrays[name]), np.float32))[rows].astype(np.float64)
    missing = np.isnan(labels[:, 0])
    return np.where(missing[:, None], 0.0, labels), np.where(missing, 0.0, weights)


def coefficients(sample_weights, replicas):
    """Each example's sw / divisor: the global batch's weight sum (replicas=1), or its replica slice's times R."""
    slices = sample_weights.reshape(replicas, -1)
    divisors = np.broadcast_to(slices.sum(axis=1, keepdims=True) * replicas, slices.shape)
    return np.divide(slices, divisors, out=np.zeros_like(slices), where=divisors > 0).ravel()


def numpy_mean_over_labelled(*, replicas):
    """SGD on the linear model over the global batches in file order, in float64 (computed once).

    Returns each step's losses and metrics (before its update, as a step
    logs them) and the final weights `{trunk, first, second}`.
    """
    arrays, _, _ = linear_npz()  # Outside: `once` computes one thing at a time.
    initial = models()[0].LINEAR_INITIAL

    def compute(_):
        weights = {name: np.array(value) for name, value in initial.items()}
        records = []
        for step in range(LINEAR_STEPS):
            rows = (step * BATCH_SIZE + np.arange(BATCH_SIZE)) % LINEAR_EXAMPLES
            x = arrays["features"][rows].astype(np.float64)
            hidden = x @ weights["trunk"]
            record, trunk_gradient, head_gradients = {"loss": 0.0}, 0.0, {}
            for name in LINEAR_OUTPUTS:
                targets, sample_weights = targets_and_weights(arrays, name, rows)
                residuals = hidden @ weights[name] - targets
                c = coefficients(sample_weights, replicas)[:, None]
                record[f"{name}_loss"] = float(np.sum(c * residuals ** 2))
                record["loss"] += LINEAR_LOSS_WEIGHTS[name] * record[f"{name}_loss"]
                # Metrics weighted by the sample weights (Keras's weighted_metrics): an unlabelled example skipped.
                record[f"{name}_mae"] = float(np.sum(sample_weights[:, None] * np.abs(residuals))
                                              / np.sum(sample_weights))
                upstream = 2 * LINEAR_LOSS_WEIGHTS[name] * c * residuals  # d loss / d y_k.
                trunk_gradient = trunk_gradient + x.T @ upstream @ weights[name].T
                head_gradients[name] = hidden.T @ upstream
            records.append(record)
            weights["trunk"] = weights["trunk"] - LINEAR_LEARNING_RATE * trunk_gradient
            for name in LINEAR_OUTPUTS:
                weights[name] = weights[name] - LINEAR_LEARNING_RATE * head_gradients[name]
        return records, weights

    return once(("partial labels: numpy", replicas), compute)


def numpy_validation(weights):
    """Each validation value over all the examples at once: sum(sw r^2) / sum(sw), and sum(sw |r|) / sum(sw)."""
    _, validation, _ = linear_npz()
    rows = np.arange(VALIDATION_EXAMPLES)
    hidden = validation["features"].astype(np.float64) @ weights["trunk"]
    values = {"val_loss": 0.0}
    for name in LINEAR_OUTPUTS:
        targets, sample_weights = targets_and_weights(validation, name, rows)
        residuals = (hidden @ weights[name] - targets)[:, 0]
        values[f"val_{name}_loss"] = float(np.sum(sample_weights * residuals ** 2) / np.sum(sample_weights))
        values["val_loss"] += LINEAR_LOSS_WEIGHTS[name] * values[f"val_{name}_loss"]
        values[f"val_{name}_mae"] = float(np.sum(sample_weights * np.abs(residuals)) / np.sum(sample_weights))
    return values


def linear_flags(directory, *, missing_labels=True):
    """The linear run as a command line: mean over labelled, NaN = no label, validated once at the end."""
    return [f"--model={MODELS_MODULE}:linear", f"--dataset=npz:{directory / 'train.npz'}",
            f"--validation_data=npz:{directory / 'validation.npz'}", "--losses=first=mse,second=mse",
            "--loss_weights=first=1.0,second=0.5", "--metrics=first=mae,second=mae",
            *(["--loss_reduction=mean_over_labelled", "--missing_labels=second=nan"] if missing_labels else []),
            f"--batch_size={BATCH_SIZE}", "--optimizer=sgd", f"--learning_rate={LINEAR_LEARNING_RATE}",
            f"--train_steps={LINEAR_STEPS}", "--steps_per_loop=1", "--log_every=1", "--progress=quiet"]


def linear_weights(model) -> dict:
    return {name: model.get_layer(name).kernel.numpy() for name in ("trunk", *LINEAR_OUTPUTS)}


def saved_linear_weights(model_dir) -> dict:
    model = models()[0].linear()
    model.load_weights(Path(model_dir) / "model.weights.h5")
    return linear_weights(model)


def records_of(model_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(model_dir) / "metrics.jsonl").read_text().splitlines()]


def weight_difference(weights, reference) -> float:
    return max(float(np.max(np.abs(weights[name] - reference[name]))) for name in reference)


def assert_steps_and_validation_equal_numpy(records, final_weights):
    """Each step's losses and metrics, and the last record's validation values, against NumPy (float32: 1e-5)."""
    expected, numpy_weights = numpy_mean_over_labelled(replicas=1)
    assert [record["step"] for record in records] == list(range(1, LINEAR_STEPS + 1))
    for record, numpy_record in zip(records, expected, strict=True):
        for name, value in numpy_record.items():
            np.testing.assert_allclose(record[name], value, rtol=VALUE_RTOL, err_msg=f"step {record['step']} {name}")
    for name, value in numpy_validation(numpy_weights).items():
        np.testing.assert_allclose(records[-1][name], value, rtol=VALUE_RTOL, err_msg=name)
    assert weight_difference(final_weights, numpy_weights) <= NUMPY_WEIGHT_ATOL


def linear_fit(strategy):
    """Keras's fit of the linear model with mean_with_sample_weight (NaN labels given as sample weight 0)."""
    arrays, _, _ = linear_npz()
    rows = np.arange(LINEAR_EXAMPLES)
    labels_and_weights = {name: targets_and_weights(arrays, name, rows) for name in LINEAR_OUTPUTS}
    elements = ({"features": arrays["features"]},
                {name: labels.astype(np.float32) for name, (labels, _) in labels_and_weights.items()},
                {name: weights.astype(np.float32) for name, (_, weights) in labels_and_weights.items()})
    dataset = tf.data.Dataset.from_tensor_slices(elements).repeat().batch(BATCH_SIZE, drop_remainder=True)
    with strategy.scope():
        model = models()[0].linear()
        model.compile(optimizer=keras.optimizers.SGD(LINEAR_LEARNING_RATE),
                      loss={name: keras.losses.MeanSquaredError(reduction="mean_with_sample_weight")
                            for name in LINEAR_OUTPUTS}, loss_weights=LINEAR_LOSS_WEIGHTS)
    model.fit(dataset, epochs=LINEAR_STEPS, steps_per_epoch=1, shuffle=False, verbose=0)
    return linear_weights(model)


@pytest.mark.slow
@pytest.mark.keras_behaviour
def test_mean_over_labelled_under_mirrored_equals_numpy_where_mirrored_fit_divides_per_replica(
        tmp_path, mirrored_strategy):
    _, _, directory = linear_npz()
    # The same run as the command line's (--missing_labels=second=nan, --loss_reduction=mean_over_labelled).
    result = train(run_config(
        tmp_path, model=models()[0].linear, dataset=f"npz:{directory / 'train.npz'}",
        validation_data=f"npz:{directory / 'validation.npz'}", losses={name: "mse" for name in LINEAR_OUTPUTS},
        loss_weights=LINEAR_LOSS_WEIGHTS, metrics={name: ("mae",) for name in LINEAR_OUTPUTS},
        loss_reduction="mean_over_labelled", missing_labels={"second": math.nan}, learning_rate=LINEAR_LEARNING_RATE,
        train_steps=LINEAR_STEPS, progress="quiet", strategy="mirrored", num_cpu_devices=2),
        strategy=mirrored_strategy)
    mirrored = linear_weights(result.model)
    assert_steps_and_validation_equal_numpy(result.history, mirrored)

    # Keras's mirrored fit is the NumPy with a divisor per replica (measured 2e-7 apart) ...
    _, per_replica = numpy_mean_over_labelled(replicas=2)
    mirrored_fit = linear_fit(mirrored_strategy)
    assert weight_difference(mirrored_fit, per_replica) <= NUMPY_WEIGHT_ATOL
    # ... another training: in the first batch 1 labelled example weighs as much as the other replica's 6, and
    # in the second the replica without any halves the other's mean. mto_tf under mirrored is not that one.
    assert weight_difference(mirrored, per_replica) > PER_REPLICA_GAP
    assert weight_difference(mirrored, mirrored_fit) > PER_REPLICA_GAP


@pytest.mark.slow
@pytest.mark.xdist_group("multi_worker")  # One launch on 127.0.0.1 at a time, with test_multi_worker.py's.
def test_mean_over_labelled_and_missing_labels_under_two_workers_equal_numpy(tmp_path, monkeypatch):
    _, _, directory = linear_npz()
    _, module_directory = models()
    monkeypatch.setenv("PYTHONPATH", str(module_directory))
    model_dir = tmp_path / "run"
    # Each worker one replica: a global batch's rows 0-7 on worker 0, 8-15 on worker 1.
    launch = Launch(*linear_flags(directory), f"--model_dir={model_dir}", f"--checkpoint_every={LINEAR_STEPS}",
                    base_flags=["--strategy=multi_worker"])
    assert launch.wait() == 0, launch.output[-4000:]
    assert "2 replica(s)" in launch.output
    found = re.findall(r"\[worker (\d)\] .*Final weights fingerprint: (\w+)", launch.output)
    assert sorted(worker for worker, _ in found) == ["0", "1"] and found[0][1] == found[1][1]
    assert_steps_and_validation_equal_numpy(records_of(model_dir), saved_linear_weights(model_dir))


@pytest.mark.slow
def test_mean_over_labelled_from_the_command_line_equals_numpy_and_loop_fit_equals_it(tmp_path):
    _, _, directory = linear_npz()
    models()  # Its directory on sys.path: --model=partial_labels_models:linear imports it.
    custom = mto_train_in_process(*linear_flags(directory), f"--model_dir={tmp_path / 'custom'}")
    assert custom.returncode == 0, custom.stderr[-3000:]
    custom_weights = saved_linear_weights(tmp_path / "custom")
    assert_steps_and_validation_equal_numpy(records_of(tmp_path / "custom"), custom_weights)

    fit = mto_train_in_process(*linear_flags(directory), "--loop=fit", f"--model_dir={tmp_path / 'fit'}")
    assert fit.returncode == 0, fit.stderr[-3000:]
    # Keras's loss objects compiled with mean_with_sample_weight, on one device: the same float32 operations.
    assert weight_difference(saved_linear_weights(tmp_path / "fit"), custom_weights) <= SINGLE_DEVICE_WEIGHT_ATOL
    # (Not the validation values: fit's evaluate averages each batch's mean over the labelled, weighted by the
    # batch's examples; nor the metrics: compile's ignore sample weights, so they count the missing labels.)
    for fit_record, custom_record in zip(records_of(tmp_path / "fit"), records_of(tmp_path / "custom"), strict=True):
        for name in ("loss", "first_loss", "second_loss"):
            np.testing.assert_allclose(fit_record[name], custom_record[name], rtol=LOSS_RTOL, err_msg=name)


def test_a_nan_label_not_declared_missing_still_stops_the_run_with_status_3(tmp_path):
    _, _, directory = linear_npz()
    models()  # Its directory on sys.path: --model=partial_labels_models:linear imports it.
    model_dir = tmp_path / "run"
    process = mto_train_in_process(*linear_flags(directory, missing_labels=False), f"--model_dir={model_dir}")
    assert process.returncode == 3, process.stderr[-3000:]
    assert re.search(r"mto-train: error: .*second_loss.* not finite in .*step 1\b", process.stderr), process.stderr
    assert not (model_dir / "model.weights.h5").exists()


# --- --missing_labels: the same as sample weight 0 ---------------------------------------------------------------

# Class id -1 means "no kind"; NaN means "no flag". The flag also has sample weights of its own (multiplied).
KIND_MISSING = [1, 4, 5, 9, 14, 18, 23, 26, 30]  # Of 32 training examples: about 30 % unlabelled.
FLAG_MISSING = [0, 2, 5, 6, 12, 13, 21, 27, 31]
# Of 21 validation examples: batches of 16 and 5.
VALIDATION_KIND_MISSING, VALIDATION_FLAG_MISSING = [0, 3, 4, 8, 10, 17, 20], [1, 3, 7, 9, 16, 18]


def missing_label_arrays(num_examples, kind_missing, flag_missing, seed):
    """(arrays with -1 and NaN labels, the same examples with label 0 and sample weight 0 there)."""
    rng = np.random.default_rng(seed)
    flag_weights = rng.choice([0.5, 1.0, 2.0], num_examples).astype(np.float32)
    with_missing = {"features": rng.standard_normal((num_examples, 4)).astype(np.float32),
                    "kind": rng.integers(0, 3, num_examples).astype(np.int32),
                    "flag": rng.integers(0, 2, (num_examples, 1)).astype(np.float32),
                    "sample_weight/flag": flag_weights}
    with_missing["kind"][kind_missing] = -1
    with_missing["flag"][flag_missing] = np.nan
    kind_weights = np.ones(num_examples, np.float32)
    kind_weights[kind_missing] = 0.0
    flag_weights = flag_weights.copy()
    flag_weights[flag_missing] = 0.0
    as_weights = {**with_missing, "kind": np.where(with_missing["kind"] < 0, 0, with_missing["kind"]),
                  "flag": np.nan_to_num(with_missing["flag"], nan=0.0),
                  "sample_weight/kind": kind_weights, "sample_weight/flag": flag_weights}
    return with_missing, as_weights


def test_missing_class_ids_and_nan_labels_train_as_sample_weight_0_and_metrics_and_validation_skip_them(tmp_path):
    classifier = models()[0].classifier
    runs = {}
    train_arrays = missing_label_arrays(32, KIND_MISSING, FLAG_MISSING, seed=23)
    validation_arrays = missing_label_arrays(21, VALIDATION_KIND_MISSING, VALIDATION_FLAG_MISSING, seed=22)
    for index, run in enumerate(("missing", "as_weights")):
        np.savez(tmp_path / f"{run}.npz", **train_arrays[index])
        np.savez(tmp_path / f"{run}_validation.npz", **validation_arrays[index])
        runs[run] = train(run_config(
            tmp_path / run, model=classifier, dataset=f"npz:{tmp_path / f'{run}.npz'}",
            validation_data=f"npz:{tmp_path / f'{run}_validation.npz'}",
            losses={"kind": "sparse_categorical_crossentropy", "flag": "binary_crossentropy"},
            metrics={"kind": ("accuracy",), "flag": ("binary_accuracy",)},
            missing_labels={"kind": -1, "flag": math.nan} if run == "missing" else {}, train_steps=4,
            progress="quiet"))
    missing, as_weights = runs["missing"], runs["as_weights"]
    # And from Python: the same examples as a tf.data.Dataset of (inputs, labels, sample_weights) dicts.
    arrays = train_arrays[0]
    python_dataset = tf.data.Dataset.from_tensor_slices(
        ({"features": arrays["features"]}, {"kind": arrays["kind"], "flag": arrays["flag"]},
         {"flag": arrays["sample_weight/flag"]}))
    from_python = train(run_config(
        tmp_path / "python", model=classifier, dataset=python_dataset,
        losses={"kind": "sparse_categorical_crossentropy", "flag": "binary_crossentropy"},
        metrics={"kind": ("accuracy",), "flag": ("binary_accuracy",)},
        missing_labels={"kind": -1, "flag": math.nan}, train_steps=4, progress="quiet"))

    # The same tensors reach the step: label 0 and weight 0 where missing (the flag's own weights times 1
    # elsewhere). The same run, bit for bit: weights, losses, metrics and validation values.
    for a, b, c in zip(missing.model.get_weights(), as_weights.model.get_weights(), from_python.model.get_weights(),
                       strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(c, b)
    for a, b in zip(missing.history, as_weights.history, strict=True):
        assert {name: value for name, value in a.items() if name != "examples_per_sec"} == \
               {name: value for name, value in b.items() if name != "examples_per_sec"}

    # Step 1 (rows 0-15, the initial weights) and the validation (all 21, the final weights) against Keras's
    # metrics weighted by the sample weights, which skip the unlabelled examples (weight 0). They differ from
    # the unweighted values over every example (the missing ones read as class 0 or flag 0), so skipping shows.
    def expected(model, arrays, rows, prefix):
        with_missing = arrays[0]
        predictions = model.predict({"features": with_missing["features"][rows]}, verbose=0)
        kind, flag = with_missing["kind"][rows], with_missing["flag"][rows]
        kind_labelled, flag_labelled = kind >= 0, ~np.isnan(flag[:, 0])
        flag_weights = with_missing["sample_weight/flag"][rows] * flag_labelled
        kind_losses = keras.losses.sparse_categorical_crossentropy(np.maximum(kind, 0), predictions["kind"]).numpy()
        flag_losses = keras.losses.binary_crossentropy(np.nan_to_num(flag), predictions["flag"]).numpy()

        def metric(make, labels, outputs, weights=None):
            measured = make()
            measured.update_state(labels, outputs, sample_weight=weights)
            return float(measured.result())

        kind_accuracy = metric(keras.metrics.SparseCategoricalAccuracy, np.maximum(kind, 0), predictions["kind"],
                               kind_labelled.astype(np.float32))
        flag_accuracy = metric(keras.metrics.BinaryAccuracy, np.nan_to_num(flag), predictions["flag"],
                               flag_weights[:, None])
        assert kind_accuracy != metric(keras.metrics.SparseCategoricalAccuracy, np.maximum(kind, 0),
                                       predictions["kind"])
        assert flag_accuracy != metric(keras.metrics.BinaryAccuracy, np.nan_to_num(flag), predictions["flag"])
        return {f"{prefix}kind_loss": float(np.sum(kind_losses * kind_labelled) / len(rows)),
                f"{prefix}flag_loss": float(np.sum(flag_losses * flag_weights) / len(rows)),
                f"{prefix}kind_accuracy": kind_accuracy, f"{prefix}flag_binary_accuracy": flag_accuracy}

    # Keras's functions in float32, summed in another order: rounding only (measured 1.4e-7 at most).

    initial = classifier()
    for name, value in expected(initial, train_arrays, np.arange(BATCH_SIZE), "").items():
        np.testing.assert_allclose(missing.history[0][name], value, rtol=VALUE_RTOL, err_msg=name)
    for name, value in expected(missing.model, validation_arrays, np.arange(21), "val_").items():
        np.testing.assert_allclose(missing.history[-1][name], value, rtol=VALUE_RTOL, err_msg=name)
