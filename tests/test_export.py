"""`mto-export`: a trained run as a SavedModel that TensorFlow alone serves, without the heads only training needs.

One small headline run is trained once for the module and exported three
ways (only `main_output`, in this process; every output, by `python -m
mto_tf.export` in a fresh process; a user's own model with one of its
heads left out); one more fresh process, which never imports mto_tf, loads
the three and runs their `serving_default` signatures (those tests are
`slow`: two fresh TensorFlow processes). Bad values run in this process.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from helpers import (MODULE_NAME, MODULE_SOURCE, SMALL_FLAGS, SMALL_MODEL, TIMEOUT_SECONDS, data_dir,
                     mto_train_in_process, run_in_process, small_config, write_npz, write_ticket_npz)

# One test process: the trained run and the exports, made once for the module.
pytestmark = pytest.mark.xdist_group("export")

# What mto-export reads: the model's flags (every other flag is refused).
MODEL_FLAGS = [f"--{name}={value}" for name, value in SMALL_MODEL.items()]
# The SavedModel computes the same float32 ops as Keras's eager call, but as a graph that TensorFlow's optimizer
# may rewrite (fused or reordered ops): a few ulps apart on values in [0, 1] (6e-8, one ulp at 0.5, measured), not
# the 1e-3 and more that other weights or a missing layer would give.
RTOL = ATOL = 1e-6


def _export(*flags):
    from mto_tf.programs import export
    from mto_tf.programs import flags as mto_flags

    return run_in_process("mto-export", export.export_main, *flags, define_flags=mto_flags.define_export_flags)


# The fresh process that serves the exports: TensorFlow only (no mto_tf, no user code), as TensorFlow Serving would.
LOAD_AND_SERVE = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf

    requests = json.loads(sys.argv[1])
    served = {}
    for name, (export_dir, examples) in requests.items():
        loaded = tf.saved_model.load(export_dir)
        serve = loaded.signatures["serving_default"]
        with np.load(examples) as arrays:
            inputs = {key: tf.constant(arrays[key]) for key in serve.structured_input_signature[1]}
        served[name] = {
            "inputs": {key: [spec.dtype.name, spec.shape.as_list()]
                       for key, spec in serve.structured_input_signature[1].items()},
            "outputs": {key: value.numpy().tolist() for key, value in serve(**inputs).items()},
            "variables": {variable.name: variable.shape.as_list() for variable in loaded.trainable_variables},
        }
    assert not [module for module in sys.modules if module.split(".")[0] in ("mto_tf", "ticket_model")], sys.modules
    print(json.dumps(served))
""")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short headline run's directory, and its model with the final weights."""
    from mto_tf.core.models import build_headline

    tmp = tmp_path_factory.mktemp("trained")
    process = mto_train_in_process(*SMALL_FLAGS, f"--data_dir={data_dir()}", f"--model_dir={tmp / 'run'}",
                                   "--train_steps=4", "--checkpoint_every=2")
    assert process.returncode == 0, process.stderr[-3000:]
    headline = build_headline(small_config(tmp))
    headline.load_weights(tmp / "run" / "model.weights.h5")
    return tmp / "run", headline


@pytest.fixture(scope="module")
def served(trained, tmp_path_factory):
    """The user's model, and what the three exports served in a process without mto_tf."""
    run, headline = trained
    tmp = tmp_path_factory.mktemp("export")

    # Every output, by the command line in a fresh process, into a version directory whose parents do not exist
    # yet (TensorFlow Serving's layout); meanwhile the other two exports run here.
    everything = tmp / "serving" / "headline" / "1"
    fresh = subprocess.Popen([sys.executable, "-m", "mto_tf.export", *MODEL_FLAGS, f"--model_dir={run}",
                              f"--export_dir={everything}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    try:
        main_only = _export(*MODEL_FLAGS, f"--model_dir={run}", "--serve_outputs=main_output",
                            f"--export_dir={tmp / 'main_only'}")
        assert main_only.returncode == 0, main_only.stderr[-3000:]

        # A user's model: list inputs and outputs; `urgent` and `department` served, `tags` left out.
        (tmp / f"{MODULE_NAME}.py").write_text(MODULE_SOURCE)
        with pytest.MonkeyPatch.context() as patch:
            patch.syspath_prepend(str(tmp))
            patch.delitem(sys.modules, MODULE_NAME, raising=False)  # Imported from here, and forgotten afterwards.
            from ticket_model import build
            keras.utils.set_random_seed(7)  # Not mto-export's --seed: the weights must come from --init_weights.
            tickets = build()
            tickets.save_weights(tmp / "tickets.weights.h5")
            user = _export(f"--model={MODULE_NAME}:build", f"--init_weights={tmp / 'tickets.weights.h5'}",
                           "--serve_outputs=urgent,department", f"--export_dir={tmp / 'tickets'}")
        assert user.returncode == 0, user.stderr[-3000:]
    finally:
        stdout, stderr = fresh.communicate(timeout=TIMEOUT_SECONDS)
    assert fresh.returncode == 0, stderr[-3000:]
    assert "Exported headline" in stderr and "Traceback" not in stderr

    headline_examples = write_npz(tmp / "headlines.npz", num_examples=5, seed=3)
    np.savez(tmp / "headline_inputs.npz", main_input=headline_examples["main_input"].astype(np.int32),
             aux_input=headline_examples["aux_input"])
    ticket_examples = write_ticket_npz(tmp / "tickets.npz", seed=4)
    requests = {"main_only": (str(tmp / "main_only"), str(tmp / "headline_inputs.npz")),
                "everything": (str(everything), str(tmp / "headline_inputs.npz")),
                "tickets": (str(tmp / "tickets"), str(tmp / "tickets.npz"))}
    loading = subprocess.run([sys.executable, "-c", LOAD_AND_SERVE, json.dumps(requests)], capture_output=True,
                             text=True, timeout=TIMEOUT_SECONDS, cwd=str(tmp_path_factory.mktemp("elsewhere")),
                             env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert loading.returncode == 0, loading.stderr[-3000:]
    return dict(served=json.loads(loading.stdout), headline=headline, tickets=tickets, main_only=main_only,
                headline_inputs={"main_input": headline_examples["main_input"].astype(np.int32),
                                 "aux_input": headline_examples["aux_input"]},
                ticket_inputs=[ticket_examples["tokens"], ticket_examples["extra"]])


@pytest.mark.slow
def test_the_served_outputs_are_the_trained_models_and_the_signature_names_its_inputs_and_outputs(served):
    predictions = served["headline"](served["headline_inputs"], training=False)
    for name, outputs in (("main_only", ["main_output"]), ("everything", ["aux_output", "main_output"])):
        export = served["served"][name]
        assert export["inputs"] == {"main_input": ["int32", [None, SMALL_MODEL["sequence_length"]]],
                                    "aux_input": ["float32", [None, 5]]}
        assert sorted(export["outputs"]) == outputs
        for output in outputs:
            np.testing.assert_allclose(export["outputs"][output], predictions[output], rtol=RTOL, atol=ATOL)
    assert "main_output" in served["main_only"].stderr and "left out: aux_output/kernel, aux_output/bias" in (
        served["main_only"].stderr)


@pytest.mark.slow
def test_a_users_model_is_served_by_its_input_names_with_only_the_chosen_outputs(served):
    export = served["served"]["tickets"]
    assert export["inputs"] == {"tokens": ["int32", [None, None]], "extra": ["float32", [None, 3]]}
    urgent, _, department = served["tickets"](served["ticket_inputs"], training=False)
    assert sorted(export["outputs"]) == ["department", "urgent"]
    np.testing.assert_allclose(export["outputs"]["urgent"], urgent, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(export["outputs"]["department"], department, rtol=RTOL, atol=ATOL)
    assert not [name for name in export["variables"] if name.startswith("tags/")]


@pytest.mark.slow
def test_serving_only_main_output_leaves_out_every_variable_only_aux_output_uses(served):
    headline = served["headline"]
    main_only = keras.Model(headline.input, headline.output["main_output"])  # The subgraph main_output needs.
    expected = {f"{weight.path}:0": list(weight.shape) for weight in main_only.trainable_weights}
    assert served["served"]["main_only"]["variables"] == expected
    assert "aux_output/kernel:0" not in expected and "main_output/kernel:0" in expected
    # The export of every output holds the auxiliary head: the names are the ones looked for.
    everything = served["served"]["everything"]["variables"]
    assert everything["aux_output/kernel:0"] == list(headline.get_layer("aux_output").kernel.shape)
    assert len(everything) == len(headline.trainable_weights)


def _file_in(directory):
    directory.mkdir()
    (directory / "saved_model.pb").write_text("an earlier export")
    return directory


# Each case: flags beside the model's, given the run's and a scratch directory; the error's start; the export
# directory (it must be left as it was).
BAD_VALUES = {
    "an unknown output": (lambda run, tmp: [f"--model_dir={run}", "--serve_outputs=main_output,aux"],
                          "--serve_outputs: unknown output 'aux'; model 'headline' has outputs ['aux_output', "
                          "'main_output']"),
    "a model_dir without weights": (lambda run, tmp: [f"--model_dir={tmp}"],
                                    "--weights: '{tmp}/model.weights.h5' not found (--weights=final)"),
    "a missing step": (lambda run, tmp: [f"--model_dir={run}", "--weights=step:99"],
                       "--weights: no checkpoint of step 99"),
    "a checkpoint of other sizes": (lambda run, tmp: [f"--model_dir={run}", "--weights=step:2", "--embedding_dim=16"],
                                    "--weights: '{run}/checkpoints/ckpt-2' does not fit model 'headline': "),
    "no weights at all": (lambda run, tmp: [], "--model_dir: give the weights to export"),
    "an export_dir that holds something": (
        lambda run, tmp: [f"--model_dir={run}", f"--export_dir={_file_in(tmp / 'versions' / '1')}"],
        "--export_dir: '{tmp}/versions/1' already holds something; mto-export never overwrites"),
    "a flag of training": (lambda run, tmp: [f"--model_dir={run}", "--optimizer=adam"],
                           "--optimizer: mto-export does not train"),
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_a_bad_value_is_one_line_naming_the_flag_and_writes_nothing(trained, tmp_path, case):
    make_flags, expected = BAD_VALUES[case]
    expected = expected.replace("{tmp}", str(tmp_path)).replace("{run}", str(trained[0]))
    (tmp_path / "versions").mkdir()
    flags = make_flags(trained[0], tmp_path)
    if not any(flag.startswith("--export_dir=") for flag in flags):
        flags.append(f"--export_dir={tmp_path / 'versions' / 'new' / '1'}")
    before = sorted((path, path.read_bytes() if path.is_file() else None) for path in tmp_path.rglob("*"))

    process = _export(*MODEL_FLAGS, *flags)
    assert process.returncode == 2
    assert process.stderr.startswith(f"mto-export: error: {expected}") and process.stderr.count("\n") == 1, (
        process.stderr[-2000:])
    assert sorted((path, path.read_bytes() if path.is_file() else None) for path in tmp_path.rglob("*")) == before


def test_a_failure_while_writing_leaves_neither_the_export_nor_the_directories_made_for_it(trained, tmp_path,
                                                                                          monkeypatch):
    from mto_tf.programs import export

    def write_half_then_fail(self, path, **options):
        with open(os.path.join(path, "saved_model.pb"), "w") as file:
            file.write("half")
        raise OSError("No space left on device")

    monkeypatch.setattr(keras.Model, "export", write_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        export.export_saved_model(trained[1], str(tmp_path / "serving" / "headline" / "1"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # Builds and exports the hundred layers of inception_aux v3: 10 s.
def test_an_inception_export_of_main_output_holds_no_auxiliary_classifier_variable(tmp_path):
    """GoogLeNet's auxiliary classifiers are discarded at inference: their variables, the moving statistics of
    v3's batch normalization included, are not in the SavedModel."""
    import tensorflow as tf

    from mto_tf.core import architectures
    from mto_tf.programs import export

    model = architectures.build_inception_aux(small_config(
        tmp_path, model="inception_aux", inception_variant="v3", inception_filters=2, image_size=6,
        aux_head_units=4, dataset=f"npz:{__file__}"))
    export.export_saved_model(model, str(tmp_path / "export"), outputs=["main_output"])
    kept = {variable.name.removesuffix(":0") for variable in tf.saved_model.load(str(tmp_path / "export")).variables}
    auxiliary = {weight.path for weight in model.weights if weight.path.startswith("aux_")}
    assert auxiliary and not kept & auxiliary
    main_only = keras.Model(model.input, model.output["main_output"])
    assert kept >= {weight.path for weight in main_only.trainable_weights}
