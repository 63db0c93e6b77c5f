"""Setting up a run: everything is built and checked here, before anything is written.

`build_run` builds on `model_setup.py`'s model, data and losses what
training needs (the optimizer, a method's state, metrics, the evaluation of
the validation data, callbacks, the model directory's files), and only then
writes to `--model_dir`. A `Run` holds what the loops need; the loops
change nothing in it but the variables it holds.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import keras
import tensorflow as tf

from mto_tf.config import TrainConfig
from mto_tf.core import metrics as metrics_lib
from mto_tf.core import optimization, user_code, weighting
from mto_tf.core.loss_weights import LossWeights
from mto_tf.core.objective import Objective
from mto_tf.core.strategy import is_chief
from mto_tf.core.task_sampling import TaskSampler
from mto_tf.data import batching
from mto_tf.data.examples import Examples
from mto_tf.errors import ConfigError, first_line
from mto_tf.run import best, model_dir, progress
from mto_tf.run.evaluation import Evaluation, TaskEvaluations, validation_of
from mto_tf.run.model_setup import ModelSetup, build_model_setup, make_method, resolve_metric_identifiers

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Metrics:
    """Each output's metrics, as `compile` takes them and as made for training and for validation."""

    identifiers: dict[str, list]
    training: dict[str, tuple[str, keras.metrics.Metric]]  # `{log name: (output, metric)}`, named as `fit` names them.
    validation: dict[str, tuple[str, keras.metrics.Metric]]  # The same, named `val_<output>_<metric>`.


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything built for a run: what the custom loop and `--loop=fit` need."""

    setup: ModelSetup
    optimizer: keras.optimizers.Optimizer  # The custom loop's takes gradients already summed over replicas.
    loss_weights: LossWeights  # The weights in force: schedules follow the optimizer's step; callbacks may set them.
    accumulation: optimization.GradientAccumulation | None  # The custom loop's, with --grad_accum_steps > 1.
    method: weighting.Method | None  # --loss_weighting's, when it is not `fixed`: its state is checkpointed.
    representation: weighting.Representation | None  # --weighting_gradients=representation:LAYER's.
    metrics: Metrics
    validation: Examples | None  # The examples `--loop=fit` validates on (one dataset's).
    evaluation: Evaluation | TaskEvaluations | None  # Of the validation data (each task's), when there is any.
    best_value: best.BestValue | None  # With --save_best.
    checkpoints: model_dir.Checkpoints
    metrics_log: model_dir.MetricsLog
    progress: progress.Progress  # What the person watching sees (the chief's only).
    start_step: int  # Where a restored run stopped; 0 for a new run.
    total_steps: int  # --train_steps, or --epochs passes over the data, each ending with its partial batch.
    lock: model_dir.Lock | None = None  # The chief's hold on --model_dir: `release()` when the run ends.
    callbacks: tuple[keras.callbacks.Callback, ...] = ()  # --callbacks' list, then those `train` was given.
    sampler: TaskSampler | None = None  # A sampled --task_mixing's: its counts are checkpointed.

    def release(self) -> None:
        """Ends the run's hold on --model_dir (another run may then use it)."""
        if self.lock:
            self.lock.release()

    @property
    def config(self) -> TrainConfig:
        return self.setup.config

    @property
    def epoch_steps(self) -> int:
        """One epoch, as Keras callbacks count it: a pass with --epochs, else a logging window (as --loop=fit)."""
        return self.total_steps // self.config.epochs if self.config.epochs else self.config.log_every

    @property
    def objective(self) -> Objective:
        """What the run trains on: the model's terms, weighted by the weights in force."""
        return self.setup.objective_weighted_by(self.loss_weights)

    @property
    def measurement_names(self) -> list[str]:
        """What each train step measures: the losses, and each term's weight (an adaptive method's factor, or
        the weight in force when weights may change)."""
        logged = self.method or self.loss_weights.may_change
        weights = [f"loss_weight/{name}" for name in self.setup.losses.weights] if logged else []
        task_steps = [f"steps/{name}" for name in self.sampler.task_names] if self.sampler else []
        return [*self.setup.loss_names, *weights, *task_steps]

    @property
    def counted_by(self) -> dict[str, str]:
        """Sampled turns: each term's measurement -> the count of its task's steps (its mean is over those)."""
        if not self.sampler:
            return {}
        return {measurement: f"steps/{task.name}" for task in self.setup.tasks for name in task.outputs
                if name in self.setup.losses.terms for measurement in (f"{name}_loss", f"loss_weight/{name}")}

    def training_input(self):
        """What the train loop reads, from where the run starts: an iterator of global batches (with --datasets
        and `joint`, of `{task: batch}`), or for sampled turns `{task: iterator}`, each after the batches its task
        had read."""
        if not self.sampler:
            return iter(self.setup.training_batches(skip_batches=self.start_step))
        read = dict(zip(self.sampler.task_names, (int(count) for count in self.sampler.task_draws.numpy())))
        return {task: iter(batches) for task, batches in self.setup.task_batches(read).items()}

    def outputs_not_trained(self, totals: Mapping[str, float]) -> set[str]:
        """The outputs no step summed in `totals` trained (sampled turns: their task was not drawn): no metric of
        theirs is logged for those steps."""
        if not self.sampler:
            return set()
        return {name for task in self.setup.tasks if not totals.get(f"steps/{task.name}") for name in task.outputs}

    def examples_in(self, totals: Mapping[str, float], steps: int) -> int:
        """The training examples of `steps` steps whose measurements summed to `totals` (sampled turns: each
        drawn task's batches)."""
        if not self.sampler:
            return steps * self.setup.examples_per_step
        return sum(int(totals.get(f"steps/{task.name}", 0)) * task.batch_size for task in self.setup.tasks)


def build_run(config: TrainConfig, strategy: tf.distribute.Strategy,
              callbacks: Sequence[keras.callbacks.Callback] = ()) -> Run:
    """Builds model, data, losses, metrics, optimizer and callbacks; checks them all before writing anything."""
    if config.xla_update and strategy.num_replicas_in_sync > 1:  # A strategy passed from Python.
        raise ConfigError("xla_update", f"one replica only, not {strategy.num_replicas_in_sync}")
    setup = build_model_setup(config, strategy)
    for line in setup.input_lines():
        logger.info("%s", line)
    metric_identifiers = resolve_metric_identifiers(config, setup.signature)
    custom_loop = config.loop == "custom"
    with strategy.scope():
        # Adam's slots must exist before the first distributed step, hence build().
        optimizer = optimization.make_optimizer(config, takes_all_reduced_gradients=custom_loop)
        method = make_method(config, setup) if config.weighting.name != "fixed" else None
        representation = (weighting.make_representation(setup.model, config.representation_layer)
                          if config.representation_layer else None)
        optimizer.build(setup.model.trainable_variables + (method.trainable if method else []))
        accumulation = (optimization.GradientAccumulation(config.grad_accum_steps, setup.model.trainable_variables)
                        if custom_loop and config.grad_accum_steps > 1 else None)
        training_metrics = metrics_lib.make_output_metrics(metric_identifiers, y_true=setup.labels_spec,
                                                           y_pred=setup.signature.outputs)
        sampler = _make_sampler(config, setup)
    callbacks = _load_callbacks(config, callbacks, optimizer=optimizer)
    with strategy.scope():
        # Schedules read the step the optimizer's learning-rate schedule reads;
        # the numbers are variables a callback may set, in every checkpoint
        # (whether or not a resumed run has callbacks); a callback that says
        # so (`sets_loss_weights`) has them logged.
        step = getattr(optimizer, "inner_optimizer", optimizer).iterations
        loss_weights = LossWeights(setup.losses.weights, step=step, assignable=custom_loop,
                                   set_by_callback=any(getattr(callback, "sets_loss_weights", False)
                                                       for callback in callbacks))
    loss_weights.attach_to(setup.model)
    evaluation = validation_of(setup, metric_identifiers=metric_identifiers, max_steps=config.eval_steps,
                               objective=setup.objective_weighted_by(loss_weights))
    for flag in ("eval_every", "eval_steps"):
        if getattr(config, flag) and evaluation is None:
            raise ConfigError(flag, "there is no validation data: give --validation_data=npz:PATH, or a dataset "
                                    "with a validation split")
    # The examples `--loop=fit` validates on (it takes one dataset).
    validation = evaluation.examples if isinstance(evaluation, Evaluation) else None
    metrics = Metrics(identifiers=metric_identifiers, training=training_metrics,
                      validation=evaluation.metrics if evaluation else {})
    best_value = _make_best_value(config, strategy, evaluation=evaluation, metrics=metrics)

    # Everything is checked: only now may the model directory be written
    # (by the chief alone, holding its lock; the other workers read its checkpoints).
    chief = is_chief(strategy)
    lock = model_dir.prepare(config) if chief else None
    try:
        more_state = {name: state for name, state in (("best_value", best_value), ("accumulation", accumulation),
                                                      ("loss_weighting", method), ("task_sampler", sampler),
                                                      ("loss_weights", custom_loop and loss_weights))
                      if state}
        checkpoints = model_dir.Checkpoints(config.model_dir, model=setup.model, optimizer=optimizer,
                                            is_chief=chief, **more_state)
        start_step = checkpoints.restore_latest()
        total_steps = (config.epochs * batching.steps_per_pass(setup.examples.count(), setup.pass_batch_size)
                       if config.epochs else config.train_steps)
        return Run(setup=setup, optimizer=optimizer, loss_weights=loss_weights, accumulation=accumulation,
                   method=method, representation=representation, metrics=metrics, validation=validation, evaluation=evaluation,
                   best_value=best_value, checkpoints=checkpoints,
                   metrics_log=model_dir.MetricsLog(config.model_dir, write_files=chief, resume_step=start_step),
                   progress=progress.Progress(config.progress if chief else "quiet", start_step=start_step,
                                              total_steps=total_steps),
                   start_step=start_step, total_steps=total_steps, lock=lock, callbacks=callbacks, sampler=sampler)
    except BaseException:
        if lock:
            lock.release()
        raise


def _make_sampler(config: TrainConfig, setup: ModelSetup) -> TaskSampler | None:
    """A sampled --task_mixing's sampler (in the strategy's scope: its counts are mirrored), weighing each task
    by its number of examples; `annealed`'s epoch is a pass over the largest task."""
    if not (setup.tasks and config.mixing.sampled):
        return None
    for task in setup.tasks:
        if not any(name in setup.losses.terms for name in task.outputs):
            raise ConfigError("datasets", f"task {task.name!r}: every output's loss is null (--losses): a turn of it "
                                          f"would train nothing")
    largest = setup.epochs_task  # Without --epochs (sampled turns train by --train_steps): the largest.
    return TaskSampler(config.mixing, task_examples={task.name: task.examples.count() for task in setup.tasks},
                       seed=config.seed, total_steps=config.train_steps,
                       steps_per_epoch=batching.steps_per_pass(largest.examples.count(), largest.batch_size))


def _load_callbacks(config: TrainConfig, given: Sequence[keras.callbacks.Callback], *,
                    optimizer: keras.optimizers.Optimizer) -> tuple[keras.callbacks.Callback, ...]:
    """--callbacks' list (its function called once, here), then `given`; each a Keras callback that can work."""
    callbacks = []
    if config.callbacks:
        function = user_code.load_function(config.callbacks, flag="callbacks")
        try:
            made = function()
        except Exception as error:  # The user's code: anything can go wrong.
            raise ConfigError("callbacks", f"{config.callbacks} raised {type(error).__name__}: "
                                           f"{first_line(error)}") from None
        if not isinstance(made, list | tuple):
            raise ConfigError("callbacks", f"{config.callbacks} returned a {type(made).__name__}; expected a list "
                                           f"of keras.callbacks.Callback")
        callbacks += made
    callbacks += given
    # Keras cannot change a schedule's rate (the optimizer's setter refuses).
    rate_is_a_schedule = isinstance(getattr(optimizer, "inner_optimizer", optimizer).get_config()["learning_rate"],
                                    dict)
    for callback in callbacks:
        if not isinstance(callback, keras.callbacks.Callback):
            raise ConfigError("callbacks", f"expected keras.callbacks.Callback objects, got {callback!r}")
        if getattr(callback, "sets_loss_weights", False) and config.loop == "fit":
            raise ConfigError("callbacks", f"{type(callback).__name__} sets the custom loop's loss weights; Keras "
                                           f"3.15's compile takes numbers (keras-team/keras#20294): use --loop=custom")
        if rate_is_a_schedule and isinstance(callback, _SETS_THE_LEARNING_RATE):
            raise ConfigError("callbacks", f"{type(callback).__name__} sets the optimizer's learning rate, but "
                                           f"it is a schedule (--learning_rate), which Keras does not let a callback "
                                           f"change: give --learning_rate a number, or leave "
                                           f"{type(callback).__name__} out")
    return tuple(callbacks)


_SETS_THE_LEARNING_RATE = (keras.callbacks.ReduceLROnPlateau, keras.callbacks.LearningRateScheduler)


def _make_best_value(config: TrainConfig, strategy: tf.distribute.Strategy, *,
                     evaluation: Evaluation | TaskEvaluations | None, metrics: Metrics) -> best.BestValue | None:
    """`--save_best`'s tracker, checked against what the evaluation reports."""
    if config.save_best is None:
        return None
    if evaluation is None:
        raise ConfigError("save_best", "needs validation data: --validation_data=npz:PATH, or a dataset with a "
                                       "validation split (--validation_split)")
    watched = metrics.validation.get(config.save_best)
    if watched is not None and tuple(watched[1].result().shape) != ():
        raise ConfigError("save_best", f"{config.save_best} has a value per class; name a single value (a loss, or a "
                                       f"metric with average='macro' or 'micro')")
    higher = best.higher_is_better(
        config.save_best, val_loss_names=evaluation.loss_names,
        val_metrics={name: metric for name, (_, metric) in metrics.validation.items()})
    return best.BestValue(config.save_best, higher_is_better=higher, patience=config.early_stopping_patience,
                          model_dir=config.model_dir, is_chief=is_chief(strategy))


