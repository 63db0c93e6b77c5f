"""`TrainConfig`: everything one training run needs, as one frozen object.

The library takes a `TrainConfig`; absl flags are only one way to build it
(see `mto_tf/flags.py`). Each field has the name of the flag that sets it, so
an error about a field can name the flag a user has to fix.

One run on one device, from Python, with no absl:

    from mto_tf.config import TrainConfig
    from mto_tf.trainer import train
    train(TrainConfig(model_dir="/tmp/run", train_steps=100))

From Python, `model` may also be a builder (a function returning a
`keras.Model`) and `dataset` a `tf.data.Dataset` of unbatched
`(inputs, labels)` or `(inputs, labels, sample_weights)` dicts.

A config holds settings and checks what the settings alone decide. Checks
that need the built model (output names, shapes) run where it is built,
before anything is written.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

_DEFAULT_TRAIN_STEPS = 500
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")  # Keras dtype policies.
STRATEGIES = ("default", "one_device", "mirrored", "multi_worker")
CLUSTER_RESOLVERS = ("tf_config", "slurm")
LOOPS = ("custom", "fit")
PROGRESS_MODES = ("auto", "bar", "lines", "quiet")  # See mto_tf/progress.py.
DATASET_FORMS = "'synthetic_headlines', 'npz:PATH' or 'tfds:NAME[/CONFIG][:VERSION]'"

# A loss: a Keras loss name, a Keras loss config (a dict), `MODULE:FUNCTION`,
# or from Python a function or `keras.losses.Loss`. A metric likewise.
LossSpec = Any
MetricSpec = Any


class ConfigError(ValueError):
    """A setting that cannot work, named by its flag.

    Raised before anything is built or written, so the user sees one line
    (`--flag: what was expected`) instead of a traceback from TensorFlow.
    """

    def __init__(self, flag: str, message: str):
        super().__init__(f"--{flag}: {message}")
        self.flag = flag


def first_line(error: BaseException) -> str:
    """An error's message cut to one line, for one-line errors that quote TensorFlow or a user's code."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__



@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. Field names are the flag names of `mto-train`."""

    # Model: a built-in name, `MODULE:FUNCTION`, or (from Python) a builder.
    # Sizes of the built-in models are settings so that tests can make them small.
    model: str | Callable[[], Any] = "headline"
    vocab_size: int = 10000
    sequence_length: int = 100
    embedding_dim: int = 512
    lstm_units: int = 32
    dense_units: int = 64
    aux_input_dim: int = 5
    conv_filters: int = 32
    dropout_rate: float = 0.25
    sync_batchnorm: bool = False
    l2: float = 0.0

    # Data: a source name (or, from Python, a tf.data.Dataset).
    dataset: Any = "synthetic_headlines"
    data_dir: str | None = None
    train_split: str = "train"
    # Model input, output or `sample_weight/<output>` -> dataset feature.
    feature_map: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # Validation: `npz:PATH` (from Python also a tf.data.Dataset like `dataset`),
    # or a split of the training dataset (synthetic_headlines, tfds:); None:
    # its `validation` split if it has one; "" for no validation.
    validation_data: Any = None
    validation_split: str | None = None
    eval_every: int = 0  # Steps between evaluations; 0: only at the end.
    eval_steps: int | None = None  # Global batches per evaluation; None: all, the last partial one included.
    synthetic_train_examples: int = 10000
    synthetic_validation_examples: int = 1000
    shuffle_buffer: int = 0

    # Losses: one per output, one weight per output, metrics per output.
    # None: the built-in model's own (for `MODULE:FUNCTION` models: losses
    # must be given, weights default to 1.0, no metrics).
    losses: Mapping[str, LossSpec] | None = None
    loss_weights: Mapping[str, float] | None = None
    metrics: Mapping[str, tuple[MetricSpec, ...]] | None = None
    # Output -> {class id: weight}; multiplies the sample weights of training examples.
    class_weights: Mapping[str, Mapping[int, float]] = dataclasses.field(default_factory=dict)

    # Optimization, as Keras configures it (see mto_tf/optimization.py).
    optimizer: str | Mapping[str, Any] = "rmsprop"  # A Keras optimizer name or config.
    # A number or a Keras schedule config; None: the optimizer's own.
    learning_rate: float | Mapping[str, Any] | None = None
    # Keras's clipping (at most one), applied to the gradient summed over every replica.
    clipnorm: float | None = None
    global_clipnorm: float | None = None
    clipvalue: float | None = None
    grad_accum_steps: int = 1  # Batches per update; each update applies the mean of their gradients.
    precision: str = "float32"  # A Keras dtype policy: float32, mixed_float16 or mixed_bfloat16.
    xla_update: bool = False  # XLA for the optimizer's update alone (one replica; see README's Performance).
    batch_size: int = 64  # GLOBAL batch size: split evenly across replicas.
    train_steps: int | None = _DEFAULT_TRAIN_STEPS  # Replaced by `epochs` when that is set.
    epochs: int | None = None  # Passes over the training data, each ending with its partial batch.
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
    progress: str = "auto"  # A bar on a terminal, else a line per logging window.
    log_gradient_shares_every: int = 0  # Steps between measurements of each output's share per layer; 0: never.
    save_best: str | None = None  # A `val_` value: best.weights.h5 whenever it improves.
    early_stopping_patience: int | None = None  # Evaluations without improvement of `save_best` before stopping.

    def __post_init__(self):
        if self.epochs is not None:
            if self.train_steps not in (None, _DEFAULT_TRAIN_STEPS):
                raise ConfigError("epochs", f"counts the run in passes over the data; leave --train_steps "
                                            f"unset, got --train_steps={self.train_steps}")
            _check_positive(self, "epochs")
            object.__setattr__(self, "train_steps", None)  # Known once the data is counted.
        else:
            _check_positive(self, "train_steps")
        _check_positive(self, "vocab_size", "sequence_length", "embedding_dim",
                        "lstm_units", "dense_units", "aux_input_dim", "conv_filters", "batch_size",
                        "steps_per_loop", "log_every", "checkpoint_every",
                        "num_cpu_devices", "synthetic_train_examples",
                        "synthetic_validation_examples")
        if self.vocab_size < 3:
            raise ConfigError("vocab_size", f"expected >= 3 (token 0 pads, and each synthetic sentiment owns a token), "
                                            f"got {self.vocab_size}")
        if self.l2 < 0:
            raise ConfigError("l2", f"expected a factor >= 0, got {self.l2}")
        if not 0 <= self.dropout_rate < 1:
            raise ConfigError("dropout_rate", f"expected a rate in [0, 1), got {self.dropout_rate}")
        if self.shuffle_buffer < 0:
            raise ConfigError("shuffle_buffer", f"expected >= 0 (0 keeps file order), got {self.shuffle_buffer}")
        self._check_optimization()
        _check_choice("strategy", self.strategy, STRATEGIES)
        _check_choice("loop", self.loop, LOOPS)
        _check_choice("progress", self.progress, PROGRESS_MODES)
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
        self._check_model()
        self._check_dataset()
        self._check_validation()
        _check_class_weights(self.class_weights)
        if self.init_weights is not None and not os.path.isfile(self.init_weights):
            raise ConfigError("init_weights", f"file not found: {self.init_weights!r}")
        if self.init_weights is not None and not self.init_weights.endswith(".weights.h5"):
            raise ConfigError("init_weights", f"expected a Keras weights file PATH.weights.h5, got {self.init_weights!r}")
        if self.loop == "fit":
            _check_fit_loop_windows(self)
        for output, weight in (self.loss_weights or {}).items():
            if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
                raise ConfigError("loss_weights", f"weight of {output!r} must be a finite number >= 0, got {weight}")

    def _check_optimization(self):
        if not (isinstance(self.optimizer, str) and self.optimizer or _is_keras_config(self.optimizer)):
            raise ConfigError("optimizer", f"expected a Keras optimizer name or a config "
                                           f"{{\"class_name\": ..., \"config\": ...}}, got {self.optimizer!r}")
        rate = self.learning_rate
        if not (rate is None or _is_keras_config(rate) or _is_number(rate) and rate > 0):
            raise ConfigError("learning_rate", f"expected a number > 0 or a Keras schedule config "
                                               f"{{\"class_name\": ..., \"config\": ...}}, got {rate!r}")
        clipping = [name for name in ("clipnorm", "global_clipnorm", "clipvalue") if getattr(self, name) is not None]
        for name in clipping:
            if not (_is_number(getattr(self, name)) and getattr(self, name) > 0):
                raise ConfigError(name, f"expected a number > 0, got {getattr(self, name)!r}")
        if len(clipping) > 1:  # As Keras's optimizers decide.
            raise ConfigError(clipping[1], f"give one of --clipnorm, --global_clipnorm, --clipvalue, "
                                           f"not also --{clipping[0]}")
        _check_positive(self, "grad_accum_steps")
        _check_choice("precision", self.precision, PRECISIONS)
        if self.precision == "mixed_float16" and self.grad_accum_steps > 1:
            # Keras's loss scaling checks each batch's gradients; accumulated
            # ones would be checked only at the update.
            raise ConfigError("grad_accum_steps", "not with --precision=mixed_float16 (loss scaling and "
                                                  "accumulation together are not supported)")
        if self.loop == "fit" and self.grad_accum_steps > 1 and self.strategy != "default":
            raise ConfigError("grad_accum_steps", f"with --loop=fit, only under --strategy=default: Keras 3.15 "
                                                  f"applies accumulated gradients inside a tf.cond, which "
                                                  f"{self.strategy} cannot synchronize in; use --loop=custom")
        if not (isinstance(self.log_gradient_shares_every, int) and self.log_gradient_shares_every >= 0):
            raise ConfigError("log_gradient_shares_every", f"expected steps >= 0 (0: never), "
                                                           f"got {self.log_gradient_shares_every!r}")
        if self.log_gradient_shares_every and self.loop == "fit":
            raise ConfigError("log_gradient_shares_every", "the custom loop's: not with --loop=fit")
        if self.xla_update:
            reason = ("--loop=fit" if self.loop == "fit" else "--jit_compile (it compiles the whole step)"
                      if self.jit_compile else f"--strategy={self.strategy} (TensorFlow cannot synchronize "
                      f"replicas inside an XLA function)" if self.strategy in ("mirrored", "multi_worker") else None)
            if reason:
                raise ConfigError("xla_update", f"not with {reason}")

    def _check_model(self):
        if callable(self.model):
            return
        if not (isinstance(self.model, str) and self.model):
            raise ConfigError("model", f"expected a built-in model name, MODULE:FUNCTION or a builder, "
                                       f"got {self.model!r}")
        if ":" in self.model and not is_module_function(self.model):
            raise ConfigError("model", f"expected MODULE:FUNCTION (e.g. my_models:build), got {self.model!r}")
        if self.sync_batchnorm and self.model != "shapes3d_cnn":
            raise ConfigError("sync_batchnorm", f"only the built-in shapes3d_cnn has BatchNormalization layers "
                                                f"mto_tf builds; got --model={self.model} (build your own with "
                                                f"BatchNormalization(synchronized=True))")

    def _check_dataset(self):
        if not isinstance(self.dataset, str):
            if not hasattr(self.dataset, "element_spec"):  # Duck-typed: this module imports no TensorFlow.
                raise ConfigError("dataset", f"expected {DATASET_FORMS}, or a tf.data.Dataset, "
                                             f"got {type(self.dataset).__name__}")
            return
        if self.dataset.startswith("npz:"):
            _check_npz_file("dataset", self.dataset)
        elif self.dataset.startswith("tfds:"):
            if not self.dataset[5:]:
                raise ConfigError("dataset", "expected tfds:NAME[/CONFIG][:VERSION], got no NAME")
        elif self.dataset != "synthetic_headlines":
            raise ConfigError("dataset", f"expected {DATASET_FORMS}, got {self.dataset!r}")
        if self.feature_map and not self.dataset.startswith("tfds:"):
            raise ConfigError("feature_map", f"maps features of a tfds: dataset; --dataset={self.dataset} "
                                             f"names its arrays by the model's inputs and outputs")
        if self.train_split != "train" and not self.dataset.startswith("tfds:"):
            raise ConfigError("train_split", f"chooses a split of a tfds: dataset, not of --dataset={self.dataset}")
        if self.validation_split and self.dataset.startswith("npz:"):
            raise ConfigError("validation_split", f"chooses a split of a TFDS dataset; --dataset={self.dataset} "
                                                  f"has none: give --validation_data=npz:PATH")

    def _check_validation(self):
        if self.eval_every < 0:
            raise ConfigError("eval_every", f"expected steps >= 0 (0: only at the end), got {self.eval_every}")
        if self.eval_steps is not None:
            _check_positive(self, "eval_steps")
        if self.early_stopping_patience is not None:
            _check_positive(self, "early_stopping_patience")
            if self.save_best is None:
                raise ConfigError("early_stopping_patience", "watches the value that --save_best names; "
                                                             "set --save_best=VAL_NAME too")
        if self.save_best is not None and not self.save_best.startswith("val_"):
            raise ConfigError("save_best", f"expected a validation value such as val_loss or "
                                           f"val_<output>_loss, got {self.save_best!r}")
        if self.validation_data is None:
            return
        if self.validation_split is not None:
            raise ConfigError("validation_data", "give --validation_data or --validation_split, not both")
        if isinstance(self.validation_data, str):
            if not self.validation_data.startswith("npz:"):
                raise ConfigError("validation_data", f"expected npz:PATH, got {self.validation_data!r}")
            _check_npz_file("validation_data", self.validation_data)
        elif not hasattr(self.validation_data, "element_spec"):
            raise ConfigError("validation_data", f"expected npz:PATH or a tf.data.Dataset, "
                                                 f"got {type(self.validation_data).__name__}")

    @property
    def validation_split_or_default(self) -> str | None:
        """The split to validate on (None: none), for datasets that have splits."""
        if self.validation_data is not None or self.validation_split == "":
            return None
        return self.validation_split or "validation"

    def describe(self) -> dict:
        """The settings as JSON values (what `config.json` records, and a resumed run must repeat).

        What was given from Python is recorded by name, the same in every
        process: a builder or loss function as `module:name`, a dataset or a
        Keras object by its type.
        """
        def by_name(value):
            if isinstance(value, str | int | float | bool) or value is None:
                return value
            if isinstance(value, Mapping):
                return {str(key): by_name(item) for key, item in value.items()}
            if isinstance(value, list | tuple):
                return [by_name(item) for item in value]
            if hasattr(value, "__qualname__"):  # A function.
                return f"{value.__module__}:{value.__qualname__}"
            return f"python:{type(value).__name__}"

        return {field.name: by_name(getattr(self, field.name)) for field in dataclasses.fields(self)}


def is_module_function(text: object) -> bool:
    """True for a string of the form `MODULE:FUNCTION` (a dotted module path, a colon, a name)."""
    if not isinstance(text, str):
        return False
    module, _, function = text.partition(":")
    return bool(module and function and all(part.isidentifier() for part in module.split("."))
                and function.isidentifier())


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_keras_config(value) -> bool:
    return isinstance(value, Mapping) and isinstance(value.get("class_name"), str)


def _check_positive(config: TrainConfig, *fields: str):
    for field in fields:
        value = getattr(config, field)
        if not (isinstance(value, int) and value > 0):
            raise ConfigError(field, f"expected an integer > 0, got {value!r}")


def _check_npz_file(field: str, source: str):
    """`source` is `npz:PATH`; PATH must be a file."""
    if not os.path.isfile(source.removeprefix("npz:")):
        raise ConfigError(field, f"npz file not found: {source.removeprefix('npz:')!r}")


def _check_class_weights(class_weights: Mapping[str, Mapping[int, float]]):
    """Class ids are integers >= 0, weights finite and >= 0 (checks against the outputs need the model)."""
    for output, weights in class_weights.items():
        if not isinstance(weights, Mapping) or not weights:
            raise ConfigError("class_weights", f"output {output!r}: expected {{CLASS: WEIGHT, ...}}, got {weights!r}")
        for class_id, weight in weights.items():
            if not (isinstance(class_id, int) and class_id >= 0):
                raise ConfigError("class_weights", f"output {output!r}: class {class_id!r} is not a class id >= 0")
            if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
                raise ConfigError("class_weights", f"output {output!r}, class {class_id}: weight must be a finite "
                                                   f"number >= 0, got {weight!r}")


def _check_choice(field: str, value: str, choices: tuple[str, ...]):
    if value not in choices:
        raise ConfigError(field, f"expected one of {', '.join(choices)}; got {value!r}")


def _check_fit_loop_windows(config: TrainConfig):
    # model.fit reports and logs per epoch; mto_tf maps one epoch to one
    # logging window of --log_every steps, so the run, its checkpoints and
    # its evaluations must fall on window boundaries.
    if config.epochs is not None:
        raise ConfigError("epochs", "not with --loop=fit: there one fit epoch is one logging window of "
                                    "--log_every steps, so that a run can resume from any checkpoint; "
                                    "use --train_steps, or --loop=custom")
    for field in ("train_steps", "checkpoint_every", "eval_every"):
        if getattr(config, field) % config.log_every:
            raise ConfigError(
                field, f"with --loop=fit, must be a multiple of --log_every={config.log_every} "
                f"(one fit epoch per logging window), got {getattr(config, field)}")
    if config.log_every % config.steps_per_loop:
        raise ConfigError("log_every", f"with --loop=fit, must be a multiple of --steps_per_loop="
                                       f"{config.steps_per_loop} (fit's steps_per_execution), got {config.log_every}")
