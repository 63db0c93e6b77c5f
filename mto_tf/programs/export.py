"""A trained run as a TensorFlow SavedModel for TensorFlow Serving: `mto-export` (`python -m mto_tf.export`).

    mto-export --model_dir=/tmp/run --serve_outputs=main_output --export_dir=/tmp/serving/headline/1
    mto-export --model=my_model:build --init_weights=/tmp/w.weights.h5 --export_dir=/tmp/serving/tickets/1

The model is built from the same model flags as `mto-train` and
`mto-evaluate` (the other flags are refused by name), with the weights
`mto-evaluate` reads: a run's (`--model_dir` with `--weights=final`, `best`
or `step:N`, found by `evaluate.weights_file`) or `--init_weights`.

What is written: a `keras.Model` over the model's inputs and only the
outputs `--serve_outputs` names (default: every output), so the layers and
variables only the other outputs use (an auxiliary head that only training
needs) are not in the graph, exported with a `serving_default` signature:
its inputs the model's input names and dtypes (batch dimension None), its
outputs the chosen outputs' names.

Why Keras's own export (`keras.Model.export(path, format="tf_saved_model")`,
which `keras.export.ExportArchive` writes) and no hand-written `tf.Module`:
measured with Keras 3.15.1, it writes `serve` and `serving_default`
signatures whose outputs are the keys of the model's output dict and whose
inputs are named by their `tf.TensorSpec` names, and it calls the model
without `training`, in inference mode (Dropout off, BatchNormalization's
moving statistics). One thing it gets wrong for us: left to itself it names
a dict input by its `keras.Input`'s name, not by its key (a model built
as `{"text": keras.Input(name="tokens")}` would be served as `tokens`,
with a warning). mto_tf names inputs by key (`ModelSignature`), so the
export is given the input signature, each spec named as mto_tf names it.

The export is written into a new directory beside `--export_dir` and
renamed into place at the end, so a failure leaves nothing half-written, and
a directory that holds anything is refused, never overwritten.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Sequence

import keras
import tensorflow as tf
from absl import flags

from mto_tf.config import TrainConfig
from mto_tf.core import models, optimization
from mto_tf.core.signature import ModelSignature
from mto_tf.errors import ConfigError, first_line
from mto_tf.programs import evaluate
from mto_tf.programs import flags as mto_flags  # mto-train's flags: the model ones are read.

# The part of a run mto-export runs (see PARTS in mto_tf/config.py); the other flags are refused.
READS = ("model",)

logger = logging.getLogger("mto_tf")


def build_model(config: TrainConfig) -> tuple[keras.Model, ModelSignature]:
    """The model as `mto-train` and `mto-evaluate` build it (`run/model_setup.py`, without the data):
    `--precision`, `--model` seeded by `--seed`, `--init_weights`."""
    optimization.set_precision(config)
    model, signature = models.build_model(config)
    config.check_settings_are_read()
    if config.init_weights:
        models.load_weights(model, config.init_weights, flag="init_weights")
    return model, signature


def serving_model(model: keras.Model, outputs: Sequence[str] | None = None) -> keras.Model:
    """A model over `model`'s inputs and only the outputs named (default: every one), keyed by output name.

    It shares `model`'s layers, but holds only the variables the chosen
    outputs are computed from.

    Raises:
      ConfigError: naming --serve_outputs, for an unknown or repeated output.
    """
    signature = ModelSignature.of(model)
    tensors = signature.as_output_dict(model.output if signature.outputs_are_dict else model.outputs)
    outputs = list(outputs or signature.output_names)
    for index, name in enumerate(outputs):
        if name not in tensors:
            raise ConfigError("serve_outputs", f"unknown output {name!r}; model {signature.model_name!r} has "
                                               f"outputs {sorted(tensors)}")
        if name in outputs[:index]:
            raise ConfigError("serve_outputs", f"output {name!r} given twice")
    return keras.Model(model.input, {name: tensors[name] for name in outputs}, name=f"{model.name}_serving")


def export_saved_model(model: keras.Model, export_dir: str, *, outputs: Sequence[str] | None = None) -> keras.Model:
    """Writes `serving_model(model, outputs)` as a SavedModel into `export_dir` (new or empty); returns it.

    Raises:
      ConfigError: naming --export_dir for a directory that holds anything or
        cannot be written, --serve_outputs for an unknown output; nothing is
        written then.
    """
    check_export_dir(export_dir)
    served = serving_model(model, outputs)
    signature = ModelSignature.of(model)

    def spec(name: str) -> tf.TensorSpec:
        return tf.TensorSpec(signature.inputs[name].shape, signature.inputs[name].dtype, name=name)

    # The structure the model takes (a dict, a list or one tensor), each input named as mto_tf names it.
    inputs = ({name: spec(name) for name in model.input} if isinstance(model.input, dict)
              else keras.tree.map_structure(lambda tensor: spec(tensor.name), model.input))
    _write_into_place(export_dir, lambda path: served.export(path, format="tf_saved_model", verbose=False,
                                                             input_signature=[inputs]))
    return served


def check_export_dir(export_dir: str | None) -> None:
    """A new or empty directory whose nearest existing parent can be written; a ConfigError naming --export_dir
    otherwise."""
    if not export_dir:
        raise ConfigError("export_dir", "give the directory to write the SavedModel in (new or empty)")
    if os.path.lexists(export_dir) and not (os.path.isdir(export_dir) and not os.listdir(export_dir)):
        raise ConfigError("export_dir", f"{export_dir!r} already holds something; mto-export never overwrites: "
                                        f"give a new or empty directory (TensorFlow Serving: the next version number)")
    existing = os.path.dirname(os.path.abspath(export_dir))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not (os.path.isdir(existing) and os.access(existing, os.W_OK | os.X_OK)):
        raise ConfigError("export_dir", f"cannot write in {existing!r}")


def _write_into_place(export_dir: str, write: Callable[[str], None]) -> None:
    """`write(path)` into a new directory beside `export_dir`, renamed to it once complete; on a failure, nothing
    is left (the parent directories made for it included)."""
    target = os.path.abspath(export_dir)
    parent = os.path.dirname(target)
    made = []  # The parent directories made here, outermost first.
    ancestor = parent
    while not os.path.exists(ancestor):
        made.insert(0, ancestor)
        ancestor = os.path.dirname(ancestor)
    staging = os.path.join(parent, f".{os.path.basename(target)}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.makedirs(staging)
        write(staging)
        try:
            os.rename(staging, target)  # Atomic; replaces an empty directory, fails on one that holds anything.
        except OSError as error:
            raise ConfigError("export_dir", f"cannot move the export into {export_dir!r} (written there meanwhile?): "
                                            f"{first_line(error)}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for directory in reversed(made):
            with contextlib.suppress(OSError):  # Something else was put there meanwhile.
                os.rmdir(directory)
        raise


def export_main() -> None:
    """`mto-export`: the flags' model, a run's weights or --init_weights; the chosen outputs as a SavedModel."""
    given = flags.FLAGS
    mto_flags.refuse_flags_not_read_by(
        READS, reason="mto-export does not train or read data: it reads the model flags (and the weights)")
    check_export_dir(given.export_dir)
    config = mto_flags.config_from_flags()
    weights = evaluate.weights_from_flags(config)
    if not (weights or config.init_weights):
        raise ConfigError("model_dir", "give the weights to export: --model_dir (a run's, --weights=final|best|"
                                       "step:N) or --init_weights=PATH.weights.h5")
    model, signature = build_model(config)
    if weights:
        evaluate.load_run_weights(model, weights)
    served = export_saved_model(model, given.export_dir, outputs=given.serve_outputs)
    kept = {id(variable) for variable in served.weights}
    left_out = [variable.path for variable in model.weights if id(variable) not in kept]
    inputs = ", ".join(f"{name} {spec.dtype.name} {tuple(spec.shape)}" for name, spec in signature.inputs.items())
    logger.info("Exported %s (%s) into %s: serving_default(%s) -> %s; %d of the model's %d variables%s",
                signature.model_name, weights or config.init_weights, given.export_dir, inputs,
                ", ".join(served.output), len(served.weights), len(model.weights),
                f" (left out: {', '.join(left_out)})" if left_out else "")
