"""`train`: one training run, from a `TrainConfig` to a trained model and its files in `--model_dir`.

It sets the run up (`setup.py`), drives it with the custom loop
(`custom_loop.py`) or `model.fit` (`fit_loop.py`), and saves the final model.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

import keras
import tensorflow as tf

from mto_tf.config import TrainConfig
from mto_tf.core.strategy import is_chief, make_strategy
from mto_tf.run import best, compiling, custom_loop, fit_loop, model_dir, preemption, progress
from mto_tf.run.setup import Run, build_run

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
    """What `train` hands back: the trained model, its optimizer (state included) and every record it logged."""

    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    history: list[dict]


def train(config: TrainConfig, *, strategy: tf.distribute.Strategy | None = None,
          callbacks: Sequence[keras.callbacks.Callback] = ()) -> TrainResult:
    """Trains `config.model` on `config.dataset` for `config.train_steps` or `config.epochs`, resuming if it can.

    Args:
      config: the run.
      strategy: a strategy to use instead of building one from `config.strategy`
        (a process should hold one MirroredStrategy only).
      callbacks: Keras callbacks, called after `config.callbacks`' as `model.fit`
        calls them (an epoch: a pass with --epochs, else a --log_every window);
        with `loop="fit"`, passed to `fit`.

    Raises:
      ConfigError: a setting that cannot work (before anything is written), or
        a --model_dir that cannot be written or resumed from, or that another
        run holds (its lock).
      Preempted: SIGTERM reached a worker; all saved a checkpoint and stopped.
      NonFiniteError: a loss or weight became NaN or infinite; all workers
        stopped, no final model was written, the last good checkpoint is kept.
    """
    run = build_run(config, strategy or make_strategy(config), callbacks)
    try:
        _drive(run)
    finally:
        run.release()
        preemption.restore_after_interrupt()
    return TrainResult(model=run.setup.model, optimizer=run.optimizer, history=run.metrics_log.records)


def _drive(run: Run) -> None:
    """Drives the run, saves its final model and says how it went."""
    config = run.config
    started = time.perf_counter()
    if run.best_value and run.best_value.patience_exhausted:  # Resumed after it had stopped early.
        logger.info("Stopped early before: %s", run.best_value.describe_stop())
        final_step = run.start_step
    elif config.loop == "fit":
        final_step = fit_loop.run_fit(run)
    else:
        final_step = custom_loop.run_custom_loop(run)
    model = run.setup.model
    if config.loop == "custom":  # fit compiled it already.
        compiling.compile_as_fit_saves(run)
    if is_chief(run.setup.strategy):
        model_dir.save_final_model(config.model_dir, model)
    logger.info("Final weights fingerprint: %s", model_dir.weights_fingerprint(model))
    run.progress.summary(progress.summary_lines(
        step=final_step, seconds=time.perf_counter() - started, records=run.metrics_log.records,
        output_names=run.setup.signature.output_names, model_dir=config.model_dir,
        files=[model_dir.MODEL_FILE, model_dir.WEIGHTS_FILE, *([best.BEST_WEIGHTS_FILE] if run.best_value else []),
               model_dir.METRICS_FILE, f"{model_dir.CHECKPOINT_DIR}/", f"{model_dir.TENSORBOARD_DIR}/",
               model_dir.CONFIG_FILE]))
