"""Every `mto-train` flag, parsed and validated into a `TrainConfig`.

Defaults come from `TrainConfig`, so the library and the command line agree.
`--flagfile=PATH` (one flag per line) works as for any absl program.
"""

from __future__ import annotations

import dataclasses
import json

from absl import flags

from mto_tf import config as config_lib
from mto_tf.config import ConfigError, TrainConfig

FLAGS = flags.FLAGS
_DEFAULTS = TrainConfig()


def _default(name: str):
    return getattr(_DEFAULTS, name)


# Model.
flags.DEFINE_string("model", _default("model"),
                    "A built-in model (headline, shapes3d_cnn) or MODULE:FUNCTION, a function of yours "
                    "(importable from the current directory or PYTHONPATH) returning an uncompiled "
                    "multi-output keras.Model.")
flags.DEFINE_integer("vocab_size", _default("vocab_size"), "headline: token ids are in [0, vocab_size).")
flags.DEFINE_integer("sequence_length", _default("sequence_length"), "headline: tokens per headline (main_input).")
flags.DEFINE_integer("embedding_dim", _default("embedding_dim"), "headline: embedding width.")
flags.DEFINE_integer("lstm_units", _default("lstm_units"), "headline: LSTM units (the shared trunk's width).")
flags.DEFINE_integer("dense_units", _default("dense_units"),
                     "headline: width of the main head's three Dense layers; shapes3d_cnn: of the shared Dense.")
flags.DEFINE_integer("aux_input_dim", _default("aux_input_dim"), "headline: floats in aux_input.")
flags.DEFINE_integer("conv_filters", _default("conv_filters"),
                     "shapes3d_cnn: filters of the first convolution (the second has twice as many).")
flags.DEFINE_float("dropout_rate", _default("dropout_rate"), "shapes3d_cnn: Dropout rate before the shared Dense.")
flags.DEFINE_boolean("sync_batchnorm", _default("sync_batchnorm"),
                     "shapes3d_cnn: BatchNormalization(synchronized=True): batch statistics over all replicas.")
flags.DEFINE_float("l2", _default("l2"), "Built-in models: L2 factor on every kernel; 0 for none.")

# Data.
flags.DEFINE_string("dataset", _default("dataset"),
                    "'synthetic_headlines' (generated locally), 'npz:PATH', or 'tfds:NAME[/CONFIG][:VERSION]' "
                    "(a TFDS dataset prepared in --data_dir).")
flags.DEFINE_string("data_dir", _default("data_dir"), "TFDS data directory (default: TFDS's own).")
flags.DEFINE_string("train_split", _default("train_split"), "tfds: the split to train on.")
flags.DEFINE_string("feature_map", "",
                    "tfds: NAME=FEATURE,... maps a model input, output or sample_weight/<output> to a dataset "
                    "feature (nested: parent/child); unmapped inputs and outputs read the feature of their name.")
flags.DEFINE_string("validation_data", None,
                    "npz:PATH of validation examples (keys as for --dataset=npz:). Unset: the dataset's "
                    "validation split, if it has one.")
flags.DEFINE_string("validation_split", None,
                    "synthetic_headlines, tfds: the split to validate on. Unset: 'validation' if the dataset "
                    "has it; empty: no validation.")
flags.DEFINE_integer("eval_every", _default("eval_every"),
                     "Steps between evaluations on the validation data; 0: only at the end (there is always "
                     "one at the end when there is validation data).")
flags.DEFINE_integer("eval_steps", None,
                     "Global batches per evaluation. Unset: the whole validation data, its last partial "
                     "batch included.")
flags.DEFINE_integer("synthetic_train_examples", _default("synthetic_train_examples"),
                     "Size of synthetic_headlines' train split.")
flags.DEFINE_integer("synthetic_validation_examples", _default("synthetic_validation_examples"),
                     "Size of synthetic_headlines' validation split.")
flags.DEFINE_integer("shuffle_buffer", _default("shuffle_buffer"), "Shuffle buffer in examples; 0 keeps file order.")

# Losses. Unset: the built-in model's own.
flags.DEFINE_string("losses", None,
                    "OUTPUT=LOSS,... (a Keras loss name or MODULE:FUNCTION), or a JSON object mapping each "
                    "output to a Keras loss name, a Keras loss config ({\"class_name\": ..., \"config\": ...}) "
                    "or MODULE:FUNCTION. Unset: the built-in model's own.")
flags.DEFINE_string("loss_weights", None,
                    "OUTPUT=WEIGHT,... (or a JSON object) for every output: the total loss is sum(weight * loss). "
                    "Unset: the built-in model's own, else 1.0 each.")
flags.DEFINE_string("metrics", None,
                    "OUTPUT=METRIC,... (repeat an output for several), or a JSON object mapping each output to "
                    "a list of Keras metric names, configs or MODULE:FUNCTION; empty for none. "
                    "Unset: the built-in model's own.")

flags.DEFINE_string("class_weights", "",
                    "JSON {\"OUTPUT\": {\"CLASS\": WEIGHT, ...}, ...}: each training example's loss for that "
                    "output is multiplied by the weight of its class (binary labels: 0 and 1; one-hot: the "
                    "argmax), and by its sample weight. Unnamed outputs and classes: 1.0.")

# Optimization.
flags.DEFINE_string("optimizer", _default("optimizer"),
                    "A Keras optimizer name (sgd, adam, adamw, rmsprop, ...) or JSON config "
                    "({\"class_name\": \"AdamW\", \"config\": {\"weight_decay\": 0.004}}).")
flags.DEFINE_string("learning_rate", None,
                    "A number, or a Keras schedule as JSON ({\"class_name\": \"CosineDecay\", \"config\": "
                    "{...}}; it counts batches). Unset: the optimizer's own.")
flags.DEFINE_float("clipnorm", None, "Clip each weight's gradient to this norm (Keras's clipnorm), after the "
                                     "gradients are summed over replicas.")
flags.DEFINE_float("global_clipnorm", None, "Clip all gradients together to this global norm (Keras's "
                                            "global_clipnorm), after they are summed over replicas.")
flags.DEFINE_float("clipvalue", None, "Clip each gradient value to [-clipvalue, clipvalue] (Keras's clipvalue), "
                                      "after the gradients are summed over replicas.")
flags.DEFINE_integer("grad_accum_steps", _default("grad_accum_steps"),
                     "Update once every N batches with the mean of their gradients (Keras's "
                     "gradient_accumulation_steps); --train_steps counts batches.")
flags.DEFINE_enum("precision", _default("precision"), list(config_lib.PRECISIONS),
                  "Keras dtype policy; mixed_float16 adds dynamic loss scaling (LossScaleOptimizer).")
flags.DEFINE_boolean("xla_update", _default("xla_update"),
                     "Compile the optimizer's update alone with XLA (custom loop, one replica): the same "
                     "update, faster for dense gradients; no faster for an embedding's sparse one.")
flags.DEFINE_integer("batch_size", _default("batch_size"),
                     "GLOBAL batch size; each replica gets batch_size / replicas examples.")
flags.DEFINE_integer("train_steps", _default("train_steps"), "Total steps; a resumed run continues up to it.")
flags.DEFINE_integer("epochs", None,
                     "Instead of --train_steps: passes over the training data, each ending with its partial "
                     "last batch (as model.fit's epochs).")
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
flags.DEFINE_enum("progress", _default("progress"), list(config_lib.PROGRESS_MODES),
                  "What the run shows on stdout: 'bar' (a line updated in place), 'lines' (one per logging "
                  "window), 'quiet'; 'auto': bar on a terminal, else lines. Only the chief worker shows it.")
flags.DEFINE_integer("log_gradient_shares_every", _default("log_gradient_shares_every"),
                     "Every N steps, measure each output's share of each layer's gradient on a training batch "
                     "(as mto-explain does) and log it as grad_share/<layer>/<output> and "
                     "grad_norm/<layer>/<output>; 0: never. Costs a backward pass per output.")
flags.DEFINE_string("save_best", None,
                    "A validation value (val_loss, val_<output>_loss, val_<output>_<metric>): write "
                    "best.weights.h5 whenever it improves (as Keras's ModelCheckpoint decides: lower for "
                    "losses; for a metric, the direction it declares).")
flags.DEFINE_integer("early_stopping_patience", None,
                     "Stop after this many evaluations without improvement of --save_best's value.")
flags.DEFINE_enum("loop", _default("loop"), list(config_lib.LOOPS),
                  "'custom' (the explicit GradientTape loop) or 'fit' (model.fit, to compare).")


def config_from_flags(flag_values: flags.FlagValues = FLAGS) -> TrainConfig:
    """Builds and validates a `TrainConfig` from parsed flags; raises `ConfigError`."""
    values = {field.name: flag_values[field.name].value for field in dataclasses.fields(TrainConfig)}
    if values["losses"] is not None:
        values["losses"] = _parse_mapping("losses", values["losses"], _loss_from_text)
    if values["loss_weights"] is not None:
        values["loss_weights"] = _parse_mapping("loss_weights", values["loss_weights"], _weight_from_text)
    if values["metrics"] is not None:
        values["metrics"] = _parse_metrics(values["metrics"])
    if values["epochs"] is not None and flag_values["train_steps"].present:
        raise ConfigError("epochs", "give --epochs or --train_steps, not both")
    values["optimizer"] = _parse_keras_object("optimizer", values["optimizer"])
    if values["learning_rate"] is not None:
        values["learning_rate"] = _parse_keras_object("learning_rate", values["learning_rate"], number_ok=True)
    values["class_weights"] = _parse_class_weights(values["class_weights"])
    values["feature_map"] = _parse_mapping("feature_map", values["feature_map"], _feature_from_text, json_ok=False)
    return TrainConfig(**values)


def _parse_mapping(flag: str, text: str, parse_value, *, json_ok: bool = True) -> dict:
    """`KEY=VALUE,...` or (if `json_ok`) a JSON object; each value through `parse_value(flag, key, value)`."""
    if json_ok and text.lstrip().startswith("{"):
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(flag, f"not valid JSON ({error})") from None
        return {str(key): parse_value(flag, str(key), value) for key, value in mapping.items()}
    pairs: dict = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, separator, value = (part.strip() for part in item.partition("="))
        if not separator or not key or not value:
            raise ConfigError(flag, f"expected OUTPUT=VALUE pairs separated by commas, got {item!r}")
        if key in pairs:
            raise ConfigError(flag, f"output {key!r} given twice")
        pairs[key] = parse_value(flag, key, value)
    return pairs


def _parse_keras_object(flag: str, text: str, *, number_ok: bool = False):
    """A JSON config (text starting with "{"), else a number (if `number_ok`), else a name."""
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(flag, f"not valid JSON ({error})") from None
    if not number_ok:
        return text.strip()
    try:
        return float(text)
    except ValueError:
        raise ConfigError(flag, f"expected a number or a JSON schedule config, got {text!r}") from None


def _loss_from_text(flag: str, key: str, value):
    if not (isinstance(value, str) or (isinstance(value, dict) and "class_name" in value)):
        raise ConfigError(flag, f"output {key!r}: expected a Keras loss name, MODULE:FUNCTION or "
                                f"{{\"class_name\": ..., \"config\": ...}}, got {value!r}")
    return value


def _weight_from_text(flag: str, key: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(flag, f"expected a number for {key!r}, got {value!r}") from None


def _feature_from_text(flag: str, key: str, value: str) -> str:
    return value


def _parse_class_weights(text: str) -> dict[str, dict[int, float]]:
    """`{"OUTPUT": {"CLASS": WEIGHT}}` with class ids as JSON strings (JSON keys are strings)."""
    if not text.strip():
        return {}
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError("class_weights", f"not valid JSON ({error})") from None
    if not isinstance(mapping, dict):
        raise ConfigError("class_weights", f"expected a JSON object {{\"OUTPUT\": {{\"CLASS\": WEIGHT}}}}, "
                                           f"got {text!r}")
    class_weights = {}
    for output, weights in mapping.items():
        if not isinstance(weights, dict):
            raise ConfigError("class_weights", f"output {output!r}: expected {{\"CLASS\": WEIGHT, ...}}, "
                                               f"got {weights!r}")
        parsed = {}
        for class_id, weight in weights.items():
            try:
                parsed[int(class_id)] = weight
            except ValueError:
                raise ConfigError("class_weights", f"output {output!r}: class {class_id!r} is not an "
                                                   f"integer class id") from None
        class_weights[output] = parsed
    return class_weights


def _parse_metrics(text: str) -> dict[str, tuple]:
    if text.lstrip().startswith("{"):
        def metric_list(flag, key, value):
            values = value if isinstance(value, list) else [value]
            return tuple(_loss_from_text(flag, key, item) for item in values)

        return _parse_mapping("metrics", text, metric_list)
    metrics: dict[str, tuple] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        output, separator, metric = (part.strip() for part in item.partition("="))
        if not separator or not output or not metric:
            raise ConfigError("metrics", f"expected OUTPUT=METRIC pairs separated by commas, got {item!r}")
        metrics[output] = (*metrics.get(output, ()), metric)
    return metrics
