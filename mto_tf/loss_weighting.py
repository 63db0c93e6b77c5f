"""The loss-weighting methods by name: what each is, its hyper-parameters and their defaults.

`--loss_weighting` (`TrainConfig.loss_weighting`) is a name, or a JSON object
`{"name": NAME, <hyper-parameter>: value, ...}`. This module reads and
checks it, before TensorFlow is imported; the mathematics of each method is
in `mto_tf/core/weighting/`.

Two families, as the field has them:

- loss-based: each output's loss is multiplied by a factor the method
  sets from the losses alone (one backward pass, as `fixed`);
- gradient-based: the update of the weights several outputs reach (the
  shared weights) is `sum_k a_k g_k`, with `a` a function of the Gramian
  `G = J J^T` of the outputs' gradients `g_k` of those weights.

Defaults are the papers'. Where LibMTL or TorchJD differ from the paper,
`docs/loss_weighting.md` says how, and mto_tf follows the paper.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from mto_tf.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Method:
    """One method: its family, its paper and its hyper-parameters (name -> (default, what a value must be))."""

    uses_gradients: bool
    paper: str
    parameters: Mapping[str, tuple[float, str]] = dataclasses.field(default_factory=dict)


_POSITIVE = "a number > 0"
_NON_NEGATIVE = "a number >= 0"
_PROBABILITY = "a number in [0, 1)"

METHODS: dict[str, Method] = {
    "fixed": Method(False, "sum_i w_i L_i with the --loss_weights weights (the step of model.fit)"),
    "uncertainty": Method(False, "Kendall, Gal and Cipolla 2018, Multi-task learning using uncertainty to weigh "
                                 "losses"),
    "dwa": Method(False, "Liu, Johns and Davison 2019, End-to-end multi-task learning with attention",
                  {"temperature": (2.0, _POSITIVE)}),
    "rlw": Method(False, "Lin, Ye, Xu, Shi and Zhang 2022, Reasonable effectiveness of random weighting"),
    "famo": Method(False, "Liu, Liu, Stone and Liu 2023, FAMO: fast adaptive multitask optimization",
                   {"learning_rate": (0.025, _POSITIVE), "decay": (0.001, _NON_NEGATIVE)}),
    "gradnorm": Method(True, "Chen, Badrinarayanan, Lee and Rabinovich 2018, GradNorm",
                       {"alpha": (1.5, _NON_NEGATIVE)}),
    "pcgrad": Method(True, "Yu, Kumar, Gupta, Levine, Hausman and Finn 2020, Gradient surgery for multi-task "
                           "learning"),
    "mgda": Method(True, "Sener and Koltun 2018, Multi-task learning as multi-objective optimization"),
    "cagrad": Method(True, "Liu, Liu, Jin, Stone and Liu 2021, Conflict-averse gradient descent",
                     {"c": (0.5, _PROBABILITY)}),
    "imtl": Method(True, "Liu, Li, Kuang, Xue, Chen, Yang, Liao and Zhang 2021, Towards impartial multi-task "
                         "learning (IMTL-G)"),
    "aligned_mtl": Method(True, "Senushkin, Patakin, Kuznetsov and Konushin 2023, Independent component alignment "
                                "for multi-task learning"),
    "upgrad": Method(True, "Quinton and Rey 2024, Jacobian descent for multi-objective optimization"),
}

# The methods that solve a small problem over every subset of the outputs
# (exactly, in the graph): 2^K candidates, so K is bounded.
MAX_OUTPUTS_FOR_EXACT_SOLVERS = 10
EXACT_SOLVER_METHODS = ("mgda", "cagrad", "upgrad")


@dataclasses.dataclass(frozen=True)
class LossWeighting:
    """A method by name, with every hyper-parameter's value (defaults filled in)."""

    name: str
    parameters: Mapping[str, float]

    @property
    def method(self) -> Method:
        return METHODS[self.name]

    @property
    def uses_gradients(self) -> bool:
        return self.method.uses_gradients

    def describe(self) -> str:
        """The name, and the hyper-parameters when there are any: as a log line or a sweep's row shows it."""
        given = ", ".join(f"{key}={value:g}" for key, value in self.parameters.items())
        return f"{self.name}({given})" if given else self.name


def parse(value: object) -> LossWeighting:
    """`--loss_weighting`'s value (a name or `{"name": ..., ...}`) as a `LossWeighting`; ConfigError if it is bad."""
    if isinstance(value, str):
        given: Mapping[str, object] = {"name": value.strip()}
    elif isinstance(value, Mapping):
        given = value
    else:
        raise ConfigError("loss_weighting", f"expected a method name or {{\"name\": ..., ...}}, got {value!r}")
    name = given.get("name")
    if name not in METHODS:
        raise ConfigError("loss_weighting", f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
    method = METHODS[name]
    unknown = sorted(set(given) - {"name"} - set(method.parameters))
    if unknown:
        takes = ", ".join(method.parameters) or "no hyper-parameters"
        raise ConfigError("loss_weighting", f"{name} takes {takes}; not {unknown[0]!r}")
    parameters = {}
    for key, (default, expected) in method.parameters.items():
        number = given.get(key, default)
        if not _is_valid(number, expected):
            raise ConfigError("loss_weighting", f"{name}'s {key} must be {expected}, got {number!r}")
        parameters[key] = float(number)
    return LossWeighting(name=name, parameters=parameters)


def _is_valid(number: object, expected: str) -> bool:
    if not (isinstance(number, int | float) and not isinstance(number, bool) and math.isfinite(number)):
        return False
    return {_POSITIVE: number > 0, _NON_NEGATIVE: number >= 0, _PROBABILITY: 0 <= number < 1}[expected]
