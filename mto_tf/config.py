"""`TrainConfig`: everything one training run needs, as one frozen object.

The library takes a `TrainConfig`; absl flags are only one way to build it
(see `mto_tf/flags.py`). Each field has the name of the flag that sets it, so
an error about a field can name the flag a user has to fix.

One run on one device, from Python, with no absl:

    from mto_tf.config import TrainConfig
    from mto_tf.trainer import train
    train(TrainConfig(model_dir="/tmp/run", train_steps=100))
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping

OPTIMIZERS = ("sgd", "adam", "rmsprop")
STRATEGIES = ("default", "one_device", "mirrored", "multi_worker")
CLUSTER_RESOLVERS = ("tf_config", "slurm")
LOOPS = ("custom", "fit")


class ConfigError(ValueError):
    """A setting that cannot work, named by its flag.

    Raised before anything is built or written, so the user sees one line
    (`--flag: what was expected`) instead of a traceback from TensorFlow.
    """

    def __init__(self, flag: str, message: str):
        super().__init__(f"--{flag}: {message}")
        self.flag = flag


def _default_losses() -> dict[str, str]:
    return {"main_output": "binary_crossentropy", "aux_output": "binary_crossentropy"}


def _default_loss_weights() -> dict[str, float]:
    # The Keras functional-API guide's weights: the auxiliary head is a
    # regularizer for the shared trunk, so it counts for a fifth.
    return {"main_output": 1.0, "aux_output": 0.2}


def _default_metrics() -> dict[str, tuple[str, ...]]:
    return {"main_output": ("binary_accuracy",), "aux_output": ("binary_accuracy",)}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. Field names are the flag names of `mto-train`."""

    # Model (sizes are settings so that tests can make the model small).
    model: str = "headline"
    vocab_size: int = 10000
    sequence_length: int = 100
    embedding_dim: int = 512
    lstm_units: int = 32
    dense_units: int = 64
    aux_input_dim: int = 5
    l2: float = 0.0

    # Data.
    dataset: str = "synthetic_headlines"
    data_dir: str | None = None
    synthetic_train_examples: int = 10000
    synthetic_validation_examples: int = 1000
    shuffle_buffer: int = 0

    # Losses: one loss per output, one weight per output, metrics per output.
    losses: Mapping[str, str] = dataclasses.field(default_factory=_default_losses)
    loss_weights: Mapping[str, float] = dataclasses.field(default_factory=_default_loss_weights)
    metrics: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=_default_metrics)

    # Optimization.
    optimizer: str = "rmsprop"
    learning_rate: float = 0.001
    batch_size: int = 64  # GLOBAL batch size: split evenly across replicas.
    train_steps: int = 500
    steps_per_loop: int = 10
    jit_compile: bool = False  # XLA for the train step, in both loops.
    seed: int = 0

    # Distribution.
    strategy: str = "default"
    num_cpu_devices: int = 1
    cluster_resolver: str = "tf_config"  # Where multi_worker finds its cluster.

    # Outputs.
    model_dir: str = "/tmp/mto_tf"
    log_every: int = 50
    checkpoint_every: int = 250
    init_weights: str | None = None
    loop: str = "custom"

    def __post_init__(self):
        _check_positive(self, "vocab_size", "sequence_length", "embedding_dim",
                        "lstm_units", "dense_units", "aux_input_dim", "batch_size",
                        "train_steps", "steps_per_loop", "log_every", "checkpoint_every",
                        "num_cpu_devices", "synthetic_train_examples",
                        "synthetic_validation_examples")
        if self.vocab_size < 3:
            raise ConfigError("vocab_size", f"expected >= 3 (token 0 pads, and each synthetic sentiment owns a token), "
                                            f"got {self.vocab_size}")
        if self.l2 < 0:
            raise ConfigError("l2", f"expected a factor >= 0, got {self.l2}")
        if self.shuffle_buffer < 0:
            raise ConfigError("shuffle_buffer", f"expected >= 0 (0 keeps file order), got {self.shuffle_buffer}")
        if not self.learning_rate > 0:
            raise ConfigError("learning_rate", f"expected a number > 0, got {self.learning_rate}")
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("strategy", self.strategy, STRATEGIES)
        _check_choice("loop", self.loop, LOOPS)
        _check_choice("cluster_resolver", self.cluster_resolver, CLUSTER_RESOLVERS)
        if self.num_cpu_devices > 1 and self.strategy not in ("mirrored", "multi_worker"):
            raise ConfigError(
                "num_cpu_devices",
                f"splitting the CPU into {self.num_cpu_devices} devices only serves "
                f"--strategy=mirrored or multi_worker, got --strategy={self.strategy}")
        if self.jit_compile and self.strategy in ("mirrored", "multi_worker"):
            # XLA compiles a step for one device; a step that spans replicas
            # reads variables on other devices (Keras's "auto" turns XLA off
            # under tf.distribute for the same reason).
            raise ConfigError("jit_compile", f"XLA compiles a step for one device; not with "
                                             f"--strategy={self.strategy}")
        if self.loop == "fit" and self.strategy == "mirrored" and self.steps_per_loop > 1:
            raise ConfigError("steps_per_loop", "with --loop=fit under --strategy=mirrored, must be 1: Keras 3.15's "
                                                "fit fails there with steps_per_execution > 1 (keras-team/keras#19246)")
        if self.loop == "fit" and self.strategy == "multi_worker":
            raise ConfigError("loop", "model.fit does not run under MultiWorkerMirroredStrategy in Keras 3.15 "
                                      "(keras-team/keras#20585); use --loop=custom")
        if not (self.dataset == "synthetic_headlines" or self.dataset.startswith("npz:")):
            raise ConfigError("dataset", f"expected 'synthetic_headlines' or 'npz:PATH', got {self.dataset!r}")
        if self.dataset.startswith("npz:") and not os.path.isfile(self.dataset[4:]):
            raise ConfigError("dataset", f"npz file not found: {self.dataset[4:]!r}")
        if self.init_weights is not None and not os.path.isfile(self.init_weights):
            raise ConfigError("init_weights", f"file not found: {self.init_weights!r}")
        if self.init_weights is not None and not self.init_weights.endswith(".weights.h5"):
            raise ConfigError("init_weights", f"expected a Keras weights file PATH.weights.h5, got {self.init_weights!r}")
        if self.loop == "fit":
            _check_fit_loop_windows(self)
        self._check_outputs()

    def _check_outputs(self):
        # Imported here: those modules import this one for `ConfigError`.
        from mto_tf import losses, models
        spec = models.get_spec(self.model)  # Raises a ConfigError naming --model.
        expected = sorted(spec.output_names)
        for flag in ("losses", "loss_weights"):
            given = dict(getattr(self, flag))
            unknown = sorted(set(given) - set(expected))
            if unknown:
                raise ConfigError(flag, f"unknown output {unknown[0]!r}; model {self.model!r} has outputs {expected}")
            missing = sorted(set(expected) - set(given))
            if missing:
                raise ConfigError(flag, f"no entry for output {missing[0]!r}; expected one for each of {expected}")
        for output, weight in self.loss_weights.items():
            if not (math.isfinite(weight) and weight >= 0):
                raise ConfigError("loss_weights", f"weight of {output!r} must be a finite number >= 0, got {weight}")
        unknown = sorted(set(self.metrics) - set(expected))
        if unknown:
            raise ConfigError("metrics", f"unknown output {unknown[0]!r}; model {self.model!r} has outputs {expected}")
        for loss_name in self.losses.values():
            losses.get_loss_fn(loss_name)
        # Metric names are checked when the metrics are made (before anything
        # is written): making one creates variables, which would start the
        # TensorFlow runtime before the CPU can be split into devices.

    @property
    def output_names(self) -> list[str]:
        """The model's output names, in the order losses are summed."""
        return list(self.losses)


def _check_positive(config: TrainConfig, *fields: str):
    for field in fields:
        value = getattr(config, field)
        if not (isinstance(value, int) and value > 0):
            raise ConfigError(field, f"expected an integer > 0, got {value!r}")


def _check_choice(field: str, value: str, choices: tuple[str, ...]):
    if value not in choices:
        raise ConfigError(field, f"expected one of {', '.join(choices)}; got {value!r}")


def _check_fit_loop_windows(config: TrainConfig):
    # model.fit reports and logs per epoch; mto_tf maps one epoch to one
    # logging window of --log_every steps, so the run and its checkpoints
    # must fall on window boundaries.
    for field in ("train_steps", "checkpoint_every"):
        if getattr(config, field) % config.log_every:
            raise ConfigError(
                field, f"with --loop=fit, must be a multiple of --log_every={config.log_every} "
                f"(one fit epoch per logging window), got {getattr(config, field)}")
    if config.log_every % config.steps_per_loop:
        raise ConfigError("log_every", f"with --loop=fit, must be a multiple of --steps_per_loop="
                                       f"{config.steps_per_loop} (fit's steps_per_execution), got {config.log_every}")
