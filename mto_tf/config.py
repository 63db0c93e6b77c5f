"""`TrainConfig`: everything one training run needs, as one frozen object, and what each setting is.

The library takes a `TrainConfig`; absl flags are only one way to build it
(`mto_tf/programs/flags.py` derives every flag from the fields below). Each
field is declared once, with:

- its help text (the flag's help, and the table in `docs/flags.md`);
- what reads it: which parts of a run (`PARTS`), and, for a setting that
  only some built-in models or datasets read, which (`only_for`): any other
  model or dataset refuses a value other than its default, rather than
  ignoring it;
- whether a resumed run may change it (`resumable`): the others are
  recorded in `config.json`, and a rerun into the same `--model_dir` must
  repeat them;
- how the command line writes it (`kind`), with its choices or lower bound.

One run on one device, from Python, with no absl:

    from mto_tf import TrainConfig, train
    train(TrainConfig(model_dir="/tmp/run", train_steps=100))

From Python, `model` may also be a builder (a function returning a
`keras.Model`) and `dataset` a `tf.data.Dataset` of unbatched
`(inputs, labels)` or `(inputs, labels, sample_weights)` dicts, or such a
tuple of dicts of arrays with one row per example (as `model.fit` takes
`x`, `y` and `sample_weight`; read by index).

A config holds settings and checks what the settings alone decide. Checks
that need the built model (output names, shapes) run where it is built,
before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

from mto_tf import loss_weighting as loss_weighting_lib
from mto_tf import task_mixing as task_mixing_lib
from mto_tf.errors import ConfigError

_DEFAULT_TRAIN_STEPS = 500
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")  # Keras dtype policies.
STRATEGIES = ("default", "one_device", "mirrored", "multi_worker")
CLUSTER_RESOLVERS = ("tf_config", "slurm")
LOOPS = ("custom", "fit")
LOSS_REDUCTIONS = ("each_loss", "mean_over_labelled")
PROGRESS_MODES = ("auto", "bar", "lines", "quiet")  # See mto_tf/run/progress.py.
# The datasets mto_tf generates itself (mto_tf/data/generated.py), by name.
GENERATED_DATASETS = ("synthetic_headlines", "multi_digits", "mmoe_synthetic")
DATASET_FORMS = ("'synthetic_headlines', 'multi_digits', 'mmoe_synthetic', 'npz:PATH', 'npy:DIR' or "
                 "'tfds:NAME[/CONFIG][:VERSION]'")
ARRAY_SOURCES = ("npz:", "npy:")  # Arrays by key: an npz file, or a directory of one npy file per key.
PYTHON_DATA = ("a tf.data.Dataset of unbatched (inputs, labels[, sample_weights]) dicts, or a tuple (inputs, "
               "labels[, sample_weights]) of dicts of arrays, one row per example")

# The parts of a run that read settings. A program that runs only some of
# them (mto-explain: model, data, loss, distribution) refuses the others' flags.
PARTS = ("model", "data", "loss", "metrics", "training", "evaluation", "driver", "distribution")
# How the command line writes a setting; mto_tf/programs/flags.py has a flag type and parser for each.
KINDS = ("text", "integer", "number", "boolean", "choice", "losses", "loss_weights", "metrics", "class_weights",
         "feature_map", "missing_labels", "extra_losses", "keras_object", "keras_object_or_number", "name_or_json",
         "datasets", "integer_per_task", "text_per_task")
# The settings that may differ per task with --datasets: each then a JSON object {TASK: value} (feature_map:
# {TASK: {NAME: FEATURE}}); a task it leaves out takes the default (batch_size: every task needs one).
PER_TASK = ("batch_size", "shuffle_buffer", "feature_map", "validation_data")
# Settings only some sources read -> the sources that read them. With --datasets a shared value serves the
# tasks whose source reads it (and is refused when none does); the others take the default.
# (synthetic_headlines' features are the headline model's names: nothing to map.)
SOURCE_SETTINGS = {"feature_map": ("tfds:", "multi_digits", "mmoe_synthetic"), "train_split": ("tfds:",),
                   "validation_split": ("tfds:", *GENERATED_DATASETS)}

# A loss: a Keras loss name, a Keras loss config (a dict), `MODULE:FUNCTION`,
# or from Python a function or `keras.losses.Loss`. A metric likewise.
LossSpec = Any
MetricSpec = Any


@dataclasses.dataclass(frozen=True)
class Setting:
    """What one `TrainConfig` field is: its help, what reads it, whether a resume may change it, its flag."""

    help: str
    kind: str  # One of KINDS.
    reads: tuple[str, ...]  # Parts of a run, of PARTS.
    only_for: tuple[str, ...] = ()  # The built-in models and datasets that alone read it; () for any.
    resumable: bool = False
    choices: tuple[str, ...] = ()  # For kind "choice".
    positive: bool = False  # An integer that must be > 0 (when set).

    def __post_init__(self):
        assert self.kind in KINDS and set(self.reads) <= set(PARTS) and self.reads, self
        assert bool(self.choices) == (self.kind == "choice"), self


def _setting(default, help: str, *, kind: str, reads: tuple[str, ...], **more) -> Any:
    metadata = {"setting": Setting(help=help, kind=kind, reads=reads, **more)}
    if isinstance(default, dict):
        return dataclasses.field(default_factory=dict, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def text(default, help: str, **more):
    return _setting(default, help, kind="text", **more)


def integer(default, help: str, **more):
    return _setting(default, help, kind="integer", **more)


def number(default, help: str, **more):
    return _setting(default, help, kind="number", **more)


def boolean(default, help: str, **more):
    return _setting(default, help, kind="boolean", **more)


def choice(default, choices: tuple[str, ...], help: str, **more):
    return _setting(default, help, kind="choice", choices=choices, **more)


def parsed(kind: str, default, help: str, **more):
    """A setting the command line writes as text that a parser of its kind turns into its value."""
    return _setting(default, help, kind=kind, **more)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. Field names are the flag names of `mto-train`."""

    # Model: a built-in name, `MODULE:FUNCTION`, or (from Python) a builder.
    # Sizes of the built-in models are settings so that tests can make them small.
    model: str | Callable[[], Any] = text(
        "headline", "A built-in model (headline, shapes3d_cnn, inception_aux, mmoe, shared_bottom, multi_lenet) or "
        "MODULE:FUNCTION, a function of yours "
        "(importable from the current directory or PYTHONPATH) returning an uncompiled multi-output keras.Model.",
        reads=("model",))
    vocab_size: int = integer(10000, "headline, synthetic_headlines: token ids are in [0, vocab_size).",
                              reads=("model", "data"), only_for=("headline", "synthetic_headlines"), positive=True)
    sequence_length: int = integer(100, "headline, synthetic_headlines: tokens per headline (main_input).",
                                   reads=("model", "data"), only_for=("headline", "synthetic_headlines"), positive=True)
    embedding_dim: int = integer(512, "headline: embedding width.", reads=("model",), only_for=("headline",),
                                 positive=True)
    lstm_units: int = integer(32, "headline: LSTM units (the shared trunk's width).", reads=("model",),
                              only_for=("headline",), positive=True)
    dense_units: int = integer(64, "headline: width of the main head's three Dense layers; shapes3d_cnn, "
                                   "multi_lenet: of the shared Dense.", reads=("model",),
                               only_for=("headline", "shapes3d_cnn", "multi_lenet"),
                               positive=True)
    aux_input_dim: int = integer(5, "headline, synthetic_headlines: floats in aux_input.",
                                 reads=("model", "data"), only_for=("headline", "synthetic_headlines"), positive=True)
    conv_filters: int = integer(32, "shapes3d_cnn, multi_lenet: filters of the first convolution (the second has "
                                    "twice as many).", reads=("model",), only_for=("shapes3d_cnn", "multi_lenet"),
                                positive=True)
    dropout_rate: float = number(0.25, "shapes3d_cnn: Dropout rate before the shared Dense.", reads=("model",),
                                 only_for=("shapes3d_cnn",))
    sync_batchnorm: bool = boolean(False, "shapes3d_cnn: BatchNormalization(synchronized=True): batch statistics "
                                          "over all replicas.", reads=("model",), only_for=("shapes3d_cnn",))
    l2: float = number(0.0, "Built-in models: L2 factor on every kernel; 0 for none.", reads=("model",),
                       only_for=("headline", "shapes3d_cnn", "inception_aux", "mmoe", "shared_bottom", "multi_lenet"))
    inception_variant: str = choice(
        "v1", ("v1", "v3"), "inception_aux: v1 (GoogLeNet: auxiliary heads aux_1 and aux_2 on modules 4a and 4d, "
        "loss weight 0.3 each) or v3 (Inception-v3: one head aux_1 at the end of stage 4, batch normalization in "
        "it and after every convolution, weight 0.4).", reads=("model",), only_for=("inception_aux",))
    inception_filters: int = integer(16, "inception_aux: the width unit of every convolution (a module's 1x1 "
                                         "branch has 2 x this many filters).", reads=("model",),
                                     only_for=("inception_aux",), positive=True)
    image_size: int = integer(12, "inception_aux, multi_lenet: the side of their square input `image` "
                                  "(multi_digits: 12).", reads=("model",), only_for=("inception_aux", "multi_lenet"),
                              positive=True)
    image_channels: int = integer(1, "inception_aux, multi_lenet: channels of their input `image`.",
                                  reads=("model",), only_for=("inception_aux", "multi_lenet"), positive=True)
    num_classes: int = integer(10, "inception_aux: classes of the label every head predicts.", reads=("model",),
                               only_for=("inception_aux",), positive=True)
    aux_head_units: int = integer(64, "inception_aux: width of each auxiliary head's Dense layer (GoogLeNet: "
                                      "1024).", reads=("model",), only_for=("inception_aux",), positive=True)
    features_dim: int = integer(100, "mmoe, shared_bottom: numbers in their input `features`.", reads=("model",),
                                only_for=("mmoe", "shared_bottom"), positive=True)
    task_outputs: str = text("task_a,task_b", "mmoe, shared_bottom, multi_lenet: the names of their outputs, one "
                                              "tower each.", reads=("model",),
                             only_for=("mmoe", "shared_bottom", "multi_lenet"))
    task_classes: int = integer(0, "mmoe, shared_bottom, multi_lenet: 0: each output is one number (regression, "
                                   "mean squared error); K: a softmax over K classes (multi_digits: 10).",
                                reads=("model",),
                                only_for=("mmoe", "shared_bottom", "multi_lenet"))
    num_experts: int = integer(8, "mmoe: experts, each mixed by one softmax gate per task.", reads=("model",),
                               only_for=("mmoe",), positive=True)
    expert_units: int = integer(16, "mmoe: width of each expert; shared_bottom: of the shared bottom layer.",
                                reads=("model",), only_for=("mmoe", "shared_bottom"), positive=True)
    tower_units: int = integer(8, "mmoe, shared_bottom, multi_lenet: width of each task's tower.",
                               reads=("model",), only_for=("mmoe", "shared_bottom", "multi_lenet"), positive=True)

    # Data: a source name (or, from Python, a tf.data.Dataset or a tuple of dicts of arrays: PYTHON_DATA).
    dataset: Any = text("synthetic_headlines", "Generated locally on first use: 'synthetic_headlines' (for "
                        "headline), 'multi_digits' (two of scikit-learn's handwritten digits per 12x12 image, labels "
                        "left and right), 'mmoe_synthetic' (the MMoE paper's two regression tasks, "
                        "--task_correlation); or 'npz:PATH', 'npy:DIR' (one memory-mapped .npy file per key), or "
                        "'tfds:NAME[/CONFIG][:VERSION]' (a TFDS dataset prepared in --data_dir). See docs/data.md.",
                        reads=("data",))
    # Task (an output, or several joined by ",") -> its source, as `dataset` takes it (from Python also a dataset).
    datasets: Mapping[str, Any] = parsed(
        "datasets", {}, "Instead of --dataset, one dataset per task: a JSON object {TASK: SOURCE, ...}, a task being "
        "an output name or several joined by ',' (every output in exactly one task), a source as --dataset takes "
        "it. Each source holds the model's inputs and its task's labels. --batch_size, --shuffle_buffer, "
        "--feature_map and --validation_data may then be JSON objects {TASK: value}. See docs/data.md.",
        reads=("data",))
    task_mixing: str | Mapping[str, Any] = parsed(
        "name_or_json", "joint", "With --datasets: 'joint' (each step a batch of every task, one update of the "
        "weighted sum of all losses) or a sampled turn, each step training one task drawn from --seed and the step: "
        "'uniform', 'proportional' (probability ~ examples^alpha; JSON {\"name\": \"proportional\", \"alpha\": "
        "0.5}, default 1), 'annealed' (alpha = 1 - 0.8 (e - 1) / (E - 1) at epoch e of E, as Model Garden's "
        "AnnealingTaskSampler; JSON parameters steps_per_epoch (default: a pass over the largest task), "
        "total_steps (default: --train_steps)).", reads=("training",))
    epochs_of: str | None = text(None, "With --datasets and --epochs: the task whose passes --epochs counts (the "
                                       "others repeat). Unset: the task with the most examples.", reads=("driver",))
    data_dir: str | None = text(None, "TFDS data directory (default: TFDS's own).", reads=("data",), resumable=True)
    input_service: str | None = text(
        None, "For training sources read in order (TFRecord TFDS datasets, a tf.data.Dataset): a tf.data service "
              "reads and parses each global batch once and hands each worker only its replicas' rows. 'local': "
              "start one in this process (launch/local.py starts one for all its workers); HOST:PORT: one already "
              "running (python -m mto_tf.input_service). Unset: each worker reads every record and keeps its rows.",
        reads=("training",), resumable=True)
    train_split: str = text("train", "tfds: the split to train on.", reads=("data",))
    # Model input, output or `sample_weight/<output>` -> dataset feature.
    feature_map: Mapping[str, str] = parsed(
        "feature_map", {}, "tfds:, multi_digits, mmoe_synthetic: NAME=FEATURE,... maps a model input, output or "
        "sample_weight/<output> to a dataset feature (nested: parent/child; one feature may feed several); "
        "unmapped inputs and outputs read the feature of their name, and features nothing reads are not read. "
        "With --datasets, also JSON {TASK: {NAME: FEATURE}}.", reads=("data",))
    # Validation: `npz:PATH` (from Python also a tf.data.Dataset like `dataset`),
    # or a split of the training dataset (a generated one, tfds:); None:
    # its `validation` split if it has one; "" for no validation.
    validation_data: Any = parsed("text_per_task", None, "npz:PATH or npy:DIR of validation examples (keys as "
                                  "for --dataset=npz:); with --datasets, JSON {TASK: npz:PATH}. Unset: the dataset's "
                                  "validation split, if it has one.", reads=("evaluation",))
    validation_split: str | None = text(
        None, "tfds:, synthetic_headlines, multi_digits, mmoe_synthetic: the split to validate on. Unset: "
              "'validation' if the dataset has it; empty: no validation.", reads=("evaluation",))
    eval_every: int = integer(0, "Steps between evaluations on the validation data; 0: only at the end (there is "
                                 "always one at the end when there is validation data).", reads=("evaluation",),
                              resumable=True)
    eval_steps: int | None = integer(None, "Global batches per evaluation. Unset: the whole validation data, its "
                                           "last partial batch included.", reads=("evaluation",), resumable=True,
                                     positive=True)
    synthetic_train_examples: int = integer(10000, "Size of the train split of a generated dataset "
                                                   "(synthetic_headlines, multi_digits, mmoe_synthetic).",
                                            reads=("data",), only_for=GENERATED_DATASETS, positive=True)
    synthetic_validation_examples: int = integer(1000, "Size of the validation split of a generated dataset.",
                                                 reads=("data",), only_for=GENERATED_DATASETS, positive=True)
    synthetic_test_examples: int = integer(1000, "Size of the test split of multi_digits and mmoe_synthetic.",
                                           reads=("data",), only_for=("multi_digits", "mmoe_synthetic"),
                                           positive=True)
    task_correlation: float = number(0.5, "mmoe_synthetic: p in [-1, 1], the cosine of the two tasks' weight "
                                          "vectors (Ma et al. 2018's 'task correlation'): the Pearson correlation "
                                          "of the tasks' linear parts; the sines make the labels' lower for "
                                          "0 < |p| < 1.", reads=("data",), only_for=("mmoe_synthetic",))
    shuffle_buffer: int | Mapping[str, int] = parsed(
        "integer_per_task", 0, "Shuffle buffer in examples; 0 keeps file order. With --datasets, also JSON "
        "{TASK: N}.", reads=("data",))

    # Losses: one per output, one weight per output, metrics per output.
    # None: the built-in model's own (for `MODULE:FUNCTION` models: losses
    # must be given, weights default to 1.0, no metrics).
    losses: Mapping[str, LossSpec] | None = parsed(
        "losses", None, "OUTPUT=LOSS,... (a Keras loss name or MODULE:FUNCTION), or a JSON object mapping each "
        "output to a Keras loss name, a Keras loss config ({\"class_name\": ..., \"config\": ...}), "
        "MODULE:FUNCTION, or null (the output is predicted and its metrics computed, but not trained). Unset: "
        "the built-in model's own.", reads=("loss",))
    # A weight is a number, or a Keras schedule (a config, or from Python a LearningRateSchedule) of the step.
    loss_weights: Mapping[str, Any] | None = parsed(
        "loss_weights", None, "OUTPUT=WEIGHT,... (or a JSON object) for every output and --extra_losses term: the "
        "total loss is sum(weight * loss). In JSON a weight may be a Keras schedule config ({\"class_name\": "
        "\"PolynomialDecay\", \"config\": {...}}), evaluated at each optimizer step as a learning-rate schedule "
        "is. Unset: the built-in model's own, else 1.0 each.", reads=("loss",))
    metrics: Mapping[str, tuple[MetricSpec, ...]] | None = parsed(
        "metrics", None, "OUTPUT=METRIC,... (repeat an output for several), or a JSON object mapping each output "
        "to a list of Keras metric names, configs or MODULE:FUNCTION; empty for none. Unset: the built-in "
        "model's own.", reads=("metrics",))
    # Output -> {class id: weight}; multiplies the sample weights of training examples.
    class_weights: Mapping[str, Mapping[int, float]] = parsed(
        "class_weights", {}, "JSON {\"OUTPUT\": {\"CLASS\": WEIGHT, ...}, ...}: each training example's loss for "
        "that output is multiplied by the weight of its class (binary labels: 0 and 1; one-hot: the argmax), "
        "and by its sample weight. Unnamed outputs and classes: 1.0.", reads=("loss",))
    # Output -> the label value that means "no label" (a float; NaN for nan).
    missing_labels: Mapping[str, float] = parsed(
        "missing_labels", {}, "OUTPUT=VALUE,...: an example whose label for OUTPUT is VALUE (a number, or nan for "
        "float labels; every element, for a label of several) has no label for it: it adds nothing to that "
        "output's loss, metrics or validation values, as a sample weight of 0 (sample_weight/OUTPUT = 0 means the "
        "same). The other outputs use the example as usual.", reads=("data",))
    loss_reduction: str = choice(
        "each_loss", LOSS_REDUCTIONS, "How each output's loss is reduced over a global batch: 'each_loss' (the "
        "reduction its Keras loss carries: sum_over_batch_size unless its config says sum or "
        "mean_with_sample_weight), or 'mean_over_labelled' (mean_with_sample_weight for every output: the sum of "
        "sample weight times loss divided by the sum of the sample weights, over the GLOBAL batch; with 0/1 "
        "weights, the mean over the labelled examples).", reads=("loss",))
    # Term name -> `MODULE:FUNCTION` (from Python, also the function).
    extra_losses: Mapping[str, Any] = parsed(
        "extra_losses", {}, "NAME=MODULE:FUNCTION,...: more terms of the total loss, each a function of the "
        "(labels, predictions, sample_weights) dicts returning one value per example (a consistency term between "
        "two outputs, a loss between two towers): reduced as sum_over_batch_size, weighted by "
        "--loss_weights=NAME=WEIGHT (default 1.0), logged as NAME_loss.", reads=("loss",))
    # A method of mto_tf/loss_weighting.py: a name, or {"name": ..., <hyper-parameter>: value}.
    loss_weighting: str | Mapping[str, Any] = parsed(
        "name_or_json", "fixed", "How the outputs' weighted losses train the model: 'fixed' (sum(weight * loss), "
        "the step of model.fit), or an adaptive method, by name or as JSON {\"name\": NAME, HYPER_PARAMETER: "
        "VALUE, ...}: uncertainty, dwa, rlw, famo (from the losses), gradnorm, pcgrad, mgda, cagrad, imtl, "
        "aligned_mtl, upgrad (from the outputs' gradients of the weights several outputs share). See "
        "docs/loss_weighting.md.", reads=("loss",))
    weighting_gradients: str = text(
        "shared_weights", "What a gradient method's Gramian is of: 'shared_weights' (each output's gradient of "
        "the weights several outputs reach) or 'representation:LAYER' (MGDA-UB: of LAYER's output, per example; "
        "then one backward pass of the combined gradient through the layers before it).", reads=("loss",))

    # Optimization, as Keras configures it (see mto_tf/core/optimization.py).
    optimizer: str | Mapping[str, Any] = parsed(
        "keras_object", "rmsprop", "A Keras optimizer name (sgd, adam, adamw, rmsprop, ...) or JSON config "
        "({\"class_name\": \"AdamW\", \"config\": {\"weight_decay\": 0.004}}).", reads=("training",))
    learning_rate: float | Mapping[str, Any] | None = parsed(
        "keras_object_or_number", None, "A number, or a Keras schedule as JSON ({\"class_name\": \"CosineDecay\", "
        "\"config\": {...}}; it counts batches). Unset: the optimizer's own.", reads=("training",))
    # Keras's clipping (at most one), applied to the gradient summed over every replica.
    clipnorm: float | None = number(None, "Clip each weight's gradient to this norm (Keras's clipnorm), after the "
                                          "gradients are summed over replicas.", reads=("training",))
    global_clipnorm: float | None = number(None, "Clip all gradients together to this global norm (Keras's "
                                                 "global_clipnorm), after they are summed over replicas.",
                                           reads=("training",))
    clipvalue: float | None = number(None, "Clip each gradient value to [-clipvalue, clipvalue] (Keras's "
                                           "clipvalue), after the gradients are summed over replicas.",
                                     reads=("training",))
    grad_accum_steps: int = integer(1, "Update once every N batches with the mean of their gradients (Keras's "
                                       "gradient_accumulation_steps); --train_steps counts batches.",
                                    reads=("training",), positive=True)
    precision: str = choice("float32", PRECISIONS, "Keras dtype policy; mixed_float16 adds dynamic loss scaling "
                                                   "(LossScaleOptimizer).", reads=("model", "training"))
    xla_update: bool = boolean(False, "Compile the optimizer's update alone with XLA (custom loop, one replica): "
                                      "the same update, faster for dense gradients; no faster for an embedding's "
                                      "sparse one.", reads=("training",), resumable=True)
    batch_size: int | Mapping[str, int] = parsed(
        "integer_per_task", 64, "GLOBAL batch size; each replica gets batch_size / replicas examples. With "
        "--datasets, also JSON {TASK: N} (each task's global batch size).", reads=("data",), positive=True)
    train_steps: int | None = integer(_DEFAULT_TRAIN_STEPS, "Total steps; a resumed run continues up to it.",
                                      reads=("driver",), resumable=True,
                                      positive=True)  # Replaced by `epochs` when that is set.
    epochs: int | None = integer(None, "Instead of --train_steps: passes over the training data, each ending with "
                                       "its partial last batch (as model.fit's epochs).", reads=("driver",),
                                positive=True)
    steps_per_loop: int = integer(10, "Steps inside one tf.function call.", reads=("driver",), resumable=True,
                                  positive=True)
    jit_compile: bool = boolean(False, "Compile the train step with XLA (custom loop; compile(jit_compile=...) "
                                       "with --loop=fit).", reads=("training",), resumable=True)
    seed: int = integer(0, "Seeds initial weights and shuffling.", reads=("model", "data"))

    # Distribution.
    strategy: str = choice("default", STRATEGIES, "tf.distribute strategy.", reads=("distribution",))
    num_cpu_devices: int = integer(1, "Split the CPU into N logical devices: N replicas per process for mirrored "
                                      "or multi_worker without GPUs.", reads=("distribution",), positive=True)
    cluster_resolver: str = choice("tf_config", CLUSTER_RESOLVERS, "multi_worker: read the cluster from "
                                   "TF_CONFIG, or from SLURM's environment inside srun.", reads=("distribution",))

    # Outputs.
    model_dir: str = text("/tmp/mto_tf", "Metrics, checkpoints and final model; a rerun resumes.",
                          reads=("driver",), resumable=True)
    log_every: int = integer(50, "Steps per line of metrics.jsonl.", reads=("driver",), resumable=True,
                             positive=True)
    checkpoint_every: int = integer(250, "Steps between checkpoints.", reads=("driver",), resumable=True,
                                    positive=True)
    init_weights: str | None = text(None, "PATH.weights.h5 to start from.", reads=("model",), resumable=True)
    loop: str = choice("custom", LOOPS, "'custom' (the explicit GradientTape loop) or 'fit' (model.fit, to "
                                        "compare).", reads=("driver",), resumable=True)
    progress: str = choice("auto", PROGRESS_MODES, "What the run shows on stdout: 'bar' (a line updated in place), "
                           "'lines' (one per logging window), 'quiet'; 'auto': bar on a terminal, else lines. Only "
                           "the chief worker shows it.", reads=("driver",), resumable=True)
    log_gradient_shares_every: int = integer(
        0, "Every N steps, measure each output's share of each layer's gradient on a training batch (as "
           "mto-explain does) and log it as grad_share/<layer>/<output> and grad_norm/<layer>/<output>; 0: "
           "never. Costs a backward pass per output.", reads=("driver",), resumable=True)
    save_best: str | None = text(None, "A validation value (val_loss, val_<output>_loss, val_<output>_<metric>): "
                                       "write best.weights.h5 whenever it improves (as Keras's ModelCheckpoint "
                                       "decides: lower for losses; for a metric, the direction it declares).",
                                 reads=("evaluation",))
    early_stopping_patience: int | None = integer(
        None, "Stop after this many evaluations without improvement of --save_best's value.",
        reads=("evaluation",), resumable=True, positive=True)
    # From Python, `train(config, callbacks=[...])` takes the callbacks themselves (after these).
    callbacks: str | None = text(
        None, "MODULE:FUNCTION, a function of yours returning a list of keras.callbacks.Callback (EarlyStopping, "
              "ReduceLROnPlateau, CSVLogger, ...): called as model.fit calls them; an epoch is a pass with --epochs, "
              "else a --log_every window.", reads=("driver",), resumable=True)

    def __post_init__(self):
        if self.epochs is not None:
            if self.train_steps not in (None, _DEFAULT_TRAIN_STEPS):
                raise ConfigError("epochs", f"counts the run in passes over the data; leave --train_steps "
                                            f"unset, got --train_steps={self.train_steps}")
            object.__setattr__(self, "train_steps", None)  # Known once the data is counted.
        elif self.train_steps is None:
            raise ConfigError("train_steps", "expected an integer > 0, got None")
        for name, setting in SETTINGS.items():
            for task, value in self._values_of(name):
                where = f"task {task!r}: " if task else ""
                if setting.positive and value is not None and not (
                        isinstance(value, int) and not isinstance(value, bool) and value > 0):
                    raise ConfigError(name, f"{where}expected an integer > 0, got {value!r}")
                if setting.choices and value not in setting.choices:
                    raise ConfigError(name, f"expected one of {', '.join(setting.choices)}; got {value!r}")
        if self.vocab_size < 3:
            raise ConfigError("vocab_size", f"expected >= 3 (token 0 pads, and each synthetic sentiment owns a token), "
                                            f"got {self.vocab_size}")
        if self.l2 < 0:
            raise ConfigError("l2", f"expected a factor >= 0, got {self.l2}")
        if not 0 <= self.dropout_rate < 1:
            raise ConfigError("dropout_rate", f"expected a rate in [0, 1), got {self.dropout_rate}")
        for task, buffer in self._values_of("shuffle_buffer"):
            if not (isinstance(buffer, int) and not isinstance(buffer, bool) and buffer >= 0):
                where = f"task {task!r}: " if task else ""
                raise ConfigError("shuffle_buffer", f"{where}expected an integer >= 0 (0 keeps file order), got "
                                                    f"{buffer!r}")
        self._check_optimization()
        if self.num_cpu_devices > 1 and self.strategy not in ("mirrored", "multi_worker"):
            raise ConfigError(
                "num_cpu_devices",
                f"splitting the CPU into {self.num_cpu_devices} devices only serves "
                f"--strategy=mirrored or multi_worker, got --strategy={self.strategy}")
        if self.jit_compile and self.strategy in ("mirrored", "multi_worker"):
            # XLA compiles a step for one device; a step that spans replicas
            # reads variables on other devices (Keras's "auto" turns XLA off
            # under tf.distribute for the same reason).
            raise ConfigError("jit_compile", f"XLA compiles a step for one device; not with "
                                             f"--strategy={self.strategy}")
        self._check_model()
        if self.datasets:  # Each task's source and settings are checked as its own run's (`task_config`).
            self._check_tasks()
        else:
            self._check_no_tasks()
            self._check_dataset()
        self._check_validation()
        self._check_input_service()
        _check_class_weights(self.class_weights)
        if self.init_weights is not None and not os.path.isfile(self.init_weights):
            raise ConfigError("init_weights", f"file not found: {self.init_weights!r}")
        if self.init_weights is not None and not self.init_weights.endswith(".weights.h5"):
            raise ConfigError("init_weights", f"expected a Keras weights file PATH.weights.h5, got {self.init_weights!r}")
        self._check_loss_weighting()
        if self.callbacks is not None and not is_module_function(self.callbacks):
            raise ConfigError("callbacks", f"expected MODULE:FUNCTION (a function returning a list of "
                                           f"keras.callbacks.Callback), got {self.callbacks!r}")
        if self.loop == "fit":
            _check_what_fit_cannot_do(self)
        for output, weight in (self.loss_weights or {}).items():
            if not (_is_scheduled(weight) or isinstance(weight, (int, float))
                    and not isinstance(weight, bool) and math.isfinite(weight) and weight >= 0):
                raise ConfigError("loss_weights", f"weight of {output!r} must be a finite number >= 0 or a Keras "
                                                  f"schedule config, got {weight!r}")
        self._check_labels_and_terms()

    def _check_labels_and_terms(self):
        for output, value in self.missing_labels.items():
            if not (isinstance(value, (int, float)) and not isinstance(value, bool)):
                raise ConfigError("missing_labels", f"output {output!r}: expected a number or nan, got {value!r}")
        for name, function in self.extra_losses.items():
            if not (isinstance(name, str) and name.isidentifier()):
                raise ConfigError("extra_losses", f"expected NAME=MODULE:FUNCTION with NAME a name (it is logged as "
                                                  f"NAME_loss), got {name!r}")
            if not (is_module_function(function) or callable(function)):
                raise ConfigError("extra_losses", f"{name}: expected MODULE:FUNCTION, a function of (labels, "
                                                  f"predictions, sample_weights), got {function!r}")

    def _check_optimization(self):
        if not (isinstance(self.optimizer, str) and self.optimizer or _is_keras_config(self.optimizer)):
            raise ConfigError("optimizer", f"expected a Keras optimizer name or a config "
                                           f"{{\"class_name\": ..., \"config\": ...}}, got {self.optimizer!r}")
        rate = self.learning_rate
        if not (rate is None or _is_keras_config(rate) or _is_number(rate) and rate > 0):
            raise ConfigError("learning_rate", f"expected a number > 0 or a Keras schedule config "
                                               f"{{\"class_name\": ..., \"config\": ...}}, got {rate!r}")
        clipping = [name for name in ("clipnorm", "global_clipnorm", "clipvalue") if getattr(self, name) is not None]
        for name in clipping:
            if not (_is_number(getattr(self, name)) and getattr(self, name) > 0):
                raise ConfigError(name, f"expected a number > 0, got {getattr(self, name)!r}")
        if len(clipping) > 1:  # As Keras's optimizers decide.
            raise ConfigError(clipping[1], f"give one of --clipnorm, --global_clipnorm, --clipvalue, "
                                           f"not also --{clipping[0]}")
        if self.precision == "mixed_float16" and self.grad_accum_steps > 1:
            # Keras's loss scaling checks each batch's gradients; accumulated
            # ones would be checked only at the update.
            raise ConfigError("grad_accum_steps", "not with --precision=mixed_float16 (loss scaling and "
                                                  "accumulation together are not supported)")
        if not (isinstance(self.log_gradient_shares_every, int) and self.log_gradient_shares_every >= 0):
            raise ConfigError("log_gradient_shares_every", f"expected steps >= 0 (0: never), "
                                                           f"got {self.log_gradient_shares_every!r}")
        if self.xla_update and self.loop != "fit":
            reason = ("--jit_compile (it compiles the whole step)" if self.jit_compile else
                      f"--strategy={self.strategy} (TensorFlow cannot synchronize replicas inside an XLA function)"
                      if self.strategy in ("mirrored", "multi_worker") else None)
            if reason:
                raise ConfigError("xla_update", f"not with {reason}")

    def _values_of(self, name: str) -> list[tuple[str | None, Any]]:
        """`(None, value)`, or each task's `(task, value)` of a per-task setting."""
        value = getattr(self, name)
        return list(value.items()) if self.is_per_task(name) else [(None, value)]

    def is_per_task(self, name: str) -> bool:
        """Whether setting `name` (of PER_TASK) is given per task, as {TASK: value}."""
        value = getattr(self, name)
        if name not in PER_TASK or not isinstance(value, Mapping):
            return False
        # A feature map is a mapping itself: per task, its values are mappings.
        return name != "feature_map" or bool(value) and all(isinstance(item, Mapping) for item in value.values())

    def for_task(self, name: str, task: str):
        """Setting `name`'s value for `task`: its own (per task), else the one value every task shares."""
        if not self.is_per_task(name):
            return getattr(self, name)
        return getattr(self, name).get(task, default_of(name))

    @property
    def mixing(self) -> task_mixing_lib.TaskMixing:
        """`task_mixing` read: the mixing and its parameters."""
        return task_mixing_lib.parse(self.task_mixing)

    def task_config(self, task: str) -> TrainConfig:
        """The run's settings as task `task`'s data sees them: its source as --dataset, its value of each
        per-task setting, the class weights and missing labels of its outputs; checked as a run's are."""
        outputs = task_mixing_lib.task_outputs(task)
        source = self.datasets[task]
        values = {name: self.for_task(name, task) for name in PER_TASK}
        for name in SOURCE_SETTINGS:  # A shared value its source does not read: the default (a task's own is checked).
            if not self.is_per_task(name) and not _reads(source, name):
                values[name] = default_of(name)
        try:
            return dataclasses.replace(
                self, datasets={}, task_mixing=default_of("task_mixing"), epochs_of=None, dataset=source,
                class_weights={name: value for name, value in self.class_weights.items() if name in outputs},
                missing_labels={name: value for name, value in self.missing_labels.items() if name in outputs},
                **values)
        except ConfigError as error:
            raise error.about_task(task) from None

    def _check_no_tasks(self):
        """Without --datasets: no value per task, no mixing of tasks."""
        per_task = [name for name in PER_TASK if self.is_per_task(name)]
        if per_task:
            raise ConfigError(per_task[0], "a value per task ({TASK: value}) needs --datasets")
        for name in ("task_mixing", "epochs_of"):
            if getattr(self, name) != default_of(name):
                raise ConfigError(name, "chooses among the tasks of --datasets; give --datasets too")

    def _check_tasks(self):
        """--datasets: its tasks, each task's settings, and what one dataset per task cannot do (yet)."""
        if not isinstance(self.datasets, Mapping):
            raise ConfigError("datasets", f"expected {{TASK: SOURCE, ...}}, got {self.datasets!r}")
        task_mixing_lib.check_task_names(self.datasets)
        tasks = list(self.datasets)
        if self.dataset != default_of("dataset"):
            raise ConfigError("dataset", "give --dataset or --datasets (one source per task), not both")
        for name in PER_TASK:
            if self.is_per_task(name):
                unknown = sorted(set(getattr(self, name)) - set(tasks))
                if unknown:
                    raise ConfigError(name, f"unknown task {unknown[0]!r}; --datasets has tasks {tasks}")
        if self.is_per_task("feature_map"):  # A task's map names its own outputs' labels, not another task's.
            for task, mapping in self.feature_map.items():
                others = {output for other in tasks if other != task for output in task_mixing_lib.task_outputs(other)}
                foreign = sorted(key for key in mapping if key.removeprefix("sample_weight/") in others)
                if foreign:
                    raise ConfigError("feature_map", f"task {task!r}: {foreign[0]!r} is another task's output; map "
                                                     f"it in that task's entry")
        # A shared setting only some sources read: at least one task's source reads it.
        for name, readers in SOURCE_SETTINGS.items():
            if getattr(self, name) not in (None, default_of(name)) and not self.is_per_task(name) and not any(
                    _reads(source, name) for source in self.datasets.values()):
                raise ConfigError(name, f"serves a {' or '.join(readers).replace(':', ':NAME')} source; no task of "
                                        f"--datasets has one")
        if self.is_per_task("batch_size"):
            missing = [task for task in tasks if task not in self.batch_size]
            if missing:
                raise ConfigError("batch_size", f"no batch size for task {missing[0]!r}; expected one for each of "
                                                f"{tasks}")
        if self.epochs_of is not None:
            if self.epochs_of not in tasks:
                raise ConfigError("epochs_of", f"unknown task {self.epochs_of!r}; --datasets has tasks {tasks}")
            if self.epochs is None:
                raise ConfigError("epochs_of", "names the task whose passes --epochs counts; give --epochs too")
        mixing = self.mixing
        if self.loop == "fit":
            raise ConfigError("datasets", "model.fit takes one dataset; one dataset per task is the custom loop's: "
                                          "use --loop=custom")
        if self.extra_losses:
            raise ConfigError("extra_losses", "a term of several outputs reads one batch's labels; with --datasets "
                                              "each task's batch holds its own outputs' labels only")
        if self.representation_layer:
            raise ConfigError("weighting_gradients", "representation:LAYER takes per-example gradients of one "
                                                     "batch's representation; with --datasets, use shared_weights")
        if mixing.sampled:
            if self.epochs is not None:
                raise ConfigError("epochs", f"with --task_mixing={mixing.name}, how many steps a pass over a task "
                                            f"takes depends on the draws; give --train_steps")
            if self.weighting.name != "fixed":
                raise ConfigError("loss_weighting", f"{self.weighting.name} weighs the tasks' losses against each "
                                                    f"other; a step of --task_mixing={mixing.name} trains one task: "
                                                    f"use --task_mixing=joint")
            if self.grad_accum_steps > 1:
                raise ConfigError("grad_accum_steps", f"not with --task_mixing={mixing.name}: each step trains one "
                                                      f"task; use --task_mixing=joint")
            for name in ("jit_compile", "xla_update"):  # A step reads the drawn task's iterator, which XLA cannot.
                if getattr(self, name):
                    raise ConfigError(name, f"not with --task_mixing={mixing.name}: XLA cannot read the drawn task's "
                                            f"batches inside the step; use --task_mixing=joint")
        for task in tasks:
            self.task_config(task)

    @property
    def representation_layer(self) -> str | None:
        """The layer of `--weighting_gradients=representation:LAYER`; None for the shared weights."""
        return self.weighting_gradients.removeprefix("representation:") if self.weighting_gradients != \
            "shared_weights" else None

    @property
    def weighting(self) -> loss_weighting_lib.LossWeighting:
        """`loss_weighting` read: the method and every hyper-parameter's value."""
        return loss_weighting_lib.parse(self.loss_weighting)

    def _check_loss_weighting(self):
        weighting = self.weighting  # Checks the name and hyper-parameters.
        gradients = self.weighting_gradients
        if not (gradients == "shared_weights" or isinstance(gradients, str) and gradients.startswith(
                "representation:") and gradients.removeprefix("representation:")):
            raise ConfigError("weighting_gradients", f"expected shared_weights or representation:LAYER, "
                                                     f"got {gradients!r}")
        if gradients != "shared_weights" and not weighting.uses_gradients:
            raise ConfigError("weighting_gradients", f"{gradients} serves the gradient methods; "
                                                     f"--loss_weighting={weighting.name} weighs by the losses alone")
        if weighting.name == "fixed":
            return
        if self.loop == "fit":
            raise ConfigError("loss_weighting", f"{weighting.name} is the custom loop's: model.fit trains one "
                                                f"fixed weighted sum; use --loop=custom")
        if self.grad_accum_steps > 1:
            # The methods weigh one batch's losses or gradients; an update of
            # K accumulated batches would need K batches' per-output gradients.
            raise ConfigError("loss_weighting", f"{weighting.name} weighs each batch's losses or gradients; "
                                                f"not with --grad_accum_steps={self.grad_accum_steps}")

    def _check_model(self):
        if callable(self.model):
            return
        if not (isinstance(self.model, str) and self.model):
            raise ConfigError("model", f"expected a built-in model name, MODULE:FUNCTION or a builder, "
                                       f"got {self.model!r}")
        if ":" in self.model and not is_module_function(self.model):
            raise ConfigError("model", f"expected MODULE:FUNCTION (e.g. my_models:build), got {self.model!r}")
        if self.sync_batchnorm and self.model != "shapes3d_cnn":
            raise ConfigError("sync_batchnorm", f"synchronizes the BatchNormalization layers of the built-in "
                                                f"shapes3d_cnn only; got --model={self.model} (build your own with "
                                                f"BatchNormalization(synchronized=True))")
        if self.model in ("mmoe", "shared_bottom", "multi_lenet"):
            names = self.task_outputs.split(",")
            if len(names) < 2 or len(set(names)) != len(names) or not all(name.isidentifier() for name in names):
                raise ConfigError("task_outputs", f"expected two or more distinct names joined by ',', got "
                                                  f"{self.task_outputs!r}")
        if self.task_classes < 0:
            raise ConfigError("task_classes", f"expected 0 (regression) or a number of classes > 0, got "
                                              f"{self.task_classes}")

    def _check_dataset(self):
        if not (_is_number(self.task_correlation) and -1 <= self.task_correlation <= 1):
            raise ConfigError("task_correlation", f"expected a number in [-1, 1] (the cosine of the two tasks' "
                                                  f"weight vectors), got {self.task_correlation!r}")
        if not isinstance(self.dataset, str):
            if not is_python_data(self.dataset):
                raise ConfigError("dataset", f"expected {DATASET_FORMS}, or from Python {PYTHON_DATA}; "
                                             f"got {type(self.dataset).__name__}")
            return
        if self.dataset.startswith(ARRAY_SOURCES):
            _check_array_source("dataset", self.dataset)
        elif self.dataset.startswith("tfds:"):
            if not self.dataset[5:]:
                raise ConfigError("dataset", "expected tfds:NAME[/CONFIG][:VERSION], got no NAME")
        elif self.dataset not in GENERATED_DATASETS:
            raise ConfigError("dataset", f"expected {DATASET_FORMS}, got {self.dataset!r}")
        if self.feature_map and not _reads(self.dataset, "feature_map"):
            raise ConfigError("feature_map", f"maps features of a tfds: dataset (or of multi_digits, "
                                             f"mmoe_synthetic); --dataset={self.dataset} names its data by the "
                                             f"model's inputs and outputs")
        if self.train_split != "train" and not self.dataset.startswith("tfds:"):
            raise ConfigError("train_split", f"chooses a split of a tfds: dataset, not of --dataset={self.dataset}")
        if self.validation_split and self.dataset.startswith(ARRAY_SOURCES):
            raise ConfigError("validation_split", f"chooses a split of a TFDS dataset; --dataset={self.dataset} "
                                                  f"has none: give --validation_data=npz:PATH")

    def _check_input_service(self):
        if self.input_service is None:
            return
        if self.input_service == "local":
            if self.strategy != "multi_worker":
                return
            raise ConfigError("input_service", "'local' starts a service in this process; every worker of "
                                               "--strategy=multi_worker must read from one service: launch/local.py "
                                               "starts it for them, elsewhere give HOST:PORT")
        host, _, port = self.input_service.rpartition(":")
        if not (host and "/" not in host and port.isdigit() and 0 < int(port) < 65536):
            raise ConfigError("input_service", f"expected 'local' or HOST:PORT, got {self.input_service!r}")

    def check_settings_are_read(self) -> None:
        """A setting only some built-in models or datasets read must keep its default with any other (it would be ignored).

        Called once the model is built, so that a --model that names no model
        is reported as such first.
        """
        sources = self.datasets.values() if self.datasets else [self.dataset]
        readers = {value for value in (self.model, *sources) if isinstance(value, str)}
        for name, setting in SETTINGS.items():
            if setting.only_for and not readers & set(setting.only_for) and getattr(self, name) != default_of(name):
                data = (f"--datasets={json.dumps(self.describe()['datasets'])}" if self.datasets
                        else f"--dataset={self.describe()['dataset']}")
                raise ConfigError(name, f"--model={self.describe()['model']} with {data} does not read it; leave "
                                        f"it unset")

    def _check_validation(self):
        if self.eval_every < 0:
            raise ConfigError("eval_every", f"expected steps >= 0 (0: only at the end), got {self.eval_every}")
        if self.early_stopping_patience is not None and self.save_best is None:
            raise ConfigError("early_stopping_patience", "watches the value that --save_best names; "
                                                         "set --save_best=VAL_NAME too")
        if self.save_best is not None and not self.save_best.startswith("val_"):
            raise ConfigError("save_best", f"expected a validation value such as val_loss or "
                                           f"val_<output>_loss, got {self.save_best!r}")
        if self.validation_data is None or self.is_per_task("validation_data"):  # Per task: each task checks its.
            return
        if self.validation_split is not None:
            raise ConfigError("validation_data", "give --validation_data or --validation_split, not both")
        if isinstance(self.validation_data, str):
            if not self.validation_data.startswith(ARRAY_SOURCES):
                raise ConfigError("validation_data", f"expected npz:PATH or npy:DIR, got {self.validation_data!r}")
            _check_array_source("validation_data", self.validation_data)
        elif not is_python_data(self.validation_data):
            raise ConfigError("validation_data", f"expected npz:PATH, npy:DIR, or from Python {PYTHON_DATA}; "
                                                 f"got {type(self.validation_data).__name__}")

    @property
    def validation_split_or_default(self) -> str | None:
        """The split to validate on (None: none), for datasets that have splits."""
        if self.validation_data is not None or self.validation_split == "":
            return None
        return self.validation_split or "validation"

    def describe(self) -> dict:
        """The settings as JSON values (what `config.json` records, and a resumed run must repeat).

        What was given from Python is recorded by name, the same in every
        process: a builder or loss function as `module:name`, a dataset or a
        Keras object by its type.
        """
        def by_name(value):
            if isinstance(value, str | int | float | bool) or value is None:
                return value
            if isinstance(value, Mapping):
                return {str(key): by_name(item) for key, item in value.items()}
            if isinstance(value, list | tuple):
                return [by_name(item) for item in value]
            if hasattr(value, "__qualname__"):  # A function.
                return f"{value.__module__}:{value.__qualname__}"
            return f"python:{type(value).__name__}"

        return {field.name: by_name(getattr(self, field.name)) for field in dataclasses.fields(self)}


# Every setting, by name, in the order TrainConfig declares them.
SETTINGS: dict[str, Setting] = {field.name: field.metadata["setting"] for field in dataclasses.fields(TrainConfig)}


def default_of(name: str):
    """A setting's default value."""
    field = TrainConfig.__dataclass_fields__[name]
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def settings_read_by(*parts: str) -> list[str]:
    """The settings that one of `parts` reads, in declaration order."""
    return [name for name, setting in SETTINGS.items() if set(setting.reads) & set(parts)]


def resumable_settings() -> list[str]:
    """The settings a resumed run may change: they say how far and how to drive, not what is trained."""
    return [name for name, setting in SETTINGS.items() if setting.resumable]


def is_python_data(value: object) -> bool:
    """Whether `value` has the form of PYTHON_DATA (duck-typed: this module imports no TensorFlow)."""
    if hasattr(value, "element_spec"):
        return True
    return (isinstance(value, tuple | list) and len(value) in (2, 3)
            and all(isinstance(part, Mapping) for part in value))


def is_module_function(text: object) -> bool:
    """True for a string of the form `MODULE:FUNCTION` (a dotted module path, a colon, a name)."""
    if not isinstance(text, str):
        return False
    module, _, function = text.partition(":")
    return bool(module and function and all(part.isidentifier() for part in module.split("."))
                and function.isidentifier())


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_keras_config(value) -> bool:
    return isinstance(value, Mapping) and isinstance(value.get("class_name"), str)


def _is_scheduled(weight) -> bool:
    """A loss weight that is a Keras schedule: its config, or a LearningRateSchedule given from Python
    (duck-typed: this module imports no Keras)."""
    return _is_keras_config(weight) or callable(weight) and hasattr(weight, "get_config")


def _reads(source, name: str) -> bool:
    """Whether a source (a name, or from Python a dataset) reads setting `name` of SOURCE_SETTINGS."""
    return isinstance(source, str) and source.startswith(SOURCE_SETTINGS[name])


def _check_array_source(field: str, source: str):
    """`npz:PATH` names a file, `npy:DIR` a directory."""
    kind, _, path = source.partition(":")
    if not (os.path.isfile(path) if kind == "npz" else os.path.isdir(path)):
        raise ConfigError(field, f"{kind} {'file' if kind == 'npz' else 'directory'} not found: {path!r}")


def _check_class_weights(class_weights: Mapping[str, Mapping[int, float]]):
    """Class ids are integers >= 0, weights finite and >= 0 (checks against the outputs need the model)."""
    for output, weights in class_weights.items():
        if not isinstance(weights, Mapping) or not weights:
            raise ConfigError("class_weights", f"output {output!r}: expected {{CLASS: WEIGHT, ...}}, got {weights!r}")
        for class_id, weight in weights.items():
            if not (isinstance(class_id, int) and class_id >= 0):
                raise ConfigError("class_weights", f"output {output!r}: class {class_id!r} is not a class id >= 0")
            if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
                raise ConfigError("class_weights", f"output {output!r}, class {class_id}: weight must be a finite "
                                                   f"number >= 0, got {weight!r}")


def _check_what_fit_cannot_do(config: TrainConfig):
    """`--loop=fit`'s limits, in one place: what Keras 3.15's `fit` cannot do, and how windows map to its epochs.

    When Keras changes, this is the function to read again.
    """
    if config.strategy == "mirrored" and config.steps_per_loop > 1:
        raise ConfigError("steps_per_loop", "with --loop=fit under --strategy=mirrored, must be 1: Keras 3.15's "
                                            "fit fails there with steps_per_execution > 1 (keras-team/keras#19246)")
    if config.strategy == "multi_worker":
        raise ConfigError("loop", "model.fit does not run under MultiWorkerMirroredStrategy in Keras 3.15 "
                                  "(keras-team/keras#20585); use --loop=custom")
    if config.grad_accum_steps > 1 and config.strategy != "default":
        raise ConfigError("grad_accum_steps", f"with --loop=fit, only under --strategy=default: Keras 3.15 "
                                              f"applies accumulated gradients inside a tf.cond, which "
                                              f"{config.strategy} cannot synchronize in; use --loop=custom")
    if config.log_gradient_shares_every:
        raise ConfigError("log_gradient_shares_every", "the custom loop's: not with --loop=fit")
    scheduled = [name for name, weight in (config.loss_weights or {}).items() if _is_scheduled(weight)]
    if scheduled:
        raise ConfigError("loss_weights", f"{scheduled[0]}: Keras 3.15's compile takes a number for each loss "
                                          f"weight, not a schedule (keras-team/keras#20294); use --loop=custom")
    if config.extra_losses:
        raise ConfigError("extra_losses", "compile's losses each read one output's labels and predictions; a term "
                                          "of several is the custom loop's: use --loop=custom")
    if config.xla_update:
        raise ConfigError("xla_update", "not with --loop=fit")
    if config.input_service is not None:
        raise ConfigError("input_service", "serves the custom loop's input pipelines; fit reads its dataset itself: "
                                           "use --loop=custom")
    # model.fit reports and logs per epoch; mto_tf maps one epoch to one
    # logging window of --log_every steps, so the run, its checkpoints and
    # its evaluations must fall on window boundaries.
    if config.epochs is not None:
        raise ConfigError("epochs", "not with --loop=fit: there one fit epoch is one logging window of "
                                    "--log_every steps, so that a run can resume from any checkpoint; "
                                    "use --train_steps, or --loop=custom")
    for field in ("train_steps", "checkpoint_every", "eval_every"):
        if getattr(config, field) % config.log_every:
            raise ConfigError(
                field, f"with --loop=fit, must be a multiple of --log_every={config.log_every} "
                f"(one fit epoch per logging window), got {getattr(config, field)}")
    if config.log_every % config.steps_per_loop:
        raise ConfigError("log_every", f"with --loop=fit, must be a multiple of --steps_per_loop="
                                       f"{config.steps_per_loop} (fit's steps_per_execution), got {config.log_every}")
