"""`--log_gradient_shares_every`: each output's share of each layer's gradient, logged during training."""

from __future__ import annotations

from collections.abc import Callable

from mto_tf.core import gradient_shares
from mto_tf.run.setup import Run


def make_gradient_share_measurement(run: Run) -> Callable[[], dict[str, float]]:
    """Returns `measure()`: each output's share of each layer's gradient at the current weights, as log values.

    On the next batch of its own pass over the training data, under the
    run's strategy (gradients summed over replicas); it changes neither the
    weights nor the training batches.
    """
    setup = run.setup
    contributions = gradient_shares.make_gradient_contributions(
        objective=run.objective, strategy=setup.strategy,
        global_batch_size=setup.global_batch_sizes, method=run.method)
    batches = iter(setup.training_batches())

    def measure() -> dict[str, float]:
        report = gradient_shares.layer_report(setup.model, contributions(next(batches)),
                                              loss_weights=run.loss_weights.numbers())
        return gradient_shares.as_record(report)

    return measure
