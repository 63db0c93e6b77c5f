"""One source for every setting: the flags, the refused settings, the resumable ones, mto-explain's and docs/flags.md
all come from `TrainConfig`'s fields, and what a field says reads it is what really reads it."""

import dataclasses
import functools
import json
from pathlib import Path

import pytest
from absl import flags as absl_flags

from helpers import SMALL_MODEL
from mto_tf import TrainConfig
from mto_tf import config as config_lib
from mto_tf.programs import flags as mto_flags

FLAGS_DOC = Path(__file__).parents[1] / "docs" / "flags.md"


def test_every_field_declares_a_setting_and_every_flag_is_one():
    fields = [field.name for field in dataclasses.fields(TrainConfig)]
    assert list(config_lib.SETTINGS) == fields
    defined_here = {flag.name for flag in mto_flags.FLAGS.get_flags_for_module(mto_flags.__name__)}
    # Beside mto-train's, only the other programs' own flags (defined when one of them runs).
    programs_own = set()
    for define in (mto_flags.define_explain_flags, mto_flags.define_evaluate_flags, mto_flags.define_export_flags,
                   mto_flags.define_input_service_flags, mto_flags.define_sweep_flags,
                   functools.partial(mto_flags.define_bench_flags, ["fit"])):
        own = absl_flags.FlagValues()
        define(flag_values=own)
        programs_own |= set(own)
    assert not programs_own & set(fields)
    assert set(fields) <= defined_here and defined_here - set(fields) <= programs_own
    for name, setting in config_lib.SETTINGS.items():
        flag = mto_flags.FLAGS[name]
        # absl puts an enum's choices before its help.
        assert flag.help.endswith(setting.help) and flag.default == mto_flags.flag_default(name), name
        if setting.kind == "choice":
            assert flag.parser.enum_values == list(setting.choices), name


def test_the_resumable_settings_are_those_a_resumed_run_has_always_been_allowed_to_change():
    # config.json of every run written so far leaves out exactly these: a change here is a change of contract.
    assert set(config_lib.resumable_settings()) == {
        "train_steps", "steps_per_loop", "log_every", "checkpoint_every", "init_weights", "model_dir", "data_dir",
        "loop", "jit_compile", "xla_update", "progress", "eval_every", "eval_steps", "early_stopping_patience",
        "log_gradient_shares_every", "callbacks",
        # Where each worker's rows come from, not which: a resumed run may read through a service or not.
        "input_service"}


def test_mto_explain_refuses_the_flags_of_the_parts_it_does_not_run():
    from mto_tf.programs import explain
    from mto_tf.programs.flags import flags_not_read_by

    assert set(flags_not_read_by(explain.READS)) == {
        "optimizer", "learning_rate", "clipnorm", "global_clipnorm", "clipvalue", "grad_accum_steps", "xla_update",
        "jit_compile", "train_steps", "epochs", "steps_per_loop", "log_every", "checkpoint_every", "loop",
        "progress", "save_best", "early_stopping_patience", "metrics", "validation_data", "validation_split",
        "eval_every", "eval_steps", "log_gradient_shares_every", "callbacks", "task_mixing", "epochs_of",
        "input_service"}
    for name in flags_not_read_by(explain.READS):
        assert not set(config_lib.SETTINGS[name].reads) & set(explain.READS), name


def _changed(name: str):
    """A value other than the default, of the setting's type."""
    default = config_lib.default_of(name)
    if isinstance(default, bool):
        return not default
    if isinstance(default, float):
        return default + 0.25 if default < 0.5 else default / 2
    if isinstance(default, str):  # A choice's other value, or other output names.
        choices = config_lib.SETTINGS[name].choices
        return next(value for value in choices if value != default) if choices else "one,two,three"
    return default + 1


# Settings that only some built-in models or datasets read, with the base they are changed from.
ONLY_FOR = [name for name, setting in config_lib.SETTINGS.items() if setting.only_for]
BASE = dict(SMALL_MODEL, conv_filters=4, inception_filters=2, image_size=6, aux_head_units=4, features_dim=4,
            num_experts=2, expert_units=2, tower_units=2)


@functools.cache
def _base_model_config(model_name: str) -> str:
    """The built-in model's config at BASE sizes (built once per test process)."""
    from mto_tf.core.models import MODELS

    return json.dumps(MODELS[model_name].build(TrainConfig(model="shapes3d_cnn", **BASE)).get_config())


@pytest.mark.slow  # Every built-in model built once per setting (about 30 s).
@pytest.mark.parametrize("name", ONLY_FOR)
def test_a_setting_only_some_models_read_changes_exactly_those_models(name):
    from mto_tf.core.models import MODELS

    # Built by each builder directly: a builder reads its settings, not --model.
    base = TrainConfig(model="shapes3d_cnn", **BASE)
    changed = dataclasses.replace(base, **{name: _changed(name) if name not in BASE else BASE[name] + 1})
    for model_name, spec in MODELS.items():
        differs = _base_model_config(model_name) != json.dumps(spec.build(changed).get_config())
        assert differs == (model_name in config_lib.SETTINGS[name].only_for), (name, model_name)


@pytest.mark.parametrize("name", ONLY_FOR)
def test_a_setting_only_synthetic_headlines_reads_changes_the_generated_data(name, tmp_path):
    from mto_tf.data import synthetic_headlines

    base = TrainConfig(model="shapes3d_cnn", data_dir=str(tmp_path), **BASE)
    changed = dataclasses.replace(base, **{name: _changed(name) if name not in BASE else BASE[name] + 1})
    differs = (synthetic_headlines.make_builder(base).builder_config.name
               != synthetic_headlines.make_builder(changed).builder_config.name)
    assert differs == ("synthetic_headlines" in config_lib.SETTINGS[name].only_for), name


def test_a_setting_nothing_of_this_run_reads_is_refused_naming_it():
    from mto_tf.errors import ConfigError

    neither = dict(model="my_models:build", dataset="npz:" + __file__)  # A user's model on a user's file.
    for name in ONLY_FOR:
        with pytest.raises(ConfigError, match=f"^--{name}: "):
            TrainConfig(**neither, **{name: _changed(name)}).check_settings_are_read()
        for reader in config_lib.SETTINGS[name].only_for:  # Any one reader is enough.
            kind = "dataset" if reader == "synthetic_headlines" else "model"
            TrainConfig(**{**neither, kind: reader, name: _changed(name)}).check_settings_are_read()
    with pytest.raises(ConfigError, match="^--lstm_units: --model=my_models:build with --dataset=npz:.* does not "
                                          "read it; leave it unset$"):
        TrainConfig(**neither, lstm_units=8).check_settings_are_read()


def test_docs_flags_md_is_written_from_the_settings():
    from mto_tf.programs import flags_doc

    assert FLAGS_DOC.read_text() == flags_doc.markdown(), (
        "docs/flags.md is stale: python -m mto_tf.programs.flags_doc docs/flags.md")
    for name in config_lib.SETTINGS:
        assert f"| `--{name}` |" in FLAGS_DOC.read_text()
