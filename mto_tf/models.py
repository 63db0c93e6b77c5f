"""Registry of multi-output model builders.

A builder takes a `TrainConfig` and returns a Keras functional model whose
inputs and outputs are dicts keyed by name. Dict outputs matter: Keras 3
resolves per-output losses, loss weights and sample weights by output name,
and with list outputs dict sample weights fail inside `compile_utils`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras

from mto_tf.config import ConfigError, TrainConfig


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the rest of mto_tf needs to know about a model before building it."""

    build: Callable[[TrainConfig], keras.Model]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]


def build_headline(config: TrainConfig) -> keras.Model:
    """The two-output network of the Keras functional-API guide.

    `main_input` (token ids) -> Embedding -> LSTM, shared by both heads.
    `aux_output` reads the LSTM features alone; `main_output` reads them
    concatenated with `aux_input` through three Dense layers. The auxiliary
    loss therefore trains the shared trunk directly, and the main-only Dense
    layers only through what the trunk then feeds them.
    """
    regularizer = keras.regularizers.L2(config.l2) if config.l2 else None
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


MODELS: dict[str, ModelSpec] = {
    "headline": ModelSpec(
        build=build_headline,
        input_names=("main_input", "aux_input"),
        output_names=("main_output", "aux_output"),
    ),
}


def get_spec(name: str) -> ModelSpec:
    """Returns the registered `ModelSpec` called `name`."""
    if name not in MODELS:
        raise ConfigError("model", f"expected one of {', '.join(MODELS)}; got {name!r}")
    return MODELS[name]


def build_model(config: TrainConfig) -> keras.Model:
    """Builds `config.model` with weights seeded by `config.seed`."""
    # Seeds Python, NumPy and Keras together, so the same --seed gives the
    # same initial weights in the custom loop and in model.fit.
    keras.utils.set_random_seed(config.seed)
    return get_spec(config.model).build(config)
