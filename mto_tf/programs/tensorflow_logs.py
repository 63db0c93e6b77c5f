"""TensorFlow's start-up, quiet: what every program calls before anything imports TensorFlow.

TensorFlow writes C++ start-up lines that its log level does not reach:
they are written before absl::InitializeLog(), which TF_CPP_MIN_LOG_LEVEL
only affects afterwards (abseil/abseil-cpp#1957). Plus its failed CUDA
initialisation on a machine without a GPU driver, logged as an error
although TensorFlow then runs on the CPU, as the replica count says.
`import_tensorflow_quietly` imports TensorFlow with those lines filtered out
of stderr; `TF_CPP_MIN_LOG_LEVEL=0` asks for all of them.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

_START_UP_CHATTER = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\)|I\d{4} |"
                               r"E\d{4} .*failed call to cuInit)")


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow (and initializes CUDA, if any), hiding its start-up chatter unless asked for it.

    Call it first thing in a program, before anything imports TensorFlow:
    TensorFlow reads TF_CPP_MIN_LOG_LEVEL when it is first imported (unset
    or empty here: 2, quiet).
    """
    if "tensorflow" in sys.modules:
        return
    if not os.environ.get("TF_CPP_MIN_LOG_LEVEL"):
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    with _start_up_chatter_hidden(os.environ["TF_CPP_MIN_LOG_LEVEL"] != "0"):
        import tensorflow as tf

        # CUDA initializes when devices are first listed: here, inside the
        # filter. Physical devices only: the CPU can still be split afterwards.
        tf.config.list_physical_devices("GPU")


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

