"""docs/experiments/auxiliary_heads.py at tiny sizes: its records, and a module's shares (aggregated from its
layers' by the script) summing to 1 with each head reaching only the modules below it."""

import json

import pytest

from helpers import docs_script


@pytest.fixture(scope="module")
def script():
    return docs_script("experiments/auxiliary_heads.py")


@pytest.mark.slow
def test_the_experiment_runs_at_tiny_sizes(script, tmp_path):
    arguments = ["--aux_weights=0.3", "--seeds=0", "--train_steps=4", "--eval_every=2", "--share_every=2",
                 "--explain_batches=1", "--batch_size=8", "--train_examples=64", "--validation_examples=16",
                 "--test_examples=16", "--inception_filters=2", f"--data_dir={tmp_path / 'data'}",
                 f"--output_dir={tmp_path}"]
    results = script.main(arguments)

    assert json.loads((tmp_path / "auxiliary_heads.json").read_text()) == results
    assert (tmp_path / "auxiliary_heads.png").stat().st_size > 10_000  # The figure, drawn.
    assert [(run["aux_weight"], run["seed"]) for run in results["runs"]] == [(0.3, 0)]
    for run in results["runs"]:
        assert run["share_steps"] == [0, 2, 4]  # The initial weights, then every --share_every steps.
        assert run["eval_steps"] == [2, 4]
        assert set(run["val_accuracy"]) == set(script.HEADS)
        assert 0 <= run["test"]["main_output_accuracy"] <= 1
        for shares in run["shares"]:
            assert list(shares) == script.MODULES
            for module, by_head in shares.items():
                assert sum(by_head.values()) == pytest.approx(1.0, abs=1e-4), module
            # aux_1 sits on 4a, aux_2 on 4d: neither reaches 4e or 5a, and aux_1 not 4b to 4d (a share the
            # report leaves out counts as 0: this fails on a nonzero share where none can be).
            assert all(shares[module]["aux_1"] == 0.0 for module in script.MODULES[3:])
            assert all(shares[module]["aux_2"] == 0.0 for module in script.MODULES[6:])
    assert set(results["summary"]) == {"0.3"}
    for values in results["summary"].values():
        assert len(values["val_accuracy_mean"]) == len(values["val_accuracy_sd"]) == 2
        assert set(values["mean_shares"]) == set(script.MODULES)
