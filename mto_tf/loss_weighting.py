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


# What a gradient method may claim of its weights `a = f(G)`; tests/test_loss_weighting.py checks each claim
# of each method that makes it.
ORDER_INVARIANT = "order_invariant"  # The outputs in another order: the same weights, in that order.
NON_CONFLICTING = "non_conflicting"  # The update `d = a J` increases no output's loss to first order: `J d >= 0`.
SCALE_INVARIANT = "scale_invariant"  # The same weights for the gradients scaled by any factor (1e-6 to 1e6).
FINITE = "finite"  # Finite weights for any gradients: scaled, linearly dependent, some or all of them zero.
CLAIMS = (ORDER_INVARIANT, NON_CONFLICTING, SCALE_INVARIANT, FINITE)


@dataclasses.dataclass(frozen=True)
class MethodDescription:
    """One method: its paper, its hyper-parameters, what it computes from, what it claims, where its code is.

    `computed_by` names, as `MODULE:NAME` in `mto_tf/core/weighting/`, the
    class of a method with state (learned values, histories, seeded draws)
    or the function `f(G, present, **hyper-parameters) -> a` of a method
    that is a function of the Gramian alone (`present`: the outputs with a
    labelled example in the batch); `fixed`'s step is the train step's own.
    """

    paper: str
    computed_by: str | None
    # Each hyper-parameter's name -> (its default, what a value must be).
    parameters: Mapping[str, tuple[float, str]] = dataclasses.field(default_factory=dict)
    uses_gradients: bool = False  # Needs each output's gradient (their Gramian), not the losses alone.
    claims: tuple[str, ...] = ()  # Of CLAIMS.


_POSITIVE = "a number > 0"
_NON_NEGATIVE = "a number >= 0"
_PROBABILITY = "a number in [0, 1)"
_UNORDERED_AND_BOUNDED = (ORDER_INVARIANT, SCALE_INVARIANT, FINITE)

METHODS: dict[str, MethodDescription] = {
    "fixed": MethodDescription("sum_i w_i L_i with the --loss_weights weights (the step of model.fit)", None),
    "uncertainty": MethodDescription("Kendall, Gal and Cipolla 2018, Multi-task learning using uncertainty to "
                                     "weigh losses", "methods:Uncertainty"),
    "dwa": MethodDescription("Liu, Johns and Davison 2019, End-to-end multi-task learning with attention",
                             "methods:DynamicWeightAverage", {"temperature": (2.0, _POSITIVE)}),
    "rlw": MethodDescription("Lin, Ye, Xu, Shi and Zhang 2022, Reasonable effectiveness of random weighting",
                             "methods:RandomLossWeighting"),
    "famo": MethodDescription("Liu, Liu, Stone and Liu 2023, FAMO: fast adaptive multitask optimization",
                              "methods:FastAdaptiveMultitask",
                              {"learning_rate": (0.025, _POSITIVE), "decay": (0.001, _NON_NEGATIVE)}),
    # Its weights are its logits' softmax, whatever G is; the logits learn at the rate of the gradients' norms.
    "gradnorm": MethodDescription("Chen, Badrinarayanan, Lee and Rabinovich 2018, GradNorm", "methods:GradNorm",
                                  {"alpha": (1.5, _NON_NEGATIVE)}, uses_gradients=True, claims=(FINITE,)),
    # Its random order of the others breaks ties by output order: not ORDER_INVARIANT.
    "pcgrad": MethodDescription("Yu, Kumar, Gupta, Levine, Hausman and Finn 2020, Gradient surgery for multi-task "
                                "learning", "methods:ProjectingConflictingGradients", uses_gradients=True,
                                claims=(SCALE_INVARIANT, FINITE)),
    "mgda": MethodDescription("Sener and Koltun 2018, Multi-task learning as multi-objective optimization",
                              "gradient_methods:mgda", uses_gradients=True, claims=CLAIMS),
    "cagrad": MethodDescription("Liu, Liu, Jin, Stone and Liu 2021, Conflict-averse gradient descent",
                                "gradient_methods:cagrad", {"c": (0.5, _PROBABILITY)}, uses_gradients=True,
                                claims=_UNORDERED_AND_BOUNDED),
    "imtl": MethodDescription("Liu, Li, Kuang, Xue, Chen, Yang, Liao and Zhang 2021, Towards impartial multi-task "
                              "learning (IMTL-G)", "gradient_methods:imtl", uses_gradients=True,
                              claims=_UNORDERED_AND_BOUNDED),
    "aligned_mtl": MethodDescription("Senushkin, Patakin, Kuznetsov and Konushin 2023, Independent component "
                                     "alignment for multi-task learning", "gradient_methods:aligned_mtl",
                                     uses_gradients=True, claims=_UNORDERED_AND_BOUNDED),
    "upgrad": MethodDescription("Quinton and Rey 2024, Jacobian descent for multi-objective optimization",
                                "gradient_methods:upgrad", uses_gradients=True, claims=CLAIMS),
}


def claimed(claim: str) -> list[str]:
    """The methods that claim `claim` (of CLAIMS), in catalog order."""
    return [name for name, description in METHODS.items() if claim in description.claims]


@dataclasses.dataclass(frozen=True)
class LossWeighting:
    """A method by name, with every hyper-parameter's value (defaults filled in)."""

    name: str
    parameters: Mapping[str, float]

    @property
    def description(self) -> MethodDescription:
        return METHODS[self.name]

    @property
    def uses_gradients(self) -> bool:
        return self.description.uses_gradients

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
    description = METHODS[name]
    unknown = sorted(set(given) - {"name"} - set(description.parameters))
    if unknown:
        takes = ", ".join(description.parameters) or "no hyper-parameters"
        raise ConfigError("loss_weighting", f"{name} takes {takes}; not {unknown[0]!r}")
    parameters = {}
    for key, (default, expected) in description.parameters.items():
        number = given.get(key, default)
        if not _is_valid(number, expected):
            raise ConfigError("loss_weighting", f"{name}'s {key} must be {expected}, got {number!r}")
        parameters[key] = float(number)
    return LossWeighting(name=name, parameters=parameters)


def _is_valid(number: object, expected: str) -> bool:
    if not (isinstance(number, int | float) and not isinstance(number, bool) and math.isfinite(number)):
        return False
    return {_POSITIVE: number > 0, _NON_NEGATIVE: number >= 0, _PROBABILITY: 0 <= number < 1}[expected]
