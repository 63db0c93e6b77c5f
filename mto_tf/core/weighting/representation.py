"""`--weighting_gradients=representation:LAYER`: the Gramian of the outputs' gradients of one layer's output (MGDA-UB).

Sener and Koltun 2018 (section 3.3): with `z` the output of the layers all
outputs share, each output's gradient of `z` over the whole batch (the
per-example gradients, flattened) is cheap, its Gramian bounds the one of
the shared weights, and one backward pass of `sum_k a_k dL_k/dz` through
the trunk gives the update of every weight before `z`. Under a strategy
each replica holds the gradients of its own examples: the global Gramian
is the SUM of the replicas' Gramians (the flattened global gradient is the
replicas' ones side by side), and the trunk's gradients are summed as usual.
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from mto_tf.core.replicas import summed_over_replicas
from mto_tf.core.weighting import gramian
from mto_tf.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Representation:
    """The layer whose output the gradients are taken of, and how to reach it."""

    layer_name: str
    probe: keras.Model  # The model's inputs -> [the layer's output, the model's outputs], on the same layers.
    trunk: list  # The weights the layer's output depends on: updated by one backward pass of the combination.


def make_representation(model: keras.Model, layer_name: str) -> Representation:
    """The probe of `layer_name`'s output; ConfigError naming --weighting_gradients if it cannot be had."""
    flag = "weighting_gradients"
    names = [layer.name for layer in model.layers]
    if layer_name not in names:
        raise ConfigError(flag, f"model {model.name!r} has no layer {layer_name!r}; its layers: {', '.join(names)}")
    try:  # A functional model's graph: a subclassed model has no symbolic inputs or layer outputs.
        output = model.get_layer(layer_name).output
        probe = keras.Model(model.inputs, [output, model.output])
    except (AttributeError, ValueError, TypeError):
        raise ConfigError(flag, f"representation:{layer_name} reads a layer's output inside the model: it needs a "
                                f"functional keras.Model, and {model.name!r} is not one") from None
    if not isinstance(output, keras.KerasTensor):
        raise ConfigError(flag, f"layer {layer_name!r} has several outputs; name a layer with one")
    trunk = keras.Model(model.inputs, output).trainable_variables
    if not trunk:
        raise ConfigError(flag, f"no trainable weight comes before layer {layer_name!r}'s output")
    return Representation(layer_name=layer_name, probe=probe, trunk=trunk)


def gradients_through_representation(*, tape: tf.GradientTape, representation: Representation, z: tf.Tensor,
                                     scaled_losses: list[tf.Tensor], variables: list) -> tuple:
    """The Gramian of the outputs' gradients of `z`, and `update(a)`: the gradients of `variables` for weights `a`.

    Weights after `z` (the heads, or layers some outputs share after it)
    get `sum_k a_k g_k` over the outputs that reach them; the trunk gets one
    backward pass of `sum_k a_k dL_k/dz`. Everything is summed over replicas.
    """
    trunk_ids = {id(v) for v in representation.trunk}
    after = [v for v in variables if id(v) not in trunk_ids]
    representation_gradients, after_gradients = [], []
    for loss in scaled_losses:
        dz, *rest = tape.gradient(loss, [z, *after])  # A backward pass through this output's layers after z only.
        representation_gradients.append(tf.zeros_like(z) if dz is None else dz)
        after_gradients.append(rest)
    flat = tf.cast(tf.stack([tf.reshape(g, [-1]) for g in representation_gradients]), tf.float64)
    gram = summed_over_replicas(tf.matmul(flat, flat, transpose_b=True))
    reached_by = [[k for k, row in enumerate(after_gradients) if row[v] is not None] for v in range(len(after))]
    heads = gramian.all_reduced(gramian.OutputGradients(
        shared=[v for v, outputs in enumerate(reached_by) if len(outputs) > 1],
        own={v: outputs[0] for v, outputs in enumerate(reached_by) if len(outputs) == 1}, per_output=after_gradients))

    def update(weights: tf.Tensor) -> list:
        combined_dz = tf.add_n([tf.cast(a, g.dtype) * g for a, g in zip(tf.unstack(weights), representation_gradients)])
        trunk_gradients = summed_over_replicas(tape.gradient(z, representation.trunk, output_gradients=combined_dz))
        by_id = dict(zip((id(v) for v in representation.trunk), trunk_gradients))
        after_by_index = dict(zip(heads.shared, gramian.combined(gramian.shared_blocks(heads, after), weights)))
        after_by_index.update({v: heads.per_output[output][v] for v, output in heads.own.items()})
        after_index = {id(v): i for i, v in enumerate(after)}
        return [by_id[id(v)] if id(v) in by_id else after_by_index.get(after_index[id(v)]) for v in variables]

    return gram, update
