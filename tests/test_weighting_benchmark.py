"""docs/experiments/weighting_benchmark.py: LibMTL's Delta_m computed as defined, and the script at tiny sizes
scoring each run as an independent NumPy count of its test predictions does."""

import argparse
import json
import math

import numpy as np
import pytest

from helpers import docs_script


@pytest.fixture(scope="module")
def script():
    return docs_script("experiments/weighting_benchmark.py")


def test_delta_m_is_the_mean_relative_improvement_over_the_single_task_mean(script):
    single = "single task"
    runs = [{"method": single, "seed": 0, "task": "left", "accuracy": 0.8},
            {"method": single, "seed": 1, "task": "left", "accuracy": 0.9},  # Mean 0.85.
            {"method": single, "seed": 0, "task": "right", "accuracy": 0.5},
            {"method": single, "seed": 1, "task": "right", "accuracy": 0.7},  # Mean 0.6.
            # By hand: seed 0: (0 / 0.85 + 0.06 / 0.6) / 2 = 5 %; seed 1: (0.085 / 0.85 + 0.12 / 0.6) / 2 = 15 %.
            {"method": "m", "seed": 0, "task": None, "accuracy": {"left": 0.85, "right": 0.66}},
            {"method": "m", "seed": 1, "task": None, "accuracy": {"left": 0.935, "right": 0.72}}]

    summary = script.summarize(runs)

    assert summary["m"]["delta_m"]["mean"] == pytest.approx(10.0)
    assert summary["m"]["delta_m"]["sd"] == pytest.approx(math.sqrt(50))  # Sample sd of 5 and 15.
    assert summary["m"]["left"] == pytest.approx({"mean": 0.8925, "sd": 0.085 / math.sqrt(2)})
    assert summary[single]["right"] == pytest.approx({"mean": 0.6, "sd": 0.2 / math.sqrt(2)})
    table = script.markdown_table(summary, seeds=2)
    assert "| m | 89.25 ± 6.01 | 69.00 ± 4.24 | +10.00 ± 7.07 |" in table
    assert "| single task | 85.00 ± 7.07 | 60.00 ± 14.14 | 0 (reference) |" in table


def test_an_unknown_method_is_refused_before_any_run_trains(script, tmp_path):
    with pytest.raises(SystemExit, match=r"^--methods: unknown \['mgdaa'\]; expected some of fixed, "):
        script.main(["--methods=fixed,mgdaa", f"--work_dir={tmp_path}", f"--output_dir={tmp_path}"])
    assert not list(tmp_path.iterdir())  # Nothing trained, nothing written.


@pytest.mark.slow  # Four tiny runs trained and evaluated (about 15 s here); the inner loop keeps Delta_m's test.
def test_the_benchmark_runs_at_tiny_sizes_and_scores_each_run_by_its_test_predictions(script, tmp_path):
    import keras
    import tensorflow_datasets as tfds

    from mto_tf.data import multi_digits

    arguments = ["--seeds=0", "--methods=fixed,mgda", "--train_steps=2", "--train_examples=64",
                 "--test_examples=40", f"--data_dir={tmp_path / 'data'}", f"--work_dir={tmp_path / 'runs'}",
                 f"--output_dir={tmp_path}"]
    report = script.main(arguments)

    assert json.loads((tmp_path / "weighting_benchmark.json").read_text()) == report
    assert (tmp_path / "weighting_benchmark.png").stat().st_size > 10_000  # The figure, drawn.
    assert [(run["method"], run["task"]) for run in report["runs"]] == [
        ("single task", "left"), ("single task", "right"), ("fixed", None), ("mgda", None)]
    config = script.run_config(seed=0, loss_weighting="fixed", loss_weights={}, model_dir="",
                                  arguments=argparse.Namespace(data_dir=str(tmp_path / "data"), train_examples=64,
                                                               test_examples=40, train_steps=2,
                                                               dense_units=50))
    test = tfds.as_numpy(multi_digits.make_builder(config).as_dataset(split="test", batch_size=-1))
    for run, directory in zip(report["runs"], ["single_left", "single_right", "fixed", "mgda"]):
        run_dir = tmp_path / "runs" / "steps_2_examples_64_dense_50" / "seed_0" / directory
        model = keras.saving.load_model(run_dir / "model.keras")
        predicted = model.predict({"image": test["image"]}, verbose=0)
        # A float32 mean of 40 zeros and ones: exact to float32 rounding.
        accuracy = {task: float(np.mean(np.argmax(predicted[task], axis=-1) == test[task]))
                    for task in ("left", "right")}
        expected = accuracy[run["task"]] if run["task"] else accuracy
        assert run["accuracy"] == pytest.approx(expected, abs=1e-6), directory
    # Single-task runs score on their own task; Delta_m is relative to them (float64 arithmetic on the same
    # numbers in another order: equal to rounding).
    single = {run["task"]: run["accuracy"] for run in report["runs"][:2]}
    fixed = report["runs"][2]["accuracy"]
    assert report["summary"]["fixed"]["delta_m"]["mean"] == pytest.approx(
        100 * np.mean([(fixed[task] - single[task]) / single[task] for task in single]), rel=1e-12)
