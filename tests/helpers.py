"""What several test modules share: small configs and data, the `fit` references, running the programs.

Test modules import from here, never from each other.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from absl.testing import flagsaver

from mto_tf.config import TrainConfig
from mto_tf.core.models import MODELS

NUM_CPU_DEVICES = 2
# Small enough to trace and run in seconds, large enough that every layer
# (embedding, LSTM, three Dense, two heads) is exercised.
SMALL_MODEL = dict(vocab_size=50, sequence_length=8, embedding_dim=8, lstm_units=4, dense_units=8)
BATCH_SIZE = 16
HEADLINE = MODELS["headline"]  # Its own losses and weights: what mto-train uses unless told otherwise.

# The session's directory (set by conftest): its tfds/ holds synthetic_headlines,
# generated once per size, which every test and every program a test starts
# reads; its shared/ holds what `once` makes.
SESSION_DIR: str | None = None
_ONCE: dict = {}


def data_dir() -> str:
    """The session's TFDS data directory (synthetic_headlines, generated once per size)."""
    assert SESSION_DIR, "conftest sets it for the session"
    return os.path.join(SESSION_DIR, "tfds")


def once(key, compute):
    """`compute(directory)`, computed once per test process for `key`, with a directory of its own to write in.

    For what several tests compare against: the same data, initial weights
    and `fit` reference, made once. Tests must not change what they get.
    """
    key = repr(key)  # Settings may be dicts.
    if key not in _ONCE:
        directory = Path(SESSION_DIR) / "shared" / str(len(_ONCE))
        directory.mkdir(parents=True)
        _ONCE[key] = compute(directory)
    return _ONCE[key]


def docs_script(name: str):
    """A script of docs/ (e.g. "experiments/toy.py") imported as a module, for its tests to call its functions."""
    path = Path(__file__).parents[1] / "docs" / name
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small_config(tmp_path, **overrides) -> TrainConfig:
    """A `TrainConfig` for the small headline model; `overrides` win."""
    settings = dict(SMALL_MODEL, batch_size=BATCH_SIZE, train_steps=6, steps_per_loop=1, log_every=1,
                    checkpoint_every=1000, data_dir=data_dir(), model_dir=str(tmp_path / "run"),
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


def prepare_tfds_headlines(arrays: dict, data_dir, *, file_format: str) -> None:
    """`write_npz`'s arrays as TFDS dataset `headlines` in `data_dir`, stored as `file_format` (`array_record` or
    `tfrecord`): the model's features by their names but for `main_input` (`text/tokens`, so that it needs
    `--feature_map=HEADLINES_FEATURE_MAP`), and a text feature the model does not read."""
    import tensorflow_datasets as tfds

    class Headlines(tfds.core.GeneratorBasedBuilder, skip_registration=True):  # Read as another program would.
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "text": tfds.features.FeaturesDict({"tokens": tfds.features.Tensor(
                    shape=arrays["main_input"].shape[1:], dtype=arrays["main_input"].dtype)}),
                "aux_input": tfds.features.Tensor(shape=arrays["aux_input"].shape[1:], dtype=np.float32),
                "main_output": tfds.features.Tensor(shape=(1,), dtype=np.float32),
                "aux_output": tfds.features.Tensor(shape=(1,), dtype=np.float32),
                "notes": tfds.features.Text(),  # Not read: never decoded.
            }), disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for row in range(len(arrays["main_input"])):
                yield row, {"text": {"tokens": arrays["main_input"][row]}, "aux_input": arrays["aux_input"][row],
                            "main_output": np.reshape(arrays["main_output"][row], [1]),
                            "aux_output": np.reshape(arrays["aux_output"][row], [1]), "notes": f"headline {row}"}

    with contextlib.redirect_stdout(io.StringIO()):  # TFDS announces what it prepares.
        Headlines(data_dir=str(data_dir), file_format=file_format).download_and_prepare()


HEADLINES_FEATURE_MAP = "main_input=text/tokens"


def shared_npz_and_init_weights(key, init_config: TrainConfig, **npz_options) -> tuple[Path, dict]:
    """`write_npz` data and `init_config`'s headline initial weights, made once per test process for `key`.

    Returns the directory holding `data.npz` and `init.weights.h5`, and the arrays.
    """
    from mto_tf.core.models import build_headline

    def make(directory):
        arrays = write_npz(directory / "data.npz", **npz_options)
        build_headline(init_config).save_weights(directory / "init.weights.h5")
        return directory, arrays

    return once(("npz and initial weights", key), make)


def max_weight_difference(weights_a, weights_b):
    return max(float(np.max(np.abs(a - b))) for a, b in zip(weights_a, weights_b, strict=True))


# Reported losses: fit reads them back through `Mean` trackers, the custom
# loop as a sum of replica shares, so the last bit may differ.
LOSS_RTOL = 1e-6


def keras_optimizer(config):
    """The Keras optimizer a test's config names, built by hand for a `fit` reference."""
    return {"sgd": keras.optimizers.SGD, "adam": keras.optimizers.Adam,
            "rmsprop": keras.optimizers.RMSprop}[config.optimizer](learning_rate=config.learning_rate)


# --- Validation references --------------------------------------------------------------------

OUTPUTS = ("main_output", "aux_output")
# Validation sums are formed in another order than Keras's (per replica,
# then over batches): float32 rounding of a few ulps.
VALUE_RTOL = 1e-5


def compiled_headline(model):
    # Metrics weighted by the sample weights, as mto_tf's are (an example of weight 0 has no label).
    model.compile(loss=dict(HEADLINE.losses), loss_weights=dict(HEADLINE.loss_weights),
                  weighted_metrics={name: ["binary_accuracy"] for name in OUTPUTS})
    return model


def validation_elements(arrays):
    inputs = {"main_input": arrays["main_input"].astype("int32"), "aux_input": arrays["aux_input"]}
    labels = {name: arrays[name].reshape(-1, 1) for name in OUTPUTS}
    sample_weights = {name: arrays[f"sample_weight/{name}"] for name in OUTPUTS}
    return inputs, labels, sample_weights


def exact_means(model, arrays):
    """Each output's sum of sample weight x binary cross-entropy over all examples, / examples (NumPy)."""
    inputs, labels, sample_weights = validation_elements(arrays)
    predictions = model.predict(inputs, batch_size=len(arrays["aux_input"]), verbose=0)
    means = {}
    for name in OUTPUTS:
        per_example = keras.losses.binary_crossentropy(labels[name], predictions[name]).numpy()
        means[name] = float(np.sum(per_example * sample_weights[name]) / len(per_example))
    return means


def evaluate_with_keras(model, arrays):
    dataset = tf.data.Dataset.from_tensor_slices(validation_elements(arrays)).batch(BATCH_SIZE)
    return compiled_headline(model).evaluate(dataset, return_dict=True, verbose=0)


# --- Programs in a fresh process, and in this one ---------------------------------------------

MODEL_FLAGS = [f"--{name}={value}" for name, value in SMALL_MODEL.items()] + [f"--batch_size={BATCH_SIZE}"]
SMALL_FLAGS = MODEL_FLAGS + ["--synthetic_train_examples=128", "--synthetic_validation_examples=32"]
TIMEOUT_SECONDS = 180


def run_cli(*args, entry_point=("mto-train",), cwd=None):
    """Runs the command line in a fresh process; returns the finished process (stdout and stderr as text)."""
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([*entry_point, *args], capture_output=True, text=True, timeout=TIMEOUT_SECONDS,
                          env=environment, cwd=cwd)


def run_in_process(program: str, program_main, *args, check=None, define_flags=None) -> subprocess.CompletedProcess:
    """Runs a program's main in this process as its command line would; returns what `run_cli` returns.

    The flags are parsed by the program's own parser and restored
    afterwards; errors take the same path to a one-line message and a
    status as in a fresh process (`mto_tf.programs.runner`).
    """
    from mto_tf.programs import flags as mto_flags
    from mto_tf.programs import runner

    if define_flags:
        define_flags()
    stdout, stderr = io.StringIO(), io.StringIO()
    with flagsaver.flagsaver(), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        mto_flags.FLAGS.unparse_flags()
        try:
            argv = runner.parse_flags([program, *args], program=program)
            status = runner.run_parsed(program, program_main, argv, check=check)
        except SystemExit as exit_:
            status = exit_.code
        finally:
            mto_flags.FLAGS.unparse_flags()
    return subprocess.CompletedProcess([program, *args], status, stdout.getvalue(), stderr.getvalue())


def mto_train_in_process(*args) -> subprocess.CompletedProcess:
    """`mto-train` with `args`, in this process (see `run_in_process`)."""
    from mto_tf.programs import flags as mto_flags
    from mto_tf.programs import mto_train

    return run_in_process("mto-train", mto_train.train_main, *args, check=mto_flags.config_from_flags)


# --- Several workers, started by launch/local.py ----------------------------------------------

LAUNCHER = str(Path(__file__).parents[1] / "launch" / "local.py")
LAUNCH_TIMEOUT_SECONDS = 240
MULTI_WORKER_FLAGS = [*MODEL_FLAGS, "--strategy=multi_worker", "--optimizer=adam", "--learning_rate=0.01"]


class Launch:
    """launch/local.py running `mto-train` workers, its output collected line by line."""

    def __init__(self, *mto_train_flags, workers=2, restarts=0, scratch_dir=None, base_flags=MULTI_WORKER_FLAGS):
        """`base_flags`: what every launch of a module passes (the small headline model's, unless told otherwise)."""
        self.lines: list[str] = []
        environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        if scratch_dir:
            environment["TMPDIR"] = str(scratch_dir)
        self.process = subprocess.Popen(
            [sys.executable, LAUNCHER, f"--workers={workers}", f"--restarts={restarts}",
             f"--timeout={LAUNCH_TIMEOUT_SECONDS}", "--", "mto-train", *base_flags, *mto_train_flags],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment)
        self._new_line = threading.Condition()
        self._output_ended = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            with self._new_line:
                self.lines.append(line)
                self._new_line.notify_all()
        with self._new_line:
            self._output_ended = True
            self._new_line.notify_all()

    def wait_for_line(self, pattern: str) -> re.Match:
        """Blocks until a line matches `pattern`; returns the match."""
        deadline = time.monotonic() + LAUNCH_TIMEOUT_SECONDS
        with self._new_line:
            while time.monotonic() < deadline:
                for line in self.lines:
                    if match := re.search(pattern, line):
                        return match
                if self._output_ended:
                    break
                self._new_line.wait(timeout=1)
        raise AssertionError(f"no line matched {pattern!r}:\n{''.join(self.lines[-40:])}")

    def wait(self) -> int:
        """The launcher's exit status, once its output has all been read."""
        status = self.process.wait(timeout=LAUNCH_TIMEOUT_SECONDS + 30)
        with self._new_line:
            self._new_line.wait_for(lambda: self._output_ended, timeout=30)
        return status

    @property
    def output(self) -> str:
        return "".join(self.lines)


# --- A user's own model, in a file of the user's ----------------------------------------------

MODULE_NAME = "ticket_model"
MODULE_SOURCE = textwrap.dedent('''
    """A support-ticket router: what a user writes, in a file of their own."""
    import keras


    def build():
        tokens = keras.Input(shape=(None,), dtype="int32", name="tokens")  # Any length.
        extra = keras.Input(shape=(3,), name="extra")
        pooled = keras.layers.GlobalAveragePooling1D(name="pool")(keras.layers.Embedding(30, 6, name="embed")(tokens))
        trunk = keras.layers.Dense(8, activation="relu", name="trunk")(
            keras.layers.Concatenate(name="join")([pooled, extra]))
        urgent = keras.layers.Dense(1, name="urgent")(trunk)  # Logits.
        tags = keras.layers.Dense(4, activation="sigmoid", name="tags")(trunk)  # Multi-hot, no softmax.
        department = keras.layers.Dense(5, activation="softmax", name="department")(pooled)
        return keras.Model([tokens, extra], [urgent, tags, department], name="ticket_router")


    def tags_loss(y_true, y_pred):
        """A loss of the user's own: per-example squared error, summed over tags."""
        return keras.ops.sum(keras.ops.square(y_true - y_pred), axis=-1)


    def worst_tag_error(y_true, y_pred):
        """A metric of the user's own: per example, the largest error over its tags."""
        return keras.ops.max(keras.ops.abs(y_true - y_pred), axis=-1)


    def not_a_model():
        return "a model"


    def one_output():
        inputs = keras.Input(shape=(3,), name="x")
        return keras.Model(inputs, keras.layers.Dense(1, name="y")(inputs))


    def broken():
        raise RuntimeError("the GPU is on fire")


    NOT_CALLABLE = 3
''')

TICKET_LOSSES = {"urgent": {"class_name": "BinaryCrossentropy", "config": {"from_logits": True}},
          "tags": "categorical_crossentropy", "department": "sparse_categorical_crossentropy"}
NUM_TICKETS = 64


def write_ticket_npz(path, *, seed=0):
    """Arrays named by the model's inputs and outputs; sample weights on one output only."""
    rng = np.random.default_rng(seed)
    arrays = {
        "tokens": rng.integers(0, 30, (NUM_TICKETS, 7)).astype(np.int32),
        "extra": rng.standard_normal((NUM_TICKETS, 3)).astype(np.float32),
        "urgent": rng.integers(0, 2, NUM_TICKETS).astype(np.float32),
        "tags": (rng.random((NUM_TICKETS, 4)) < 0.4).astype(np.float32),
        "department": rng.integers(0, 5, NUM_TICKETS).astype(np.int32),
        "sample_weight/department": rng.choice([0.0, 0.5, 1.0, 2.0], NUM_TICKETS).astype(np.float32),
    }
    np.savez(path, **arrays)
    return arrays
