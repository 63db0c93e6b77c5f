"""`--dataset=tfds:NAME`: a dataset prepared in `--data_dir`, its features mapped to the model.

The test prepares a small dataset with a builder defined here, so a
`mto-train` subprocess cannot import it: TFDS reads it from its files, as it
would read a dataset prepared by any other program. Its features are named
unlike the model's, one is nested, and the main label is a `ClassLabel`.
"""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from helpers import BATCH_SIZE, MODEL_FLAGS, SMALL_MODEL, run_cli, small_config
from mto_tf import train
from mto_tf.core.models import build_headline
from mto_tf.core.signature import ModelSignature
from mto_tf.data import batching, sources
from mto_tf.errors import ConfigError

NUM_TRAIN = 48
FEATURE_MAP = {"main_input": "text/token_ids", "aux_input": "side_info", "main_output": "is_main",
               "aux_output": "topic", "sample_weight/main_output": "weight"}
FEATURE_MAP_FLAG = "--feature_map=" + ",".join(f"{key}={value}" for key, value in FEATURE_MAP.items())


class SupportTickets(tfds.core.GeneratorBasedBuilder):
    """Deterministic examples for the small headline model, under other feature names."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "text": tfds.features.FeaturesDict({
                "token_ids": tfds.features.Tensor(shape=(SMALL_MODEL["sequence_length"],), dtype=np.int32)}),
            "side_info": tfds.features.Tensor(shape=(5,), dtype=np.float32),
            "is_main": tfds.features.ClassLabel(names=["no", "yes"]),
            "topic": tfds.features.Tensor(shape=(1,), dtype=np.float32),
            "weight": tfds.features.Tensor(shape=(), dtype=np.float32),
            "notes": tfds.features.Text(),  # Not read: never decoded.
        }), disable_shuffling=True)

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(seed=0, count=NUM_TRAIN),
                "holdout": self._generate_examples(seed=1, count=16)}

    def _generate_examples(self, *, seed, count):
        for index, example in enumerate(ticket_examples(seed, count)):
            yield index, example


def ticket_examples(seed, count):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield {"text": {"token_ids": rng.integers(0, SMALL_MODEL["vocab_size"], SMALL_MODEL["sequence_length"])
                        .astype(np.int32)},
               "side_info": rng.standard_normal(5).astype(np.float32),
               "is_main": int(rng.integers(2)), "topic": rng.integers(0, 2, 1).astype(np.float32),
               "weight": np.float32(rng.choice([0.5, 1.0, 2.0])), "notes": "text nobody reads"}


class PartlyLabelledTickets(SupportTickets):
    """The same tickets, each label an optional feature: absent from some examples, as TFDS allows."""

    def _info(self):
        info = super()._info()
        features = {name: feature for name, feature in info.features.items() if name not in ("is_main", "topic")}
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            **features,
            "is_main": tfds.features.Tensor(shape=(), dtype=np.int64, optional=True),
            "topic": tfds.features.Tensor(shape=(1,), dtype=np.float32, optional=True)}), disable_shuffling=True)

    def _generate_examples(self, *, seed, count):
        for index, example in enumerate(ticket_examples(seed, count)):
            yield index, {**example, "is_main": None if index % 3 == 0 else example["is_main"],
                          "topic": None if index % 4 == 1 else example["topic"]}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tfds")
    SupportTickets(data_dir=str(directory)).download_and_prepare()
    PartlyLabelledTickets(data_dir=str(directory)).download_and_prepare()
    return directory


def _config(tmp_path, data_dir, **overrides):
    settings = dict(dataset="tfds:support_tickets", data_dir=str(data_dir), feature_map=FEATURE_MAP)
    return small_config(tmp_path, **{**settings, **overrides})


def test_mapped_features_reach_the_batches_in_file_order(tmp_path, data_dir):
    config = _config(tmp_path, data_dir)
    signature = ModelSignature.of(build_headline(config))
    inputs, labels, sample_weights = next(iter(batching.global_batches(
        sources.load_examples(config, signature), signature=signature,
        batching=batching.Batching.for_training(config))))
    expected = list(ticket_examples(0, BATCH_SIZE))
    np.testing.assert_array_equal(inputs["main_input"], [e["text"]["token_ids"] for e in expected])
    np.testing.assert_array_equal(inputs["aux_input"], [e["side_info"] for e in expected])
    # The ClassLabel arrives as integer class ids; the weight as one float per example.
    np.testing.assert_array_equal(labels["main_output"], [e["is_main"] for e in expected])
    np.testing.assert_array_equal(labels["aux_output"], [e["topic"] for e in expected])
    np.testing.assert_array_equal(sample_weights["main_output"], [e["weight"] for e in expected])
    assert set(sample_weights) == {"main_output"}


def test_a_label_absent_from_an_example_is_a_missing_label_and_a_declared_value_too(tmp_path, data_dir):
    """TFDS reads an absent optional feature as its dtype's lowest value: that example has no label there."""
    config = _config(tmp_path, data_dir, dataset="tfds:partly_labelled_tickets",
                     missing_labels={"aux_output": 1.0})  # And a topic of 1 means "not labelled" too.
    signature = ModelSignature.of(build_headline(config))
    _, labels, sample_weights = next(iter(batching.global_batches(
        sources.load_examples(config, signature), signature=signature,
        batching=batching.Batching.for_training(config))))
    expected = list(ticket_examples(0, BATCH_SIZE))
    main_labelled = np.array([index % 3 != 0 for index in range(BATCH_SIZE)])
    aux_labelled = np.array([index % 4 != 1 and e["topic"][0] != 1.0 for index, e in enumerate(expected)])
    np.testing.assert_array_equal(sample_weights["main_output"], [e["weight"] * labelled
                                                                  for e, labelled in zip(expected, main_labelled)])
    np.testing.assert_array_equal(sample_weights["aux_output"], aux_labelled.astype(np.float32))
    # A missing label reaches no loss: it is 0, a label every loss takes.
    np.testing.assert_array_equal(labels["main_output"], [e["is_main"] * labelled
                                                          for e, labelled in zip(expected, main_labelled)])
    np.testing.assert_array_equal(labels["aux_output"][:, 0], [e["topic"][0] * labelled
                                                               for e, labelled in zip(expected, aux_labelled)])
    assert 0 < main_labelled.sum() < BATCH_SIZE and 0 < aux_labelled.sum() < BATCH_SIZE


def test_an_optional_bool_label_is_refused_naming_the_dataset_and_output():
    from mto_tf.data import tfds_dataset

    # TFDS reads an absent optional bool as False: a label like any, so no value can mean "no label".
    info = tfds.features.Tensor(shape=(), dtype=np.bool_, optional=True).get_tensor_info()
    with pytest.raises(ConfigError, match=r"^--dataset: the labels of output 'is_main' are an optional bool feature"):
        tfds_dataset.absent_label_value(info, output="is_main")
    assert tfds_dataset.absent_label_value(tfds.features.Tensor(shape=(), dtype=np.int16, optional=True)
                                           .get_tensor_info(), output="kind") == -32768.0


def test_validation_reads_the_split_named_or_none_when_the_dataset_has_no_validation_split(tmp_path, data_dir):
    signature = ModelSignature.of(build_headline(_config(tmp_path, data_dir)))
    assert sources.load_validation_examples(_config(tmp_path, data_dir), signature) is None  # Only a train split.
    named = sources.load_validation_examples(_config(tmp_path, data_dir, validation_split="train"), signature)
    assert named.count() == sources.load_examples(_config(tmp_path, data_dir), signature).count()


@pytest.mark.parametrize("overrides, message", [
    (dict(validation_split="test"), r"^--validation_split: dataset 'support_tickets' has no split 'test'"),
    (dict(feature_map={**FEATURE_MAP, "aux_input": "side"}),
     r"^--feature_map: feature 'side' \(for 'aux_input'\): dataset 'support_tickets' has no feature 'side'"),
    (dict(feature_map={key: value for key, value in FEATURE_MAP.items() if key != "aux_output"}),
     r"^--dataset: feature 'aux_output': dataset 'support_tickets' has no feature 'aux_output' .* "
     r"map it with --feature_map=aux_output=FEATURE"),
    (dict(feature_map={**FEATURE_MAP, "aux_input": "text/token_ids"}),
     r"^--feature_map: feature 'text/token_ids' \(for 'aux_input'\): expected per-example shape \(5,\)"),
    (dict(feature_map={**FEATURE_MAP, "extra": "weight"}), r"^--feature_map: 'extra' is not an input, an output"),
    (dict(train_split="validation"), r"^--train_split: dataset 'support_tickets' has no split 'validation'; "
                                     r"it has \['holdout', 'train'\]"),
    (dict(dataset="tfds:no_such_dataset"), r"^--dataset: TFDS cannot open 'no_such_dataset'"),
])
def test_features_the_model_cannot_take_are_refused_naming_the_flag_and_feature(tmp_path, data_dir, overrides,
                                                                                 message):
    with pytest.raises(ConfigError, match=message):
        train(_config(tmp_path, data_dir, **overrides))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_mto_train_reads_a_dataset_whose_builder_it_cannot_import(tmp_path, data_dir):
    process = run_cli(*MODEL_FLAGS, "--dataset=tfds:support_tickets:1.0.0", f"--data_dir={data_dir}",
                      FEATURE_MAP_FLAG, "--train_split=holdout", f"--model_dir={tmp_path / 'run'}",
                      "--train_steps=4", "--log_every=2")
    assert process.returncode == 0, process.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [2, 4]

    bad = run_cli(*MODEL_FLAGS, "--dataset=tfds:support_tickets", f"--data_dir={data_dir}",
                  "--feature_map=main_input=text/tokens", f"--model_dir={tmp_path / 'never'}")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "mto-train: error: --feature_map: feature 'text/tokens' (for 'main_input'): dataset 'support_tickets' " \
           "has no feature 'text/tokens'" in bad.stderr, bad.stderr[-2000:]
    assert not (tmp_path / "never").exists()
