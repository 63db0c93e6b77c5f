"""The launch scripts that cannot run here fail clearly or at least parse."""

import subprocess
from pathlib import Path

import pytest

LAUNCH = Path(__file__).parents[1] / "launch"


@pytest.mark.slow
def test_multi_gpu_script_without_gpus_stops_with_the_cpu_alternative():
    process = subprocess.run(["bash", str(LAUNCH / "multi_gpu.sh"), "--model_dir=/nonexistent/never"],
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == 2
    assert "no GPU visible to TensorFlow" in process.stderr and "--num_cpu_devices=2" in process.stderr


@pytest.mark.parametrize("script", ["multi_gpu.sh", "slurm.sbatch"])
def test_shell_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(LAUNCH / script)]).returncode == 0
