"""The custom loop gives the same losses and weights as `model.fit`.

Same initial weights (one `.weights.h5` file), same batches (one npz file),
same optimizer settings. The reference is plain Keras, written out here:
`compile(loss=..., loss_weights=...)` + `fit`, fed by `from_tensor_slices`
on the npz arrays, so the custom loop's data pipeline is checked too.

Per-step values: the custom loop logs every step (`log_every=1`) and `fit`
runs one step per epoch, so `fit`'s epoch logs are per-step values.

One case runs in the inner loop (`pytest -m "not slow"`), so that an edit
to the step is checked against `fit` in seconds; CI runs them all.
"""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from helpers import (BATCH_SIZE, HEADLINE, LOSS_RTOL, keras_optimizer, max_weight_difference, once,
                     shared_npz_and_init_weights, small_config)
from mto_tf import train
from mto_tf.core.models import build_headline

LOGGED_LOSSES = ("loss", "main_output_loss", "aux_output_loss")

CASES = {
    "sgd": dict(optimizer="sgd", learning_rate=0.1),
    "adam_loss_weights_0.3_1.7": dict(optimizer="adam", learning_rate=0.01,
                                      loss_weights={"main_output": 0.3, "aux_output": 1.7}),
    "rmsprop_sample_weights": dict(optimizer="rmsprop", learning_rate=0.01),
    "sgd_l2": dict(optimizer="sgd", learning_rate=0.1, l2=0.01),
}

# Single device: the custom step performs the same float32 operations as
# Keras's compiled loss (sum(l * sw) / batch, times the weight, summed), and
# gradients of the same graph; measured max weight difference 0.0 for every
# case. The bound allows only float32 rounding of a few ulps.
SINGLE_DEVICE_WEIGHT_ATOL = 1e-6
# Two replicas against one device: float32 sums taken in a different order.
MIRRORED_VS_ONE_DEVICE_WEIGHT_ATOL = 1e-6


def reference_fit(config, arrays, init_weights, strategy, jit_compile=False):
    """`model.fit` on the npz arrays; returns (per-window logs, final weights).

    Computed once per test process for each case, strategy and length: several
    tests compare against the same one.
    """
    key = ("parity fit", config.optimizer, config.learning_rate, config.loss_weights, config.l2, init_weights,
           strategy.__class__.__name__, config.train_steps, config.log_every, jit_compile)
    return once(key, lambda _: _fit(config, arrays, init_weights, strategy, jit_compile))


def _fit(config, arrays, init_weights, strategy, jit_compile):
    inputs = {"main_input": arrays["main_input"].astype("int32"), "aux_input": arrays["aux_input"]}
    labels = {name: arrays[name].reshape(-1, 1) for name in ("main_output", "aux_output")}
    sample_weights = {name: arrays[f"sample_weight/{name}"] for name in ("main_output", "aux_output")
                      if f"sample_weight/{name}" in arrays}
    elements = (inputs, labels, sample_weights) if sample_weights else (inputs, labels)
    dataset = tf.data.Dataset.from_tensor_slices(elements).repeat().batch(BATCH_SIZE, drop_remainder=True)
    with strategy.scope():
        model = build_headline(config)
        model.load_weights(init_weights)
        model.compile(optimizer=keras_optimizer(config), loss=dict(HEADLINE.losses),
                      loss_weights=dict(config.loss_weights or HEADLINE.loss_weights), jit_compile=jit_compile)
    history = model.fit(dataset, epochs=config.train_steps // config.log_every, steps_per_epoch=config.log_every,
                        shuffle=False, verbose=0)
    return history.history, model.get_weights()


def custom_loop(config, strategy):
    """mto_tf's custom loop; returns (per-window logs, final weights)."""
    result = train(config, strategy=strategy)
    logs = {name: [record[name] for record in result.history] for name in LOGGED_LOSSES}
    return logs, result.model.get_weights()


def _setup(tmp_path, case, **overrides):
    """The case's data and initial weights (made once per test process), and its config."""

    directory, arrays = shared_npz_and_init_weights(("parity", case), small_config(tmp_path, **CASES[case]),
                                                    with_sample_weights=case == "rmsprop_sample_weights")
    init_weights = str(directory / "init.weights.h5")
    config = small_config(tmp_path, dataset=f"npz:{directory / 'data.npz'}", init_weights=init_weights,
                          **CASES[case], **overrides)
    return config, arrays, init_weights


def assert_same_losses(custom_logs, fit_logs, rtol):
    for name in LOGGED_LOSSES:
        np.testing.assert_allclose(custom_logs[name], fit_logs[name], rtol=rtol, err_msg=name)


# RMSprop (slots), uneven sample weights, six steps: the inner loop's check against fit.
INNER_LOOP_CASE = "rmsprop_sample_weights"


@pytest.mark.parametrize("case", [case if case == INNER_LOOP_CASE else pytest.param(case, marks=pytest.mark.slow)
                                  for case in CASES])
def test_custom_loop_matches_fit_on_one_device(tmp_path, case):
    config, arrays, init_weights = _setup(tmp_path, case)
    custom_logs, custom_weights = custom_loop(config, tf.distribute.get_strategy())
    fit_logs, fit_weights = reference_fit(config, arrays, init_weights, tf.distribute.get_strategy())

    assert_same_losses(custom_logs, fit_logs, LOSS_RTOL)
    assert max_weight_difference(custom_weights, fit_weights) <= SINGLE_DEVICE_WEIGHT_ATOL
    # The run trained: weights moved away from the initial ones.
    assert max_weight_difference(custom_weights, build_headline(config).get_weights()) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("strategy_name", ["default", "mirrored"])
def test_steps_per_loop_changes_nothing(tmp_path, strategy_name, request):
    """5 steps in one tf.function call = 5 calls of 1 step, and = fit with 5 steps per epoch."""
    if strategy_name == "mirrored":
        strategy, overrides = request.getfixturevalue("mirrored_strategy"), dict(strategy="mirrored", num_cpu_devices=2)
    else:
        strategy, overrides = tf.distribute.get_strategy(), {}
    config, arrays, init_weights = _setup(tmp_path, "adam_loss_weights_0.3_1.7",
                                          train_steps=10, log_every=5, steps_per_loop=1, **overrides)
    one_step_logs, one_step_weights = custom_loop(config, strategy)
    five_steps = dataclasses.replace(config, steps_per_loop=5, model_dir=str(tmp_path / "run5"))
    five_step_logs, five_step_weights = custom_loop(five_steps, strategy)

    # The same updates in the same order, only grouped differently into
    # calls: the weights are equal bit for bit. The logged total loss can
    # differ in its last float32 bit (measured: 1 ulp in one window), as
    # Grappler may order the additions of a while-loop body differently.
    assert max_weight_difference(one_step_weights, five_step_weights) == 0.0
    assert_same_losses(one_step_logs, five_step_logs, LOSS_RTOL)
    fit_logs, fit_weights = reference_fit(config, arrays, init_weights, strategy)
    assert_same_losses(five_step_logs, fit_logs, LOSS_RTOL)
    assert max_weight_difference(five_step_weights, fit_weights) <= SINGLE_DEVICE_WEIGHT_ATOL


@pytest.mark.slow
def test_one_device_strategy_matches_fit(tmp_path):
    config, arrays, init_weights = _setup(tmp_path, "adam_loss_weights_0.3_1.7", strategy="one_device")
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    custom_logs, custom_weights = custom_loop(config, strategy)
    fit_logs, fit_weights = reference_fit(config, arrays, init_weights, strategy)
    # One replica on one device: the same float32 operations as the default strategy.
    assert_same_losses(custom_logs, fit_logs, LOSS_RTOL)
    assert max_weight_difference(custom_weights, fit_weights) <= SINGLE_DEVICE_WEIGHT_ATOL


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_custom_loop_under_mirrored_matches_mirrored_fit_and_one_device_fit(tmp_path, case, mirrored_strategy):
    config, arrays, init_weights = _setup(tmp_path, case, strategy="mirrored", num_cpu_devices=2)
    custom_logs, custom_weights = custom_loop(config, mirrored_strategy)
    mirrored_fit_logs, mirrored_fit_weights = reference_fit(config, arrays, init_weights, mirrored_strategy)
    one_device_fit_logs, one_device_fit_weights = reference_fit(config, arrays, init_weights,
                                                                tf.distribute.get_strategy())
    # Against mirrored fit: both divide each replica's sum by the global
    # batch (Keras as local mean x 1/R) and all-reduce gradients with SUM;
    # measured max weight difference 0.0 for every case.
    assert_same_losses(custom_logs, mirrored_fit_logs, LOSS_RTOL)
    assert max_weight_difference(custom_weights, mirrored_fit_weights) <= SINGLE_DEVICE_WEIGHT_ATOL
    # Against one device: the same mathematics, but the batch sum is taken as
    # two half sums and then added, which rounds differently; measured at
    # most 6e-8 after 6 steps, far below any real disagreement.
    assert_same_losses(custom_logs, one_device_fit_logs, LOSS_RTOL)
    assert max_weight_difference(custom_weights, one_device_fit_weights) <= MIRRORED_VS_ONE_DEVICE_WEIGHT_ATOL


@pytest.mark.slow
def test_xla_custom_loop_matches_xla_fit(tmp_path):
    config, arrays, init_weights = _setup(tmp_path, "adam_loss_weights_0.3_1.7", jit_compile=True)
    custom_logs, custom_weights = custom_loop(config, tf.distribute.get_strategy())
    fit_logs, fit_weights = reference_fit(config, arrays, init_weights, tf.distribute.get_strategy(),
                                          jit_compile=True)
    # Both compile the same step with XLA; measured max difference 0.0.
    assert_same_losses(custom_logs, fit_logs, LOSS_RTOL)
    assert max_weight_difference(custom_weights, fit_weights) <= SINGLE_DEVICE_WEIGHT_ATOL
