"""The pytest-benchmark suites under ``bench/`` (``pytest bench --benchmark-only`` on a GPU): they are not in the
test command's folder, so this runs them here with ``--benchmark-disable`` at their CPU size, where every case still
checks its result before it would be timed (kernels against the dense computation, optimizer steps against their
reference step, training steps against a dense copy)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITES = ("test_kernel_speed.py", "test_optimizer_speed.py", "test_training_speed.py")


def test_every_benchmark_suite_collects_and_its_checks_pass_at_the_cpu_size():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-m", "pytest", "bench", "--benchmark-disable", "-v", "-p",
                             "no:cacheprovider"], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    passed = [line for line in result.stdout.splitlines() if " PASSED" in line]
    for suite in SUITES:
        assert any(line.startswith(f"bench/{suite}::") for line in passed), (suite, result.stdout[-3000:])
