"""`--model=shapes3d_cnn --dataset=tfds:shapes3d`: BatchNorm and Dropout train as in `model.fit`.

TFDS's `mock_data` stands in for the real shapes3d (no download here): random
images and labels with the real features, the same examples on every read.
BatchNorm's moving statistics are weights too, so comparing every weight
compares them; Dropout draws from the model's seeded generator in both loops.
"""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from helpers import BATCH_SIZE, keras_optimizer, max_weight_difference, once, run_config
from mto_tf import train
from mto_tf.core.models import SHAPES3D_LABELS, build_shapes3d_cnn

pytestmark = pytest.mark.slow

SMALL_CNN = dict(conv_filters=4, dense_units=8)
NUM_EXAMPLES = 64
# One device, and mirrored against mirrored fit: the same float32
# operations in the same order (0.0 measured); the bound allows a few ulps.
SAME_OPERATIONS_ATOL = 1e-6


@pytest.fixture(autouse=True)
def mock_shapes3d():
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
        yield


def _config(tmp_path, **overrides):
    settings = dict(SMALL_CNN, model="shapes3d_cnn", dataset="tfds:shapes3d", init_weights=_init_weights(tmp_path),
                    optimizer="adam", learning_rate=0.01)
    return run_config(tmp_path, **{**settings, **overrides})


def _init_weights(tmp_path):
    path = tmp_path / "init.weights.h5"
    if not path.exists():
        keras.utils.set_random_seed(0)
        build_shapes3d_cnn(run_config(tmp_path, **SMALL_CNN)).save_weights(path)
    return str(path)


def reference_fit(config, strategy):
    """Plain Keras on TFDS's reader; computed once per test process for each setting and strategy."""
    key = ("shapes3d fit", config.optimizer, config.learning_rate, config.dropout_rate, config.sync_batchnorm,
           config.seed, config.train_steps, strategy.__class__.__name__)
    return once(key, lambda _: _fit(config, strategy))


def _fit(config, strategy):
    """Plain Keras on TFDS's reader: the image as float32, the six labels as integer ids."""
    def to_example(example):
        return ({"image": tf.cast(example["image"], tf.float32)}, {label: example[label] for label in SHAPES3D_LABELS})

    # The model's features only: mock_data draws its random examples from the
    # features asked for (real files give the same examples either way).
    features = tfds.decode.PartialDecoding({"image": True, **{label: True for label in SHAPES3D_LABELS}})
    dataset = tfds.builder("shapes3d", data_dir=config.data_dir).as_dataset(
        split="train", shuffle_files=False, decoders=features).map(to_example)
    with strategy.scope():
        keras.utils.set_random_seed(config.seed)  # Dropout's generator starts where the custom loop's starts.
        model = build_shapes3d_cnn(config)
        model.load_weights(config.init_weights)
        model.compile(optimizer=keras_optimizer(config),
                      loss={label: "sparse_categorical_crossentropy" for label in SHAPES3D_LABELS},
                      metrics={label: ["accuracy"] for label in SHAPES3D_LABELS})
    history = model.fit(dataset.repeat().batch(BATCH_SIZE, drop_remainder=True), epochs=config.train_steps,
                        steps_per_epoch=1, shuffle=False, verbose=0)
    return history.history, model


def assert_same_run(result, fit_history, fit_model, atol):
    for name, values in fit_history.items():
        np.testing.assert_allclose([record[name] for record in result.history], values, rtol=atol, atol=atol,
                                   err_msg=name)
    difference = max_weight_difference(result.model.get_weights(), fit_model.get_weights())
    assert difference <= atol
    return difference


def _moving_mean(model):
    return model.get_layer("batchnorm_0").moving_mean.numpy()


def test_shapes3d_cnn_matches_fit_on_one_device_moving_statistics_and_dropout_included(tmp_path):
    config = _config(tmp_path)
    result = train(config)
    fit_history, fit_model = reference_fit(config, tf.distribute.get_strategy())
    assert {f"{label}_accuracy" for label in SHAPES3D_LABELS} <= set(result.history[0])
    assert_same_run(result, fit_history, fit_model, SAME_OPERATIONS_ATOL)
    # Training moved the moving statistics away from their start (zeros).
    assert np.abs(_moving_mean(result.model)).max() > 1e-3


def test_under_mirrored_each_replica_normalizes_its_own_half_as_mirrored_fit_does(tmp_path, mirrored_strategy):
    config = _config(tmp_path, strategy="mirrored", num_cpu_devices=2)
    result = train(config, strategy=mirrored_strategy)
    assert_same_run(result, *reference_fit(config, mirrored_strategy), SAME_OPERATIONS_ATOL)
    # Batch statistics of half batches are not those of the whole batch:
    # without --sync_batchnorm, two replicas do not train as one device.
    _, one_device_fit = reference_fit(config, tf.distribute.get_strategy())
    assert max_weight_difference(result.model.get_weights(), one_device_fit.get_weights()) > 1e-4


def test_sync_batchnorm_under_mirrored_equals_one_device_fit(tmp_path, mirrored_strategy):
    # Dropout off: each replica draws its own mask from the same generator
    # state, which no single device reproduces; BatchNorm is what is tested.
    # SGD: Adam's first steps move each weight by about lr * g / |g|, which
    # turns float32 rounding of a near-zero gradient into a visible step
    # (measured 2e-5 with Adam); SGD moves it by lr * g.
    config = _config(tmp_path, strategy="mirrored", num_cpu_devices=2, sync_batchnorm=True, dropout_rate=0.0,
                     optimizer="sgd", learning_rate=0.1)
    result = train(config, strategy=mirrored_strategy)
    fit_history, one_device_fit = reference_fit(config, tf.distribute.get_strategy())
    # Synchronized statistics are sums of two half-batch sums, and the
    # gradients an all-reduce of two halves: float32 rounding only.
    difference = assert_same_run(result, fit_history, one_device_fit, 1e-5)
    # Without synchronized BatchNorm the same run is far from one device.
    unsynchronized = train(dataclasses.replace(config, sync_batchnorm=False, model_dir=str(tmp_path / "unsynced")),
                           strategy=mirrored_strategy)
    assert max_weight_difference(unsynchronized.model.get_weights(), one_device_fit.get_weights()) > 100 * difference


def test_loop_fit_trains_shapes3d_cnn_as_the_custom_loop_does(tmp_path):
    config = _config(tmp_path, loop="fit")
    fit_result = train(config)
    custom_result = train(dataclasses.replace(config, loop="custom", model_dir=str(tmp_path / "custom")))
    assert set(fit_result.history[0]) == set(custom_result.history[0])  # Same names, fit's.
    assert max_weight_difference(fit_result.model.get_weights(), custom_result.model.get_weights()) <= \
        SAME_OPERATIONS_ATOL
