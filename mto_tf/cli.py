"""`mto-train` (and `python -m mto_tf`): flags in, one training run out.

    mto-train --model_dir=/tmp/run                       # one device
    mto-train --strategy=mirrored --num_cpu_devices=2 \\
              --model_dir=/tmp/run_mirrored              # 2 replicas on one CPU
    mto-train --loop=fit --model_dir=/tmp/run_fit        # the same through model.fit
    mto-train --flagfile=run.flags                       # flags from a file

A bad setting ends the run before anything is built or written, with one
line naming the flag and exit status 2. Exit statuses: 0 trained; 2 a bad
setting, or a --model_dir that cannot be written or resumed from; 3 a loss or
weight became NaN or infinite (the last good checkpoint is kept, no final
model); 143 stopped by SIGTERM with a checkpoint (rerun to resume).

Quiet by default: mto-train's own messages, warnings and errors.
`--verbosity=0` (absl's flag) shows TensorFlow's and TFDS's Python
information logs too; `TF_CPP_MIN_LOG_LEVEL=0` TensorFlow's C++ ones.
"""

from __future__ import annotations

import contextlib
import functools
import logging as std_logging
import os
import re
import sys
import tempfile
from collections.abc import Callable

from absl import app, logging
from absl import flags as absl_flags

from mto_tf import flags as mto_flags  # Defines the flags; imports no TensorFlow.
from mto_tf.config import ConfigError

# TensorFlow's C++ start-up lines that its log level does not reach: they are
# written before absl::InitializeLog(), which TF_CPP_MIN_LOG_LEVEL only
# affects afterwards (abseil/abseil-cpp#1957). Plus its failed CUDA
# initialisation on a machine without a GPU driver, logged as an error
# although TensorFlow then runs on the CPU, as the replica count says.
_START_UP_CHATTER = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\)|I\d{4} |"
                               r"E\d{4} .*failed call to cuInit)")


@contextlib.contextmanager
def _start_up_chatter_hidden(hidden: bool):
    """Captures stderr at the file-descriptor level (C++ writes there) and replays all but the chatter."""
    if not hidden:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not _START_UP_CHATTER.match(line):
                    sys.stderr.write(line)


# TensorFlow reads it when it is first imported, just below (unset or empty: quiet).
if not os.environ.get("TF_CPP_MIN_LOG_LEVEL"):
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
_QUIET = os.environ["TF_CPP_MIN_LOG_LEVEL"] != "0"  # TF_CPP_MIN_LOG_LEVEL=0 asks for all of it.
with _start_up_chatter_hidden(_QUIET):
    import tensorflow as tf

    from mto_tf.outputs import NonFiniteError
    from mto_tf.preemption import Preempted
    from mto_tf.strategy import make_strategy
    from mto_tf.trainer import train

    # CUDA initializes when devices are first listed: here, inside the
    # filter. Physical devices only: the CPU can still be split afterwards.
    tf.config.list_physical_devices("GPU")

EXIT_BAD_CONFIG = 2
EXIT_NON_FINITE = 3
EXIT_PREEMPTED = 143  # 128 + SIGTERM, as if the signal had ended the process.

logger = std_logging.getLogger("mto_tf")


def train_main() -> None:
    """`mto-train`: flags into a config, then one training run."""
    config = mto_flags.config_from_flags()
    # The strategy first: the CPU must be split into devices before
    # TensorFlow runs its first op.
    strategy = make_strategy(config)
    logger.info("Training %s on %s with %s, %d replica(s), %s loop, into %s", config.model, config.dataset,
                config.strategy, strategy.num_replicas_in_sync, config.loop, config.model_dir)
    train(config, strategy=strategy)


def run_program(program: str, program_main: Callable[[], None]) -> None:
    """Runs `program_main()` after absl parses the flags; every error is one line naming `program` and a status."""

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            _exit_with_error(program, f"unexpected arguments {argv[1:]}; every setting is a --flag")
        _show_own_messages_only(verbose=absl_flags.FLAGS["verbosity"].present > 0)
        try:
            program_main()
        except ConfigError as error:
            _exit_with_error(program, str(error))
        except NonFiniteError as error:
            _exit_with_error(program, str(error), status=EXIT_NON_FINITE)
        except Preempted as preempted:
            # Non-zero, so that a launcher restarts the job; it resumes from the checkpoint.
            logger.warning("Preempted: %s; rerun the same command to resume", preempted)
            sys.exit(EXIT_PREEMPTED)

    app.run(main, flags_parser=functools.partial(_parse_flags, program=program))


def _show_own_messages_only(*, verbose: bool) -> None:
    """mto_tf's messages as plain lines on stderr; TensorFlow's, TFDS's and absl's below warnings hidden."""
    handler = std_logging.StreamHandler(sys.stderr)
    handler.setFormatter(_PlainFormatter())
    logger.addHandler(handler)
    logger.setLevel(std_logging.INFO)
    logger.propagate = False  # Not through absl's handler: no "I1124 22:06:11.71 ... file.py:69]" prefixes.
    if not verbose:
        logging.set_verbosity(logging.WARNING)  # absl's Python logs, which TensorFlow and TFDS use.
        import tensorflow_datasets as tfds
        tfds.disable_progress_bar()  # Its bars while it prepares a dataset.


class _PlainFormatter(std_logging.Formatter):
    def format(self, record: std_logging.LogRecord) -> str:
        message = record.getMessage()
        return message if record.levelno < std_logging.WARNING else f"{record.levelname.lower()}: {message}"


def _exit_with_error(program: str, message: str, *, status: int = EXIT_BAD_CONFIG) -> None:
    print(f"{program}: error: {message}", file=sys.stderr)
    sys.exit(status)


def _parse_flags(argv: list[str], *, program: str) -> list[str]:
    """absl's parser, but a malformed flag exits 2 like every other bad setting
    (absl exits 1), so a launcher knows not to restart it."""
    try:
        return mto_flags.FLAGS(argv)
    except absl_flags.Error as error:
        _exit_with_error(program, f"{error}; see --helpshort")


def run_main() -> None:
    """Console-script entry point of `mto-train`."""
    run_program("mto-train", train_main)
