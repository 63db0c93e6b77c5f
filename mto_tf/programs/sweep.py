"""A loss-weight sweep: one run per weight of one output, the final validation values side by side.

    python -m mto_tf.sweep --loss_weight=aux_output=0,0.1,0.2,0.5,1,2 --sweep_dir=/tmp/sweep \\
        [mto-train flags]

Every run has the same flags, seed and data; only the swept output's loss
weight differs. Run `w` trains in `--sweep_dir/<output>=<w>` (rerunning the
sweep resumes unfinished runs), and the sweep writes what each run's final
evaluation found to stdout (a table), `--sweep_dir/sweep.json` and
`--sweep_dir/sweep.png`. `val_loss` is left out of the comparison: it
contains the swept weight itself; each output's own `val_<output>_loss` and
metrics do not.
"""

from __future__ import annotations

import dataclasses
import json
import os

import tensorflow as tf
from absl import flags

from mto_tf.config import TrainConfig
from mto_tf.core.strategy import is_chief, make_strategy
from mto_tf.data import sources
from mto_tf.errors import ConfigError
from mto_tf.programs import flags as mto_flags  # Every mto-train flag sets what each run trains.
from mto_tf.run.model_dir import METRICS_FILE
from mto_tf.run.setup import build_model_setup
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


def sweep(config: TrainConfig, *, output: str, weights: list[float], sweep_dir: str, strategy) -> dict:
    """Trains one run per weight of `output`; returns the summary (also written to `sweep_dir` by the chief)."""
    setup = build_model_setup(config, strategy)  # The other outputs' weights, and checks.
    loss_weights = setup.losses.weights
    if output not in loss_weights:
        raise ConfigError("loss_weight", f"unknown output {output!r}; the model has outputs "
                                         f"{sorted(loss_weights)}")
    if sources.load_validation_examples(config, setup.signature) is None:
        raise ConfigError("loss_weight", "the sweep compares final validation values: give --validation_data or a "
                                         "dataset with a validation split")
    os.makedirs(sweep_dir, exist_ok=True)
    runs = []
    for weight in weights:
        model_dir = os.path.join(sweep_dir, f"{output}={weight:g}")
        result = train(dataclasses.replace(
            config, model_dir=model_dir, loss_weights={**loss_weights, output: weight}), strategy=strategy)
        final = [record for record in result.history if "val_loss" in record]
        if not final:  # A rerun of a finished run trains and evaluates nothing: read its log.
            with open(os.path.join(model_dir, METRICS_FILE)) as log:
                final = [record for record in map(json.loads, log) if "val_loss" in record]
        values = {name: value for name, value in final[-1].items() if name.startswith("val_") and name != "val_loss"}
        runs.append({"weight": weight, "model_dir": model_dir, "step": final[-1]["step"], "values": values})
    summary = {"output": output, "loss_weights": loss_weights, "runs": runs}
    if is_chief(strategy):
        with open(os.path.join(sweep_dir, SUMMARY_JSON), "w") as file:
            json.dump(summary, file, indent=2)
        plot(summary, os.path.join(sweep_dir, SUMMARY_PNG))
    return summary


def format_table(summary: dict) -> str:
    names = list(summary["runs"][0]["values"])
    header = [f"{summary['output']} weight", *names]
    rows = [[f"{run['weight']:g}", *(f"{run['values'][name]:.4f}" for name in names)] for run in summary["runs"]]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in [header, *rows])


def plot(summary: dict, path: str) -> None:
    """Final validation losses (left) and metrics (right) against the swept weight."""
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
        axis.set_xticks(positions, [f"{run['weight']:g}" for run in runs])
        axis.set_xlabel(f"loss weight of {summary['output']}")
        axis.set_ylabel("final validation value")
        axis.legend(fontsize="small")
        axis.grid(alpha=0.3)
    figure.suptitle(f"Sweeping the loss weight of {summary['output']} (other weights: "
                    + ", ".join(f"{name} {weight:g}" for name, weight in summary["loss_weights"].items()
                                if name != summary["output"]) + ")")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def sweep_main() -> None:
    given = flags.FLAGS
    output, weights = parse_loss_weight(given.loss_weight)
    if not given.sweep_dir:
        raise ConfigError("sweep_dir", "required: the directory that holds one run per weight")
    if given["model_dir"].present:
        raise ConfigError("model_dir", "the sweep gives each run its own, under --sweep_dir")
    config = mto_flags.config_from_flags()
    strategy = make_strategy(config)  # First: it may split the CPU into devices.
    # Each run builds its own model and steps: TensorFlow's warning that
    # functions were traced again says nothing here.
    tf.get_logger().setLevel("ERROR")
    summary = sweep(config, output=output, weights=weights, sweep_dir=given.sweep_dir, strategy=strategy)
    print(format_table(summary))
    print(f"written: {os.path.join(given.sweep_dir, SUMMARY_JSON)}, {os.path.join(given.sweep_dir, SUMMARY_PNG)}")


