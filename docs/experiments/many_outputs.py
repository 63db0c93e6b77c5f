"""The cost of a gradient method's step with many outputs (16, 40): `python -m mto_tf.bench` on a K-head model.

    python docs/experiments/many_outputs.py --outputs=16,40 --output_dir=docs/figures

An attribute-style model (as CelebA's 40 attributes): 128 input features,
a shared trunk of two ReLU layers (256, 128 units), one sigmoid head per
output, binary cross-entropy each, weight 1; batch 64, RMSprop. Its data
(random features, labels from a fixed random linear function of them) is
written as an npz, its builder as a module; the benchmark then times
`weighting:fixed` and each method side by side, one process each, taking
turns window by window (see `mto_tf/programs/bench.py`). Writes
`many_outputs_<K>.json` (the benchmark's report) for each K.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

FEATURES, EXAMPLES = 128, 4096
MODULE = '''
import keras


def build():
    features = keras.Input((FEATURES,), name="features")
    trunk = keras.layers.Dense(256, activation="relu", name="trunk_0")(features)
    trunk = keras.layers.Dense(128, activation="relu", name="trunk_1")(trunk)
    return keras.Model(features, {f"attribute_{k:02d}": keras.layers.Dense(1, activation="sigmoid",
                                                                             name=f"attribute_{k:02d}")(trunk)
                                  for k in range(OUTPUTS)}, name="attributes")
'''


def write_model_and_data(directory: str, outputs: int, seed: int) -> list[str]:
    """`attributes.py` and `attributes.npz` in `directory`; returns the output names."""
    names = [f"attribute_{k:02d}" for k in range(outputs)]
    with open(os.path.join(directory, "attributes.py"), "w") as module:
        module.write(f"FEATURES, OUTPUTS = {FEATURES}, {outputs}\n" + MODULE)
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(EXAMPLES, FEATURES)).astype(np.float32)
    logits = features @ rng.normal(size=(FEATURES, outputs)) / np.sqrt(FEATURES)
    np.savez(os.path.join(directory, "attributes.npz"), features=features,
             **{name: (logits[:, [k]] > 0).astype(np.float32) for k, name in enumerate(names)})
    return names


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", default="16,40", help="Values of K, comma-separated.")
    parser.add_argument("--methods", default="mgda,cagrad,upgrad")
    parser.add_argument("--windows", type=int, default=6)
    parser.add_argument("--window_steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="docs/figures")
    arguments = parser.parse_args()
    output_dir = os.path.abspath(arguments.output_dir)
    os.makedirs(output_dir, exist_ok=True)
    for outputs in (int(value) for value in arguments.outputs.split(",")):
        with tempfile.TemporaryDirectory() as directory:
            names = write_model_and_data(directory, outputs, arguments.seed)
            report = os.path.join(output_dir, f"many_outputs_{outputs}.json")
            variants = ",".join(f"weighting:{method}" for method in ["fixed", *arguments.methods.split(",")])
            subprocess.run([sys.executable, "-m", "mto_tf.bench", "--model=attributes:build",
                            "--dataset=npz:attributes.npz", "--batch_size=64", "--optimizer=rmsprop",
                            f"--losses={json.dumps({name: 'binary_crossentropy' for name in names})}",
                            "--steps_per_loop=10", f"--window_steps={arguments.window_steps}",
                            f"--windows={arguments.windows}", f"--variants={variants}", f"--output_json={report}"],
                           cwd=directory, check=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


if __name__ == "__main__":
    main()
