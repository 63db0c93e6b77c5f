"""A run stopped and resumed in a new process ends where an uninterrupted run ends."""

import dataclasses
import json
import os
import signal

import numpy as np
import pytest
import tensorflow as tf

from helpers import SMALL_FLAGS, data_dir, run_cli, small_config
from mto_tf import train
from mto_tf.core.models import build_headline
from mto_tf.errors import ConfigError

pytestmark = pytest.mark.slow


def test_n_steps_then_n_more_in_a_new_process_equals_2n_steps(tmp_path):
    # Adam (slots and step count must come back) and a shuffle buffer (the
    # data stream must continue where it stopped, not restart).
    settings = dict(optimizer="adam", learning_rate=0.01, shuffle_buffer=50, seed=3,
                    log_every=3, checkpoint_every=3, steps_per_loop=2)
    uninterrupted = train(small_config(tmp_path, train_steps=12, model_dir=str(tmp_path / "whole"), **settings))

    resumed_dir = tmp_path / "resumed"
    first_half = train(small_config(tmp_path, train_steps=6, model_dir=str(resumed_dir), **settings))
    assert [record["step"] for record in first_half.history] == [3, 6]
    process = run_cli(*SMALL_FLAGS, f"--data_dir={data_dir()}", f"--model_dir={resumed_dir}",
                      "--train_steps=12", "--optimizer=adam", "--learning_rate=0.01", "--shuffle_buffer=50",
                      "--seed=3", "--log_every=3", "--checkpoint_every=3", "--steps_per_loop=2",
                      "--loop=custom")
    assert process.returncode == 0, process.stderr[-3000:]

    resumed = build_headline(small_config(tmp_path))
    resumed.load_weights(resumed_dir / "model.weights.h5")
    # Same ops on the same data in the same order, checkpoint restored
    # exactly: bit for bit.
    for whole, split in zip(uninterrupted.model.get_weights(), resumed.get_weights(), strict=True):
        np.testing.assert_array_equal(whole, split)
    # No step lost or repeated, and the same numbers logged for every window.
    records = [json.loads(line) for line in (resumed_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [3, 6, 9, 12]
    for whole, split in zip(uninterrupted.history, records, strict=True):
        assert whole["loss"] == split["loss"] and whole["aux_output_loss"] == split["aux_output_loss"]


def test_model_dir_of_another_run_is_refused_before_anything_is_written(tmp_path):
    config = small_config(tmp_path, train_steps=2)
    train(config)
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    with pytest.raises(ConfigError, match=r"^--model_dir: .* holds a run with --l2=0.0, not 0.5"):
        train(dataclasses.replace(config, l2=0.5, train_steps=4))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before

    (tmp_path / "stranger").mkdir()
    (tmp_path / "stranger" / "notes.txt").write_text("not a run")
    with pytest.raises(ConfigError, match=r"^--model_dir: .* is not empty and holds no mto_tf run"):
        train(dataclasses.replace(config, model_dir=str(tmp_path / "stranger")))


def test_records_past_the_checkpoint_resumed_from_are_dropped(tmp_path):
    from mto_tf.run.model_dir import MetricsLog
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": step, "loss": 1.0}) + "\n"
                                                    for step in (10, 20, 30)))
    MetricsLog(str(tmp_path), write_files=True, resume_step=20)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [10, 20]
    # A run that died before its first checkpoint starts again from step 0.
    MetricsLog(str(tmp_path), write_files=True, resume_step=0)
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    # Other workers never touch the file.
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 10}) + "\n")
    MetricsLog(str(tmp_path), write_files=False, resume_step=0)
    assert (tmp_path / "metrics.jsonl").read_text() == json.dumps({"step": 10}) + "\n"


def test_sigterm_in_one_process_stops_after_the_loop_with_a_checkpoint(tmp_path, monkeypatch):
    # One process asks no other worker: the signal alone stops it, after
    # the loop that is running, with that loop's steps logged and saved.
    from mto_tf.core import step
    from mto_tf.errors import Preempted

    make_train_loop = step.make_train_loop

    def loop_that_gets_sigterm_during_its_second_call(*args, **kwargs):
        train_loop, calls = make_train_loop(*args, **kwargs), []

        def signalled_loop(iterator, num_steps):
            calls.append(num_steps)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return train_loop(iterator, num_steps)

        return signalled_loop

    monkeypatch.setattr(step, "make_train_loop", loop_that_gets_sigterm_during_its_second_call)
    handler_before = signal.getsignal(signal.SIGTERM)
    config = small_config(tmp_path, train_steps=20, steps_per_loop=2, log_every=10, checkpoint_every=10)
    with pytest.raises(Preempted, match="after step 4"):
        train(config)
    assert signal.getsignal(signal.SIGTERM) == handler_before  # Handed back.
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [4]
    assert tf.train.latest_checkpoint(str(tmp_path / "run" / "checkpoints")).endswith("ckpt-4")
