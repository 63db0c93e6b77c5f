"""`--loop=fit`: the same run through `model.compile` + `model.fit`.

Same model, optimizer, data, checkpoints and files as the custom loop, so a
user can put the two side by side. One fit "epoch" is one logging window of
`--log_every` steps: Keras averages its logs over an epoch, as the custom
loop averages over a window, and a callback hands each epoch's logs to the
same window end as the custom loop's (`driver.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import keras
import tensorflow as tf

from mto_tf.core import optimization
from mto_tf.data import batching
from mto_tf.run import driver
from mto_tf.run.setup import Run

logger = logging.getLogger(__name__)


class _WindowEndsOfEpochs(keras.callbacks.Callback):
    """Ends each window (logs, best value, checkpoint) as the custom loop does, at the end of each fit epoch.

    It comes after the run's own callbacks: what they do at an epoch's end
    (a new learning rate, `stop_training`) is in the window's checkpoint.
    """

    def __init__(self, run: Run, *, actions: Sequence[driver.Action]):
        super().__init__()
        self._run = run
        self._timer = driver.WindowTimer(run.config.batch_size)
        self._window_ends = driver.WindowEnds(run, timer=self._timer, then=actions)
        self._log_names = [*run.setup.loss_names, *run.metrics.training]
        self._val_names = [f"val_{name}" for name in self._log_names]
        self.last_step = run.start_step
        self._stop_requested = False

    def on_epoch_begin(self, epoch, logs=None):
        self._timer.restart()
        self._epoch = epoch  # One epoch per window: it starts at step epoch * log_every.

    def on_train_batch_end(self, batch, logs=None):
        current_step = self._epoch * self._run.config.log_every + batch + 1
        self._run.progress.update(current_step, {name: logs[name] for name in self._log_names if name in logs})
        if self.model.stop_training:
            # fit would cut the epoch short; as in the custom loop, the window ends first.
            self._stop_requested, self.model.stop_training = True, False

    def on_epoch_end(self, epoch, logs=None):
        config = self._run.config
        # Batches, not the optimizer's iterations (fewer with --grad_accum_steps or skipped float16 steps).
        current_step = self.last_step = (epoch + 1) * config.log_every
        record = {name: logs[name] for name in self._log_names}
        # As the custom loop stops: before logging or checkpointing the window.
        driver.check_finite(record, where=f"the window ending at step {current_step}", run=self._run)
        record["examples_per_sec"] = self._timer.examples_per_sec(config.log_every)
        if "val_loss" in logs:  # fit evaluated after this window.
            record.update({name: logs[name] for name in self._val_names})
        finished = current_step == self._run.total_steps
        boundary = driver.Boundary(current_step, record=record, window_ended=True, epoch_ended=True,
                                   finished=finished)
        if (self._stop_requested or self.model.stop_training) and not finished:
            boundary.stop = f"Stopping at step {current_step}: a callback set model.stop_training"
        if self._window_ends(boundary):
            self.model.stop_training = True


def compile_model(run: Run, *, keras_defaults: bool = False, optimizer: keras.optimizers.Optimizer | None = None
                  ) -> None:
    """`model.compile` with the run's losses, weights, metrics and optimizer (or `optimizer`).

    With the run's steps per call and XLA setting, or, for comparison, with
    Keras's defaults for those two.
    """
    config, setup = run.config, run.setup
    settings = {} if keras_defaults else dict(jit_compile=config.jit_compile, steps_per_execution=config.steps_per_loop)
    with setup.strategy.scope():
        setup.model.compile(
            optimizer=optimizer or run.optimizer,
            loss={name: _configured(identifier, keras.losses.get)
                  for name, identifier in setup.losses.identifiers.items()},
            loss_weights=setup.losses.weights,
            metrics={name: [_configured(identifier, keras.metrics.get) for identifier in identifiers]
                     for name, identifiers in run.metrics.identifiers.items()},
            **settings,
        )


def _configured(identifier, get):
    """A Keras config (a dict) as the object it describes: `compile` would read a dict as one entry per key."""
    return get(identifier) if isinstance(identifier, dict) else identifier


def compile_as_fit_saves(run: Run) -> None:
    """The custom loop's model compiled as `fit` leaves it: its losses, weights, metrics, and an optimizer with the run's state.

    So `keras.models.load_model` of `model.keras` can `evaluate` (and go on
    training) as after `fit`. The optimizer is Keras's own, made from the
    run's settings (the custom loop's takes gradients already summed over
    replicas), holding the run's slots and step count. Called on every
    worker: variables are made in the strategy's scope.
    """
    config, setup = run.config, run.setup
    unloadable = _not_reloadable(setup.losses.identifiers, run.metrics.identifiers)
    if unloadable:
        # Keras 3.15 writes an unregistered function into the compile config as
        # a builtin, and load_model then fails on it: keep model.keras loadable.
        logger.warning("model.keras is saved uncompiled: Keras cannot reload a compile config with %s unless it is "
                       "registered (@keras.saving.register_keras_serializable())", unloadable)
        return
    with setup.strategy.scope():
        optimizer = optimization.make_optimizer(config, takes_all_reduced_gradients=False)
        optimizer.build(setup.model.trainable_variables)
    # The same optimizer class and settings: its variables, named after the
    # model's weights, are the run's, bar the optimizer's own name in front.
    run_state = {_without_optimizer_name(variable.path): variable for variable in run.optimizer.variables}
    for variable in optimizer.variables:
        source = run_state.get(_without_optimizer_name(variable.path))
        if source is not None and tuple(source.shape) == tuple(variable.shape):
            variable.assign(source)
    compile_model(run, optimizer=optimizer)


def _not_reloadable(losses: dict, metrics: dict) -> str | None:
    """The first loss or metric of the user's own that Keras would not find again on load, by name; else None."""
    for output, identifiers in [*((name, [identifier]) for name, identifier in losses.items()), *metrics.items()]:
        for identifier in identifiers:
            if identifier is None or isinstance(identifier, str | dict):
                continue
            is_object = isinstance(identifier, keras.losses.Loss | keras.metrics.Metric)
            owner = type(identifier) if is_object or not callable(identifier) else identifier
            if not owner.__module__.startswith("keras") and keras.saving.get_registered_object(
                    keras.saving.get_registered_name(owner)) is None:
                return f"{owner.__module__}:{owner.__name__} (output {output!r})"
    return None


def _without_optimizer_name(path: str) -> str:
    return path.split("/", 1)[-1]


def fit_batches(run: Run, *, skip_batches: int = 0) -> tf.data.Dataset:
    """The run's global batches, shaped for `fit`.

    A model built with list outputs takes labels and sample weights as
    tuples in output order: Keras 3.15's `fit` fails on dict sample weights
    there (`KeyError: 0` in `compile_utils`). Outputs without sample weights
    then get ones, which leave their losses as they are.
    """
    setup = run.setup
    return _as_fit_takes(run, batching.global_batches(setup.examples, signature=setup.signature,
                                                      batching=batching.Batching.for_training(run.config),
                                                      skip_batches=skip_batches))


def _as_fit_takes(run: Run, batches: tf.data.Dataset) -> tf.data.Dataset:
    signature = run.setup.signature
    if signature.outputs_are_dict:
        return batches
    names = signature.output_names

    def as_tuples(inputs, labels, sample_weights=None):
        labels = tuple(labels[name] for name in names)
        if sample_weights is None:
            return inputs, labels
        ones = tf.ones_like(next(iter(sample_weights.values())))
        return inputs, labels, tuple(sample_weights.get(name, ones) for name in names)

    return batches.map(as_tuples)


def run_fit(run: Run, *, actions: Sequence[driver.Action] = ()) -> int:
    """Trains `run.setup.model` with `model.fit` from `run.start_step` to `total_steps`; returns the step it ended at."""
    config, setup = run.config, run.setup
    compile_model(run)
    # TrainConfig checks that train_steps, checkpoint_every and eval_every
    # are multiples of log_every (so a restored step is on a window
    # boundary), and log_every a multiple of steps_per_loop (so executions fill a window).
    windows = run.total_steps // config.log_every
    validation = {}
    if run.validation:
        evaluated_windows = [window for window in range(1, windows + 1) if window == windows or (
            config.eval_every and window * config.log_every % config.eval_every == 0)]
        validation = dict(
            validation_data=_as_fit_takes(run, batching.global_batches(
                run.validation, signature=setup.signature, batching=batching.Batching.for_evaluation(config))),
            validation_steps=config.eval_steps, validation_freq=evaluated_windows)
    window_ends = _WindowEndsOfEpochs(run, actions=actions)
    setup.model.fit(
        fit_batches(run, skip_batches=run.start_step),
        initial_epoch=run.start_step // config.log_every,
        epochs=windows,
        steps_per_epoch=config.log_every,
        callbacks=[*run.callbacks, window_ends],
        shuffle=False,  # The dataset is already in the order the custom loop reads.
        verbose=0,
        **validation,
    )
    return window_ends.last_step
