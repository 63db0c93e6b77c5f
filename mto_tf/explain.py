"""`python -m mto_tf.explain`: mto-explain (`mto_tf/programs/explain.py`)."""

from mto_tf.programs import entry_points

if __name__ == "__main__":
    entry_points.mto_explain()
