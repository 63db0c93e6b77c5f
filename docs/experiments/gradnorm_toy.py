"""GradNorm's synthetic regression (Chen et al. 2018, section 5.1), trained through mto_tf.

    python docs/experiments/gradnorm_toy.py --output_dir=docs/figures

Tasks `t_i = sigma_i tanh((B + eps_i) x)`: x in R^250, t_i in R^100, B and
eps_i fixed matrices with entries drawn from N(0, 10) and N(0, 3.5) (read
as variances), sigma = (1, 100): the second task's loss is 10^4 times the
first's. A 4-layer ReLU trunk of 100 units, one affine head per task,
squared error per task, Adam. One run per method, same seed and data;
each task's training loss over the steps, divided by sigma_i^2 (its
scale), is plotted. Writes `gradnorm_toy.json` and `gradnorm_toy.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import keras
import numpy as np
import tensorflow as tf

from mto_tf import TrainConfig, train

SIGMAS = (1.0, 100.0)
INPUTS, OUTPUTS, UNITS = 250, 100, 100
METHODS = ["fixed", "uncertainty", "gradnorm", "famo"]


def make_data(num_examples: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shared = rng.normal(0.0, np.sqrt(10.0), size=(OUTPUTS, INPUTS))
    x = rng.normal(size=(num_examples, INPUTS))
    data = {"x": x.astype(np.float32)}
    for task, sigma in enumerate(SIGMAS):
        own = rng.normal(0.0, np.sqrt(3.5), size=(OUTPUTS, INPUTS))
        data[f"task_{task}"] = (sigma * np.tanh(x @ (shared + own).T)).astype(np.float32)
    return data


def build():
    inputs = keras.Input((INPUTS,), name="x")
    trunk = inputs
    for layer in range(4):
        trunk = keras.layers.Dense(UNITS, activation="relu", name=f"trunk_{layer}")(trunk)
    return keras.Model(inputs, {f"task_{task}": keras.layers.Dense(OUTPUTS, name=f"head_{task}")(trunk)
                                for task in range(len(SIGMAS))}, name="gradnorm_toy")


def run(method, data, *, steps: int, log_every: int, seed: int) -> list[dict]:
    dataset = tf.data.Dataset.from_tensor_slices(({"x": data["x"]}, {name: data[name] for name in data
                                                                      if name != "x"}))
    with tempfile.TemporaryDirectory() as model_dir:
        config = TrainConfig(model=build, dataset=dataset, batch_size=64, train_steps=steps, log_every=log_every,
                             checkpoint_every=steps, losses={f"task_{task}": "mse" for task in range(len(SIGMAS))},
                             metrics={}, optimizer="adam", learning_rate=0.001, loss_weighting=method,
                             shuffle_buffer=1000, seed=seed, validation_split="", model_dir=model_dir,
                             progress="quiet")
        return train(config).history


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(SIGMAS), figsize=(6 * len(SIGMAS), 4.2), squeeze=False)
    for task, (axis, sigma) in enumerate(zip(axes[0], SIGMAS)):
        for method, history in results.items():
            steps = [record["step"] for record in history]
            axis.plot(steps, [record[f"task_{task}_loss"] / sigma ** 2 for record in history], label=method)
        axis.set_yscale("log")
        axis.set_xlabel("step")
        axis.set_ylabel(f"task_{task} training loss / sigma^2")
        axis.set_title(f"task_{task} (sigma = {sigma:g})")
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    figure.suptitle("GradNorm's synthetic regression through mto_tf: each task's loss, divided by its scale")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--log_every", type=int, default=50)
    parser.add_argument("--examples", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--output_dir", default="docs/figures")
    arguments = parser.parse_args()
    tf.get_logger().setLevel("ERROR")
    data = make_data(arguments.examples, arguments.seed)
    results = {}
    for method in arguments.methods.split(","):
        results[method] = run(method, data, steps=arguments.steps, log_every=arguments.log_every,
                              seed=arguments.seed)
        final = results[method][-1]
        print(f"{method:12s} " + ", ".join(f"task_{task} loss / sigma^2 {final[f'task_{task}_loss'] / sigma ** 2:.4f}"
                                          for task, sigma in enumerate(SIGMAS))
              + (f", weights {final.get('loss_weight/task_0', 1):.4g} / {final.get('loss_weight/task_1', 1):.4g}"),
              flush=True)
    os.makedirs(arguments.output_dir, exist_ok=True)
    with open(os.path.join(arguments.output_dir, "gradnorm_toy.json"), "w") as file:
        json.dump({"settings": vars(arguments), "sigmas": SIGMAS, "histories": results}, file)
    plot(results, os.path.join(arguments.output_dir, "gradnorm_toy.png"))


if __name__ == "__main__":
    main()
