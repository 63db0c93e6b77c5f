"""`mmoe_synthetic`: the MMoE paper's synthetic regression, two tasks whose relatedness is a setting.

Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts" (KDD 2018), Section 3.2, generated from its formulas:

1. orthogonal unit vectors u1, u2 in R^d;
2. w1 = c u1, w2 = c (p u1 + sqrt(1 - p^2) u2), p = `--task_correlation`
   in [-1, 1] (the cosine of w1 and w2, which the paper calls the "task
   correlation");
3. x ~ N(0, I_d);
4. y_i = w_i^T x + sum_{j=1..m} sin(alpha_j w_i^T x + beta_j) + eps_i,
   eps_i ~ N(0, 0.01), independent.

The constants:

- d = 100: the paper's input dimension (Section 5.1, "The input dimension is
  100").
- c = 1, m = 10, alpha_j = j and beta_j = (j - 1)^2 for j = 1..10, noise
  standard deviation 0.01. The paper gives no value of c, m, alpha or beta
  ("given parameters that control the shape of the sinusoidal functions");
  these are those of Google Research's generator of this data
  (google-research/google-research, "Simple generator for synthetic
  multi-task data", `generate_task_pairs`: `c=1.0, m=10`, `alphas =
  range(1, m + 1)`, `betas = [i ** 2 for i in range(m)]`, `noise_std=0.01`,
  noting "The original paper does not provide the values for these
  sequences"), which also reads the paper's N(0, 0.01) as a standard
  deviation of 0.01. Other reimplementations chose otherwise (c = 0.3, m = 5
  and random alpha, beta in LongmaoTeamTf/deep_recommenders), so their
  losses are not comparable with these.

Only the linear parts w1^T x and w2^T x have Pearson correlation exactly p
(jointly normal, variance c^2, covariance c^2 p). The sines lower the labels'
correlation for 0 < |p| < 1 (the paper's Figure 2 measures it); it is 0 at
p = 0 (w1^T x and w2^T x are then independent) and 1 less the noise's share
at p = 1 (y_1 - y_2 = eps_1 - eps_2). The tests compute it exactly, in
closed form, and compare.

u1, u2 (Gram-Schmidt on two Gaussian vectors), x and the noise come from
fixed seeds that do not depend on p: datasets of different correlations have
the same `features` and the same `task_a` labels, and differ in `task_b`'s
only, a controlled comparison across correlations. (The paper draws new data
for each of its runs; here the data is fixed and `--seed` varies the model.)

Features: `features` (d,) float32 (x), `task_a` and `task_b` (1,) float32
(y_1 and y_2). Splits train, validation and test, each drawn from its own
seed. The labels are computed from the float32 features as stored.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mto_tf.data import generated
from mto_tf.data.examples import Examples

SPLITS = generated.TRAIN_VALIDATION_TEST
INPUT_DIM = 100  # d: Section 5.1.
SCALE = 1.0  # c.
ALPHAS = tuple(float(j) for j in range(1, 11))  # alpha_j, j = 1..m, m = 10.
BETAS = tuple(float((j - 1) ** 2) for j in range(1, 11))  # beta_j.
NOISE_STD = 0.01
LABELS = ("task_a", "task_b")  # y_1 (of w1), y_2 (of w2).
_SEED = 2018  # Of u1, u2, and (with the split) of x and the noise.


@dataclasses.dataclass(eq=False)
class MmoeSyntheticConfig(tfds.core.BuilderConfig):
    """The correlation, input dimension and sizes; the name encodes them, so each is cached apart."""

    correlation: float = 0.5
    input_dim: int = INPUT_DIM
    train_examples: int = 10000
    validation_examples: int = 1000
    test_examples: int = 1000

    @classmethod
    def of(cls, *, correlation: float, input_dim: int, train_examples: int, validation_examples: int,
           test_examples: int) -> MmoeSyntheticConfig:
        """A config whose name records every value, e.g. `p0.5_d100_n10000_1000_1000` (`repr` of p: exact)."""
        correlation = float(correlation)
        return cls(name=f"p{correlation!r}_d{input_dim}_n{train_examples}_{validation_examples}_{test_examples}",
                   correlation=correlation, input_dim=input_dim, train_examples=train_examples,
                   validation_examples=validation_examples, test_examples=test_examples)


class MmoeSynthetic(tfds.core.GeneratorBasedBuilder):
    """Two regression tasks of a given correlation (Ma et al. 2018, Section 3.2); no download."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [MmoeSyntheticConfig.of(correlation=0.5, input_dim=INPUT_DIM, train_examples=10000,
                                              validation_examples=1000, test_examples=1000)]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "features": tfds.features.Tensor(shape=(self.builder_config.input_dim,), dtype=np.float32),
                **{label: tfds.features.Tensor(shape=(1,), dtype=np.float32) for label in LABELS},
            }),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        return generated.three_splits(self)

    def _generate_examples(self, *, split: str, num_examples: int):
        config = self.builder_config
        examples = generate(split, num_examples, correlation=config.correlation, input_dim=config.input_dim)
        for index in range(num_examples):
            yield index, {name: values[index] for name, values in examples.items()}


def task_weights(correlation: float, *, input_dim: int = INPUT_DIM) -> tuple[np.ndarray, np.ndarray]:
    """w1 = c u1 and w2 = c (p u1 + sqrt(1 - p^2) u2), float64; u1, u2 the same for every p."""
    rng = np.random.default_rng(_SEED)
    first, second = rng.standard_normal((2, input_dim))
    u1 = first / np.linalg.norm(first)
    u2 = second - (second @ u1) * u1  # Gram-Schmidt.
    u2 /= np.linalg.norm(u2)
    return SCALE * u1, SCALE * (correlation * u1 + np.sqrt(1.0 - correlation ** 2) * u2)


def generate(split: str, num_examples: int, *, correlation: float, input_dim: int = INPUT_DIM) -> dict[str, np.ndarray]:
    """`num_examples` examples of split `split`: `features` (N, d) float32, `task_a` and `task_b` (N, 1) float32."""
    rng = np.random.default_rng([_SEED, SPLITS.index(split)])
    features = rng.standard_normal((num_examples, input_dim)).astype(np.float32)
    noise = NOISE_STD * rng.standard_normal((num_examples, len(LABELS)))
    examples = {"features": features}
    for column, (label, weights) in enumerate(zip(LABELS, task_weights(correlation, input_dim=input_dim))):
        linear = features.astype(np.float64) @ weights
        sines = sum(np.sin(alpha * linear + beta) for alpha, beta in zip(ALPHAS, BETAS))
        examples[label] = (linear + sines + noise[:, column])[:, np.newaxis].astype(np.float32)
    return examples


def make_builder(config) -> MmoeSynthetic:
    """The builder for a `TrainConfig`'s `task_correlation` and `synthetic_*_examples`."""
    generated.quiet_about_configs_of(MmoeSyntheticConfig)
    builder_config = MmoeSyntheticConfig.of(
        correlation=config.task_correlation, input_dim=INPUT_DIM, train_examples=config.synthetic_train_examples,
        validation_examples=config.synthetic_validation_examples, test_examples=config.synthetic_test_examples)
    return generated.builder_of(MmoeSynthetic, builder_config, data_dir=config.data_dir)


def load(config, split: str, *, feature_paths=None) -> Examples:
    """Generates (once per data dir) and returns one split as `Examples`.

    Args:
      config: a `TrainConfig`; its `task_correlation` and `synthetic_*_examples` pick the builder config.
      split: one of SPLITS.
      feature_paths: model name -> feature, to read (`generated.read_split`); None: every feature by its name.
    """
    builder = generated.prepare(
        lambda: make_builder(config),
        what=f"mmoe_synthetic (task correlation {config.task_correlation}; {config.synthetic_train_examples} "
             f"train, {config.synthetic_validation_examples} validation, {config.synthetic_test_examples} test "
             f"examples)")
    return generated.read_split(builder, split, feature_paths=feature_paths)


def feature_specs(config) -> dict[str, tf.TensorSpec]:
    """Each feature's per-example shape and dtype: `features` (d,), `task_a` and `task_b` (1,), float32."""
    return generated.feature_specs(make_builder(config))
