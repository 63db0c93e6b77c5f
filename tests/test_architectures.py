"""The field's networks built in: GoogLeNet-style auxiliary classifiers (`inception_aux`), MMoE and its
shared-bottom baseline, and the MultiLeNet of two-digit benchmarks. Each builds at tiny sizes, trains a few
steps, and `mto-explain` takes its gradient apart; the heads and their loss weights are read from the built
model and its resolved losses."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import run_config
from mto_tf.core import architectures
from mto_tf.programs import explain
from mto_tf.run.model_setup import build_model_setup

TINY = {
    "inception_aux": dict(inception_filters=2, image_size=6, aux_head_units=4),
    "mmoe": dict(features_dim=4, num_experts=3, expert_units=4, tower_units=2),
    "shared_bottom": dict(features_dim=4, expert_units=4, tower_units=2),
    "multi_lenet": dict(image_size=6, conv_filters=2, dense_units=4, tower_units=2, task_classes=10),
}
IMAGE_MODELS = ("inception_aux", "multi_lenet")
NUM_EXAMPLES = 24


def write_data(path, model: str, outputs: list[str]):
    """Random inputs and labels the model takes: 6 x 6 images of pixels 0..255 and class ids, or 4 features and
    numbers."""
    rng = np.random.default_rng(0)
    if model in IMAGE_MODELS:
        label = rng.integers(0, 10, NUM_EXAMPLES)  # inception_aux: every head predicts the same label.
        arrays = {"image": rng.integers(0, 256, (NUM_EXAMPLES, 6, 6, 1)).astype(np.uint8),  # As images are.
                  **{name: label if model == "inception_aux" else rng.integers(0, 10, NUM_EXAMPLES)
                     for name in outputs}}
    else:
        arrays = {"features": rng.standard_normal((NUM_EXAMPLES, 4)).astype(np.float32),
                  **{name: rng.standard_normal((NUM_EXAMPLES, 1)).astype(np.float32) for name in outputs}}
    np.savez(path, **arrays)
    return f"npz:{path}"


def config_of(tmp_path, model: str, **settings):
    outputs = (architectures.inception_output_names(run_config(tmp_path, model=model, **settings))
               if model == "inception_aux" else ["task_a", "task_b"])
    dataset = write_data(tmp_path / f"{model}.npz", model, outputs)
    return run_config(tmp_path, model=model, dataset=dataset, train_steps=3, **TINY[model], **settings)


@pytest.mark.parametrize("variant, heads", [("v1", {"aux_1": 0.3, "aux_2": 0.3}), ("v3", {"aux_1": 0.4})])
def test_inception_aux_has_the_papers_auxiliary_heads_and_weights(tmp_path, variant, heads):
    setup = build_model_setup(config_of(tmp_path, "inception_aux", inception_variant=variant),
                              tf.distribute.get_strategy())
    assert sorted(setup.signature.output_names) == sorted(["main_output", *heads])
    assert setup.loss_weights.numbers() == {"main_output": 1.0, **heads}
    for head in heads:  # Each predicts the main label: a softmax over the same classes.
        assert setup.model.get_layer(head).units == setup.model.get_layer("main_output").units == 10
    head_layers = [layer for layer in setup.model.layers if layer.name.startswith("aux_1")]
    has_batchnorm = any(isinstance(layer, keras.layers.BatchNormalization) for layer in head_layers)
    assert has_batchnorm == (variant == "v3")  # v3's "BN-auxiliary".
    # GoogLeNet's heads sit on modules 4a and 4d; v3's at the end of the stage (4e).
    sources = {"v1": {"aux_1": "module_4a", "aux_2": "module_4d"}, "v3": {"aux_1": "module_4e"}}[variant]
    for head, module in sources.items():
        assert setup.model.get_layer(f"{head}_pool").input is setup.model.get_layer(module).output, head


def test_each_mmoe_gate_is_a_softmax_over_the_experts_and_the_baseline_shares_one_layer(tmp_path):
    mmoe = build_model_setup(config_of(tmp_path, "mmoe"), tf.distribute.get_strategy()).model
    features = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    for task in ("task_a", "task_b"):
        gate = keras.Model(mmoe.inputs, mmoe.get_layer(f"{task}_gate").output)({"features": features})
        np.testing.assert_allclose(np.sum(gate, axis=1), 1.0, rtol=1e-6)  # A mixture's weights.
        assert gate.shape == (5, 3)
    baseline = build_model_setup(config_of(tmp_path, "shared_bottom"), tf.distribute.get_strategy()).model
    assert [layer.name for layer in baseline.layers if "bottom" in layer.name] == ["shared_bottom"]
    assert not any("gate" in layer.name or "expert" in layer.name for layer in baseline.layers)


# A layer every output's loss reaches, and one only a given output's reaches, in each model.
SHARED_LAYER = {"inception_aux": "stem", "mmoe": "expert_0", "shared_bottom": "shared_bottom",
                "multi_lenet": "shared_conv_1"}
OWN_LAYER = {"inception_aux": {"main_output": "module_5a_1x1", "aux_1": "aux_1_dense"},
             "mmoe": {"task_a": "task_a_gate", "task_b": "task_b_gate"},
             "shared_bottom": {"task_a": "task_a_tower", "task_b": "task_b_tower"},
             "multi_lenet": {"task_a": "task_a_tower", "task_b": "task_b_tower"}}


def _trains_and_explains(tmp_path, model, *, explains=True, **settings):
    from mto_tf import train

    config = config_of(tmp_path, model, **settings)
    result = train(config)
    assert len(result.history) == 3 and all(np.isfinite(record["loss"]) for record in result.history)
    if not explains:
        return
    report = explain.explain(config, strategy=tf.distribute.get_strategy(), explain_batches=1)
    layers = {layer["name"]: layer for layer in report["layers"]}
    outputs = sorted(result.model.output_names)
    # Every output's loss reaches the shared layer; its shares of that layer's gradient add up to one.
    assert layers[SHARED_LAYER[model]]["reached_by"] == outputs
    assert sum(layers[SHARED_LAYER[model]]["share"].values()) == pytest.approx(1.0, abs=1e-5)
    for output, layer in OWN_LAYER[model].items():  # A head's own layers: its loss alone.
        assert layers[layer]["reached_by"] == [output], (layer, layers[layer]["reached_by"])


def test_mmoe_trains_and_mto_explain_takes_its_gradient_apart(tmp_path):
    _trains_and_explains(tmp_path, "mmoe")


@pytest.mark.slow  # The other models trained and explained; the inner loop keeps mmoe's.
@pytest.mark.parametrize("model, settings", [
    ("inception_aux", {}), ("shared_bottom", {}), ("multi_lenet", {}),
    # v3 only adds batch normalization and factorized branches to the same heads: trained, not explained again
    # (tracing its hundred layers for the report costs 15 s here).
    ("inception_aux", {"inception_variant": "v3", "explains": False})],
    ids=["inception v1", "shared", "multi_lenet", "inception v3"])
def test_each_other_model_trains_and_mto_explain_takes_its_gradient_apart(tmp_path, model, settings):
    _trains_and_explains(tmp_path, model, **settings)


def test_multi_lenet_shares_its_encoder_and_gives_each_task_a_softmax_tower(tmp_path):
    model = build_model_setup(config_of(tmp_path, "multi_lenet"), tf.distribute.get_strategy()).model
    shared = ["shared_conv_1", "shared_conv_2", "shared_dense"]
    # The second convolution has twice the first's filters (Sener and Koltun's 10 and 20).
    assert [model.get_layer(name).kernel.shape[-1] for name in shared] == [2, 4, 4]
    for task in ("task_a", "task_b"):
        assert model.get_layer(f"{task}_tower").input is model.get_layer("shared_dense").output
        assert model.get_layer(task).units == 10 and model.get_layer(task).activation is keras.activations.softmax
    # Its poolings pad: an image of any size is encoded (a 3 x 3 one would fail to pool twice unpadded).
    small = architectures.build_multi_lenet(run_config(tmp_path, model="multi_lenet", image_size=3, task_classes=10))
    assert small({"image": np.zeros((2, 3, 3, 1), np.float32)})["task_a"].shape == (2, 10)


@pytest.mark.parametrize("settings, message", [
    (dict(task_classes=-1), r"^--task_classes: expected 0 \(regression\) or a number of classes > 0, got -1"),
    (dict(task_outputs="task_a"), r"^--task_outputs: expected two or more distinct names joined by ','"),
], ids=["negative classes", "one task"])
def test_bad_mmoe_settings_are_refused_naming_the_flag(tmp_path, settings, message):
    from mto_tf.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        run_config(tmp_path, model="mmoe", **settings)
