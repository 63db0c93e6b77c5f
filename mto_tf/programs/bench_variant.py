"""One benchmark variant, in its own process: `python -m mto_tf.bench --run_variant=NAME` runs this.

It builds `mto-train`'s run for the variant (`bench.variant_config`) and
trains it a window at a time, each window when the benchmark's parent says
it is this process's turn (`bench.Turns`); `bench` prints what it returns
as one line. TensorFlow is imported here, so `bench` imports this module
only in a variant's process, in its first turn.
"""

from __future__ import annotations

import dataclasses
import resource
import statistics
import tempfile
import time

import keras
import tensorflow as tf

from mto_tf import config as config_lib
from mto_tf.config import TrainConfig
from mto_tf.core.strategy import make_strategy
from mto_tf.data import batching
from mto_tf.run import compiling, custom_loop, fit_loop
from mto_tf.run.setup import build_run
from mto_tf.run.train_step import make_train_step

# Training alone is measured: every evaluation setting at its default, and no validation split.
NO_EVALUATION = {**{name: config_lib.default_of(name) for name in config_lib.settings_read_by("evaluation")},
                 "validation_split": ""}

def run_variant(name: str, config: TrainConfig, *, windows: int, window_steps: int, warmup_windows: int,
                turns) -> dict:
    """Trains variant `name` (`config`: its `bench.variant_config`), a window per turn; returns its examples/s per
    timed window and its peak memory.

    Called in the process's first turn (its set-up), which it ends; `turns` is the process's `bench.Turns`.
    """
    strategy = make_strategy(config)  # First: it may split the CPU into devices.
    with tempfile.TemporaryDirectory() as model_dir:
        # mto-train's own set-up: model, optimizer (built), metrics, data.
        # No progress display: stdout is how a variant takes turns with the others.
        fit = "fit_" in name  # With the optimizer as fit takes it (fit sums gradients over replicas itself).
        run = build_run(dataclasses.replace(
            config, model_dir=model_dir, train_steps=(warmup_windows + windows) * window_steps, epochs=None,
            log_every=window_steps, progress="quiet", **NO_EVALUATION, loop="fit" if fit else "custom",
            xla_update=config.xla_update and not fit), strategy)
        if name.endswith("custom_default") or name == "custom_matched" or name.startswith("weighting:"):
            rates = _time_custom_loop(run, turns)
        elif name == "limit":
            rates = _time_limit(run, turns)
        else:
            rates = _time_fit(run, turns, keras_defaults=name == "fit_default")
    timed = rates[warmup_windows:]
    median = statistics.median(timed)
    return {"examples_per_sec": median, "spread": (max(timed) - min(timed)) / median, "windows": timed,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "replicas": strategy.num_replicas_in_sync, "steps_per_loop": config.steps_per_loop,
            "jit_compile": config.jit_compile, "turns": turns.intervals,
            "xla_update": run.config.xla_update, "gpus": len(tf.config.list_physical_devices("GPU"))}


def _time_custom_loop(run, turns) -> list[float]:
    """mto-train itself, logging and checkpoints included; examples/s of each logged window."""

    def pass_the_turn(boundary):
        # A window has ended and been logged; the loop starts timing its next one when this returns.
        if boundary.window_ended:
            turns.done()
            turns.wait()

    turns.done()  # Set up; the loop builds the rest in its first (untimed) window.
    turns.wait()
    custom_loop.run_custom_loop(run, actions=[pass_the_turn])
    return [record["examples_per_sec"] for record in run.metrics_log.records]


def _time_fit(run, turns, *, keras_defaults: bool) -> list[float]:
    """`compile` + `fit` on mto-train's model, optimizer and batches; examples/s per window."""
    config = run.config
    compiling.compile_model(run, keras_defaults=keras_defaults)

    class WindowTimes(keras.callbacks.Callback):
        """Wall time of each window; between windows, the turn passes to the other variants."""

        def __init__(self):
            super().__init__()
            self.starts, self.ends = [time.perf_counter()], []

        def on_train_batch_end(self, batch, logs=None):
            if (batch + 1) % config.log_every == 0:
                self.ends.append(time.perf_counter())
                turns.done()
                turns.wait()
                self.starts.append(time.perf_counter())

    batches = fit_loop.fit_batches(run)
    turns.done()
    turns.wait()
    window_times = WindowTimes()
    run.setup.model.fit(batches, steps_per_epoch=config.train_steps, epochs=1, verbose=0, callbacks=[window_times])
    return [config.log_every * config.batch_size / (end - start)
            for start, end in zip(window_times.starts, window_times.ends)]


def _time_limit(run, turns, *, batches_in_memory: int = 16) -> list[float]:
    """mto-train's train step, looped in one tf.function over batches already in memory."""
    config, setup = run.config, run.setup
    batches = list(batching.global_batches(setup.examples, signature=setup.signature,
                                           batching=batching.Batching.for_training(config)).take(batches_in_memory))
    in_memory = tf.nest.map_structure(lambda *parts: tf.stack(parts), *batches)
    train_step = make_train_step(run)

    @tf.function
    def limit_loop(num_steps):
        total = tf.constant(0.0)
        for index in tf.range(num_steps):
            batch = tf.nest.map_structure(lambda tensor: tensor[index % batches_in_memory], in_memory)
            total += train_step(batch)["loss"]
        return total

    rates = []
    turns.done()
    for _ in range(config.train_steps // config.log_every):
        turns.wait()
        start = time.perf_counter()
        float(limit_loop(tf.constant(config.log_every)))
        rates.append(config.log_every * config.batch_size / (time.perf_counter() - start))
        turns.done()
    return rates
