"""What a run leaves in `--model_dir`, written the same way by both loops.

- `metrics.jsonl`: one JSON object per logging window (`step` and each
  measurement averaged over the window's steps, as `fit` averages over an epoch);
- `tensorboard/`: the same numbers as scalars;
- `checkpoints/`: a `tf.train.CheckpointManager`;
- `model.weights.h5` and `model.keras` at the end.
"""

from __future__ import annotations

import json
import logging
import os

import keras
import tensorflow as tf

METRICS_FILE = "metrics.jsonl"
WEIGHTS_FILE = "model.weights.h5"
MODEL_FILE = "model.keras"
CHECKPOINT_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"

logger = logging.getLogger(__name__)


class MetricsLog:
    """Appends one line per logging window to `metrics.jsonl`, and to TensorBoard."""

    def __init__(self, model_dir: str):
        self._path = os.path.join(model_dir, METRICS_FILE)
        self._summary_writer = tf.summary.create_file_writer(os.path.join(model_dir, TENSORBOARD_DIR))
        self.records: list[dict] = []

    def write(self, step: int, measurements: dict[str, float]) -> dict:
        """Writes `measurements` at `step`; returns the record written."""
        record = {"step": int(step), **{name: float(value) for name, value in measurements.items()}}
        with open(self._path, "a") as metrics_file:
            metrics_file.write(json.dumps(record) + "\n")
        with self._summary_writer.as_default(step=record["step"]):
            for name, value in measurements.items():
                tf.summary.scalar(name, value)
        self._summary_writer.flush()
        logger.info("step %d: %s", record["step"], ", ".join(f"{name}={value:.4g}" for name, value in measurements.items()))
        self.records.append(record)
        return record


def make_checkpoint_manager(model_dir: str, *, model: keras.Model,
                            optimizer: keras.optimizers.Optimizer) -> tf.train.CheckpointManager:
    """A manager for the model's weights and the optimizer's state, its step included.

    `optimizer.iterations` is the step count (one update per step), so a
    restored run knows both where it is and Adam's bias correction.
    """
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
    return tf.train.CheckpointManager(checkpoint, os.path.join(model_dir, CHECKPOINT_DIR), max_to_keep=3,
                                      step_counter=optimizer.iterations)


def restore_latest(manager: tf.train.CheckpointManager) -> int:
    """Restores the latest checkpoint, if any; returns the step it was taken at (0 if none)."""
    if manager.latest_checkpoint:
        manager.checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
    return int(manager.checkpoint.optimizer.iterations.numpy())


def save_final_model(model_dir: str, model: keras.Model) -> None:
    """Writes the final weights (`model.load_weights` reads them) and the whole model."""
    model.save_weights(os.path.join(model_dir, WEIGHTS_FILE))
    model.save(os.path.join(model_dir, MODEL_FILE))
