"""A user's own code, named on the command line as `MODULE:FUNCTION`.

`--model`, `--losses` and `--metrics` take it. MODULE is imported as
`import MODULE` would import it from the current directory or `PYTHONPATH`;
every way that can fail becomes a `ConfigError` naming the flag.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

from mto_tf.config import is_module_function
from mto_tf.errors import ConfigError, first_line


def load_function(reference: str, *, flag: str) -> Callable:
    """Imports `MODULE` and returns its callable `FUNCTION`."""
    module_name, _, function_name = reference.partition(":")
    # A console script puts its own directory first on sys.path, not the
    # current one; `python -m` puts the current one. Both must find the
    # user's file in the directory they run from.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # An import runs the user's code: anything can go wrong.
        raise ConfigError(flag, f"cannot import module {module_name!r} of {reference!r} "
                                f"({type(error).__name__}: {first_line(error)}); expected MODULE:FUNCTION "
                                f"with MODULE importable from the current directory or PYTHONPATH") from None
    function = getattr(module, function_name, None)
    if function is None:
        raise ConfigError(flag, f"module {module_name!r} has no {function_name!r} (from {reference!r})")
    if not callable(function):
        raise ConfigError(flag, f"{reference!r} is a {type(function).__name__}, expected a function")
    return function


def resolve_identifier(spec: object, *, output: str, flag: str):
    """A loss or metric as the user gave it, with `MODULE:FUNCTION` imported: what `compile` takes.

    A Keras name or config stays as it is: Keras's own `get_loss` and
    `get_metric` resolve it, and say when they cannot.
    """
    if is_module_function(spec):
        return load_function(spec, flag=flag)
    if not (isinstance(spec, (str, dict)) or callable(spec)):
        raise ConfigError(flag, f"output {output!r}: expected a Keras name, a config object or MODULE:FUNCTION, "
                                f"got {spec!r}")
    return spec
