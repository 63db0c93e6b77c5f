"""`python -m mto_tf.sweep`: the loss-weight sweep (`mto_tf/programs/sweep.py`)."""

from mto_tf.programs import entry_points

if __name__ == "__main__":
    entry_points.sweep()
