"""The model compiled as `fit` compiles it: for `--loop=fit`, and for `model.keras` after the custom loop.

`compile` takes each loss and metric as the run resolved them, the loss
weights, and an optimizer; after the custom loop, `model.keras` is saved
compiled as `fit` would leave it (`compile_as_fit_saves`), so that
`keras.models.load_model` can `evaluate` it and go on training.
"""

from __future__ import annotations

import copy
import logging

import keras

from mto_tf.core import optimization
from mto_tf.run.setup import Run

logger = logging.getLogger(__name__)


def compile_model(run: Run, *, keras_defaults: bool = False, optimizer: keras.optimizers.Optimizer | None = None
                  ) -> None:
    """`model.compile` with the run's losses, weights, metrics and optimizer (or `optimizer`).

    With the run's steps per call and XLA setting, or, for comparison, with
    Keras's defaults for those two.
    """
    config, setup = run.config, run.setup
    weighted = set(setup.weighted_outputs)
    settings = {} if keras_defaults else dict(jit_compile=config.jit_compile, steps_per_execution=config.steps_per_loop)
    with setup.strategy.scope():
        setup.model.compile(
            optimizer=optimizer or run.optimizer,
            loss=_compiled_losses(run),
            # compile takes a number per output: the weights in force (an extra term is the custom loop's alone).
            loss_weights={name: weight for name, weight in run.loss_weights.numbers().items()
                          if name in setup.losses.identifiers},
            # An output with sample weights: its metrics weighted by them, as the custom loop's are, so that
            # they skip an unlabelled example (weight 0); compile's `metrics` would count it.
            metrics={name: [_configured(identifier, keras.metrics.get) for identifier in identifiers]
                     for name, identifiers in run.metrics.identifiers.items() if name not in weighted},
            weighted_metrics={name: [_configured(identifier, keras.metrics.get) for identifier in identifiers]
                              for name, identifiers in run.metrics.identifiers.items() if name in weighted},
            **settings,
        )


def _compiled_losses(run: Run) -> dict:
    """Each output's loss as `compile` takes it; with --loss_reduction=mean_over_labelled, Keras's own loss
    object for it, made with that reduction (so `fit` reduces as the custom loop does)."""
    losses = {}
    for name, identifier in run.setup.losses.identifiers.items():
        term = run.setup.losses.terms.get(name)
        if term is not None and run.config.loss_reduction == "mean_over_labelled":
            losses[name] = copy.copy(term.loss_fn)
            losses[name].reduction = term.reduction
        else:
            losses[name] = _configured(identifier, keras.losses.get)
    return losses


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
