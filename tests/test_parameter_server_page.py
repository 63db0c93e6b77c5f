"""docs/multi_worker.md's reasons for not offering ParameterServerStrategy, measured again.

The page quotes the output of docs/experiments/parameter_server.py. This
runs the script once, in a fresh process, and compares each measured line
with the quote: a Keras or TensorFlow release that changes any of them
(one that runs `fit` under ParameterServerStrategy, or trains sharded
variables) fails here until the page is written again.
"""

import re
import sys
from pathlib import Path

import pytest

from helpers import run_cli

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "docs" / "experiments" / "parameter_server.py"
PAGE = ROOT / "docs" / "multi_worker.md"
SECTION = "## Which engine: MultiWorkerMirroredStrategy, not ParameterServerStrategy"
# Every line the script prints after the versions, in its order.
KEYS = ("keras_source", "fit", "custom_loop_unsharded", "saves_unsharded", "variables", "gradient",
        "embedding_lookup", "embedding_lookup_tf", "save_weights", "checkpoint", "model_save", "table_memory")


def measurements(text: str) -> dict[str, str]:
    """The `key: what was tried -> what happened` lines of `text`, by key."""
    pattern = rf"^({'|'.join(KEYS)}): .*$"
    return {match.group(1): match.group(0) for match in re.finditer(pattern, text, re.MULTILINE)}


def quoted_output() -> str:
    """The script's output as the page's section quotes it: its code block that starts with the versions."""
    section = PAGE.read_text().split(SECTION, 1)[1]
    blocks = re.findall(r"^```text\n(.*?)^```", section, re.MULTILINE | re.DOTALL)
    return next(block for block in blocks if block.startswith("TensorFlow "))


@pytest.mark.slow
@pytest.mark.keras_behaviour
def test_the_parameter_server_measurements_are_still_what_the_page_quotes():
    quoted = measurements(quoted_output())
    assert list(quoted) == list(KEYS), "the page quotes every line of the script, in its order"

    process = run_cli(entry_point=(sys.executable, str(SCRIPT)))
    assert process.returncode == 0, process.stderr[-3000:]
    measured = measurements(process.stdout)
    for key in KEYS:
        assert measured.get(key) == quoted[key], (
            f"{key} changed: docs/multi_worker.md quotes\n  {quoted[key]}\nthe script now prints\n  {measured.get(key)}\n"
            f"Read the page's last section again against the new output.")
