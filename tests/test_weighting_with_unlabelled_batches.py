"""Every adaptive method trains through a batch where an output has no labelled example.

The method-level mathematics (the present outputs weighted as the method
weighs them alone, on the reduced Gramian) is tested in
`test_weighting_absent_outputs.py`. Here a whole run: the linear two-output
model of `test_loss_weighting.py`, two batches per pass, and `second`
unlabelled (sample weight 0) on every example of the second batch. On
those steps `second_loss` is 0, `loss_weight/second` is logged as 0, nothing
is NaN, and a run resumed right after such a step ends bit for bit as the
uninterrupted one (the methods' state kept through the step it skipped).
"""

import math

import numpy as np
import pytest

from test_loss_weighting import ADAPTIVE, N, OUTPUTS, _config, _data, _trained

UNLABELLED_STEPS = (2, 4)  # Steps on the second batch: no example of `second` labelled.
INNER_LOOP = ("upgrad",)  # A gradient method; CI runs every method.


def _partly_labelled_data():
    data = _data()
    # Batches of N / 2: the first labelled for both outputs, the second for `first` only.
    data["sample_weight/second"] = np.repeat([1.0, 0.0], N // 2).astype(np.float32)
    return data


def _run(tmp_path, name, train_steps, **overrides):
    settings = dict(data=_partly_labelled_data(), batch_size=N // 2, train_steps=train_steps, log_every=1,
                    checkpoint_every=2, optimizer="adam", learning_rate=0.01, **overrides)
    return _trained(_config(tmp_path, name, **settings))


@pytest.mark.parametrize("name", [pytest.param(name, marks=() if name in INNER_LOOP else pytest.mark.slow)
                                  for name in ADAPTIVE])
def test_a_method_skips_an_unlabelled_output_and_resumes_across_it_bit_for_bit(tmp_path, name):
    whole, history = _run(tmp_path / "whole", name, train_steps=4)
    assert [record["step"] for record in history] == [1, 2, 3, 4]
    for record in history:
        assert all(math.isfinite(value) for value in record.values() if isinstance(value, float)), record
        unlabelled = record["step"] in UNLABELLED_STEPS
        assert (record["second_loss"] == 0.0) == unlabelled, record
        assert (record["loss_weight/second"] == 0.0) == unlabelled, record
        assert record["loss_weight/first"] > 0.0, record
    for layer, kernel in whole.items():
        assert np.all(np.isfinite(kernel)), layer

    # Stopped right after the first unlabelled step, resumed through the second.
    _run(tmp_path / "split", name, train_steps=2)
    resumed, resumed_history = _run(tmp_path / "split", name, train_steps=4)
    for layer in whole:
        np.testing.assert_array_equal(resumed[layer], whole[layer], err_msg=layer)
    assert [record[f"loss_weight/{output}"] for record in resumed_history[-2:] for output in OUTPUTS] == \
           [record[f"loss_weight/{output}"] for record in history[-2:] for output in OUTPUTS]
