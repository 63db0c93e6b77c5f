"""Reading an npz file or an npy directory by index: the same global batches as reading the records, and each
input pipeline gathers only its own replicas' rows.

Built in one process, no cluster: N input pipelines are N `InputContext`s, as
N workers of one replica each would get them. In every batching mode (endless,
by passes with a partial last batch, once) and with a shuffle buffer:

- the global batches read by index are the records' global batches, row for row
  (shuffling the row numbers gives the records' permutation);
- the N pipelines' slices, put side by side, are those global batches;
- each pipeline gathers at most ceil(B / N) rows per step: 1/N of what reading
  every record of the global batch reads.

An `npy:DIR` is memory-mapped, trains bit for bit as the same arrays in an npz
file, and a bad one is refused naming the flag and the file.
"""

import math

import numpy as np
import pytest
import tensorflow as tf

from helpers import small_config, write_npz
from mto_tf.core.models import build_headline
from mto_tf.core.signature import ModelSignature
from mto_tf.data import batching, indexed, npz
from mto_tf.data.examples import Examples

NUM_EXAMPLES, BATCH_SIZE = 45, 12  # 4 batches a pass, the last of 9 rows: split 5 + 4, or 3 + 3 + 3.
STEPS = {"endless": 6, "by_epoch": 8, "once": 4}  # Into the second pass where there is one.


class CountingArray:
    """An array that records how many rows each gather reads."""

    def __init__(self, array: np.ndarray, gathered: list[int]):
        self._array, self._gathered = array, gathered
        self.dtype, self.shape = array.dtype, array.shape

    def __len__(self):
        return len(self._array)

    def __getitem__(self, rows):
        self._gathered.append(len(rows))
        return self._array[rows]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("by_index")
    write_npz(directory / "d.npz", num_examples=NUM_EXAMPLES, with_sample_weights=True)
    config = small_config(directory, dataset=f"npz:{directory / 'd.npz'}", batch_size=BATCH_SIZE)
    signature = ModelSignature.of(build_headline(config))
    return npz.load(str(directory / "d.npz"), signature), signature


def batching_of(mode: str) -> batching.Batching:
    return batching.Batching(mode=mode, batch_size=BATCH_SIZE, shuffle_buffer=20 if mode != "once" else 0, seed=3)


def flat_batches(dataset: tf.data.Dataset, steps: int) -> list[list[np.ndarray]]:
    return [[np.asarray(leaf) for leaf in tf.nest.flatten(batch)] for batch in dataset.take(steps)]


@pytest.mark.parametrize("mode", list(STEPS))
def test_global_batches_read_by_index_are_the_records_global_batches(data, mode):
    arrays, signature = data
    by_records = Examples(records=tf.data.Dataset.from_tensor_slices(arrays), parse_batch=lambda batch: batch,
                          num_examples=NUM_EXAMPLES)
    expected = flat_batches(batching.global_batches(by_records, signature=signature, batching=batching_of(mode)),
                            STEPS[mode])
    found = flat_batches(batching.global_batches(indexed.examples_by_index(arrays), signature=signature,
                                                 batching=batching_of(mode)), STEPS[mode])
    assert len(found) == len(expected) == STEPS[mode]
    for step, (found_leaves, expected_leaves) in enumerate(zip(found, expected, strict=True)):
        for found_leaf, expected_leaf in zip(found_leaves, expected_leaves, strict=True):
            np.testing.assert_array_equal(found_leaf, expected_leaf, err_msg=f"step {step}")


@pytest.mark.parametrize("pipelines", [2, 3])
@pytest.mark.parametrize("mode", list(STEPS))
def test_each_pipeline_gathers_its_replicas_rows_only_and_together_they_are_the_global_batches(data, mode,
                                                                                           pipelines):
    arrays, signature = data
    expected = flat_batches(batching.global_batches(indexed.examples_by_index(arrays), signature=signature,
                                                    batching=batching_of(mode)), STEPS[mode])
    gathered = {pipeline: [] for pipeline in range(pipelines)}
    slices = []
    for pipeline in range(pipelines):
        counting = indexed.examples_by_index({key: CountingArray(array, gathered[pipeline])
                                              for key, array in arrays.items()})
        context = tf.distribute.InputContext(num_input_pipelines=pipelines, input_pipeline_id=pipeline,
                                             num_replicas_in_sync=pipelines)
        slices.append(flat_batches(batching.replica_slices(context, counting, signature=signature,
                                                           batching=batching_of(mode)), STEPS[mode]))
    for step in range(STEPS[mode]):
        for leaf, expected_leaf in enumerate(expected[step]):
            side_by_side = np.concatenate([slices[pipeline][step][leaf] for pipeline in range(pipelines)])
            np.testing.assert_array_equal(side_by_side, expected_leaf, err_msg=f"step {step}")
    for pipeline, counts in gathered.items():
        # One gather per key of each batch it parsed (prefetching may have parsed a few more): never more rows
        # than its share of a global batch, where reading every record reads BATCH_SIZE.
        assert counts and max(counts) <= math.ceil(BATCH_SIZE / pipelines), (pipeline, counts)


# --- npy:DIR: one memory-mapped .npy file per key ------------------------------------------------------------


def write_npy_directory(directory, arrays):
    """Each array as DIR/<key>.npy (sample weights in DIR/sample_weight/); float64 inputs, as NumPy makes them."""
    for key, array in arrays.items():
        path = directory / f"{key}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, array.astype(np.float64) if array.dtype.kind == "f" else array)


@pytest.mark.slow  # Two short runs; the inner loop checks the batches read by index in one process.
def test_an_npy_directory_is_mapped_not_read_and_trains_bit_for_bit_as_the_npz_file(tmp_path):
    from mto_tf import train

    arrays = write_npz(tmp_path / "d.npz", num_examples=NUM_EXAMPLES, with_sample_weights=True)
    write_npy_directory(tmp_path / "d", arrays)
    config = small_config(tmp_path, dataset=f"npz:{tmp_path / 'd.npz'}", batch_size=BATCH_SIZE, shuffle_buffer=20,
                          train_steps=5)
    signature = ModelSignature.of(build_headline(config))
    mapped = npz.load_directory(str(tmp_path / "d"), signature)
    assert sorted(mapped) == sorted(arrays)
    # Inputs and labels stay mapped (rows are read when gathered); the sample weights were read to check them.
    assert all(isinstance(mapped[key], np.memmap) for key in ("main_input", "aux_input", "main_output"))

    from_npz = train(config)
    from_npy = train(small_config(tmp_path, dataset=f"npy:{tmp_path / 'd'}", batch_size=BATCH_SIZE,
                                  shuffle_buffer=20, train_steps=5, model_dir=str(tmp_path / "npy_run")))
    # float64 rows cast to float32 as they are gathered are the npz file's float32 values: the same run.
    for from_dir, from_file in zip(from_npy.model.get_weights(), from_npz.model.get_weights(), strict=True):
        np.testing.assert_array_equal(from_dir, from_file)
    assert [record["loss"] for record in from_npy.history] == [record["loss"] for record in from_npz.history]


@pytest.mark.parametrize("change, message", [
    (lambda directory: (directory / "aux_input.npy").unlink(),
     r"^--dataset: npy directory '.*', file 'aux_input.npy': missing; model 'headline' needs input 'aux_input'"),
    (lambda directory: np.save(directory / "aux_output.npy", np.zeros((NUM_EXAMPLES - 1, 1), np.float32)),
     r"^--dataset: npy directory '.*', file '.*\.npy': has 44 rows but '.*' has 45"),
    (lambda directory: np.save(directory / "aux_input.npy", np.zeros((NUM_EXAMPLES, 3), np.float32)),
     r"^--dataset: npy directory '.*', file 'aux_input.npy': expected per-example shape \(5,\)"),
], ids=["missing key", "rows differ", "mis-shaped"])
def test_a_bad_npy_directory_is_refused_naming_the_flag_and_the_file(tmp_path, change, message):
    from mto_tf import train
    from mto_tf.errors import ConfigError

    write_npy_directory(tmp_path / "d", write_npz(tmp_path / "d.npz", num_examples=NUM_EXAMPLES))
    change(tmp_path / "d")
    with pytest.raises(ConfigError, match=message):
        train(small_config(tmp_path, dataset=f"npy:{tmp_path / 'd'}", batch_size=BATCH_SIZE))
    assert not (tmp_path / "run").exists()
