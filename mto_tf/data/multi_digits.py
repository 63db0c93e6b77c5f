"""`multi_digits`: two real handwritten digits on one small canvas, one label each; a Multi-MNIST made locally.

Sener and Koltun ("Multi-Task Learning as Multi-Objective Optimization",
NeurIPS 2018, Section 6.1) turn MNIST into two tasks: "For each image, a
different one is chosen uniformly in random. Then one of these images is put
at the top-left and the other one is at the bottom-right"; the tasks classify
the top-left digit (task-L) and the bottom-right one (task-R). Their loader
(`multi_mnist_loader.py`) pastes two 28x28 digits on a 36x36 canvas, the left
one at (0, 0) and the right one 6 pixels down and right, keeps the maximum
where they overlap (22 of 28 pixels each way), and resizes to 28x28. Sabour et
al. (2017), whose MultiMNIST they follow, shift each digit at random, up to 4
pixels each way.

The same recipe, scaled from 28-pixel MNIST digits to scikit-learn's 8x8
ones (`sklearn.datasets.load_digits`: 1,797 real scans, UCI's "Optical
Recognition of Handwritten Digits" test set, values 0..16, shipped inside the
wheel: nothing is downloaded), without the resize:

- canvas 12x12; the left digit's top-left corner at (row, column), each drawn
  from {0, 1, 2}; the right digit's from {2, 3, 4}: the right digit is on
  average 2 pixels down and right of the left one (Sener and Koltun's 6 of 28
  pixels is 1.7 of 8), and each digit is shifted by up to 2 pixels from its
  place (Sabour et al.'s 4 of 28 is 1.1 of 8); a draw that puts both corners
  on the same pixel is drawn again (no pixel would tell which digit is left);
- where the digits overlap (4 to 8 of 8 pixels each way, 6 on average: 75 %;
  scikit-learn's digits fill their frame, MNIST's sit in its middle 20 of 28
  pixels, and Sener and Koltun's overlap by 14 of those 20 each way, 70 %),
  the brighter pixel is kept (`max`);
- pixels scaled from 0..16 to 0..255 (rounded), as MNIST's: `image` is uint8,
  (12, 12, 1); divide by 255 in the model;
- each scan of a split's pool is the left digit equally often (a shuffled pass
  over the pool after another, as each MNIST image is once in Sener and
  Koltun's), the right digit another scan of the same pool, uniformly.

Splits from disjoint scans: the 1,797 scans are partitioned once, with a
fixed seed, by digit class (70 % of each class's scans train, 15 %
validation, 15 % test: 1,258, 269 and 270 scans), and each split's pairs are
made within its own pool (`scan_pools`). The data does not say who wrote
which scan, so the writers of the splits may overlap. Examples are a fixed
function of the sizes (`compose`): the same sizes, the same bytes.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mto_tf.data import generated
from mto_tf.data.examples import Examples

SPLITS = generated.TRAIN_VALIDATION_TEST
CANVAS_SIZE = 12
DIGIT_SIZE = 8
NUM_CLASSES = 10
_LEFT_CORNERS = (0, 1, 2)  # Per axis: where the left digit's top-left pixel may be.
_RIGHT_CORNERS = (2, 3, 4)  # And the right digit's.
_POOL_FRACTIONS = (0.70, 0.15)  # Of each class's scans: train, validation; test takes the rest.
_SEED = 2018  # Of the partition of the scans and of each split's pairs and positions.


@dataclasses.dataclass(eq=False)
class MultiDigitsConfig(tfds.core.BuilderConfig):
    """Sizes of the generated splits; the name encodes them, so each size is cached apart."""

    train_examples: int = 10000
    validation_examples: int = 1000
    test_examples: int = 1000

    @classmethod
    def of_sizes(cls, *, train_examples: int, validation_examples: int, test_examples: int) -> MultiDigitsConfig:
        """A config whose name records every size, e.g. `n10000_1000_1000`."""
        return cls(name=f"n{train_examples}_{validation_examples}_{test_examples}", train_examples=train_examples,
                   validation_examples=validation_examples, test_examples=test_examples)


class MultiDigits(tfds.core.GeneratorBasedBuilder):
    """Two handwritten digits per canvas, labels `left` and `right`; built from scikit-learn's digits, no download."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [MultiDigitsConfig.of_sizes(train_examples=10000, validation_examples=1000, test_examples=1000)]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                # Raw bytes: decoded a batch at a time (`generated.read_split`).
                "image": tfds.features.Tensor(shape=(CANVAS_SIZE, CANVAS_SIZE, 1), dtype=np.uint8,
                                              encoding=tfds.features.Encoding.BYTES),
                "left": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                "right": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
            }),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        return generated.three_splits(self)

    def _generate_examples(self, *, split: str, num_examples: int):
        pairs = compose(split, num_examples)
        for index in range(num_examples):
            yield index, {"image": pairs["image"][index], "left": int(pairs["left"][index]),
                          "right": int(pairs["right"][index])}


@functools.cache
def digit_scans() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digit scans as uint8 (8, 8) images scaled to 0..255, and their digits (int64)."""
    from sklearn.datasets import load_digits  # Only when data is made: it costs about 0.4 s.

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    images.flags.writeable = False
    targets = digits.target.astype(np.int64)
    targets.flags.writeable = False
    return images, targets


@functools.cache
def scan_pools() -> dict[str, np.ndarray]:
    """Split -> the scans (indices into `digit_scans`, sorted) its examples are made of; disjoint."""
    _, targets = digit_scans()
    rng = np.random.default_rng(_SEED)
    parts: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    for digit in range(NUM_CLASSES):
        scans = rng.permutation(np.flatnonzero(targets == digit))
        train_end = round(_POOL_FRACTIONS[0] * len(scans))
        validation_end = train_end + round(_POOL_FRACTIONS[1] * len(scans))
        for split, chosen in zip(SPLITS, np.split(scans, [train_end, validation_end])):
            parts[split].append(chosen)
    return {split: np.sort(np.concatenate(chosen)) for split, chosen in parts.items()}


def compose(split: str, num_examples: int) -> dict[str, np.ndarray]:
    """`num_examples` canvases of split `split`, and how each was made (a fixed function of its arguments).

    Returns:
      `image` (N, 12, 12, 1) uint8, `left` and `right` (N,) int64 digits; and the scans placed (`left_scan`,
      `right_scan`, indices into `digit_scans`) at which top-left pixels (`left_corner`, `right_corner`: (N, 2)
      rows and columns).
    """
    images, targets = digit_scans()
    pool = scan_pools()[split]
    rng = np.random.default_rng([_SEED, SPLITS.index(split)])
    passes = -(-num_examples // len(pool))
    left_scan = np.concatenate([rng.permutation(pool) for _ in range(passes)])[:num_examples]
    # Another scan of the pool, uniformly: a step of 1 to len - 1 places along it, from the left one.
    steps = rng.integers(1, len(pool), size=num_examples)
    right_scan = pool[(np.searchsorted(pool, left_scan) + steps) % len(pool)]
    left_corner = rng.choice(_LEFT_CORNERS, size=(num_examples, 2))
    right_corner = rng.choice(_RIGHT_CORNERS, size=(num_examples, 2))
    while (same := np.all(left_corner == right_corner, axis=1)).any():
        right_corner[same] = rng.choice(_RIGHT_CORNERS, size=(int(same.sum()), 2))
    canvases = np.zeros((num_examples, CANVAS_SIZE, CANVAS_SIZE), np.uint8)
    for index in range(num_examples):
        (left_row, left_column), (right_row, right_column) = left_corner[index], right_corner[index]
        canvases[index, left_row:left_row + DIGIT_SIZE, left_column:left_column + DIGIT_SIZE] = images[left_scan[index]]
        overlap = canvases[index, right_row:right_row + DIGIT_SIZE, right_column:right_column + DIGIT_SIZE]
        np.maximum(overlap, images[right_scan[index]], out=overlap)
    return {"image": canvases[..., np.newaxis], "left": targets[left_scan], "right": targets[right_scan],
            "left_scan": left_scan, "right_scan": right_scan, "left_corner": left_corner,
            "right_corner": right_corner}


def make_builder(config) -> MultiDigits:
    """The builder for a `TrainConfig`'s `synthetic_*_examples`."""
    generated.quiet_about_configs_of(MultiDigitsConfig)
    builder_config = MultiDigitsConfig.of_sizes(train_examples=config.synthetic_train_examples,
                                                validation_examples=config.synthetic_validation_examples,
                                                test_examples=config.synthetic_test_examples)
    return generated.builder_of(MultiDigits, builder_config, data_dir=config.data_dir)


def load(config, split: str, *, feature_paths=None) -> Examples:
    """Generates (once per data dir) and returns one split as `Examples`.

    Args:
      config: a `TrainConfig`; its `synthetic_*_examples` pick the builder config.
      split: one of SPLITS.
      feature_paths: model name -> feature, to read (`generated.read_split`); None: every feature by its name.
    """
    builder = generated.prepare(
        lambda: make_builder(config),
        what=f"multi_digits ({config.synthetic_train_examples} train, {config.synthetic_validation_examples} "
             f"validation, {config.synthetic_test_examples} test examples)")
    return generated.read_split(builder, split, feature_paths=feature_paths)


def feature_specs(config) -> dict[str, tf.TensorSpec]:
    """Each feature's per-example shape and dtype: `image` (12, 12, 1) uint8, `left` and `right` () int64."""
    return generated.feature_specs(make_builder(config))
