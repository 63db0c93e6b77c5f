"""mto_tf: multi-output Keras models trained with an explicit tf.GradientTape loop, proven equal to model.fit.

    from mto_tf import TrainConfig, train
    result = train(TrainConfig(model_dir="/tmp/run", train_steps=100))

Start reading with `mto_tf/core/step.py` (the train step) and
`mto_tf/run/custom_loop.py` (the loop that drives it); README's "Layout"
shows the layers.
"""

from mto_tf.config import TrainConfig

__all__ = ["LossWeightScheduler", "TrainConfig", "TrainResult", "loss_weight_variables", "train"]


def __getattr__(name: str):
    # `train` imports TensorFlow: on first use, not with `import mto_tf`, so
    # that a program can quiet TensorFlow's start-up before it is imported.
    if name in ("train", "TrainResult"):
        from mto_tf.run import train as train_module
        return getattr(train_module, name)
    if name == "LossWeightScheduler":  # A Keras callback: setting loss weights per epoch.
        from mto_tf.run.loss_weight_scheduler import LossWeightScheduler
        return LossWeightScheduler
    if name == "loss_weight_variables":  # For any callback: the weights it may assign.
        from mto_tf.core.loss_weights import variables_of
        return variables_of
    raise AttributeError(f"module 'mto_tf' has no attribute {name!r}")
