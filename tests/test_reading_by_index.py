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

The same holds for a TFDS dataset prepared as ArrayRecord (read through
`as_data_source`, against the same dataset prepared as TFRecord and read by
`as_dataset`) and for arrays given from Python. An `npy:DIR` is
memory-mapped, trains bit for bit as the same arrays in an npz file, and a bad
one is refused naming the flag and the file.
"""

import math

import numpy as np
import pytest
import tensorflow as tf

from helpers import HEADLINES_FEATURE_MAP, prepare_tfds_headlines, small_config, write_npz
from mto_tf.core.models import build_headline
from mto_tf.core.signature import ModelSignature
from mto_tf.data import batching, indexed, npz, sources
from mto_tf.data.examples import Examples

NUM_EXAMPLES, BATCH_SIZE = 45, 12  # 4 batches a pass, the last of 9 rows: split 5 + 4, or 3 + 3 + 3.
STEPS = {"endless": 6, "by_epoch": 8, "once": 4}  # Into the second pass where there is one.
# The inner loop keeps the mode by passes (its partial batch splits unevenly); CI runs every mode.
MODES = [pytest.param(mode, marks=[] if mode == "by_epoch" else pytest.mark.slow) for mode in STEPS]


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


@pytest.mark.parametrize("mode", MODES)
def test_global_batches_read_by_index_are_the_records_global_batches(data, mode):
    arrays, signature = data
    by_records = Examples(records=tf.data.Dataset.from_tensor_slices(arrays), parse_batch=lambda batch: batch,
                          num_examples=NUM_EXAMPLES)
    expected = flat_batches(batching.global_batches(by_records, signature=signature, batching=batching_of(mode)),
                            STEPS[mode])
    found = flat_batches(batching.global_batches(indexed.arrays_by_index(arrays), signature=signature,
                                                 batching=batching_of(mode)), STEPS[mode])
    assert len(found) == len(expected) == STEPS[mode]
    for step, (found_leaves, expected_leaves) in enumerate(zip(found, expected, strict=True)):
        for found_leaf, expected_leaf in zip(found_leaves, expected_leaves, strict=True):
            np.testing.assert_array_equal(found_leaf, expected_leaf, err_msg=f"step {step}")


@pytest.fixture(scope="module")
def mapped(data, tmp_path_factory):
    """`data`'s arrays as an npy directory, mapped (`npy:DIR`)."""
    arrays, signature = data
    directory = tmp_path_factory.mktemp("npy")
    write_npy_directory(directory, arrays)
    return npz.load_directory(str(directory), signature)


@pytest.mark.parametrize("source", ["npz", "npy"])
@pytest.mark.parametrize("pipelines", [2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_each_pipeline_gathers_its_replicas_rows_only_and_together_they_are_the_global_batches(data, mapped, mode,
                                                                                           pipelines, source):
    in_memory, signature = data
    # The npz file's global batches; an npy directory of the same arrays (float64 on disk) gives them too.
    expected = flat_batches(batching.global_batches(indexed.arrays_by_index(in_memory), signature=signature,
                                                    batching=batching_of(mode)), STEPS[mode])
    arrays = mapped if source == "npy" else in_memory
    gathered = {pipeline: [] for pipeline in range(pipelines)}
    slices = []
    for pipeline in range(pipelines):
        counting = indexed.arrays_by_index({key: CountingArray(array, gathered[pipeline])
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


@pytest.mark.slow  # Four short runs; the inner loop checks the batches read by index in one process.
def test_an_npy_directory_arrays_from_python_and_an_array_record_dataset_train_bit_for_bit_as_the_npz_file(
        tmp_path):
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
    unweighted = {key: array for key, array in arrays.items() if "/" not in key}
    prepare_tfds_headlines(unweighted, tmp_path / "tfds", file_format="array_record")

    def run(name, dataset, **settings):
        return train(small_config(tmp_path, dataset=dataset, batch_size=BATCH_SIZE, shuffle_buffer=20, train_steps=5,
                                  model_dir=str(tmp_path / name), **settings))

    names = lambda part: {key: arrays[key] for key in part}  # noqa: E731
    runs = {
        "npy": run("npy", f"npy:{tmp_path / 'd'}"),
        "python arrays": run("python", (names(signature.input_names), names(signature.output_names),
                                        {name: arrays[f"sample_weight/{name}"] for name in signature.output_names})),
        "array_record": run("array_record", "tfds:headlines", data_dir=str(tmp_path / "tfds"),
                            feature_map=dict([HEADLINES_FEATURE_MAP.split("=")]), validation_split=""),
    }
    # float64 rows cast to float32 as they are gathered are the npz file's float32 values: the same run.
    from_npz = run("npz", f"npz:{tmp_path / 'd.npz'}")
    # TFDS holds no sample weights here: its reference is the npz file without them.
    np.savez(tmp_path / "unweighted.npz", **unweighted)
    references = {"npy": from_npz, "python arrays": from_npz,
                  "array_record": run("unweighted", f"npz:{tmp_path / 'unweighted.npz'}")}
    for name, result in runs.items():
        for found, expected in zip(result.model.get_weights(), references[name].model.get_weights(), strict=True):
            np.testing.assert_array_equal(found, expected, err_msg=name)
        assert [record["loss"] for record in result.history] == [record["loss"] for record in references[name].history]


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


# --- Arrays given from Python, and a TFDS dataset stored as ArrayRecord ----------------------------------------


def test_arrays_given_from_python_are_read_by_index_as_the_npz_file(data, tmp_path):
    arrays, signature = data
    inputs = {key: arrays[key] for key in signature.input_names}
    labels = {key: arrays[key] for key in signature.output_names}
    weights = {key.removeprefix("sample_weight/"): array for key, array in arrays.items() if "/" in key}
    examples = sources.load_examples(small_config(tmp_path, dataset=(inputs, labels, weights)), signature)
    assert examples.records.element_spec == tf.TensorSpec([], tf.int64)  # Row numbers: read by index.
    expected = flat_batches(batching.global_batches(indexed.arrays_by_index(arrays), signature=signature,
                                                    batching=batching_of("by_epoch")), STEPS["by_epoch"])
    found = flat_batches(batching.global_batches(examples, signature=signature, batching=batching_of("by_epoch")),
                         STEPS["by_epoch"])
    for step, (found_leaves, expected_leaves) in enumerate(zip(found, expected, strict=True)):
        for found_leaf, expected_leaf in zip(found_leaves, expected_leaves, strict=True):
            np.testing.assert_array_equal(found_leaf, expected_leaf, err_msg=f"step {step}")


def test_bad_arrays_from_python_are_refused_naming_the_flag_and_the_array(data, tmp_path):
    from mto_tf.errors import ConfigError

    arrays, signature = data
    inputs = {"main_input": arrays["main_input"], "aux_input": arrays["aux_input"][:-1]}
    labels = {key: arrays[key] for key in signature.output_names}
    with pytest.raises(ConfigError, match=r"^--dataset: array '.*': has 44 rows but '.*' has 45"):
        sources.load_examples(small_config(tmp_path, dataset=(inputs, labels)), signature)
    with pytest.raises(ConfigError, match=r"^--validation_data: expected npz:PATH, npy:DIR, or from Python a "
                                          r"tf.data.Dataset .*; got list"):
        small_config(tmp_path, validation_data=[labels])  # Labels alone.


@pytest.fixture(scope="module")
def tfds_formats(tmp_path_factory, data):
    """The same examples prepared as ArrayRecord and as TFRecord, each in its own data directory."""
    arrays, signature = data
    data_dirs = {}
    for file_format in ("array_record", "tfrecord"):
        data_dirs[file_format] = str(tmp_path_factory.mktemp(file_format))
        prepare_tfds_headlines(arrays, data_dirs[file_format], file_format=file_format)
    return data_dirs, signature


def tfds_examples(tfds_formats, file_format: str) -> Examples:
    from mto_tf.data import tfds_dataset

    data_dirs, signature = tfds_formats
    return tfds_dataset.load("headlines", data_dir=data_dirs[file_format], split="train", split_flag="train_split",
                             feature_map=dict([HEADLINES_FEATURE_MAP.split("=")]), signature=signature)


@pytest.mark.parametrize("mode", MODES)
def test_an_array_record_dataset_read_by_index_gives_the_tfrecord_datasets_global_batches(tfds_formats, mode):
    signature = tfds_formats[1]
    by_index = tfds_examples(tfds_formats, "array_record")
    assert by_index.records.element_spec == tf.TensorSpec([], tf.int64)  # Example numbers: read by index.
    expected = flat_batches(batching.global_batches(tfds_examples(tfds_formats, "tfrecord"), signature=signature,
                                                    batching=batching_of(mode)), STEPS[mode])
    found = flat_batches(batching.global_batches(by_index, signature=signature, batching=batching_of(mode)),
                         STEPS[mode])
    assert len(found) == len(expected) == STEPS[mode]
    for step, (found_leaves, expected_leaves) in enumerate(zip(found, expected, strict=True)):
        for found_leaf, expected_leaf in zip(found_leaves, expected_leaves, strict=True):
            np.testing.assert_array_equal(found_leaf, expected_leaf, err_msg=f"step {step}")


@pytest.mark.parametrize("pipelines", [2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_each_pipeline_reads_only_its_replicas_examples_of_an_array_record_dataset(tfds_formats, monkeypatch, mode,
                                                                                   pipelines):
    from tensorflow_datasets.core.data_sources import array_record

    signature = tfds_formats[1]
    expected = flat_batches(batching.global_batches(tfds_examples(tfds_formats, "tfrecord"), signature=signature,
                                                    batching=batching_of(mode)), STEPS[mode])
    read = []  # How many examples each read fetched.
    fetch = array_record.ArrayRecordDataSource.__getitems__
    monkeypatch.setattr(array_record.ArrayRecordDataSource, "__getitems__",
                        lambda source, keys: read.append(len(keys)) or fetch(source, keys))
    slices = []
    for pipeline in range(pipelines):
        context = tf.distribute.InputContext(num_input_pipelines=pipelines, input_pipeline_id=pipeline,
                                             num_replicas_in_sync=pipelines)
        slices.append(flat_batches(batching.replica_slices(context, tfds_examples(tfds_formats, "array_record"),
                                                           signature=signature, batching=batching_of(mode)),
                                   STEPS[mode]))
    for step in range(STEPS[mode]):
        for leaf, expected_leaf in enumerate(expected[step]):
            side_by_side = np.concatenate([slices[pipeline][step][leaf] for pipeline in range(pipelines)])
            np.testing.assert_array_equal(side_by_side, expected_leaf, err_msg=f"step {step}")
    # One read per slice (prefetching may have read a few more), each of at most ceil(B / N) examples.
    assert read and max(read) <= math.ceil(BATCH_SIZE / pipelines), read
