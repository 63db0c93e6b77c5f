"""`docs/flags.md`: every `mto-train` flag, written from `TrainConfig`'s fields (the same source as the flags).

    python -m mto_tf.programs.flags_doc docs/flags.md

A test fails when the file in the repository differs from what this writes.
"""

from __future__ import annotations

import sys

from mto_tf import config as config_lib
from mto_tf.programs import explain
from mto_tf.programs.flags import flag_default

_PARTS = {
    "model": "building the model",
    "data": "reading and batching the training data",
    "loss": "the loss",
    "metrics": "the metrics",
    "training": "the update: optimizer, clipping, precision, XLA",
    "evaluation": "evaluation on validation data",
    "driver": "the loop: how long, logs, checkpoints, files",
    "distribution": "the tf.distribute strategy",
}


def markdown() -> str:
    """The whole of `docs/flags.md`."""
    assert set(_PARTS) == set(config_lib.PARTS)
    lines = [
        "# `mto-train` flags",
        "",
        "Written by `python -m mto_tf.programs.flags_doc docs/flags.md` from the fields of `TrainConfig`",
        "(`mto_tf/config.py`), which also define the flags themselves; a test fails when this file is stale.",
        "`mto-train --helpshort` prints the same help. absl's own flags work too: `--flagfile=PATH` (one flag",
        "per line), `--helpshort`, `--verbosity=0` (TensorFlow's and TFDS's Python logs).",
        "",
        "**Read by**: the part of a run that reads the setting: "
        + "; ".join(f"*{part}*, {meaning}" for part, meaning in _PARTS.items())
        + ". A setting marked *only* is read by those built-in models or datasets alone: with any other, a "
          "value other than its default is refused rather than ignored.",
        "",
        "**Resume**: *yes* where a rerun into the same `--model_dir` may change it (how far and how the run is "
        "driven); every other setting is recorded in `config.json` and must be repeated.",
        "",
        f"`mto-explain` reads the {', '.join(explain.READS)} settings (and `--model_dir`, for its weights) and "
        f"refuses the others by name.",
        "",
        "| flag | default | read by | resume | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, setting in config_lib.SETTINGS.items():
        read_by = ", ".join(setting.reads)
        if setting.only_for:
            read_by += f" (only {', '.join(setting.only_for)})"
        choices = f" One of: {', '.join(setting.choices)}." if setting.choices else ""
        help_text = (setting.help + choices).replace("|", "\\|")
        lines.append(f"| `--{name}` | {_default_text(flag_default(name))} | {read_by} | "
                     f"{'yes' if setting.resumable else 'no'} | {help_text} |")
    return "\n".join(lines) + "\n"


def _default_text(value) -> str:
    if value is None:
        return "unset"
    if value == "":
        return "empty"
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"`{value}`"


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit("usage: python -m mto_tf.programs.flags_doc PATH (e.g. docs/flags.md)")
    with open(argv[1], "w") as file:
        file.write(markdown())


if __name__ == "__main__":
    main(sys.argv)
