"""`--input_service`: a tf.data service that reads each global batch once and hands each worker its share.

For sources read in order (a TFRecord-backed TFDS dataset, a user's
`tf.data.Dataset`), every worker's own pipeline would read every record of
every global batch and keep its replicas' rows. Through the service (one
dispatcher, one service worker, `ShardingPolicy.OFF`: the single-device
order), the records are read and parsed once, and each trainer receives only
its rows (`batching.ServedBy`). Sources read by index do not need it.

`local` starts the dispatcher and its worker in this process (one trainer
process); for several, `launch/local.py` starts them once
(`python -m mto_tf.input_service`) and passes every worker `HOST:PORT`.
"""

from __future__ import annotations

import socket

import tensorflow as tf

from mto_tf.data import batching
from mto_tf.data.examples import Examples
from mto_tf.errors import ConfigError

# The service `local` started in this process: its address, and its servers (they stop when nothing holds them).
_local_service: tuple[str, list] | None = None


def start(port: int = 0, *, worker_port: int = 0, host: str = "localhost") -> tuple[str, list]:
    """Starts a dispatcher on `port` and one service worker on `worker_port` (0: any free one); returns the
    dispatcher's address and the servers (keep them: they stop when collected). Trainers fetch batches from the
    worker at `host`."""
    try:
        dispatcher = tf.data.experimental.service.DispatchServer(
            tf.data.experimental.service.DispatcherConfig(port=port))
    except RuntimeError as error:  # "Could not start gRPC server": the port is taken.
        raise ConfigError("port", f"cannot serve on port {port}: {error}") from None
    try:
        worker = tf.data.experimental.service.WorkerServer(tf.data.experimental.service.WorkerConfig(
            dispatcher_address=dispatcher.target.removeprefix("grpc://"), worker_address=f"{host}:%port%",
            port=worker_port))
    except RuntimeError as error:
        raise ConfigError("worker_port", f"cannot serve on port {worker_port}: {error}") from None
    return dispatcher.target, [dispatcher, worker]


def address_of(setting: str) -> str:
    """`--input_service`'s value as the address trainers read from: `local` starts a service in this process
    (once); `HOST:PORT` must answer."""
    global _local_service
    if setting == "local":
        if _local_service is None:
            _local_service = start()
        return _local_service[0]
    host, _, port = setting.rpartition(":")
    try:  # A TCP connection now: a missing service would otherwise hang the first step.
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as error:
        raise ConfigError("input_service", f"no tf.data service answers at {setting} ({error}); start one "
                                           f"(python -m mto_tf.input_service --port={port}) or use "
                                           f"--input_service=local") from None
    return f"grpc://{setting}"


def describe_input(examples: Examples, served_by: batching.ServedBy | None) -> str:
    """How a worker reads its share of a source's training batches, and why: what a run says once."""
    if examples.by_index:
        return "read by index: each input pipeline reads only its replicas' examples of each global batch"
    if served_by is not None:
        return (f"read in order, once, by the tf.data service at {served_by.address.removeprefix('grpc://')}: each "
                f"input pipeline receives only its replicas' rows of each global batch")
    return ("read in order: each input pipeline (one per worker) reads every record of each global batch and "
            "keeps its replicas' rows (--input_service reads them once for all workers)")
