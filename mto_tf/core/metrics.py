"""Per-output Keras metrics, resolved and named as `compile` and `fit` do.

`compile`'s own `get_metric` (keras/src/trainers/compile_utils.py) makes each
metric: `"accuracy"` and `"acc"` become Binary, SparseCategorical or
Categorical accuracy from the label and prediction shapes, and keep the name
the user wrote. `fit`'s history then calls it `<output>_<name>`
(`main_output_accuracy`, `priority_mae`); so does `metrics.jsonl`.
"""

from __future__ import annotations

from collections.abc import Mapping

import keras
import numpy as np
import tensorflow as tf

from mto_tf import _compat
from mto_tf.core import user_code
from mto_tf.errors import ConfigError, describe_error


def resolve_identifiers(metrics: Mapping[str, tuple], *, output_names: list[str]) -> dict[str, list]:
    """Each output's metric identifiers, `MODULE:FUNCTION` imported: what `compile(metrics=...)` takes."""
    unknown = sorted(set(metrics) - set(output_names))
    if unknown:
        raise ConfigError("metrics", f"unknown output {unknown[0]!r}; the model has outputs {output_names}")
    return {output: [user_code.resolve_identifier(spec, output=output, flag="metrics") for spec in specs]
            for output, specs in metrics.items()}


def make_output_metrics(identifiers: Mapping[str, list], *, y_true: Mapping[str, tf.TensorSpec],
                        y_pred: Mapping[str, tf.TensorSpec]) -> dict[str, tuple[str, keras.metrics.Metric]]:
    """Creates the metrics; call inside `strategy.scope()` so their variables are distributed.

    Returns:
      `{log_name: (output_name, metric)}`, where `log_name` is what `fit` reports,
      e.g. `main_output_binary_accuracy`.
    """
    output_metrics = {}
    for output, output_identifiers in identifiers.items():
        for identifier in output_identifiers:
            try:
                metric = _compat.get_metric(identifier, y_true[output], y_pred[output])
            except Exception as error:  # Keras raises ValueError, TypeError, ... for unknown names.
                raise ConfigError("metrics", f"output {output!r}: Keras cannot make a metric of {identifier!r} "
                                             f"({describe_error(error)})") from None
            _try_on_zeros(metric, output=output, y_true=y_true[output], y_pred=y_pred[output])
            log_name = f"{output}_{metric.name}"
            if log_name in output_metrics:
                raise ConfigError("metrics", f"output {output!r}: metric {metric.name!r} given twice")
            output_metrics[log_name] = (output, metric)
    return output_metrics


def _try_on_zeros(metric: keras.metrics.Metric, *, output: str, y_true, y_pred) -> None:
    """One update on a batch of zeros shaped as the output's labels and predictions, then reset.

    It builds the metrics Keras builds on their first update (F1Score's
    variables take the number of classes from it) in the strategy's scope,
    and a metric that cannot take this output fails here, before anything
    is written, not in the first step.
    """
    def zeros(spec):
        shape = [2, *(1 if size is None else size for size in tuple(spec.shape)[1:])]
        return tf.zeros(shape, dtype=spec.dtype)

    try:
        metric.update_state(zeros(y_true), zeros(y_pred))
        metric.result()
    except Exception as error:  # Whatever Keras raises for shapes or dtypes it cannot take.
        raise ConfigError("metrics", f"output {output!r}: metric {metric.name!r} cannot take its labels "
                                     f"{tuple(y_true.shape)} and predictions {tuple(y_pred.shape)} "
                                     f"({describe_error(error)})") from None
    metric.reset_state()


def results_and_reset(output_metrics: Mapping[str, tuple[str, keras.metrics.Metric]]) -> dict[str, float | list]:
    """Each metric's result since it was last read, by log name; the metrics start again from zero.

    A result with a value per class (F1Score, FBetaScore with `average=None`) is a list of floats.
    """
    results = {}
    for log_name, (_, metric) in output_metrics.items():
        results[log_name] = log_value(metric.result())
        metric.reset_state()
    return results


def log_value(result) -> float | list:
    """A metric's result as the logs hold it: a float, or a list of floats for a value per class."""
    result = np.asarray(result, dtype=np.float64)
    return float(result) if result.ndim == 0 else result.ravel().tolist()
