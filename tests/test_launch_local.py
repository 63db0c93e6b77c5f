"""launch/local.py's mechanics, with small Python commands standing in for workers (no TensorFlow)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# One process: test_timeout_kills_every_worker_and_their_children counts every sleeping worker on the machine.
pytestmark = pytest.mark.xdist_group("launch_local")

LAUNCHER = str(Path(__file__).parents[1] / "launch" / "local.py")


def launch(*args, timeout=60):
    return subprocess.run([sys.executable, LAUNCHER, *args], capture_output=True, text=True, timeout=timeout)


def worker_pids(stdout: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"launch: worker \d+ started, pid (\d+)", stdout)]


def is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent's bookkeeping is left.
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_each_worker_gets_its_own_tf_config_on_loopback_and_prefixed_output():
    show_task = "import os; print(os.environ['TF_CONFIG'])"
    process = launch("--workers=3", "--", sys.executable, "-c", show_task)
    assert process.returncode == 0, process.stderr
    configs = {int(index): json.loads(text)
               for index, text in re.findall(r"^\[worker (\d)\] (\{.*\})$", process.stdout, re.MULTILINE)}
    assert sorted(configs) == [0, 1, 2]
    workers = configs[0]["cluster"]["worker"]
    assert len(set(workers)) == 3 and all(address.startswith("127.0.0.1:") for address in workers)
    for index, config in configs.items():
        assert config["cluster"]["worker"] == workers and config["task"] == {"type": "worker", "index": index}


def test_a_failing_worker_stops_the_others_and_is_named():
    fail_second = ("import json, os, sys, time\n"
                   "index = json.loads(os.environ['TF_CONFIG'])['task']['index']\n"
                   "sys.exit(3) if index == 1 else time.sleep(600)")
    started = time.monotonic()
    process = launch("--workers=2", "--", sys.executable, "-c", fail_second)
    assert process.returncode == 3
    assert "launch: worker 1 exited with status 3" in process.stderr
    assert time.monotonic() - started < 30
    assert not any(is_running(pid) for pid in worker_pids(process.stdout))


def test_timeout_kills_every_worker_and_their_children():
    # Each worker starts a child of its own that also sleeps: the whole group must go.
    sleeper = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); time.sleep(600)"
    process = launch("--workers=2", "--timeout=2", "--", sys.executable, "-c", sleeper)
    assert process.returncode == 1 and "timed out; workers still running: 0, 1" in process.stderr
    remaining = subprocess.run(["pgrep", "-f", "time.sleep\\(600\\)"], capture_output=True, text=True).stdout.split()
    assert remaining == []


def test_restarts_run_every_worker_again_after_a_failure(tmp_path):
    # Fails on the first attempt (no marker yet), succeeds on the second.
    flaky = (f"import os, sys, json, time\n"
             f"index = json.loads(os.environ['TF_CONFIG'])['task']['index']\n"
             f"marker = {str(tmp_path / 'attempted')!r} + str(index)\n"
             f"first = not os.path.exists(marker)\n"
             f"open(marker, 'a').write('x')\n"
             f"sys.exit(1 if first and index == 0 else 0)\n")
    process = launch("--workers=2", "--restarts=1", "--", sys.executable, "-c", flaky)
    assert process.returncode == 0, process.stdout + process.stderr
    assert "launch: restarting all workers" in process.stdout
    assert "launch: attempt 2 of 2" in process.stdout


def test_status_2_is_a_bad_setting_and_is_not_restarted():
    process = launch("--workers=2", "--restarts=3", "--", sys.executable, "-c", "import sys; sys.exit(2)")
    assert process.returncode == 2
    assert "attempt 2" not in process.stdout


def test_command_is_required():
    process = launch("--workers=2")
    assert process.returncode == 2 and "put the worker command after --" in process.stderr


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_or_ctrl_c_to_the_launcher_reaches_every_worker_and_nothing_is_left(signum, status):
    # Workers that, like mto-train, finish cleanly on SIGTERM or Ctrl-C (saying so, with 128 + the signal).
    graceful = ("import signal, sys, time\n"
                "def stop(signum, _):\n"
                "    print('stopping cleanly', flush=True); sys.exit(128 + signum)\n"
                "signal.signal(signal.SIGTERM, stop)\n"
                "signal.signal(signal.SIGINT, stop)\n"
                "print('ready', flush=True)\n"
                "time.sleep(600)\n")
    launcher = subprocess.Popen([sys.executable, LAUNCHER, "--workers=2", "--grace=20", "--", sys.executable, "-c",
                                 graceful], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    while sum("] ready" in line for line in lines) < 2:
        lines.append(launcher.stdout.readline())
    launcher.send_signal(signum)
    output = "".join(lines) + launcher.stdout.read()
    assert launcher.wait(timeout=30) == status
    assert "[worker 0] stopping cleanly" in output and "[worker 1] stopping cleanly" in output
    assert f"launch: stopped on request ({signal.Signals(signum).name})" in output
    assert not any(is_running(pid) for pid in worker_pids(output))
