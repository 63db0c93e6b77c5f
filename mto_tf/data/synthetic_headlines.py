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
order (`disable_shuffling=True`), so runs are reproducible (see `generated`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mto_tf.data import generated
from mto_tf.data.examples import Examples

# How far each unit of `aux_input` moves the main label's logit.
_AUX_INPUT_COEFFICIENTS = (1.5, -1.0, 0.5, 0.0, 1.0)
_SENTIMENT_TOKEN_FRACTION = 0.3
SPLITS = ("train", "validation")


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
    generated.quiet_about_configs_of(SyntheticHeadlinesConfig)
    builder_config = SyntheticHeadlinesConfig.of_sizes(
        vocab_size=config.vocab_size, sequence_length=config.sequence_length,
        aux_input_dim=config.aux_input_dim, train_examples=config.synthetic_train_examples,
        validation_examples=config.synthetic_validation_examples)
    return generated.builder_of(SyntheticHeadlines, builder_config, data_dir=config.data_dir)


def load(config, split: str) -> Examples:
    """Generates (once per data dir) and returns one split as `Examples`, each feature by its name.

    Args:
      config: a `TrainConfig`; its model sizes and `synthetic_*_examples` pick the builder config.
      split: "train" or "validation".
    """
    builder = generated.prepare(
        lambda: make_builder(config), what=f"synthetic_headlines ({config.synthetic_train_examples} train, "
                                           f"{config.synthetic_validation_examples} validation examples)")
    # main_input is stored as raw bytes (see `_info`): the parser decodes a whole batch of them at once.
    return generated.read_split(builder, split)


def feature_specs(config) -> dict[str, tf.TensorSpec]:
    """Each feature's per-example shape and dtype, as the builder declares them."""
    return generated.feature_specs(make_builder(config))
