"""`mto-train` (and `python -m mto_tf`): flags in, one training run out.

    mto-train --model_dir=/tmp/run                       # one device
    mto-train --strategy=mirrored --num_cpu_devices=2 \\
              --model_dir=/tmp/run_mirrored              # 2 replicas on one CPU
    mto-train --loop=fit --model_dir=/tmp/run_fit        # the same through model.fit
    mto-train --flagfile=run.flags                       # flags from a file

A bad setting ends the run before anything is built or written, with one
line naming the flag and exit status 2; `runner.py` has every exit status,
`entry_points.py` how the program starts.
"""

from __future__ import annotations

import logging

from mto_tf.config import TrainConfig
from mto_tf.core.strategy import make_strategy
from mto_tf.run.train import train

logger = logging.getLogger(__name__)


def train_main(config: TrainConfig) -> None:
    """`mto-train`: one training run of the config the flags gave (`flags.config_from_flags`)."""
    # The strategy first: the CPU must be split into devices before
    # TensorFlow runs its first op.
    strategy = make_strategy(config)
    data = (", ".join(f"{task} from {source}" for task, source in config.describe()["datasets"].items())
            + f" ({config.mixing.describe()})" if config.datasets else config.dataset)
    logger.info("Training %s on %s with %s, %d replica(s), %s loop, into %s", config.model, data,
                config.strategy, strategy.num_replicas_in_sync, config.loop, config.model_dir)
    train(config, strategy=strategy)
