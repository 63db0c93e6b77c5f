"""`--loop=fit` runs the same configuration through model.fit and writes the same files."""

import dataclasses
import json

import numpy as np
import pytest

from helpers import small_config
from mto_tf import train

pytestmark = pytest.mark.slow


def test_fit_loop_writes_the_same_files_and_numbers_as_the_custom_loop(tmp_path):
    custom_config = small_config(tmp_path, optimizer="adam", learning_rate=0.01, train_steps=8, log_every=4,
                                 checkpoint_every=4, steps_per_loop=4, l2=0.001,
                                 loss_weights={"main_output": 0.5, "aux_output": 2.0},
                                 model_dir=str(tmp_path / "custom"))
    fit_config = dataclasses.replace(custom_config, loop="fit", model_dir=str(tmp_path / "fit"))
    custom, fit = train(custom_config), train(fit_config)

    custom_files = sorted(p.name for p in (tmp_path / "custom").iterdir())
    assert custom_files == sorted(p.name for p in (tmp_path / "fit").iterdir())
    assert {"metrics.jsonl", "model.weights.h5", "model.keras", "checkpoints", "tensorboard"} <= set(custom_files)
    assert sorted(p.name for p in (tmp_path / "fit" / "checkpoints").iterdir()) == sorted(
        p.name for p in (tmp_path / "custom" / "checkpoints").iterdir())

    fit_records = [json.loads(line) for line in (tmp_path / "fit" / "metrics.jsonl").read_text().splitlines()]
    assert fit_records == fit.history
    for custom_record, fit_record in zip(custom.history, fit_records, strict=True):
        assert custom_record.keys() == fit_record.keys()
        assert custom_record["step"] == fit_record["step"]
        for name in custom_record.keys() - {"step", "examples_per_sec"}:
            # Window means: fit's Mean trackers vs a float32 sum of steps.
            assert custom_record[name] == pytest.approx(fit_record[name], rel=1e-6), name
    for a, b in zip(custom.model.get_weights(), fit.model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
