"""docs/examples/two_datasets.py runs as documented: it prepares its two datasets and trains on both, both ways."""

import math

import pytest

from helpers import docs_script


@pytest.mark.slow  # Two runs of 60 steps; the inner loop has the features' own tests.
def test_the_two_datasets_example_learns_each_task_from_its_own_dataset_jointly_and_by_turns(tmp_path):
    example = docs_script("examples/two_datasets.py")

    finals = example.main(tmp_path, train_steps=60)

    for mixing, record in finals.items():
        # Below chance on each task's own validation file: each head learned from the dataset that labels it
        # (chance: ln 2 for the sentiment, ln 4 for one of 4 topics).
        assert record["val_sentiment_loss"] < math.log(2) and record["val_topic_loss"] < math.log(4), mixing
        # val_loss weighs each task's validation loss by its loss weight (1.0 each): float32 rounding apart.
        assert math.isclose(record["val_loss"], record["val_sentiment_loss"] + record["val_topic_loss"],
                            rel_tol=1e-6), mixing
    assert "steps/sentiment" in finals["proportional"] and "steps/sentiment" not in finals["joint"]
