"""A trained run on other data, with mto_tf's exact means: `mto-evaluate` (`python -m mto_tf.evaluate`).

    mto-evaluate --model_dir=/tmp/run --eval_data=npz:/data/test.npz --output_json=/tmp/test.json
    mto-evaluate --model_dir=/tmp/run --eval_split=test --weights=best

The same model, data and loss flags as `mto-train` (and its metrics and
`--batch_size`); the weights of a run (`--model_dir` with `--weights=final`,
`best` or `step:N`) or `--init_weights`; the examples from
`--eval_data=npz:PATH` or a split of the run's dataset (`--eval_split`);
with `--datasets`, each task's outputs on its own examples
(`--eval_data='{"TASK": "npz:PATH", ...}'`, or the split of each task's
dataset).
It prints `loss`, each `<output>_loss` and each metric, named as `fit`
names them, each an exact mean over every example (the last partial batch
included, sample weights as in training), under any strategy. It only
reads: it takes no lock on `--model_dir`.
"""

from __future__ import annotations

import gc
import json
import logging as std_logging
import os

import keras
import tensorflow as tf
from absl import flags

from mto_tf.config import TrainConfig
from mto_tf.core import models
from mto_tf.core.strategy import make_strategy
from mto_tf.errors import ConfigError, first_line
from mto_tf.programs import flags as mto_flags  # mto-train's flags: the model, data, loss and metric ones are read.
from mto_tf.run import best, model_dir
from mto_tf.run.evaluation import evaluation_of
from mto_tf.run.model_setup import build_model_setup, resolve_metric_identifiers

# The parts of a run mto-evaluate runs (see PARTS in mto_tf/config.py); the other flags are refused.
READS = ("model", "data", "loss", "metrics", "distribution")


def weights_file(run_dir: str, weights: str) -> str:
    """The file `--weights` names in a run's directory: final, best or `step:N` (a checkpoint's prefix)."""
    if weights == "final":
        path = os.path.join(run_dir, model_dir.WEIGHTS_FILE)
    elif weights == "best":
        path = os.path.join(run_dir, best.BEST_WEIGHTS_FILE)
    elif weights.startswith("step:") and weights[5:].isdigit():
        path = os.path.join(run_dir, model_dir.CHECKPOINT_DIR, f"ckpt-{int(weights[5:])}")
        if not os.path.isfile(path + ".index"):
            raise ConfigError("weights", f"no checkpoint of step {weights[5:]} in {run_dir!r}")
        return path
    else:
        raise ConfigError("weights", f"expected final, best or step:N, got {weights!r}")
    if not os.path.isfile(path):
        raise ConfigError("weights", f"{path!r} not found (--weights={weights})")
    return path


def weights_from_flags(config: TrainConfig) -> str | None:
    """The run's weights that --model_dir and --weights name (`weights_file`); None without --model_dir
    (the model is then built with --init_weights, if given)."""
    given = flags.FLAGS
    if given["model_dir"].present:
        if config.init_weights:
            raise ConfigError("init_weights", "give --model_dir (a run's weights) or --init_weights, not both")
        return weights_file(config.model_dir, given.weights)
    if given["weights"].present:
        raise ConfigError("weights", "chooses a run's weights: give --model_dir too")
    return None


def load_run_weights(model: keras.Model, weights: str) -> None:
    """Loads what `weights_file` found into `model`: a `.weights.h5` file, or the model's part of a checkpoint."""
    if weights.endswith(".weights.h5"):
        models.load_weights(model, weights, flag="weights")
        return
    problem = None
    tensorflow_logger = std_logging.getLogger("tensorflow")
    level = tensorflow_logger.level
    # A read that fails leaves values unrestored: TensorFlow warns of each when it is dropped. One line is enough.
    tensorflow_logger.setLevel(std_logging.ERROR)
    try:
        try:  # The model's part of the checkpoint (not the optimizer's), and every weight of the model in it.
            status = tf.train.Checkpoint(model=model).read(weights)
            status.expect_partial()
            status.assert_existing_objects_matched()
        except (ValueError, AssertionError, tf.errors.OpError) as error:
            problem = first_line(error)
        gc.collect()  # Dropped now, while the warnings are hidden.
    finally:
        tensorflow_logger.setLevel(level)
    if problem:
        raise ConfigError("weights", f"{weights!r} does not fit model {model.name!r}: {problem}")


def evaluate(config: TrainConfig, *, strategy: tf.distribute.Strategy, eval_data: str | dict | None,
             eval_split: str | None, weights: str | None = None) -> dict[str, float | list]:
    """The model's losses and metrics on the examples, each an exact mean over all of them.

    With --datasets, each task's outputs on its own examples (`eval_data`:
    `{task: npz:PATH}`, or a split of each task's dataset), `loss` their
    weighted total, `examples` each task's count.
    """
    if isinstance(eval_data, dict):  # One per task: of tasks --datasets names.
        unknown = sorted(set(eval_data) - set(config.datasets))
        if unknown or not eval_data:
            found = f"unknown task {unknown[0]!r}" if unknown else "no task"
            raise ConfigError("eval_data", f"{found}; --datasets has tasks {list(config.datasets)}")
    setup = build_model_setup(config, strategy)
    if weights:
        load_run_weights(setup.model, weights)
    identifiers = resolve_metric_identifiers(config, setup.signature)
    evaluation = evaluation_of(setup, data=eval_data, split=eval_split, metric_identifiers=identifiers)
    return {**evaluation(), "examples": evaluation.num_examples}


def _eval_data(text: str | None) -> str | dict[str, str] | None:
    """--eval_data: npz:PATH, or (with --datasets) a JSON object {TASK: npz:PATH}."""
    if text is None:
        return None
    data = mto_flags.parse_json_object("eval_data", text, '{"TASK": "npz:PATH", ...}') if text.lstrip().startswith(
        "{") else text
    for task, path in data.items() if isinstance(data, dict) else [(None, data)]:
        if not (isinstance(path, str) and path.startswith(("npz:", "npy:"))):
            raise ConfigError("eval_data", (f"task {task!r}: " if task else "") +
                              f"expected npz:PATH or npy:DIR, got {path!r}")
    return data


def evaluate_main() -> None:
    """`mto-evaluate`: the flags' model, data and losses, a run's weights, the examples named; the values."""
    given = flags.FLAGS
    mto_flags.refuse_flags_not_read_by(
        READS, reason="mto-evaluate does not train: it reads the model, data, loss and metric flags")
    if (given.eval_data is None) == (given.eval_split is None):
        raise ConfigError("eval_data", "give the examples to evaluate: --eval_data=npz:PATH or --eval_split=NAME "
                                       "(a split of --dataset), one of them")
    eval_data = _eval_data(given.eval_data)
    if given.output_json and not os.path.isdir(os.path.dirname(os.path.abspath(given.output_json))):
        raise ConfigError("output_json", f"no directory to write {given.output_json!r} in")
    config = mto_flags.config_from_flags()
    weights = weights_from_flags(config)
    strategy = make_strategy(config)  # First: it may split the CPU into devices.
    values = evaluate(config, strategy=strategy, eval_data=eval_data, eval_split=given.eval_split,
                      weights=weights)
    width = max(len(name) for name in values)
    for name, value in values.items():
        shown = json.dumps(value) if isinstance(value, list | dict) else f"{value:.6g}"
        print(f"{name.ljust(width)}  {shown}")
    if given.output_json:
        with open(given.output_json, "w") as file:
            json.dump(values, file, indent=2)
