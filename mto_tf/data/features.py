"""Does a dataset fit the model? One check for every source (npz, TFDS, a Python dataset).

A source describes each example by name: the model's input names, its output
names (labels) and `sample_weight/<output>`. Inputs must have the model's
shape, where the model fixes a size (`None` takes any); labels the output's
shape, or one dimension less for class ids (`(N,)` ids for `(batch, K)`
softmax outputs, or for `(batch, 1)` sigmoid outputs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import tensorflow as tf

from mto_tf.core.signature import ModelSignature
from mto_tf.errors import ConfigError

SAMPLE_WEIGHT_PREFIX = "sample_weight/"


def expected_keys(signature: ModelSignature) -> list[str]:
    """Every name a dataset may provide: inputs, outputs, and each output's sample weight (another task's
    outputs too: one file may feed several tasks)."""
    outputs = [*signature.output_names, *signature.other_outputs]
    return [*signature.input_names, *outputs, *(SAMPLE_WEIGHT_PREFIX + name for name in outputs)]


def check(specs: Mapping[str, tf.TensorSpec], signature: ModelSignature, *, flag: str,
          where: Callable[[str], str]) -> None:
    """Raises a `ConfigError` naming `flag` and `where(key)` unless `specs` fit the model's `signature`.

    Args:
      specs: each key's per-example shape and dtype (no batch dimension).
      signature: the built model's.
      flag: the flag the user has to change (`dataset`, `feature_map`).
      where: how the error names a key, e.g. `npz file 'd.npz', key 'x'`.
    """

    def fail(key: str, message: str):
        raise ConfigError(flag, f"{where(key)}: {message}")

    for name, tensor in signature.inputs.items():
        if name not in specs:
            fail(name, f"missing; model {signature.model_name!r} needs input {name!r} {_shape_text(tensor.shape[1:])}")
        spec = specs[name]
        if not _fits(spec.shape, tensor.shape[1:]):
            fail(name, f"expected per-example shape {_shape_text(tensor.shape[1:])} for input {name!r}, "
                       f"got {_shape_text(spec.shape)}")
        if tf.as_dtype(tensor.dtype).is_integer and not spec.dtype.is_integer:
            fail(name, f"expected integers for input {name!r} ({tensor.dtype.name}), got {spec.dtype.name}")
    for name, tensor in signature.outputs.items():
        if name not in specs:
            fail(name, f"missing; model {signature.model_name!r} needs labels for output {name!r}")
        output_shape, label_shape = tensor.shape[1:], specs[name].shape
        if not _label_fits(label_shape, output_shape):
            fail(name, f"expected labels of per-example shape {_shape_text(output_shape)} for output {name!r} "
                       f"(or {_shape_text(output_shape[:-1])} class ids), got {_shape_text(label_shape)}")
        _check_number(specs[name], fail, name)
        weight_key = SAMPLE_WEIGHT_PREFIX + name
        if weight_key in specs:
            if specs[weight_key].shape.rank not in (0, 1) or specs[weight_key].shape.num_elements() not in (1, None):
                fail(weight_key, f"expected one sample weight per example, got shape "
                                 f"{_shape_text(specs[weight_key].shape)}")
            _check_number(specs[weight_key], fail, weight_key)
    unexpected = sorted(set(specs) - set(expected_keys(signature)))
    if unexpected:
        fail(unexpected[0], f"not an input, an output or {SAMPLE_WEIGHT_PREFIX}<output> of model "
                            f"{signature.model_name!r} (inputs {signature.input_names}, outputs "
                            f"{signature.output_names})")


def _check_number(spec: tf.TensorSpec, fail, key: str) -> None:
    if not (spec.dtype.is_integer or spec.dtype.is_floating or spec.dtype == tf.bool):
        fail(key, f"expected numbers, got {spec.dtype.name}")


def _fits(shape: tf.TensorShape, wanted: tf.TensorShape) -> bool:
    """Same rank, and equal sizes wherever both are known."""
    return shape.rank == len(wanted) and all(
        size is None or want is None or size == want for size, want in zip(shape, wanted))


def _label_fits(label: tf.TensorShape, output: tuple) -> bool:
    if not output:  # A (batch,) output: one number per example.
        return label.rank == 0
    if label.rank == len(output):
        # The last size may be 1 against K > 1: class ids in a column, as Keras accepts them.
        return _fits(label[:-1], output[:-1]) and label[-1] in (output[-1], 1, None)
    return label.rank == len(output) - 1 and _fits(label, output[:-1])


def _shape_text(shape) -> str:
    sizes = ["None" if size is None else str(size) for size in tf.TensorShape(shape)]
    return "(" + ", ".join(sizes) + ("," if len(sizes) == 1 else "") + ")"
