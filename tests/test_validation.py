"""Validation: the exact weighted mean over every validation example, named as `fit` names it.

References: `model.evaluate(..., return_dict=True)` on one device, and NumPy
on the model's predictions. Keras's `evaluate` weighs each batch's total
loss by its size (exact), but averages each output's loss over batches
with equal weight when the last batch is partial (its static batch size is
unknown): the tests assert that difference too.
"""

import dataclasses
import json
import math

import numpy as np
import pytest
import tensorflow as tf

from helpers import BATCH_SIZE, HEADLINE, OUTPUTS, VALUE_RTOL, small_config, write_npz
from helpers import evaluate_with_keras as _evaluate
from helpers import exact_means as _exact_means
from mto_tf import train
from mto_tf.core.models import build_headline
from mto_tf.errors import ConfigError
from mto_tf.run import best

pytestmark = pytest.mark.slow



def _setup(tmp_path, *, num_validation, **overrides):
    write_npz(tmp_path / "train.npz", num_examples=72, with_sample_weights=True)
    arrays = write_npz(tmp_path / "validation.npz", num_examples=num_validation, with_sample_weights=True, seed=1)
    settings = dict(dataset=f"npz:{tmp_path / 'train.npz'}", validation_data=f"npz:{tmp_path / 'validation.npz'}",
                    optimizer="adam", learning_rate=0.01, train_steps=4, log_every=2)
    config = small_config(tmp_path, **{**settings, **overrides})
    return config, arrays


@pytest.mark.keras_behaviour
@pytest.mark.parametrize("strategy_name", ["default", "mirrored"])
def test_validation_is_the_exact_mean_over_every_example_as_evaluate_reports_the_total(
        tmp_path, strategy_name, mirrored_strategy):
    # 37 examples in batches of 16: the last holds 5, split 3 + 2 across two replicas.
    config, arrays = _setup(tmp_path, num_validation=37)
    result = train(config, strategy=mirrored_strategy if strategy_name == "mirrored" else tf.distribute.get_strategy())
    record = result.history[-1]
    model = build_headline(config)
    model.set_weights(result.model.get_weights())
    exact = _exact_means(model, arrays)
    evaluated = _evaluate(model, arrays)

    for name in OUTPUTS:
        np.testing.assert_allclose(record[f"val_{name}_loss"], exact[name], rtol=VALUE_RTOL, err_msg=name)
        np.testing.assert_allclose(record[f"val_{name}_binary_accuracy"], evaluated[f"{name}_binary_accuracy"],
                                   rtol=VALUE_RTOL, err_msg=name)
    total = sum(HEADLINE.loss_weights[name] * exact[name] for name in OUTPUTS)
    np.testing.assert_allclose(record["val_loss"], total, rtol=VALUE_RTOL)
    np.testing.assert_allclose(record["val_loss"], evaluated["loss"], rtol=VALUE_RTOL)
    # Keras's per-output numbers are the mean of the three batch means here
    # (compile_utils.CompileLoss.call weighs each batch by `y_pred.shape[0]`,
    # None for the partial batch), and so disagree with its own total.
    assert abs(evaluated["main_output_loss"] - exact["main_output"]) > 1e-3


def test_with_an_even_last_batch_every_value_equals_evaluate(tmp_path):
    config, arrays = _setup(tmp_path, num_validation=32)
    result = train(config)
    evaluated = _evaluate(result.model, arrays)
    record = result.history[-1]
    for name, value in evaluated.items():
        np.testing.assert_allclose(record[f"val_{name}"], value, rtol=VALUE_RTOL, err_msg=name)


def test_validation_names_are_fits_and_eval_steps_and_eval_every_choose_what_and_when(tmp_path):
    config, arrays = _setup(tmp_path, num_validation=32, train_steps=4, log_every=2, eval_every=2,
                            metrics={name: ("binary_accuracy",) for name in OUTPUTS}, save_best="val_loss",
                            class_weights={"main_output": {1: 2.0}})
    custom = train(config).history
    fit = train(dataclasses.replace(config, loop="fit", model_dir=str(tmp_path / "fit"))).history
    custom_val = [record for record in custom if "val_loss" in record]
    fit_val = [record for record in fit if "val_loss" in record]
    assert [record["step"] for record in custom_val] == [record["step"] for record in fit_val] == [2, 4]
    val_names = {name for name in fit_val[0] if name.startswith("val_")}
    assert val_names == {"val_loss", "val_main_output_loss", "val_aux_output_loss",
                         "val_main_output_binary_accuracy", "val_aux_output_binary_accuracy"}
    assert {name for name in custom_val[0] if name.startswith("val_")} == val_names
    for custom_record, fit_record in zip(custom_val, fit_val):
        for name in val_names:  # Same weights (parity, class weights included), same examples, full batches.
            np.testing.assert_allclose(custom_record[name], fit_record[name], rtol=VALUE_RTOL, err_msg=name)
    assert [record["best_step"] for record in custom_val] == [record["best_step"] for record in fit_val]
    assert (tmp_path / "fit" / best.BEST_WEIGHTS_FILE).exists()

    # --eval_steps=1: the first batch's 16 examples only.
    one_batch = train(dataclasses.replace(config, eval_steps=1, eval_every=0, model_dir=str(tmp_path / "one_batch")))
    model = build_headline(config)
    model.set_weights(one_batch.model.get_weights())
    first_batch = {key: value[:BATCH_SIZE] for key, value in arrays.items()}
    assert [record["step"] for record in one_batch.history if "val_loss" in record] == [4]
    np.testing.assert_allclose(one_batch.history[-1]["val_main_output_loss"],
                               _exact_means(model, first_batch)["main_output"], rtol=VALUE_RTOL)


def test_synthetic_headlines_validates_on_its_validation_split_by_default(tmp_path):
    history = train(small_config(tmp_path, train_steps=2, log_every=2)).history
    assert "val_loss" in history[-1] and "val_main_output_binary_accuracy" in history[-1]
    history = train(small_config(tmp_path, train_steps=2, log_every=2, validation_split="",
                                 model_dir=str(tmp_path / "none"))).history
    assert "val_loss" not in history[-1]


def test_save_best_keeps_the_weights_of_the_best_evaluation_and_early_stopping_stops_at_the_right_one(tmp_path):
    # SGD at a large rate: the validation loss goes down and up again.
    config, arrays = _setup(tmp_path, num_validation=37, optimizer="sgd", learning_rate=3.0, train_steps=40,
                            log_every=1, eval_every=1, save_best="val_loss", early_stopping_patience=3)
    result = train(config)
    evaluations = [(record["step"], record["val_loss"]) for record in result.history]

    # Independently: the best so far after each evaluation, and where 3 in a row did not improve.
    best_step, best_value, without_improvement, expected_stop = None, math.inf, 0, None
    for step_number, value in evaluations:
        if value < best_value:
            best_step, best_value, without_improvement = step_number, value, 0
        else:
            without_improvement += 1
        if without_improvement == 3:
            expected_stop = step_number
            break
    assert expected_stop is not None and expected_stop < 40, evaluations  # The scenario did stop early.
    assert evaluations[-1][0] == expected_stop
    assert result.history[-1]["best_step"] == best_step
    # The checkpoint of the stop is kept, and best.weights.h5 holds the best evaluation's weights.
    assert tf.train.latest_checkpoint(tmp_path / "run" / "checkpoints").endswith(f"ckpt-{expected_stop}")
    model = build_headline(config)
    model.load_weights(tmp_path / "run" / best.BEST_WEIGHTS_FILE)
    exact = _exact_means(model, arrays)
    np.testing.assert_allclose(sum(HEADLINE.loss_weights[n] * exact[n] for n in OUTPUTS), best_value,
                               rtol=VALUE_RTOL)

    # Resumed, it does not train on: it had stopped early.
    again = train(config)
    assert again.history == []
    np.testing.assert_array_equal(again.model.get_weights()[0], result.model.get_weights()[0])


def test_save_best_survives_a_resume(tmp_path):
    config, _ = _setup(tmp_path, num_validation=37, optimizer="sgd", learning_rate=3.0, train_steps=12,
                       log_every=1, eval_every=1, save_best="val_loss", checkpoint_every=1)
    uninterrupted = train(config).history
    split = dataclasses.replace(config, model_dir=str(tmp_path / "split"), train_steps=6)
    train(split)
    resumed = train(dataclasses.replace(split, train_steps=12))
    assert [r["best_step"] for r in uninterrupted] == [r["best_step"] for r in _records(tmp_path / "split")]
    assert resumed.history[-1]["best_step"] == uninterrupted[-1]["best_step"]
    for name in ("run", "split"):
        assert (tmp_path / name / best.BEST_WEIGHTS_FILE).exists()
    a, b = build_headline(config), build_headline(config)
    a.load_weights(tmp_path / "run" / best.BEST_WEIGHTS_FILE)
    b.load_weights(tmp_path / "split" / best.BEST_WEIGHTS_FILE)
    for x, y in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(x, y)


def _records(model_dir):
    return [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("overrides, flag", [
    (dict(save_best="val_main_output_auc"), "save_best"),
    (dict(save_best="main_output_loss"), "save_best"),
    (dict(validation_data=None, save_best="val_loss"), "save_best"),
    (dict(validation_data=None, eval_every=2), "eval_every"),
    (dict(early_stopping_patience=2), "early_stopping_patience"),
    (dict(validation_split="validation"), "validation_split"),  # npz: has no splits.
    (dict(validation_data="npz:missing.npz"), "validation_data"),
])
def test_bad_validation_settings_name_their_flag_and_write_nothing(tmp_path, overrides, flag):
    with pytest.raises(ConfigError, match=f"^--{flag}: "):
        config, _ = _setup(tmp_path, num_validation=32, **overrides)
        train(config)
    assert not (tmp_path / "run").exists()
