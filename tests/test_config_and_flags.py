"""Flags become a validated `TrainConfig`; every bad setting names its flag."""

import pytest
from absl.testing import flagsaver

from helpers import small_config
from mto_tf import TrainConfig
from mto_tf.errors import ConfigError
from mto_tf.programs import flags as mto_flags


def config_from_args(*args):
    """Parses `args` as the command line would, restoring the flags afterwards."""
    with flagsaver.flagsaver():
        mto_flags.FLAGS.unparse_flags()
        mto_flags.FLAGS(["mto-train", *args])
        return mto_flags.config_from_flags()


def test_flag_defaults_are_the_config_defaults():
    assert config_from_args() == TrainConfig()


def test_per_output_flags_parse_into_mappings():
    config = config_from_args("--loss_weights=main_output=0.3, aux_output=1.7",
                              "--losses=main_output=binary_crossentropy,aux_output=mean_squared_error",
                              "--metrics=main_output=binary_accuracy,main_output=auc,aux_output=binary_accuracy")
    assert config.loss_weights == {"main_output": 0.3, "aux_output": 1.7}
    assert config.losses == {"main_output": "binary_crossentropy", "aux_output": "mean_squared_error"}
    assert config.metrics == {"main_output": ("binary_accuracy", "auc"), "aux_output": ("binary_accuracy",)}
    assert config_from_args("--metrics=").metrics == {}
    # Unset: the built-in model's own (resolved once the model is built).
    assert (config_from_args().losses, config_from_args().loss_weights, config_from_args().metrics) == (None,) * 3


def test_json_losses_and_metrics_keep_keras_configs_and_module_functions():
    config = config_from_args(
        '--losses={"main_output": {"class_name": "BinaryCrossentropy", "config": {"from_logits": true}},'
        ' "aux_output": "my_losses:focal"}',
        '--metrics={"main_output": ["accuracy", {"class_name": "AUC", "config": {"name": "pr", "curve": "PR"}}],'
        ' "aux_output": "mae"}',
        '--loss_weights={"main_output": 1, "aux_output": 0.5}',
        "--model=my_models:build", "--dataset=tfds:my_data/small:1.0.0",
        "--feature_map=main_input=text/tokens,sample_weight/main_output=weight")
    assert config.losses == {"main_output": {"class_name": "BinaryCrossentropy", "config": {"from_logits": True}},
                             "aux_output": "my_losses:focal"}
    assert config.metrics == {"main_output": ("accuracy", {"class_name": "AUC", "config": {"name": "pr", "curve": "PR"}}),
                              "aux_output": ("mae",)}
    assert config.loss_weights == {"main_output": 1.0, "aux_output": 0.5}
    assert config.feature_map == {"main_input": "text/tokens", "sample_weight/main_output": "weight"}


def test_per_task_settings_are_json_objects_and_each_task_sees_its_own(tmp_path):
    for name in ("a.npz", "b.npz", "b_val.npz"):
        (tmp_path / name).touch()  # The settings only need the files to exist.
    config = config_from_args(
        f'--datasets={{"main_output": "npz:{tmp_path}/a.npz", "aux_output": "npz:{tmp_path}/b.npz"}}',
        '--batch_size={"main_output": 32, "aux_output": 8}', '--shuffle_buffer={"aux_output": 100}',
        f'--validation_data={{"aux_output": "npz:{tmp_path}/b_val.npz"}}', '--missing_labels=aux_output=-1',
        '--task_mixing={"name": "proportional", "alpha": 0.5}')
    assert config.batch_size == {"main_output": 32, "aux_output": 8}
    assert (config.mixing.name, config.mixing.parameters) == ("proportional", {"alpha": 0.5})
    main, aux = config.task_config("main_output"), config.task_config("aux_output")
    assert (main.dataset, main.batch_size, main.shuffle_buffer, main.validation_data, main.missing_labels) == (
        f"npz:{tmp_path}/a.npz", 32, 0, None, {})
    assert (aux.dataset, aux.batch_size, aux.shuffle_buffer, aux.validation_data, aux.missing_labels) == (
        f"npz:{tmp_path}/b.npz", 8, 100, f"npz:{tmp_path}/b_val.npz", {"aux_output": -1.0})
    # One value for every task, as without --datasets.
    shared = config_from_args(f'--datasets={{"main_output,aux_output": "npz:{tmp_path}/a.npz"}}', "--batch_size=16")
    assert shared.task_config("main_output,aux_output").batch_size == 16
    # Each task's settings are checked as a run's: a feature map for an npz source is refused, naming the task.
    with pytest.raises(ConfigError, match="^--feature_map: task 'main_output,aux_output': maps features of a tfds"):
        config_from_args(f'--datasets={{"main_output,aux_output": "npz:{tmp_path}/a.npz"}}',
                         '--feature_map={"main_output,aux_output": {"main_input": "tokens"}}')
    # A shared one serves the tfds sources; with none, nothing would read it.
    with pytest.raises(ConfigError, match="^--feature_map: serves a tfds:NAME or multi_digits or mmoe_synthetic "
                                          "source; no task of --datasets has one"):
        config_from_args(f'--datasets={{"main_output,aux_output": "npz:{tmp_path}/a.npz"}}',
                         "--feature_map=main_input=tokens")
    assert config_from_args('--feature_map={"t": {"main_input": "tokens"}}', '--datasets={"t": "tfds:x"}'
                            ).task_config("t").feature_map == {"main_input": "tokens"}


def test_flagfile_sets_flags(tmp_path):
    flagfile = tmp_path / "run.flags"
    flagfile.write_text("--optimizer=adam\n--batch_size=32\n--loss_weights=main_output=1,aux_output=0.5\n")
    config = config_from_args(f"--flagfile={flagfile}")
    assert (config.optimizer, config.batch_size, config.loss_weights["aux_output"]) == ("adam", 32, 0.5)


@pytest.mark.parametrize("args, message", [
    (["--loss_weights=main_output=1,aux_output"], "^--loss_weights: expected OUTPUT=VALUE pairs"),
    (["--loss_weights=main_output=1,main_output=2"], "^--loss_weights: output 'main_output' given twice"),
    (["--loss_weights=main_output=nan,aux_output=1"], "^--loss_weights: weight of 'main_output' must be a finite"),
    (["--loss_weights=main_output=inf,aux_output=1"], "^--loss_weights: weight of 'main_output' must be a finite"),
    (["--losses={main_output: 1}"], "^--losses: not valid JSON"),
    (['--losses={"main_output": 3}'], "^--losses: output 'main_output': expected a Keras loss name"),
    (["--metrics=main_output"], "^--metrics: expected OUTPUT=METRIC pairs"),
    (["--model=my models:build"], "^--model: expected MODULE:FUNCTION"),
    (["--datasets={}"], "^--datasets: expected one task at least"),
    # Given, even as its default: --dataset would be ignored.
    (['--datasets={"main_output,aux_output": "synthetic_headlines"}', "--dataset=synthetic_headlines"],
     "^--dataset: give --dataset or --datasets"),
    (["--sync_batchnorm"], "^--sync_batchnorm: synchronizes the BatchNormalization layers of the built-in shapes3d_cnn only"),
    (["--dropout_rate=1"], r"^--dropout_rate: expected a rate in \[0, 1\)"),
    (["--feature_map=image=pixels"], "^--feature_map: maps features of a tfds: dataset"),
    (["--feature_map=main_input"], "^--feature_map: expected NAME=FEATURE pairs separated by commas, got 'main_input'"),
    (["--feature_map=main_input=a,main_input=b"], "^--feature_map: name 'main_input' given twice"),
    (["--train_split=test"], "^--train_split: chooses a split of a tfds: dataset"),
    (["--dataset=tfds:"], "^--dataset: expected tfds:NAME"),
    (["--batch_size=0"], "^--batch_size: expected an integer > 0"),
    (["--steps_per_loop=-1"], "^--steps_per_loop: expected an integer > 0"),
    (["--learning_rate=0"], "^--learning_rate: expected a number > 0"),
    (["--l2=-0.1"], "^--l2: expected a factor >= 0"),
    (["--num_cpu_devices=2"], "^--num_cpu_devices: .* only serves --strategy=mirrored or multi_worker"),
    (["--jit_compile", "--strategy=mirrored"], "^--jit_compile: XLA compiles a step for one device"),
    (["--loop=fit", "--log_every=25"], "^--log_every: with --loop=fit, must be a multiple of --steps_per_loop=10"),
    (["--loop=fit", "--strategy=mirrored", "--num_cpu_devices=2"], "^--steps_per_loop: with --loop=fit under "),
    (["--loop=fit", "--strategy=multi_worker"], "^--loop: model.fit does not run under MultiWorkerMirroredStrategy"),
    (["--dataset=imagenet"], "^--dataset: expected 'synthetic_headlines', 'multi_digits', 'mmoe_synthetic', "
                             "'npz:PATH', 'npy:DIR' or 'tfds:NAME"),
    (["--dataset=npz:/no/such/file.npz"], "^--dataset: npz file not found"),
    (["--dataset=npy:/no/such/dir"], "^--dataset: npy directory not found: '/no/such/dir'"),
    (["--init_weights=/no/such.weights.h5"], "^--init_weights: file not found"),
    (["--loop=fit", "--train_steps=7", "--log_every=5"], "^--train_steps: with --loop=fit, must be a multiple"),
    (["--epochs=2", "--train_steps=500"], "^--epochs: give --epochs or --train_steps, not both"),
    (["--epochs=0"], "^--epochs: expected an integer > 0"),
    (["--loop=fit", "--epochs=2"], "^--epochs: not with --loop=fit"),
    (["--loop=fit", "--eval_every=25"], "^--eval_every: with --loop=fit, must be a multiple of --log_every=50"),
    (["--eval_every=-1"], r"^--eval_every: expected steps >= 0"),
    (["--eval_steps=0"], "^--eval_steps: expected an integer > 0"),
    (["--early_stopping_patience=3"], "^--early_stopping_patience: watches the value that --save_best names"),
    (["--save_best=main_output_loss"], "^--save_best: expected a validation value such as val_loss"),
    (["--validation_data=/tmp/v.npz"], "^--validation_data: expected npz:PATH"),
    (["--validation_data=npz:/no/v.npz"], "^--validation_data: npz file not found"),
    (["--validation_split=validation", f"--dataset=npz:{__file__}"], "^--validation_split: chooses a split of a TFDS"),
])
def test_bad_settings_raise_config_error_naming_the_flag(args, message):
    with pytest.raises(ConfigError, match=message):
        config_from_args(*args)


@pytest.mark.parametrize("overrides, message", [
    (dict(losses={"main_output": "binary_crossentropy"}), "^--losses: no entry for output 'aux_output'"),
    (dict(losses={"main_output": "hinge_it", "aux_output": "binary_crossentropy"}),
     "^--losses: output 'main_output': Keras cannot make a loss of 'hinge_it'"),
    (dict(losses={"main_output": {"class_name": "BinaryCrossentropy", "config": {"from_logit": True}},
                  "aux_output": "binary_crossentropy"}),
     "^--losses: output 'main_output': Keras cannot make a loss of .*from_logit"),
    (dict(loss_weights={"main_output": 1.0, "aux": 0.2}),
     r"^--loss_weights: unknown output 'aux'; model 'headline' has outputs \['aux_output', 'main_output'\]"),
    (dict(metrics={"side_output": ("auc",)}), "^--metrics: unknown output 'side_output'"),
    (dict(metrics={"main_output": ("accuracyy",)}), "^--metrics: output 'main_output': Keras cannot make a metric"),
    (dict(model="resnet"), "^--model: expected one of headline, shapes3d_cnn, inception_aux, mmoe, shared_bottom, multi_lenet or MODULE:FUNCTION; got 'resnet'"),
    (dict(conv_filters=8), "^--conv_filters: --model=headline with --dataset=synthetic_headlines does not read it"),
])
def test_settings_checked_against_the_built_model_fail_before_anything_is_written(tmp_path, overrides, message):
    from mto_tf import train
    with pytest.raises(ConfigError, match=message):
        train(small_config(tmp_path, **overrides))
    assert not (tmp_path / "run").exists()


# Keras warns about the mismatched file before it raises; the raise is what is tested.
@pytest.mark.filterwarnings("ignore:Skipping nested container")
def test_init_weights_of_another_model_is_rejected_naming_the_flag(tmp_path):
    from mto_tf import train
    from mto_tf.core.models import build_headline
    other = small_config(tmp_path, lstm_units=7)
    build_headline(other).save_weights(tmp_path / "other.weights.h5")
    with pytest.raises(ConfigError, match="^--init_weights: .*other.weights.h5' does not fit model 'headline'"):
        train(small_config(tmp_path, init_weights=str(tmp_path / "other.weights.h5")))
    assert not (tmp_path / "run").exists()


def test_settings_given_from_python_are_recorded_by_name_the_same_in_every_process():
    import keras

    def build():
        raise AssertionError("never called")

    described = TrainConfig(model=build, losses={"a": keras.losses.Huber(), "b": keras.losses.mean_squared_error},
                            metrics={"a": ("mae",)}).describe()
    assert described["model"] == f"{__name__}:test_settings_given_from_python_are_recorded_by_name_the_same_in_" \
                                 f"every_process.<locals>.build"
    assert described["losses"] == {"a": "python:Huber", "b": "keras.src.losses.losses:mean_squared_error"}
    assert described["metrics"] == {"a": ["mae"]}
    assert "0x" not in repr(described)  # No memory address: a resumed run must describe itself alike.
