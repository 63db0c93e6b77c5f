"""`mto-train` (and `python -m mto_tf`): flags in, one training run out.

    mto-train --model_dir=/tmp/run                       # one device
    mto-train --strategy=mirrored --num_cpu_devices=2 \\
              --model_dir=/tmp/run_mirrored              # 2 replicas on one CPU
    mto-train --loop=fit --model_dir=/tmp/run_fit        # the same through model.fit
    mto-train --flagfile=run.flags                       # flags from a file

A bad setting ends the run before anything is built or written, with one
line naming the flag and exit status 2.
"""

from __future__ import annotations

import os
import sys

from absl import app, logging
from absl import flags as absl_flags

from mto_tf import flags as mto_flags  # Defines the flags.
from mto_tf.config import ConfigError
from mto_tf.preemption import Preempted
from mto_tf.strategy import make_strategy
from mto_tf.trainer import train

EXIT_BAD_CONFIG = 2
EXIT_PREEMPTED = 143  # 128 + SIGTERM, as if the signal had ended the process.


def main(argv: list[str]) -> None:
    """Parses flags into a config, then trains."""
    if len(argv) > 1:
        _exit_with_error(f"unexpected arguments {argv[1:]}; every setting is a --flag")
    try:
        config = mto_flags.config_from_flags()
        # The strategy first: the CPU must be split into devices before
        # TensorFlow runs its first op.
        strategy = make_strategy(config)
        logging.info("Training %s on %s with %s, %d replica(s), %s loop, into %s", config.model, config.dataset,
                     config.strategy, strategy.num_replicas_in_sync, config.loop, config.model_dir)
        train(config, strategy=strategy)
    except ConfigError as error:
        _exit_with_error(str(error))
    except Preempted as preempted:
        # Non-zero, so that a launcher restarts the job; it resumes from the checkpoint.
        logging.warning("Preempted: %s; rerun the same command to resume", preempted)
        sys.exit(EXIT_PREEMPTED)
    logging.info("Trained to step %d; final weights in %s", config.train_steps,
                 os.path.join(config.model_dir, "model.weights.h5"))


def _exit_with_error(message: str) -> None:
    print(f"mto-train: error: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_CONFIG)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, but a malformed flag exits 2 like every other bad setting
    (absl exits 1), so a launcher knows not to restart it."""
    try:
        return mto_flags.FLAGS(argv)
    except absl_flags.Error as error:
        _exit_with_error(f"{error}; see --helpshort")


def run_main() -> None:
    """Console-script entry point."""
    app.run(main, flags_parser=_parse_flags)
