"""`synthetic_headlines`: a TFDS dataset generated locally, shaped for `headline`.

Each example is a "headline" of token ids, five floats of side information,
and two labels that depend on them:

- `aux_output` (text alone): the headline's hidden sentiment. A positive
  headline draws about a third of its tokens from a small "positive" part of
  the vocabulary, a negative one from a "negative" part; the rest are uniform.
- `main_output` (text and `aux_input`): 1 when the sentiment, pushed by a fixed
  linear function of `aux_input`, comes out positive.

So the LSTM has to learn the sentiment from the text for either head to do
well, and `main_output` also needs `aux_input`. Examples are a fixed function
of the builder config (no randomness at read time), written in generation
order (`disable_shuffling=True`), so runs are reproducible.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import logging
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mto_tf.data.examples import Examples

# How far each unit of `aux_input` moves the main label's logit.
_AUX_INPUT_COEFFICIENTS = (1.5, -1.0, 0.5, 0.0, 1.0)
_SENTIMENT_TOKEN_FRACTION = 0.3


logger = logging.getLogger(__name__)


class _OurConfigsAreNotNews(logging.Filter):
    """Drops TFDS's warning "Using custom data configuration" about these configs: one per size, on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Using custom data configuration: SyntheticHeadlinesConfig" not in record.getMessage()


def _quiet_about_our_configs() -> None:
    """Installs the filter on absl's logger (which TFDS logs through), once: when the data is made, not on import."""
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(installed, _OurConfigsAreNotNews) for installed in absl_logger.filters):
        absl_logger.addFilter(_OurConfigsAreNotNews())


@dataclasses.dataclass(eq=False)
class SyntheticHeadlinesConfig(tfds.core.BuilderConfig):
    """Sizes of the generated data; the name encodes them, so each size is cached apart."""

    vocab_size: int = 10000
    sequence_length: int = 100
    aux_input_dim: int = 5
    train_examples: int = 10000
    validation_examples: int = 1000

    @classmethod
    def of_sizes(cls, *, vocab_size: int, sequence_length: int, aux_input_dim: int,
                 train_examples: int, validation_examples: int) -> "SyntheticHeadlinesConfig":
        """A config whose name records every size, e.g. `v10000_l100_a5_n10000_1000`."""
        return cls(
            name=f"v{vocab_size}_l{sequence_length}_a{aux_input_dim}_n{train_examples}_{validation_examples}",
            vocab_size=vocab_size, sequence_length=sequence_length, aux_input_dim=aux_input_dim,
            train_examples=train_examples, validation_examples=validation_examples)


class SyntheticHeadlines(tfds.core.GeneratorBasedBuilder):
    """Deterministic two-label headlines for the `headline` model; no download."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.1.0": "main_input stored as raw bytes: much cheaper to decode than a list of integers."}
    BUILDER_CONFIGS = [SyntheticHeadlinesConfig.of_sizes(
        vocab_size=10000, sequence_length=100, aux_input_dim=5, train_examples=10000, validation_examples=1000)]

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                # Raw bytes: much cheaper to decode than a list of integers.
                "main_input": tfds.features.Tensor(shape=(config.sequence_length,), dtype=np.int32,
                                                   encoding=tfds.features.Encoding.BYTES),
                "aux_input": tfds.features.Tensor(shape=(config.aux_input_dim,), dtype=np.float32),
                "main_output": tfds.features.Tensor(shape=(1,), dtype=np.float32),
                "aux_output": tfds.features.Tensor(shape=(1,), dtype=np.float32),
            }),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        config = self.builder_config
        return {
            "train": self._generate_examples(num_examples=config.train_examples, seed=1),
            "validation": self._generate_examples(num_examples=config.validation_examples, seed=2),
        }

    def _generate_examples(self, *, num_examples: int, seed: int):
        config = self.builder_config
        rng = np.random.default_rng(seed)
        for index, example in enumerate(generate_headlines(rng, config, num_examples)):
            yield index, example


def generate_headlines(rng: np.random.Generator, config: SyntheticHeadlinesConfig, num_examples: int):
    """Yields `num_examples` feature dicts drawn from `rng`."""
    vocab_size, length = config.vocab_size, config.sequence_length
    # Token 0 is left unused (padding by convention). Each sentiment owns a
    # tenth of the vocabulary, at least one token.
    band = max(1, (vocab_size - 1) // 10)
    sentiment_tokens = {1: (1, 1 + band), 0: (1 + band, 1 + 2 * band)}
    coefficients = np.resize(np.asarray(_AUX_INPUT_COEFFICIENTS, np.float32), config.aux_input_dim)
    for _ in range(num_examples):
        sentiment = int(rng.integers(2))
        tokens = rng.integers(1, vocab_size, size=length)
        is_sentiment_token = rng.random(length) < _SENTIMENT_TOKEN_FRACTION
        low, high = sentiment_tokens[sentiment]
        tokens[is_sentiment_token] = rng.integers(low, min(high, vocab_size), size=int(is_sentiment_token.sum()))
        aux_input = rng.standard_normal(config.aux_input_dim).astype(np.float32)
        main_logit = 2.0 * (2 * sentiment - 1) + float(aux_input @ coefficients)
        yield {
            "main_input": tokens.astype(np.int32),
            "aux_input": aux_input,
            "main_output": np.array([float(main_logit > 0)], np.float32),
            "aux_output": np.array([float(sentiment)], np.float32),
        }


def make_builder(config) -> SyntheticHeadlines:
    """The builder for a `TrainConfig`'s model sizes and `synthetic_*_examples`."""
    _quiet_about_our_configs()
    builder_config = SyntheticHeadlinesConfig.of_sizes(
        vocab_size=config.vocab_size, sequence_length=config.sequence_length,
        aux_input_dim=config.aux_input_dim, train_examples=config.synthetic_train_examples,
        validation_examples=config.synthetic_validation_examples)
    # TFDS refuses a config object named like a registered one: ask for that one by name.
    if builder_config.name in {registered.name for registered in SyntheticHeadlines.BUILDER_CONFIGS}:
        builder_config = builder_config.name
    return SyntheticHeadlines(config=builder_config, data_dir=config.data_dir)


def load(config, split: str):
    """Generates (once per data dir) and returns one split as `Examples`.

    Args:
      config: a `TrainConfig`; its model sizes and `synthetic_*_examples` pick the builder config.
      split: "train" or "validation".
    """
    # Workers of one job may start together on one data directory: one
    # generates, the others wait for it. A builder reads what is on disk when
    # it is made, so the one that reads is made once the lock is held.
    config_dir = os.path.dirname(make_builder(config).data_dir)
    os.makedirs(config_dir, exist_ok=True)
    with open(os.path.join(config_dir, ".generate.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        builder = make_builder(config)
        # (Not builder.is_prepared(): TFDS warns about the empty folder it looks in.)
        if not os.path.exists(os.path.join(builder.data_dir, "dataset_info.json")):
            logger.info("Generating synthetic_headlines (%d train, %d validation examples) in %s",
                        config.synthetic_train_examples, config.synthetic_validation_examples, builder.data_dir)
            # TFDS prints its own "Downloading and preparing dataset ..." (in bold) on stdout.
            with contextlib.redirect_stdout(io.StringIO()):
                builder.download_and_prepare()
    return read_split(builder, split)


def read_split(builder: SyntheticHeadlines, split: str):
    """The split's records, streamed in file order, and a parser for batches of them.

    TFDS's own reader (`as_dataset`) decodes example by example; parsing a
    whole batch at once costs a fraction of the CPU, which training needs.
    Nothing is cached: memory does not grow with the dataset.
    """
    feature_spec = {name: tf.io.FixedLenFeature(info.shape, info.tf_dtype)
                    for name, info in builder.info.features.get_serialized_info().items()}
    sequence_length = builder.builder_config.sequence_length

    def parse_batch(serialized):
        batch = tf.io.parse_example(serialized, feature_spec)
        # main_input is stored as raw bytes (see `_info`). TFDS's
        # `decode_batch_example` would decode them example by example
        # (`tf.map_fn`), about 1 ms of CPU per batch of 64 that training
        # needs; one `decode_raw` decodes the whole batch, as TFDS does one.
        # `ensure_shape` (not a reshape to [-1, length]) keeps the static
        # batch size: a train step traced with an unknown batch size ran
        # about 5 % slower.
        batch["main_input"] = tf.ensure_shape(tf.io.decode_raw(batch["main_input"], tf.int32),
                                              [*serialized.shape, sequence_length])
        return batch

    files = [os.path.join(builder.data_dir, name) for name in builder.info.splits[split].filenames]
    return Examples(records=tf.data.TFRecordDataset(files), parse_batch=parse_batch,
                    num_examples=builder.info.splits[split].num_examples)


def feature_specs(config) -> dict[str, tf.TensorSpec]:
    """Each feature's per-example shape and dtype, as the builder declares them."""
    return {name: tf.TensorSpec(feature.shape, feature.tf_dtype)
            for name, feature in make_builder(config).info.features.items()}
