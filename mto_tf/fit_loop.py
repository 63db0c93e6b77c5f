"""`--loop=fit`: the same run through `model.compile` + `model.fit`.

Same model, optimizer, data, checkpoints and files as the custom loop, so a
user can put the two side by side. One fit "epoch" is one logging window of
`--log_every` steps: Keras averages its logs over an epoch, as the custom
loop averages over a window.
"""

from __future__ import annotations

import time

import keras

from mto_tf import data
from mto_tf.trainer import Run


class _WriteOutputs(keras.callbacks.Callback):
    """Logs each window and checkpoints like the custom loop does."""

    def __init__(self, run: Run):
        super().__init__()
        self._run = run
        self._log_names = ["loss", *(f"{name}_loss" for name in run.config.losses), *run.output_metrics]

    def on_epoch_begin(self, epoch, logs=None):
        self._window_start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        config = self._run.config
        current_step = int(self._run.optimizer.iterations.numpy())
        measurements = {name: logs[name] for name in self._log_names}
        measurements["examples_per_sec"] = (config.log_every * config.batch_size
                                            / (time.perf_counter() - self._window_start))
        self._run.metrics_log.write(current_step, measurements)
        if current_step % config.checkpoint_every == 0 or current_step == config.train_steps:
            self._run.checkpoints.save(current_step)


def compile_model(run: Run, *, keras_defaults: bool = False) -> None:
    """`model.compile` with the run's losses, weights, metrics and optimizer.

    With the run's steps per call and XLA setting, or, for comparison, with
    Keras's defaults for those two.
    """
    config = run.config
    settings = {} if keras_defaults else dict(jit_compile=config.jit_compile, steps_per_execution=config.steps_per_loop)
    with run.strategy.scope():
        run.model.compile(
            optimizer=run.optimizer,
            loss=dict(config.losses),
            loss_weights=dict(config.loss_weights),
            metrics={name: list(metric_names) for name, metric_names in config.metrics.items()},
            **settings,
        )


def run_fit(run: Run) -> None:
    """Trains `run.model` with `model.fit` from `run.start_step` to `train_steps`."""
    config = run.config
    compile_model(run)
    # TrainConfig checks that train_steps and checkpoint_every are multiples
    # of log_every (so a restored step is on a window boundary), and
    # log_every a multiple of steps_per_loop (so executions fill a window).
    run.model.fit(
        data.global_batches(run.examples, model=run.model, config=config, skip_batches=run.start_step),
        initial_epoch=run.start_step // config.log_every,
        epochs=config.train_steps // config.log_every,
        steps_per_epoch=config.log_every,
        callbacks=[_WriteOutputs(run)],
        shuffle=False,  # The dataset is already in the order the custom loop reads.
        verbose=0,
    )
