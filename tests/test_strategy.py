"""`--strategy` builds the strategy it names, and says so when it cannot."""

import json
import os

import pytest
import tensorflow as tf

from helpers import NUM_CPU_DEVICES, small_config
from mto_tf.core.strategy import check_batch_split, make_cluster_resolver, make_strategy
from mto_tf.errors import ConfigError


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


def test_multi_worker_without_a_cluster_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="^--strategy: multi_worker needs a cluster: set TF_CONFIG"):
        make_cluster_resolver(small_config(tmp_path, strategy="multi_worker"))


def test_tf_config_cluster_resolver_reads_the_task(tmp_path, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["127.0.0.1:5000", "127.0.0.1:5001"]},
                                                "task": {"type": "worker", "index": 1}}))
    resolver = make_cluster_resolver(small_config(tmp_path, strategy="multi_worker"))
    assert resolver.cluster_spec().as_dict() == {"worker": ["127.0.0.1:5000", "127.0.0.1:5001"]}
    assert (resolver.task_type, resolver.task_id) == ("worker", 1)


def test_slurm_cluster_resolver_reads_the_job_step(tmp_path, monkeypatch):
    config = small_config(tmp_path, strategy="multi_worker", cluster_resolver="slurm")
    for name in [name for name in os.environ if name.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    with pytest.raises(ConfigError, match="^--cluster_resolver: slurm: not inside a SLURM job step"):
        make_cluster_resolver(config)

    # What srun sets for task 1 of 2 on one node.
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "localhost")
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "2")
    # This machine has no nvidia-smi: TensorFlow's resolver cannot share out
    # GPUs, and the error says what to do instead.
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="^--cluster_resolver: slurm: .* needs GPU nodes"):
        make_cluster_resolver(config)
    # A node with 2 GPUs: each task gets one, and the cluster is the step's tasks.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    resolver = make_cluster_resolver(config)
    assert resolver.cluster_spec().as_dict() == {"worker": ["localhost:8888", "localhost:8889"]}
    assert (resolver.task_type, resolver.task_id) == ("worker", 1)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"  # Task 1's GPU, set for TensorFlow to see.
