"""Input pipelines: the local TFDS builder and npz files."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from helpers import BATCH_SIZE, small_config, write_npz
from mto_tf import train
from mto_tf.core.models import build_headline
from mto_tf.core.signature import ModelSignature
from mto_tf.data import batching, generated, sources, synthetic_headlines
from mto_tf.errors import ConfigError


def _arrays(examples):
    """Every example, parsed in one batch, as NumPy arrays."""
    whole = examples.records.batch(1_000_000).map(examples.parse_batch)
    return {key: value.numpy() for key, value in next(iter(whole)).items()}


def test_synthetic_headlines_builds_offline_and_loads_by_registered_name(tmp_path):
    config = small_config(tmp_path, synthetic_train_examples=200, synthetic_validation_examples=40)
    first = _arrays(synthetic_headlines.load(config, "train"))
    # tfds.load finds the builder by name and the prepared data by config
    # name, and reads the very examples that mto_tf parses batch by batch.
    by_name = tfds.load("synthetic_headlines/v50_l8_a5_n200_40", split="train", data_dir=config.data_dir)
    read_by_tfds = {key: np.stack([example[key] for example in tfds.as_numpy(by_name)]) for key in first}
    for key in first:
        np.testing.assert_array_equal(first[key], read_by_tfds[key])
    assert len(first["main_input"]) == 200
    assert len(_arrays(synthetic_headlines.load(config, "validation"))["main_input"]) == 40
    assert first["main_input"].shape == (200, 8) and first["main_input"].min() >= 1
    assert first["main_input"].max() < 50 and first["aux_input"].shape == (200, 5)
    # Deterministic: a fresh data directory generates the same examples.
    again = _arrays(synthetic_headlines.load(small_config(tmp_path / "again", data_dir=str(tmp_path / "again"),
                                                          synthetic_train_examples=200,
                                                          synthetic_validation_examples=40), "train"))
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])


def test_default_sizes_use_the_registered_builder_config(tmp_path):
    from mto_tf import TrainConfig
    builder = synthetic_headlines.make_builder(TrainConfig(data_dir=str(tmp_path)))
    assert builder.builder_config is synthetic_headlines.SyntheticHeadlines.BUILDER_CONFIGS[0]
    assert builder.info.features["main_input"].shape == (100,)


def test_tfds_warning_about_our_own_configs_is_dropped_once_the_builder_is_made(tmp_path, caplog):
    import logging
    from mto_tf import TrainConfig
    synthetic_headlines.make_builder(TrainConfig(data_dir=str(tmp_path), synthetic_train_examples=64))
    synthetic_headlines.make_builder(TrainConfig(data_dir=str(tmp_path), synthetic_train_examples=64))
    absl_logger = logging.getLogger("absl")
    assert sum(isinstance(installed, generated._OurConfigsAreNotNews) for installed in absl_logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger="absl"):
        absl_logger.warning("Using custom data configuration: SyntheticHeadlinesConfig(name='v1')")
        absl_logger.warning("Using custom data configuration: someone else's")
    assert [record.getMessage() for record in caplog.records] == [
        "Using custom data configuration: someone else's"]


def test_aux_label_follows_the_text_and_main_label_also_needs_aux_input(tmp_path):
    config = small_config(tmp_path, vocab_size=1000, sequence_length=40, synthetic_train_examples=1000)
    examples = _arrays(synthetic_headlines.load(config, "train"))
    tokens, aux_label = examples["main_input"], examples["aux_output"][:, 0]
    # Count the tokens of each sentiment's tenth of the vocabulary.
    band = (1000 - 1) // 10
    positive = ((tokens >= 1) & (tokens < 1 + band)).sum(axis=1)
    negative = ((tokens >= 1 + band) & (tokens < 1 + 2 * band)).sum(axis=1)
    text_guess = (positive > negative).astype(np.float32)
    assert np.mean(text_guess == aux_label) > 0.95
    assert abs(np.corrcoef(examples["aux_input"][:, 0], aux_label)[0, 1]) < 0.1  # Not from aux_input.

    main_label = examples["main_output"][:, 0]
    # The text alone leaves the main label uncertain; aux_input explains much of the rest.
    assert 0.6 < np.mean(main_label == aux_label) < 0.95
    assert np.corrcoef(examples["aux_input"][:, 0], main_label)[0, 1] > 0.2


@pytest.mark.parametrize("source", ["synthetic_headlines", "npz"])
def test_batches_have_a_static_shape_for_the_train_step_to_trace(tmp_path, source):
    # A train step traced for batches of unknown size ran about 5 % slower
    # (measured against batches held in memory) than one traced for 64.
    dataset = "synthetic_headlines"
    if source == "npz":
        write_npz(tmp_path / "d.npz")
        dataset = f"npz:{tmp_path / 'd.npz'}"
    config = small_config(tmp_path, dataset=dataset, synthetic_train_examples=100)
    signature = ModelSignature.of(build_headline(config))
    examples = sources.load_examples(config, signature)
    batches = batching.global_batches(examples, signature=signature, batching=batching.Batching.for_training(config))
    for spec in tf.nest.flatten(batches.element_spec):
        assert spec.shape[0] == BATCH_SIZE and spec.shape.is_fully_defined(), spec


@pytest.mark.slow
def test_training_on_synthetic_headlines_lowers_both_losses(tmp_path):
    config = small_config(tmp_path, vocab_size=200, sequence_length=20, embedding_dim=16, lstm_units=16,
                          optimizer="adam", learning_rate=0.01, batch_size=32, train_steps=300,
                          steps_per_loop=25, log_every=50, synthetic_train_examples=2000)
    history = train(config).history
    first, last = history[0], history[-1]
    for name in ("main_output_loss", "aux_output_loss"):
        # Chance level is ln 2 = 0.69; a learnable label drops well below it.
        assert last[name] < 0.8 * first[name] and last[name] < 0.5, (name, first[name], last[name])


def test_npz_file_order_and_sample_weights_reach_the_batches(tmp_path):
    arrays = write_npz(tmp_path / "d.npz", num_examples=40, with_sample_weights=True)
    config = small_config(tmp_path, dataset=f"npz:{tmp_path / 'd.npz'}")
    signature = ModelSignature.of(build_headline(config))
    for_training = batching.Batching.for_training(config)
    batches = batching.global_batches(sources.load_examples(config, signature), signature=signature,
                                      batching=for_training)
    inputs, labels, sample_weights = next(iter(batches))
    np.testing.assert_array_equal(inputs["main_input"], arrays["main_input"][:BATCH_SIZE])
    np.testing.assert_array_equal(labels["main_output"][:, 0], arrays["main_output"][:BATCH_SIZE])
    np.testing.assert_array_equal(sample_weights["aux_output"], arrays["sample_weight/aux_output"][:BATCH_SIZE])
    # skip_batches resumes further down the same endless stream (40 rows, batch 16: wraps around).
    skipped = batching.global_batches(sources.load_examples(config, signature), signature=signature,
                                      batching=for_training, skip_batches=2)
    np.testing.assert_array_equal(next(iter(skipped))[0]["main_input"],
                                  np.concatenate([arrays["main_input"][32:], arrays["main_input"][:8]]))


@pytest.mark.parametrize("corrupt, message", [
    (lambda a: a.pop("aux_output"), r"key 'aux_output': missing"),
    (lambda a: a.update(aux_input=a["aux_input"][:, :4]),
     r"key 'aux_input': expected per-example shape \(5,\) for input 'aux_input', got \(4,\)"),
    (lambda a: a.update(main_input=a["main_input"].astype(np.float32)),
     r"key 'main_input': expected integers for input 'main_input' \(int32\), got float32"),
    (lambda a: a.update(main_output=np.zeros((20, 2))),
     r"key 'main_output': expected labels of per-example shape \(1,\) for output 'main_output'"),
    (lambda a: a.update(main_output=a["main_output"][:10]), r"key 'main_output': has 10 rows"),
    (lambda a: a.update(labels=a["main_output"]), r"key 'labels': not an input, an output"),
    (lambda a: a.update({"sample_weight/main_output": -a["main_output"] - 1}), r"key 'sample_weight/main_output': expected finite sample weights"),
])
def test_npz_problems_are_errors_naming_the_key(tmp_path, corrupt, message):
    arrays = write_npz(tmp_path / "good.npz", num_examples=20)
    corrupt(arrays)
    np.savez(tmp_path / "bad.npz", **arrays)
    config = small_config(tmp_path, dataset=f"npz:{tmp_path / 'bad.npz'}")
    with pytest.raises(ConfigError, match=r"^--dataset: npz file .*bad.npz', " + message):
        sources.load_examples(config, ModelSignature.of(build_headline(config)))
