"""`python -m mto_tf` is `mto-train`."""

from mto_tf.cli import run_main

if __name__ == "__main__":
    run_main()
