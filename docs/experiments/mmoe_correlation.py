"""Shared-Bottom against MMoE as the two tasks' correlation falls (Ma et al. KDD 2018, Figure 4), through mto_tf.

    python docs/experiments/mmoe_correlation.py --correlations=1.0,0.9,0.5 --seeds=0,1,2 --output_dir=docs/figures

The MMoE paper's synthetic experiment: two regression tasks of
`mmoe_synthetic` (its Section 3.2 data, `--task_correlation=p`), trained
jointly (the sum of the two mean squared errors) by `--model=mmoe` and by
its baseline `--model=shared_bottom`, at each correlation and seed. The
sizes are the paper's: 100 input features, 8 experts of 16 ReLU units, a
tower of 8 per task; the shared bottom is one ReLU layer whose width
(`bottom_units`) gives it as many parameters as MMoE, gates included (the
paper matches the models' parameter counts): 126 units, 14776 parameters
against MMoE's 14834.

Both train with Adam at learning rate 1e-3 (mto-train's default optimizer
is RMSprop), batch 512, for 20000 steps, on 200000 generated training
examples rather than the dataset's default 10000: with 10000 both models
overfit within a few epochs, before they learn the sines, and end level.
Each run is validated every `--eval_every` steps (the curves: the paper
plots training loss) and scored once, with its final weights, on the test
split: no choice by validation. The data is the same for every seed
(`mmoe_synthetic` fixes it); the seed changes the initial weights and the
order of the batches.

Writes `mmoe_correlation.json` (every run's curves and test MSEs, and the
table) and `mmoe_correlation.png` (per correlation, the curves over all
steps and, magnified, over the second half; the test MSEs), and prints the
table in Markdown; `--from_json` draws and prints them again. About 17
minutes on 2 CPU cores shared with other work, once the data is generated
(in `--data_dir`, on first use: 200000 examples per correlation).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

MODELS = ("shared_bottom", "mmoe")
TASKS = ("task_a", "task_b")
COLORS = {"shared_bottom": "tab:blue", "mmoe": "tab:red"}


def dense_parameters(fan_in: int, units: int) -> int:
    """A Dense layer's kernel and bias."""
    return fan_in * units + units


def towers_parameters(fan_in: int, arguments: argparse.Namespace) -> int:
    """Every task's tower: a ReLU layer of tower_units, then one linear output."""
    return len(TASKS) * (dense_parameters(fan_in, arguments.tower_units) + dense_parameters(arguments.tower_units, 1))


def mmoe_parameters(arguments: argparse.Namespace) -> int:
    """The experts, a softmax gate per task (on the input), the towers."""
    return (arguments.num_experts * dense_parameters(arguments.features_dim, arguments.expert_units)
            + len(TASKS) * dense_parameters(arguments.features_dim, arguments.num_experts)
            + towers_parameters(arguments.expert_units, arguments))


def shared_bottom_parameters(units: int, arguments: argparse.Namespace) -> int:
    """One shared ReLU layer of `units`, the towers."""
    return dense_parameters(arguments.features_dim, units) + towers_parameters(units, arguments)


def bottom_units(arguments: argparse.Namespace) -> int:
    """The shared bottom's width: --bottom_units, or (0) the width whose parameter count is nearest MMoE's."""
    if arguments.bottom_units:
        return arguments.bottom_units
    widest = mmoe_parameters(arguments) // (arguments.features_dim + 1) + 1  # Beyond it the bottom alone is larger.
    return min(range(1, widest + 1),
               key=lambda units: abs(shared_bottom_parameters(units, arguments) - mmoe_parameters(arguments)))


def parameter_counts(arguments: argparse.Namespace) -> dict[str, int]:
    """Each model's trainable parameters, counted by hand (each run records Keras's count of its model too)."""
    return {"shared_bottom": shared_bottom_parameters(bottom_units(arguments), arguments),
            "mmoe": mmoe_parameters(arguments)}


def run_config(model: str, correlation: float, seed: int, model_dir: str, arguments: argparse.Namespace):
    """One run: everything but the model, the correlation and the seed is the same for all."""
    from mto_tf import TrainConfig

    # shared_bottom's one layer is sized by expert_units; it has no experts (and refuses --num_experts).
    sizes = (dict(num_experts=arguments.num_experts, expert_units=arguments.expert_units) if model == "mmoe"
             else dict(expert_units=bottom_units(arguments)))
    return TrainConfig(model=model, **sizes, task_outputs=",".join(TASKS), task_classes=0,
                       features_dim=arguments.features_dim, tower_units=arguments.tower_units,
                       dataset="mmoe_synthetic", task_correlation=correlation, data_dir=arguments.data_dir,
                       synthetic_train_examples=arguments.train_examples,
                       synthetic_validation_examples=arguments.validation_examples,
                       synthetic_test_examples=arguments.test_examples,
                       optimizer="adam", learning_rate=arguments.learning_rate, batch_size=arguments.batch_size,
                       train_steps=arguments.train_steps, eval_every=arguments.eval_every,
                       log_every=arguments.eval_every, steps_per_loop=min(100, arguments.eval_every),
                       checkpoint_every=arguments.train_steps, seed=seed, model_dir=model_dir, progress="quiet")


def train_and_test(config) -> dict:
    """Trains one run; its curves (the mean of the two tasks' MSE), test MSEs and parameter count."""
    import tensorflow as tf

    from mto_tf import train
    from mto_tf.programs.evaluate import evaluate, weights_file

    result = train(config)
    test = evaluate(config, strategy=tf.distribute.get_strategy(), eval_data=None, eval_split="test",
                    weights=weights_file(config.model_dir, "final"))
    # A validation's record is also the record of the training window it ends (its values: the window's means).
    records = [record for record in result.history if "val_loss" in record]
    return {"parameters": result.model.count_params(),
            "steps": [record["step"] for record in records],
            "train_mse": [statistics.fmean(record[f"{task}_loss"] for task in TASKS) for record in records],
            "validation_mse": [statistics.fmean(record[f"val_{task}_loss"] for task in TASKS) for record in records],
            "test_mse": {**{task: test[f"{task}_loss"] for task in TASKS},
                         "mean": statistics.fmean(test[f"{task}_loss"] for task in TASKS)}}


def experiment(arguments: argparse.Namespace) -> dict:
    """Every model at every correlation and seed; the runs and their table."""
    correlations = [float(value) for value in arguments.correlations.split(",")]
    seeds = [int(value) for value in arguments.seeds.split(",")]
    runs = []
    for correlation in correlations:
        for seed in seeds:
            for model in MODELS:
                with tempfile.TemporaryDirectory() as model_dir:
                    run = train_and_test(run_config(model, correlation, seed, model_dir, arguments))
                runs.append({"model": model, "correlation": correlation, "seed": seed, **run})
                print(f"p={correlation} seed {seed} {model}: test MSE {run['test_mse']}", flush=True)
    settings = {name: value for name, value in vars(arguments).items() if name not in ("output_dir", "from_json")}
    return {"settings": {**settings, "bottom_units": bottom_units(arguments)},
            "parameters": parameter_counts(arguments), "runs": runs, "table": table(runs)}


def mean_and_sd(values: list[float]) -> dict[str, float]:
    """The sample standard deviation (n - 1), 0 for one value."""
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def table(runs: list[dict]) -> list[dict]:
    """One row per model and correlation: each task's test MSE and their mean, mean and sd over seeds."""
    rows = []
    for correlation in dict.fromkeys(run["correlation"] for run in runs):
        for model in MODELS:
            scores = [run["test_mse"] for run in runs if run["model"] == model and run["correlation"] == correlation]
            rows.append({"model": model, "correlation": correlation, "seeds": len(scores),
                         **{column: mean_and_sd([score[column] for score in scores]) for column in (*TASKS, "mean")}})
    return rows


def markdown_table(report: dict) -> str:
    """The table for docs/architectures.md: test MSE, mean ± sd over seeds."""
    lines = ["| correlation | model | task_a MSE | task_b MSE | mean MSE |", "|---|---|---|---|---|"]
    for row in report["table"]:
        cells = " | ".join(f"{row[column]['mean']:.3f} ± {row[column]['sd']:.3f}" for column in (*TASKS, "mean"))
        lines.append(f"| {row['correlation']} | {row['model']} | {cells} |")
    counts = ", ".join(f"{model} {count}" for model, count in report["parameters"].items())
    seeds = report["table"][0]["seeds"]
    return "\n".join(lines) + f"\n\nTest MSE, mean ± sd over {seeds} seeds; parameters: {counts}."


def plot(report: dict, path: str) -> None:
    """A column per correlation: the curves over all steps (top, log scale) and over the second half (bottom,
    where the models part); at the right, each model's test MSE at each correlation."""
    import matplotlib
    matplotlib.use("Agg")  # Files only, no screen.
    import matplotlib.pyplot as plt

    runs = report["runs"]
    correlations = list(dict.fromkeys(run["correlation"] for run in runs))
    figure = plt.figure(figsize=(4.5 * (len(correlations) + 1), 8))
    grid = figure.add_gridspec(2, len(correlations) + 1)
    whole = [figure.add_subplot(grid[0, column]) for column in range(len(correlations))]
    second_half = [figure.add_subplot(grid[1, column]) for column in range(len(correlations))]
    for axis in (*whole[1:], *second_half[1:]):
        axis.sharey(whole[0] if axis in whole else second_half[0])  # One scale for every correlation.
    half_way = max(runs[0]["steps"]) / 2
    for column, correlation in enumerate(correlations):
        plot_curves(whole[column], runs, correlation, from_step=0, log_scale=True)
        plot_curves(second_half[column], runs, correlation, from_step=half_way, log_scale=False)
        whole[column].set_title(f"task correlation p = {correlation}")
        second_half[column].set_title(f"p = {correlation}, from step {half_way:g}")
    whole[0].set_ylabel("MSE, mean of the two tasks (log scale)")
    second_half[0].set_ylabel("MSE, mean of the two tasks")
    whole[0].legend(fontsize="small")
    plot_test_mse(figure.add_subplot(grid[:, -1]), report["table"], correlations)
    settings = report["settings"]
    figure.suptitle(f"mmoe_synthetic: shared_bottom ({report['parameters']['shared_bottom']} parameters) against "
                    f"mmoe ({report['parameters']['mmoe']}); Adam {settings['learning_rate']}, batch "
                    f"{settings['batch_size']}, {settings['train_examples']} training examples\nValidation: "
                    f"each of {len(set(run['seed'] for run in runs))} seeds thin, their mean thick; training "
                    f"(the seeds' mean of each window's mean) dashed")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def plot_curves(axis, runs: list[dict], correlation: float, *, from_step: float, log_scale: bool) -> None:
    """Each model's validation MSE from `from_step` on (each seed, and their mean) and its training MSE (mean)."""
    from matplotlib import ticker

    for model in MODELS:
        curves = [run for run in runs if run["model"] == model and run["correlation"] == correlation]
        shown = [index for index, step in enumerate(curves[0]["steps"]) if step >= from_step]
        steps = [curves[0]["steps"][index] for index in shown]
        for curve in curves:
            axis.plot(steps, [curve["validation_mse"][index] for index in shown], color=COLORS[model],
                      linewidth=0.7, alpha=0.35)
        for values, style, label in (("validation_mse", "-", f"{model}, validation"),
                                     ("train_mse", "--", f"{model}, training")):
            mean_curve = [statistics.fmean(curve[values][index] for curve in curves) for index in shown]
            axis.plot(steps, mean_curve, style, color=COLORS[model], linewidth=1.8, label=label)
    axis.set_xlabel("training step")
    if log_scale:
        axis.set_yscale("log")
        axis.yaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 3, 5)))
        axis.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))  # 0.3, not 3 x 10^-1.
        axis.yaxis.set_minor_formatter(ticker.NullFormatter())
    axis.grid(alpha=0.3, which="both")


def plot_test_mse(axis, rows: list[dict], correlations: list[float]) -> None:
    """Each model's test MSE (mean of the two tasks), mean and sd over seeds, one column per correlation."""
    for offset, model in zip((-0.06, 0.06), MODELS):
        values = [next(row["mean"] for row in rows if row["model"] == model and row["correlation"] == correlation)
                  for correlation in correlations]
        axis.errorbar([position + offset for position in range(len(correlations))],
                      [value["mean"] for value in values], yerr=[value["sd"] for value in values],
                      fmt="o-", color=COLORS[model], capsize=4, label=model)
    axis.set_xticks(range(len(correlations)), [f"p = {correlation}" for correlation in correlations])
    axis.set_xlim(-0.5, len(correlations) - 0.5)
    axis.set_title("final weights on the test split")
    axis.set_ylabel("test MSE, mean of the two tasks (mean ± sd)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--correlations", default="1.0,0.9,0.5", help="Task correlations p, comma-separated.")
    parser.add_argument("--seeds", default="0,1,2", help="Seeds, comma-separated.")
    parser.add_argument("--train_steps", type=int, default=20000)
    parser.add_argument("--eval_every", type=int, default=500, help="Steps between validations: the curves' points.")
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="Adam's.")
    parser.add_argument("--train_examples", type=int, default=200000)
    parser.add_argument("--validation_examples", type=int, default=1000)
    parser.add_argument("--test_examples", type=int, default=1000)
    parser.add_argument("--features_dim", type=int, default=100)
    parser.add_argument("--num_experts", type=int, default=8)
    parser.add_argument("--expert_units", type=int, default=16)
    parser.add_argument("--tower_units", type=int, default=8)
    parser.add_argument("--bottom_units", type=int, default=0,
                        help="shared_bottom's width; 0: as many parameters as mmoe.")
    parser.add_argument("--data_dir", default=os.path.join(tempfile.gettempdir(), "mto_tf_mmoe_correlation"),
                        help="TFDS data directory: each correlation's data is generated there once.")
    parser.add_argument("--output_dir", default="docs/figures")
    parser.add_argument("--from_json", action="store_true", help="Draw and print the written JSON again.")
    arguments = parser.parse_args(argv)
    path = os.path.join(arguments.output_dir, "mmoe_correlation.json")
    if arguments.from_json:
        with open(path) as file:
            report = json.load(file)
    else:
        report = experiment(arguments)
        os.makedirs(arguments.output_dir, exist_ok=True)
        with open(path, "w") as file:
            json.dump(report, file, indent=1)
    plot(report, os.path.join(arguments.output_dir, "mmoe_correlation.png"))
    print(markdown_table(report))
    return report


if __name__ == "__main__":
    main()
