"""Multi-output models: the built-in ones, a user's `MODULE:FUNCTION`, built once and checked.

A builder is called with no arguments and returns an uncompiled functional
`keras.Model` with two or more outputs. Inputs may be a dict or a list (a
list input is named by its `keras.Input(name=...)`), outputs a dict or a list
(a list output is named by its layer, as `model.output_names` names it;
a dict output by its key, as `fit` names it).
mto_tf never rebuilds the user's model: the weights file and `model.keras` it
writes are the user's model's own, and `--init_weights` reads a file saved
from the same builder. What the rest of mto_tf needs to know about the built
model is its signature (`signature.py`), read once here.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping

import keras

from mto_tf.config import TrainConfig, is_module_function
from mto_tf.core import architectures, signature, user_code
from mto_tf.core.signature import ModelSignature
from mto_tf.errors import ConfigError, describe_error, first_line

SHAPES3D_IMAGE_SHAPE = (64, 64, 3)
# TFDS shapes3d's labels and their number of classes.
SHAPES3D_LABELS = {"label_floor_hue": 10, "label_wall_hue": 10, "label_object_hue": 10, "label_scale": 8,
                   "label_shape": 4, "label_orientation": 15}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A built-in model: its builder, and its losses, weights and metrics (or, for a model whose outputs
    depend on its settings, functions of the config that give them: `for_config`).

    The settings a builder reads say so themselves (`only_for` in mto_tf/config.py).
    """

    build: Callable[[TrainConfig], keras.Model]
    losses: Mapping[str, str] | Callable[[TrainConfig], Mapping[str, str]]
    loss_weights: Mapping[str, float] | Callable[[TrainConfig], Mapping[str, float]]
    metrics: Mapping[str, tuple[str, ...]] | Callable[[TrainConfig], Mapping[str, tuple[str, ...]]]

    def for_config(self, config: TrainConfig) -> ModelSpec:
        """The losses, weights and metrics of the model `config` builds."""
        return dataclasses.replace(self, **{
            field: value(config) for field in ("losses", "loss_weights", "metrics")
            if callable(value := getattr(self, field))})


def build_headline(config: TrainConfig) -> keras.Model:
    """The two-output network of the Keras functional-API guide.

    `main_input` (token ids) -> Embedding -> LSTM, shared by both heads.
    `aux_output` reads the LSTM features alone; `main_output` reads them
    concatenated with `aux_input` through three Dense layers. The auxiliary
    loss therefore trains the shared trunk directly, and the main-only Dense
    layers only through what the trunk then feeds them.
    """
    regularizer = architectures.kernel_regularizer(config)
    main_input = keras.Input(shape=(config.sequence_length,), dtype="int32", name="main_input")
    aux_input = keras.Input(shape=(config.aux_input_dim,), dtype="float32", name="aux_input")

    embedded = keras.layers.Embedding(config.vocab_size, config.embedding_dim, name="embedding")(main_input)
    text_features = keras.layers.LSTM(config.lstm_units, kernel_regularizer=regularizer, name="lstm")(embedded)
    aux_output = keras.layers.Dense(1, activation="sigmoid", kernel_regularizer=regularizer,
                                    name="aux_output")(text_features)

    hidden = keras.layers.Concatenate(name="concatenate")([text_features, aux_input])
    for index in range(3):
        hidden = keras.layers.Dense(config.dense_units, activation="relu", kernel_regularizer=regularizer,
                                    name=f"main_dense_{index}")(hidden)
    main_output = keras.layers.Dense(1, activation="sigmoid", kernel_regularizer=regularizer,
                                     name="main_output")(hidden)

    return keras.Model(
        inputs={"main_input": main_input, "aux_input": aux_input},
        outputs={"main_output": main_output, "aux_output": aux_output},
        name="headline",
    )


def build_shapes3d_cnn(config: TrainConfig) -> keras.Model:
    """A small CNN for TFDS `shapes3d`: one softmax head per label on a shared trunk.

    The trunk has BatchNormalization (moving statistics that training
    updates, per replica unless `--sync_batchnorm`) and Dropout (random, so
    parity with `fit` needs the same seed): the two layers that behave
    differently in training and inference.
    """
    regularizer = architectures.kernel_regularizer(config)
    image = keras.Input(shape=SHAPES3D_IMAGE_SHAPE, dtype="float32", name="image")
    hidden = keras.layers.Rescaling(1 / 255, name="rescale")(image)
    for index, filters in enumerate((config.conv_filters, 2 * config.conv_filters)):
        hidden = keras.layers.Conv2D(filters, 3, strides=2, use_bias=False, kernel_regularizer=regularizer,
                                     name=f"conv_{index}")(hidden)
        hidden = keras.layers.BatchNormalization(synchronized=config.sync_batchnorm, name=f"batchnorm_{index}")(hidden)
        hidden = keras.layers.ReLU(name=f"relu_{index}")(hidden)
    hidden = keras.layers.GlobalAveragePooling2D(name="pool")(hidden)
    hidden = keras.layers.Dropout(config.dropout_rate, name="dropout")(hidden)
    hidden = keras.layers.Dense(config.dense_units, activation="relu", kernel_regularizer=regularizer,
                                name="shared_dense")(hidden)
    return keras.Model(
        inputs={"image": image},
        outputs={label: keras.layers.Dense(classes, activation="softmax", kernel_regularizer=regularizer,
                                           name=label)(hidden)
                 for label, classes in SHAPES3D_LABELS.items()},
        name="shapes3d_cnn",
    )


MODELS: dict[str, ModelSpec] = {
    "headline": ModelSpec(
        build=build_headline,
        losses={"main_output": "binary_crossentropy", "aux_output": "binary_crossentropy"},
        # The guide's weights: the auxiliary head is a regularizer for the
        # shared trunk, so it counts for a fifth.
        loss_weights={"main_output": 1.0, "aux_output": 0.2},
        metrics={"main_output": ("binary_accuracy",), "aux_output": ("binary_accuracy",)},
    ),
    "shapes3d_cnn": ModelSpec(
        build=build_shapes3d_cnn,
        losses={label: "sparse_categorical_crossentropy" for label in SHAPES3D_LABELS},
        loss_weights={label: 1.0 for label in SHAPES3D_LABELS},
        metrics={label: ("accuracy",) for label in SHAPES3D_LABELS},
    ),
    # Their outputs, and so their losses, weights and metrics, follow their settings.
    "inception_aux": ModelSpec(build=architectures.build_inception_aux, losses=architectures.inception_losses,
                               loss_weights=architectures.inception_loss_weights,
                               metrics=architectures.inception_metrics),
    "mmoe": ModelSpec(build=architectures.build_mmoe, losses=architectures.task_losses,
                      loss_weights=architectures.task_loss_weights, metrics=architectures.task_metrics),
    "shared_bottom": ModelSpec(build=architectures.build_shared_bottom, losses=architectures.task_losses,
                               loss_weights=architectures.task_loss_weights, metrics=architectures.task_metrics),
    "multi_lenet": ModelSpec(build=architectures.build_multi_lenet, losses=architectures.task_losses,
                             loss_weights=architectures.task_loss_weights, metrics=architectures.task_metrics),
}


def builtin_spec(model: object) -> ModelSpec | None:
    """The built-in model's spec, or None for a user's model."""
    return MODELS.get(model) if isinstance(model, str) else None


def build_model(config: TrainConfig) -> tuple[keras.Model, ModelSignature]:
    """Builds `config.model` once, seeded by `config.seed`, and reads its signature; call inside `strategy.scope()`.

    Raises:
      ConfigError: naming --model, for a builder that cannot be found, raises,
        or returns something other than a functional model with two or more outputs.
    """
    name = config.model if isinstance(config.model, str) else getattr(config.model, "__name__", repr(config.model))
    builder = _builder(config)
    # Seeds Python, NumPy and Keras together, so the same --seed gives the
    # same initial weights in the custom loop and in model.fit.
    keras.utils.set_random_seed(config.seed)
    try:
        model = builder()
    except Exception as error:  # The user's code: anything can go wrong.
        raise ConfigError("model", f"{name} raised {describe_error(error)}") from None
    _check_model(model, name)
    return model, ModelSignature.of(model)


def _builder(config: TrainConfig) -> Callable[[], keras.Model]:
    if callable(config.model):
        return config.model
    if is_module_function(config.model):
        return user_code.load_function(config.model, flag="model")
    spec = builtin_spec(config.model)
    if spec is None:
        raise ConfigError("model", f"expected one of {', '.join(MODELS)} or MODULE:FUNCTION; got {config.model!r}")
    return functools.partial(spec.build, config)


def _check_model(model: object, name: str) -> None:
    if not isinstance(model, keras.Model):
        raise ConfigError("model", f"{name} returned a {type(model).__name__}, expected a keras.Model")
    try:
        outputs = model.outputs
    except (AttributeError, ValueError):
        outputs = None
    if not outputs:
        raise ConfigError("model", f"{name} returned a model whose outputs are unknown before it is called; "
                                   f"expected a functional keras.Model built from keras.Input")
    inputs, names = signature.names(model)
    if len(names) < 2:
        raise ConfigError("model", f"{name} returned a model with one output {names}; expected two or more "
                                   f"named outputs (mto_tf trains multi-output models)")
    if len(set(names)) != len(names) or len(set(inputs)) != len(inputs):
        raise ConfigError("model", f"{name} returned a model whose inputs or outputs share a name "
                                   f"(inputs {inputs}, outputs {names}); give each its own")


def load_weights(model: keras.Model, path: str, *, flag: str) -> None:
    """Loads a `.weights.h5` file into `model`; one that does not fit is an error naming `flag`."""
    try:
        model.load_weights(path)
    except (ValueError, OSError, KeyError) as error:
        raise ConfigError(flag, f"{path!r} does not fit model {model.name!r}: {first_line(error)}") from None
