"""Setting up a run: everything is built and checked here, before anything is written.

`build_model_setup` builds what training and `mto-explain` share (the model
and its signature, the training data, the losses); `build_run` adds what
training needs (the optimizer, metrics, validation data, the model
directory's files), and only then writes to `--model_dir`. A `Run` holds
what the loops need; the loops change nothing in it but the variables it
holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import keras
import tensorflow as tf

from mto_tf import loss_weighting
from mto_tf.config import TrainConfig
from mto_tf.core import losses as losses_lib
from mto_tf.core import metrics as metrics_lib
from mto_tf.core import models, optimization, user_code, weighting
from mto_tf.core.signature import ModelSignature
from mto_tf.core.strategy import check_batch_split, is_chief
from mto_tf.data import batching, sources
from mto_tf.data.examples import Examples
from mto_tf.errors import ConfigError, first_line
from mto_tf.run import best, model_dir, progress


@dataclasses.dataclass(frozen=True)
class Losses:
    """Each output's loss and weight: what the one total loss is made of.

    An output whose loss is None (`null` in `--losses`) is predicted and
    its metrics computed, but it is not in the total: it has no entry in
    `per_example` or `weights`, as `compile` leaves it out.
    """

    identifiers: dict[str, object]  # Each output's loss as `compile` takes it (name, config, function, None).
    per_example: dict[str, keras.losses.Loss]  # The trained outputs' losses, per example, for the custom step.
    weights: dict[str, float]  # The trained outputs' weights.

    @property
    def names(self) -> list[str]:
        """What a step or an evaluation reports, named as `fit`'s history names it: `loss`, and `<output>_loss`
        for each trained output when there are several (Keras 3.15 reports no per-output loss for a single one)."""
        return ["loss", *(f"{name}_loss" for name in self.per_example)] if len(self.per_example) > 1 else ["loss"]


@dataclasses.dataclass(frozen=True)
class ModelSetup:
    """The model, its signature, its training data and its losses: what training and `mto-explain` share."""

    config: TrainConfig
    strategy: tf.distribute.Strategy
    model: keras.Model
    signature: ModelSignature  # Read once, where the model is built.
    examples: Examples  # The training data, in file order.
    labels_spec: dict[str, tf.TensorSpec]  # Each output's labels, as the batches hold them.
    losses: Losses

    @property
    def loss_names(self) -> list[str]:
        """What the train step measures: the total loss, then each trained output's loss, named as `fit` names them."""
        return self.losses.names


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
    accumulation: optimization.GradientAccumulation | None  # The custom loop's, with --grad_accum_steps > 1.
    method: weighting.Method | None  # --loss_weighting's, when it is not `fixed`: its state is checkpointed.
    representation: weighting.Representation | None  # --weighting_gradients=representation:LAYER's.
    metrics: Metrics
    validation: Examples | None
    best_value: best.BestValue | None  # With --save_best.
    checkpoints: model_dir.Checkpoints
    metrics_log: model_dir.MetricsLog
    progress: progress.Progress  # What the person watching sees (the chief's only).
    start_step: int  # Where a restored run stopped; 0 for a new run.
    total_steps: int  # --train_steps, or --epochs passes over the data, each ending with its partial batch.
    lock: model_dir.Lock | None = None  # The chief's hold on --model_dir: `release()` when the run ends.
    callbacks: tuple[keras.callbacks.Callback, ...] = ()  # --callbacks' list, then those `train` was given.

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
    def measurement_names(self) -> list[str]:
        """What each train step measures: the losses, and an adaptive method's factor of each output's loss."""
        weights = [f"loss_weight/{name}" for name in self.setup.losses.weights] if self.method else []
        return [*self.setup.loss_names, *weights]


def build_model_setup(config: TrainConfig, strategy: tf.distribute.Strategy) -> ModelSetup:
    """Builds the model (in the strategy's scope, --init_weights loaded), loads the data, resolves the losses."""
    check_batch_split(config, strategy)
    optimization.set_precision(config)  # Layers take their dtypes when they are built.
    # Variables created in the scope are mirrored on every replica.
    with strategy.scope():
        model, signature = models.build_model(config)
        config.check_settings_are_read()  # Now that --model is known to name a model.
        if config.init_weights:
            models.load_weights(model, config.init_weights, flag="init_weights")
    _check_class_weight_outputs(config, signature)
    examples = sources.load_examples(config, signature)  # Checks the data against the model.
    # Building the batches checks the class weights against the outputs' shapes.
    _, labels_spec, *_ = batching.global_batches(
        examples, signature=signature, batching=batching.Batching.for_training(config)).element_spec
    return ModelSetup(config=config, strategy=strategy, model=model, signature=signature, examples=examples,
                      labels_spec=labels_spec, losses=_resolve_losses(config, signature, labels_spec))


def build_run(config: TrainConfig, strategy: tf.distribute.Strategy,
              callbacks: Sequence[keras.callbacks.Callback] = ()) -> Run:
    """Builds model, data, losses, metrics, optimizer and callbacks; checks them all before writing anything."""
    if config.xla_update and strategy.num_replicas_in_sync > 1:  # A strategy passed from Python.
        raise ConfigError("xla_update", f"one replica only, not {strategy.num_replicas_in_sync}")
    setup = build_model_setup(config, strategy)
    validation = sources.load_validation_examples(config, setup.signature)
    for flag in ("eval_every", "eval_steps"):
        if getattr(config, flag) and validation is None:
            raise ConfigError(flag, "there is no validation data: give --validation_data=npz:PATH, or a dataset "
                                    "with a validation split")

    metric_identifiers = resolve_metric_identifiers(config, setup.signature)
    with strategy.scope():
        # Adam's slots must exist before the first distributed step, hence build().
        custom_loop = config.loop == "custom"
        optimizer = optimization.make_optimizer(config, takes_all_reduced_gradients=custom_loop)
        method = make_method(config, setup) if config.weighting.name != "fixed" else None
        representation = (weighting.make_representation(setup.model, config.representation_layer)
                          if config.representation_layer else None)
        optimizer.build(setup.model.trainable_variables + (method.trainable if method else []))
        accumulation = (optimization.GradientAccumulation(config.grad_accum_steps, setup.model.trainable_variables)
                        if custom_loop and config.grad_accum_steps > 1 else None)

        def make_metrics(prefix: str) -> dict[str, tuple[str, keras.metrics.Metric]]:
            return {prefix + name: output_metric for name, output_metric in metrics_lib.make_output_metrics(
                metric_identifiers, y_true=setup.labels_spec, y_pred=setup.signature.outputs).items()}

        metrics = Metrics(identifiers=metric_identifiers, training=make_metrics(""),
                          validation=make_metrics("val_") if validation else {})
    best_value = _make_best_value(config, strategy, validation=validation, metrics=metrics, losses=setup.losses)
    callbacks = _load_callbacks(config, callbacks, optimizer=optimizer)

    # Everything is checked: only now may the model directory be written
    # (by the chief alone, holding its lock; the other workers read its checkpoints).
    chief = is_chief(strategy)
    lock = model_dir.prepare(config) if chief else None
    try:
        more_state = {name: state for name, state in (("best_value", best_value), ("accumulation", accumulation),
                                                      ("loss_weighting", method)) if state}
        checkpoints = model_dir.Checkpoints(config.model_dir, model=setup.model, optimizer=optimizer,
                                            is_chief=chief, **more_state)
        start_step = checkpoints.restore_latest()
        total_steps = (config.epochs * batching.steps_per_pass(setup.examples.count(), config.batch_size)
                       if config.epochs else config.train_steps)
        return Run(setup=setup, optimizer=optimizer, accumulation=accumulation, method=method,
                   representation=representation, metrics=metrics, validation=validation,
                   best_value=best_value, checkpoints=checkpoints,
                   metrics_log=model_dir.MetricsLog(config.model_dir, write_files=chief, resume_step=start_step),
                   progress=progress.Progress(config.progress if chief else "quiet", start_step=start_step,
                                              total_steps=total_steps),
                   start_step=start_step, total_steps=total_steps, lock=lock, callbacks=callbacks)
    except BaseException:
        if lock:
            lock.release()
        raise


def make_method(config: TrainConfig, setup: ModelSetup) -> weighting.Method:
    """--loss_weighting's method, for the model's outputs; a DWA period is a pass (with --epochs) or a window."""
    num_outputs = len(setup.losses.weights)  # The trained outputs.
    name = config.weighting.name
    if num_outputs < 2:
        raise ConfigError("loss_weighting", f"{name} weighs several outputs' losses; model "
                                            f"{setup.signature.model_name!r} has one to train")
    if name in loss_weighting.EXACT_SOLVER_METHODS and num_outputs > loss_weighting.MAX_OUTPUTS_FOR_EXACT_SOLVERS:
        raise ConfigError("loss_weighting", f"{name} solves its problem exactly over every subset of the outputs: "
                                            f"at most {loss_weighting.MAX_OUTPUTS_FOR_EXACT_SOLVERS} outputs, "
                                            f"not {num_outputs}")
    period_steps = (batching.steps_per_pass(setup.examples.count(), config.batch_size) if config.epochs
                    else config.log_every)
    return weighting.make_method(config.weighting, num_outputs=num_outputs, seed=config.seed,
                                 period_steps=period_steps)


def resolve_metric_identifiers(config: TrainConfig, signature: ModelSignature) -> dict[str, list]:
    """Each output's metrics as `compile` takes them: --metrics, or the built-in model's own (a user's: none)."""
    return metrics_lib.resolve_identifiers(_default_for(config, "metrics", {}), output_names=signature.output_names)


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
        if rate_is_a_schedule and isinstance(callback, _SETS_THE_LEARNING_RATE):
            raise ConfigError("callbacks", f"{type(callback).__name__} sets the optimizer's learning rate, but "
                                           f"it is a schedule (--learning_rate), which Keras does not let a callback "
                                           f"change: give --learning_rate a number, or leave "
                                           f"{type(callback).__name__} out")
    return tuple(callbacks)


_SETS_THE_LEARNING_RATE = (keras.callbacks.ReduceLROnPlateau, keras.callbacks.LearningRateScheduler)


def _check_class_weight_outputs(config: TrainConfig, signature: ModelSignature) -> None:
    unknown = sorted(set(config.class_weights) - set(signature.output_names))
    if unknown:
        raise ConfigError("class_weights", f"unknown output {unknown[0]!r}; the model has outputs "
                                           f"{signature.output_names}")


def _make_best_value(config: TrainConfig, strategy: tf.distribute.Strategy, *, validation: Examples | None,
                     metrics: Metrics, losses: Losses) -> best.BestValue | None:
    """`--save_best`'s tracker, checked against what the evaluation reports."""
    if config.save_best is None:
        return None
    if validation is None:
        raise ConfigError("save_best", "needs validation data: --validation_data=npz:PATH, or a dataset with a "
                                       "validation split (--validation_split)")
    watched = metrics.validation.get(config.save_best)
    if watched is not None and tuple(watched[1].result().shape) != ():
        raise ConfigError("save_best", f"{config.save_best} has a value per class; name a single value (a loss, or a "
                                       f"metric with average='macro' or 'micro')")
    higher = best.higher_is_better(
        config.save_best, val_loss_names=[f"val_{name}" for name in losses.names],
        val_metrics={name: metric for name, (_, metric) in metrics.validation.items()})
    return best.BestValue(config.save_best, higher_is_better=higher, patience=config.early_stopping_patience,
                          model_dir=config.model_dir, is_chief=is_chief(strategy))


def _default_for(config: TrainConfig, field: str, user_model_default):
    """`config.<field>`, or the built-in model's own when it is None."""
    value = getattr(config, field)
    if value is not None:
        return value
    spec = models.builtin_spec(config.model)
    return getattr(spec, field) if spec else user_model_default


def _resolve_losses(config: TrainConfig, signature: ModelSignature, labels_spec: dict[str, tf.TensorSpec]) -> Losses:
    """Each output's loss (as `compile` takes it, and per example) and weight; every trained output must have both."""
    output_names = signature.output_names
    losses = _default_for(config, "losses", {})
    _check_output_names("losses", losses, signature)
    missing = [name for name in output_names if name not in losses]
    if missing:
        raise ConfigError("losses", f"no entry for output {missing[0]!r}; expected one for each of "
                                    f"{sorted(output_names)} (null for an output that is not trained)")
    trained = [name for name in output_names if losses[name] is not None]
    if not trained:
        raise ConfigError("losses", "every output's loss is null: nothing would be trained")
    # Keras's default: every output counts once.
    weights = _default_for(config, "loss_weights", {name: 1.0 for name in output_names})
    _check_output_names("loss_weights", weights, signature)
    if config.loss_weights is not None:  # Given: for the trained outputs, and those only.
        untrained = sorted(set(weights) - set(trained))
        if untrained:
            raise ConfigError("loss_weights", f"output {untrained[0]!r} has no loss (null in --losses): leave out "
                                              f"its weight")
    missing = [name for name in trained if name not in weights]
    if missing:
        raise ConfigError("loss_weights", f"no entry for output {missing[0]!r}; expected one for each of "
                                          f"{sorted(trained)}")
    for output in config.class_weights:
        if output not in trained:
            raise ConfigError("class_weights", f"output {output!r} has no loss (null in --losses): nothing to weigh")
    identifiers = {name: user_code.resolve_identifier(losses[name], output=name, flag="losses") if name in trained
                   else None for name in output_names}
    per_example = {name: losses_lib.per_example_loss(identifiers[name], output=name, y_true=labels_spec[name],
                                                     y_pred=signature.outputs[name]) for name in trained}
    return Losses(identifiers=identifiers, per_example=per_example,
                  weights={name: float(weights[name]) for name in trained})


def _check_output_names(flag: str, mapping, signature: ModelSignature) -> None:
    unknown = sorted(set(mapping) - set(signature.output_names))
    if unknown:
        raise ConfigError(flag, f"unknown output {unknown[0]!r}; model {signature.model_name!r} has outputs "
                                f"{sorted(signature.output_names)}")
