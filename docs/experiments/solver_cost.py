"""The cost of the MGDA, UPGrad and CAGrad solvers: enumeration of every support against the active-set methods.

    python docs/experiments/solver_cost.py --output_dir=docs/figures

For each K, a random Jacobian of n = 1000 columns (rows with a shared
direction, a quarter of them against it, scales varying by output), its
Gramian divided by its trace (the scale the solvers see in training),
and each solver in its own `tf.function`: traced once, then
called `--calls` times (fewer, at least 3, when the calls take over
`--seconds_per_case` seconds); the median time of a call, in ms, is kept.
The enumeration runs up to K = `--enumeration_up_to` (2^K supports), the
active-set methods at every K. Writes `solver_cost.json` and prints a
table. `--jit_compile` measures the same under XLA, into
`solver_cost_xla.json` (on CPU, XLA's enumeration takes seconds a call
from K = 12):

    python docs/experiments/solver_cost.py --output_dir=docs/figures --jit_compile --outputs=2,4,6,8,10,12,40 --calls=20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import tensorflow as tf

from mto_tf.core.weighting import solvers

CAGRAD_C = 0.4


def conflicting_jacobian(k: int, n: int, seed: int) -> np.ndarray:
    """K gradients sharing a direction, a quarter of them against it, with scales varying by output."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=n)
    signs = np.where(np.arange(k) % 4 == 3, -1.0, 1.0)
    scales = np.exp(rng.normal(scale=0.5, size=k))
    return scales[:, None] * (signs[:, None] * shared + rng.normal(size=(k, n)))


def solver_functions(k: int, jit_compile: bool, enumeration_up_to: int
                     ) -> dict[str, tf.types.experimental.GenericFunction]:
    """Each (problem, method) as a tf.function of the Gramian, as the training step calls it."""
    lower = tf.eye(k, dtype=tf.float64) / k
    methods = {
        "mgda": {"enumeration": solvers.min_norm_in_simplex_by_enumeration,
                 "iterative": solvers.min_norm_in_simplex_iterative},
        "upgrad": {"enumeration": lambda gram: solvers.project_onto_dual_cone_by_enumeration(gram, lower),
                   "iterative": lambda gram: solvers.project_onto_dual_cone_iterative(gram, lower)},
        "cagrad": {"enumeration": lambda gram: solvers.conflict_averse_by_enumeration(gram, CAGRAD_C),
                   "iterative": lambda gram: solvers.conflict_averse_iterative(gram, CAGRAD_C)},
    }
    return {f"{problem}/{method}": tf.function(function, jit_compile=jit_compile)
            for problem, by_method in methods.items() for method, function in by_method.items()
            if method == "iterative" or k <= enumeration_up_to}


def median_call_ms(function, gram: tf.Tensor, calls: int, seconds: float) -> tuple[float, float, int]:
    """The tracing time (s) of the first call, the median time (ms) of the later ones, and their number."""
    start = time.perf_counter()
    function(gram).numpy()
    tracing = time.perf_counter() - start
    times = []
    while len(times) < calls and (len(times) < 3 or sum(times) < seconds):
        start = time.perf_counter()
        function(gram).numpy()
        times.append(time.perf_counter() - start)
    return tracing, 1e3 * float(np.median(times)), len(times)


def cpu_model() -> str:
    """The CPU's model name, as lscpu shows it."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--outputs", default="2,3,4,5,6,7,8,10,12,16,40,100", help="the K values, comma-separated")
    parser.add_argument("--columns", type=int, default=1000, help="n, the Jacobian's columns")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--seconds_per_case", type=float, default=20.0)
    parser.add_argument("--enumeration_up_to", type=int, default=16, help="the largest K the enumeration runs at")
    parser.add_argument("--jit_compile", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rows = []
    for k in (int(value) for value in args.outputs.split(",")):
        jacobian = conflicting_jacobian(k, args.columns, args.seed)
        gram = jacobian @ jacobian.T
        gram = tf.constant(gram / np.trace(gram))
        for name, function in solver_functions(k, args.jit_compile, args.enumeration_up_to).items():
            tracing, median, calls = median_call_ms(function, gram, args.calls, args.seconds_per_case)
            problem, method = name.split("/")
            rows.append({"K": k, "problem": problem, "method": method, "median_ms": median, "calls": calls,
                         "tracing_s": tracing})
            print(f"K={k:3d} {problem:7s} {method:12s} {median:10.3f} ms  ({calls} calls, traced in {tracing:.1f} s)",
                  flush=True)

    result = {"command": " ".join(["python", *sys.argv]), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
              "tensorflow": tf.__version__,
              "jit_compile": args.jit_compile, "enumeration_max_outputs": solvers.ENUMERATION_MAX_OUTPUTS,
              "rows": rows}
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "solver_cost_xla.json" if args.jit_compile else "solver_cost.json")
    with open(path, "w") as file:
        json.dump(result, file, indent=1)
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
