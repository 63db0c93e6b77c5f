"""`python -m mto_tf.input_service --port=P`: the tf.data service that `--input_service=HOST:P` reads from.

One dispatcher and one service worker in this process, serving until it is
stopped (SIGTERM, Ctrl-C). Every trainer of a run reads its share of each
global batch from it (`mto_tf/data/input_service.py`); a job per run
attempt and source, so one service outlives restarts and serves runs one
after another. `launch/local.py` starts one for `--input_service=local`.
"""

from __future__ import annotations

import socket

from absl import flags

from mto_tf.data import input_service

FLAGS = flags.FLAGS


def serve_main() -> None:
    # Trainers on other hosts fetch batches from the service worker by this host's name.
    host = FLAGS.host or socket.gethostname()
    address, servers = input_service.start(port=FLAGS.port, worker_port=FLAGS.worker_port, host=host)
    # launch/local.py waits for this line before it starts the trainers.
    print(f"input service: serving at {host}:{address.rpartition(':')[2]}", flush=True)
    servers[0].join()  # The dispatcher: until the process is stopped.
