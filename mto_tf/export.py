"""`python -m mto_tf.export`: mto-export (`mto_tf/programs/export.py`)."""

from mto_tf.programs import entry_points

if __name__ == "__main__":
    entry_points.mto_export()
