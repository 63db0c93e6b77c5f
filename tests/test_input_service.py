"""`--input_service`: a tf.data service reads each global batch once and hands each input pipeline its rows.

In one process: N input pipelines (N `InputContext`s, as N workers would
get them) reading side by side from one local service receive, together, the
global batches one device reads, row for row (with a shuffle buffer, by steps
and by passes with partial batches); a run through the service trains bit for
bit as one without it. Bad values stop before anything is written.
"""

import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tensorflow as tf

from helpers import small_config
from mto_tf.core.models import build_headline
from mto_tf.core.signature import ModelSignature
from mto_tf.data import batching, input_service, sources
from mto_tf.errors import ConfigError

BATCH_SIZE = 12
STEPS = 6  # With 128 examples by passes: ten full batches and a partial one of 8 rows, then the next pass.


@pytest.fixture(scope="module")
def headlines(tmp_path_factory):
    """synthetic_headlines' training examples (read in order, from TFRecord files) and the model's signature."""
    config = small_config(tmp_path_factory.mktemp("served"), batch_size=BATCH_SIZE)
    signature = ModelSignature.of(build_headline(config))
    return sources.load_examples(config, signature), signature


def flat(batch) -> list[np.ndarray]:
    return [np.asarray(leaf) for leaf in tf.nest.flatten(batch)]


@pytest.mark.parametrize("mode, steps, skip", [("endless", STEPS, 0), ("by_epoch", 12, 0), ("by_epoch", 8, 3)],
                         ids=["endless", "by passes", "by passes, resumed after 3"])
# Three consumers wait about 10 s here for the service's rounds: the inner loop keeps two.
@pytest.mark.parametrize("pipelines", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_pipelines_served_side_by_side_receive_the_global_batches_row_for_row(headlines, mode, steps, skip,
                                                                             pipelines):
    examples, signature = headlines
    assert not examples.by_index  # A source read in order: what the service is for.
    plain = batching.Batching(mode=mode, batch_size=BATCH_SIZE, shuffle_buffer=40, seed=5)
    expected = [flat(batch) for batch in batching.global_batches(examples, signature=signature, batching=plain,
                                                                 skip_batches=skip).take(steps)]
    address, servers = input_service.start()
    served = batching.Batching(mode=mode, batch_size=BATCH_SIZE, shuffle_buffer=40, seed=5,
                               served_by=batching.ServedBy(address=address, job_name="test"))
    replicas = 2 if pipelines == 2 else 1  # Two replicas per pipeline, or one: B = 12 splits both ways.
    iterators = [iter(batching.replica_slices(
        tf.distribute.InputContext(num_input_pipelines=pipelines, input_pipeline_id=pipeline,
                                   num_replicas_in_sync=replicas * pipelines),
        examples, signature=signature, batching=served, skip_batches=skip)) for pipeline in range(pipelines)]
    # Coordinated reads hand out a round only when every pipeline asks: they read side by side, as workers do.
    with ThreadPoolExecutor(pipelines) as pool:
        for step in range(steps):
            slices = [flat(replica_slice) for _ in range(replicas) for replica_slice in pool.map(next, iterators)]
            # Replica order: pipeline 0's slices, then pipeline 1's, ...
            slices = [slices[replica * pipelines + pipeline] for pipeline in range(pipelines)
                      for replica in range(replicas)]
            for leaf, expected_leaf in enumerate(expected[step]):
                np.testing.assert_array_equal(np.concatenate([found[leaf] for found in slices]), expected_leaf,
                                              err_msg=f"step {step}")
                # Each pipeline received at most its share: ceil(rows / replicas) per replica.
                share = -(-len(expected_leaf) // (replicas * pipelines))
                assert all(len(found[leaf]) <= share for found in slices)
    del servers


@pytest.mark.slow  # Two runs and the gradient shares traced: 13 s.
def test_a_run_through_the_input_service_trains_bit_for_bit_as_one_without_it(tmp_path, caplog):
    from mto_tf import train

    # The gradient shares' log reads training batches of its own: through a job of its own.
    settings = dict(batch_size=BATCH_SIZE, shuffle_buffer=40, train_steps=4, validation_split="",
                    log_gradient_shares_every=2)
    with caplog.at_level("INFO", logger="mto_tf"):
        without = train(small_config(tmp_path, **settings))
        assert "Input: read in order: each input pipeline (one per worker) reads every record" in caplog.text
        served = train(small_config(tmp_path, model_dir=str(tmp_path / "served"), input_service="local", **settings))
    assert "Input: read in order, once, by the tf.data service at localhost:" in caplog.text
    for found, expected in zip(served.model.get_weights(), without.model.get_weights(), strict=True):
        np.testing.assert_array_equal(found, expected)
    assert [record["loss"] for record in served.history] == [record["loss"] for record in without.history]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("settings, message", [
    (dict(input_service="nowhere"), r"^--input_service: expected 'local' or HOST:PORT, got 'nowhere'"),
    (dict(input_service="grpc://host:5050"), r"^--input_service: expected 'local' or HOST:PORT, got 'grpc://"),
    (dict(input_service="local", strategy="multi_worker"),
     r"^--input_service: 'local' starts a service in this process; every worker"),
    (dict(input_service="local", loop="fit"), r"^--input_service: serves the custom loop's input pipelines"),
], ids=["not an address", "a URL", "local with several workers", "fit"])
def test_bad_input_service_settings_are_refused_naming_the_flag(tmp_path, settings, message):
    with pytest.raises(ConfigError, match=message):
        small_config(tmp_path, **settings)


def test_an_unreachable_service_or_one_nothing_needs_stops_before_anything_is_written(tmp_path):
    from mto_tf import train
    from helpers import write_npz

    with pytest.raises(ConfigError, match=r"^--input_service: no tf.data service answers at 127.0.0.1:\d+"):
        train(small_config(tmp_path, input_service=f"127.0.0.1:{_free_port()}"))
    write_npz(tmp_path / "d.npz")
    with pytest.raises(ConfigError, match=r"^--input_service: every training source here is read by index"):
        train(small_config(tmp_path, dataset=f"npz:{tmp_path / 'd.npz'}", input_service="local"))
    python_dataset = tf.data.Dataset.from_generator(lambda: iter(()), output_signature=(
        {"main_input": tf.TensorSpec([8], tf.int32), "aux_input": tf.TensorSpec([5], tf.float32)},
        {"main_output": tf.TensorSpec([1], tf.float32), "aux_output": tf.TensorSpec([1], tf.float32)}))
    with pytest.raises(ConfigError, match=r"^--input_service: a service in another process cannot run the Python "):
        train(small_config(tmp_path, dataset=python_dataset, input_service="127.0.0.1:1"))
    assert not (tmp_path / "run").exists()


def test_a_service_asked_for_a_port_in_use_says_so_naming_the_flag():
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        with pytest.raises(ConfigError, match=rf"^--port: cannot serve on port {taken.getsockname()[1]}"):
            input_service.start(port=taken.getsockname()[1])
