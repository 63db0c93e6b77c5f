"""mto_tf: multi-output Keras models trained with an explicit tf.GradientTape loop, proven equal to model.fit.

Start with `mto_tf/step.py` (the train step) and `mto_tf/trainer.py` (the loop driver).
"""
