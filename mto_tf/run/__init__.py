"""The run driver: set-up (`setup.py`), the custom loop and `--loop=fit` on one window-end skeleton
(`driver.py`), evaluation, the model directory's files, progress, preemption, the best value; `train`."""
