"""`python -m mto_tf.input_service`: a tf.data service for `--input_service` (`mto_tf/programs/input_service.py`)."""

from mto_tf.programs import entry_points

if __name__ == "__main__":
    entry_points.input_service()
