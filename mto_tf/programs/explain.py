"""How each output's loss trains each layer: `mto-explain` (`python -m mto_tf.explain`).

    mto-explain --model_dir=/tmp/run --explain_batches=8 \
        --output_json=/tmp/shares.json --output_png=/tmp/shares.png

The same model, data and loss flags as `mto-train`; the weights of a
finished run (`--model_dir`), `--init_weights`, or the model's seeded
initial weights. For each layer with trainable weights: each output's
contribution `w_i * grad(L_i)` to its gradient over `--explain_batches`
training batches, its norm, its share, and the cosines between outputs
(`gradient_shares.py` has the mathematics); a table on stdout,
`--output_json`, and a bar chart `--output_png`.
"""

from __future__ import annotations

import itertools
import json
import os

import tensorflow as tf
from absl import flags

from mto_tf.config import TrainConfig
from mto_tf.core import gradient_shares, models
from mto_tf.core.strategy import make_strategy
from mto_tf.errors import ConfigError
from mto_tf.programs import flags as mto_flags  # mto-train's flags: the model, data and loss ones are read.
from mto_tf.run import model_dir
from mto_tf.run.model_setup import build_model_setup, make_method

# The parts of a run mto-explain runs (see PARTS in mto_tf/config.py). It does
# not train or evaluate: the flags only those parts read are refused, not ignored.
READS = ("model", "data", "loss", "distribution")


def explain(config: TrainConfig, *, strategy: tf.distribute.Strategy, explain_batches: int,
            weights: str | None = None) -> dict:
    """Each output's share of each layer's gradient over `explain_batches` training batches, as a JSON-ready dict.

    `weights`: a `.weights.h5` file to load (else `config.init_weights`, else
    the model's seeded initial weights).
    """
    setup = build_model_setup(config, strategy)
    if weights:
        models.load_weights(setup.model, weights, flag="model_dir")
    method = None
    if config.weighting.name != "fixed":
        if config.representation_layer:
            raise ConfigError("weighting_gradients", "mto-explain takes each output's gradient of every weight; "
                                                     "leave it at shared_weights")
        with strategy.scope():
            method = make_method(config, setup)
        if weights:  # The method's state (learned weights, histories) at the end of the run.
            _restore_method_state(method, os.path.dirname(weights))
    contributions = gradient_shares.make_gradient_contributions(
        objective=setup.objective, strategy=strategy, global_batch_size=setup.global_batch_sizes, method=method)
    # Each output's gradient on its own task's batch, with --datasets.
    batches = setup.training_batches()
    summed = None
    for batch in itertools.islice(iter(batches), explain_batches):
        batch_contributions = contributions(batch)
        summed = batch_contributions if summed is None else gradient_shares.added(summed, batch_contributions)
    report = gradient_shares.layer_report(setup.model, summed, loss_weights=setup.loss_weights.numbers())
    report["batches"] = explain_batches
    report["batch_size"] = config.batch_size  # With --datasets, {task: its global batch size}.
    report["loss_weighting"] = config.weighting.describe()
    return report


def _restore_method_state(method, run_dir: str) -> None:
    """The method's variables from the run's newest checkpoint (as `run/model_dir.py` names them)."""
    latest = tf.train.latest_checkpoint(os.path.join(run_dir, model_dir.CHECKPOINT_DIR))
    if latest is None:
        raise ConfigError("model_dir", f"no checkpoint in {run_dir!r} holds --loss_weighting's state")
    tf.train.Checkpoint(loss_weighting=method).read(latest).expect_partial()


def format_table(report: dict) -> str:
    """The report as a table: a row per layer, for each output its share and the norm of its contribution."""
    names = list(report["layers"][0]["share"]) if report["layers"] else []
    header = ["layer", "shared", "|grad| total", *(f"{name} share (|grad|)" for name in names), "cosine"]
    rows = []
    for layer in report["layers"]:
        cosine = ", ".join(f"{pair}: {_number(value)}" for pair, value in (layer["cosine"] or {}).items()) or "-"
        rows.append([layer["name"], "yes" if layer["shared"] else "no", f"{layer['grad_norm']['total']:.3g}",
                     *(f"{_number(layer['share'][name])} ({layer['grad_norm'][name]:.3g})" for name in names),
                     cosine])
    widths = [max(len(str(row[column])) for row in [header, *rows]) for column in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    weights = " + ".join(f"{weight:g} * {name}_loss" for name, weight in report["loss_weights"].items())
    heading = (f"loss = {weights}: each output's share of each layer's gradient over {report.get('batches', '?')} "
               f"batches")
    if "method_weights" in report:
        mean = ", ".join(f"{name} {value:.3g}" for name, value in report["method_weights"].items())
        heading = (f"update by --loss_weighting={report['loss_weighting']} of {weights} (mean a: {mean}): each "
                   f"output's share of each layer's update over {report.get('batches', '?')} batches")
    return "\n".join([heading, *lines,
                      f"linearity: max |grad(loss) - sum of contributions| = {report['linearity_max_abs_error']:.2g}"])


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def plot(report: dict, path: str) -> None:
    """A bar chart: for each layer (top to bottom in model order), each output's share of its gradient."""
    import matplotlib
    matplotlib.use("Agg")  # Files only, no screen.
    import matplotlib.pyplot as plt

    layers = report["layers"]
    names = list(layers[0]["share"]) if layers else []
    height = 0.8 / max(len(names), 1)
    figure, axes = plt.subplots(figsize=(8, 1.2 + 0.45 * len(layers) * max(len(names), 1) ** 0.5))
    for position, name in enumerate(names):
        shares = [layer["share"][name] or 0.0 for layer in layers]
        rows = [row + (position - (len(names) - 1) / 2) * height for row in range(len(layers))]
        axes.barh(rows, shares, height=height, label=f"{name} (weight {report['loss_weights'].get(name, '-')})")
    axes.set_yticks(range(len(layers)), [f"{layer['name']}{' (shared)' if layer['shared'] else ''}"
                                         for layer in layers])
    axes.invert_yaxis()  # Model order, input at the top.
    axes.axvline(0.0, color="black", linewidth=0.8)
    axes.axvline(1.0, color="grey", linewidth=0.8, linestyle="--")
    axes.set_xlabel("share of the layer's gradient: <w_i grad L_i, grad L> / |grad L|^2 (a layer's shares sum to 1)")
    axes.set_title(f"Which output's loss trains which layer ({report.get('batches', '?')} batches)")
    axes.set_xlim(min(0.0, *(min((layer["share"][name] or 0.0) for name in names) for layer in layers)) - 0.05,
                  max(1.0, *(max((layer["share"][name] or 0.0) for name in names) for layer in layers)) + 0.05)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=min(len(names), 3), fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_outputs(report: dict, *, output_json: str | None, output_png: str | None) -> None:
    """`--output_json` and `--output_png`; a path that cannot be written names its flag."""
    for flag, path, write in (("output_json", output_json, _write_json), ("output_png", output_png, plot)):
        if path:
            try:
                write(report, path)
            except OSError as error:
                raise ConfigError(flag, f"cannot write {path!r}: {error.strerror or error}") from None


def _write_json(report: dict, path: str) -> None:
    with open(path, "w") as file:
        json.dump(report, file, indent=2)


def explain_main() -> None:
    """`mto-explain`: the flags' model, data and losses, weights from --model_dir or --init_weights; the report."""
    given = flags.FLAGS
    mto_flags.refuse_flags_not_read_by(
        READS, reason="mto-explain does not train: it reads the model, data and loss flags only")
    if given.explain_batches < 1:
        raise ConfigError("explain_batches", f"expected an integer > 0, got {given.explain_batches}")
    for flag in ("output_json", "output_png"):
        path = given[flag].value
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise ConfigError(flag, f"no directory to write {path!r} in")
    config = mto_flags.config_from_flags()
    weights = None
    if given["model_dir"].present:
        if config.init_weights:
            raise ConfigError("init_weights", "give --model_dir (its final weights) or --init_weights, not both")
        weights = os.path.join(config.model_dir, model_dir.WEIGHTS_FILE)
        if not os.path.isfile(weights):
            raise ConfigError("model_dir", f"{weights!r} not found: a finished mto-train run leaves it there")
    strategy = make_strategy(config)  # First: it may split the CPU into devices.
    report = explain(config, strategy=strategy, explain_batches=given.explain_batches, weights=weights)
    print(format_table(report))
    write_outputs(report, output_json=given.output_json, output_png=given.output_png)


