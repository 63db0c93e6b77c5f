"""A sweep: one run per loss weight of one output, or per loss-weighting method; the final validation values side by side.

    python -m mto_tf.sweep --loss_weight=aux_output=0,0.1,0.2,0.5,1,2 --sweep_dir=/tmp/sweep \\
        [mto-train flags]
    python -m mto_tf.sweep --loss_weighting=fixed,uncertainty,dwa,famo,pcgrad,mgda,cagrad,upgrad \\
        --sweep_dir=/tmp/methods [mto-train flags]

Every run has the same flags, seed and data; only the swept output's loss
weight (run `w` in `--sweep_dir/<output>=<w>`), or the method with its
default hyper-parameters (in `--sweep_dir/<method>`), differs. Rerunning
the sweep resumes unfinished runs. The sweep writes what each run's final
evaluation found to stdout (a table), `--sweep_dir/sweep.json` and
`--sweep_dir/sweep.png`. In a weight sweep `val_loss` is left out of the
comparison: it contains the swept weight itself; each output's own
`val_<output>_loss` and metrics do not. In a method sweep it stays: every
method's `val_loss` is the same `sum_k w_k L_k` of `--loss_weights`.
"""

from __future__ import annotations

import dataclasses
import json
import os

import tensorflow as tf
from absl import flags

from mto_tf import loss_weighting
from mto_tf.config import TrainConfig
from mto_tf.core.strategy import is_chief, make_strategy
from mto_tf.data import sources
from mto_tf.errors import ConfigError
from mto_tf.programs import flags as mto_flags  # Every mto-train flag sets what each run trains.
from mto_tf.run.model_dir import METRICS_FILE
from mto_tf.run.model_setup import build_model_setup
from mto_tf.run.train import train


SUMMARY_JSON, SUMMARY_PNG = "sweep.json", "sweep.png"


def parse_loss_weight(text: str | None) -> tuple[str, list[float]]:
    """`OUTPUT=W1,W2,...` -> (output, weights)."""
    output, separator, values = (text or "").partition("=")
    try:
        weights = [float(value) for value in values.split(",")]
    except ValueError:
        weights = []
    if not (output.strip() and separator and weights and all(weight >= 0 for weight in weights)):
        raise ConfigError("loss_weight", f"expected OUTPUT=W1,W2,... with weights >= 0, got {text!r}")
    if len(set(weights)) != len(weights):
        raise ConfigError("loss_weight", f"a weight is given twice in {text!r}")
    return output.strip(), weights


def parse_methods(text: str) -> list[str]:
    """`--loss_weighting=NAME1,NAME2,...` in a sweep -> the names, each checked."""
    names = [name.strip() for name in text.split(",")]
    for name in names:
        loss_weighting.parse(name)  # One line naming --loss_weighting if it is no method.
    if len(set(names)) != len(names):
        raise ConfigError("loss_weighting", f"a method is given twice in {text!r}")
    return names


def sweep(config: TrainConfig, *, output: str, weights: list[float], sweep_dir: str, strategy) -> dict:
    """Trains one run per weight of `output`; returns the summary (also written to `sweep_dir` by the chief)."""
    setup = build_model_setup(config, strategy)  # The other outputs' weights, and checks.
    loss_weights = setup.losses.weights
    if output not in loss_weights:
        raise ConfigError("loss_weight", f"unknown output {output!r}; the model has outputs "
                                         f"{sorted(loss_weights)}")
    _check_validation(config, setup, flag="loss_weight")
    runs = _train_each(
        [({"weight": weight}, dataclasses.replace(config, model_dir=os.path.join(sweep_dir, f"{output}={weight:g}"),
                                                  loss_weights={**loss_weights, output: weight}))
         for weight in weights], strategy=strategy, sweep_dir=sweep_dir, compare_val_loss=False)
    return _written({"output": output, "loss_weights": setup.losses.weights_as_json(), "runs": runs}, sweep_dir,
                    strategy)


def sweep_methods(config: TrainConfig, *, methods: list[str], sweep_dir: str, strategy) -> dict:
    """Trains one run per loss-weighting method; returns the summary (also written to `sweep_dir` by the chief)."""
    setup = build_model_setup(config, strategy)
    _check_validation(config, setup, flag="loss_weighting")
    # Each method's own refusals (an option it cannot combine with), before any run trains.
    configs = [dataclasses.replace(config, model_dir=os.path.join(sweep_dir, name), loss_weighting=name)
               for name in methods]
    runs = _train_each([({"loss_weighting": name}, run) for name, run in zip(methods, configs)],
                       strategy=strategy, sweep_dir=sweep_dir, compare_val_loss=True)
    return _written({"loss_weights": setup.losses.weights_as_json(), "runs": runs}, sweep_dir, strategy)


def _check_validation(config: TrainConfig, setup, *, flag: str) -> None:
    data = [(task.config, task.signature) for task in setup.tasks] or [(config, setup.signature)]
    if all(sources.load_validation_examples(data_config, signature) is None for data_config, signature in data):
        raise ConfigError(flag, "the sweep compares final validation values: give --validation_data or a "
                                "dataset with a validation split")


def _train_each(runs: list[tuple[dict, TrainConfig]], *, strategy, sweep_dir: str, compare_val_loss: bool) -> list:
    """Trains each run in its own model directory; each one's final validation values, after what it is."""
    os.makedirs(sweep_dir, exist_ok=True)
    results = []
    for swept, config in runs:
        result = train(config, strategy=strategy)
        final = [record for record in result.history if "val_loss" in record]
        if not final:  # A rerun of a finished run trains and evaluates nothing: read its log.
            with open(os.path.join(config.model_dir, METRICS_FILE)) as log:
                final = [record for record in map(json.loads, log) if "val_loss" in record]
        values = {name: value for name, value in final[-1].items()
                  if name.startswith("val_") and (compare_val_loss or name != "val_loss")}
        results.append({**swept, "model_dir": config.model_dir, "step": final[-1]["step"], "values": values})
    return results


def _written(summary: dict, sweep_dir: str, strategy) -> dict:
    if is_chief(strategy):
        with open(os.path.join(sweep_dir, SUMMARY_JSON), "w") as file:
            json.dump(summary, file, indent=2)
        plot(summary, os.path.join(sweep_dir, SUMMARY_PNG))
    return summary


def _swept(summary: dict) -> tuple[str, list[str]]:
    """What the sweep varies (a column's title) and each run's value of it."""
    if "output" in summary:
        return f"{summary['output']} weight", [f"{run['weight']:g}" for run in summary["runs"]]
    return "loss weighting", [run["loss_weighting"] for run in summary["runs"]]


def format_table(summary: dict) -> str:
    names = list(summary["runs"][0]["values"])
    title, labels = _swept(summary)
    header = [title, *names]
    rows = [[label, *(f"{run['values'][name]:.4f}" for name in names)] for label, run in zip(labels, summary["runs"])]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in [header, *rows])


def plot(summary: dict, path: str) -> None:
    """Final validation losses (left) and metrics (right) against the swept weight or method."""
    import matplotlib
    matplotlib.use("Agg")  # Files only, no screen.
    import matplotlib.pyplot as plt

    runs = summary["runs"]
    names = list(runs[0]["values"])
    losses = [name for name in names if name.endswith("_loss")]
    groups = [group for group in (losses, [name for name in names if name not in losses]) if group]
    figure, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False)
    positions = range(len(runs))  # Evenly spaced: the weights usually grow geometrically and start at 0.
    for axis, group in zip(axes[0], groups):
        for name in group:
            axis.plot(positions, [run["values"][name] for run in runs], marker="o", label=name)
        axis.set_xticks(positions, _swept(summary)[1], rotation=0 if "output" in summary else 40,
                        ha="center" if "output" in summary else "right")
        axis.set_xlabel(f"loss weight of {summary['output']}" if "output" in summary else "loss weighting")
        axis.set_ylabel("final validation value")
        axis.legend(fontsize="small")
        axis.grid(alpha=0.3)
    if "output" in summary:
        figure.suptitle(f"Sweeping the loss weight of {summary['output']} (other weights: "
                        + ", ".join(f"{name} {_weight_text(weight)}"
                                    for name, weight in summary["loss_weights"].items()
                                    if name != summary["output"]) + ")")
    else:
        figure.suptitle("One run per loss-weighting method (--loss_weights: "
                        + ", ".join(f"{name} {_weight_text(weight)}"
                                    for name, weight in summary["loss_weights"].items()) + ")")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _weight_text(weight) -> str:
    """A weight as the figure names it: the number, or its schedule's class."""
    return f"{weight:g}" if isinstance(weight, float) else weight["class_name"]


def sweep_main() -> None:
    given = flags.FLAGS
    methods = parse_methods(given.loss_weighting) if "," in given.loss_weighting and not \
        given.loss_weighting.lstrip().startswith("{") else None
    if methods and given.loss_weight:
        raise ConfigError("loss_weighting", "sweeps the method; --loss_weight sweeps a weight: give one of them")
    if not methods:
        output, weights = parse_loss_weight(given.loss_weight)
    if not given.sweep_dir:
        raise ConfigError("sweep_dir", "required: the directory that holds one run per weight or method")
    if given["model_dir"].present:
        raise ConfigError("model_dir", "the sweep gives each run its own, under --sweep_dir")
    if methods:
        given.loss_weighting = "fixed"  # Each run's own is set below; the other flags make the config.
    config = mto_flags.config_from_flags()
    strategy = make_strategy(config)  # First: it may split the CPU into devices.
    # Each run builds its own model and steps: TensorFlow's warning that
    # functions were traced again says nothing here.
    tf.get_logger().setLevel("ERROR")
    if methods:
        summary = sweep_methods(config, methods=methods, sweep_dir=given.sweep_dir, strategy=strategy)
    else:
        summary = sweep(config, output=output, weights=weights, sweep_dir=given.sweep_dir, strategy=strategy)
    print(format_table(summary))
    print(f"written: {os.path.join(given.sweep_dir, SUMMARY_JSON)}, {os.path.join(given.sweep_dir, SUMMARY_PNG)}")
