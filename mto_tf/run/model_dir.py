"""What a run leaves in `--model_dir`, written the same way by both loops.

- `config.json`: the settings a resumed run must repeat;
- `metrics.jsonl`: one JSON object per logging window (`step` and each
  measurement averaged over the window's steps, as `fit` averages over an epoch);
- `tensorboard/`: the same numbers as scalars;
- `checkpoints/`: model and optimizer state, every `--checkpoint_every` steps;
- `model.weights.h5` and `model.keras` at the end;
- `.lock`: the chief's OS file lock for the whole run (one run per
  directory; the kernel releases it if the process dies), and its pid.

Nothing non-finite is kept: a checkpoint is written only when every weight
and optimizer slot is finite, and a run that stops on a non-finite value
writes no final model. A checkpoint that cannot be read (a crash or a full
disk mid-save) is passed over for the newest one that can.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf

from mto_tf import config as config_lib
from mto_tf.config import TrainConfig
from mto_tf.errors import ConfigError, NonFiniteError, first_line

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
WEIGHTS_FILE = "model.weights.h5"
MODEL_FILE = "model.keras"
CHECKPOINT_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
LOCK_FILE = ".lock"

logger = logging.getLogger(__name__)


class Lock:
    """The chief's hold on `--model_dir` for the whole run: an OS file lock (`flock`) on `.lock`.

    A lock file a killed run left behind does not block: the kernel released
    its lock with the process. `release()` at the end of the run.
    """

    def __init__(self, model_dir: str):
        path = os.path.join(model_dir, LOCK_FILE)
        try:
            os.makedirs(model_dir, exist_ok=True)
            self._file = open(path, "a+")
        except OSError as error:
            raise ConfigError("model_dir", f"cannot write {path}: {first_line(error)}") from None
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            raise ConfigError("model_dir", f"{model_dir!r} is in use by another run (pid {holder}); wait for it "
                                           f"to end, or use another --model_dir") from None
        self._file.truncate(0)
        self._file.write(str(os.getpid()))
        self._file.flush()

    def release(self) -> None:
        self._file.close()  # Closing the file releases the lock.


def prepare(config: TrainConfig) -> Lock:
    """Locks `--model_dir`, creates it or checks that the run it holds is this run (so resuming is safe).

    `config.json` records every setting a resumed run may not change.
    Returns the lock, held until released; on an error it is released.
    """
    lock = Lock(config.model_dir)
    try:
        _check_or_record_settings(config)
    except BaseException:
        lock.release()
        raise
    return lock


def _check_or_record_settings(config: TrainConfig) -> None:
    config_path = os.path.join(config.model_dir, CONFIG_FILE)
    resumable = config_lib.resumable_settings()
    settings = {name: value for name, value in config.describe().items() if name not in resumable}
    settings = json.loads(json.dumps(settings))  # As read back.
    if os.path.exists(config_path):
        with open(config_path) as config_file:
            saved = json.load(config_file)
        for name, value in settings.items():
            if saved.get(name) != value:
                raise ConfigError("model_dir", f"{config.model_dir!r} holds a run with --{name}={saved.get(name)}, "
                                               f"not {value}; resume it with the same settings or use a new --model_dir")
        return
    if set(os.listdir(config.model_dir)) - {LOCK_FILE}:
        raise ConfigError("model_dir", f"{config.model_dir!r} is not empty and holds no mto_tf run; "
                                       f"use a new or empty directory")
    try:
        with open(config_path, "w") as config_file:
            json.dump(settings, config_file, indent=2, sort_keys=True)
    except OSError as error:
        raise ConfigError("model_dir", f"cannot write {config_path}: {first_line(error)}") from None


class MetricsLog:
    """Appends one line per logging window to `metrics.jsonl`, and to TensorBoard.

    Only the chief writes files (`write_files`); every worker keeps `records`.
    """

    def __init__(self, model_dir: str, *, write_files: bool, resume_step: int):
        self._path = os.path.join(model_dir, METRICS_FILE)
        self._write_files = write_files
        self._summary_writer = (tf.summary.create_file_writer(os.path.join(model_dir, TENSORBOARD_DIR))
                                if write_files else None)
        self.records: list[dict] = []
        if write_files:
            self._rewind(resume_step)

    def _rewind(self, resume_step: int) -> None:
        """Drops records logged after the checkpoint this run resumes from (0: none): those steps run again."""
        if not os.path.exists(self._path):
            return
        with open(self._path) as metrics_file:
            lines = [line for line in metrics_file if line.strip()]
        kept = [line for line in lines if json.loads(line)["step"] <= resume_step]
        if len(kept) != len(lines):
            logger.info("Dropping %d metrics.jsonl record(s) after step %d, the checkpoint resumed from",
                        len(lines) - len(kept), resume_step)
            with open(self._path, "w") as metrics_file:
                metrics_file.writelines(kept)

    def write(self, step: int, measurements: dict[str, float]) -> dict:
        """Writes `measurements` at `step`; returns the record written.

        A metric with a value per class (F1Score with `average=None`) is a
        list, as `fit`'s history holds it, and one TensorBoard scalar per
        class, `<name>/<class>`.
        """
        record = {"step": int(step), **{name: _as_json_value(value) for name, value in measurements.items()}}
        if self._write_files:
            with _naming_model_dir(self._path):
                with open(self._path, "a") as metrics_file:
                    metrics_file.write(json.dumps(record) + "\n")
                with self._summary_writer.as_default(step=record["step"]):
                    for name, value in record.items():
                        if name == "step":
                            continue
                        for tag, scalar in ([(f"{name}/{index}", part) for index, part in enumerate(value)]
                                            if isinstance(value, list) else [(name, value)]):
                            tf.summary.scalar(tag, scalar)
                self._summary_writer.flush()
        self.records.append(record)
        return record


def _as_json_value(value):
    """An int as it is, a scalar as a float, a value per class as a list of floats."""
    if isinstance(value, int):
        return value
    array = np.asarray(value, dtype=np.float64)
    return float(array) if array.ndim == 0 else array.ravel().tolist()


class Checkpoints:
    """Model and optimizer state under `model_dir/checkpoints`, numbered by step.

    A checkpoint's number is the step it was saved at, so a restored run
    knows where it is; the optimizer's own count (Adam's bias correction,
    a schedule's position) comes back with its state. Under
    MultiWorkerMirroredStrategy every worker must take part in a save; only
    the chief's is kept, the others write to a scratch directory and delete it.
    """

    def __init__(self, model_dir: str, *, model: keras.Model, optimizer: keras.optimizers.Optimizer,
                 is_chief: bool, **more_state: tf.Module):
        # `more_state`: other trackables a resumed run needs (e.g. the best validation value).
        self._checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, **more_state)
        self.directory = os.path.join(model_dir, CHECKPOINT_DIR)
        self._chief_manager = (tf.train.CheckpointManager(self._checkpoint, self.directory, max_to_keep=3)
                               if is_chief else None)
        variables = [variable for variable in [*model.weights, *optimizer.variables]
                     if keras.backend.is_float_dtype(variable.dtype)]

        @tf.function
        def all_finite():
            return tf.reduce_all([tf.reduce_all(tf.math.is_finite(variable)) for variable in variables])

        self._all_finite = all_finite

    def restore_latest(self) -> int:
        """Restores the newest checkpoint that can be read; returns its step (0 if none).

        Raises:
          ConfigError: naming --model_dir, when checkpoints exist and none can be read.
        """
        state = tf.train.get_checkpoint_state(self.directory)
        paths = list(reversed(state.all_model_checkpoint_paths)) if state else []
        for path in paths:
            try:
                self._checkpoint.restore(path).assert_existing_objects_matched()
            # A damaged file fails however the reader meets it: DataLossError,
            # NotFoundError, IndexError ("Read less bytes than requested"), ...
            except Exception as error:
                logger.warning("Checkpoint %s cannot be read (%s); trying the one before it", path,
                               first_line(error))
                continue
            logger.info("Restored %s", path)
            return _step_of(path)
        if paths:
            raise ConfigError("model_dir", f"no checkpoint in {self.directory} can be read (newest: {paths[0]}); "
                                           f"move the directory away to start afresh")
        return 0

    def save(self, step: int) -> None:
        """Saves at `step` (every worker must call this), if every value is finite.

        Raises:
          NonFiniteError: a weight or optimizer slot is NaN or infinite; the
            previous checkpoints are left as they are.
        """
        if not bool(self._all_finite()):
            raise NonFiniteError(f"weights or optimizer state became NaN or infinite by step {step}, while the "
                                 f"losses were finite", kept_step=self.latest_step)
        with _naming_model_dir(self.directory):
            if self._chief_manager:
                self._chief_manager.save(checkpoint_number=step)
                return
            scratch = tempfile.mkdtemp(prefix="mto_tf_worker_checkpoint_")
            try:
                tf.train.CheckpointManager(self._checkpoint, scratch, max_to_keep=1).save(checkpoint_number=step)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)

    @property
    def latest_step(self) -> int | None:
        """The step of the newest checkpoint on disk (None if there is none)."""
        latest = tf.train.latest_checkpoint(self.directory)
        return _step_of(latest) if latest else None


def _step_of(checkpoint_path: str) -> int:
    """The step a checkpoint was saved at: its number (not the optimizer's count, which
    --grad_accum_steps and skipped float16 steps make smaller)."""
    return int(checkpoint_path.rsplit("-", 1)[1])


@contextlib.contextmanager
def _naming_model_dir(path: str):
    """An unwritable or full --model_dir is a one-line error naming the flag and the path."""
    try:
        yield
    except (OSError, tf.errors.OpError) as error:
        raise ConfigError("model_dir", f"cannot write {path}: {first_line(error)}") from None


def save_final_model(model_dir: str, model: keras.Model) -> None:
    """Writes the final weights (`model.load_weights` reads them) and the whole model."""
    with _naming_model_dir(model_dir):
        model.save_weights(os.path.join(model_dir, WEIGHTS_FILE))
        model.save(os.path.join(model_dir, MODEL_FILE))


def weights_fingerprint(model: keras.Model) -> str:
    """A short hash of every weight's bytes: equal on workers that hold equal weights."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(weight.tobytes())
    return digest.hexdigest()[:16]
