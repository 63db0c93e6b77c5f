"""Loss weights that change (a Keras schedule, `LossWeightScheduler`) and extra loss terms (`--extra_losses`).

Each reference is written out here in plain Keras or plain TensorFlow: a
schedule of weights against `fit` run in constant-weight segments; an extra
term against a GradientTape step written by hand; with `upgrad`, against the
Gramian of gradients taken by hand and the method's formula in NumPy.

Per-step values: runs log every step (`log_every=1`) unless a test says otherwise.
"""

import dataclasses
import importlib
import json
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import (BATCH_SIZE, HEADLINE, LOSS_RTOL, SMALL_FLAGS, VALUE_RTOL, data_dir, max_weight_difference,
                     mto_train_in_process, once, run_config, shared_npz_and_init_weights, small_config, write_npz)
import mto_tf
from mto_tf import LossWeightScheduler, train
from mto_tf.core.models import build_headline
from mto_tf.programs import explain
from test_loss_weighting import numpy_upgrad  # UPGrad in NumPy, over every set of active constraints.

OUTPUTS = ("aux_output", "main_output")  # A dict model's outputs, sorted as Keras sorts them.
STEPS = 6
# The auxiliary weight: BEFORE for the first SWITCH steps, AFTER for the rest. Keras's PiecewiseConstantDecay
# gives values[0] while step <= boundaries[0], and the weights are read at optimizer.iterations (0 at the first
# step), so boundary SWITCH - 1 switches after SWITCH steps.
BEFORE, AFTER, SWITCH = 0.2, 1.5, 3
PIECEWISE = {"class_name": "PiecewiseConstantDecay", "config": {"boundaries": [SWITCH - 1], "values": [BEFORE, AFTER]}}
ADAM = dict(optimizer="adam", learning_rate=0.01)  # Slots and a step count: what a segment must carry over.
# The custom step and fit perform the same float32 operations (as in test_parity_with_fit, measured 0.0 there):
# the bound allows float32 rounding of a few ulps only.
WEIGHT_ATOL = 1e-6


def _shared_data(tmp_path):
    """The npz file (72 examples) and the small headline's initial weights, made once per test process."""
    directory, arrays = shared_npz_and_init_weights(("changing weights and extra terms",), small_config(tmp_path))
    return directory / "data.npz", str(directory / "init.weights.h5"), arrays


def _batches(arrays):
    """The npz examples in file order, in full batches, across passes: as the custom loop reads them."""
    inputs = {"main_input": arrays["main_input"].astype("int32"), "aux_input": arrays["aux_input"]}
    labels = {name: arrays[name].reshape(-1, 1) for name in OUTPUTS}
    return tf.data.Dataset.from_tensor_slices((inputs, labels)).repeat().batch(BATCH_SIZE, drop_remainder=True)


def _records(model_dir):
    return [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]


# --- A schedule of loss weights -------------------------------------------------------------------------------


def _scheduled_run(tmp_path):
    """The custom loop with the auxiliary weight a PiecewiseConstantDecay (JSON form); made once per test process.

    Returns its metrics.jsonl records and final weights.
    """
    npz, init_weights, _ = _shared_data(tmp_path)

    def run(directory):
        result = train(small_config(directory, dataset=f"npz:{npz}", init_weights=init_weights, train_steps=STEPS,
                                    loss_weights={"main_output": 1.0, "aux_output": PIECEWISE}, **ADAM))
        return _records(directory / "run"), result.model.get_weights()

    return once(("piecewise schedule run",), run)


def _two_fit_calls(arrays, init_weights, config):
    """`fit` with the auxiliary weight BEFORE for SWITCH steps, then recompiled with AFTER for the rest.

    Exactly the schedule's run, because `compile` keeps the optimizer object
    it is given: the second call's Adam continues with the first's step
    count (its bias correction) and slots, and only the loss weights change.
    The second call reads the batches after the first call's (a new `fit`
    starts a new iterator). Returns the per-step logs, the final weights and
    the optimizer's step count.
    """
    model = build_headline(config)
    model.load_weights(init_weights)
    optimizer = keras.optimizers.Adam(learning_rate=config.learning_rate)
    logs = {}
    for weight, batches, steps in ((BEFORE, _batches(arrays), SWITCH),
                                   (AFTER, _batches(arrays).skip(SWITCH), STEPS - SWITCH)):
        model.compile(optimizer=optimizer, loss=dict(HEADLINE.losses),
                      loss_weights={"main_output": 1.0, "aux_output": weight})
        # One step per epoch: fit's epoch logs are per-step values.
        history = model.fit(batches, epochs=steps, steps_per_epoch=1, shuffle=False, verbose=0).history
        for name, values in history.items():
            logs.setdefault(name, []).extend(values)
    return logs, model.get_weights(), int(optimizer.iterations)


def test_a_piecewise_constant_schedule_equals_two_fit_calls_with_its_two_weights(tmp_path):
    records, weights = _scheduled_run(tmp_path)
    _, init_weights, arrays = _shared_data(tmp_path)
    fit_logs, fit_weights, fit_steps = _two_fit_calls(arrays, init_weights, small_config(tmp_path, **ADAM))
    assert fit_steps == STEPS  # One optimizer through both calls.

    # The weight in force at each step, as metrics.jsonl logs it for `fixed` when a weight is a schedule (the
    # float32 value: 0.2 to 1e-7).
    assert [record["step"] for record in records] == list(range(1, STEPS + 1))
    assert [record["loss_weight/aux_output"] for record in records] == pytest.approx(
        [BEFORE] * SWITCH + [AFTER] * (STEPS - SWITCH), rel=1e-7)
    assert [record["loss_weight/main_output"] for record in records] == [1.0] * STEPS
    # Per step, the same losses as fit's; the total weighs by the weight in force (a step off at the switch
    # would put (AFTER - BEFORE) * aux_output_loss, about 1, into one step's loss).
    for name in ("loss", "main_output_loss", "aux_output_loss"):
        np.testing.assert_allclose([record[name] for record in records], fit_logs[name], rtol=LOSS_RTOL,
                                   err_msg=name)
    assert max_weight_difference(weights, fit_weights) <= WEIGHT_ATOL


@pytest.mark.slow  # Inner loop: the scheduler from Python, bit-identical to the schedule's run.
def test_a_run_resumed_mid_schedule_ends_bit_identical_to_the_uninterrupted_one(tmp_path):
    uninterrupted_records, uninterrupted_weights = _scheduled_run(tmp_path)
    npz, init_weights, _ = _shared_data(tmp_path)
    # From Python, the schedule object: the same schedule as the JSON config of the uninterrupted run.
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([SWITCH - 1], [BEFORE, AFTER])
    config = small_config(tmp_path, dataset=f"npz:{npz}", init_weights=init_weights, train_steps=SWITCH - 1,
                          loss_weights={"main_output": 1.0, "aux_output": schedule}, **ADAM)
    train(config)  # Stops before the switch, with a checkpoint.
    resumed = train(dataclasses.replace(config, train_steps=STEPS))
    # The same ops on the same batches in the same order, the optimizer's step (which the schedule reads)
    # restored with its slots: bit for bit.
    for whole, split in zip(uninterrupted_weights, resumed.model.get_weights(), strict=True):
        np.testing.assert_array_equal(split, whole)
    records = _records(tmp_path / "run")
    assert [record["step"] for record in records] == list(range(1, STEPS + 1))
    for whole, split in zip(uninterrupted_records, records, strict=True):
        for name in ("loss", "aux_output_loss", "loss_weight/aux_output"):
            assert split[name] == whole[name], (split["step"], name)


def test_loss_weight_scheduler_from_python_sets_each_epochs_weight_as_the_schedule_sets_each_step(tmp_path):
    _, scheduled_weights = _scheduled_run(tmp_path)
    npz, init_weights, _ = _shared_data(tmp_path)
    seen = []

    def schedule(epoch, weights):
        seen.append((epoch, weights))
        return {"aux_output": (BEFORE, AFTER)[epoch]}

    # An epoch is a logging window: SWITCH steps each.
    config = small_config(tmp_path, dataset=f"npz:{npz}", init_weights=init_weights, train_steps=STEPS,
                          log_every=SWITCH, loss_weights={"main_output": 1.0, "aux_output": BEFORE}, **ADAM)
    result = train(config, callbacks=[LossWeightScheduler(schedule)])

    assert [epoch for epoch, _ in seen] == [0, 1]
    assert seen[0][1] == pytest.approx({"aux_output": BEFORE, "main_output": 1.0}, rel=1e-7)  # float32 of 0.2.
    # Logged as for a schedule (LossWeightScheduler says it sets them): each window's mean of its steps' weights
    # (a float32 sum of three, divided by three: rounding only).
    assert [record["loss_weight/aux_output"] for record in result.history] == pytest.approx([BEFORE, AFTER],
                                                                                            rel=1e-6)
    assert [record["loss_weight/main_output"] for record in result.history] == [1.0, 1.0]
    # The same float32 weight at every step as the schedule's: the same run, bit for bit (how often a run
    # logs changes nothing it trains).
    for scheduled, set_by_callback in zip(scheduled_weights, result.model.get_weights(), strict=True):
        np.testing.assert_array_equal(set_by_callback, scheduled)
    # The weights are variables a callback may set, and the run's checkpoint holds them.
    variables = mto_tf.loss_weight_variables(result.model)
    assert {name: float(variable.numpy()) for name, variable in variables.items()} == pytest.approx(
        {"aux_output": AFTER, "main_output": 1.0}, rel=1e-7)
    checkpoint = tf.train.load_checkpoint(str(tmp_path / "run" / "checkpoints"))
    saved = {name: float(checkpoint.get_tensor(f"loss_weights/weights/{name}/.ATTRIBUTES/VARIABLE_VALUE"))
             for name in OUTPUTS}
    assert saved == pytest.approx({"aux_output": AFTER, "main_output": 1.0}, rel=1e-7)


# --- What a user writes, in a file of their own ------------------------------------------------------------------

USER_MODULE = "changing_weights_user_code"  # A name no other test module uses (modules are cached by name).
USER_SOURCE = textwrap.dedent('''
    """A consistency term between the two heads, a callback that anneals a weight, and functions that are wrong."""
    import keras

    import mto_tf


    def consistency(labels, predictions, sample_weights):
        """Per example: the squared difference between the main and the auxiliary prediction."""
        return keras.ops.sum(keras.ops.square(predictions["main_output"] - predictions["aux_output"]), axis=-1)


    def halve_the_aux_weight_each_epoch():
        """From the weight in force, not the epoch: a resumed run must restore it to go on."""
        return [mto_tf.LossWeightScheduler(lambda epoch, weights: {"aux_output": weights["aux_output"] / 2})]


    def two_arguments(labels, predictions):
        return keras.ops.square(predictions["main_output"] - predictions["aux_output"])[:, 0]


    def a_value_per_element(labels, predictions, sample_weights):
        return keras.ops.square(predictions["main_output"] - predictions["aux_output"])  # (batch, 1)


    def one_number(labels, predictions, sample_weights):
        return keras.ops.mean(keras.ops.square(predictions["main_output"] - predictions["aux_output"]))


    def weighted_by_main(labels, predictions, sample_weights):
        """Reads the main output's sample weights: synthetic_headlines has none."""
        return sample_weights["main_output"] * consistency(labels, predictions, sample_weights)
''')


def _user_module(tmp_path, monkeypatch):
    """The user's file, importable as the command line imports MODULE:FUNCTION."""
    (tmp_path / f"{USER_MODULE}.py").write_text(USER_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return importlib.import_module(USER_MODULE)


@pytest.mark.slow  # Three runs, two of them through the command line; inner loop: the scheduler from Python.
def test_loss_weight_scheduler_from_the_command_line_resumed_mid_schedule_ends_bit_identical(tmp_path, monkeypatch):
    # Four epochs (windows) of 2 steps; the first run stops after two, the second resumes in a new run. The
    # callback halves the weight in force: only a restored weight variable gives 0.025 in the third epoch.
    # The --extra_losses term is trained, logged and resumed with it.
    user_code = _user_module(tmp_path, monkeypatch)
    whole = train(small_config(tmp_path, train_steps=8, log_every=2, model_dir=str(tmp_path / "whole"),
                               extra_losses={"consistency": user_code.consistency}, **ADAM),
                  callbacks=user_code.halve_the_aux_weight_each_epoch())

    flags = [*SMALL_FLAGS, f"--data_dir={data_dir()}", f"--model_dir={tmp_path / 'resumed'}", "--optimizer=adam",
             "--learning_rate=0.01", "--log_every=2", "--progress=quiet",
             f"--callbacks={USER_MODULE}:halve_the_aux_weight_each_epoch",
             f"--extra_losses=consistency={USER_MODULE}:consistency"]
    for train_steps in (4, 8):
        process = mto_train_in_process(*flags, f"--train_steps={train_steps}")
        assert process.returncode == 0, process.stderr[-3000:]

    records = _records(tmp_path / "resumed")
    assert [record["step"] for record in records] == [2, 4, 6, 8]
    assert [record["loss_weight/aux_output"] for record in records] == pytest.approx(
        [0.2 / 2 ** epoch for epoch in range(1, 5)], rel=1e-6)
    assert [record["loss_weight/consistency"] for record in records] == [1.0] * 4  # An extra term's default.
    assert all(record["consistency_loss"] > 0 for record in records)
    # The same numbers in every window as the uninterrupted run's (the first run's evaluation at step 4 adds
    # val_ values to that record only), and the same weights, bit for bit.
    for uninterrupted, split in zip(whole.history, records, strict=True):
        for name in ("loss", "aux_output_loss", "main_output_loss", "consistency_loss", "loss_weight/aux_output"):
            assert split[name] == uninterrupted[name], (split["step"], name)
    resumed_model = build_headline(small_config(tmp_path))
    resumed_model.load_weights(tmp_path / "resumed" / "model.weights.h5")
    for uninterrupted, split in zip(whole.model.get_weights(), resumed_model.get_weights(), strict=True):
        np.testing.assert_array_equal(split, uninterrupted)


# --- An extra loss term --------------------------------------------------------------------------------------------

TERM_WEIGHTS = {"aux_output": 0.2, "main_output": 1.0, "consistency": 2.0}


def consistency(labels, predictions, sample_weights):
    """Per example: the squared difference between the main and the auxiliary prediction."""
    return tf.reduce_sum(tf.square(predictions["main_output"] - predictions["aux_output"]), axis=-1)


def _extra_term_config(tmp_path, **overrides):
    npz, init_weights, _ = _shared_data(tmp_path)
    return small_config(tmp_path, dataset=f"npz:{npz}", init_weights=init_weights, train_steps=STEPS,
                        extra_losses={"consistency": consistency}, loss_weights=TERM_WEIGHTS, **overrides)


def _gradient_tape_reference(config, arrays, weights):
    """SGD on `sum_i w_i mean(loss_i) + w_c mean(consistency)`, one GradientTape per step; per-step losses, model."""
    model = build_headline(config)
    model.load_weights(config.init_weights)
    optimizer = keras.optimizers.SGD(learning_rate=config.learning_rate)
    logs = []
    for inputs, labels in _batches(arrays).take(config.train_steps):
        with tf.GradientTape() as tape:
            predictions = model(inputs, training=True)
            losses = {name: tf.reduce_mean(keras.losses.binary_crossentropy(labels[name], predictions[name]))
                      for name in OUTPUTS}
            losses["consistency"] = tf.reduce_mean(consistency(labels, predictions, {}))
            total = tf.add_n([weights[name] * losses[name] for name in losses])
        optimizer.apply_gradients(zip(tape.gradient(total, model.trainable_variables), model.trainable_variables))
        logs.append({"loss": float(total), **{f"{name}_loss": float(value) for name, value in losses.items()}})
    return logs, model


def test_an_extra_consistency_term_equals_a_gradient_tape_step_written_by_hand(tmp_path):
    validation = write_npz(tmp_path / "validation.npz", num_examples=40, seed=1)  # 2 full batches and 8.
    config = _extra_term_config(tmp_path, validation_data=f"npz:{tmp_path / 'validation.npz'}")
    result = train(config)
    _, _, arrays = _shared_data(tmp_path)
    reference_logs, reference = _gradient_tape_reference(config, arrays, TERM_WEIGHTS)

    for name in ("loss", "aux_output_loss", "main_output_loss", "consistency_loss"):
        np.testing.assert_allclose([record[name] for record in result.history],
                                   [record[name] for record in reference_logs], rtol=LOSS_RTOL, err_msg=name)
    # The same float32 operations, the means and the total summed in another order: a few ulps (measured 6e-8).
    assert max_weight_difference(result.model.get_weights(), reference.get_weights()) <= WEIGHT_ATOL
    # The term moves the weights: without it the same steps end far from there.
    _, without_term = _gradient_tape_reference(config, arrays, {**TERM_WEIGHTS, "consistency": 0.0})
    assert max_weight_difference(result.model.get_weights(), without_term.get_weights()) > 1000 * WEIGHT_ATOL
    # Constant weights: none logged.
    assert not any(key.startswith("loss_weight/") for record in result.history for key in record)

    # Validation: the exact mean of the term over the 40 examples, at the final weights, as for an output.
    last = result.history[-1]
    inputs = {"main_input": validation["main_input"].astype("int32"), "aux_input": validation["aux_input"]}
    predictions = result.model(inputs, training=False)
    expected = float(tf.reduce_mean(consistency(None, predictions, {})))
    # Sums over batches in another order than one reduce_mean: float32 rounding of a few ulps.
    assert last["val_consistency_loss"] == pytest.approx(expected, rel=VALUE_RTOL)
    assert last["val_loss"] == pytest.approx(sum(weight * last[f"val_{name}_loss"]
                                                 for name, weight in TERM_WEIGHTS.items()), rel=VALUE_RTOL)


@pytest.mark.slow  # As every mto-explain test (test_explain.py).
def test_mto_explain_reports_the_extra_term_as_it_reports_an_outputs_loss(tmp_path):
    config = _extra_term_config(tmp_path)
    report = explain.explain(config, strategy=tf.distribute.get_strategy(), explain_batches=1)
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert report["outputs"] == ["aux_output", "main_output", "consistency"]
    assert report["loss_weights"] == TERM_WEIGHTS
    # float32 gradients of sums of a few hundred terms: rounding only (as test_explain).
    assert report["linearity_max_abs_error"] < 1e-6
    # The term reads both heads' predictions: it reaches the auxiliary head, and the main-only layers.
    assert layers["aux_output"]["reached_by"] == ["aux_output", "consistency"] and layers["aux_output"]["shared"]
    assert layers["main_dense_0"]["reached_by"] == ["main_output", "consistency"]
    assert layers["lstm"]["reached_by"] == ["aux_output", "main_output", "consistency"]
    for layer in report["layers"]:
        assert sum(layer["share"].values()) == pytest.approx(1.0, abs=1e-5), layer["name"]
    # Its contribution to the LSTM's gradient: w_c grad(mean consistency) on the first batch, by hand.
    _, _, arrays = _shared_data(tmp_path)
    model = build_headline(config)
    model.load_weights(config.init_weights)
    inputs, labels = next(iter(_batches(arrays)))
    with tf.GradientTape() as tape:
        term = TERM_WEIGHTS["consistency"] * tf.reduce_mean(consistency(labels, model(inputs, training=True), {}))
    gradient = np.concatenate([g.numpy().ravel()
                               for g in tape.gradient(term, model.get_layer("lstm").trainable_weights)])
    # float64 norms of float32 gradients taken by two tapes: rounding only.
    assert layers["lstm"]["grad_norm"]["consistency"] == pytest.approx(np.linalg.norm(gradient), rel=1e-5)
    assert "2 * consistency_loss" in explain.format_table(report)


# --- With upgrad: the extra term is a row of the Gramian ----------------------------------------------------------

N, P, H = 16, 3, 4  # One full batch of N examples, input width, trunk width.
HEADS = ("first", "second")
# The consistency term's weight: 0.7 at the first step, 2.0 at the second (a schedule, read at each step).
PULL_WEIGHTS = (0.7, 2.0)
LEARNING_RATE = 0.1


def _initial_weights():
    rng = np.random.default_rng(3)
    return {"trunk": rng.normal(size=(P, H)) * 0.5, **{name: rng.normal(size=(H, 1)) * 0.5 for name in HEADS}}


def _linear_model():
    """A shared linear trunk and two linear heads, from `_initial_weights()`."""
    initial = _initial_weights()
    features = keras.Input((P,), name="features")
    trunk = keras.layers.Dense(H, use_bias=False, name="trunk",
                               kernel_initializer=keras.initializers.Constant(initial["trunk"]))(features)
    return keras.Model(features, {name: keras.layers.Dense(1, use_bias=False, name=f"{name}_head",
                                                           kernel_initializer=keras.initializers.Constant(
                                                               initial[name]))(trunk) for name in HEADS})


def _linear_data():
    """Each head's target on the far side of its initial prediction from the other head's: its own loss pulls
    the two predictions apart, the term pulling them together conflicts with both."""
    initial = _initial_weights()
    rng = np.random.default_rng(4)
    x = rng.normal(size=(N, P))
    first, second = (x @ initial["trunk"] @ initial[name] for name in HEADS)
    noise = rng.normal(size=(N, 2)) * 0.5  # So that the three gradients are not linearly dependent.
    return {"features": x.astype(np.float32), "first": (2 * first - second + noise[:, :1]).astype(np.float32),
            "second": (2 * second - first + noise[:, 1:]).astype(np.float32)}


def pull_together(labels, predictions, sample_weights):
    return tf.reduce_sum(tf.square(predictions["first"] - predictions["second"]), axis=-1)


def _flat(gradients, model):
    """One row of J: the gradients of every weight, flattened; zeros where the loss does not reach a weight."""
    return np.concatenate([np.zeros(variable.shape).ravel() if gradient is None else gradient.numpy().ravel()
                           for gradient, variable in zip(gradients, model.trainable_variables, strict=True)])


@pytest.mark.slow  # Inner loop: the extra term against a hand-written tape.
def test_with_upgrad_the_extra_term_is_a_row_of_the_gramian_weighted_as_in_force(tmp_path):
    data = _linear_data()
    np.savez(tmp_path / "data.npz", **data)
    schedule = {"class_name": "PiecewiseConstantDecay", "config": {"boundaries": [0], "values": list(PULL_WEIGHTS)}}
    weights_in_force = [{"first": 1.0, "second": 0.5, "pull_together": pull} for pull in PULL_WEIGHTS]
    config = run_config(tmp_path, model=_linear_model, dataset=f"npz:{tmp_path / 'data.npz'}", batch_size=N,
                        train_steps=len(PULL_WEIGHTS), losses={name: "mse" for name in HEADS}, metrics={},
                        loss_weights={"first": 1.0, "second": 0.5, "pull_together": schedule},
                        extra_losses={"pull_together": pull_together}, loss_weighting="upgrad",
                        learning_rate=LEARNING_RATE, progress="quiet")
    result = train(config)

    # By hand: each term's weighted loss, its gradient of every weight (all three are reached by two terms or
    # more, so all are shared), the K = 3 Gramian, UPGrad's weights, and the SGD step a @ J.
    model = _linear_model()
    x = tf.constant(data["features"])
    expected_factors = []
    for step, weights in enumerate(weights_in_force):
        with tf.GradientTape(persistent=True) as tape:
            predictions = model(x, training=True)
            losses = {name: tf.reduce_mean(tf.square(predictions[name] - data[name])) for name in HEADS}
            losses["pull_together"] = tf.reduce_mean(pull_together(None, predictions, {}))
            weighted = {name: weights[name] * loss for name, loss in losses.items()}
        J = np.stack([_flat(tape.gradient(loss, model.trainable_variables), model)
                      for loss in weighted.values()]).astype(np.float64)
        a = numpy_upgrad(J, None)
        gram = J @ J.T
        # The check can fail: the term's gradient conflicts (UPGrad projects, the weights are not 1/3 each), and
        # its row unweighted (weight 1 instead of the one in force) gives other weights.
        assert gram[2, :2].min() < 0 and np.ptp(a) > 0.01, (step, gram, a)
        unweighted = J.copy()
        unweighted[2] /= weights["pull_together"]
        assert np.max(np.abs(numpy_upgrad(unweighted, None) - a)) > 0.01, step
        expected_factors.append(a)
        update, offset = a @ J, 0
        for variable in model.trainable_variables:
            size = int(np.prod(variable.shape))
            variable.assign(variable.numpy() - LEARNING_RATE * update[offset:offset + size].reshape(variable.shape))
            offset += size

    logged = np.array([[record[f"loss_weight/{name}"] for name in (*HEADS, "pull_together")]
                       for record in result.history])
    # The Gramian in float32 (the step's) against float64 (here): rounding only (as test_loss_weighting).
    np.testing.assert_allclose(logged, np.array(expected_factors), rtol=1e-5, atol=1e-6)
    for variable, trained in zip(model.trainable_variables, result.model.trainable_variables, strict=True):
        # float32 training against a float64 update over two steps: rounding only.
        np.testing.assert_allclose(trained.numpy(), variable.numpy(), atol=2e-5, err_msg=variable.path)
    assert all(record["pull_together_loss"] > 0 for record in result.history)


# --- Bad values ----------------------------------------------------------------------------------------------------


def test_bad_extra_terms_from_the_command_line_are_one_line_exit_2_and_nothing_written(tmp_path, monkeypatch):
    _user_module(tmp_path, monkeypatch)
    term = f"consistency={USER_MODULE}"
    for flags, message in [
            ([f"--extra_losses=main_output={USER_MODULE}:consistency"],
             ("--extra_losses: 'main_output' is an output of model 'headline'; name the term otherwise (it is "
              "logged as main_output_loss)")),
            ([f"--extra_losses={term}:two_arguments"],
             (f"--extra_losses: {term}:two_arguments: calling it with the (labels, predictions, sample_weights) "
              f"dicts raised TypeError: ")),
            ([f"--extra_losses={term}:a_value_per_element"],
             (f"--extra_losses: {term}:a_value_per_element: expected one number per example (shape (2,) for a "
              f"batch of 2), got float32 of shape (2, 1)")),
            ([f"--extra_losses={term}:one_number"],
             (f"--extra_losses: {term}:one_number: expected one number per example (shape (2,) for a batch of 2), "
              f"got float32 of shape ()")),
            ([f"--extra_losses={term}:weighted_by_main"],  # Tried with the sample weights batches hold.
             (f"--extra_losses: {term}:weighted_by_main: calling it with the (labels, predictions, sample_weights) "
              f"dicts raised KeyError: 'main_output'")),
            ([f"--extra_losses={term}:missing"],
             f"--extra_losses: module '{USER_MODULE}' has no 'missing' (from '{USER_MODULE}:missing')"),
            ([f"--extra_losses={term}:consistency", "--loss_weights=main_output=1,aux_output=0.2,consistenc=1"],
             ("--loss_weights: unknown output 'consistenc'; model 'headline' has outputs ['aux_output', "
              "'main_output'] and extra terms ['consistency']")),
    ]:
        process = mto_train_in_process(*SMALL_FLAGS, f"--data_dir={data_dir()}", f"--model_dir={tmp_path / 'run'}",
                                       *flags)
        assert process.returncode == 2, (flags, process.stderr[-2000:])
        assert process.stderr.strip().splitlines()[-1].startswith(f"mto-train: error: {message}"), process.stderr
        assert "Traceback" not in process.stderr and not (tmp_path / "run").exists(), flags
