"""One text encoder, two datasets: reviews labelled by sentiment, news labelled by topic.

    python docs/examples/two_datasets.py [WORK_DIR]

Prepares both datasets itself (in WORK_DIR, default a new temporary
directory), then trains the same two-output model on them twice: jointly
(each step a batch of each, one update of the weighted sum) and by sampled
turns (each step one dataset, drawn in proportion to its size). Nothing is
downloaded.

Each dataset labels one output only: no review has a topic, no news item a
sentiment. One token marks a review's sentiment; a topic's news items use
their topic's block of words.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import keras
import numpy as np

from mto_tf import TrainConfig, train

VOCAB, LENGTH, TOPICS = 200, 12, 4


def build() -> keras.Model:
    """The shared encoder (embedding, average) and one head per task."""
    text = keras.Input(shape=(LENGTH,), dtype="int32", name="text")
    encoded = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(VOCAB, 16)(text))
    hidden = keras.layers.Dense(32, activation="relu", name="shared")(encoded)
    return keras.Model({"text": text}, {
        "sentiment": keras.layers.Dense(1, activation="sigmoid", name="sentiment")(hidden),
        "topic": keras.layers.Dense(TOPICS, activation="softmax", name="topic")(hidden),
    })


def prepare(directory: Path, *, seed: int = 0) -> dict[str, Path]:
    """Writes reviews.npz (text, sentiment), news.npz (text, topic) and a validation file of each."""
    rng = np.random.default_rng(seed)

    def reviews(count):
        sentiment = rng.integers(0, 2, count)
        text = rng.integers(TOPICS * 40, VOCAB, (count, LENGTH))  # Words of no topic ...
        text[:, 0] = 1 + sentiment  # ... and the token saying the sentiment.
        return {"text": text, "sentiment": sentiment.astype(np.float32)}

    def news(count):
        topic = rng.integers(0, TOPICS, count)
        text = topic[:, None] * 40 + rng.integers(3, 40, (count, LENGTH))  # The topic's block of words.
        return {"text": text, "topic": topic}

    files = {}
    for name, make, count in (("reviews", reviews, 600), ("news", news, 1000)):
        for split, size in (("", count), ("_val", count // 5)):
            files[name + split] = directory / f"{name}{split}.npz"
            np.savez(files[name + split], **make(size))
    return files


def main(work_dir: Path, *, train_steps: int = 300) -> dict[str, dict]:
    work_dir.mkdir(parents=True, exist_ok=True)
    files = prepare(work_dir)
    common = dict(
        model=build, train_steps=train_steps, log_every=50, optimizer="adam", learning_rate=0.01,
        losses={"sentiment": "binary_crossentropy", "topic": "sparse_categorical_crossentropy"},
        metrics={"sentiment": ("binary_accuracy",), "topic": ("accuracy",)},
        datasets={"sentiment": f"npz:{files['reviews']}", "topic": f"npz:{files['news']}"},
        batch_size={"sentiment": 16, "topic": 32}, shuffle_buffer=1000,
        validation_data={"sentiment": f"npz:{files['reviews_val']}", "topic": f"npz:{files['news_val']}"})
    finals = {}
    for mixing in ("joint", "proportional"):
        result = train(TrainConfig(model_dir=str(work_dir / mixing), task_mixing=mixing, **common))
        finals[mixing] = result.history[-1]
        print(f"{mixing}: " + ", ".join(f"{name} {value:.3f}" for name, value in finals[mixing].items()
                                        if name.startswith("val_")))
    return finals


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="two_datasets_")))
