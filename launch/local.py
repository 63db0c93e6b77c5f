"""Runs one command as N MultiWorkerMirroredStrategy workers on this machine (127.0.0.1).

    python launch/local.py --workers=2 --timeout=600 -- \\
        mto-train --strategy=multi_worker --model_dir=/tmp/run_2workers

    # 2 workers x 2 replicas each (logical CPU devices), restarted up to twice after a failure:
    python launch/local.py --workers=2 --restarts=2 -- \\
        mto-train --strategy=multi_worker --num_cpu_devices=2 --model_dir=/tmp/run_2x2

The command after `--` runs once per worker, each with its own `TF_CONFIG`
(free ports on 127.0.0.1) and its output lines prefixed `[worker i]`.

- A worker that fails (non-zero exit) or a `--timeout` that passes stops
  every worker, by process id (a MultiWorkerMirroredStrategy worker whose
  peer died can wait forever, and ignores SIGTERM while it does).
- With `--restarts=K` all workers are started again, up to K times; they
  resume from the run's latest checkpoint. A worker that exits with status 2
  (mto-train's "bad setting") or 3 (a loss or weight became NaN or
  infinite) is not restarted: that will not fix itself.
- SIGTERM or Ctrl-C to the launcher is passed on to the workers (mto-train
  then saves a checkpoint and stops); after `--grace` seconds they are killed.
- `--input_service=local` in the command: the launcher starts one tf.data
  service (`python -m mto_tf.input_service`) for all workers, passes each
  `--input_service=127.0.0.1:PORT` instead, and stops it at the end; it
  outlives restarts (each attempt reads under a job of its own).

Exit status: 0 when every worker succeeded, else the first failed worker's
status (1 for a timeout), with a line naming the worker.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

EXIT_BAD_CONFIG = 2  # mto-train's status for a bad setting.
EXIT_NON_FINITE = 3  # mto-train's status for a loss or weight that became NaN or infinite.
POLL_SECONDS = 0.1


def free_ports(count: int) -> list[int]:
    """Ports the OS reports free on 127.0.0.1 (held open together so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def tf_config(ports: list[int], index: int) -> str:
    """The `TF_CONFIG` of worker `index` in a cluster of workers on `ports`."""
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
                       "task": {"type": "worker", "index": index}})


class Worker:
    """One worker process, in its own process group, its output prefixed and relayed."""

    def __init__(self, index: int, command: list[str], environment: dict[str, str]):
        self.index = index
        self.process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, text=True, bufsize=1, start_new_session=True)
        self._relay = threading.Thread(target=self._relay_output, daemon=True)
        self._relay.start()
        print(f"launch: worker {index} started, pid {self.process.pid}", flush=True)

    def _relay_output(self):
        for line in self.process.stdout:
            sys.stdout.write(f"[worker {self.index}] {line}")
            sys.stdout.flush()

    def signal_group(self, signum: int) -> None:
        """Sends `signum` to the worker and everything it started."""
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """Kills the worker's whole process group and waits for it."""
        self.signal_group(signal.SIGKILL)
        self.process.wait()
        self._relay.join(timeout=5)


class StopRequest(threading.Event):
    """SIGTERM or Ctrl-C reached the launcher: it forwards the same signal to every worker."""

    signum = signal.SIGTERM

    def set(self, signum: int = signal.SIGTERM) -> None:
        self.signum = signum
        super().set()


class InputService:
    """`python -m mto_tf.input_service` on a free port of 127.0.0.1, for `--input_service=local`."""

    FLAG = "--input_service=local"

    def __init__(self):
        [self.port] = free_ports(1)
        # Trainers fetch batches from its worker at 127.0.0.1, as they reach each other.
        self.process = subprocess.Popen([sys.executable, "-m", "mto_tf.input_service", f"--port={self.port}",
                                         "--host=127.0.0.1"],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        text=True, start_new_session=True)
        for line in self.process.stdout:  # It answers once this line is printed.
            if line.startswith("input service: serving at"):
                break
        else:
            raise SystemExit(f"launch/local.py: the input service did not start (status {self.process.wait()})")
        threading.Thread(target=self.process.stdout.read, daemon=True).start()  # Drain it.
        print(f"launch: input service started at 127.0.0.1:{self.port}, pid {self.process.pid}", flush=True)

    def worker_command(self, command: list[str]) -> list[str]:
        return [f"--input_service=127.0.0.1:{self.port}" if arg == self.FLAG else arg for arg in command]

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def run_workers(command: list[str], *, workers: int, deadline: float, grace: float,
                stop_requested: StopRequest) -> tuple[int, str]:
    """Runs one attempt; returns (exit status, what happened)."""
    ports = free_ports(workers)
    started = [Worker(index, command, dict(os.environ, TF_CONFIG=tf_config(ports, index)))
               for index in range(workers)]
    try:
        while True:
            statuses = [worker.process.poll() for worker in started]
            failed = [worker for worker, status in zip(started, statuses) if status not in (None, 0)]
            if failed:
                status = failed[0].process.returncode
                if status < 0:  # Killed by a signal: report it as a shell would.
                    return 128 - status, f"worker {failed[0].index} was killed by signal {-status}"
                return status, f"worker {failed[0].index} exited with status {status}"
            if all(status == 0 for status in statuses):
                return 0, "all workers finished"
            if stop_requested.is_set():
                # The same signal: mto-train checkpoints and stops (Ctrl-C exits 130, SIGTERM 143).
                for worker in started:
                    worker.signal_group(stop_requested.signum)
                _wait_all(started, time.monotonic() + grace)
                return 128 + stop_requested.signum, f"stopped on request ({signal.Signals(stop_requested.signum).name})"
            if time.monotonic() > deadline:
                return 1, "timed out; workers still running: " + ", ".join(
                    str(worker.index) for worker, status in zip(started, statuses) if status is None)
            time.sleep(POLL_SECONDS)
    finally:
        for worker in started:
            worker.kill()


def _wait_all(workers: list[Worker], deadline: float) -> None:
    while time.monotonic() < deadline and any(worker.process.poll() is None for worker in workers):
        time.sleep(POLL_SECONDS)


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print("launch/local.py: error: put the worker command after --, e.g. -- mto-train --strategy=multi_worker",
              file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="launch/local.py", description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="number of worker processes")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before all workers are stopped")
    parser.add_argument("--restarts", type=int, default=0, help="times to restart all workers after a failure")
    parser.add_argument("--grace", type=float, default=30, help="seconds workers get to stop after SIGTERM")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    if not command:
        parser.error("no worker command after --")
    if args.workers < 1 or args.restarts < 0 or args.timeout <= 0:
        parser.error("--workers must be >= 1, --restarts >= 0 and --timeout > 0")

    stop_requested = StopRequest()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda received, _: stop_requested.set(received))
    service = InputService() if InputService.FLAG in command else None
    try:
        return _run_attempts(service.worker_command(command) if service else command, args, stop_requested)
    finally:
        if service:
            service.stop()


def _run_attempts(command: list[str], args: argparse.Namespace, stop_requested: StopRequest) -> int:
    """Runs the workers, and again after a failure up to `--restarts` times; returns the exit status."""
    deadline = time.monotonic() + args.timeout
    for attempt in range(args.restarts + 1):
        print(f"launch: attempt {attempt + 1} of {args.restarts + 1}: {args.workers} worker(s) of: "
              f"{' '.join(command)}", flush=True)
        status, what_happened = run_workers(command, workers=args.workers, deadline=deadline, grace=args.grace,
                                            stop_requested=stop_requested)
        print(f"launch: {what_happened}", file=sys.stderr if status else sys.stdout, flush=True)
        if status == 0:
            return 0
        # A bad setting, or a run that diverged, would only do the same again.
        retryable = (status not in (EXIT_BAD_CONFIG, EXIT_NON_FINITE) and not stop_requested.is_set()
                     and time.monotonic() < deadline)
        if not retryable or attempt == args.restarts:
            return status
        print("launch: restarting all workers; they resume from the latest checkpoint", flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
