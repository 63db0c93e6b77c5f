"""Per-output class weights, which `fit` refuses for any model with several outputs.

Reference: `fit` with per-output sample weights made from the class weights
by Keras's own conversion for one output
(`keras.src.trainers.data_adapters.data_adapter_utils.class_weight_to_sample_weights`).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl.testing import flagsaver
from keras.src.trainers.data_adapters.data_adapter_utils import class_weight_to_sample_weights

from helpers import max_weight_difference, run_config
from mto_tf import train
from mto_tf.core import losses
from mto_tf.errors import ConfigError
from mto_tf.programs import flags as mto_flags

NUM_EXAMPLES, BATCH = 48, 16
CLASS_WEIGHTS = {"kind": {0: 0.5, 2: 4.0}, "flag": {1: 3.0}}  # Class 1 of "kind" keeps 1.0.
LOSSES = {"kind": "sparse_categorical_crossentropy", "flag": "binary_crossentropy"}
# Class weights become sample weights in the input pipeline: the same
# float32 operations as fit's; only the two replicas' sums differ in order.
WEIGHT_ATOL = 1e-6


def build():
    """Two heads on one Dense trunk: 3 classes (sparse ids) and a binary flag."""
    features = keras.Input(shape=(4,), name="features")
    trunk = keras.layers.Dense(8, activation="relu", name="trunk")(features)
    return keras.Model({"features": features}, {"kind": keras.layers.Dense(3, activation="softmax", name="kind")(trunk),
                                  "flag": keras.layers.Dense(1, activation="sigmoid", name="flag")(trunk)})


def _arrays():
    rng = np.random.default_rng(3)
    return {"features": rng.standard_normal((NUM_EXAMPLES, 4)).astype(np.float32),
            "kind": rng.integers(0, 3, NUM_EXAMPLES).astype(np.int32),
            "flag": rng.integers(0, 2, (NUM_EXAMPLES, 1)).astype(np.float32),
            "flag_weight": rng.uniform(0.0, 2.0, NUM_EXAMPLES).astype(np.float32)}


def _dataset(arrays, sample_weights):
    labels = {"kind": arrays["kind"], "flag": arrays["flag"]}
    return tf.data.Dataset.from_tensor_slices(({"features": arrays["features"]}, labels, sample_weights))


@pytest.mark.slow
@pytest.mark.parametrize("strategy_name", ["default", "mirrored"])
def test_class_weights_equal_fit_with_the_sample_weights_they_stand_for(tmp_path, strategy_name, mirrored_strategy):
    arrays = _arrays()
    keras.utils.set_random_seed(0)
    init = build()
    init.save_weights(tmp_path / "init.weights.h5")
    # The flag's own sample weights stay: class weights multiply them.
    config = run_config(tmp_path, model=build, dataset=_dataset(arrays, {"flag": arrays["flag_weight"]}),
                        losses=LOSSES, class_weights=CLASS_WEIGHTS, init_weights=str(tmp_path / "init.weights.h5"),
                        batch_size=BATCH, train_steps=6)
    strategy = mirrored_strategy if strategy_name == "mirrored" else tf.distribute.get_strategy()
    custom = train(config, strategy=strategy).model.get_weights()

    reference = build()
    reference.load_weights(tmp_path / "init.weights.h5")
    reference.compile(optimizer=keras.optimizers.SGD(config.learning_rate), loss=LOSSES)
    sample_weights = {"kind": class_weight_to_sample_weights(arrays["kind"], CLASS_WEIGHTS["kind"]),
                      "flag": class_weight_to_sample_weights(arrays["flag"], CLASS_WEIGHTS["flag"])
                      * arrays["flag_weight"]}
    reference.fit(_dataset(arrays, sample_weights).repeat().batch(BATCH), epochs=1, steps_per_epoch=6,
                  shuffle=False, verbose=0)
    assert max_weight_difference(custom, reference.get_weights()) <= WEIGHT_ATOL
    # The class weights mattered: without them the weights end elsewhere.
    unweighted = build()
    unweighted.load_weights(tmp_path / "init.weights.h5")
    unweighted.compile(optimizer=keras.optimizers.SGD(config.learning_rate), loss=LOSSES)
    unweighted.fit(_dataset(arrays, {"kind": np.ones(NUM_EXAMPLES, np.float32), "flag": arrays["flag_weight"]})
                   .repeat().batch(BATCH), epochs=1, steps_per_epoch=6, shuffle=False, verbose=0)
    assert max_weight_difference(custom, unweighted.get_weights()) > 1e-3


@pytest.mark.keras_behaviour
def test_fit_refuses_class_weights_for_several_outputs():
    arrays = _arrays()
    model = build()
    model.compile(loss=LOSSES)
    labels = {"kind": arrays["kind"], "flag": arrays["flag"]}
    with pytest.raises(ValueError, match="`class_weight` is only supported for Models with a single output"):
        model.fit({"features": arrays["features"]}, labels, class_weight={0: 1.0, 1: 2.0}, verbose=0)


@pytest.mark.parametrize("labels", [
    np.array([0, 1, 1, 0], np.float32),                     # Binary, (N,).
    np.array([[1], [0], [1], [1]], np.float32),             # Binary, (N, 1).
    np.array([2, 0, 1, 2], np.int32),                       # Class ids.
    np.eye(3, dtype=np.float32)[[2, 0, 1, 1]],              # One-hot: the argmax.
])
def test_each_label_form_reads_its_class_as_keras_does(labels):
    class_weights = {0: 0.5, 1: 2.0, 2: 7.0}
    table = tf.constant([class_weights[class_id] for class_id in range(3)])
    np.testing.assert_array_equal(losses.class_weights_of(tf.constant(labels), table),
                                  class_weight_to_sample_weights(labels, class_weights))


@pytest.mark.parametrize("text, message", [
    ('{"kinds": {"0": 1.0}}', "unknown output 'kinds'"),
    ('{"kind": {"3": 1.0}}', "output 'kind' produces classes 0 to 2"),
    ('{"flag": {"2": 1.0}}', "output 'flag' produces classes 0 to 1"),
    ('{"kind": {"0": -1.0}}', "finite number >= 0"),
    ('{"kind": {"0": NaN}}', "finite number >= 0"),
    ('{"kind": {"zero": 1.0}}', "not an integer class id"),
    ('{"kind": [1.0, 2.0]}', "expected"),
    ('kind=1', "not valid JSON"),
])
def test_bad_class_weights_are_one_error_naming_the_flag_and_write_nothing(tmp_path, text, message):
    arrays = _arrays()
    with flagsaver.flagsaver():
        mto_flags.FLAGS(["mto-train", f"--class_weights={text}"])
        with pytest.raises(ConfigError, match=f"^--class_weights: .*{message}"):
            class_weights = mto_flags.config_from_flags().class_weights
            train(run_config(tmp_path, model=build, dataset=_dataset(arrays, {"flag": arrays["flag_weight"]}),
                             losses=LOSSES, class_weights=class_weights))
    assert not (tmp_path / "run").exists()
