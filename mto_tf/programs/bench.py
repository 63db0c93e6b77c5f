"""Training throughput: the custom loop against `model.fit` and against the limit.

    python -m mto_tf.bench --output_json=/tmp/bench.json
    python -m mto_tf.bench --variants=custom_default,fit_default --embedding_dim=64

Every `mto-train` flag sets the model, data and defaults being measured (the
guide's sizes: sequence 100, vocab 10000, embedding 512, LSTM 32, batch 64).
Each variant runs in a fresh process, so none warms another; it trains
`--warmup_windows` windows of `--window_steps` steps (tracing included, not
counted), then `--windows` timed windows. The processes take turns, one
window at a time (never two at once): this machine's speed drifts by 10-20 %
over tens of seconds, and windows timed next to each other see the same
drift, so their ratios do not. `--repeats=N` runs N such sets of processes
and pools their windows. Reported: the median examples per second over the
timed windows, their spread ((max - min) / median), and the peak resident
memory of the variant's processes.

- fit_default: `compile` + `fit` with Keras's defaults;
- fit_matched: `fit` with mto-train's `steps_per_execution` (`--steps_per_loop`) and `--jit_compile`;
- custom_default: `mto-train`'s defaults, logging and checkpoints included;
- custom_matched: the custom loop with fit's defaults (1 step per call, no XLA);
- limit: the same train step in one `tf.function` loop over batches already in memory;
- mirrored_custom_default, mirrored_fit_matched: the same under `mirrored`, 2 logical CPU devices
  (fit there with steps_per_execution=1: more fails in Keras 3.15, keras-team/keras#19246);
- weighting:NAME[/GRADIENTS]: custom_default with `--loss_weighting=NAME` (its defaults) and
  `--weighting_gradients=GRADIENTS`, e.g. `weighting:mgda/representation:lstm`; each against
  `weighting:fixed` when that runs too:

      python -m mto_tf.bench --variants=weighting:fixed,weighting:uncertainty,weighting:mgda

`--input` measures the input pipelines instead: rows and bytes each worker
reads per step, and its memory, per source (`input_bench.py`).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from mto_tf.config import TrainConfig
from mto_tf.errors import ConfigError
from mto_tf.programs import flags as mto_flags
from mto_tf.programs import tensorflow_logs

FLAGS = flags.FLAGS
VARIANTS = ("fit_default", "fit_matched", "custom_default", "custom_matched", "limit",
            "mirrored_custom_default", "mirrored_fit_matched")
# The speed-up a user gets, then like for like (equal with --xla_update=off), then the distance to the limit.
RATIOS = (("custom_default", "fit_default"), ("custom_default", "fit_matched"), ("custom_matched", "fit_default"),
          ("custom_default", "limit"),
          ("mirrored_custom_default", "mirrored_fit_matched"))
WEIGHTING_PREFIX = "weighting:"  # weighting:NAME[/GRADIENTS]: custom_default with that --loss_weighting.
RESULT_PREFIX = "BENCH_RESULT "
TURN_DONE = "BENCH_TURN_DONE"


def variant_config(name: str, config: TrainConfig) -> TrainConfig:
    """The configuration a variant trains with, from the benchmark's base configuration."""
    if name.startswith(WEIGHTING_PREFIX):
        method, _, gradients = name.removeprefix(WEIGHTING_PREFIX).partition("/")
        return dataclasses.replace(config, loss_weighting=method, weighting_gradients=gradients or "shared_weights")
    if name.startswith("mirrored_"):
        config = dataclasses.replace(config, strategy="mirrored", num_cpu_devices=2, jit_compile=False,
                                     xla_update=False)
    if name == "mirrored_fit_matched":
        # Keras 3.15's fit fails under MirroredStrategy with steps_per_execution
        # > 1 (keras-team/keras#19246): 1 is the closest fit can match.
        config = dataclasses.replace(config, steps_per_loop=1)
    if name in ("custom_matched", "fit_default"):
        # Keras's defaults: steps_per_execution=1, and jit_compile="auto",
        # which leaves XLA off on a CPU (for the update too).
        config = dataclasses.replace(config, steps_per_loop=1, jit_compile=False, xla_update=False)
    return config


class Turns:
    """A variant's side of taking turns: it runs a window only when the parent says so."""

    def __init__(self):
        self.intervals: list[tuple[float, float]] = []  # Wall-clock start and end of each turn.
        self._start = 0.0

    def wait(self) -> None:
        """Blocks until the parent writes a line; returns at once when the parent has closed stdin (the end)."""
        sys.stdin.readline()
        self._start = time.time()

    def done(self) -> None:
        self.intervals.append((self._start, time.time()))
        print(TURN_DONE, flush=True)


# --- All variants, each in a fresh process ----------------------------------------------------

def machine(*, gpus: int) -> dict:
    """What the numbers were measured on (`gpus`: as the variants' TensorFlow saw them)."""
    cpu = "unknown"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), cpu)
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(memory_gb, 1), "gpus": gpus,
            "platform": platform.platform(), "python": platform.python_version(),
            "tensorflow": importlib.metadata.version("tensorflow"), "keras": importlib.metadata.version("keras"),
            "command": " ".join(["python -m mto_tf.bench", *sys.argv[1:]])}


def run_all(config: TrainConfig, variants: list[str], argv: list[str], *, turns: int, repeats: int = 1) -> dict:
    """Runs each variant in a fresh process (same flags plus --run_variant), `repeats` sets; combines them.

    The processes of a set take `turns` turns each (set-up, then one window
    per turn), one process at a time, starting with a different one each
    round, so that drift in the machine's speed reaches all variants alike.
    """
    # synthetic_headlines is generated by the first variant, in its set-up turn (untimed), the others read it.
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for repeat in range(repeats):
        print(f"bench: set {repeat + 1} of {repeats}: {', '.join(variants)}, {turns} turns each",
              file=sys.stderr, flush=True)
        for name, result in _run_taking_turns(variants, argv, turns=turns).items():
            runs[name].append(result)
    results = {name: _combine(name_runs) for name, name_runs in runs.items()}
    weighted = [name for name in results if name.startswith(WEIGHTING_PREFIX) and name != f"{WEIGHTING_PREFIX}fixed"]
    pairs = [(a, b) for a, b in [*RATIOS, *((name, f"{WEIGHTING_PREFIX}fixed") for name in weighted)]
             if a in results and b in results]
    gpus = max(run["gpus"] for name_runs in runs.values() for run in name_runs)
    return {"machine": machine(gpus=gpus), "variants": results,
            "ratios": {f"{a}/{b}": results[a]["examples_per_sec"] / results[b]["examples_per_sec"] for a, b in pairs},
            "ratio_quartiles": {f"{a}/{b}": _paired_ratio_quartiles(runs[a], runs[b]) for a, b in pairs}}


def _run_taking_turns(variants: list[str], argv: list[str], *, turns: int) -> dict[str, dict]:
    """One process per variant; each turn, one process at a time runs (its set-up, or one window)."""
    processes = {}
    try:
        for name in variants:
            stderr = tempfile.TemporaryFile(mode="w+")
            processes[name] = (subprocess.Popen(
                [sys.executable, "-m", "mto_tf.bench", *argv, f"--run_variant={name}"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
                env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")), stderr)
        for turn in range(turns):
            for name in variants[turn % len(variants):] + variants[:turn % len(variants)]:
                process, stderr = processes[name]
                process.stdin.write("go\n")
                process.stdin.flush()
                while (line := process.stdout.readline()).strip() != TURN_DONE:
                    if not line:
                        _fail(name, process, stderr)
        results = {}
        for name, (process, stderr) in processes.items():
            process.stdin.close()  # The end: the variant finishes and reports.
            lines = [line for line in process.stdout if line.startswith(RESULT_PREFIX)]
            if process.wait() or not lines:
                _fail(name, process, stderr)
            results[name] = json.loads(lines[-1].removeprefix(RESULT_PREFIX))
        return results
    finally:
        for process, stderr in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
            stderr.close()


def _fail(name: str, process: subprocess.Popen, stderr) -> None:
    status = process.wait()
    stderr.seek(0)
    raise RuntimeError(f"variant {name} failed (status {status}):\n{stderr.read()[-3000:]}")


def _paired_ratio_quartiles(runs_a: list[dict], runs_b: list[dict]) -> list[float]:
    """Quartiles of a's window rate over b's window timed in the same round of turns."""
    ratios = sorted(a / b for run_a, run_b in zip(runs_a, runs_b, strict=True)
                    for a, b in zip(run_a["windows"], run_b["windows"], strict=True))
    return statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3


def _combine(runs: list[dict]) -> dict:
    """One variant's processes as one result: the median and spread of all their timed windows."""
    windows = [rate for run in runs for rate in run["windows"]]
    median = statistics.median(windows)
    return {**runs[0], "examples_per_sec": median, "spread": (max(windows) - min(windows)) / median,
            "windows": windows, "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
            "process_medians": [run["examples_per_sec"] for run in runs],
            "turns": [turn for run in runs for turn in run["turns"]]}


def format_table(report: dict) -> str:
    """The report as a Markdown table, then the ratios."""
    lines = ["| variant | examples/s (median) | spread | peak RSS (MB) | replicas | steps/call | XLA step | "
             "XLA update |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for name, result in report["variants"].items():
        lines.append(f"| {name} | {result['examples_per_sec']:,.0f} | {100 * result['spread']:.0f} % | "
                     f"{result['peak_rss_mb']:,.0f} | {result['replicas']} | {result['steps_per_loop']} | "
                     f"{'yes' if result['jit_compile'] else 'no'} | {'yes' if result.get('xla_update') else 'no'} |")
    lines += [""] + [f"{ratio}: {value:.2f} (windows side by side: quartiles "
                     f"{' / '.join(f'{q:.2f}' for q in report['ratio_quartiles'][ratio])})"
                     for ratio, value in report["ratios"].items()]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    config = mto_flags.config_from_flags()
    if FLAGS.input:  # Not training speed: what each worker's input pipeline reads and holds.
        tensorflow_logs.import_tensorflow_quietly()
        from mto_tf.programs import input_bench  # It imports TensorFlow.
        input_bench.input_main(config, machine=machine)
        return
    if config.datasets:  # Its variants compare fit and the limit, which read one dataset.
        raise ConfigError("datasets", "the benchmark measures steps on one dataset; give --dataset")
    if FLAGS.window_steps % config.steps_per_loop:
        raise app.UsageError("--window_steps must be a multiple of --steps_per_loop")
    if FLAGS.run_variant:
        turns = Turns()
        turns.wait()  # Setting up is a turn too: importing TensorFlow, building and loading compete for the CPU.
        tensorflow_logs.import_tensorflow_quietly()
        from mto_tf.programs import bench_variant  # It imports TensorFlow: here, in this process's own turn.
        result = bench_variant.run_variant(FLAGS.run_variant, variant_config(FLAGS.run_variant, config),
                                           windows=FLAGS.windows,
                                           window_steps=FLAGS.window_steps, warmup_windows=FLAGS.warmup_windows,
                                           turns=turns)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return
    unknown = sorted(name for name in FLAGS.variants if name not in VARIANTS and not name.startswith(WEIGHTING_PREFIX))
    if unknown:
        raise app.UsageError(f"--variants: unknown {unknown}; expected some of {', '.join(VARIANTS)}, or "
                             f"{WEIGHTING_PREFIX}NAME[/GRADIENTS]")
    try:  # Each weighting variant's method and gradients, checked as mto-train checks them.
        for name in FLAGS.variants:
            variant_config(name, config)
    except ConfigError as error:
        raise app.UsageError(f"--variants: {error}") from None
    del argv  # absl keeps only non-flag arguments; the variants get the original flags.
    report = run_all(config, FLAGS.variants, sys.argv[1:], repeats=FLAGS.repeats,
                     turns=1 + FLAGS.warmup_windows + FLAGS.windows)
    print(format_table(report))
    if FLAGS.output_json:
        with open(FLAGS.output_json, "w") as output:
            json.dump(report, output, indent=2)


def run_main() -> None:
    """Runs `python -m mto_tf.bench` on the command line's flags."""
    mto_flags.define_bench_flags(VARIANTS)
    app.run(main)
