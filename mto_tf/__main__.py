"""`python -m mto_tf` is `mto-train`."""

from mto_tf.programs import entry_points

if __name__ == "__main__":
    entry_points.mto_train()
