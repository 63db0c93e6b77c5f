"""README and docs/ point at code that exists, and at the lines they name."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCUMENTS = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "launch" / "README.md",
             *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_module_a_document_names_exists(document):
    for path in re.findall(r"\b((?:mto_tf|tests|launch)/[\w/]+\.(?:py|sh|sbatch|yaml))\b", document.read_text()):
        assert (ROOT / path).exists(), f"{document.name} names {path}, which does not exist"


def test_the_step_lines_docs_name_hold_what_they_say():
    step = (ROOT / "mto_tf" / "core" / "step.py").read_text().splitlines()
    text = (ROOT / "docs" / "explain_and_sweep.md").read_text()
    references = re.findall(r"\| ([^|]+) \| \[[\d-]+\]\(\.\./mto_tf/core/step\.py#L(\d+)(?:-L(\d+))?\)"
                            r"(?: \(`([\w.]+)`\))?", text)
    assert len(references) == 5
    expected = {"one gradient": "tape.gradient", "summed over": "all_reduce", "one optimizer update": "apply_gradients"}
    for part, first, last, name in references:
        lines = "\n".join(step[int(first) - 1:int(last or first)])
        wanted = name or next(code for words, code in expected.items() if part.startswith(words))
        assert wanted in lines, f"docs/explain_and_sweep.md: {part!r} at step.py lines {first}-{last or first}"


def test_readme_is_short_and_its_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -e '.[test]' && python -m pytest" in readme
    assert "pip install -q -e '.[test]'" in ci and "python -m pytest" in ci


def test_the_readme_step_is_the_code_of_the_step():
    """Each line of README's first Python block is a line of core/step.py (comments aside): README shows the code."""
    def code(line):
        return line.split("#", 1)[0].strip()

    snippet = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL).group(1)
    step_lines = [code(line) for line in (ROOT / "mto_tf" / "core" / "step.py").read_text().splitlines()]
    step = set(step_lines)
    lines = [code(line) for line in snippet.splitlines() if code(line)]
    assert len(lines) >= 7 and "tape.gradient" in snippet and "apply_gradients" in snippet
    missing = [line for line in lines if line not in step]
    assert not missing, f"README's step has lines that core/step.py does not: {missing}"
    positions = [step_lines.index(line) for line in lines]
    assert positions == sorted(positions), "README's step lines are not in core/step.py's order"
