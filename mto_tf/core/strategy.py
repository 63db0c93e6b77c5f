"""`--strategy` -> a `tf.distribute.Strategy`.

`make_strategy` must run before TensorFlow executes its first op: logical
devices cannot be changed once the runtime is initialized, and a
MultiWorkerMirroredStrategy has to start its collective server first.
"""

from __future__ import annotations

import tensorflow as tf

from mto_tf import _compat
from mto_tf.config import TrainConfig
from mto_tf.errors import ConfigError


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
    # Physical, not logical, devices: listing logical ones starts the runtime,
    # which MultiWorkerMirroredStrategy must configure first.
    gpus = tf.config.list_physical_devices("GPU")
    if config.strategy == "default":
        return tf.distribute.get_strategy()
    if config.strategy == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    if gpus and config.num_cpu_devices > 1:
        raise ConfigError("num_cpu_devices", f"this machine has {len(gpus)} GPU(s); {config.strategy} uses them, "
                                             f"so do not split the CPU")
    if config.strategy == "multi_worker":
        return _multi_worker_strategy(config, gpus)
    # mirrored: one replica per GPU, or per logical CPU device without GPUs.
    if gpus:
        return tf.distribute.MirroredStrategy([gpu.name for gpu in tf.config.list_logical_devices("GPU")])
    cpus = tf.config.list_logical_devices("CPU")
    return tf.distribute.MirroredStrategy([cpu.name for cpu in cpus])


def make_cluster_resolver(config: TrainConfig) -> tf.distribute.cluster_resolver.ClusterResolver:
    """The cluster of a multi-worker run: from `TF_CONFIG`, or from SLURM's environment."""
    if config.cluster_resolver == "slurm":
        try:
            return tf.distribute.cluster_resolver.SlurmClusterResolver()
        except FileNotFoundError:
            # It counts GPUs with nvidia-smi (unless CUDA_VISIBLE_DEVICES is
            # set) and hands each task a share of them: it cannot describe
            # nodes without GPUs.
            raise ConfigError("cluster_resolver", "slurm: TensorFlow's SlurmClusterResolver needs GPU nodes and "
                                                  "found no nvidia-smi; on CPU nodes give each task its TF_CONFIG "
                                                  "and use --cluster_resolver=tf_config") from None
        except (RuntimeError, KeyError, ValueError) as error:
            raise ConfigError("cluster_resolver", f"slurm: not inside a SLURM job step started by srun ({error})") from None
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if not resolver.cluster_spec().jobs:
        raise ConfigError("strategy", "multi_worker needs a cluster: set TF_CONFIG (launch/local.py does) "
                                      "or use --cluster_resolver=slurm inside srun")
    return resolver


def _multi_worker_strategy(config: TrainConfig, gpus) -> tf.distribute.Strategy:
    resolver = make_cluster_resolver(config)
    if gpus or config.num_cpu_devices == 1:  # One replica per GPU, or one per worker on its CPU.
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    # Several logical CPU devices per worker (TensorFlow puts one replica per worker on a CPU).
    return _compat.multi_worker_strategy_on_cpu_devices(resolver, num_cpu_devices=config.num_cpu_devices)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the one worker that writes logs and final files (always, in one process)."""
    return strategy.extended.should_checkpoint


def check_batch_split(config: TrainConfig, strategy: tf.distribute.Strategy) -> int:
    """Returns the per-replica batch size; the global batch must split evenly."""
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ConfigError("batch_size", f"the global batch size {config.batch_size} does not split evenly "
                                        f"across {replicas} replicas; use a multiple of {replicas}")
    return config.batch_size // replicas
