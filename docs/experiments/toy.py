"""The two-objective toy of CAGrad (Liu et al. 2021, `toy.py` of github.com/Cranial-XIX/CAGrad), trained through mto_tf.

    python docs/experiments/toy.py --steps=100000 --output_dir=docs/figures

The model has one shared weight, the point x in R^2, and two outputs, f1(x)
and f2(x), the toy's two objectives, each its own loss (the loss is the
output itself). It is trained from the toy's three starting points with
Adam (learning rate 0.001), as the toy trains it, once per method; the
point is recorded every `--record_every` steps. The Pareto set is the
segment x1 in [-7, 7], x2 = -8.3552 (the toy's plot draws it so); an end
point is on it when it is Pareto-stationary: the min-norm convex
combination of the two objectives' gradients there (MGDA's direction,
central differences in float64) is below 1e-2, about 1/1000 of the
gradients' size on the way. Writes `toy.json` (the trajectories and where
each ended) and `toy.png`; `--from_json` redraws and re-reports them.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from mto_tf import TrainConfig
from mto_tf.core.strategy import make_strategy
from mto_tf.run import custom_loop
from mto_tf.run.setup import build_run

LOWER = 0.000005  # The toy's clamp.
STARTS = [(-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0)]
PARETO_X2 = -8.3552
METHODS = ["fixed", "mgda", "pcgrad", "cagrad", "imtl", "aligned_mtl", "upgrad"]


def objectives(x1, x2):
    """f1 and f2 of the toy, as its `Toy.forward` computes them."""
    f1 = ops.log(ops.maximum(ops.abs(0.5 * (-x1 - 7) - ops.tanh(-x2)), LOWER)) + 6
    f2 = ops.log(ops.maximum(ops.abs(0.5 * (-x1 + 3) + ops.tanh(-x2) + 2), LOWER)) + 6
    c1 = ops.maximum(ops.tanh(x2 * 0.5), 0)
    f1_sq = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    f2_sq = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    c2 = ops.maximum(ops.tanh(-x2 * 0.5), 0)
    return f1 * c1 + f1_sq * c2, f2 * c1 + f2_sq * c2


class Point(keras.layers.Layer):
    """The toy's one trainable thing: the point x; its input only gives the batch its size."""

    def __init__(self, start, **kwargs):
        super().__init__(**kwargs)
        self.start = start

    def build(self, input_shape):
        self.x = self.add_weight(shape=(2,), initializer=keras.initializers.Constant(self.start), name="x")

    def call(self, inputs):
        f1, f2 = objectives(self.x[0], self.x[1])
        ones = ops.ones_like(inputs)
        return {"f1": ones * f1, "f2": ones * f2}


def builder(start):
    def build():
        inputs = keras.Input((1,), name="batch")
        return keras.Model(inputs, Point(start, name="point")(inputs), name="toy")
    return build


def the_output_itself(y_true, y_pred):
    """Each output is its own objective: its loss is its value."""
    return y_pred[:, 0]


def run(method: str, start, *, steps: int, record_every: int) -> np.ndarray:
    dataset = tf.data.Dataset.from_tensors(({"batch": [1.0]}, {"f1": [0.0], "f2": [0.0]})).repeat()
    with tempfile.TemporaryDirectory() as model_dir:
        config = TrainConfig(model=builder(start), dataset=dataset, batch_size=1, train_steps=steps,
                             log_every=record_every, checkpoint_every=steps, steps_per_loop=record_every,
                             losses={"f1": the_output_itself, "f2": the_output_itself},
                             loss_weights={"f1": 0.5, "f2": 0.5},  # The toy's mean of the two.
                             metrics={}, optimizer="adam", learning_rate=0.001, loss_weighting=method,
                             validation_split="", model_dir=model_dir, progress="quiet", seed=0)
        train_run = build_run(config, make_strategy(config))
        point = train_run.setup.model.get_layer("point").x
        trajectory = [point.numpy().copy()]
        custom_loop.run_custom_loop(train_run, actions=[lambda boundary: trajectory.append(
            point.numpy().copy())])
    return np.array(trajectory)


def stationarity(point) -> float:
    """|min-norm convex combination of grad f1 and grad f2| at `point` (0 on the Pareto set)."""
    def gradients(x):
        step = 1e-6
        rows = []
        for objective in range(2):
            rows.append([(float(objectives(*(x + step * np.eye(2)[i]))[objective])
                          - float(objectives(*(x - step * np.eye(2)[i]))[objective])) / (2 * step) for i in range(2)])
        return np.array(rows)

    g1, g2 = gradients(np.asarray(point, dtype=np.float64))
    gamma = np.clip((g2 - g1) @ g2 / max(np.sum((g1 - g2) ** 2), 1e-300), 0.0, 1.0)
    return float(np.linalg.norm(gamma * g1 + (1 - gamma) * g2))


def report(results: dict) -> None:
    for method, runs in results.items():
        for run in runs:
            end = run["end"]
            run["stationarity"] = stationarity(end)
            run["on_pareto_set"] = bool(run["stationarity"] < 1e-2 and -7 <= end[0] <= 7)
            print(f"{method:12s} from {tuple(run['start'])}: ends at ({end[0]:.3f}, {end[1]:.3f}), "
                  f"|MGDA direction| {run['stationarity']:.1e}: "
                  f"{'on' if run['on_pareto_set'] else 'NOT on'} the Pareto set", flush=True)


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.linspace(-11, 11, 300)
    x1, x2 = np.meshgrid(grid, grid)
    f1, f2 = (np.asarray(value) for value in objectives(x1, x2))
    columns = 4
    rows = -(-len(results) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 4 * rows), squeeze=False)
    for axis in axes.flat[len(results):]:
        axis.axis("off")
    for axis, (method, trajectories) in zip(axes.flat, results.items()):
        axis.contour(x1, x2, (f1 + f2) / 2, levels=25, cmap="viridis", linewidths=0.8)
        axis.plot([-7, 7], [PARETO_X2, PARETO_X2], color="grey", linewidth=5, alpha=0.6, label="Pareto set")
        for start, trajectory in zip(STARTS, trajectories):
            trajectory = np.array(trajectory["points"])
            axis.plot(trajectory[:, 0], trajectory[:, 1], color="tab:red", linewidth=1.5)
            axis.plot(*start, "ko", markersize=5)
            axis.plot(*trajectory[-1], "r*", markersize=9)
        axis.set_title(method)
        axis.set_xlim(-11, 11)
        axis.set_ylim(-11, 11)
        axis.set_aspect("equal")
    figure.suptitle("CAGrad's two-objective toy through mto_tf: contours of (f1 + f2) / 2, the Pareto set (grey), "
                    "from each start (black) to the end (red star)")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100000)
    parser.add_argument("--record_every", type=int, default=500)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--output_dir", default="docs/figures")
    parser.add_argument("--from_json", action="store_true", help="Redraw and re-report --output_dir/toy.json.")
    arguments = parser.parse_args()
    tf.get_logger().setLevel("ERROR")
    saved = os.path.join(arguments.output_dir, "toy.json")
    if arguments.from_json:
        with open(saved) as file:
            steps, results = (lambda data: (data["steps"], data["results"]))(json.load(file))
    else:
        steps, results = arguments.steps, {}
        for method in arguments.methods.split(","):
            results[method] = [{"start": start, "end": [float(v) for v in trajectory[-1]],
                                "points": trajectory.tolist()}
                               for start in STARTS
                               for trajectory in [run(method, start, steps=steps, record_every=arguments.record_every)]]
    report(results)
    os.makedirs(arguments.output_dir, exist_ok=True)
    with open(saved, "w") as file:
        json.dump({"steps": steps, "results": results}, file)
    plot(results, os.path.join(arguments.output_dir, "toy.png"))


if __name__ == "__main__":
    main()
