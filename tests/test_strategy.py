"""`--strategy` builds the strategy it names, and says so when it cannot."""

import pytest
import tensorflow as tf

from conftest import NUM_CPU_DEVICES, small_config
from mto_tf.config import ConfigError
from mto_tf.strategy import check_batch_split, make_strategy


def test_default_and_one_device_strategies(tmp_path):
    assert make_strategy(small_config(tmp_path)) is tf.distribute.get_strategy()
    one_device = make_strategy(small_config(tmp_path, strategy="one_device"))
    assert isinstance(one_device, tf.distribute.OneDeviceStrategy)
    assert one_device.extended.worker_devices == ("/job:localhost/replica:0/task:0/device:CPU:0",)


def test_cpu_cannot_be_split_again_once_tensorflow_runs(tmp_path):
    # conftest split the CPU into 2 devices before any op; asking for 2 again
    # is fine, asking for 3 now is too late and must say so, naming the flag.
    config = small_config(tmp_path, strategy="mirrored", num_cpu_devices=NUM_CPU_DEVICES + 1)
    with pytest.raises(ConfigError, match="^--num_cpu_devices: TensorFlow is already running"):
        make_strategy(config)


def test_global_batch_must_split_evenly_across_replicas(tmp_path, mirrored_strategy):
    assert check_batch_split(small_config(tmp_path, batch_size=16), mirrored_strategy) == 8
    with pytest.raises(ConfigError, match="^--batch_size: the global batch size 15 does not split evenly "
                                          "across 2 replicas; use a multiple of 2"):
        check_batch_split(small_config(tmp_path, batch_size=15), mirrored_strategy)
