"""Where each program starts: the console scripts and `python -m mto_tf[.evaluate|.explain|.export|.sweep|.bench]`.

Each program's flags are parsed (and mto-train's checked into a
`TrainConfig`) before TensorFlow is imported, so a bad flag is reported at
once; `runner.run_program` then imports TensorFlow with its start-up
chatter hidden, and only then is the program's own module imported: its
modules import TensorFlow at their top, so those imports sit inside the
functions below.
"""

from __future__ import annotations

from mto_tf.programs import flags as mto_flags
from mto_tf.programs import runner


def mto_train() -> None:
    """`mto-train`, `python -m mto_tf`."""

    def main(config):
        from mto_tf.programs import mto_train as program
        program.train_main(config)

    runner.run_program("mto-train", main, check=mto_flags.config_from_flags)


def mto_explain() -> None:
    """`mto-explain`, `python -m mto_tf.explain`."""

    def main():
        from mto_tf.programs import explain as program
        program.explain_main()

    mto_flags.define_explain_flags()
    runner.run_program("mto-explain", main)


def mto_evaluate() -> None:
    """`mto-evaluate`, `python -m mto_tf.evaluate`."""

    def main():
        from mto_tf.programs import evaluate as program
        program.evaluate_main()

    mto_flags.define_evaluate_flags()
    runner.run_program("mto-evaluate", main)


def mto_export() -> None:
    """`mto-export`, `python -m mto_tf.export`."""

    def main():
        from mto_tf.programs import export as program
        program.export_main()

    mto_flags.define_export_flags()
    runner.run_program("mto-export", main)


def input_service() -> None:
    """`python -m mto_tf.input_service`."""

    def main():
        from mto_tf.programs import input_service as program
        program.serve_main()

    mto_flags.define_input_service_flags()
    runner.run_program("mto_tf.input_service", main)


def sweep() -> None:
    """`python -m mto_tf.sweep`."""

    def main():
        from mto_tf.programs import sweep as program
        program.sweep_main()

    mto_flags.define_sweep_flags()
    runner.run_program("mto_tf.sweep", main)


def bench() -> None:
    """`python -m mto_tf.bench` (its own absl program: its errors are absl's). The parent process that
    runs the variants imports no TensorFlow; each variant imports it in its own turn (`bench.py`)."""
    from mto_tf.programs import bench as program
    program.run_main()
