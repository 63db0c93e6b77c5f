"""How every program runs: absl parses the flags, the program runs, every error is one line and an exit status.

The flags are parsed, and checked as far as the settings alone decide,
before TensorFlow is imported: a malformed or impossible flag is reported at
once, without the seconds TensorFlow takes to start. Then TensorFlow is
imported with its start-up chatter hidden (`tensorflow_logs.py`), and the
program runs.

Exit statuses: 0 done; 2 a bad setting, or a --model_dir that cannot be
written or resumed from (found before anything is written); 3 a loss or
weight became NaN or infinite (the last good checkpoint is kept, no final
model); 130 stopped by Ctrl-C (SIGINT), after the current call with a
checkpoint, or at once on a second Ctrl-C (rerun to resume); 143 stopped by
SIGTERM with a checkpoint (rerun to resume).

Quiet by default: the program's own messages, warnings and errors.
`--verbosity=0` (absl's flag) shows TensorFlow's and TFDS's Python
information logs too; `TF_CPP_MIN_LOG_LEVEL=0` TensorFlow's C++ ones (see
`tensorflow_logs.py`).
"""

from __future__ import annotations

import contextlib
import functools
import logging as std_logging
import signal
import sys
from collections.abc import Callable
from typing import Any

from absl import app, logging
from absl import flags as absl_flags

from mto_tf.errors import ConfigError, Interrupted, InterruptedAtOnce, NonFiniteError, Preempted
from mto_tf.programs import flags as mto_flags
from mto_tf.programs import tensorflow_logs

EXIT_OK = 0
EXIT_BAD_CONFIG = 2
EXIT_NON_FINITE = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C.
EXIT_PREEMPTED = 143  # 128 + SIGTERM, as if the signal had ended the process.

logger = std_logging.getLogger("mto_tf")


def run_program(program: str, program_main: Callable[..., None], *, check: Callable[[], Any] | None = None) -> None:
    """Runs the program after absl parses the flags, and exits with its status (see the module's doc).

    Args:
      program: its name, as errors name it.
      program_main: runs it; called with what `check` returns, if there is a `check`.
      check: reads and checks the parsed flags without TensorFlow (say, into a
        `TrainConfig`); called before TensorFlow is imported.
    """

    def main(argv: list[str]) -> None:
        sys.exit(run_parsed(program, program_main, argv, check=check))

    # --helpshort lists the main module's key flags: the program's are mto_tf's.
    for module, module_flags in mto_flags.FLAGS.flags_by_module_dict().items():
        if module.startswith("mto_tf."):
            for flag in module_flags:
                mto_flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(main, flags_parser=functools.partial(parse_flags, program=program))


def run_parsed(program: str, program_main: Callable[..., None], argv: list[str], *,
               check: Callable[[], Any] | None = None) -> int:
    """Runs the program once the flags are parsed; returns the exit status, each error one line on stderr."""
    if len(argv) > 1:
        return _error(program, f"unexpected arguments {argv[1:]}; every setting is a --flag")
    with _own_messages_only(verbose=absl_flags.FLAGS["verbosity"].present > 0):
        try:
            checked = (check(),) if check else ()
            tensorflow_logs.import_tensorflow_quietly()
            program_main(*checked)
        except ConfigError as error:
            return _error(program, str(error))
        except NonFiniteError as error:
            return _error(program, str(error), status=EXIT_NON_FINITE)
        except Interrupted as interrupted:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # The program is ending: no KeyboardInterrupt in clean-up.
            logger.warning("Interrupted: %s; rerun the same command to resume", interrupted)
            return EXIT_INTERRUPTED
        except (InterruptedAtOnce, KeyboardInterrupt) as interrupted:
            # KeyboardInterrupt: Ctrl-C before the loop watched for it (set-up), or in a program that does not.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            message = str(interrupted) if isinstance(interrupted, InterruptedAtOnce) else "stopped by Ctrl-C"
            logger.warning("Interrupted: %s; rerun the same command to resume from the newest checkpoint, if any",
                           message)
            return EXIT_INTERRUPTED
        except Preempted as preempted:
            # Non-zero, so that a launcher restarts the job; it resumes from the checkpoint.
            logger.warning("Preempted: %s; rerun the same command to resume", preempted)
            return EXIT_PREEMPTED
    return EXIT_OK


def parse_flags(argv: list[str], *, program: str) -> list[str]:
    """absl's parser, but a malformed flag exits 2 like every other bad setting
    (absl exits 1), so a launcher knows not to restart it."""
    try:
        return mto_flags.FLAGS(argv)
    except absl_flags.Error as error:
        sys.exit(_error(program, f"{error}; see --helpshort"))


@contextlib.contextmanager
def _own_messages_only(*, verbose: bool):
    """mto_tf's messages as plain lines on stderr; TensorFlow's, TFDS's and absl's below warnings hidden.

    Put back as they were afterwards, for a program run inside another (a test).
    """
    handler = std_logging.StreamHandler(sys.stderr)
    handler.setFormatter(_PlainFormatter())
    saved = logger.level, logger.propagate, logging.get_verbosity()
    logger.addHandler(handler)
    logger.setLevel(std_logging.INFO)
    logger.propagate = False  # Not through absl's handler: no "I1124 22:06:11.71 ... file.py:69]" prefixes.
    if not verbose:
        logging.set_verbosity(logging.WARNING)  # absl's Python logs, which TensorFlow and TFDS use.
        import tensorflow_datasets as tfds
        tfds.disable_progress_bar()  # Its bars while it prepares a dataset.
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        logging.set_verbosity(saved[2])


class _PlainFormatter(std_logging.Formatter):
    def format(self, record: std_logging.LogRecord) -> str:
        message = record.getMessage()
        return message if record.levelno < std_logging.WARNING else f"{record.levelname.lower()}: {message}"


def _error(program: str, message: str, *, status: int = EXIT_BAD_CONFIG) -> int:
    print(f"{program}: error: {message}", file=sys.stderr)
    return status
