"""Adaptive loss weighting: the methods of `--loss_weighting`, exact under every tf.distribute strategy.

- `adaptive_step.py`: the train step's gradient function for a method (it
  plugs in where `core/step.py`'s `fixed_weights` would), and the one place
  a method reads the Gramian (`method_weights`, which normalizes it);
- `gramian.py`: each output's gradient of the shared weights, their Gramian
  `G = J J^T`, and the combined update `sum_k a_k g_k`;
- `methods.py`: each method's state and its part of the step;
- `gradient_methods.py` and `solvers.py`: the weights as functions of `G`;
- `representation.py`: `--weighting_gradients=representation:LAYER` (MGDA-UB).

The names, hyper-parameters and claims of the methods are in
`mto_tf/loss_weighting.py`, one description each.
"""

from __future__ import annotations

from mto_tf.core.weighting.adaptive_step import adaptive_weights, global_values, method_weights
from mto_tf.core.weighting.methods import Method, make_method
from mto_tf.core.weighting.representation import Representation, make_representation

__all__ = ["Method", "Representation", "adaptive_weights", "global_values", "make_method", "make_representation",
           "method_weights"]
