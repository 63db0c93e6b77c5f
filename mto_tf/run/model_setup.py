"""What training, `mto-explain` and `mto-evaluate` share: the model, its data, its losses, checked as they are built.

`build_model_setup` builds the model (in the strategy's scope), reads its
signature, loads the training data and resolves each output's loss and
weight; every setting is checked against the built model before anything
is written. `run/setup.py` adds what training needs.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from collections.abc import Iterator

import keras
import tensorflow as tf
from keras.optimizers.schedules import LearningRateSchedule

from mto_tf.config import TrainConfig
from mto_tf.core import losses as losses_lib
from mto_tf.core import metrics as metrics_lib
from mto_tf.core import models, optimization, replicas, user_code, weighting
from mto_tf.core.loss_weights import LossWeights
from mto_tf.core.objective import Objective
from mto_tf.core.signature import ModelSignature
from mto_tf.core.strategy import check_batch_split
from mto_tf.data import batching, input_service, sources
from mto_tf.data import tasks as tasks_lib
from mto_tf.data.examples import Examples
from mto_tf.data.tasks import Task
from mto_tf.errors import ConfigError, describe_error, first_line


@dataclasses.dataclass(frozen=True)
class Losses:
    """Each term of the total loss and its weight: each trained output's loss, then each `--extra_losses` term.

    An output whose loss is None (`null` in `--losses`) is predicted and
    its metrics computed, but it is not in the total: it has no entry in
    `terms` or `weights`, as `compile` leaves it out.
    """

    identifiers: dict[str, object]  # Each output's loss as `compile` takes it (name, config, function, None).
    terms: dict[str, losses_lib.LossTerm]  # The terms, per example and how each is reduced, for the custom step.
    weights: dict[str, float | LearningRateSchedule]  # Each term's weight: a number or a Keras schedule.

    @property
    def names(self) -> list[str]:
        """What a step or an evaluation reports, named as `fit`'s history names it: `loss`, and `<term>_loss`
        for each term when there are several (Keras 3.15 reports no per-output loss for a single one)."""
        return ["loss", *(f"{name}_loss" for name in self.terms)] if len(self.terms) > 1 else ["loss"]

    def weights_as_json(self) -> dict:
        """Each weight as a number, or its schedule's Keras config."""
        return {name: weight if isinstance(weight, float) else keras.optimizers.schedules.serialize(weight)
                for name, weight in self.weights.items()}


@dataclasses.dataclass(frozen=True)
class ModelSetup:
    """The model, its signature, its training data and its losses: what training and `mto-explain` share."""

    config: TrainConfig
    strategy: tf.distribute.Strategy
    model: keras.Model
    signature: ModelSignature  # Read once, where the model is built.
    examples: Examples  # The training data, in file order (with --datasets: the task --epochs counts).
    labels_spec: dict[str, tf.TensorSpec]  # Each output's labels, as the batches hold them.
    losses: Losses
    loss_weights: LossWeights  # Schedules read at step 0: what mto-explain and mto-evaluate weigh by.
    # The outputs whose training batches carry sample weights (their own, class weights', missing labels').
    weighted_outputs: tuple[str, ...]
    tasks: tuple[Task, ...] = ()  # With --datasets: each task, its examples and settings.
    # With --datasets, the task whose passes --epochs counts (`examples` are its): --epochs_of, else the largest.
    epochs_task: Task | None = None
    # --input_service: the tf.data service that serves the training sources read in order.
    served_by: batching.ServedBy | None = None
    _served_jobs: Iterator[int] = dataclasses.field(default_factory=itertools.count, repr=False, compare=False)

    @property
    def pass_batch_size(self) -> int:
        """The global batch size of `examples`: a pass over them takes `steps_per_pass(count, this)` steps."""
        return self.epochs_task.batch_size if self.tasks else self.config.batch_size

    @property
    def examples_per_step(self) -> int:
        """The examples a full training step reads (with --datasets, a batch of every task)."""
        return sum(task.batch_size for task in self.tasks) if self.tasks else self.config.batch_size

    @property
    def global_batch_sizes(self) -> int | dict[str, int] | None:
        """What each training batch holds when every batch is full (`{task: size}` with --datasets); None with
        --epochs (each pass ends with a partial batch, which the step counts)."""
        if self.config.epochs:
            return None
        return {task.name: task.batch_size for task in self.tasks} if self.tasks else self.config.batch_size

    def training_batches(self, *, skip_batches: int = 0) -> tf.distribute.DistributedDataset:
        """Each replica's slices of each global training batch (with --datasets, `{task: slices}`: one of every
        task), from the start or after `skip_batches` steps."""
        if not self.tasks:
            return batching.distributed_batches(
                self.strategy, self.examples, signature=self.signature,
                batching=self._served(batching.Batching.for_training(self.config), self.examples, "data"),
                skip_batches=skip_batches)
        batchings = {task.name: self._served(tasks_lib.training_batching(
            task, by_epoch=task is self.epochs_task and bool(self.config.epochs)), task.examples, task.name)
            for task in self.tasks}
        return tasks_lib.joint_batches(self.strategy, self.tasks, batchings=batchings, skip_batches=skip_batches)

    def task_batches(self, skip_batches: dict[str, int]) -> dict[str, tf.distribute.DistributedDataset]:
        """Each task's own training batches (a sampled turn reads the drawn task's only), after `skip_batches`."""
        return {task.name: batching.distributed_batches(
            self.strategy, task.examples, signature=task.signature,
            batching=self._served(tasks_lib.training_batching(task, by_epoch=False), task.examples, task.name),
            skip_batches=skip_batches[task.name])
            for task in self.tasks}

    def _served(self, source_batching: batching.Batching, examples: Examples, source: str) -> batching.Batching:
        """`source_batching`, through the input service if there is one and the source is read in order.

        One job per source and per time its batches are made (the gradient
        shares' log reads its own): a job's readers take turns, so two
        iterators of one job would take each other's batches. Every worker
        makes its batches in the same order, so the names agree.
        """
        if self.served_by is None or examples.by_index:
            return source_batching
        job = dataclasses.replace(self.served_by,
                                  job_name=f"{self.served_by.job_name}-{source}-{next(self._served_jobs)}")
        return dataclasses.replace(source_batching, served_by=job)

    def input_lines(self) -> list[str]:
        """How each training source is read, and why: what a training run says once."""
        sources = {task.name: task.examples for task in self.tasks} if self.tasks else {None: self.examples}
        return [f"Input{f' of task {task}' if task else ''}: {input_service.describe_input(examples, self.served_by)}"
                for task, examples in sources.items()]

    @property
    def objective(self) -> Objective:
        """The model and its total loss's parts, as the evaluation and the gradient shares read them."""
        return self.objective_weighted_by(self.loss_weights)

    def objective_weighted_by(self, loss_weights: LossWeights) -> Objective:
        """The same terms, weighted by `loss_weights` (a run's: its schedules follow the optimizer's step)."""
        tasks = ({task.name: tuple(name for name in task.outputs if name in self.losses.terms) for task in self.tasks}
                 if self.tasks else None)
        return Objective(model=self.model, signature=self.signature, terms=self.losses.terms,
                         loss_weights=loss_weights, tasks=tasks)

    @property
    def loss_names(self) -> list[str]:
        """What the train step measures: the total loss, then each term's loss, named as `fit` names them."""
        return self.losses.names


def build_model_setup(config: TrainConfig, strategy: tf.distribute.Strategy) -> ModelSetup:
    """Builds the model (in the strategy's scope, --init_weights loaded), loads the data, resolves the losses."""
    if not config.datasets:
        check_batch_split(config, strategy)
    for task in config.datasets:  # Each task's batches split evenly too.
        try:
            check_batch_split(config.task_config(task), strategy)
        except ConfigError as error:
            raise error.about_task(task) from None
    optimization.set_precision(config)  # Layers take their dtypes when they are built.
    # Variables created in the scope are mirrored on every replica.
    with strategy.scope():
        model, signature = models.build_model(config)
        config.check_settings_are_read()  # Now that --model is known to name a model.
        if config.init_weights:
            models.load_weights(model, config.init_weights, flag="init_weights")
    _check_class_weight_outputs(config, signature)
    # Each source's data is checked against the model (with --datasets: its inputs and the task's outputs).
    tasks = tasks_lib.load_tasks(config, signature) if config.datasets else ()
    if tasks:
        _check_no_losses_added_in_call(model, signature)
    sources_and_configs = ([(task.examples, task.signature, task.config) for task in tasks] if tasks
                           else [(sources.load_examples(config, signature), signature, config)])
    labels_spec, weighted = {}, set(config.missing_labels)
    for examples, data_signature, data_config in sources_and_configs:
        # Building the batches checks the class weights against the outputs' shapes.
        # The labels' dtypes, to check --missing_labels before a batch is parsed with them.
        _, labels, *weights_spec = batching.global_batches(
            examples, signature=data_signature,
            batching=dataclasses.replace(batching.Batching.for_training(data_config), missing_labels={})).element_spec
        labels_spec.update(labels)
        # The outputs whose batches carry sample weights (their own, class weights', or missing labels').
        weighted.update(weights_spec[0] if weights_spec else {})
    labels_spec = {name: labels_spec[name] for name in signature.output_names}
    _check_missing_labels(config, signature, labels_spec)
    weighted_outputs = tuple(sorted(weighted))
    epochs_task = tasks_lib.epochs_task(config, tasks) if tasks else None
    examples = epochs_task.examples if tasks else sources_and_configs[0][0]
    losses = _resolve_losses(config, signature, labels_spec, weighted_outputs)
    with strategy.scope():
        loss_weights = LossWeights(losses.weights)
    training_sources = {task.name: task.examples for task in tasks} if tasks else {None: examples}
    served_by = _input_service(config, strategy, training_sources)
    return ModelSetup(config=config, strategy=strategy, model=model, signature=signature, examples=examples,
                      labels_spec=labels_spec, losses=losses, loss_weights=loss_weights,
                      weighted_outputs=weighted_outputs, tasks=tasks, epochs_task=epochs_task, served_by=served_by)


def _input_service(config: TrainConfig, strategy: tf.distribute.Strategy,
                   training_sources: dict[str | None, Examples]) -> batching.ServedBy | None:
    """`--input_service`: where the training sources read in order are served from, under a job name new in
    each run attempt and the same in every worker."""
    if config.input_service is None:
        return None
    if all(source.by_index for source in training_sources.values()):
        raise ConfigError("input_service", "every training source here is read by index (npz, npy, ArrayRecord, "
                                           "arrays): each worker already reads only its share; leave it unset")
    given_from_python = [source for source in (config.datasets.values() if config.datasets else [config.dataset])
                         if hasattr(source, "element_spec")]
    if given_from_python and config.input_service != "local":
        # Measured: the service fails at the first batch ("Could not find callback with key=pyfunc_0").
        raise ConfigError("input_service", "a service in another process cannot run the Python functions a "
                                           "tf.data.Dataset given from Python may hold (from_generator, "
                                           "py_function); serve it with 'local' in one process")
    address = input_service.address_of(config.input_service)
    # A job keeps its position while the service lives: a restarted run must not continue an earlier attempt's.
    attempt = random.SystemRandom().randrange(1, 2 ** 31)
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):  # One number every worker agrees on.
        attempt = int(replicas.summed_over_workers(strategy)(tf.constant(attempt, tf.int64)))
    return batching.ServedBy(address=address, job_name=f"mto_tf-{attempt}")


def make_method(config: TrainConfig, setup: ModelSetup) -> weighting.Method:
    """--loss_weighting's method, for the model's outputs; a DWA period is a pass (with --epochs) or a window."""
    num_outputs = len(setup.losses.weights)  # The terms: trained outputs and extra terms.
    name = config.weighting.name
    if num_outputs < 2:
        raise ConfigError("loss_weighting", f"{name} weighs several outputs' losses; model "
                                            f"{setup.signature.model_name!r} has one to train")
    period_steps = (batching.steps_per_pass(setup.examples.count(), setup.pass_batch_size) if config.epochs
                    else config.log_every)
    return weighting.make_method(config.weighting, num_outputs=num_outputs, seed=config.seed,
                                 period_steps=period_steps)


def resolve_metric_identifiers(config: TrainConfig, signature: ModelSignature) -> dict[str, list]:
    """Each output's metrics as `compile` takes them: --metrics, or the built-in model's own (a user's: none)."""
    return metrics_lib.resolve_identifiers(_default_for(config, "metrics", {}), output_names=signature.output_names)


def _check_class_weight_outputs(config: TrainConfig, signature: ModelSignature) -> None:
    unknown = sorted(set(config.class_weights) - set(signature.output_names))
    if unknown:
        raise ConfigError("class_weights", f"unknown output {unknown[0]!r}; the model has outputs "
                                           f"{signature.output_names}")


def _default_for(config: TrainConfig, field: str, user_model_default):
    """`config.<field>`, or the built-in model's own when it is None."""
    value = getattr(config, field)
    if value is not None:
        return value
    spec = models.builtin_spec(config.model)
    return getattr(spec.for_config(config), field) if spec else user_model_default


def _resolve_losses(config: TrainConfig, signature: ModelSignature, labels_spec: dict[str, tf.TensorSpec],
                    weighted_outputs: tuple[str, ...]) -> Losses:
    """Each term (each trained output's loss, per example, and its reduction; each extra term) and its weight."""
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
    extra = _extra_terms(config, signature, labels_spec, weighted_outputs)
    for output in config.class_weights:
        if output not in trained:
            raise ConfigError("class_weights", f"output {output!r} has no loss (null in --losses): nothing to weigh")
    identifiers = {name: user_code.resolve_identifier(losses[name], output=name, flag="losses") if name in trained
                   else None for name in output_names}
    reduction = losses_lib.MEAN_WITH_SAMPLE_WEIGHT if config.loss_reduction == "mean_over_labelled" else None
    terms = {name: losses_lib.output_loss(identifiers[name], output=name, y_true=labels_spec[name],
                                          y_pred=signature.outputs[name], reduction=reduction) for name in trained}
    terms.update(extra)
    return Losses(identifiers=identifiers, terms=terms, weights=_resolve_weights(config, signature, terms))


def _resolve_weights(config: TrainConfig, signature: ModelSignature,
                     terms: dict[str, losses_lib.LossTerm]) -> dict[str, float | LearningRateSchedule]:
    """Each term's weight (a number, or a Keras schedule made from its config); every term must have one."""
    output_names = signature.output_names
    # Keras's default: every output counts once; so does an extra term (below).
    weights = _default_for(config, "loss_weights", {name: 1.0 for name in output_names})
    unknown = sorted(set(weights) - set(output_names) - set(terms))
    if unknown:
        raise ConfigError("loss_weights", f"unknown output {unknown[0]!r}; model {signature.model_name!r} has "
                                          f"outputs {sorted(output_names)}"
                                          + (f" and extra terms {sorted(config.extra_losses)}"
                                             if config.extra_losses else ""))
    if config.loss_weights is not None:  # Given: for the trained outputs, and those only.
        untrained = sorted(set(weights) - set(terms))
        if untrained:
            raise ConfigError("loss_weights", f"output {untrained[0]!r} has no loss (null in --losses): leave out "
                                              f"its weight")
    missing = [name for name in terms if name not in weights and name in output_names]
    if missing:
        raise ConfigError("loss_weights", f"no entry for output {missing[0]!r}; expected one for each of "
                                          f"{sorted(name for name in terms if name in output_names)}")
    return {name: _weight(name, weights.get(name, 1.0)) for name in terms}


def _weight(name: str, weight) -> float | LearningRateSchedule:
    """A number, or a Keras schedule (from its config, as `--learning_rate`'s is made)."""
    if isinstance(weight, LearningRateSchedule):
        return _checked_at_start(name, weight)
    if not isinstance(weight, dict):
        return float(weight)
    try:
        schedule = keras.optimizers.schedules.deserialize(weight)
    except Exception as error:  # Keras raises ValueError, TypeError, ... for unknown classes and bad configs.
        raise ConfigError("loss_weights", f"{name!r}: Keras cannot make a schedule of {weight!r} "
                                          f"({describe_error(error)})") from None
    if not isinstance(schedule, LearningRateSchedule):
        raise ConfigError("loss_weights", f"{name!r}: expected a keras.optimizers.schedules class, got "
                                          f"{type(schedule).__name__}")
    return _checked_at_start(name, schedule)


def _checked_at_start(name: str, schedule: LearningRateSchedule) -> LearningRateSchedule:
    """A schedule whose first weight is a finite number >= 0, as a constant weight must be (its later values
    are the schedule's own: a decay to 0 is fine)."""
    try:
        first = float(schedule(0))
    except Exception as error:  # The schedule's own code.
        raise ConfigError("loss_weights", f"{name!r}: the schedule fails at step 0 ({describe_error(error)})") from None
    if not (math.isfinite(first) and first >= 0):
        raise ConfigError("loss_weights", f"{name!r}: the schedule's weight at step 0 must be a finite number >= 0, "
                                          f"got {first}")
    return schedule


def _extra_terms(config: TrainConfig, signature: ModelSignature, labels_spec: dict[str, tf.TensorSpec],
                 weighted_outputs: tuple[str, ...]) -> dict[str, losses_lib.ExtraLoss]:
    """--extra_losses: each a term over several outputs, its name free, its function imported and tried."""
    terms = {}
    for name, function in config.extra_losses.items():
        if name in signature.output_names:
            raise ConfigError("extra_losses", f"{name!r} is an output of model {signature.model_name!r}; name the "
                                              f"term otherwise (it is logged as {name}_loss)")
        if isinstance(function, str):
            function = user_code.load_function(function, flag="extra_losses")
        terms[name] = losses_lib.ExtraLoss(name=name, function=function)
        _try_extra_term(terms[name], signature, labels_spec, weighted_outputs)
    return terms


def _try_extra_term(term: losses_lib.ExtraLoss, signature: ModelSignature, labels_spec: dict[str, tf.TensorSpec],
                    weighted_outputs: tuple[str, ...]) -> None:
    """Calls the term's function once on a batch of 2 zeros, with the sample weights batches hold (of
    `weighted_outputs`): it must take the three dicts and give 2 values."""
    def zeros(spec) -> tf.Tensor:
        return tf.zeros([2, *(1 if size is None else size for size in spec.shape[1:])], spec.dtype)

    labels = {name: zeros(spec) for name, spec in labels_spec.items()}
    predictions = {name: zeros(tf.TensorSpec(tensor.shape, tensor.dtype)) for name, tensor in signature.outputs.items()}
    described = f"{term.name}={getattr(term.function, '__module__', '?')}:{getattr(term.function, '__name__', '?')}"
    try:
        values = tf.convert_to_tensor(term.function(labels, predictions,
                                                    {name: tf.ones([2]) for name in weighted_outputs}))
    except Exception as error:  # The user's code: anything can go wrong.
        raise ConfigError("extra_losses", f"{described}: calling it with the (labels, predictions, "
                                          f"sample_weights) dicts raised {type(error).__name__}: "
                                          f"{first_line(error)}") from None
    if tuple(values.shape) != (2,) or not (values.dtype.is_floating or values.dtype.is_integer):
        raise ConfigError("extra_losses", f"{described}: expected one number per example (shape (2,) for a batch "
                                          f"of 2), got {values.dtype.name} of shape {tuple(values.shape)}")


def _check_no_losses_added_in_call(model: keras.Model, signature: ModelSignature) -> None:
    """With --datasets the model runs once per task in a step; a loss a layer adds in its call (`add_loss`, an
    activity regularizer) is kept by Keras only until the next call, so it would count for one task's forward
    alone. Such a model is refused (one call on zeros tells; weight regularizers are not call losses)."""
    before = len(model.losses)
    model({name: tf.zeros([1, *(1 if size is None else size for size in spec.shape[1:])], spec.dtype)
           for name, spec in signature.inputs.items()}, training=False)
    if len(model.losses) > before:
        raise ConfigError("datasets", f"model {signature.model_name!r} adds losses in its call (add_loss, an "
                                      f"activity_regularizer): with one dataset per task the model runs once per "
                                      f"task and Keras keeps only the last run's; train it on one --dataset")


def _check_missing_labels(config: TrainConfig, signature: ModelSignature,
                          labels_spec: dict[str, tf.TensorSpec]) -> None:
    """--missing_labels: known outputs, and nan for float labels only."""
    for output, value in config.missing_labels.items():
        if output not in signature.output_names:
            raise ConfigError("missing_labels", f"unknown output {output!r}; model {signature.model_name!r} has "
                                                f"outputs {sorted(signature.output_names)}")
        dtype = labels_spec[output].dtype
        if dtype.is_floating:
            continue  # Any number, or nan (an infinite one too, as a label may be).
        if not dtype.is_integer:
            raise ConfigError("missing_labels", f"output {output!r} has {dtype.name} labels: no value of them "
                                                f"can mean 'no label'; give those examples sample weight 0")
        low, high = (int(bound) for bound in (dtype.min, dtype.max))
        if not (float(value).is_integer() and low <= value <= high):
            raise ConfigError("missing_labels", f"output {output!r} has {dtype.name} labels; expected an integer "
                                                f"in [{low}, {high}], got {value}")


def _check_output_names(flag: str, mapping, signature: ModelSignature) -> None:
    unknown = sorted(set(mapping) - set(signature.output_names))
    if unknown:
        raise ConfigError(flag, f"unknown output {unknown[0]!r}; model {signature.model_name!r} has outputs "
                                f"{sorted(signature.output_names)}")
