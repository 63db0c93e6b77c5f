"""Every `--loss_weighting` method on real handwritten digits: `multi_digits`, `multi_lenet`, several seeds.

    python docs/experiments/weighting_benchmark.py --seeds=0,1,2 --output_dir=docs/figures

The benchmark of docs/architectures.md. Each image of `multi_digits` holds
two of scikit-learn's bundled handwritten digits; the tasks are to name the
`left` one and the `right` one. The model is Sener and Koltun's MultiLeNet
(`--model=multi_lenet`: a LeNet encoder both tasks share, a tower each),
with their sizes: 10 and 20 filters, a shared Dense of 50, towers of 50.

For each seed, with the same data, initial weights, optimizer and steps:

- two single-task models: the same network with the other task's loss
  weight 0 (its tower then gets no gradient and the encoder only this
  task's: exactly single-task training of the encoder and this tower);
- one multi-task run per method, with the method's default
  hyper-parameters, `fixed` being the plain sum with equal weights.

Each run is trained for `--train_steps` steps and evaluated once, on the
test split (drawn from digit scans no training image uses), with its final
weights: no choice by validation, so that no method gains from the noise of
a choice. The summary per method is each task's test accuracy, mean and
standard deviation over seeds, and LibMTL's Delta_m (Maninis et al. 2019;
Lin and Zhang 2023, LibMTL's `count_improvement`): the mean over tasks of
the relative improvement over the single-task model,

    Delta_m = 100 / T * sum_t (M_t - M_t^single) / M_t^single      (accuracy: higher is better)

with M_t^single the single-task models' mean over seeds, and Delta_m's mean
and sd taken over seeds. Writes `weighting_benchmark.json` (every run's
numbers, and the summary) and `weighting_benchmark.png` (each method's
Delta_m and accuracies), and prints the table in Markdown; `--from_json`
draws and prints them again. A run's directory under `--work_dir` is kept, so an
interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

TASKS = ("left", "right")
SINGLE_TASK = "single task"
# Sener and Koltun's MultiLeNet sizes; Adam at Keras's default rate 1e-3.
MODEL_SETTINGS = dict(model="multi_lenet", task_outputs=",".join(TASKS), task_classes=10, conv_filters=10,
                      dense_units=50, tower_units=50, optimizer="adam", batch_size=64)


def run_config(*, seed: int, loss_weighting: str, loss_weights: dict[str, float], model_dir: str,
               arguments: argparse.Namespace):
    """One run of the benchmark: everything but the method, the weights and the seed is the same for all."""
    from mto_tf import TrainConfig

    return TrainConfig(**{**MODEL_SETTINGS, "dense_units": arguments.dense_units}, dataset="multi_digits",
                       data_dir=arguments.data_dir, synthetic_train_examples=arguments.train_examples,
                       synthetic_test_examples=arguments.test_examples, validation_split="",
                       train_steps=arguments.train_steps, seed=seed, loss_weighting=loss_weighting,
                       loss_weights=loss_weights, model_dir=model_dir, progress="quiet")


def runs_of_seed(seed: int, methods: list[str], arguments: argparse.Namespace):
    """(method, the task it is scored on or None for every task, its config): the single-task runs, then each
    method."""
    # A rerun resumes a run of the same settings only: a directory per settings.
    settings = f"steps_{arguments.train_steps}_examples_{arguments.train_examples}_dense_{arguments.dense_units}"
    directory = os.path.join(arguments.work_dir, settings, f"seed_{seed}")
    for task in TASKS:
        weights = {name: float(name == task) for name in TASKS}
        yield SINGLE_TASK, task, run_config(seed=seed, loss_weighting="fixed", loss_weights=weights,
                                            model_dir=os.path.join(directory, f"single_{task}"), arguments=arguments)
    for method in methods:
        yield method, None, run_config(seed=seed, loss_weighting=method, loss_weights=dict.fromkeys(TASKS, 1.0),
                                       model_dir=os.path.join(directory, method), arguments=arguments)


def test_accuracies(config) -> dict[str, float]:
    """Train (or resume: a finished run trains nothing), then each task's accuracy over the whole test split."""
    import tensorflow as tf

    from mto_tf import train
    from mto_tf.programs.evaluate import evaluate, weights_file

    train(config)
    values = evaluate(config, strategy=tf.distribute.get_strategy(), eval_data=None, eval_split="test",
                      weights=weights_file(config.model_dir, "final"))
    return {task: values[f"{task}_accuracy"] for task in TASKS}


def delta_m(accuracies: dict[str, float], single_task: dict[str, float]) -> float:
    """LibMTL's Delta_m in percent: the mean relative improvement over the single-task models (higher is better)."""
    return 100 * statistics.fmean((accuracies[task] - single_task[task]) / single_task[task] for task in TASKS)


def mean_and_sd(values: list[float]) -> dict[str, float]:
    """The sample standard deviation (n - 1), 0 for one value."""
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarize(runs: list[dict]) -> dict[str, dict]:
    """Per method: each task's accuracy and Delta_m, mean and sd over seeds (Delta_m against the single-task mean)."""
    single = [run for run in runs if run["method"] == SINGLE_TASK]
    summary = {SINGLE_TASK: {task: mean_and_sd([run["accuracy"] for run in single if run["task"] == task])
                             for task in TASKS}}
    single_task = {task: summary[SINGLE_TASK][task]["mean"] for task in TASKS}
    for method in dict.fromkeys(run["method"] for run in runs if run["method"] != SINGLE_TASK):
        scores = [run["accuracy"] for run in runs if run["method"] == method]
        summary[method] = {**{task: mean_and_sd([score[task] for score in scores]) for task in TASKS},
                           "delta_m": mean_and_sd([delta_m(score, single_task) for score in scores])}
    return summary


def markdown_table(summary: dict[str, dict], seeds: int) -> str:
    """The table docs/architectures.md shows: accuracies in percent, mean +- sd over seeds."""
    def cell(value: dict | None) -> str:
        return "-" if value is None else f"{100 * value['mean']:.2f} ± {100 * value['sd']:.2f}"

    lines = ["| method | left accuracy (%) | right accuracy (%) | Δm (%) |", "|---|---|---|---|"]
    for method, values in summary.items():
        delta = values.get("delta_m")
        delta_text = "0 (reference)" if delta is None else f"{delta['mean']:+.2f} ± {delta['sd']:.2f}"
        lines.append(f"| {method} | {cell(values['left'])} | {cell(values['right'])} | {delta_text} |")
    return "\n".join(lines) + f"\n\nMean ± sd over {seeds} seeds."


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="Seeds, comma-separated (at least 3 for the table).")
    parser.add_argument("--methods", default=None, help="Methods, comma-separated; default: every one.")
    parser.add_argument("--train_steps", type=int, default=3000)
    parser.add_argument("--dense_units", type=int, default=MODEL_SETTINGS["dense_units"],
                        help="Width of the shared Dense layer (Sener and Koltun: 50).")
    parser.add_argument("--train_examples", type=int, default=10000)
    parser.add_argument("--test_examples", type=int, default=1000)
    parser.add_argument("--data_dir", default=os.path.join(tempfile.gettempdir(), "mto_tf_benchmark", "data"))
    parser.add_argument("--work_dir", default=os.path.join(tempfile.gettempdir(), "mto_tf_benchmark", "runs"),
                        help="One model directory per seed and run, kept: a rerun resumes.")
    parser.add_argument("--output_dir", default="docs/figures")
    parser.add_argument("--from_json", action="store_true", help="Print the table of the written JSON again.")
    arguments = parser.parse_args(argv)
    path = os.path.join(arguments.output_dir, "weighting_benchmark.json")
    if arguments.from_json:
        with open(path) as file:
            report = json.load(file)
    else:
        report = benchmark(arguments)
        os.makedirs(arguments.output_dir, exist_ok=True)
        with open(path, "w") as file:
            json.dump(report, file, indent=1)
    plot(report, os.path.join(arguments.output_dir, "weighting_benchmark.png"))
    print(markdown_table(report["summary"], len(report["seeds"])))
    return report


def plot(report: dict, path: str) -> None:
    """Left: each method's Delta_m, mean and sd over seeds; right: each task's accuracy, with the single-task level."""
    import matplotlib
    matplotlib.use("Agg")  # Files only, no screen.
    import matplotlib.pyplot as plt

    summary = report["summary"]
    methods = [method for method in summary if method != SINGLE_TASK]
    positions = range(len(methods))
    figure, (left_axis, right_axis) = plt.subplots(1, 2, figsize=(12, 4.2))
    deltas = [summary[method]["delta_m"] for method in methods]
    left_axis.bar(positions, [delta["mean"] for delta in deltas], yerr=[delta["sd"] for delta in deltas],
                  color=["tab:green" if delta["mean"] > 0 else "tab:red" for delta in deltas], capsize=3)
    left_axis.axhline(0, color="black", linewidth=0.8)
    left_axis.set_ylabel("Δm (%) against single-task models")
    for task, offset, color in zip(TASKS, (-0.15, 0.15), ("tab:blue", "tab:orange")):
        values = [summary[method][task] for method in methods]
        right_axis.errorbar([position + offset for position in positions], [100 * value["mean"] for value in values],
                            yerr=[100 * value["sd"] for value in values], fmt="o", color=color, capsize=3,
                            label=f"{task} (multi-task)")
        right_axis.axhline(100 * summary[SINGLE_TASK][task]["mean"], color=color, linestyle="--",
                           label=f"{task} (single-task)")
    right_axis.set_ylabel("test accuracy (%)")
    right_axis.legend(fontsize="small")
    for axis in (left_axis, right_axis):
        axis.set_xticks(positions, methods, rotation=40, ha="right")
        axis.grid(alpha=0.3, axis="y")
    settings = report["settings"]
    figure.suptitle(f"multi_digits, {settings['model']}, {settings['train_steps']} steps: mean and sd over "
                    f"{len(report['seeds'])} seeds")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def benchmark(arguments: argparse.Namespace) -> dict:
    """Every run of every seed; the runs' numbers and their summary."""
    from mto_tf import loss_weighting

    methods = arguments.methods.split(",") if arguments.methods else list(loss_weighting.METHODS)
    unknown = [method for method in methods if method not in loss_weighting.METHODS]
    if unknown:  # Before any run trains.
        raise SystemExit(f"--methods: unknown {unknown}; expected some of {', '.join(loss_weighting.METHODS)}")
    seeds = [int(seed) for seed in arguments.seeds.split(",")]
    runs = []
    for seed in seeds:
        for method, task, config in runs_of_seed(seed, methods, arguments):
            accuracies = test_accuracies(config)
            runs.append({"method": method, "seed": seed, "task": task,
                         "accuracy": accuracies[task] if task else accuracies})
            print(f"seed {seed}, {method}{f' ({task})' if task else ''}: test accuracy {runs[-1]['accuracy']}",
                  flush=True)
    settings = {**MODEL_SETTINGS, "dense_units": arguments.dense_units, "train_steps": arguments.train_steps,
                "train_examples": arguments.train_examples, "test_examples": arguments.test_examples}
    return {"settings": settings, "seeds": seeds, "runs": runs, "summary": summarize(runs)}


if __name__ == "__main__":
    main()
