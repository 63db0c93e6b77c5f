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
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from mto_tf import (best, data, gradient_shares, losses, metrics, models, optimization, outputs, progress, step,
                    user_code)
from mto_tf.config import ConfigError, TrainConfig, first_line
from mto_tf.preemption import Preempted, PreemptionWatcher
from mto_tf.strategy import check_batch_split, is_chief, make_strategy

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
# Settings a resumed run may change: they say how far and how to drive, not what is trained.
# Not --epochs: a run by epochs reads its batches in another order than one by steps.
_RESUMABLE_CHANGES = ("train_steps", "steps_per_loop", "log_every", "checkpoint_every", "init_weights",
                      "model_dir", "data_dir", "loop", "jit_compile", "xla_update", "progress", "eval_every",
                      "eval_steps", "early_stopping_patience", "log_gradient_shares_every")
# Settings only some models or datasets read; any other must keep its default.
_MODEL_SETTINGS = ("vocab_size", "sequence_length", "embedding_dim", "lstm_units", "dense_units", "aux_input_dim",
                   "conv_filters", "dropout_rate", "sync_batchnorm", "l2")
_SYNTHETIC_HEADLINES_SETTINGS = ("vocab_size", "sequence_length", "aux_input_dim", "synthetic_train_examples",
                                 "synthetic_validation_examples")


@dataclasses.dataclass
class TrainResult:
    """What `train` hands back: the trained model, its optimizer (state included) and every record it logged."""

    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    history: list[dict]


@dataclasses.dataclass
class Run:
    """Everything built for a run, shared by the custom loop and `--loop=fit`."""

    config: TrainConfig
    strategy: tf.distribute.Strategy
    model: keras.Model
    optimizer: keras.optimizers.Optimizer  # The custom loop's takes gradients already summed over replicas.
    accumulation: optimization.GradientAccumulation | None  # The custom loop's, with --grad_accum_steps > 1.
    losses: dict[str, object]  # Each output's loss as `compile` takes it (name, config or function).
    loss_fns: dict[str, keras.losses.Loss]  # The same losses, per example, for the custom step.
    loss_weights: dict[str, float]
    metrics: dict[str, list]  # Each output's metrics as `compile` takes them.
    output_metrics: dict[str, tuple[str, keras.metrics.Metric]]  # Made from them, named as `fit` names them.
    checkpoints: outputs.Checkpoints
    metrics_log: outputs.MetricsLog
    examples: data.Examples  # In file order.
    total_steps: int  # --train_steps, or --epochs passes over the data, each ending with its partial batch.
    validation: data.Examples | None
    val_output_metrics: dict[str, tuple[str, keras.metrics.Metric]]  # Named `val_<output>_<metric>`.
    best_value: best.BestValue | None  # With --save_best.
    start_step: int  # Where a restored run stopped; 0 for a new run.
    progress: progress.Progress  # What the person watching sees (the chief's only).


def train(config: TrainConfig, *, strategy: tf.distribute.Strategy | None = None) -> TrainResult:
    """Trains `config.model` on `config.dataset` for `config.train_steps` or `config.epochs`, resuming if it can.

    Args:
      config: the run.
      strategy: a strategy to use instead of building one from `config.strategy`
        (a process should hold one MirroredStrategy only).

    Raises:
      ConfigError: a setting that cannot work (before anything is written), or
        a --model_dir that cannot be written or resumed from.
      Preempted: SIGTERM reached a worker; all saved a checkpoint and stopped.
      NonFiniteError: a loss or weight became NaN or infinite; all workers
        stopped, no final model was written, the last good checkpoint is kept.
    """
    run = build_run(config, strategy or make_strategy(config))
    started = time.perf_counter()
    if run.best_value and run.best_value.patience_exhausted:  # Resumed after it had stopped early.
        logger.info("Stopped early before: %s", run.best_value.describe_stop())
        final_step = run.start_step
    elif config.loop == "fit":
        from mto_tf import fit_loop  # The comparison path, only when asked for.
        final_step = fit_loop.run_fit(run)
    else:
        final_step = run_custom_loop(run)
    if is_chief(run.strategy):
        outputs.save_final_model(config.model_dir, run.model)
    logger.info("Final weights fingerprint: %s", outputs.weights_fingerprint(run.model))
    run.progress.summary(progress.summary_lines(
        step=final_step, seconds=time.perf_counter() - started, records=run.metrics_log.records,
        output_names=list(run.loss_fns), model_dir=config.model_dir,
        files=[outputs.MODEL_FILE, outputs.WEIGHTS_FILE, *([best.BEST_WEIGHTS_FILE] if run.best_value else []),
               outputs.METRICS_FILE, f"{outputs.CHECKPOINT_DIR}/", f"{outputs.TENSORBOARD_DIR}/", CONFIG_FILE]))
    return TrainResult(model=run.model, optimizer=run.optimizer, history=run.metrics_log.records)


@dataclasses.dataclass
class ModelSetup:
    """The model, its training data and its losses: what training and `mto-explain` share."""

    model: keras.Model
    examples: data.Examples  # In file order.
    losses: dict[str, object]  # Each output's loss as `compile` takes it (name, config or function).
    loss_fns: dict[str, keras.losses.Loss]  # The same losses, per example, for the custom step.
    loss_weights: dict[str, float]
    labels_spec: dict[str, tf.TensorSpec]
    predictions_spec: dict[str, object]


def build_model_and_losses(config: TrainConfig, strategy: tf.distribute.Strategy) -> ModelSetup:
    """Builds the model (in the strategy's scope, --init_weights loaded), loads the data, resolves the losses."""
    check_batch_split(config, strategy)
    optimization.set_precision(config)  # Layers take their dtypes when they are built.
    # Variables created in the scope are mirrored on every replica.
    with strategy.scope():
        model = models.build_model(config)
        _check_settings_are_used(config)  # Now that --model is known to name a model.
        if config.init_weights:
            load_weights(model, config.init_weights, flag="init_weights")
    output_names = models.output_names(model)
    _check_class_weight_outputs(config, output_names)
    examples = data.load_examples(config, model)  # Checks the data against the model.
    # Building the batches checks the class weights against the outputs' shapes.
    _, labels_spec, *_ = data.global_batches(
        examples, model=model, batching=data.Batching.for_training(config)).element_spec
    predictions_spec = models.output_tensors(model)
    loss_identifiers, loss_weights = _resolve_losses(config, model)
    loss_fns = {name: losses.per_example_loss(loss_identifiers[name], output=name, y_true=labels_spec[name],
                                              y_pred=predictions_spec[name]) for name in output_names}
    return ModelSetup(model=model, examples=examples, losses=loss_identifiers, loss_fns=loss_fns,
                      loss_weights=loss_weights, labels_spec=labels_spec, predictions_spec=predictions_spec)


def build_run(config: TrainConfig, strategy: tf.distribute.Strategy) -> Run:
    """Builds model, data, losses, metrics and optimizer; checks them all before writing anything."""
    if config.xla_update and strategy.num_replicas_in_sync > 1:  # A strategy passed from Python.
        raise ConfigError("xla_update", f"one replica only, not {strategy.num_replicas_in_sync}")
    setup = build_model_and_losses(config, strategy)
    model, examples, labels_spec, predictions_spec = (setup.model, setup.examples, setup.labels_spec,
                                                      setup.predictions_spec)
    output_names = models.output_names(model)
    validation = data.load_validation_examples(config, model)
    for flag in ("eval_every", "eval_steps"):
        if getattr(config, flag) and validation is None:
            raise ConfigError(flag, "there is no validation data: give --validation_data=npz:PATH, or a dataset "
                                    "with a validation split")

    metric_identifiers = metrics.resolve_identifiers(_default_for(config, "metrics", {}), output_names=output_names)
    with strategy.scope():
        # Adam's slots must exist before the first distributed step, hence build().
        custom_loop = config.loop == "custom"
        optimizer = optimization.make_optimizer(config, takes_all_reduced_gradients=custom_loop)
        optimizer.build(model.trainable_variables)
        accumulation = (optimization.GradientAccumulation(config.grad_accum_steps, model.trainable_variables)
                        if custom_loop and config.grad_accum_steps > 1 else None)
        output_metrics = metrics.make_output_metrics(metric_identifiers, y_true=labels_spec, y_pred=predictions_spec)
        val_output_metrics = {f"val_{name}": output_metric for name, output_metric in metrics.make_output_metrics(
            metric_identifiers, y_true=labels_spec, y_pred=predictions_spec).items()} if validation else {}
    best_value = _make_best_value(config, strategy, validation=validation, val_output_metrics=val_output_metrics,
                                  output_names=output_names)

    # Everything is checked: only now may the model directory be written
    # (by the chief alone; the other workers read its checkpoints).
    chief = is_chief(strategy)
    if chief:
        _prepare_model_dir(config)
    more_state = {name: state for name, state in (("best_value", best_value), ("accumulation", accumulation)) if state}
    checkpoints = outputs.Checkpoints(config.model_dir, model=model, optimizer=optimizer, is_chief=chief,
                                      **more_state)
    start_step = checkpoints.restore_latest()
    total_steps = (config.epochs * data.steps_per_pass(examples.count(), config.batch_size) if config.epochs
                   else config.train_steps)
    return Run(
        config=config, strategy=strategy, model=model, optimizer=optimizer, accumulation=accumulation,
        losses=setup.losses, loss_fns=setup.loss_fns, loss_weights=setup.loss_weights, metrics=metric_identifiers,
        output_metrics=output_metrics, checkpoints=checkpoints,
        metrics_log=outputs.MetricsLog(config.model_dir, write_files=chief, resume_step=start_step),
        examples=examples, total_steps=total_steps, validation=validation,
        val_output_metrics=val_output_metrics, best_value=best_value, start_step=start_step,
        progress=progress.Progress(config.progress if chief else "quiet", start_step=start_step,
                                   total_steps=total_steps))


def _check_class_weight_outputs(config: TrainConfig, output_names: list[str]) -> None:
    unknown = sorted(set(config.class_weights) - set(output_names))
    if unknown:
        raise ConfigError("class_weights", f"unknown output {unknown[0]!r}; the model has outputs {output_names}")


def _make_best_value(config: TrainConfig, strategy: tf.distribute.Strategy, *, validation, val_output_metrics,
                     output_names: list[str]) -> best.BestValue | None:
    """`--save_best`'s tracker, checked against what the evaluation reports."""
    if config.save_best is None:
        return None
    if validation is None:
        raise ConfigError("save_best", "needs validation data: --validation_data=npz:PATH, or a dataset with a "
                                       "validation split (--validation_split)")
    higher = best.higher_is_better(
        config.save_best, val_loss_names=["val_loss", *(f"val_{name}_loss" for name in output_names)],
        val_metrics={name: metric for name, (_, metric) in val_output_metrics.items()})
    return best.BestValue(config.save_best, higher_is_better=higher, patience=config.early_stopping_patience,
                          model_dir=config.model_dir, is_chief=is_chief(strategy))


def _default_for(config: TrainConfig, field: str, user_model_default):
    """`config.<field>`, or the built-in model's own when it is None."""
    value = getattr(config, field)
    if value is not None:
        return value
    spec = models.builtin_spec(config.model)
    return getattr(spec, field) if spec else user_model_default


def _resolve_losses(config: TrainConfig, model: keras.Model) -> tuple[dict[str, object], dict[str, float]]:
    """Each output's loss (as `compile` takes it) and weight; every output must have both."""
    output_names = models.output_names(model)
    given = {"losses": _default_for(config, "losses", {}),
             # Keras's default: every output counts once.
             "loss_weights": _default_for(config, "loss_weights", {name: 1.0 for name in output_names})}
    for flag, mapping in given.items():
        unknown = sorted(set(mapping) - set(output_names))
        if unknown:
            raise ConfigError(flag, f"unknown output {unknown[0]!r}; model {model.name!r} has outputs "
                                    f"{sorted(output_names)}")
        missing = [name for name in output_names if name not in mapping]
        if missing:
            raise ConfigError(flag, f"no entry for output {missing[0]!r}; expected one for each of "
                                    f"{sorted(output_names)}")
    loss_identifiers = {name: user_code.resolve_identifier(given["losses"][name], output=name, flag="losses")
                        for name in output_names}
    return loss_identifiers, {name: float(given["loss_weights"][name]) for name in output_names}


def _check_settings_are_used(config: TrainConfig) -> None:
    """A setting that neither the model nor the dataset reads must keep its default (it would be ignored)."""
    spec = models.builtin_spec(config.model)
    read = set(spec.settings if spec else ())
    if config.dataset == "synthetic_headlines":
        read |= set(_SYNTHETIC_HEADLINES_SETTINGS)
    defaults = TrainConfig.__dataclass_fields__
    for name in (*_MODEL_SETTINGS, *_SYNTHETIC_HEADLINES_SETTINGS):
        if name not in read and getattr(config, name) != defaults[name].default:
            raise ConfigError(name, f"--model={config.describe()['model']} with --dataset="
                                    f"{config.describe()['dataset']} does not read it; leave it unset")


def run_custom_loop(run: Run) -> int:
    """Drives the explicit train step from `run.start_step` to `run.total_steps`; returns the step it ended at.

    It ends early, with a checkpoint, once `--early_stopping_patience`
    evaluations have not improved `--save_best`'s value.
    """
    config, strategy = run.config, run.strategy
    train_loop = step.make_train_loop(make_train_step(run), measurement_names(run))
    iterator = iter(data.distributed_batches(strategy, run.examples, model=run.model,
                                             batching=data.Batching.for_training(config),
                                             skip_batches=run.start_step))
    evaluate = make_evaluation(run) if run.validation else None
    measure_shares = make_gradient_share_measurement(run) if config.log_gradient_shares_every else None
    preemption = PreemptionWatcher(strategy)
    try:
        current_step = run.start_step
        window = _Window()
        while current_step < run.total_steps:
            # Stop a loop at the next log, checkpoint, evaluation or the end, whichever is first.
            num_steps = min(config.steps_per_loop, run.total_steps - current_step,
                            _steps_to_next(current_step, config.log_every),
                            _steps_to_next(current_step, config.checkpoint_every),
                            _steps_to_next(current_step, config.eval_every or run.total_steps),
                            _steps_to_next(current_step, config.log_gradient_shares_every or run.total_steps))
            # A tensor, not a Python int: a new count must not retrace the loop.
            loop_totals = {name: value.numpy() for name, value in train_loop(iterator, tf.constant(num_steps)).items()}
            # The sums were fetched anyway: checking them costs no extra sync.
            # They are all-reduced, so every worker stops at the same call.
            _check_finite(loop_totals, first_step=current_step + 1, last_step=current_step + num_steps,
                          checkpoints=run.checkpoints)
            window.add(loop_totals, num_steps)
            current_step += num_steps
            run.progress.update(current_step, {name: value / num_steps for name, value in loop_totals.items()})
            finished = current_step == run.total_steps
            preempted = not finished and preemption.stop_agreed()
            record = {}
            window_ends = current_step % config.log_every == 0 or finished or preempted
            if window_ends:
                record.update(window.measurements(run.output_metrics, config.batch_size))
            if measure_shares and current_step % config.log_gradient_shares_every == 0:
                record.update(measure_shares())
            stop_early = False
            if evaluate and (finished or (config.eval_every and current_step % config.eval_every == 0)):
                record.update(evaluate())
                if run.best_value:
                    record.update(run.best_value.update(current_step, record, run.model))
                    stop_early = run.best_value.patience_exhausted
            if record:
                run.progress.window(current_step, run.metrics_log.write(current_step, record))
            if window_ends:  # Timed from here: evaluating and logging are not training.
                window = _Window()
            if current_step % config.checkpoint_every == 0 or finished or preempted or stop_early:
                run.checkpoints.save(current_step)
            if preempted:
                raise Preempted(current_step)
            if stop_early:
                logger.info("Early stopping at step %d: %s", current_step, run.best_value.describe_stop())
                break
        return current_step
    finally:
        preemption.close()


def make_evaluation(run: Run) -> Callable[[], dict[str, float]]:
    """Returns `evaluate()`: the run's losses and metrics on its validation data, named `val_...` as `fit` names them."""
    config = run.config
    evaluate = step.make_evaluate(model=run.model, loss_fns=run.loss_fns, loss_weights=run.loss_weights,
                                  output_metrics=run.val_output_metrics, strategy=run.strategy)
    batches = data.distributed_batches(run.strategy, run.validation, model=run.model,
                                       batching=data.Batching.for_evaluation(config))
    num_examples = run.validation.count()
    num_steps = data.steps_per_pass(num_examples, config.batch_size)
    if config.eval_steps is not None and config.eval_steps < num_steps:
        num_steps, num_examples = config.eval_steps, config.eval_steps * config.batch_size

    def evaluate_once() -> dict[str, float]:
        values = evaluate(iter(batches), tf.constant(num_steps), tf.constant(num_examples, tf.int64))
        measurements = {f"val_{name}": float(value) for name, value in values.items()}
        for log_name, (_, metric) in run.val_output_metrics.items():
            measurements[log_name] = float(metric.result())
            metric.reset_state()
        return measurements

    return evaluate_once


def make_gradient_share_measurement(run: Run) -> Callable[[], dict[str, float]]:
    """Returns `measure()`: each output's share of each layer's gradient at the current weights, as log values.

    On the next batch of its own pass over the training data, under the
    run's strategy (gradients summed over replicas); it changes neither the
    weights nor the training batches.
    """
    config = run.config
    contributions = gradient_shares.make_gradient_contributions(
        model=run.model, loss_fns=run.loss_fns, loss_weights=run.loss_weights, strategy=run.strategy,
        global_batch_size=None if config.epochs else config.batch_size)
    batches = iter(data.distributed_batches(run.strategy, run.examples, model=run.model,
                                            batching=data.Batching.for_training(config)))

    def measure() -> dict[str, float]:
        report = gradient_shares.layer_report(run.model, contributions(next(batches)), loss_weights=run.loss_weights)
        return gradient_shares.as_record(report)

    return measure


def _check_finite(loop_totals: dict[str, np.float32], *, first_step: int, last_step: int,
                  checkpoints: outputs.Checkpoints) -> None:
    """Raises `NonFiniteError` naming the steps and the losses that were NaN or infinite."""
    not_finite = [name for name, total in loop_totals.items() if not np.isfinite(total)]
    if not_finite:
        steps = f"step {first_step}" if first_step == last_step else f"steps {first_step} to {last_step}"
        raise outputs.NonFiniteError(f"{', '.join(not_finite)} not finite in {steps}",
                                     kept_step=checkpoints.latest_step)


def make_train_step(run: Run):
    """The run's `step.make_train_step`, with its losses, weights and settings."""
    return step.make_train_step(
        model=run.model, optimizer=run.optimizer, loss_fns=run.loss_fns, loss_weights=run.loss_weights,
        output_metrics=run.output_metrics, strategy=run.strategy,
        # By --epochs, each pass ends with a partial batch: the step counts its examples.
        global_batch_size=None if run.config.epochs else run.config.batch_size,
        accumulation=run.accumulation, jit_compile=run.config.jit_compile,
        compile_update=run.config.xla_update)


def measurement_names(run: Run) -> list[str]:
    """What the train step measures: the total loss, then each output's loss."""
    return ["loss", *(f"{name}_loss" for name in run.loss_fns)]


class _Window:
    """Sums of the step measurements since the last log line."""

    def __init__(self):
        self.totals: dict[str, np.float32] = {}
        self.steps = 0
        self.start = time.perf_counter()

    def add(self, loop_totals: dict[str, np.float32], num_steps: int) -> None:
        # Added in float32, as inside the loop, so that how steps are
        # grouped into loops does not change the logged numbers.
        self.totals = {name: self.totals.get(name, np.float32(0)) + value for name, value in loop_totals.items()}
        self.steps += num_steps

    def measurements(self, output_metrics, global_batch_size: int) -> dict[str, float]:
        """Means over the window, metric results (then reset), and throughput."""
        measurements = {name: float(total) / self.steps for name, total in self.totals.items()}
        for log_name, (_, metric) in output_metrics.items():
            measurements[log_name] = float(metric.result())
            metric.reset_state()
        measurements["examples_per_sec"] = self.steps * global_batch_size / (time.perf_counter() - self.start)
        return measurements


def _steps_to_next(current_step: int, every: int) -> int:
    return every - current_step % every


def load_weights(model: keras.Model, path: str, *, flag: str) -> None:
    """Loads a `.weights.h5` file into `model`; one that does not fit is an error naming `flag`."""
    try:
        model.load_weights(path)
    except (ValueError, OSError, KeyError) as error:
        raise ConfigError(flag, f"{path!r} does not fit model {model.name!r}: {first_line(error)}") from None


def _prepare_model_dir(config: TrainConfig) -> None:
    """Creates `--model_dir`, or checks that the run it holds is this run, so resuming is safe."""
    config_path = os.path.join(config.model_dir, CONFIG_FILE)
    settings = {name: value for name, value in config.describe().items() if name not in _RESUMABLE_CHANGES}
    settings = json.loads(json.dumps(settings))  # As read back.
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
    try:
        os.makedirs(config.model_dir, exist_ok=True)
        with open(config_path, "w") as config_file:
            json.dump(settings, config_file, indent=2, sort_keys=True)
    except OSError as error:
        raise ConfigError("model_dir", f"cannot write {config_path}: {first_line(error)}") from None
