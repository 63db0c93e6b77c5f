"""The benchmark's machinery, at tiny sizes. No test asserts a speed."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from helpers import MODULE_NAME, MODULE_SOURCE, SMALL_MODEL, data_dir, small_config, write_ticket_npz
from helpers import TICKET_LOSSES as LOSSES
from mto_tf.programs import bench


def test_variants_differ_from_the_defaults_only_as_documented(tmp_path):
    config = small_config(tmp_path, steps_per_loop=5, jit_compile=True)
    assert bench.variant_config("custom_default", config) == config
    assert bench.variant_config("fit_matched", config) == config
    assert bench.variant_config("fit_default", config) == bench.variant_config("custom_matched", config)
    matched = bench.variant_config("custom_matched", config)
    assert (matched.steps_per_loop, matched.jit_compile) == (1, False)
    assert dataclasses.replace(matched, steps_per_loop=5, jit_compile=True) == config
    mirrored = bench.variant_config("mirrored_custom_default", config)
    assert (mirrored.strategy, mirrored.num_cpu_devices, mirrored.steps_per_loop, mirrored.jit_compile) == (
        "mirrored", 2, 5, False)
    assert bench.variant_config("mirrored_fit_matched", config).steps_per_loop == 1
    # weighting:NAME[/GRADIENTS]: custom_default with that method, nothing else changed.
    assert bench.variant_config("weighting:fixed", config) == config
    representation = bench.variant_config("weighting:mgda/representation:lstm", config)
    assert dataclasses.replace(representation, loss_weighting="fixed", weighting_gradients="shared_weights") == config
    assert (representation.loss_weighting, representation.weighting_gradients) == ("mgda", "representation:lstm")


@pytest.mark.slow
def test_every_variant_runs_in_its_own_process_and_the_json_has_the_documented_shape(tmp_path):
    output = tmp_path / "bench.json"
    flags = [f"--{name}={value}" for name, value in SMALL_MODEL.items()] + [
        "--batch_size=16", "--synthetic_train_examples=128", f"--data_dir={data_dir()}",
        "--steps_per_loop=5", "--windows=2", "--window_steps=10", "--warmup_windows=1", f"--output_json={output}"]
    process = subprocess.run([sys.executable, "-m", "mto_tf.bench", *flags], capture_output=True, text=True,
                             timeout=600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert process.returncode == 0, process.stderr[-3000:]

    report = json.loads(output.read_text())
    assert set(report) == {"machine", "variants", "ratios", "ratio_quartiles"}
    assert {"cpu", "cores", "tensorflow", "keras", "command"} <= set(report["machine"])
    assert list(report["variants"]) == list(bench.VARIANTS)
    for name, result in report["variants"].items():
        assert result["examples_per_sec"] > 0 and result["spread"] >= 0 and result["peak_rss_mb"] > 100, name
        assert len(result["windows"]) == 2 and len(result["process_medians"]) == 1
        assert result["replicas"] == (2 if name.startswith("mirrored_") else 1)
        assert f"| {name} |" in process.stdout
    assert set(report["ratios"]) == set(report["ratio_quartiles"]) == {
        "custom_default/fit_default", "custom_default/fit_matched", "custom_matched/fit_default", "custom_default/limit",
        "mirrored_custom_default/mirrored_fit_matched"}
    for low, middle, high in report["ratio_quartiles"].values():
        assert 0 < low <= middle <= high
    # The variants took turns: set-up, then one window each, never two at once.
    turns = sorted(turn for result in report["variants"].values() for turn in result["turns"])
    assert [len(result["turns"]) for result in report["variants"].values()] == [1 + 1 + 2] * len(bench.VARIANTS)
    for (_, previous_end), (start, _) in zip(turns, turns[1:]):
        assert start >= previous_end
    assert report["ratios"]["custom_default/fit_default"] == pytest.approx(
        report["variants"]["custom_default"]["examples_per_sec"] / report["variants"]["fit_default"]["examples_per_sec"])


def test_repeats_pool_the_windows_of_every_process():
    runs = [{"examples_per_sec": 100.0, "spread": 0.0, "windows": [90.0, 110.0], "peak_rss_mb": 700.0,
             "replicas": 1, "steps_per_loop": 10, "jit_compile": False, "turns": [[1.0, 2.0]]},
            {"examples_per_sec": 200.0, "spread": 0.0, "windows": [200.0, 200.0], "peak_rss_mb": 650.0,
             "replicas": 1, "steps_per_loop": 10, "jit_compile": False, "turns": [[5.0, 6.0]]}]
    combined = bench._combine(runs)
    assert combined["windows"] == [90.0, 110.0, 200.0, 200.0]
    assert combined["examples_per_sec"] == 155.0  # Median of the four windows.
    assert combined["spread"] == pytest.approx((200.0 - 90.0) / 155.0)
    assert combined["peak_rss_mb"] == 700.0 and combined["process_medians"] == [100.0, 200.0]
    assert combined["turns"] == [[1.0, 2.0], [5.0, 6.0]]


@pytest.mark.slow
def test_benchmark_takes_a_user_model_and_dataset_like_mto_train(tmp_path):
    (tmp_path / f"{MODULE_NAME}.py").write_text(MODULE_SOURCE)
    write_ticket_npz(tmp_path / "tickets.npz")
    output = tmp_path / "bench.json"
    process = subprocess.run(
        [sys.executable, "-m", "mto_tf.bench", f"--model={MODULE_NAME}:build", "--dataset=npz:tickets.npz",
         f"--losses={json.dumps(LOSSES)}", "--batch_size=16", "--steps_per_loop=5", "--windows=1",
         "--window_steps=5", "--variants=fit_default,weighting:fixed,weighting:mgda", f"--output_json={output}"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert process.returncode == 0, process.stderr[-3000:]
    report = json.loads(output.read_text())
    assert list(report["variants"]) == ["fit_default", "weighting:fixed", "weighting:mgda"]
    assert all(result["examples_per_sec"] > 0 for result in report["variants"].values())
    # Each method against fixed, measured side by side.
    assert report["ratios"]["weighting:mgda/weighting:fixed"] == pytest.approx(
        report["variants"]["weighting:mgda"]["examples_per_sec"]
        / report["variants"]["weighting:fixed"]["examples_per_sec"])
    assert f"--model={MODULE_NAME}:build" in report["machine"]["command"]
