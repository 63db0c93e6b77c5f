"""Every flag: `mto-train`'s, derived from `TrainConfig`'s fields, parsed and validated into a `TrainConfig`;
and each other program's own, beside them.

Each field declares its help, its kind and its default (`mto_tf/config.py`);
here each kind has its absl flag type and, for settings the command line
writes as text (per-output mappings, JSON configs), its parser. So the
library and the command line agree, and adding a setting touches
`TrainConfig` only. `--flagfile=PATH` (one flag per line) works as for any
absl program.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from absl import flags

from mto_tf import config as config_lib
from mto_tf.config import TrainConfig
from mto_tf.errors import ConfigError

FLAGS = flags.FLAGS


def flag_default(name: str):
    """What the flag of setting `name` holds when it is not given: the default, or its text for a parsed kind."""
    default = config_lib.default_of(name)
    if config_lib.SETTINGS[name].kind in _TEXT_PARSERS and isinstance(default, dict):
        return ""  # An empty mapping.
    if config_lib.SETTINGS[name].kind == "integer_per_task":
        return str(default)  # A number, or JSON per task: a text flag.
    return default


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Defines one flag per `TrainConfig` field, with its help and default."""
    for name, setting in config_lib.SETTINGS.items():
        default = flag_default(name)
        if setting.kind == "integer":
            flags.DEFINE_integer(name, default, setting.help, flag_values=flag_values)
        elif setting.kind == "number":
            flags.DEFINE_float(name, default, setting.help, flag_values=flag_values)
        elif setting.kind == "boolean":
            flags.DEFINE_boolean(name, default, setting.help, flag_values=flag_values)
        elif setting.kind == "choice":
            flags.DEFINE_enum(name, default, list(setting.choices), setting.help, flag_values=flag_values)
        else:  # Text, as given or for the kind's parser.
            flags.DEFINE_string(name, default, setting.help, flag_values=flag_values)


def define_explain_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """mto-explain's own flags, beside mto-train's (defined when it runs: the benchmark has an --output_json too)."""
    if "explain_batches" in flag_values:  # Defined already, by an earlier run in this process.
        return
    flags.DEFINE_integer("explain_batches", 4, "Training batches (from the start of the data) to sum the gradients "
                                               "over.", flag_values=flag_values)
    if "output_json" not in flag_values:  # mto-evaluate's, in the same process.
        flags.DEFINE_string("output_json", None, "Write the report here as JSON.", flag_values=flag_values)
    flags.DEFINE_string("output_png", None, "Draw each layer's shares per output here (PNG).", flag_values=flag_values)


def define_evaluate_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """mto-evaluate's own flags, beside mto-train's (defined when it runs: mto-explain has an --output_json too)."""
    if "eval_data" in flag_values:  # Defined already, by an earlier run in this process.
        return
    flags.DEFINE_string("eval_data", None, "npz:PATH of the examples to evaluate (keys as for --dataset=npz:); "
                                           "with --datasets, JSON {TASK: npz:PATH} (each task's outputs on its own).",
                        flag_values=flag_values)
    flags.DEFINE_string("eval_split", None, "Instead of --eval_data: a split of --dataset (tfds:, or a generated "
                                            "one: synthetic_headlines, multi_digits, mmoe_synthetic, whose test "
                                            "split is for this); with --datasets, of each task's.",
                        flag_values=flag_values)
    _define_weights_flag(flag_values)
    if "output_json" not in flag_values:
        flags.DEFINE_string("output_json", None, "Write the values here as JSON.", flag_values=flag_values)


def define_export_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """mto-export's own flags, beside mto-train's (defined when it runs: mto-evaluate has a --weights too)."""
    if "export_dir" in flag_values:  # Defined already, by an earlier run in this process.
        return
    flags.DEFINE_string("export_dir", None, "Write the SavedModel here: a new or empty directory (for TensorFlow "
                                            "Serving, a version under the model's base path: /models/NAME/1).",
                        flag_values=flag_values)
    flags.DEFINE_list("serve_outputs", [], "OUTPUT,...: the outputs the serving_default signature returns (default: "
                                           "every output); the layers only the others use are left out.",
                      flag_values=flag_values)
    _define_weights_flag(flag_values)


def _define_weights_flag(flag_values: flags.FlagValues) -> None:
    """--weights: which of a run's weights mto-evaluate and mto-export read (`evaluate.weights_file`)."""
    if "weights" not in flag_values:  # The other program's, in the same process.
        flags.DEFINE_string("weights", "final", "With --model_dir: final (model.weights.h5), best (best.weights.h5) "
                                                "or step:N (the checkpoint of step N).", flag_values=flag_values)


def define_input_service_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """`python -m mto_tf.input_service`'s flags."""
    flags.DEFINE_integer("port", 0, "Port of the dispatcher (0: any free one; the program prints it).", lower_bound=0,
                         upper_bound=65535, flag_values=flag_values)
    flags.DEFINE_integer("worker_port", 0, "Port trainers fetch batches from (0: any free one).", lower_bound=0,
                         upper_bound=65535, flag_values=flag_values)
    flags.DEFINE_string("host", None, "The name trainers reach this host by (default: its host name).",
                        flag_values=flag_values)


def define_sweep_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """The sweep's own flags, beside mto-train's (defined when it runs)."""
    if "sweep_dir" in flag_values:  # Defined already, by an earlier run in this process.
        return
    flags.DEFINE_string("loss_weight", None, "OUTPUT=W1,W2,...: the output whose loss weight is swept, and its "
                                             "weights.", flag_values=flag_values)
    flags.DEFINE_string("sweep_dir", None, "One run per weight in <sweep_dir>/<output>=<weight> (or, with "
                                           "--loss_weighting=NAME1,NAME2,..., per method in <sweep_dir>/<method>); "
                                           "sweep.json, sweep.png.", flag_values=flag_values)


def define_bench_flags(variants: Sequence[str], flag_values: flags.FlagValues = FLAGS) -> None:
    """The benchmark's own flags, beside mto-train's (defined when it runs: mto-explain has an --output_json too)."""
    flags.DEFINE_list("variants", list(variants), f"Variants to run, of: {', '.join(variants)}.",
                      flag_values=flag_values)
    flags.DEFINE_string("output_json", None, "Write the results here as JSON.", flag_values=flag_values)
    flags.DEFINE_integer("windows", 8, "Timed windows per variant.", flag_values=flag_values)
    flags.DEFINE_integer("window_steps", 50, "Steps per window (a multiple of --steps_per_loop).",
                         flag_values=flag_values)
    flags.DEFINE_integer("warmup_windows", 1, "Untimed windows first (tracing, XLA compilation, caches).",
                         flag_values=flag_values)
    flags.DEFINE_integer("repeats", 1, "Sets of processes, one per variant, run one after another; windows pooled.",
                         flag_values=flag_values)
    flags.DEFINE_string("run_variant", None, "Internal: run this one variant in this process and print its result.",
                        flag_values=flag_values)
    # --input measures the input pipelines instead (mto_tf/programs/input_bench.py).
    flags.DEFINE_boolean("input", False, "Instead of training speed: what each worker's input pipeline reads and "
                                         "holds per step, per source, data size and number of workers.",
                         flag_values=flag_values)
    flags.DEFINE_list("input_sizes", ["100MB", "1GB"], "--input: sizes of data to measure (KB, MB, GB: powers of "
                                                      "1024).", flag_values=flag_values)
    flags.DEFINE_list("input_workers", ["1", "2", "4"], "--input: numbers of workers, each a process of its own.",
                      flag_values=flag_values)
    flags.DEFINE_list("input_sources", ["npz", "npy", "array_record", "records", "tfrecord"],
                      "--input: sources to read: npz, npy, array_record (by index), and today's paths records "
                      "(from_tensor_slices) and tfrecord (as_dataset).", flag_values=flag_values)
    flags.DEFINE_integer("input_steps", 300, "--input: timed steps per worker, after one warm-up step.",
                         flag_values=flag_values)
    flags.DEFINE_integer("input_feature_width", 1024, "--input: numbers (float32) in a row's input.",
                         flag_values=flag_values)
    flags.DEFINE_boolean("input_in_process", False, "--input: every worker in this process, one after another "
                                                    "(quick; reads only, no memory per worker).",
                         flag_values=flag_values)
    flags.DEFINE_string("input_worker", None, "Internal: measure this one --input worker (JSON) in this process and "
                                              "print its result.", flag_values=flag_values)


def flags_not_read_by(reads: Sequence[str]) -> list[str]:
    """mto-train's flags that none of `reads` (parts of a run, see PARTS in config.py) reads.

    --model_dir is read by every program: it names the run (and the weights to read).
    """
    read = {*config_lib.settings_read_by(*reads), "model_dir"}
    return [name for name in config_lib.SETTINGS if name not in read]


def refuse_flags_not_read_by(reads: Sequence[str], *, reason: str, flag_values: flags.FlagValues = FLAGS) -> None:
    """A program that runs only `reads` refuses, rather than ignores, a given flag of the other parts."""
    for name in flags_not_read_by(reads):
        if name in flag_values and flag_values[name].present:
            raise ConfigError(name, reason)


def config_from_flags(flag_values: flags.FlagValues = FLAGS) -> TrainConfig:
    """Builds and validates a `TrainConfig` from parsed flags; raises `ConfigError`."""
    if flag_values["epochs"].value is not None and flag_values["train_steps"].present:
        raise ConfigError("epochs", "give --epochs or --train_steps, not both")
    values = {}
    for name, setting in config_lib.SETTINGS.items():
        value = flag_values[name].value
        parse = _TEXT_PARSERS.get(setting.kind)
        values[name] = parse(name, value) if parse and value is not None else value
    if values["datasets"] and flag_values["dataset"].present:  # Given, even as its default value.
        raise ConfigError("dataset", "give --dataset or --datasets (one source per task), not both")
    return TrainConfig(**values)


def _parse_mapping(flag: str, text: str, parse_value=None, *, json_ok: bool = True, pairs_of: str = "OUTPUT=VALUE"
                   ) -> dict:
    """`KEY=VALUE,...` (`pairs_of` names them in errors) or (if `json_ok`) a JSON object.

    Each value goes through `parse_value(flag, key, value)`; without one, it is kept as written.
    """
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
            raise ConfigError(flag, f"expected {pairs_of} pairs separated by commas, got {item!r}")
        if key in pairs:
            raise ConfigError(flag, f"{pairs_of.partition('=')[0].lower()} {key!r} given twice")
        pairs[key] = parse_value(flag, key, value) if parse_value else value
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
    if value is None:  # JSON null: the output is predicted, not trained (as compile takes None).
        return None
    if not (isinstance(value, str) or (isinstance(value, dict) and "class_name" in value)):
        raise ConfigError(flag, f"output {key!r}: expected a Keras loss name, MODULE:FUNCTION or "
                                f"{{\"class_name\": ..., \"config\": ...}}, got {value!r}")
    return value


def _weight_from_text(flag: str, key: str, value) -> float | dict:
    if isinstance(value, dict) and "class_name" in value:  # A Keras schedule config (JSON only).
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(flag, f"expected a number or a Keras schedule config for {key!r}, got {value!r}") from None


def _missing_value_from_text(flag: str, key: str, value) -> float:
    try:
        return float(value)  # "nan" included.
    except (TypeError, ValueError):
        raise ConfigError(flag, f"output {key!r}: expected a number or nan, got {value!r}") from None


def _parse_class_weights(flag: str, text: str) -> dict[str, dict[int, float]]:
    """`{"OUTPUT": {"CLASS": WEIGHT}}` with class ids as JSON strings (JSON keys are strings)."""
    if not text.strip():
        return {}
    mapping = parse_json_object(flag, text, '{"OUTPUT": {"CLASS": WEIGHT}}')
    class_weights = {}
    for output, weights in mapping.items():
        if not isinstance(weights, dict):
            raise ConfigError(flag, f"output {output!r}: expected {{\"CLASS\": WEIGHT, ...}}, got {weights!r}")
        parsed = {}
        for class_id, weight in weights.items():
            try:
                parsed[int(class_id)] = weight
            except ValueError:
                raise ConfigError(flag, f"output {output!r}: class {class_id!r} is not an integer class id") from None
        class_weights[output] = parsed
    return class_weights


def _parse_metrics(flag: str, text: str) -> dict[str, tuple]:
    if text.lstrip().startswith("{"):
        def metric_list(flag, key, value):
            values = value if isinstance(value, list) else [value]
            return tuple(_loss_from_text(flag, key, item) for item in values)

        return _parse_mapping(flag, text, metric_list)
    metrics: dict[str, tuple] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        output, separator, metric = (part.strip() for part in item.partition("="))
        if not separator or not output or not metric:
            raise ConfigError(flag, f"expected OUTPUT=METRIC pairs separated by commas, got {item!r}")
        metrics[output] = (*metrics.get(output, ()), metric)
    return metrics


def parse_json_object(flag: str, text: str, what: str) -> dict:
    """A JSON object; a ConfigError naming `flag` (and `what` was expected) otherwise."""
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(flag, f"not valid JSON ({error})") from None
    if not isinstance(mapping, dict):
        raise ConfigError(flag, f"expected a JSON object {what}, got {text!r}")
    return mapping


def _parse_datasets(flag: str, text: str) -> dict[str, str]:
    """`{"TASK": "SOURCE", ...}`: each source as --dataset takes it."""
    if not text.strip():
        return {}
    mapping = parse_json_object(flag, text, '{"TASK": "SOURCE", ...}')
    if not mapping:
        raise ConfigError(flag, "expected one task at least, {\"TASK\": \"SOURCE\", ...}")
    for task, source in mapping.items():
        if not isinstance(source, str):
            raise ConfigError(flag, f"task {task!r}: expected a source as --dataset takes it, got {source!r}")
    return mapping


def _parse_integer_per_task(flag: str, text: str) -> int | dict[str, int]:
    """A number, or `{"TASK": N, ...}` (with --datasets)."""
    if text.lstrip().startswith("{"):
        return parse_json_object(flag, text, '{"TASK": N, ...}')
    try:
        return int(text)
    except ValueError:
        raise ConfigError(flag, f"expected an integer, or a JSON object {{\"TASK\": N, ...}}, got {text!r}") from None


def _parse_feature_map(flag: str, text: str) -> dict:
    """NAME=FEATURE,... (names kept as written), or (with --datasets) `{"TASK": {"NAME": "FEATURE"}, ...}`."""
    if text.lstrip().startswith("{"):
        mapping = parse_json_object(flag, text, '{"TASK": {"NAME": "FEATURE", ...}, ...}')
        if not all(isinstance(pairs, dict) and all(isinstance(value, str) for value in pairs.values())
                   for pairs in mapping.values()):
            raise ConfigError(flag, f'expected {{"TASK": {{"NAME": "FEATURE", ...}}, ...}}, got {text!r}')
        return mapping
    return _parse_mapping(flag, text, json_ok=False, pairs_of="NAME=FEATURE")


# Each kind the command line writes as text -> `parse(flag, text)`, the setting's value.
_TEXT_PARSERS = {
    "losses": lambda flag, text: _parse_mapping(flag, text, _loss_from_text),
    "loss_weights": lambda flag, text: _parse_mapping(flag, text, _weight_from_text),
    "metrics": _parse_metrics,
    "class_weights": _parse_class_weights,
    # A model input, an output or sample_weight/<output>, and the feature that feeds it: names, kept as written.
    "feature_map": _parse_feature_map,
    "missing_labels": lambda flag, text: _parse_mapping(flag, text, _missing_value_from_text, json_ok=False),
    "extra_losses": lambda flag, text: _parse_mapping(flag, text, json_ok=False, pairs_of="NAME=MODULE:FUNCTION"),
    "keras_object": _parse_keras_object,
    "keras_object_or_number": lambda flag, text: _parse_keras_object(flag, text, number_ok=True),
    "name_or_json": _parse_keras_object,
    "datasets": _parse_datasets,
    "integer_per_task": _parse_integer_per_task,
    # Text as given, or (with --datasets) a JSON object {TASK: text}.
    "text_per_task": lambda flag, text: (parse_json_object(flag, text, '{"TASK": "...", ...}')
                                         if text.lstrip().startswith("{") else text),
}

define_flags()
