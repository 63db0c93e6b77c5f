"""Every use of Keras's and TensorFlow's private APIs, each behind a function named for what it does.

mto_tf's parity with `model.fit` rests on reading or changing Keras
internals in a few places; each function below names the file it mirrors,
so that a Keras or TensorFlow upgrade means reading those files again and
running the parity tests. They were written against the pinned versions
(`pyproject.toml`); `check_versions` refuses any other, with a message
saying so, when this module is first imported.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras.src.trainers import compile_utils
from tensorflow.python.distribute import collective_all_reduce_strategy, collective_util, distribute_lib

# The minor versions the parity tests were run against: TensorFlow 2.21 brings Keras 3.15.
PINNED_TENSORFLOW = "2.21"
PINNED_KERAS = "3.15"


def check_versions(tensorflow_version: str = tf.__version__, keras_version: str = keras.__version__) -> None:
    """Raises `RuntimeError` unless TensorFlow and Keras are the minor versions mto_tf was written against."""
    for name, version, pinned in (("TensorFlow", tensorflow_version, PINNED_TENSORFLOW),
                                  ("Keras", keras_version, PINNED_KERAS)):
        if version.split(".")[:2] != pinned.split("."):
            raise RuntimeError(
                f"mto_tf needs {name} {pinned}.x (it reads Keras internals that other versions change), found "
                f"{version}; install it as README says: pip install -e . (tensorflow~={PINNED_TENSORFLOW}.0)")


def get_loss(identifier, y_true, y_pred) -> keras.losses.Loss:
    """A loss exactly as `compile(loss=...)` makes it from the label and prediction shapes.

    Mirrors `get_loss` in keras/src/trainers/compile_utils.py.
    """
    return compile_utils.get_loss(identifier, y_true, y_pred)


def get_metric(identifier, y_true, y_pred) -> keras.metrics.Metric:
    """A metric exactly as `compile(metrics=...)` makes it ("accuracy" chosen from the shapes, named as written).

    Mirrors `get_metric` in keras/src/trainers/compile_utils.py.
    """
    return compile_utils.get_metric(identifier, y_true, y_pred)


def metric_direction(metric: keras.metrics.Metric) -> str | None:
    """"up" or "down": the direction Keras's `ModelCheckpoint` and `EarlyStopping` read off a metric; None if it declares none.

    Mirrors `_set_monitor_op` in keras/src/callbacks/monitor_callback.py (it reads `metric._direction`).
    """
    return getattr(metric, "_direction", None)


def apply_gradients_without_all_reduce(optimizer: keras.optimizers.Optimizer) -> None:
    """Makes Keras's TF optimizer apply gradients as given, for gradients already summed over replicas.

    `_all_reduce_sum_gradients` in keras/src/backend/tensorflow/optimizer.py
    is the one place Keras sums gradients over replicas; everything after it
    (clipping, the update of each replica's copy of each variable) stays Keras's.
    """
    if not callable(getattr(optimizer, "_all_reduce_sum_gradients", None)):
        raise RuntimeError(f"Keras {keras.__version__}'s optimizer has no _all_reduce_sum_gradients; "
                           f"mto_tf was written against Keras {PINNED_KERAS}")
    optimizer._all_reduce_sum_gradients = list


class _CpuDevicesExtended(collective_all_reduce_strategy.CollectiveAllReduceExtended):
    """Puts one replica on each logical CPU device of a worker instead of one per worker."""

    def __init__(self, *args, num_cpu_devices: int, **kwargs):
        self._num_cpu_devices = num_cpu_devices  # Read by the parent's __init__, below.
        super().__init__(*args, **kwargs)

    def _initialize_local_devices(self, cluster_resolver, worker_device):
        devices, device_type = super()._initialize_local_devices(cluster_resolver, worker_device)
        if device_type != "CPU":
            return devices, device_type
        return tuple(f"{worker_device}/device:CPU:{index}" for index in range(self._num_cpu_devices)), "CPU"


class _MultiWorkerOnCpuDevices(tf.distribute.MultiWorkerMirroredStrategy):
    """MultiWorkerMirroredStrategy with `num_cpu_devices` replicas per worker, for machines without GPUs."""

    def __init__(self, cluster_resolver, *, num_cpu_devices: int):
        distribute_lib.Strategy.__init__(self, _CpuDevicesExtended(
            self, cluster_resolver=cluster_resolver, communication_options=collective_util.Options(),
            num_cpu_devices=num_cpu_devices))


def multi_worker_strategy_on_cpu_devices(cluster_resolver, *, num_cpu_devices: int) -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy with `num_cpu_devices` replicas per worker on its logical CPU devices.

    TensorFlow puts one replica per worker on a machine without GPUs;
    this overrides `_initialize_local_devices` of `CollectiveAllReduceExtended`
    in tensorflow/python/distribute/collective_all_reduce_strategy.py.
    """
    return _MultiWorkerOnCpuDevices(cluster_resolver, num_cpu_devices=num_cpu_devices)


check_versions()
