"""`--strategy` -> a `tf.distribute.Strategy`.

`configure_devices` must run before TensorFlow executes its first op: logical
devices cannot be changed once the runtime is initialized.
"""

from __future__ import annotations

import tensorflow as tf

from mto_tf.config import ConfigError, TrainConfig


def configure_devices(config: TrainConfig) -> None:
    """Splits the CPU into `config.num_cpu_devices` logical devices, if asked to.

    This is how `mirrored` runs with several replicas on a machine without
    GPUs: each logical CPU device holds one replica.
    """
    if config.num_cpu_devices == 1:
        return
    cpus = tf.config.list_physical_devices("CPU")
    wanted = [tf.config.LogicalDeviceConfiguration()] * config.num_cpu_devices
    try:
        if tf.config.get_logical_device_configuration(cpus[0]) != wanted:
            tf.config.set_logical_device_configuration(cpus[0], wanted)
    except RuntimeError as error:  # "Virtual devices cannot be modified after being initialized".
        raise ConfigError("num_cpu_devices", f"TensorFlow is already running, so the CPU can no longer "
                                             f"be split ({error}); configure devices first") from None


def make_strategy(config: TrainConfig) -> tf.distribute.Strategy:
    """Returns the strategy named by `config.strategy` (devices must be configured first)."""
    configure_devices(config)
    gpus = tf.config.list_logical_devices("GPU")
    if config.strategy == "default":
        return tf.distribute.get_strategy()
    if config.strategy == "one_device":
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    # mirrored: one replica per GPU, or per logical CPU device without GPUs.
    if gpus:
        if config.num_cpu_devices > 1:
            raise ConfigError("num_cpu_devices", f"this machine has {len(gpus)} GPU(s); mirrored uses them, "
                                                 f"so do not split the CPU")
        return tf.distribute.MirroredStrategy([gpu.name for gpu in gpus])
    cpus = tf.config.list_logical_devices("CPU")
    return tf.distribute.MirroredStrategy([cpu.name for cpu in cpus])


def check_batch_split(config: TrainConfig, strategy: tf.distribute.Strategy) -> int:
    """Returns the per-replica batch size; the global batch must split evenly."""
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ConfigError("batch_size", f"the global batch size {config.batch_size} does not split evenly "
                                        f"across {replicas} replicas; use a multiple of {replicas}")
    return config.batch_size // replicas
