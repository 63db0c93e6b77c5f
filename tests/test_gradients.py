"""The seed fact of multi-output training, and the loss against the mathematics.

One gradient of the weighted total equals the weighted sum of the per-output
gradients; the auxiliary loss reaches the shared trunk (embedding, LSTM) and
never the main-only Dense layers.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import small_config
from mto_tf.core import losses
from mto_tf.core.models import build_headline

MAIN_ONLY_LAYERS = ("main_dense_0", "main_dense_1", "main_dense_2", "main_output")
SHARED_LAYERS = ("embedding", "lstm")
W_MAIN, W_AUX = 0.7, 0.3


def _batch(batch_size=16, seed=0):
    rng = np.random.default_rng(seed)
    inputs = {"main_input": tf.constant(rng.integers(0, 50, (batch_size, 8)), tf.int32),
              "aux_input": tf.constant(rng.standard_normal((batch_size, 5)), tf.float32)}
    labels = {name: tf.constant(rng.integers(0, 2, (batch_size, 1)), tf.float32)
              for name in ("main_output", "aux_output")}
    return inputs, labels


def _bce(model, output):
    spec = tf.TensorSpec((16, 1), tf.float32)
    return losses.output_loss("binary_crossentropy", output=output, y_true=spec, y_pred=model.output[output])


def _output_losses(terms, labels, predictions, sample_weights, *, divisors):
    """Each term's value, its sums divided by the given GLOBAL divisors, through the library's own functions."""
    sums = {name: losses.replica_sums(term, labels, predictions, sample_weights) for name, term in terms.items()}
    return {name: losses.reduced(part.weighted_sum, divisors.get(name), terms[name].reduction)
            for name, part in sums.items()}


def _gradients(model, inputs, labels, loss_weights):
    """Gradient of sum_i w_i * loss_i, through the library's own loss functions."""
    terms = {name: _bce(model, name) for name in labels}
    with tf.GradientTape() as tape:
        predictions = model(inputs, training=True)
        output_losses = _output_losses(terms, labels, predictions, {}, divisors={name: 16.0 for name in labels})
        total = losses.weighted_total_loss(output_losses=output_losses, loss_weights=loss_weights,
                                           regularization_losses=[])
    gradients = tape.gradient(total, model.trainable_variables, unconnected_gradients="zero")
    return {variable.path: tf.convert_to_tensor(gradient).numpy()
            for variable, gradient in zip(model.trainable_variables, gradients)}


def test_gradient_of_total_is_weighted_sum_of_per_output_gradients(tmp_path):
    model = build_headline(small_config(tmp_path))
    inputs, labels = _batch()
    total = _gradients(model, inputs, labels, {"main_output": W_MAIN, "aux_output": W_AUX})
    main_only = _gradients(model, inputs, labels, {"main_output": 1.0, "aux_output": 0.0})
    aux_only = _gradients(model, inputs, labels, {"main_output": 0.0, "aux_output": 1.0})

    for path, gradient in total.items():
        # Linearity of the derivative; float32 rounding of the two orders of
        # summation allows a few ulps.
        np.testing.assert_allclose(gradient, W_MAIN * main_only[path] + W_AUX * aux_only[path],
                                   rtol=1e-5, atol=1e-7, err_msg=path)


def test_aux_loss_gives_zero_gradient_to_main_only_layers_and_nonzero_to_the_shared_trunk(tmp_path):
    model = build_headline(small_config(tmp_path))
    inputs, labels = _batch()
    aux_only = _gradients(model, inputs, labels, {"main_output": 0.0, "aux_output": 1.0})

    for layer_name in MAIN_ONLY_LAYERS:
        for variable in model.get_layer(layer_name).trainable_variables:
            # Exactly zero: aux_output does not depend on these weights at all.
            assert not np.any(aux_only[variable.path]), variable.path
    for layer_name in SHARED_LAYERS:
        for variable in model.get_layer(layer_name).trainable_variables:
            assert np.any(aux_only[variable.path]), variable.path
    # And the auxiliary head itself is trained by its own loss.
    assert np.any(aux_only[model.get_layer("aux_output").kernel.path])


def test_weighted_loss_equals_hand_computed_binary_crossentropy():
    """sum_i w_i * sum_b(sw_b * bce_b) / global_batch, computed here in NumPy."""
    rng = np.random.default_rng(1)
    batch = 6
    labels = {name: rng.integers(0, 2, (batch, 1)).astype(np.float32) for name in ("main_output", "aux_output")}
    predictions = {name: rng.uniform(0.05, 0.95, (batch, 1)).astype(np.float32) for name in labels}
    sample_weights = {"main_output": np.array([0, 1, 2, 0.5, 1, 3], np.float32)}
    global_batch_size = 12  # As if another replica held the other half of the batch.
    weights = {"main_output": 1.0, "aux_output": 0.2}

    spec = tf.TensorSpec((batch, 1), tf.float32)
    output_losses = _output_losses(
        {name: losses.output_loss("binary_crossentropy", output=name, y_true=spec, y_pred=spec) for name in labels},
        {k: tf.constant(v) for k, v in labels.items()}, {k: tf.constant(v) for k, v in predictions.items()},
        {k: tf.constant(v) for k, v in sample_weights.items()},
        divisors={name: float(global_batch_size) for name in labels})
    regularization = [tf.constant(0.5)]
    total = losses.weighted_total_loss(output_losses=output_losses, loss_weights=weights,
                                       regularization_losses=regularization)

    def bce(y, p):
        # Keras clips predictions to [eps, 1 - eps] with eps = 1e-7.
        p = np.clip(p, 1e-7, 1 - 1e-7)
        return -(y * np.log(p) + (1 - y) * np.log(1 - p))[:, 0]

    expected = {name: np.sum(bce(labels[name], predictions[name]) * sample_weights.get(name, 1.0))
                / global_batch_size for name in labels}
    for name in labels:
        np.testing.assert_allclose(output_losses[name].numpy(), expected[name], rtol=1e-5)
    # Default strategy: one replica, so the regularization counts whole.
    np.testing.assert_allclose(total.numpy(), sum(weights[n] * expected[n] for n in labels) + 0.5, rtol=1e-5)


def test_regularization_is_divided_by_the_number_of_replicas(mirrored_strategy):
    """Each of R replicas adds reg / R, so the all-reduced total counts it once."""
    def replica_total():
        return losses.weighted_total_loss(output_losses={"main_output": tf.constant(0.0)},
                                          loss_weights={"main_output": 1.0},
                                          regularization_losses=[tf.constant(0.5)])
    per_replica = mirrored_strategy.run(tf.function(replica_total))
    shares = mirrored_strategy.experimental_local_results(per_replica)
    assert [float(share) for share in shares] == [0.25, 0.25]


def test_one_sum_over_replicas_inside_strategy_run_and_none_outside_it(mirrored_strategy):
    from mto_tf.core.replicas import summed_over_replicas

    def replica_shares():
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        share = tf.cast(replica + 1, tf.float32)  # 1 on the first replica, 2 on the second.
        return summed_over_replicas({"gradients": [share * tf.ones([2]), None], "loss": share})

    per_replica = mirrored_strategy.run(tf.function(replica_shares))
    for summed in mirrored_strategy.experimental_local_results(per_replica):
        assert summed["gradients"][1] is None  # A weight no loss reaches keeps no gradient.
        assert summed["gradients"][0].numpy().tolist() == [3.0, 3.0] and float(summed["loss"]) == 3.0
    # One replica: the value itself; cross-replica context: a mistake, said so.
    assert float(summed_over_replicas(tf.constant(5.0))) == 5.0
    with mirrored_strategy.scope(), pytest.raises(RuntimeError, match="call it inside strategy.run"):
        summed_over_replicas(tf.constant(1.0))


def test_losses_are_keras_own_objects_per_example_and_refused_naming_the_flag_and_output():
    spec = tf.TensorSpec((4, 1), tf.float32)
    with pytest.raises(ValueError, match="^--losses: output 'main_output': Keras cannot make a loss of 'not_a_loss'"):
        losses.output_loss("not_a_loss", output="main_output", y_true=spec, y_pred=spec)
    # Any Keras loss, by name or config, gives per-example values: the
    # custom loop reduces them itself, over the global batch.
    config = {"class_name": "BinaryCrossentropy", "config": {"from_logits": True}}
    from_logits = losses.output_loss(config, output="main_output", y_true=spec, y_pred=spec).loss_fn
    labels, logits = tf.constant([[1.0], [0.0], [1.0], [0.0]]), tf.constant([[2.0], [-1.0], [-0.5], [0.3]])
    expected = np.log1p(np.exp(-np.array([2.0, 1.0, -0.5, -0.3])))  # -log(sigmoid(+-z)), by hand.
    np.testing.assert_allclose(from_logits(labels, logits).numpy(), expected, rtol=1e-6)
    # "crossentropy" is resolved from the shapes, as compile() resolves it.
    sparse = losses.output_loss("crossentropy", output="kind", y_true=tf.TensorSpec((4,), tf.int32),
                                y_pred=tf.TensorSpec((4, 3), tf.float32)).loss_fn
    assert sparse.fn is keras.losses.sparse_categorical_crossentropy


@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "mean", "sum", "mean_with_sample_weight"])
def test_each_keras_reduction_is_honoured_as_keras_reduces_a_batch(reduction):
    """The reduction in a loss's config, against the same Keras loss reducing the same batch itself."""
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, (8, 1)).astype(np.float32)
    predictions = rng.uniform(0.05, 0.95, (8, 1)).astype(np.float32)
    sample_weights = np.array([0, 0, 0, 0, 0, 1, 2, 0.5], np.float32)  # Most examples unlabelled.
    spec = tf.TensorSpec((8, 1), tf.float32)
    config = {"class_name": "BinaryCrossentropy", "config": {"reduction": reduction}}
    term = losses.output_loss(config, output="main_output", y_true=spec, y_pred=spec)
    assert term.reduction == ("sum_over_batch_size" if reduction == "mean" else reduction)
    part = losses.replica_sums(term, {"main_output": labels}, {"main_output": predictions},
                               {"main_output": tf.constant(sample_weights)})
    # One replica: its divisor is the global one.
    value = losses.reduced(part.weighted_sum, part.divisor, term.reduction)
    keras_value = keras.losses.BinaryCrossentropy(reduction=reduction)(labels, predictions,
                                                                      sample_weight=sample_weights)
    # The same float32 sums in another order: a few ulps.
    np.testing.assert_allclose(value.numpy(), keras_value.numpy(), rtol=1e-6)
    assert float(part.labelled) == 3.0


def test_a_loss_object_keeps_its_reduction_none_is_refused_and_no_label_gives_zero_not_nan():
    spec = tf.TensorSpec((4, 1), tf.float32)
    given = keras.losses.MeanSquaredError(reduction="sum")
    term = losses.output_loss(given, output="priority", y_true=spec, y_pred=spec)
    assert term.reduction == "sum" and given.reduction == "sum"  # The user's object is not changed.
    with pytest.raises(ValueError, match="^--losses: output 'priority': reduction 'none' gives a value per example"):
        losses.output_loss({"class_name": "MeanSquaredError", "config": {"reduction": "none"}}, output="priority",
                           y_true=spec, y_pred=spec)
    # --loss_reduction=mean_over_labelled overrides the loss's own.
    assert losses.output_loss(given, output="priority", y_true=spec, y_pred=spec,
                              reduction="mean_with_sample_weight").reduction == "mean_with_sample_weight"
    # No labelled example: the weighted sum and the divisor are 0, and the value 0.
    term = losses.output_loss("mse", output="priority", y_true=spec, y_pred=spec,
                              reduction="mean_with_sample_weight")
    part = losses.replica_sums(term, {"priority": tf.ones([4, 1])}, {"priority": tf.zeros([4, 1])},
                               {"priority": tf.zeros([4])})
    assert float(losses.reduced(part.weighted_sum, part.divisor, term.reduction)) == 0.0
    assert float(part.labelled) == 0.0


@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum", "mean_with_sample_weight"])
def test_a_loss_with_a_value_per_time_step_is_reduced_over_every_element_as_keras_reduces_it(reduction):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, (4, 5))  # A class per time step.
    predictions = tf.nn.softmax(rng.standard_normal((4, 5, 3)).astype(np.float32))
    sample_weights = np.array([0.0, 1.0, 2.0, 0.5], np.float32)
    config = {"class_name": "SparseCategoricalCrossentropy", "config": {"reduction": reduction}}
    term = losses.output_loss(config, output="tags", y_true=tf.TensorSpec((4, 5), tf.int64),
                              y_pred=tf.TensorSpec((4, 5, 3), tf.float32))
    for weights in (sample_weights, None):
        part = losses.replica_sums(term, {"tags": labels}, {"tags": predictions},
                                   {} if weights is None else {"tags": tf.constant(weights)})
        # Keras broadcasts a weight per example over the time steps when it is shaped (batch, 1).
        keras_value = keras.losses.SparseCategoricalCrossentropy(reduction=reduction)(
            labels, predictions, sample_weight=None if weights is None else weights[:, None])
        # float32 sums in another order: a few ulps.
        np.testing.assert_allclose(losses.reduced(part.weighted_sum, part.divisor, term.reduction).numpy(),
                                   keras_value.numpy(), rtol=1e-6, err_msg=str(weights))
