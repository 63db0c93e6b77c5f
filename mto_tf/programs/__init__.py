"""The programs: `mto-train`, `mto-explain`, the sweep and the benchmark, their flags (derived from
`TrainConfig`), how each reports errors and exits, and where each starts (`entry_points.py`)."""
