"""Shared set-up: two logical CPU devices, one MirroredStrategy, small models.

The CPU must be split before TensorFlow runs its first op, so it happens
here, at import, before any test module touches TensorFlow. TensorFlow holds
one MirroredStrategy per process well (a second one broke collectives when
batch shapes changed), so every mirrored test shares the session's.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

NUM_CPU_DEVICES = 2
_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * NUM_CPU_DEVICES)

from mto_tf.config import TrainConfig  # noqa: E402

# Small enough to trace and run in seconds, large enough that every layer
# (embedding, LSTM, three Dense, two heads) is exercised.
SMALL_MODEL = dict(vocab_size=50, sequence_length=8, embedding_dim=8, lstm_units=4, dense_units=8)
BATCH_SIZE = 16


def small_config(tmp_path, **overrides) -> TrainConfig:
    """A `TrainConfig` for the small headline model; `overrides` win."""
    settings = dict(SMALL_MODEL, batch_size=BATCH_SIZE, train_steps=6, steps_per_loop=1, log_every=1,
                    checkpoint_every=1000, data_dir=str(tmp_path / "tfds"), model_dir=str(tmp_path / "run"),
                    optimizer="sgd", learning_rate=0.1)
    if overrides.get("dataset", "synthetic_headlines") == "synthetic_headlines":
        # Only synthetic_headlines reads them (mto_tf refuses settings nothing reads).
        settings.update(synthetic_train_examples=128, synthetic_validation_examples=32)
    settings.update(overrides)
    return TrainConfig(**settings)


def run_config(tmp_path, **overrides) -> TrainConfig:
    """A short run's `TrainConfig` with no model sizes (for a user's or a built-in model at its own sizes)."""
    settings = dict(batch_size=BATCH_SIZE, train_steps=6, steps_per_loop=1, log_every=1, checkpoint_every=1000,
                    data_dir=str(tmp_path / "tfds"), model_dir=str(tmp_path / "run"), optimizer="sgd",
                    learning_rate=0.1)
    settings.update(overrides)
    return TrainConfig(**settings)


def write_npz(path, *, num_examples=72, with_sample_weights=False, seed=0):
    """Writes a small npz dataset for the small model; returns its arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        "main_input": rng.integers(0, SMALL_MODEL["vocab_size"], (num_examples, SMALL_MODEL["sequence_length"])),
        "aux_input": rng.standard_normal((num_examples, 5)).astype(np.float32),
        "main_output": rng.integers(0, 2, num_examples).astype(np.float32),
        "aux_output": rng.integers(0, 2, (num_examples, 1)).astype(np.float32),
    }
    if with_sample_weights:
        # Uneven weights, zeros included, different per output.
        arrays["sample_weight/main_output"] = rng.choice([0.0, 0.5, 1.0, 3.0], num_examples).astype(np.float32)
        arrays["sample_weight/aux_output"] = rng.uniform(0.0, 2.0, num_examples).astype(np.float32)
    np.savez(path, **arrays)
    return arrays


@pytest.fixture(scope="session")
def mirrored_strategy():
    """The session's one MirroredStrategy over the two logical CPU devices."""
    devices = [device.name for device in tf.config.list_logical_devices("CPU")]
    assert len(devices) == NUM_CPU_DEVICES
    return tf.distribute.MirroredStrategy(devices)
