"""`python -m mto_tf.evaluate`: mto-evaluate (`mto_tf/programs/evaluate.py`)."""

from mto_tf.programs import entry_points

if __name__ == "__main__":
    entry_points.mto_evaluate()
