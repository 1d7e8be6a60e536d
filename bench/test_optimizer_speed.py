"""Optimizer-step timings under pytest-benchmark: SMET AdamW vs torch AdamW (fused, foreach), and a device copy."""

import pytest

from bench.conftest import DEVICE, FULL_SIZE
from bench.kernels import LinearShape
from bench.optimizer import OptimizerCase, step_function

SHAPE = LinearShape("7b:gate_up", 11008, 4096) if FULL_SIZE else LinearShape("tiny:gate_up", 128, 64)
BLOCK_SIZE = 128 if FULL_SIZE else 32
DENSITIES = (0.5, 0.25, 0.1) if FULL_SIZE else (0.5,)


def test_device_copy(timed):
    fn, numel, moved = step_function(OptimizerCase("copy", "device_copy", "dense", SHAPE, None, 1.0), DEVICE, 0)
    timed(fn, bytes_moved=moved, elements=numel)


@pytest.mark.parametrize("provider", ["torch_adamw_fused", "torch_adamw_foreach"])
def test_adamw_dense(timed, provider):
    fn, numel, moved = step_function(OptimizerCase("adamw", provider, "dense", SHAPE, None, 1.0), DEVICE, 0)
    timed(fn, bytes_moved=moved, elements=numel)


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("provider", ["smet_adamw", "torch_adamw_fused", "torch_adamw_foreach"])
def test_adamw_compact(timed, provider, density):
    case = OptimizerCase("adamw", provider, "compact", SHAPE, BLOCK_SIZE, density)
    fn, numel, moved = step_function(case, DEVICE, 0)
    timed(fn, bytes_moved=moved, elements=numel, block_size=BLOCK_SIZE, density=density)
