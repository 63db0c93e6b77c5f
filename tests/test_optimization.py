"""Optimization as Keras configures it: optimizer and schedule configs, clipping, accumulation, mixed precision.

Each case against `model.fit` with the same Keras objects, written out
here. Under `mirrored` the reference is single-device `fit`: mto_tf keeps
the single-device mathematics where mirrored `fit` does not (clipping before
the all-reduce) or cannot run (accumulation), and these tests assert that
difference too, so they notice if Keras changes.
"""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import (BATCH_SIZE, HEADLINE, LOSS_RTOL, max_weight_difference, once, run_config,
                     shared_npz_and_init_weights, small_config)
from mto_tf import train
from mto_tf.core.models import build_headline
from mto_tf.errors import ConfigError

pytestmark = pytest.mark.slow

SCHEDULE = {"class_name": "CosineDecay",
            "config": {"initial_learning_rate": 0.0, "warmup_target": 0.05, "warmup_steps": 3, "decay_steps": 8}}
ADAMW = {"class_name": "AdamW", "config": {"weight_decay": 0.004}}
# One device, custom step against fit: the same float32 operations (measured
# 0.0 but for accumulation: a few 1e-8, its sums added in another order), and
# under mirrored two half-batch sums added; 1e-6 allows only such rounding.
WEIGHT_ATOL = 1e-6
# Clipping makes a difference larger than this in 6 steps when it applies
# to replicas' partial gradients instead of their sum (measured 1e-2 and more).
DIFFERENT = 1e-4


def _setup(tmp_path, **overrides):
    """The module's data and initial weights (made once per test process), and a config."""

    directory, arrays = shared_npz_and_init_weights("optimization", small_config(tmp_path))
    config = small_config(tmp_path, dataset=f"npz:{directory / 'data.npz'}",
                          init_weights=str(directory / "init.weights.h5"), validation_split="", **overrides)
    return config, arrays


def _fit(config, arrays, make_optimizer, strategy=None, **compile_settings):
    """`model.fit` on the npz arrays in file order with `make_optimizer()`; returns (history, model)."""
    inputs = {"main_input": arrays["main_input"].astype("int32"), "aux_input": arrays["aux_input"]}
    labels = {name: arrays[name].reshape(-1, 1) for name in ("main_output", "aux_output")}
    dataset = tf.data.Dataset.from_tensor_slices((inputs, labels)).repeat().batch(BATCH_SIZE, drop_remainder=True)
    with (strategy or tf.distribute.get_strategy()).scope():
        model = build_headline(config)
        model.load_weights(config.init_weights)
        model.compile(optimizer=make_optimizer(), loss=dict(HEADLINE.losses),
                      loss_weights=dict(config.loss_weights or HEADLINE.loss_weights), **compile_settings)
    history = model.fit(dataset, epochs=config.train_steps, steps_per_epoch=1, shuffle=False, verbose=0)
    return history.history, model


def _losses(result):
    return [record["loss"] for record in result.history]


def test_optimizer_and_schedule_configs_match_fit(tmp_path):
    config, arrays = _setup(tmp_path, optimizer=ADAMW, learning_rate=SCHEDULE, train_steps=8)
    result = train(config)
    history, reference = _fit(config, arrays, lambda: keras.optimizers.AdamW(
        learning_rate=keras.optimizers.schedules.CosineDecay(**SCHEDULE["config"]), weight_decay=0.004))

    np.testing.assert_allclose(_losses(result), history["loss"], rtol=LOSS_RTOL)
    assert max_weight_difference(result.model.get_weights(), reference.get_weights()) <= WEIGHT_ATOL
    # The schedule mattered: at a constant rate the run ends elsewhere.
    _, constant_rate = _fit(config, arrays, lambda: keras.optimizers.AdamW(learning_rate=0.05, weight_decay=0.004))
    assert max_weight_difference(reference.get_weights(), constant_rate.get_weights()) > DIFFERENT


def test_keras_optimizer_name_with_its_own_default_rate(tmp_path):
    config, arrays = _setup(tmp_path, optimizer="adagrad", learning_rate=None, train_steps=3)
    result = train(config)
    _, reference = _fit(config, arrays, lambda: keras.optimizers.Adagrad())
    assert max_weight_difference(result.model.get_weights(), reference.get_weights()) <= WEIGHT_ATOL


def test_xla_update_is_keras_update_compiled(tmp_path):
    config, arrays = _setup(tmp_path, optimizer="rmsprop", learning_rate=0.01, xla_update=True)
    result = train(config)
    _, reference = _fit(config, arrays, lambda: keras.optimizers.RMSprop(0.01))
    # The same Keras ops (sparse embedding gradient included), fused by XLA:
    # its square roots and divisions round differently in the last bits
    # (measured 1e-7 here, 3e-6 with Adam on shapes3d_cnn): 1e-5 allows that.
    assert max_weight_difference(result.model.get_weights(), reference.get_weights()) <= 1e-5


CLIPPING = {"clipnorm": 0.02, "global_clipnorm": 0.05, "clipvalue": 0.002}


@pytest.mark.keras_behaviour
@pytest.mark.parametrize("clipping", CLIPPING)
def test_clipping_after_the_all_reduce_equals_one_device_fit(tmp_path, clipping, mirrored_strategy):
    setting = {clipping: CLIPPING[clipping]}
    config, arrays = _setup(tmp_path, optimizer="sgd", learning_rate=0.5, **setting)
    _, one_device_fit = _fit(config, arrays, lambda: keras.optimizers.SGD(0.5, **setting))
    # The same unclipped run for every clipping: computed once.
    _, unclipped_fit = once(("unclipped fit", config.init_weights, config.train_steps),
                            lambda _: _fit(config, arrays, lambda: keras.optimizers.SGD(0.5)))
    _, mirrored_fit = _fit(config, arrays, lambda: keras.optimizers.SGD(0.5, **setting), mirrored_strategy)
    one_device = train(config)
    mirrored = train(dataclasses.replace(config, strategy="mirrored", num_cpu_devices=2,
                                         model_dir=str(tmp_path / "mirrored")), strategy=mirrored_strategy)

    # The clipping applied (the run differs from an unclipped one) ...
    assert max_weight_difference(one_device_fit.get_weights(), unclipped_fit.get_weights()) > DIFFERENT
    # ... to the global gradient: one device and two replicas equal single-device fit
    # (two half-batch sums added instead of one sum: a few 1e-8).
    assert max_weight_difference(one_device.model.get_weights(), one_device_fit.get_weights()) <= WEIGHT_ATOL
    assert max_weight_difference(mirrored.model.get_weights(), one_device_fit.get_weights()) <= WEIGHT_ATOL
    # Keras 3.15's mirrored fit clips each replica's half gradient before the
    # all-reduce, so it ends elsewhere.
    assert max_weight_difference(mirrored_fit.get_weights(), one_device_fit.get_weights()) > DIFFERENT


@pytest.mark.keras_behaviour
def test_accumulation_equals_fit_and_under_mirrored_one_device_fit(tmp_path, mirrored_strategy):
    # 4 batches per update, global clipping of the accumulated mean, a schedule counted in batches.
    settings = dict(optimizer="adam", learning_rate=SCHEDULE, grad_accum_steps=4, global_clipnorm=0.5,
                    train_steps=8)
    config, arrays = _setup(tmp_path, **settings)
    keras_optimizer = dict(learning_rate=keras.optimizers.schedules.CosineDecay(**SCHEDULE["config"]),
                           global_clipnorm=0.5)
    history, one_device_fit = _fit(config, arrays, lambda: keras.optimizers.Adam(**keras_optimizer,
                                                                          gradient_accumulation_steps=4))
    one_device = train(config)
    mirrored = train(dataclasses.replace(config, strategy="mirrored", num_cpu_devices=2,
                                         model_dir=str(tmp_path / "mirrored")), strategy=mirrored_strategy)

    np.testing.assert_allclose(_losses(one_device), history["loss"], rtol=LOSS_RTOL)
    assert max_weight_difference(one_device.model.get_weights(), one_device_fit.get_weights()) <= WEIGHT_ATOL
    assert max_weight_difference(mirrored.model.get_weights(), one_device_fit.get_weights()) <= WEIGHT_ATOL
    # Accumulating mattered: updating every batch ends elsewhere.
    _, every_batch = _fit(config, arrays, lambda: keras.optimizers.Adam(**keras_optimizer))
    assert max_weight_difference(one_device_fit.get_weights(), every_batch.get_weights()) > DIFFERENT
    # Keras 3.15's fit cannot accumulate under MirroredStrategy: it applies inside a tf.cond in replica context.
    with pytest.raises(RuntimeError, match="merge_call"):
        _fit(config, arrays, lambda: keras.optimizers.Adam(**keras_optimizer, gradient_accumulation_steps=4),
             mirrored_strategy)


def test_resumed_in_the_middle_of_an_accumulation_cycle_equals_uninterrupted(tmp_path):
    # Checkpoint at step 6: two batches into the second cycle of 4.
    config, _ = _setup(tmp_path, optimizer=ADAMW, learning_rate=SCHEDULE, grad_accum_steps=4, clipvalue=0.01,
                       train_steps=12, checkpoint_every=6)
    uninterrupted = train(config)
    resumed_dir = str(tmp_path / "resumed")
    train(dataclasses.replace(config, model_dir=resumed_dir, train_steps=6))
    resumed = train(dataclasses.replace(config, model_dir=resumed_dir))
    # Sums, batch count, slots and schedule position restored: bit for bit.
    for whole, split in zip(uninterrupted.model.get_weights(), resumed.model.get_weights(), strict=True):
        np.testing.assert_array_equal(whole, split)
    assert _losses(resumed) == _losses(uninterrupted)[6:]  # The resumed process logged steps 7 to 12.


@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_matches_fit_under_the_same_policy(tmp_path, precision, mirrored_strategy):
    # A main loss weight of 100 makes float16 gradients times the initial
    # loss scale (2**15) overflow: Keras skips such steps and halves the scale.
    config, arrays = _setup(tmp_path, optimizer="adam", learning_rate=0.01, precision=precision,
                            loss_weights={"main_output": 100.0, "aux_output": 0.2})
    try:
        result = train(config)
        keras.config.set_dtype_policy(precision)
        history, reference = _fit(config, arrays, lambda: keras.optimizers.Adam(0.01))
    finally:
        keras.config.set_dtype_policy("float32")
    # Layers compute in 16 bits, variables and losses stay float32.
    assert result.model.get_layer("main_output").compute_dtype == precision.removeprefix("mixed_")
    assert {weight.dtype for weight in result.model.get_weights()} == {np.dtype("float32")}
    # The same 16-bit operations in the same order, but a float16 value
    # carries only 11 significant bits (bfloat16: 8), so a rounding in one
    # op that differs (XLA's fused update, the losses' summation order) can
    # move a weight by about 2**-11 of a step; 1e-3 allows that, far below
    # what a different step would change (the learning rate, 1e-2).
    np.testing.assert_allclose(_losses(result), history["loss"], rtol=1e-3)
    assert max_weight_difference(result.model.get_weights(), reference.get_weights()) <= 1e-3
    if precision == "mixed_float16":
        # Steps skipped and the scale lowered alike.
        scale = float(result.optimizer.dynamic_scale.numpy())
        assert scale == float(reference.optimizer.dynamic_scale.numpy()) < 2.0**15
        # Under mirrored the overflow check sees the summed gradient, as one device does
        # (half-batch float16 sums: measured 6e-5).
        try:
            mirrored = train(dataclasses.replace(config, strategy="mirrored", num_cpu_devices=2,
                                                 model_dir=str(tmp_path / "mirrored")), strategy=mirrored_strategy)
        finally:
            keras.config.set_dtype_policy("float32")
        assert max_weight_difference(mirrored.model.get_weights(), reference.get_weights()) <= 1e-3
        assert float(mirrored.optimizer.dynamic_scale.numpy()) == scale


def test_loss_scale_resumes_exactly(tmp_path):
    config, _ = _setup(tmp_path, optimizer="adam", learning_rate=0.01, precision="mixed_float16",
                       loss_weights={"main_output": 100.0, "aux_output": 0.2}, train_steps=6, checkpoint_every=3)
    try:
        uninterrupted = train(config)
        resumed_dir = str(tmp_path / "resumed")
        train(dataclasses.replace(config, model_dir=resumed_dir, train_steps=3))
        resumed = train(dataclasses.replace(config, model_dir=resumed_dir))
    finally:
        keras.config.set_dtype_policy("float32")
    for whole, split in zip(uninterrupted.model.get_weights(), resumed.model.get_weights(), strict=True):
        np.testing.assert_array_equal(whole, split)
    assert float(resumed.optimizer.dynamic_scale.numpy()) == float(uninterrupted.optimizer.dynamic_scale.numpy())


def test_user_model_with_float32_outputs_under_mixed_float16(tmp_path):
    def build():
        tokens = keras.Input((8,), dtype="int32", name="tokens")
        features = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(50, 4, name="embedding")(tokens))
        return keras.Model(tokens, {
            # Output layers in float32, as Keras's mixed-precision guide advises.
            "a": keras.layers.Dense(1, activation="sigmoid", dtype="float32", name="a")(features),
            "b": keras.layers.Dense(3, activation="softmax", dtype="float32", name="b")(features)})

    rng = np.random.default_rng(0)
    dataset = tf.data.Dataset.from_tensor_slices((
        {"tokens": rng.integers(0, 50, (64, 8)).astype("int32")},
        {"a": rng.integers(0, 2, (64, 1)).astype("float32"), "b": rng.integers(0, 3, (64,)).astype("int32")}))
    config = run_config(tmp_path, model=build, dataset=dataset, precision="mixed_float16", train_steps=4,
                        losses={"a": "binary_crossentropy", "b": "sparse_categorical_crossentropy"})
    try:
        result = train(config)
    finally:
        keras.config.set_dtype_policy("float32")
    assert result.model.get_layer("a").compute_dtype == "float32"
    assert result.model.get_layer("embedding").compute_dtype == "float16"
    assert isinstance(result.optimizer, keras.optimizers.LossScaleOptimizer)
    assert len(result.history) == 4 and all(np.isfinite(record["loss"]) for record in result.history)


@pytest.mark.parametrize("settings, message", [
    (dict(optimizer="nope"), r"^--optimizer: Keras cannot make an optimizer of 'nope'"),
    (dict(optimizer={"class_name": "Adam", "config": {"bogus": 1}}), r"^--optimizer: Keras cannot make .*bogus"),
    (dict(optimizer={"class_name": "SGD", "config": {"clipnorm": 1.0}}), r"^--optimizer: give clipnorm as --clipnorm"),
    (dict(optimizer={"class_name": "SGD", "config": {"learning_rate": 0.1}}, learning_rate=0.2),
     r"^--learning_rate: the --optimizer config sets learning_rate already"),
    (dict(learning_rate={"class_name": "Nope", "config": {}}), r"^--learning_rate: Keras cannot make a learning rate"),
    (dict(learning_rate={"class_name": "CosineDecay", "config": {}}), r"^--learning_rate: Keras cannot make"),
])
def test_what_keras_cannot_build_is_one_line_naming_the_flag(tmp_path, settings, message):
    config, _ = _setup(tmp_path, **settings)
    with pytest.raises(ConfigError, match=message):
        train(config)
    assert not (tmp_path / "run").exists()  # Nothing written.


@pytest.mark.parametrize("settings, message", [
    (dict(learning_rate=0.0), r"^--learning_rate: expected a number > 0 or a Keras schedule config"),
    (dict(learning_rate="fast"), r"^--learning_rate: expected a number > 0"),
    (dict(optimizer=""), r"^--optimizer: expected a Keras optimizer name or a config"),
    (dict(clipnorm=0.0), r"^--clipnorm: expected a number > 0"),
    (dict(clipvalue=-1.0), r"^--clipvalue: expected a number > 0"),
    (dict(global_clipnorm=float("nan")), r"^--global_clipnorm: expected a number > 0"),
    (dict(clipnorm=1.0, clipvalue=1.0), r"^--clipvalue: give one of --clipnorm, --global_clipnorm, --clipvalue"),
    (dict(grad_accum_steps=0), r"^--grad_accum_steps: expected an integer > 0"),
    (dict(grad_accum_steps=2, precision="mixed_float16"), r"^--grad_accum_steps: not with --precision=mixed_float16"),
    (dict(grad_accum_steps=2, loop="fit", strategy="mirrored", num_cpu_devices=2),
     r"^--grad_accum_steps: with --loop=fit, only under --strategy=default"),
    (dict(precision="float64"), r"^--precision: expected one of float32, mixed_float16, mixed_bfloat16"),
    (dict(xla_update=True, strategy="mirrored", num_cpu_devices=2), r"^--xla_update: not with --strategy=mirrored"),
    (dict(xla_update=True, jit_compile=True), r"^--xla_update: not with --jit_compile"),
    (dict(xla_update=True, loop="fit"), r"^--xla_update: not with --loop=fit"),
    (dict(log_gradient_shares_every=-1), r"^--log_gradient_shares_every: expected steps >= 0"),
    (dict(log_gradient_shares_every=5, loop="fit"), r"^--log_gradient_shares_every: the custom loop's"),
])
def test_bad_optimization_settings(tmp_path, settings, message):
    with pytest.raises(ConfigError, match=message):
        small_config(tmp_path, **settings)
