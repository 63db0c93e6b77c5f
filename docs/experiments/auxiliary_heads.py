"""GoogLeNet's auxiliary heads on `inception_aux` (v1) and `multi_digits`: how much of the lower layers' gradient they
give, and whether they speed early training or regularize.

    python docs/experiments/auxiliary_heads.py --output_dir=docs/figures

GoogLeNet (Szegedy et al. 2015, Section 5) adds classifiers on modules 4a
and 4d, weighted 0.3, so that the lower layers get a gradient the deep
network would otherwise let vanish; Inception-v3 (Szegedy et al. 2016,
Section 4) found they do not speed early training and act as regularizers.
Every head here predicts the left digit (`--feature_map`), as GoogLeNet's
predict the image's class. Two measurements:

- (a) each head's share of the gradient of the stem and of each Inception
  module: `mto-explain`'s per-layer share `<w_i grad L_i, grad L> /
  |grad L|^2` (`mto_tf/core/gradient_shares.py`), aggregated over a module's
  layers exactly, `sum_l share_l |g_l|^2 / sum_l |g_l|^2` with `g_l` the
  layer's total gradient (so a module's shares still sum to 1). At the
  seeded initial weights over `--explain_batches` training batches
  (`mto_tf.programs.explain.explain`), then every `--share_every` steps on one
  training batch (`--log_gradient_shares_every`), in every run;
- (b) main_output's validation accuracy every `--eval_every` steps, its
  mean over the last evaluations, and its final test accuracy and loss
  (`mto_tf.programs.evaluate.evaluate` on the split `test`), for each
  auxiliary weight (both heads the same; 0 trains main_output alone: the
  heads still exist but give no gradient) and seed.

Sizes, chosen to run in under 20 minutes on 2 CPU cores shared with another
run: `--inception_filters=8` (31k weights; 4 filters were no faster: at
this size a step's time goes to overheads, not to arithmetic), batch 64,
3,000 steps a run (the validation accuracy still creeps up at 2,000), 9
runs (weights 0, 0.3, 1 times 3 seeds), the default 10,000 / 1,000 / 1,000
examples. The full run took 13 minutes (TensorFlow 2.21, one process).
Adam (learning rate 0.001), not GoogLeNet's SGD with momentum 0.9: over
1,000 steps at weight 0.3 (a pilot, not kept), SGD stayed at chance for 800 steps at learning
rate 0.01 and for all 1,000 at 0.05, RMSprop (mto_tf's default) reached 45 %
validation accuracy, Adam 78 %. Adam scales each weight's step by its own
gradient's running size, so how small the lower layers' gradient is matters
less to it than to SGD: a limit of this test.

Writes `auxiliary_heads.json` (every run's records and the summaries) and
`auxiliary_heads.png`; `--from_json` redraws and re-reports them.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import tensorflow as tf

from mto_tf import TrainConfig, train
from mto_tf.core import gradient_shares
from mto_tf.programs.evaluate import evaluate, weights_file
from mto_tf.programs.explain import explain

HEADS = ["main_output", "aux_1", "aux_2"]
MODULES = ["stem", "module_3a", "module_4a", "module_4b", "module_4c", "module_4d", "module_4e", "module_5a"]
PAPER_WEIGHT = 0.3  # GoogLeNet's: the weight whose shares the figure shows.
LATE_EVALS = 5  # The last evaluations, averaged: Adam's accuracy moves a point or two from one to the next.


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aux_weights", default="0,0.3,1", help="Each auxiliary head's loss weight, one run each.")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--train_steps", type=int, default=3000)
    parser.add_argument("--eval_every", type=int, default=100)
    parser.add_argument("--share_every", type=int, default=100)
    parser.add_argument("--explain_batches", type=int, default=4, help="Batches of the shares at the start.")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--inception_filters", type=int, default=8)
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--learning_rate", type=float, default=0.001)
    parser.add_argument("--train_examples", type=int, default=10000)
    parser.add_argument("--validation_examples", type=int, default=1000)
    parser.add_argument("--test_examples", type=int, default=1000)
    parser.add_argument("--data_dir", default=None, help="Where multi_digits is generated (default: TFDS's own).")
    parser.add_argument("--output_dir", default="docs/figures")
    parser.add_argument("--from_json", action="store_true",
                        help="Redraw and re-report --output_dir/auxiliary_heads.json.")
    return parser.parse_args(argv)


def config_for(arguments: argparse.Namespace, *, aux_weight: float, seed: int, model_dir: str) -> TrainConfig:
    """One run: inception_aux v1, every head on the left digit, both auxiliary heads weighted `aux_weight`."""
    return TrainConfig(
        model="inception_aux", inception_variant="v1", inception_filters=arguments.inception_filters,
        dataset="multi_digits", data_dir=arguments.data_dir, feature_map=dict.fromkeys(HEADS, "left"),
        synthetic_train_examples=arguments.train_examples,
        synthetic_validation_examples=arguments.validation_examples,
        synthetic_test_examples=arguments.test_examples,
        loss_weights={"main_output": 1.0, "aux_1": aux_weight, "aux_2": aux_weight},
        optimizer=arguments.optimizer, learning_rate=arguments.learning_rate, batch_size=arguments.batch_size,
        train_steps=arguments.train_steps, eval_every=arguments.eval_every,
        log_every=arguments.eval_every, checkpoint_every=arguments.train_steps,
        log_gradient_shares_every=arguments.share_every, seed=seed, model_dir=model_dir, progress="quiet")


def layers_of(record: dict, module: str) -> list[str]:
    """The layers of `module` (or the stem) that a record measured."""
    measured = {key.split("/")[1] for key in record if key.startswith("grad_norm/")}
    return sorted(layer for layer in measured if layer == module or layer.startswith(module + "_"))


def module_shares(record: dict) -> dict[str, dict[str, float]]:
    """Each head's share of each module's gradient, from a record's `grad_share/` and `grad_norm/` values.

    A module's share is its layers' shares weighted by their squared total
    gradient norms: the share of the module's gradient taken as one vector.
    """
    shares = {}
    for module in MODULES:
        squared = {layer: record[f"grad_norm/{layer}/total"] ** 2 for layer in layers_of(record, module)}
        total = sum(squared.values())
        shares[module] = {head: sum(record.get(f"grad_share/{layer}/{head}", 0.0) * layer_squared
                                    for layer, layer_squared in squared.items()) / total for head in HEADS}
    return shares


def module_norms(record: dict) -> dict[str, dict[str, float]]:
    """The norm of each head's weighted contribution `w grad L_head` to each module's gradient, and of the total."""
    return {module: {name: float(np.sqrt(sum(record[f"grad_norm/{layer}/{name}"] ** 2
                                             for layer in layers_of(record, module))))
                     for name in [*HEADS, "total"]}
            for module in MODULES}


def one_run(arguments: argparse.Namespace, *, aux_weight: float, seed: int) -> dict:
    """Shares at the start and during training, validation accuracy, and the final test values of one run."""
    strategy = tf.distribute.get_strategy()
    with tempfile.TemporaryDirectory() as model_dir:
        config = config_for(arguments, aux_weight=aux_weight, seed=seed, model_dir=model_dir)
        start = explain(config, strategy=strategy, explain_batches=arguments.explain_batches)
        history = train(config).history
        test = evaluate(config, strategy=strategy, eval_data=None, eval_split="test",
                        weights=weights_file(model_dir, "final"))
    measured = [(0, gradient_shares.as_record(start))] + [
        (record["step"], record) for record in history if any(key.startswith("grad_share/") for key in record)]
    validated = [record for record in history if "val_main_output_accuracy" in record]
    return {"aux_weight": aux_weight, "seed": seed,
            "share_steps": [step for step, _ in measured],
            "shares": [module_shares(record) for _, record in measured],
            "norms_at_start": module_norms(measured[0][1]),
            "eval_steps": [record["step"] for record in validated],
            "val_accuracy": {head: [record[f"val_{head}_accuracy"] for record in validated] for head in HEADS},
            "test": {key: value for key, value in test.items() if key != "examples"}}


def mean_and_sd(values: np.ndarray) -> tuple[list | float, list | float]:
    """Mean and sample sd over seeds (axis 0); sd 0 for one seed."""
    sd = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros_like(values[0])
    return values.mean(axis=0).tolist(), sd.tolist()


def summarize(runs: list[dict]) -> dict:
    """Per auxiliary weight, over seeds: mean shares, initial norms; main_output's accuracy and test loss, mean and sd.

    `late_val_accuracy`: each seed's mean over its last LATE_EVALS
    evaluations, less noisy than the last one alone.
    """
    summary = {}
    for weight in sorted({run["aux_weight"] for run in runs}):
        group = [run for run in runs if run["aux_weight"] == weight]
        shares = np.array([[[[shares[module][head] for head in HEADS] for module in MODULES]
                            for shares in run["shares"]] for run in group])  # run, step, module, head
        accuracy = np.array([run["val_accuracy"]["main_output"] for run in group])
        values = {
            "val_accuracy": accuracy, "late_val_accuracy": accuracy[:, -LATE_EVALS:].mean(axis=1),
            "test_accuracy": np.array([run["test"]["main_output_accuracy"] for run in group]),
            "test_loss": np.array([run["test"]["main_output_loss"] for run in group])}
        summary[str(weight)] = {
            "seeds": [run["seed"] for run in group], "share_steps": group[0]["share_steps"],
            "mean_shares": {module: {head: shares[:, :, m, h].mean(axis=0).tolist() for h, head in enumerate(HEADS)}
                            for m, module in enumerate(MODULES)},
            "mean_norms_at_start": {module: {name: float(np.mean([run["norms_at_start"][module][name]
                                                                  for run in group]))
                                             for name in [*HEADS, "total"]} for module in MODULES},
            "eval_steps": group[0]["eval_steps"],
            "final_val_accuracy_by_head": {head: float(np.mean([run["val_accuracy"][head][-1] for run in group]))
                                           for head in HEADS}}
        for name, array in values.items():
            summary[str(weight)][f"{name}_mean"], summary[str(weight)][f"{name}_sd"] = mean_and_sd(array)
    return summary


def report_steps(steps: list[int]) -> list[int]:
    """The first two, a quarter of the way, halfway, and the last."""
    last = len(steps) - 1
    return sorted({steps[index] for index in (0, min(1, last), last // 4, last // 2, last)})


def shown_weight(summary: dict) -> str:
    """The auxiliary weight whose shares are shown: the paper's, else the largest run."""
    return str(PAPER_WEIGHT) if str(PAPER_WEIGHT) in summary else max(summary, key=float)


def report(summary: dict) -> None:
    """Tables on stdout: shares and initial gradient norms at the shown weight, then accuracy per weight."""
    weight = shown_weight(summary)
    shown = summary[weight]
    columns = [shown["share_steps"].index(step) for step in report_steps(shown["share_steps"])]
    print(f"Share of each module's gradient, aux weight {weight}, mean of {len(shown['seeds'])} seed(s): "
          f"main_output / aux_1 / aux_2")
    print(("module     " + "".join(f"step {shown['share_steps'][c]:<14d}" for c in columns)).rstrip())
    for module in MODULES:
        cells = ["/".join(f"{shown['mean_shares'][module][head][c]:.2f}" for head in HEADS) for c in columns]
        print((f"{module:11s}" + "".join(f"{cell:19s}" for cell in cells)).rstrip())
    print(f"\nAt the initial weights, the norm of each head's contribution w * grad(L_head) to each module's "
          f"gradient (aux weight {weight})")
    print("module     " + "".join(f"{name:>13s}" for name in [*HEADS, "total"]))
    for module in MODULES:
        print(f"{module:11s}" + "".join(f"{shown['mean_norms_at_start'][module][name]:13.4f}"
                                        for name in [*HEADS, "total"]))
    steps = report_steps(shown["eval_steps"])
    print(f"\nmain_output validation accuracy, mean +- sd over seeds; the mean of the last {LATE_EVALS} "
          f"evaluations; the final test accuracy and loss")
    print("aux weight  " + "".join(f"step {step:<12d}" for step in steps)
          + f"{f'last {LATE_EVALS}':17s}{'test':17s}test loss")
    for weight, values in summary.items():
        cells = [f"{values['val_accuracy_mean'][i]:.3f}+-{values['val_accuracy_sd'][i]:.3f}"
                 for i in (values["eval_steps"].index(step) for step in steps)]
        cells += [f"{values[f'{name}_mean']:.3f}+-{values[f'{name}_sd']:.3f}"
                  for name in ("late_val_accuracy", "test_accuracy", "test_loss")]
        print((f"{weight:12s}" + "".join(f"{cell:17s}" for cell in cells)).rstrip())


def plot(summary: dict, path: str) -> None:
    """Each auxiliary head's share of each module's gradient over training; main accuracy per auxiliary weight."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weight = shown_weight(summary)
    shown = summary[weight]
    figure, axes = plt.subplots(1, 3, figsize=(18, 5.2))
    axes[1].sharey(axes[0])  # The two heads' shares on one scale.
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(MODULES)))
    for axis, head in zip(axes[:2], HEADS[1:]):
        for module, color in zip(MODULES, colors):
            values = shown["mean_shares"][module][head]
            if any(abs(value) > 1e-12 for value in values):  # A head reaches only the modules below it.
                axis.plot(shown["share_steps"], values, color=color, marker=".", label=module)
        axis.axhline(0.0, color="black", linewidth=0.8)
        axis.set_title(f"{head}'s share of each module's gradient (weight {weight})")
        axis.set_xlabel("step (0: initial weights)")
        axis.set_ylabel("share: <w grad L_head, grad L> / |grad L|^2")
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize="small", title="module (input first)")
    accuracy = axes[2]
    for weight, values in summary.items():
        mean, sd = np.array(values["val_accuracy_mean"]), np.array(values["val_accuracy_sd"])
        line, = accuracy.plot(values["eval_steps"], mean,
                              label=f"aux weight {weight}: test {values['test_accuracy_mean']:.3f} "
                                    f"+- {values['test_accuracy_sd']:.3f}")
        accuracy.fill_between(values["eval_steps"], mean - sd, mean + sd, color=line.get_color(), alpha=0.2)
    accuracy.set_title(f"main_output validation accuracy, mean +- sd over {len(shown['seeds'])} seed(s)")
    accuracy.set_xlabel("step")
    accuracy.set_ylabel("accuracy (left digit)")
    accuracy.legend(fontsize="small", loc="lower right")
    figure.suptitle("GoogLeNet's auxiliary heads (inception_aux v1, multi_digits): shares are means over seeds, "
                    "one batch per point after step 0")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def rounded(value, digits: int = 5):
    """Every float in `value` to `digits` significant digits: far finer than the noise, and a JSON a tenth the size."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, list):
        return [rounded(item, digits) for item in value]
    return value


def main(argv=None) -> dict:
    """Runs (or with --from_json reads) the experiment, reports it, writes the JSON and the figure; returns the JSON."""
    arguments = parse_arguments(argv)
    tf.get_logger().setLevel("ERROR")
    saved = os.path.join(arguments.output_dir, "auxiliary_heads.json")
    if arguments.from_json:
        with open(saved) as file:
            results = json.load(file)
    else:
        started = time.perf_counter()
        runs = [one_run(arguments, aux_weight=float(weight), seed=int(seed))
                for weight in arguments.aux_weights.split(",") for seed in arguments.seeds.split(",")]
        results = {"arguments": {key: value for key, value in vars(arguments).items() if key != "from_json"},
                   "heads": HEADS, "modules": MODULES, "runs": runs,
                   "seconds": round(time.perf_counter() - started, 1)}
    results = rounded({**results, "summary": summarize(results["runs"])})
    report(results["summary"])
    os.makedirs(arguments.output_dir, exist_ok=True)
    with open(saved, "w") as file:
        json.dump(results, file)
    plot(results["summary"], os.path.join(arguments.output_dir, "auxiliary_heads.png"))
    return results


if __name__ == "__main__":
    main()
