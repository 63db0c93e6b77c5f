"""README's "Your own model" example runs as written: the model file, the Python run, the command line."""

import contextlib
import io
import json
import os
import re
import subprocess
import traceback
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

README = Path(__file__).parents[1] / "README.md"


def _section_blocks(title):
    text = README.read_text()
    section = text[text.index(f"## {title}\n"):]
    section = section[:section.index("\n## ", 1)]
    return re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)


def _run_python_here(code: str) -> subprocess.CompletedProcess:
    """Python code run in this process as a script (`python -c` would take TensorFlow's 10 s start again)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})
            status = 0
        except Exception:  # As the interpreter would: the traceback on stderr, status 1.
            traceback.print_exc()
            status = 1
    return subprocess.CompletedProcess(["python", "-c", "..."], status, stdout.getvalue(), stderr.getvalue())


def test_your_own_model_example_trains_from_python_and_from_the_command_line(tmp_path, monkeypatch):
    (model_file, _), (python_run, _), (command, _) = [(code, language) for language, code in
                                                       _section_blocks("Your own model")]
    assert model_file.startswith("# my_model.py\n")
    (tmp_path / "my_model.py").write_text(model_file)
    # Only the run directories move, into this test's tmp directory.
    python_run = python_run.replace("/tmp/my_run", str(tmp_path / "my_run"))
    command = command.replace("/tmp/my_run_cli", str(tmp_path / "my_run_cli"))
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")

    monkeypatch.chdir(tmp_path)  # Where the user runs it: my_model.py importable from there.
    monkeypatch.syspath_prepend(str(tmp_path))
    python = _run_python_here(python_run)
    assert python.returncode == 0, python.stderr[-3000:]
    shell = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           env=environment)
    assert shell.returncode == 0, shell.stderr[-3000:]

    for run in ("my_run", "my_run_cli"):
        last = json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[-1])
        assert last["step"] == 100
        assert {"loss", "department_loss", "priority_loss", "department_accuracy", "priority_mae"} <= set(last)
    assert "'department_accuracy'" in python.stdout
