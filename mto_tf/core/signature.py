"""The model's signature: its input and output names, shapes and dtypes, read once from the built model.

Everything that must agree with the model (the data checks, the input
pipeline, the losses and metrics, `--loop=fit`'s labels) is handed this one
object instead of asking the model again.

Names are the ones `fit` uses. A dict input or output is named by its key
(outputs sorted, as Keras flattens dicts), a list input by its
`keras.Input(name=...)`, a list output by its layer, as
`model.output_names` names it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import keras
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class ModelSignature:
    """A built model's inputs and outputs, by name; shapes include the batch dimension (None)."""

    model_name: str
    inputs: Mapping[str, tf.TensorSpec]  # In the model's order; a None size takes any size.
    outputs: Mapping[str, tf.TensorSpec]  # In the order `fit` names them.
    outputs_are_dict: bool  # The model returns a dict (else a list, in `outputs`' order).
    # With one dataset per task, a task's data is checked against the model's inputs and the task's outputs:
    # the other outputs' labels (and sample weights), if the data has them, are not the task's and are not read.
    other_outputs: tuple[str, ...] = ()

    @classmethod
    def of(cls, model: keras.Model) -> ModelSignature:
        """Reads the signature of a built functional model (whose names `names` found distinct)."""
        input_names, output_names = names(model)
        outputs_are_dict = isinstance(model.output, dict)
        inputs = [model.input[name] for name in input_names] if isinstance(model.input, dict) else model.inputs
        outputs = [model.output[name] for name in output_names] if outputs_are_dict else model.outputs
        return cls(model_name=model.name,
                   inputs={name: _spec(tensor) for name, tensor in zip(input_names, inputs, strict=True)},
                   outputs={name: _spec(tensor) for name, tensor in zip(output_names, outputs, strict=True)},
                   outputs_are_dict=outputs_are_dict)

    @property
    def input_names(self) -> list[str]:
        return list(self.inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self.outputs)

    def with_outputs(self, names) -> ModelSignature:
        """The signature a task's data must fit: the model's inputs, and only the outputs `names` (model order)."""
        return dataclasses.replace(self, outputs={name: spec for name, spec in self.outputs.items() if name in names},
                                   other_outputs=tuple(name for name in self.outputs if name not in names))

    def as_output_dict(self, outputs) -> dict:
        """The model's outputs (a dict or a list, as it was built) as a dict keyed by output name."""
        if isinstance(outputs, Mapping):
            return dict(outputs)
        return dict(zip(self.outputs, outputs, strict=True))


def names(model: keras.Model) -> tuple[list[str], list[str]]:
    """A built model's input and output names, as `fit` names them, repeats included (for checking them)."""
    inputs = list(model.input) if isinstance(model.input, dict) else [tensor.name for tensor in model.inputs]
    outputs = sorted(model.output) if isinstance(model.output, dict) else list(model.output_names)
    return inputs, outputs


def _spec(tensor: keras.KerasTensor) -> tf.TensorSpec:
    return tf.TensorSpec(tensor.shape, tensor.dtype)
