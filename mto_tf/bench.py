"""`python -m mto_tf.bench`: the benchmark (`mto_tf/programs/bench.py`)."""

from mto_tf.programs import entry_points

if __name__ == "__main__":
    entry_points.bench()
