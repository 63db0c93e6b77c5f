"""The datasets generated from real or fully specified data (issue 28): `multi_digits`, two of scikit-learn's
handwritten digits per canvas, and `mmoe_synthetic`, the MMoE paper's two regression tasks."""

import dataclasses
import os
import socket
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import mto_train_in_process, run_config
from mto_tf import TrainConfig, train
from mto_tf import config as config_lib
from mto_tf.core.signature import ModelSignature
from mto_tf.data import mmoe_synthetic, multi_digits, sources
from mto_tf.errors import ConfigError

DIGITS_SIZES = dict(synthetic_train_examples=240, synthetic_validation_examples=40, synthetic_test_examples=40)


def _arrays(examples):
    """Every example, parsed in one batch, as NumPy arrays."""
    whole = examples.records.batch(1_000_000).map(examples.parse_batch)
    return {key: value.numpy() for key, value in next(iter(whole)).items()}


def _signature(inputs: dict, outputs: dict) -> ModelSignature:
    """A model's signature from per-example shapes (float32 everywhere), without building the model."""
    def specs(shapes):
        return {name: tf.TensorSpec((None, *shape), tf.float32) for name, shape in shapes.items()}

    return ModelSignature(model_name="test_model", inputs=specs(inputs), outputs=specs(outputs), outputs_are_dict=True)


@pytest.fixture
def no_connections(monkeypatch):
    """Python's sockets refuse to connect (this machine has no network either)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a network connection was attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --- multi_digits -----------------------------------------------------------------------------

def test_multi_digits_builds_offline_from_the_bundled_digits_the_same_bytes_twice(tmp_path, no_connections):
    configs = [TrainConfig(dataset="multi_digits", data_dir=str(tmp_path / name), **DIGITS_SIZES) for name in "ab"]
    for config in configs:
        multi_digits.load(config, "train")
    directories = [Path(multi_digits.make_builder(config).data_dir) for config in configs]
    records = [sorted(path.name for path in directory.iterdir() if ".tfrecord" in path.name)
               for directory in directories]
    assert len(records[0]) == 3 and records[0] == records[1]  # One file per split.
    for name in records[0]:
        assert (directories[0] / name).read_bytes() == (directories[1] / name).read_bytes(), name
    # What is stored is what `compose` makes, in its order.
    for split, size in zip(multi_digits.SPLITS, (240, 40, 40)):
        stored, made = _arrays(multi_digits.load(configs[0], split)), multi_digits.compose(split, size)
        assert stored["image"].shape == (size, 12, 12, 1) and stored["image"].dtype == np.uint8
        for key in ("image", "left", "right"):
            np.testing.assert_array_equal(stored[key], made[key])


def test_multi_digits_splits_use_disjoint_scans_and_each_canvas_is_labelled_by_the_scans_on_it():
    images, targets = multi_digits.digit_scans()
    assert images.shape == (1797, 8, 8) and images.max() == 255  # 0..16 scaled to 0..255.
    pools = multi_digits.scan_pools()
    assert sorted(np.concatenate(list(pools.values()))) == list(range(1797))  # Every scan in exactly one pool.
    for first, second in (("train", "test"), ("train", "validation"), ("validation", "test")):
        assert not set(pools[first]) & set(pools[second])
    for digit in range(10):  # 70 / 15 / 15 % of each digit's scans.
        count = {split: int(np.sum(targets[pool] == digit)) for split, pool in pools.items()}
        assert abs(count["train"] - 0.7 * sum(count.values())) <= 1, (digit, count)
    for split, size in (("train", 3000), ("test", 600)):
        made = multi_digits.compose(split, size)
        assert set(made["left_scan"]) | set(made["right_scan"]) <= set(pools[split])
        assert np.all(made["left_scan"] != made["right_scan"])
        # Each scan of the pool is the left digit equally often (to within one).
        left_counts = np.bincount(made["left_scan"], minlength=1797)[pools[split]]
        assert left_counts.max() - left_counts.min() <= 1
        np.testing.assert_array_equal(made["left"], targets[made["left_scan"]])
        np.testing.assert_array_equal(made["right"], targets[made["right_scan"]])
        # The right digit sits down and right of the left one, never on the same pixel.
        offsets = made["right_corner"] - made["left_corner"]
        assert offsets.min() >= 0 and offsets.max() <= 4 and np.all(offsets.any(axis=1))
        assert 1.8 < offsets.mean() < 2.2
        for index in range(size):  # Each canvas again, from its two scans: the left one, then the brighter pixel.
            canvas = np.zeros((12, 12), np.uint8)
            (top, left), (bottom, right) = made["left_corner"][index], made["right_corner"][index]
            canvas[top:top + 8, left:left + 8] = images[made["left_scan"][index]]
            canvas[bottom:bottom + 8, right:right + 8] = np.maximum(canvas[bottom:bottom + 8, right:right + 8],
                                                                    images[made["right_scan"][index]])
            np.testing.assert_array_equal(made["image"][index, ..., 0], canvas)


def test_multi_digits_feeds_a_model_through_feature_map_and_reads_only_what_it_needs(tmp_path):
    config = TrainConfig(dataset="multi_digits", data_dir=str(tmp_path), **DIGITS_SIZES)
    one_head = _signature({"image": (12, 12, 1)}, {"main_output": (10,)})  # An Inception-style main head.
    with pytest.raises(ConfigError, match=r"^--dataset: feature 'main_output': dataset multi_digits has no feature "
                                          r"'main_output' \(it has \['image', 'left', 'right'\]\); map it with "
                                          r"--feature_map=main_output=FEATURE$"):
        sources.load_examples(config, one_head)
    mapped = dataclasses.replace(config, feature_map={"main_output": "left"})
    batch = _arrays(sources.load_examples(mapped, one_head))
    assert sorted(batch) == ["image", "main_output"]  # `right` is not read.
    np.testing.assert_array_equal(batch["main_output"], multi_digits.compose("train", 240)["left"])
    with pytest.raises(ConfigError, match="^--eval_split: multi_digits has splits train, validation and test, not "
                                          "'valid'$"):
        sources.load_evaluation_examples(mapped, one_head, data=None, split="valid", split_must_exist=True,
                                         data_flag="eval_data", split_flag="eval_split")
    test_split = sources.load_evaluation_examples(mapped, one_head, data=None, split="test", split_must_exist=True,
                                                  data_flag="eval_data", split_flag="eval_split")
    assert test_split.count() == 40


def _two_digit_model():
    image = keras.Input((12, 12, 1), name="image")
    hidden = keras.layers.Dense(32, activation="relu")(keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(image)))
    return keras.Model({"image": image}, {side: keras.layers.Dense(10, activation="softmax", name=side)(hidden)
                                          for side in ("left", "right")})


def test_a_model_of_left_and_right_trains_on_multi_digits_and_validates_on_its_validation_split(tmp_path):
    result = train(run_config(
        tmp_path, model=_two_digit_model, dataset="multi_digits", optimizer="adam", learning_rate=0.01,
        losses={side: "sparse_categorical_crossentropy" for side in ("left", "right")}, train_steps=20,
        steps_per_loop=10, log_every=10, batch_size=32, **DIGITS_SIZES))
    first, last = result.history[0], result.history[-1]
    assert last["left_loss"] < first["left_loss"] and last["right_loss"] < first["right_loss"]
    assert np.isfinite(last["val_left_loss"]) and np.isfinite(last["val_right_loss"])


# --- mmoe_synthetic ---------------------------------------------------------------------------

# The paper's formulas with the constants docs/data.md states, written out again here, so that what the
# correlation should be does not come from the code under test.
ALPHAS = np.arange(1.0, 11.0)
BETAS = (ALPHAS - 1.0) ** 2
NOISE_STD = 0.01


def exact_label_correlation(p: float, *, c: float = 1.0) -> float:
    """Pearson correlation of y_1 and y_2 in closed form (checked against 2e6 Monte Carlo draws: within 6e-4).

    z_i = w_i^T x are jointly normal, mean 0, variance c^2, covariance c^2 p;
    y_i = f(z_i) + eps_i, f(z) = z + sum_j sin(alpha_j z + beta_j). With
    E cos(a z + b) = cos(b) exp(-a^2 c^2 / 2), Stein's lemma
    (E[z_1 g(z_2)] = Cov(z_1, z_2) E[g'(z_2)]) and
    sin u sin v = (cos(u - v) - cos(u + v)) / 2, every moment is exact.
    """
    s2 = c * c
    a1, a2, b1, b2 = ALPHAS[:, None], ALPHAS[None, :], BETAS[:, None], BETAS[None, :]

    def mean_product(rho):  # E[f(z_1) f(z_2)] when z_1, z_2 have correlation rho.
        sines = 0.5 * np.sum(np.cos(b1 - b2) * np.exp(-s2 * (a1 ** 2 + a2 ** 2 - 2 * rho * a1 * a2) / 2)
                             - np.cos(b1 + b2) * np.exp(-s2 * (a1 ** 2 + a2 ** 2 + 2 * rho * a1 * a2) / 2))
        linear_times_sines = np.sum(rho * s2 * ALPHAS * np.cos(BETAS) * np.exp(-ALPHAS ** 2 * s2 / 2))
        return rho * s2 + 2 * linear_times_sines + sines

    mean = np.sum(np.sin(BETAS) * np.exp(-ALPHAS ** 2 * s2 / 2))
    return float((mean_product(p) - mean ** 2) / (mean_product(1.0) - mean ** 2 + NOISE_STD ** 2))


def test_mmoe_synthetic_labels_correlate_as_task_correlation_makes_them(tmp_path):
    """Statistical: 4,000 examples per correlation. The linear parts w_i^T x must correlate as p; the labels as
    `exact_label_correlation` says (lower than p: the sines), to within 4 / sqrt(n) = 0.063, four standard errors
    of a correlation near 0 (and 1e-5 at p = 1, where the noise alone separates them)."""
    n = 4000
    measured, stored = {}, {}
    for p in (1.0, 0.5, 0.0):
        config = TrainConfig(dataset="mmoe_synthetic", data_dir=str(tmp_path), task_correlation=p,
                             synthetic_train_examples=n, synthetic_validation_examples=8, synthetic_test_examples=8)
        data = stored[p] = _arrays(mmoe_synthetic.load(config, "train"))
        assert data["features"].shape == (n, 100) and data["task_a"].shape == data["task_b"].shape == (n, 1)
        w1, w2 = mmoe_synthetic.task_weights(p)
        assert abs(w1 @ w2 / (np.linalg.norm(w1) * np.linalg.norm(w2)) - p) < 1e-12
        np.testing.assert_allclose([np.linalg.norm(w1), np.linalg.norm(w2)], 1.0, rtol=1e-12)
        x = data["features"].astype(np.float64)
        assert abs(np.corrcoef(x @ w1, x @ w2)[0, 1] - p) < 4 / np.sqrt(n)
        measured[p] = np.corrcoef(data["task_a"][:, 0], data["task_b"][:, 0])[0, 1]
        assert abs(measured[p] - exact_label_correlation(p)) < (1e-5 if p == 1 else 4 / np.sqrt(n)), (p, measured)
    assert measured[1.0] > 0.9999 and measured[0.5] - measured[0.0] > 0.1
    assert abs(exact_label_correlation(0.5) - 0.218) < 1e-3  # Not 0.5: the sines decorrelate the labels.
    # Only task_b's labels depend on p: the same inputs and task_a labels at every correlation.
    for p in (0.5, 0.0):
        for key in ("features", "task_a"):
            np.testing.assert_array_equal(stored[p][key], stored[1.0][key])


def test_mmoe_synthetic_is_checked_against_the_model_it_feeds(tmp_path):
    config = TrainConfig(dataset="mmoe_synthetic", data_dir=str(tmp_path), synthetic_train_examples=16,
                         synthetic_validation_examples=8, synthetic_test_examples=8)
    two_towers = _signature({"features": (100,)}, {"task_a": (1,), "task_b": (1,)})
    batch = _arrays(sources.load_examples(config, two_towers))
    assert sorted(batch) == ["features", "task_a", "task_b"] and batch["features"].dtype == np.float32
    narrow = _signature({"features": (20,)}, {"task_a": (1,), "task_b": (1,)})
    with pytest.raises(ConfigError, match=r"^--dataset: feature 'features': expected per-example shape \(20,\) for "
                                          r"input 'features', got \(100,\)$"):
        sources.load_examples(config, narrow)


def test_a_task_correlation_outside_minus_one_to_one_is_refused_naming_the_flag(tmp_path):
    for value in (1.5, -1.01, float("nan")):
        with pytest.raises(ConfigError, match=r"^--task_correlation: expected a number in \[-1, 1\]"):
            TrainConfig(dataset="mmoe_synthetic", task_correlation=value)
    TrainConfig(dataset="mmoe_synthetic", task_correlation=-1.0)
    run = mto_train_in_process("--dataset=mmoe_synthetic", "--task_correlation=2", f"--model_dir={tmp_path / 'run'}")
    assert run.returncode == 2 and not (tmp_path / "run").exists()
    assert run.stderr.strip().splitlines()[-1].endswith("--task_correlation: expected a number in [-1, 1] (the cosine "
                                                        "of the two tasks' weight vectors), got 2.0")


# --- Settings only these datasets read --------------------------------------------------------

def test_settings_only_the_new_datasets_read_are_refused_with_another_dataset():
    for name, value in (("task_correlation", 0.9), ("synthetic_test_examples", 50)):
        with pytest.raises(ConfigError, match=f"^--{name}: --model=headline with --dataset=synthetic_headlines does "
                                              f"not read it; leave it unset$"):
            TrainConfig(**{name: value}).check_settings_are_read()
    with pytest.raises(ConfigError, match="^--task_correlation: --model=headline with --dataset=multi_digits does "
                                          "not read it"):
        TrainConfig(dataset="multi_digits", task_correlation=0.9).check_settings_are_read()
    TrainConfig(dataset="mmoe_synthetic", task_correlation=0.9, synthetic_test_examples=50).check_settings_are_read()
    TrainConfig(dataset="multi_digits", synthetic_train_examples=50, synthetic_test_examples=50).check_settings_are_read()
    with pytest.raises(ConfigError, match="^--feature_map: maps features of a tfds: dataset"):
        TrainConfig(feature_map={"main_output": "aux_output"})  # synthetic_headlines: named after its model.


def test_each_setting_a_new_dataset_reads_changes_exactly_its_generated_data(tmp_path):
    base = TrainConfig(data_dir=str(tmp_path))
    readers = {"multi_digits": multi_digits, "mmoe_synthetic": mmoe_synthetic}
    for name, setting in config_lib.SETTINGS.items():
        if not set(readers) & set(setting.only_for):
            continue
        value = getattr(base, name)
        changed = dataclasses.replace(base, **{name: value / 2 if isinstance(value, float) else value + 1})
        for dataset, module in readers.items():
            differs = module.make_builder(base).builder_config.name != module.make_builder(changed).builder_config.name
            assert differs == (dataset in setting.only_for), (name, dataset)
    assert os.listdir(tmp_path) == []  # Builders made, nothing generated.
