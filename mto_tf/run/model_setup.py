"""What training, `mto-explain` and `mto-evaluate` share: the model, its data, its losses, checked as they are built.

`build_model_setup` builds the model (in the strategy's scope), reads its
signature, loads the training data and resolves each output's loss and
weight; every setting is checked against the built model before anything
is written. `run/setup.py` adds what training needs.
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from mto_tf.config import TrainConfig
from mto_tf.core import losses as losses_lib
from mto_tf.core import metrics as metrics_lib
from mto_tf.core import models, optimization, user_code, weighting
from mto_tf.core.objective import Objective
from mto_tf.core.signature import ModelSignature
from mto_tf.core.strategy import check_batch_split
from mto_tf.data import batching, sources
from mto_tf.data.examples import Examples
from mto_tf.errors import ConfigError


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
    def objective(self) -> Objective:
        """The model and its total loss's parts, as the train step, the evaluation and the gradient shares read them."""
        return Objective(model=self.model, signature=self.signature, loss_fns=self.losses.per_example,
                         loss_weights=self.losses.weights)

    @property
    def loss_names(self) -> list[str]:
        """What the train step measures: the total loss, then each trained output's loss, named as `fit` names them."""
        return self.losses.names


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


def make_method(config: TrainConfig, setup: ModelSetup) -> weighting.Method:
    """--loss_weighting's method, for the model's outputs; a DWA period is a pass (with --epochs) or a window."""
    num_outputs = len(setup.losses.weights)  # The trained outputs.
    name = config.weighting.name
    if num_outputs < 2:
        raise ConfigError("loss_weighting", f"{name} weighs several outputs' losses; model "
                                            f"{setup.signature.model_name!r} has one to train")
    period_steps = (batching.steps_per_pass(setup.examples.count(), config.batch_size) if config.epochs
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
