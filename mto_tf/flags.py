"""Every `mto-train` flag, parsed and validated into a `TrainConfig`.

Defaults come from `TrainConfig`, so the library and the command line agree.
`--flagfile=PATH` (one flag per line) works as for any absl program.
"""

from __future__ import annotations

import dataclasses

from absl import flags

from mto_tf import config as config_lib
from mto_tf.config import ConfigError, TrainConfig

FLAGS = flags.FLAGS
_DEFAULTS = TrainConfig()


def _default(name: str):
    return getattr(_DEFAULTS, name)


def _format_pairs(mapping) -> str:
    return ",".join(f"{key}={value}" for key, value in mapping.items())


def _format_metrics(metrics) -> str:
    return ",".join(f"{output}={name}" for output, names in metrics.items() for name in names)


# Model.
flags.DEFINE_string("model", _default("model"), "Registered model builder (mto_tf/models.py).")
flags.DEFINE_integer("vocab_size", _default("vocab_size"), "Token ids are in [0, vocab_size).")
flags.DEFINE_integer("sequence_length", _default("sequence_length"), "Tokens per headline (main_input).")
flags.DEFINE_integer("embedding_dim", _default("embedding_dim"), "Embedding width.")
flags.DEFINE_integer("lstm_units", _default("lstm_units"), "LSTM units (the shared trunk's output width).")
flags.DEFINE_integer("dense_units", _default("dense_units"), "Width of the main head's three Dense layers.")
flags.DEFINE_integer("aux_input_dim", _default("aux_input_dim"), "Floats in aux_input.")
flags.DEFINE_float("l2", _default("l2"), "L2 factor on every kernel; 0 for none.")

# Data.
flags.DEFINE_string("dataset", _default("dataset"), "'synthetic_headlines' (generated locally) or 'npz:PATH'.")
flags.DEFINE_string("data_dir", _default("data_dir"), "TFDS data directory (default: TFDS's own).")
flags.DEFINE_integer("synthetic_train_examples", _default("synthetic_train_examples"),
                     "Size of synthetic_headlines' train split.")
flags.DEFINE_integer("synthetic_validation_examples", _default("synthetic_validation_examples"),
                     "Size of synthetic_headlines' validation split.")
flags.DEFINE_integer("shuffle_buffer", _default("shuffle_buffer"), "Shuffle buffer in examples; 0 keeps file order.")

# Losses.
flags.DEFINE_string("losses", _format_pairs(_default("losses")),
                    "OUTPUT=LOSS for every output; LOSS is a Keras loss function name.")
flags.DEFINE_string("loss_weights", _format_pairs(_default("loss_weights")),
                    "OUTPUT=WEIGHT for every output: the total loss is sum(weight * loss).")
flags.DEFINE_string("metrics", _format_metrics(_default("metrics")),
                    "OUTPUT=METRIC pairs (repeat an output for several metrics); empty for none.")

# Optimization.
flags.DEFINE_enum("optimizer", _default("optimizer"), list(config_lib.OPTIMIZERS), "Keras optimizer.")
flags.DEFINE_float("learning_rate", _default("learning_rate"), "Learning rate.")
flags.DEFINE_integer("batch_size", _default("batch_size"),
                     "GLOBAL batch size; each replica gets batch_size / replicas examples.")
flags.DEFINE_integer("train_steps", _default("train_steps"), "Total steps; a resumed run continues up to it.")
flags.DEFINE_integer("steps_per_loop", _default("steps_per_loop"), "Steps inside one tf.function call.")
flags.DEFINE_boolean("jit_compile", _default("jit_compile"),
                     "Compile the train step with XLA (custom loop; compile(jit_compile=...) with --loop=fit).")
flags.DEFINE_integer("seed", _default("seed"), "Seeds initial weights and shuffling.")

# Distribution.
flags.DEFINE_enum("strategy", _default("strategy"), list(config_lib.STRATEGIES), "tf.distribute strategy.")
flags.DEFINE_integer("num_cpu_devices", _default("num_cpu_devices"),
                     "Split the CPU into N logical devices: N replicas per process for mirrored or "
                     "multi_worker without GPUs.")
flags.DEFINE_enum("cluster_resolver", _default("cluster_resolver"), list(config_lib.CLUSTER_RESOLVERS),
                  "multi_worker: read the cluster from TF_CONFIG, or from SLURM's environment inside srun.")

# Outputs.
flags.DEFINE_string("model_dir", _default("model_dir"), "Metrics, checkpoints and final model; a rerun resumes.")
flags.DEFINE_integer("log_every", _default("log_every"), "Steps per line of metrics.jsonl.")
flags.DEFINE_integer("checkpoint_every", _default("checkpoint_every"), "Steps between checkpoints.")
flags.DEFINE_string("init_weights", _default("init_weights"), "PATH.weights.h5 to start from.")
flags.DEFINE_enum("loop", _default("loop"), list(config_lib.LOOPS),
                  "'custom' (the explicit GradientTape loop) or 'fit' (model.fit, to compare).")


def config_from_flags(flag_values: flags.FlagValues = FLAGS) -> TrainConfig:
    """Builds and validates a `TrainConfig` from parsed flags; raises `ConfigError`."""
    values = {field.name: flag_values[field.name].value for field in dataclasses.fields(TrainConfig)}
    values["losses"] = _parse_pairs("losses", values["losses"], str)
    values["loss_weights"] = _parse_pairs("loss_weights", values["loss_weights"], float)
    values["metrics"] = _parse_metrics(values["metrics"])
    return TrainConfig(**values)


def _parse_pairs(flag: str, text: str, value_type: type) -> dict:
    pairs = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, separator, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not separator or not key or not value:
            raise ConfigError(flag, f"expected OUTPUT=VALUE pairs separated by commas, got {item!r}")
        if key in pairs:
            raise ConfigError(flag, f"output {key!r} given twice")
        try:
            pairs[key] = value_type(value)
        except ValueError:
            raise ConfigError(flag, f"expected a number for {key!r}, got {value!r}") from None
    return pairs


def _parse_metrics(text: str) -> dict[str, tuple[str, ...]]:
    metrics: dict[str, tuple[str, ...]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        output, separator, metric = (part.strip() for part in item.partition("="))
        if not separator or not output or not metric:
            raise ConfigError("metrics", f"expected OUTPUT=METRIC pairs separated by commas, got {item!r}")
        metrics[output] = (*metrics.get(output, ()), metric)
    return metrics
