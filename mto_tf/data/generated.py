"""What the datasets mto_tf generates itself share: made once per data directory, read a batch at a time.

`synthetic_headlines`, `multi_digits` and `mmoe_synthetic` are TFDS
`GeneratorBasedBuilder`s whose examples are a fixed function of their builder
config (no randomness at read time, nothing downloaded), written in
generation order (`disable_shuffling=True`). A config's name records its
sizes, so each size is generated once, apart, and `tfds.load(NAME/CONFIG,
data_dir=...)` reads it as any prepared TFDS dataset.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
from collections.abc import Callable, Mapping

import tensorflow as tf
import tensorflow_datasets as tfds

from mto_tf.data.examples import Examples

logger = logging.getLogger(__name__)

_CUSTOM_CONFIG_WARNING = "Using custom data configuration: "


class _OurConfigsAreNotNews(logging.Filter):
    """Drops TFDS's warning "Using custom data configuration" about mto_tf's own configs: one per size, on purpose."""

    def __init__(self):
        super().__init__()
        self.config_classes: set[str] = set()  # Class names of the configs not to warn about.

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f"{_CUSTOM_CONFIG_WARNING}{name}" in message for name in self.config_classes)


def quiet_about_configs_of(config_class: type) -> None:
    """Installs the filter on absl's logger (which TFDS logs through), once, and adds `config_class` to what it
    drops: when the data is made, not on import."""
    absl_logger = logging.getLogger("absl")
    installed = next((each for each in absl_logger.filters if isinstance(each, _OurConfigsAreNotNews)), None)
    if installed is None:
        installed = _OurConfigsAreNotNews()
        absl_logger.addFilter(installed)
    installed.config_classes.add(config_class.__name__)


def builder_of(builder_class: type, builder_config: tfds.core.BuilderConfig, *,
               data_dir: str | None) -> tfds.core.DatasetBuilder:
    """`builder_class` for `builder_config` in `data_dir`.

    TFDS refuses a config object named like one of the class's registered
    configs: that one is asked for by its name.
    """
    if builder_config.name in {registered.name for registered in builder_class.BUILDER_CONFIGS}:
        builder_config = builder_config.name
    return builder_class(config=builder_config, data_dir=data_dir)


def prepare(make_builder: Callable[[], tfds.core.DatasetBuilder], *, what: str) -> tfds.core.DatasetBuilder:
    """Generates the dataset of `make_builder()` in its data directory unless it is there; returns a builder that
    reads it.

    Args:
      make_builder: makes the builder (of one config, in one data directory).
      what: the dataset and its sizes, for the log line.
    """
    # Workers of one job may start together on one data directory: one
    # generates, the others wait for it. A builder reads what is on disk when
    # it is made, so the one that reads is made once the lock is held.
    config_dir = os.path.dirname(make_builder().data_dir)
    os.makedirs(config_dir, exist_ok=True)
    with open(os.path.join(config_dir, ".generate.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        builder = make_builder()
        # (Not builder.is_prepared(): TFDS warns about the empty folder it looks in.)
        if not os.path.exists(os.path.join(builder.data_dir, "dataset_info.json")):
            logger.info("Generating %s in %s", what, builder.data_dir)
            # TFDS prints its own "Downloading and preparing dataset ..." (in bold) on stdout.
            with contextlib.redirect_stdout(io.StringIO()):
                builder.download_and_prepare()
    return builder


TRAIN_VALIDATION_TEST = ("train", "validation", "test")


def three_splits(builder: tfds.core.GeneratorBasedBuilder) -> dict:
    """A builder's `_split_generators` for train, validation and test splits of its config's sizes
    (`train_examples`, `validation_examples`, `test_examples`), each made by its
    `_generate_examples(split=..., num_examples=...)`."""
    config = builder.builder_config
    sizes = {"train": config.train_examples, "validation": config.validation_examples, "test": config.test_examples}
    return {split: builder._generate_examples(split=split, num_examples=sizes[split])
            for split in TRAIN_VALIDATION_TEST}


def read_split(builder: tfds.core.DatasetBuilder, split: str, *,
               feature_paths: Mapping[str, str] | None = None) -> Examples:
    """The split's records, streamed in file order, and a parser for batches of them.

    TFDS's own reader (`as_dataset`) decodes example by example; parsing a
    whole batch at once costs a fraction of the CPU, which training needs.
    Nothing is cached: memory does not grow with the dataset.

    Args:
      builder: a prepared builder (`prepare`).
      split: one of its splits.
      feature_paths: model name -> feature (`--feature_map`): only those features are parsed, keyed by model
        name (one feature may feed several names). None: every feature, by its own name.
    """
    info = builder.info.features
    serialized_info = info.get_serialized_info()
    paths = dict(feature_paths) if feature_paths is not None else {name: name for name in info}
    read = sorted(set(paths.values()))
    feature_spec = {name: tf.io.FixedLenFeature(serialized_info[name].shape, serialized_info[name].tf_dtype)
                    for name in read}
    # Numbers stored as raw bytes (`Encoding.BYTES`: much cheaper to decode than a list of numbers). TFDS's
    # `decode_batch_example` would decode them example by example (`tf.map_fn`), about 1 ms of CPU per batch
    # of 64 that training needs; one `decode_raw` decodes the whole batch.
    raw_bytes = {name: (info[name].tf_dtype, info[name].shape) for name in read
                 if serialized_info[name].tf_dtype == tf.string and info[name].tf_dtype != tf.string}

    def parse_batch(serialized):
        batch = tf.io.parse_example(serialized, feature_spec)
        for name, (dtype, shape) in raw_bytes.items():
            decoded = tf.io.decode_raw(batch[name], dtype)
            if len(shape) != 1:
                decoded = tf.reshape(decoded, [-1, *shape])
            # `ensure_shape` keeps the static batch size (a reshape to [-1, ...] loses it): a train step traced
            # with an unknown batch size ran about 5 % slower.
            batch[name] = tf.ensure_shape(decoded, [*serialized.shape, *shape])
        return {key: batch[feature] for key, feature in paths.items()}

    files = [os.path.join(builder.data_dir, name) for name in builder.info.splits[split].filenames]
    return Examples(records=tf.data.TFRecordDataset(files), parse_batch=parse_batch,
                    num_examples=builder.info.splits[split].num_examples)


def feature_specs(builder: tfds.core.DatasetBuilder) -> dict[str, tf.TensorSpec]:
    """Each feature's per-example shape and dtype, as the builder declares them (class labels: int64 ids)."""
    return {name: tf.TensorSpec(feature.shape, feature.tf_dtype) for name, feature in builder.info.features.items()}
