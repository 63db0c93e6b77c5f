"""`python -m mto_tf.bench --input`: what each worker's input pipeline reads, and holds, per step.

    python -m mto_tf.bench --input                      # 100MB and 1GB; 1, 2 and 4 workers; every source
    python -m mto_tf.bench --input --input_sizes=100MB,300MB,1GB --output_json=/tmp/input.json
    python -m mto_tf.bench --input --input_sizes=1MB --input_workers=1,2 --input_in_process   # seconds

Issue 27 asks that a worker of N read only its replicas' share of each
global batch of B examples: rows and bytes per worker per step at most
ceil(B/N)/B of what reading every record costs ("today's path"), plus 5 %,
and, from `npy:`, memory that stays flat as the data grows. This measures it.

The parent writes one dataset per size (a float32 input `x` of
`--input_feature_width` numbers and a float32 label for each of two outputs:
4,104 bytes a row by default) in every form, then for each source and each N
starts N processes at once, one per simulated worker. Each builds its
pipeline as a worker of N does (`sources.load_examples`, then
`batching.replica_slices` with an `InputContext` of N pipelines and N
replicas), takes one warm-up step, then `--input_steps` timed steps, and
reports:

- rows read per step: the rows whose values the pipeline produces from the
  source. A source read by index hands the batching row numbers
  (`data/indexed.py`) and reads a row when the slice holding it is parsed;
  any other source produces every record of the global batch before the
  split. Rows yielded per step are the rows of the slices the worker trains
  on: ceil(B/N) from every source, which differ only before the split.
- payload bytes per step: rows read x the row's bytes.
- `rchar` and `read_bytes` per step, from /proc/self/io (every thread of the
  process), over the timed steps; what setting up read, apart. `rchar`
  counts the bytes read() and pread() return: a TFRecord or ArrayRecord
  file's reads, an npz file's (all of it, while setting up). It does NOT
  count the page faults of a memory-mapped file: an `npy:` worker's rows
  show as payload bytes and as `RssFile` growth (the mapped pages it
  touched), not as `rchar`. `read_bytes` counts only what was read from
  storage: 0 while the page cache holds the file, as it holds these files,
  just written on a machine with memory to spare.
- memory: resident memory right after importing TensorFlow and building the
  model (TensorFlow's own, before any data); the peak from then on (`VmHWM`,
  reset at that moment: importing TensorFlow peaks higher than it settles;
  `ru_maxrss` cannot be reset, and a process started by fork and exec even
  inherits its parent's); `RssAnon` and `RssFile` from /proc/self/status at
  the end. Mapped pages of an `npy:` file count in
  `RssFile` and in the peak: page cache, shared by the workers of one
  machine and reclaimable, unlike `RssAnon`.

Counting per step: each step waits `STEP_SECONDS`, as a train step would, so
the pipeline keeps ahead of it; the timed steps start once its read-ahead
buffers have filled (`SETTLE_SECONDS`). The counters are read after every
step. Rows read per step are the median step's: now and then tf.data's
autotuning grows a buffer, and that step reads a batch more. Bytes are
counted between the first and the last step that read: TFDS reads a
TFRecord file 8 MiB at a time, so a worker reads nothing for dozens of
steps, then 8 MiB; measured from one such read to another, the rate is that
of whole reads (which takes two of them: `rchar_reading_steps` says how many
steps read). Reads under `LEAST_READ_BYTES` are not data (this measurement
reading /proc, TensorFlow reading its own files) and start or end no span.
TFDS reads all shards at once, though: the 16 shards of 1 GB take 128 MiB
before the first step, and 300 steps see no read at all. So today's
TFRecord bytes per step are compared as a pass's: its rows read per step
x its bytes per row on disk (`todays_bytes_per_step`).

Sources: `npz` and `npy` (by index), `array_record` (`tfds:` of a dataset
prepared as ArrayRecord, by index), and today's paths: `records` (the npz
file's arrays as records, `tf.data.Dataset.from_tensor_slices`) and
`tfrecord` (the TFDS dataset prepared as TFRecord, read by `as_dataset`).
`--batch_size` (global) and `--shuffle_buffer` are mto-train's.
`--input_in_process` runs every worker in this process, one after another:
rows and bytes as in separate processes, memory not measured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import app, flags

from mto_tf.config import TrainConfig
from mto_tf.core.signature import ModelSignature
from mto_tf.data import batching, sources
from mto_tf.data.examples import Examples
from mto_tf.errors import describe_error

FLAGS = flags.FLAGS
INPUT = "x"
OUTPUTS = ("score", "label")
TFDS_NAME = "input_bench_rows"  # InputBenchRows, as TFDS names it.
SIZE_UNITS = {"KB": 2**10, "MB": 2**20, "GB": 2**30}
STEP_SECONDS = 0.01  # Stands for a train step's compute: the pipeline keeps ahead of it.
SETTLE_SECONDS = 0.2  # Long enough for the read-ahead buffers to fill.
LEAST_READ_BYTES = 1024  # Less read in a step is not data.
WORKER_TIMEOUT_SECONDS = 900
RESULT_PREFIX = "INPUT_BENCH_RESULT "
TARGET_SLACK = 1.05  # The "plus 5 %".


def row_bytes(feature_width: int) -> int:
    """A row's bytes: the float32 input and one float32 label per output."""
    return 4 * feature_width + 4 * len(OUTPUTS)


@dataclasses.dataclass(frozen=True)
class Source:
    """A way of reading the benchmark's data."""

    description: str
    files: str  # What it reads, in a size's directory (see `prepare_data`).
    reads_as_it_steps: bool  # Reads its files step by step (else all of them while setting up, or maps them).
    todays_path: str | None = None  # The source that reads every record of the same data: what it is compared to.


SOURCES = {
    "npz": Source("`npz:` file, by index (arrays in memory)", files="data.npz", reads_as_it_steps=False,
                  todays_path="records"),
    "npy": Source("`npy:` directory, by index (memory-mapped)", files="npy", reads_as_it_steps=False,
                  todays_path="records"),
    "array_record": Source("`tfds:` prepared as ArrayRecord, by index (`as_data_source`)", files="array_record",
                           reads_as_it_steps=True, todays_path="tfrecord"),
    "records": Source("today's path: the npz arrays as records (`from_tensor_slices`)", files="data.npz",
                      reads_as_it_steps=False),
    "tfrecord": Source("today's path: `tfds:` prepared as TFRecord (`as_dataset`)", files="tfrecord",
                       reads_as_it_steps=True),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """What to measure."""

    sizes: tuple[int, ...]  # Bytes of data: rows x row_bytes(feature_width).
    workers: tuple[int, ...]
    sources: tuple[str, ...]
    steps: int  # Timed, after one warm-up step.
    batch_size: int  # Global.
    shuffle_buffer: int = 0
    feature_width: int = 1024  # Numbers in a row's input.
    in_process: bool = False  # Every worker in this process, one after another: no memory per worker.

    @classmethod
    def from_flags(cls, config: TrainConfig) -> Settings:
        """From the `--input_*` flags, and mto-train's `--batch_size` and `--shuffle_buffer` (in `config`)."""
        unknown = [name for name in FLAGS.input_sources if name not in SOURCES]
        if unknown:
            raise app.UsageError(f"--input_sources: unknown {unknown}; expected some of {', '.join(SOURCES)}")
        try:
            workers = tuple(int(count) for count in FLAGS.input_workers)
        except ValueError:
            raise app.UsageError(f"--input_workers: expected numbers, got {FLAGS.input_workers}") from None
        if not isinstance(config.batch_size, int) or any(count < 1 or config.batch_size % count for count in workers):
            raise app.UsageError(f"--batch_size={config.batch_size} must split evenly over each of --input_workers "
                                 f"(one replica each)")
        settings = cls(sizes=tuple(parse_size(text) for text in FLAGS.input_sizes), workers=workers,
                       sources=tuple(FLAGS.input_sources), steps=FLAGS.input_steps, batch_size=config.batch_size,
                       shuffle_buffer=config.shuffle_buffer, feature_width=FLAGS.input_feature_width,
                       in_process=FLAGS.input_in_process)
        if min(settings.sizes) // row_bytes(settings.feature_width) < settings.batch_size:
            raise app.UsageError(f"--input_sizes: {size_text(min(settings.sizes))} holds less than one global batch")
        return settings


def parse_size(text: str) -> int:
    """`100MB` -> bytes (KB, MB, GB: powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]B)\s*", text, re.IGNORECASE)
    if not match:
        raise app.UsageError(f"--input_sizes: expected sizes such as 100MB or 1GB, got {text!r}")
    return int(float(match[1]) * SIZE_UNITS[match[2].upper()])


def size_text(size: int) -> str:
    unit = next(unit for unit in ("GB", "MB", "KB") if size >= SIZE_UNITS[unit] or unit == "KB")
    return f"{size / SIZE_UNITS[unit]:g} {unit}"


# --- The data, in every form ------------------------------------------------------------------

class InputBenchRows(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """The benchmark's rows as a TFDS dataset, written from its npy directory (so every source holds the same rows).

    Not registered: workers open it from its files, as they open a dataset another program prepared.
    """

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, npy_directory: str, **kwargs):
        self._arrays = _map_npy_directory(npy_directory)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {key: tfds.features.Tensor(shape=array.shape[1:], dtype=np.float32) for key, array in self._arrays.items()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for row in range(len(self._arrays[INPUT])):
            yield row, {key: array[row] for key, array in self._arrays.items()}


@dataclasses.dataclass(frozen=True)
class PreparedData:
    """One size's rows, in every form a source reads."""

    rows: int
    file_bytes: dict[str, int]  # Each form's bytes on disk, by `Source.files`.


def prepare_data(directory: str, *, size: int, feature_width: int, sources_wanted: tuple[str, ...]) -> PreparedData:
    """Writes `size` bytes of rows into `directory` in the forms `sources_wanted` read.

    The forms: npy/ (always: the others are written from it), data.npz,
    array_record/ and tfrecord/ (TFDS data directories).
    """
    rows = size // row_bytes(feature_width)
    npy_directory = os.path.join(directory, "npy")
    _write_npy_directory(npy_directory, rows=rows, feature_width=feature_width)
    if {"npz", "records"} & set(sources_wanted):
        # Uncompressed, and written a chunk at a time from the mapped files.
        np.savez(os.path.join(directory, "data.npz"), **_map_npy_directory(npy_directory))
    for file_format in ("array_record", "tfrecord"):
        if file_format in sources_wanted:
            with contextlib.redirect_stdout(sys.stderr):  # TFDS prints its progress: the tables alone go to stdout.
                InputBenchRows(npy_directory=npy_directory, data_dir=os.path.join(directory, file_format)
                               ).download_and_prepare(file_format=file_format)
    forms = {SOURCES[name].files for name in sources_wanted} | {"npy"}
    return PreparedData(rows=rows, file_bytes={form: _bytes_on_disk(os.path.join(directory, form)) for form in forms})


def _bytes_on_disk(path: str) -> int:
    """A file's size, or the sizes of every file under a directory."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def _write_npy_directory(directory: str, *, rows: int, feature_width: int) -> None:
    """Random rows, written a chunk at a time (the parent never holds a gigabyte)."""
    os.makedirs(directory)
    rng = np.random.default_rng(0)
    inputs = np.lib.format.open_memmap(os.path.join(directory, INPUT + ".npy"), mode="w+", dtype=np.float32,
                                       shape=(rows, feature_width))
    chunk_rows = max(1, 2**26 // feature_width)  # 256 MB.
    for start in range(0, rows, chunk_rows):
        inputs[start:start + chunk_rows] = rng.standard_normal((min(chunk_rows, rows - start), feature_width),
                                                               np.float32)
    inputs.flush()
    del inputs
    np.save(os.path.join(directory, "score.npy"), rng.standard_normal((rows, 1), np.float32))
    np.save(os.path.join(directory, "label.npy"), rng.integers(0, 2, (rows, 1)).astype(np.float32))


def _map_npy_directory(directory: str) -> dict[str, np.ndarray]:
    return {key: np.load(os.path.join(directory, key + ".npy"), mmap_mode="r") for key in (INPUT, *OUTPUTS)}


# --- One worker -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class WorkerJob:
    """One simulated worker: input pipeline `worker` of `workers`, reading `source` from `directory`."""

    source: str
    directory: str
    workers: int
    worker: int
    batch_size: int
    shuffle_buffer: int
    feature_width: int
    steps: int


def tiny_model(feature_width: int) -> keras.Model:
    """One input `x`, two outputs: the signature every source's data is checked against."""
    features = keras.Input((feature_width,), name=INPUT)
    return keras.Model(features, {"score": keras.layers.Dense(1, name="score")(features),
                                  "label": keras.layers.Dense(1, activation="sigmoid", name="label")(features)})


def job_config(job: WorkerJob) -> TrainConfig:
    """The configuration a worker of `job` reads its data with, as mto-train would be given it."""
    settings = dict(batch_size=job.batch_size, shuffle_buffer=job.shuffle_buffer)
    files = os.path.join(job.directory, SOURCES[job.source].files)
    if job.source == "npz":
        return TrainConfig(dataset=f"npz:{files}", **settings)
    if job.source == "npy":
        return TrainConfig(dataset=f"npy:{files}", **settings)
    if job.source in ("array_record", "tfrecord"):
        return TrainConfig(dataset=f"tfds:{TFDS_NAME}", data_dir=files, **settings)
    # "records": the npz file's arrays, one record per example, as npz: was read before issue 27.
    with np.load(files) as npz:
        arrays = {key: npz[key] for key in npz.files}
    records = tf.data.Dataset.from_tensor_slices(({INPUT: arrays[INPUT]}, {name: arrays[name] for name in OUTPUTS}))
    return TrainConfig(dataset=records, **settings)


def measure_worker(job: WorkerJob, *, own_process: bool) -> dict:
    """Builds `job`'s pipeline as that worker would and measures its reads (and, in `own_process`, its memory)."""
    signature = ModelSignature.of(tiny_model(job.feature_width))
    memory_after_model = memory_mb()
    if own_process:
        reset_peak_rss()  # From here on the peak is the data's (importing TensorFlow peaks higher than it settles).
    io_at_start = io_counters()
    rows_read = tf.Variable(0, dtype=tf.int64, trainable=False)
    iterator = iter(worker_pipeline(job, signature, rows_read))
    next(iterator)  # Warm-up: tracing, the first reads.
    time.sleep(SETTLE_SECONDS)
    memory_before = memory_mb()
    readings, rows_yielded = timed_steps(iterator, rows_read, steps=job.steps)
    memory_after = memory_mb()
    del iterator  # Stops its threads before the next worker in this process.
    gc.collect()
    result = {**dataclasses.asdict(job), "rows_yielded_per_step": rows_yielded / job.steps,
              **reads_per_step(readings, row_bytes=row_bytes(job.feature_width)),
              **{f"setup_{counter}": readings[0][counter] - io_at_start[counter] for counter in ("rchar", "read_bytes")}}
    if own_process:
        result.update(rss_after_model_mb=memory_after_model["VmRSS"], peak_rss_mb=memory_after["VmHWM"],
                      rss_anon_mb=memory_after["RssAnon"], rss_file_mb=memory_after["RssFile"],
                      rss_file_growth_in_steps_mb=memory_after["RssFile"] - memory_before["RssFile"])
    return result


def worker_pipeline(job: WorkerJob, signature: ModelSignature, rows_read: tf.Variable) -> tf.data.Dataset:
    """Worker `job.worker`'s pipeline, as `distributed_batches` builds it on a worker of `job.workers` (one
    replica each); it adds to `rows_read` each row it reads."""
    config = job_config(job)
    examples = counting_rows_read(sources.load_examples(config, signature), rows_read)
    context = tf.distribute.InputContext(num_input_pipelines=job.workers, input_pipeline_id=job.worker,
                                         num_replicas_in_sync=job.workers)
    return batching.replica_slices(context, examples, signature=signature,
                                   batching=batching.Batching.for_training(config))


def timed_steps(iterator, rows_read: tf.Variable, *, steps: int) -> tuple[list[dict[str, int]], int]:
    """Takes `steps` steps; returns the counters before the first and after each (rows read, /proc/self/io),
    and the rows the steps yielded."""

    def reading() -> dict[str, int]:
        return {"rows_read": int(rows_read.numpy()), **io_counters()}  # /proc/self/io last: it reads the others.

    readings = [reading()]
    rows_yielded = 0
    for _ in range(steps):
        rows_yielded += rows_in(next(iterator))
        time.sleep(STEP_SECONDS)
        readings.append(reading())
    return readings, rows_yielded


def reads_per_step(readings: list[dict[str, int]], *, row_bytes: int) -> dict[str, float]:
    """Rows and bytes read per step, from the counters before the first step and after each."""

    def samples(counter: str) -> list[int]:
        return [reading[counter] for reading in readings]

    # A batch a step, but now and then tf.data's autotuning grows a buffer and that step reads a batch more.
    rows_read = float(np.median(np.diff(samples("rows_read"))))
    rchar, rchar_reading_steps = steady_rate(samples("rchar"), least_step=LEAST_READ_BYTES)
    return {"rows_read_per_step": rows_read, "payload_bytes_per_step": rows_read * row_bytes,
            "rchar_per_step": rchar, "rchar_reading_steps": rchar_reading_steps,
            "read_bytes_per_step": steady_rate(samples("read_bytes"), least_step=LEAST_READ_BYTES)[0],
            "syscr_per_step": (readings[-1]["syscr"] - readings[0]["syscr"]) / (len(readings) - 1)}


def steady_rate(samples: list[int], *, least_step: int) -> tuple[float, int]:
    """A counter's increase per step, from its value after each step (`samples[0]`: before the first); and how
    many steps increased it by at least `least_step`.

    The rate is taken between the first and the last such step, so a reader
    that reads in bursts is measured over whole bursts; with fewer than two,
    over all steps.
    """
    moving = [step for step in range(1, len(samples)) if samples[step] - samples[step - 1] >= least_step]
    if len(moving) < 2:
        return (samples[-1] - samples[0]) / (len(samples) - 1), len(moving)
    first, last = moving[0], moving[-1]
    return (samples[last] - samples[first]) / (last - first), len(moving)


def counting_rows_read(examples: Examples, rows_read: tf.Variable) -> Examples:
    """`examples`, adding to `rows_read` each row whose values the pipeline reads from the source.

    A source read by index hands the batching row numbers (`indexed.py`): a
    row is read when the slice holding it is parsed. Any other source's
    records are its rows' values: each is read as it enters the batching,
    before the global batch is split.
    """
    if examples.records.element_spec == tf.TensorSpec([], tf.int64):  # Row numbers.
        def parse_counting(numbers):
            rows_read.assign_add(tf.shape(numbers, out_type=tf.int64)[0])
            return examples.parse_batch(numbers)

        return dataclasses.replace(examples, parse_batch=parse_counting)

    def count(*record):
        rows_read.assign_add(1)
        return record if len(record) > 1 else record[0]  # tf.data passes a tuple's parts as arguments.

    return dataclasses.replace(examples, records=examples.records.map(count))


def rows_in(element) -> int:
    return int(tf.nest.flatten(element)[0].shape[0])


def io_counters() -> dict[str, int]:
    """This process's /proc/self/io: rchar, read_bytes, syscr, ..."""
    with open("/proc/self/io") as io:
        return {name: int(value) for name, value in (line.split(":") for line in io)}


def memory_mb() -> dict[str, float]:
    """This process's resident memory now (VmRSS, RssAnon, RssFile) and its peak (VmHWM), in MB, from
    /proc/self/status."""
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return {name: int(fields[name].split()[0]) / 1024 for name in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}


def reset_peak_rss() -> None:
    """Sets this process's peak resident memory (VmHWM) to its current one (Linux's clear_refs, value 5)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def measure_worker_reporting_errors(job: WorkerJob, *, own_process: bool) -> dict:
    """`measure_worker`, or the error that stopped it: a source that cannot be read (yet) is reported, not fatal."""
    try:
        return measure_worker(job, own_process=own_process)
    except Exception as error:  # Anything reading a source can raise.
        return {**dataclasses.asdict(job), "error": describe_error(error)}


# --- Every worker -----------------------------------------------------------------------------

def run(settings: Settings, *, work_directory: str | None = None) -> dict:
    """Measures every size, source and number of workers; returns the report (settings and each worker's result).

    The data is written under `work_directory` (default: the system's temporary directory) and deleted.
    """
    results = []
    with tempfile.TemporaryDirectory(dir=work_directory, prefix="mto_tf_input_bench_") as root:
        for size in settings.sizes:
            note(f"writing {size_text(size)} of rows for {', '.join(settings.sources)}")
            directory = os.path.join(root, str(size))
            data = prepare_data(directory, size=size, feature_width=settings.feature_width,
                                sources_wanted=settings.sources)
            for source in settings.sources:
                for workers in settings.workers:
                    note(f"{size_text(size)}, {source}, {workers} worker(s)")
                    jobs = [WorkerJob(source=source, directory=directory, workers=workers, worker=worker,
                                      batch_size=settings.batch_size, shuffle_buffer=settings.shuffle_buffer,
                                      feature_width=settings.feature_width, steps=settings.steps)
                            for worker in range(workers)]
                    results += [{**result, "size": size, "rows": data.rows,
                                 "file_bytes_per_row": data.file_bytes[SOURCES[source].files] / data.rows}
                                for result in _run_jobs(jobs, in_process=settings.in_process)]
            shutil.rmtree(directory)  # Before the next size: the disk, and the page cache the files fill.
    return {"settings": dataclasses.asdict(settings), "row_bytes": row_bytes(settings.feature_width),
            "results": results}


def note(text: str) -> None:
    print(f"input bench: {text}", file=sys.stderr, flush=True)


def _run_jobs(jobs: list[WorkerJob], *, in_process: bool) -> list[dict]:
    """One set of workers: in this process one after another, or each in a fresh process, all at once."""
    if in_process:
        return [measure_worker_reporting_errors(job, own_process=False) for job in jobs]
    processes = []
    try:
        for job in jobs:
            stderr = tempfile.TemporaryFile(mode="w+")
            command = [sys.executable, "-m", "mto_tf.bench", "--input",
                       f"--input_worker={json.dumps(dataclasses.asdict(job))}"]
            processes.append((job, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                                    env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")), stderr))
        return [_result_of(job, process, stderr) for job, process, stderr in processes]
    finally:
        for _, process, stderr in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
            stderr.close()


def _result_of(job: WorkerJob, process: subprocess.Popen, stderr) -> dict:
    stdout, _ = process.communicate(timeout=WORKER_TIMEOUT_SECONDS)
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if process.returncode == 0 and lines:
        return json.loads(lines[-1].removeprefix(RESULT_PREFIX))
    stderr.seek(0)
    last_lines = stderr.read().strip().splitlines()[-3:]
    return {**dataclasses.asdict(job), "error": f"worker exited with {process.returncode}: {' | '.join(last_lines)}"}


def worker_main(job_json: str) -> None:
    """`--input_worker=JSON`: measures one worker in this fresh process and prints its result."""
    result = measure_worker_reporting_errors(WorkerJob(**json.loads(job_json)), own_process=True)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# --- The report -------------------------------------------------------------------------------

def summarize(report: dict) -> list[dict]:
    """One row per size, source and number of workers N: the busiest worker's numbers, its ratios to today's
    path, and the target for them: ceil(B/N)/B, plus 5 %."""
    batch_size = report["settings"]["batch_size"]
    groups: dict[tuple, list[dict]] = {}
    for result in report["results"]:
        groups.setdefault((result["size"], result["source"], result["workers"]), []).append(result)
    rows = {key: _busiest(results) for key, results in groups.items()}
    for (size, source, workers), row in rows.items():
        row["target"] = math.ceil(batch_size / workers) / batch_size * TARGET_SLACK
        todays = rows.get((size, SOURCES[source].todays_path, workers))
        if todays and "error" not in row and "error" not in todays:
            row["rows_vs_todays"] = row["rows_read_per_step"] / todays["rows_read_per_step"]
            row["bytes_vs_todays"] = bytes_per_step(row) / todays_bytes_per_step(todays)
            row["meets_target"] = max(row["rows_vs_todays"], row["bytes_vs_todays"]) <= row["target"]
    return list(rows.values())


def bytes_per_step(row: dict) -> float:
    """What a worker reads per step: its files' bytes (rchar) if it reads them step by step, else the bytes of
    the rows it copies (from arrays in memory, or mapped)."""
    return row["rchar_per_step"] if SOURCES[row["source"]].reads_as_it_steps else row["payload_bytes_per_step"]


def todays_bytes_per_step(todays: dict) -> float:
    """What today's path reads per step over a pass: `bytes_per_step`, but for files its rows as stored.

    It reads every record once a pass, in file order; its rchar over the
    timed steps is not that rate: TFDS reads each TFRecord shard 8 MiB at a
    time and every shard at once (16 shards of 1 GB: 128 MiB before the
    first step), so a few hundred steps see a few such reads, or none.
    """
    if SOURCES[todays["source"]].reads_as_it_steps:
        return todays["rows_read_per_step"] * todays["file_bytes_per_row"]
    return todays["payload_bytes_per_step"]


def _busiest(results: list[dict]) -> dict:
    """One set's workers as one row: each measurement the largest any of them had (or the first error)."""
    errors = [result for result in results if "error" in result]
    if errors:
        return dict(errors[0])
    return {key: max(result[key] for result in results) if isinstance(value, float) else value
            for key, value in results[0].items()}


def format_tables(report: dict) -> str:
    """The summary as Markdown: reads per worker per step, then (if measured) memory per worker."""
    settings = report["settings"]
    rows = summarize(report)
    reads = ["| data | source | workers | rows read | rows yielded | payload KB | rchar KB | rchar / row read | "
             "file bytes / row | rows / today's | bytes / today's | target | met |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    memory = ["| data | source | workers | RSS after TF + model | peak RSS after | peak - after model | RssAnon | "
              "RssFile | RssFile growth in steps | setup rchar |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        where = f"| {size_text(row['size'])} | {row['source']} | {row['workers']} |"
        if "error" in row:
            reads.append(f"{where} {row['error'][:200]} |" + " |" * 9)
            memory.append(f"{where} not measured |" + " |" * 6)
            continue
        met = "–" if "meets_target" not in row else "yes" if row["meets_target"] else "**no**"
        reads.append(f"{where} {row['rows_read_per_step']:.1f} | {row['rows_yielded_per_step']:.1f} | "
                     f"{row['payload_bytes_per_step'] / 1024:,.0f} | {row['rchar_per_step'] / 1024:,.0f} | "
                     f"{row['rchar_per_step'] / row['rows_read_per_step']:,.0f} | {row['file_bytes_per_row']:,.0f} | "
                     f"{_ratio(row.get('rows_vs_todays'))} | {_ratio(row.get('bytes_vs_todays'))} | "
                     f"{row['target']:.3f} | {met} |")
        if "peak_rss_mb" in row:
            memory.append(f"{where} {row['rss_after_model_mb']:,.0f} | {row['peak_rss_mb']:,.0f} | "
                          f"{row['peak_rss_mb'] - row['rss_after_model_mb']:,.0f} | {row['rss_anon_mb']:,.0f} | "
                          f"{row['rss_file_mb']:,.0f} | {row['rss_file_growth_in_steps_mb']:,.1f} | "
                          f"{row['setup_rchar'] / 2**20:,.0f} |")
    storage_reads = max((row["read_bytes_per_step"] for row in rows if "error" not in row), default=0)
    tables = [*(f"- {name}: {SOURCES[name].description}" for name in settings["sources"]), "",
              f"Per worker per step (the busiest worker of each set): global batch {settings['batch_size']}, "
              f"{settings['steps']} timed steps, rows of {report['row_bytes']:,} bytes; KB = 1024 bytes. Bytes "
              f"compared: rchar for a source that reads its files as it steps (today's: its rows as stored), "
              f"else the payload. Storage reads (read_bytes) per step: at most {storage_reads / 1024:,.0f} KB.",
              "", *reads]
    if not settings["in_process"]:
        tables += ["", "Memory per worker, MB (the largest of each set):", "", *memory]
    return "\n".join(tables)


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def input_main(config: TrainConfig, *, machine: Callable[..., dict]) -> None:
    """`python -m mto_tf.bench --input`: the parent, or with --input_worker one worker.

    `machine(gpus=...)` describes the machine, as the training benchmark's report does.
    """
    if FLAGS.input_worker:
        worker_main(FLAGS.input_worker)
        return
    report = run(Settings.from_flags(config))
    report["machine"] = machine(gpus=len(tf.config.list_physical_devices("GPU")))
    print(format_tables(report))
    if FLAGS.output_json:
        with open(FLAGS.output_json, "w") as output:
            json.dump(report, output, indent=2)
