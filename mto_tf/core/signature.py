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

    @classmethod
    def of(cls, model: keras.Model) -> ModelSignature:
        """Reads the signature of a built functional model."""
        if isinstance(model.input, dict):
            inputs = dict(model.input)
        else:
            inputs = {tensor.name: tensor for tensor in model.inputs}
        outputs_are_dict = isinstance(model.output, dict)
        if outputs_are_dict:
            outputs = {name: model.output[name] for name in sorted(model.output)}
        else:
            outputs = dict(zip(model.output_names, model.outputs, strict=True))
        return cls(model_name=model.name, inputs={name: _spec(tensor) for name, tensor in inputs.items()},
                   outputs={name: _spec(tensor) for name, tensor in outputs.items()},
                   outputs_are_dict=outputs_are_dict)

    @property
    def input_names(self) -> list[str]:
        return list(self.inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self.outputs)

    def as_output_dict(self, outputs) -> dict:
        """The model's outputs (a dict or a list, as it was built) as a dict keyed by output name."""
        if isinstance(outputs, Mapping):
            return dict(outputs)
        return dict(zip(self.outputs, outputs, strict=True))


def _spec(tensor: keras.KerasTensor) -> tf.TensorSpec:
    return tf.TensorSpec(tensor.shape, tensor.dtype)
