"""Shared set-up: two logical CPU devices, one MirroredStrategy, one generated dataset, Keras's policy restored.

The CPU must be split before TensorFlow runs its first op, so it happens
when pytest configures a process that runs tests, before any test module is
imported. TensorFlow holds one MirroredStrategy per process well (a second
one broke collectives when batch shapes changed), so every mirrored test
shares the session's.

The suite runs in two processes (pytest-xdist); the process that hands them
their tests runs none, so it never imports TensorFlow (about 10 s of CPU).
"""

import os
import shutil
import tempfile

import pytest

# The longest first, the quick ones last: the two test processes take tests in
# this order as they become free, so neither waits long for the other at the end.
_LONGEST_MODULES = ("test_multi_worker.py", "test_bench.py")


def _runs_tests(config) -> bool:
    """False in pytest-xdist's controller process, which only hands tests to the others."""
    return bool(os.environ.get("PYTEST_XDIST_WORKER")) or not config.getoption("numprocesses", default=None)


def pytest_configure(config):
    if not _runs_tests(config):
        return
    # As every program starts: TensorFlow imported without its start-up chatter.
    from mto_tf.programs import tensorflow_logs
    tensorflow_logs.import_tensorflow_quietly()
    import tensorflow as tf

    import helpers

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * helpers.NUM_CPU_DEVICES)
    # synthetic_headlines is generated once per size for the whole session
    # (its builder locks the directory, so programs the tests start share it).
    helpers.SESSION_DIR = tempfile.mkdtemp(prefix="mto_tf_tests_")


def pytest_unconfigure(config):
    if _runs_tests(config):
        import helpers
        shutil.rmtree(helpers.SESSION_DIR, ignore_errors=True)


def pytest_collection_modifyitems(items):
    def order(item):
        longest = item.path.name in _LONGEST_MODULES
        return 0 if longest else 1 if item.get_closest_marker("slow") else 2

    items.sort(key=order)  # Stable: each module's tests keep their order.


@pytest.fixture(scope="session")
def mirrored_strategy():
    """The session's one MirroredStrategy over the two logical CPU devices."""
    import tensorflow as tf

    import helpers

    devices = [device.name for device in tf.config.list_logical_devices("CPU")]
    assert len(devices) == helpers.NUM_CPU_DEVICES
    return tf.distribute.MirroredStrategy(devices)


@pytest.fixture(autouse=True)
def float32_policy_afterwards():
    """Keras's dtype policy is global: a test that trains in mixed precision must not leave it to the next."""
    yield
    import keras
    keras.config.set_dtype_policy("float32")
