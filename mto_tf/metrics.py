"""Per-output Keras metrics, named as `model.fit` names them (`<output>_<metric>`)."""

from __future__ import annotations

from collections.abc import Mapping

import keras

from mto_tf.config import ConfigError

# compile() turns these into a metric that depends on the output's shape;
# a custom loop has to be told which one it means.
_AMBIGUOUS = ("accuracy", "acc", "crossentropy", "ce")


def get_metric(name: str) -> keras.metrics.Metric:
    """Returns a new Keras metric object called `name`, or a `ConfigError` naming --metrics."""
    if name in _AMBIGUOUS:
        raise ConfigError("metrics", f"{name!r} is ambiguous; name the metric, e.g. 'binary_accuracy'")
    try:
        metric = keras.metrics.get(name)
    except ValueError:
        metric = None
    if not isinstance(metric, keras.metrics.Metric):
        raise ConfigError("metrics", f"expected a Keras metric name such as 'binary_accuracy' or 'auc', got {name!r}")
    return metric


def make_output_metrics(metrics: Mapping[str, tuple[str, ...]]) -> dict[str, tuple[str, keras.metrics.Metric]]:
    """Creates the metrics; call inside `strategy.scope()` so their variables are distributed.

    Returns:
      `{log_name: (output_name, metric)}`, where `log_name` is what `fit` reports,
      e.g. `main_output_binary_accuracy`.
    """
    output_metrics = {}
    for output_name, metric_names in metrics.items():
        for metric_name in metric_names:
            metric = get_metric(metric_name)
            output_metrics[f"{output_name}_{metric.name}"] = (output_name, metric)
    return output_metrics
