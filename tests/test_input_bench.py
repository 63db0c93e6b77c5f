"""`python -m mto_tf.bench --input` at a tiny size, every worker in this process: what each reads per step.

A worker of N reads ceil(B/N) rows of each global batch of B from a source
read by index (npz, npy, TFDS ArrayRecord), and all B from today's path
(records from `from_tensor_slices`, TFDS TFRecord by `as_dataset`); it
trains on ceil(B/N) rows from every source.
"""

import math

import pytest
from absl import flags

from mto_tf.programs import flags as mto_flags
from mto_tf.programs import input_bench

BATCH_SIZE = 64
WORKERS = (1, 2)
BY_INDEX = ("npz", "npy", "array_record")
TODAYS_PATHS = ("records", "tfrecord")

pytestmark = pytest.mark.xdist_group("input_bench")  # One test process measures, once, for every test here.


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """1 MB of 4 KB rows (255 rows: the endless batching repeats them), every source, 1 and 2 workers."""
    settings = input_bench.Settings(sizes=(2**20,), workers=WORKERS, sources=tuple(input_bench.SOURCES), steps=6,
                                    batch_size=BATCH_SIZE, in_process=True)
    return input_bench.run(settings, work_directory=str(tmp_path_factory.mktemp("input_bench")))


def _workers_of(report, source: str, workers: int) -> list[dict]:
    found = [result for result in report["results"] if result["source"] == source and result["workers"] == workers]
    assert [result["worker"] for result in found] == list(range(workers)), (source, workers)
    return found


@pytest.mark.slow
def test_every_source_is_read_by_every_worker(report):
    for source in input_bench.SOURCES:
        for workers in WORKERS:
            for result in _workers_of(report, source, workers):
                assert "error" not in result, result


@pytest.mark.slow
@pytest.mark.parametrize("source", BY_INDEX)
def test_read_by_index_a_worker_reads_only_its_slice_of_each_global_batch(report, source):
    for workers in WORKERS:
        for result in _workers_of(report, source, workers):
            assert result["rows_read_per_step"] == math.ceil(BATCH_SIZE / workers), result
            assert result["rows_yielded_per_step"] == math.ceil(BATCH_SIZE / workers), result


@pytest.mark.slow
@pytest.mark.parametrize("source", TODAYS_PATHS)
def test_on_todays_path_a_worker_reads_every_record_of_each_global_batch(report, source):
    for workers in WORKERS:
        for result in _workers_of(report, source, workers):
            assert result["rows_read_per_step"] == BATCH_SIZE, result
            assert result["rows_yielded_per_step"] == math.ceil(BATCH_SIZE / workers), result


@pytest.mark.slow
def test_array_record_bytes_read_per_worker_shrink_with_the_number_of_workers(report):
    """Measured by /proc/self/io: each of N workers reads its share of what one worker reads, plus 5 %.

    (Against TFRecord the target is not met at 4 KB rows: ArrayRecord reads at
    least 16 KiB per record; docs/multi_worker.md has the numbers.)
    """
    [alone] = _workers_of(report, "array_record", 1)
    assert alone["rchar_per_step"] >= BATCH_SIZE * report["row_bytes"]  # It reads its file as it steps.
    for workers in WORKERS[1:]:
        share = math.ceil(BATCH_SIZE / workers) / BATCH_SIZE
        for result in _workers_of(report, "array_record", workers):
            assert result["rchar_per_step"] <= share * input_bench.TARGET_SLACK * alone["rchar_per_step"], result


@pytest.mark.slow
def test_the_tables_compare_each_source_read_by_index_with_todays_path(report):
    summary = {(row["source"], row["workers"]): row for row in input_bench.summarize(report)}
    for source in ("npz", "npy"):
        assert summary[(source, 2)]["rows_vs_todays"] == summary[(source, 2)]["bytes_vs_todays"] == 0.5
        assert summary[(source, 2)]["target"] == pytest.approx(0.525) and summary[(source, 2)]["meets_target"]
    assert summary[("array_record", 2)]["rows_vs_todays"] == 0.5
    tables = input_bench.format_tables(report)
    assert "| 1 MB | npy | 2 | 32.0 | 32.0 |" in tables
    assert "Memory per worker" not in tables  # One process: no memory per worker.


def test_a_bursty_reader_is_measured_between_its_reads():
    # 8 bytes every 3 steps, the first read one step in: 8 / 3 per step, not 24 / 8.
    assert input_bench.steady_rate([0, 8, 8, 8, 16, 16, 16, 24, 24], least_step=1) == (8 / 3, 3)
    # Reads below least_step are not data; fewer than two reads: over all steps.
    assert input_bench.steady_rate([0, 1, 2, 3, 4], least_step=2) == (1.0, 0)


def test_sizes_and_the_flags_name_every_source():
    assert input_bench.parse_size("100MB") == 100 * 2**20 and input_bench.parse_size("1gb") == 2**30
    assert input_bench.size_text(300 * 2**20) == "300 MB" and input_bench.size_text(2**30) == "1 GB"
    flag_values = flags.FlagValues()
    mto_flags.define_bench_flags(["a_variant"], flag_values)
    assert flag_values["input_sources"].default == list(input_bench.SOURCES)
