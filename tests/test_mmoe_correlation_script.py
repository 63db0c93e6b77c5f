"""docs/experiments/mmoe_correlation.py at tiny sizes: a row per model and correlation, a run per seed, every
value finite, and parameter counts by hand equal to Keras's."""

import argparse
import json
import math

import pytest

from helpers import docs_script


@pytest.fixture(scope="module")
def script():
    return docs_script("experiments/mmoe_correlation.py")


@pytest.mark.slow  # Four tiny runs trained and tested: 7 to 11 s here.
def test_the_experiment_runs_at_tiny_sizes(script, tmp_path):
    arguments = ["--correlations=1.0,0.5", "--seeds=0", "--train_steps=4", "--eval_every=2", "--batch_size=8",
                 "--train_examples=32", "--validation_examples=8", "--test_examples=8", "--features_dim=100",
                 "--num_experts=2", "--expert_units=4", "--tower_units=2", f"--data_dir={tmp_path / 'data'}",
                 f"--output_dir={tmp_path}"]
    report = script.main(arguments)

    assert json.loads((tmp_path / "mmoe_correlation.json").read_text()) == report
    assert (tmp_path / "mmoe_correlation.png").stat().st_size > 10_000  # The figure, drawn.
    assert [(run["model"], run["correlation"], run["seed"]) for run in report["runs"]] == [
        (model, correlation, seed) for correlation in (1.0, 0.5) for seed in (0,)
        for model in ("shared_bottom", "mmoe")]
    for run in report["runs"]:
        assert run["parameters"] == report["parameters"][run["model"]]  # Keras's count, and the hand count.
        assert run["steps"] == [2, 4]
        assert len(run["train_mse"]) == len(run["validation_mse"]) == 2
        values = [*run["train_mse"], *run["validation_mse"], *run["test_mse"].values()]
        assert all(math.isfinite(value) and value > 0 for value in values)
        assert run["test_mse"]["mean"] == pytest.approx((run["test_mse"]["task_a"] + run["test_mse"]["task_b"]) / 2)
    assert [(row["model"], row["correlation"], row["seeds"]) for row in report["table"]] == [
        (model, correlation, 1) for correlation in (1.0, 0.5) for model in ("shared_bottom", "mmoe")]
    # The sizes it chose: the shared bottom's width whose parameter count is nearest MMoE's.
    counts = report["parameters"]
    assert abs(counts["shared_bottom"] - counts["mmoe"]) <= (100 + 1 + 2 * 2) / 2


def test_the_paper_sizes_give_a_bottom_of_126_units(script):
    arguments = argparse.Namespace(features_dim=100, num_experts=8, expert_units=16, tower_units=8, bottom_units=0)
    assert script.bottom_units(arguments) == 126
    assert script.parameter_counts(arguments) == {"shared_bottom": 14776, "mmoe": 14834}
