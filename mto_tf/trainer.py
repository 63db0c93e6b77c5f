"""The loop driver: builds a run, drives the train step, logs, checkpoints, saves.

It knows nothing about losses (that is `step.py`); the step knows nothing
about checkpoints or logs (that is here).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import keras
import numpy as np
import tensorflow as tf

from mto_tf import data, losses, models, outputs, step
from mto_tf.config import ConfigError, TrainConfig
from mto_tf.metrics import make_output_metrics
from mto_tf.preemption import Preempted, PreemptionWatcher
from mto_tf.strategy import check_batch_split, is_chief, make_strategy

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
# Settings a resumed run may change: they say how far and how to drive, not what is trained.
_RESUMABLE_CHANGES = ("train_steps", "steps_per_loop", "log_every", "checkpoint_every", "init_weights",
                      "model_dir", "data_dir", "loop", "jit_compile")


@dataclasses.dataclass
class TrainResult:
    """What `train` hands back: the trained model and every record it logged."""

    model: keras.Model
    history: list[dict]


@dataclasses.dataclass
class Run:
    """Everything built for a run, shared by the custom loop and `--loop=fit`."""

    config: TrainConfig
    strategy: tf.distribute.Strategy
    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    output_metrics: dict[str, tuple[str, keras.metrics.Metric]]
    checkpoints: outputs.Checkpoints
    metrics_log: outputs.MetricsLog
    examples: data.Examples  # In file order.
    start_step: int  # Where a restored run stopped; 0 for a new run.


def train(config: TrainConfig, *, strategy: tf.distribute.Strategy | None = None) -> TrainResult:
    """Trains `config.model` on `config.dataset` to `config.train_steps`, resuming if it can.

    Args:
      config: the run.
      strategy: a strategy to use instead of building one from `config.strategy`
        (a process should hold one MirroredStrategy only).

    Raises:
      ConfigError: a setting that cannot work, before anything is written.
      Preempted: SIGTERM reached a worker; all saved a checkpoint and stopped.
    """
    run = build_run(config, strategy or make_strategy(config))
    if config.loop == "fit":
        from mto_tf import fit_loop  # The comparison path, only when asked for.
        fit_loop.run_fit(run)
    else:
        run_custom_loop(run)
    if is_chief(run.strategy):
        outputs.save_final_model(config.model_dir, run.model)
    logger.info("Final weights fingerprint: %s", outputs.weights_fingerprint(run.model))
    return TrainResult(model=run.model, history=run.metrics_log.records)


def build_run(config: TrainConfig, strategy: tf.distribute.Strategy) -> Run:
    """Builds model, optimizer, metrics and data; checks them all before writing anything."""
    check_batch_split(config, strategy)
    # Variables created in the scope are mirrored on every replica. Adam's
    # slots must exist before the first distributed step, hence build().
    with strategy.scope():
        model = models.build_model(config)
        if config.init_weights:
            _load_init_weights(model, config.init_weights)
        optimizer = make_optimizer(config)
        optimizer.build(model.trainable_variables)
        output_metrics = make_output_metrics(config.metrics)
    examples = data.load_examples(config, model)  # Checks an npz file against the model.

    # Everything is checked: only now may the model directory be written
    # (by the chief alone; the other workers read its checkpoints).
    chief = is_chief(strategy)
    if chief:
        _prepare_model_dir(config)
    checkpoints = outputs.Checkpoints(config.model_dir, model=model, optimizer=optimizer, is_chief=chief)
    start_step = checkpoints.restore_latest()
    return Run(
        config=config, strategy=strategy, model=model, optimizer=optimizer, output_metrics=output_metrics,
        checkpoints=checkpoints,
        metrics_log=outputs.MetricsLog(config.model_dir, write_files=chief, resume_step=start_step),
        examples=examples, start_step=start_step)


def run_custom_loop(run: Run) -> None:
    """Drives the explicit train step from `run.start_step` to `train_steps`."""
    config, strategy = run.config, run.strategy
    train_loop = step.make_train_loop(make_train_step(run), measurement_names(config))
    iterator = iter(data.distributed_batches(strategy, run.examples, model=run.model, config=config,
                                             skip_steps=run.start_step))
    preemption = PreemptionWatcher(strategy)
    try:
        current_step = run.start_step
        window = _Window()
        while current_step < config.train_steps:
            # Stop a loop at the next log, checkpoint or the end, whichever is first.
            num_steps = min(config.steps_per_loop, config.train_steps - current_step,
                            _steps_to_next(current_step, config.log_every),
                            _steps_to_next(current_step, config.checkpoint_every))
            # A tensor, not a Python int: a new count must not retrace the loop.
            window.add(train_loop(iterator, tf.constant(num_steps)), num_steps)
            current_step += num_steps
            finished = current_step == config.train_steps
            preempted = not finished and preemption.stop_agreed()
            if current_step % config.log_every == 0 or finished or preempted:
                run.metrics_log.write(current_step, window.measurements(run.output_metrics, config.batch_size))
                window = _Window()
            if current_step % config.checkpoint_every == 0 or finished or preempted:
                run.checkpoints.save(current_step)
            if preempted:
                raise Preempted(current_step)
    finally:
        preemption.close()


def make_train_step(run: Run):
    """The run's `step.make_train_step`, with its losses, weights and settings."""
    config = run.config
    return step.make_train_step(
        model=run.model, optimizer=run.optimizer,
        loss_fns={name: losses.get_loss_fn(loss) for name, loss in config.losses.items()},
        loss_weights=config.loss_weights, output_metrics=run.output_metrics,
        global_batch_size=config.batch_size, strategy=run.strategy, jit_compile=config.jit_compile)


def measurement_names(config: TrainConfig) -> list[str]:
    """What the train step measures: the total loss, then each output's loss."""
    return ["loss", *(f"{name}_loss" for name in config.losses)]


class _Window:
    """Sums of the step measurements since the last log line."""

    def __init__(self):
        self.totals: dict[str, np.float32] = {}
        self.steps = 0
        self.start = time.perf_counter()

    def add(self, loop_totals: dict[str, tf.Tensor], num_steps: int) -> None:
        # Added in float32, as inside the loop, so that how steps are
        # grouped into loops does not change the logged numbers.
        self.totals = {name: self.totals.get(name, np.float32(0)) + value.numpy()
                       for name, value in loop_totals.items()}
        self.steps += num_steps

    def measurements(self, output_metrics, global_batch_size: int) -> dict[str, float]:
        """Means over the window, metric results (then reset), and throughput."""
        measurements = {name: float(total) / self.steps for name, total in self.totals.items()}
        for log_name, (_, metric) in output_metrics.items():
            measurements[log_name] = float(metric.result())
            metric.reset_state()
        measurements["examples_per_sec"] = self.steps * global_batch_size / (time.perf_counter() - self.start)
        return measurements


def make_optimizer(config: TrainConfig) -> keras.optimizers.Optimizer:
    """`--optimizer` at `--learning_rate`, with Keras's other defaults."""
    optimizer_class = {"sgd": keras.optimizers.SGD, "adam": keras.optimizers.Adam,
                       "rmsprop": keras.optimizers.RMSprop}[config.optimizer]
    return optimizer_class(learning_rate=config.learning_rate)


def _steps_to_next(current_step: int, every: int) -> int:
    return every - current_step % every


def _load_init_weights(model: keras.Model, path: str) -> None:
    try:
        model.load_weights(path)
    except (ValueError, OSError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError("init_weights", f"{path!r} does not fit model {model.name!r}: {first_line}") from None


def _prepare_model_dir(config: TrainConfig) -> None:
    """Creates `--model_dir`, or checks that the run it holds is this run, so resuming is safe."""
    config_path = os.path.join(config.model_dir, CONFIG_FILE)
    settings = {name: value for name, value in dataclasses.asdict(config).items() if name not in _RESUMABLE_CHANGES}
    settings = json.loads(json.dumps(settings))  # Tuples -> lists, as read back.
    if os.path.exists(config_path):
        with open(config_path) as config_file:
            saved = json.load(config_file)
        for name, value in settings.items():
            if saved.get(name) != value:
                raise ConfigError("model_dir", f"{config.model_dir!r} holds a run with --{name}={saved.get(name)}, "
                                               f"not {value}; resume it with the same settings or use a new --model_dir")
        return
    if os.path.isdir(config.model_dir) and os.listdir(config.model_dir):
        raise ConfigError("model_dir", f"{config.model_dir!r} is not empty and holds no mto_tf run; "
                                       f"use a new or empty directory")
    os.makedirs(config.model_dir, exist_ok=True)
    with open(config_path, "w") as config_file:
        json.dump(settings, config_file, indent=2, sort_keys=True)
