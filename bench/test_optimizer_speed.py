"""Optimizer-step timings under pytest-benchmark: SMET AdamW vs torch AdamW (fused, foreach), and a device copy;
each step is checked once against its reference (:func:`bench.optimizer.check_step`) before it is timed."""

import pytest

from bench.conftest import DEVICE, FULL_SIZE
from smet_kernels.train.model import LinearShape
from bench.optimizer import OptimizerCase, check_step, step_function
from smet_kernels.backend import resolve_backend

BACKEND = resolve_backend(DEVICE)

SHAPE = LinearShape("7b:gate_up", 11008, 4096) if FULL_SIZE else LinearShape("tiny:gate_up", 128, 64)
BLOCK_SIZE = 128 if FULL_SIZE else 32
DENSITIES = (0.5, 0.25, 0.1) if FULL_SIZE else (0.5,)


def test_device_copy(timed):
    case = OptimizerCase("copy", "device_copy", "dense", SHAPE, None, 1.0)
    assert check_step(case, DEVICE, 0) == ""
    fn, numel, moved = step_function(case, DEVICE, 0)
    timed(fn, bytes_moved=moved, elements=numel)


@pytest.mark.parametrize("provider", ["torch_adamw_fused", "torch_adamw_foreach"])
def test_adamw_dense(timed, provider):
    case = OptimizerCase("adamw", provider, "dense", SHAPE, None, 1.0)
    assert check_step(case, DEVICE, 0) == ""
    fn, numel, moved = step_function(case, DEVICE, 0)
    timed(fn, bytes_moved=moved, elements=numel)


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("provider", ["smet_adamw", "torch_adamw_fused", "torch_adamw_foreach"])
def test_adamw_compact(timed, provider, density):
    case = OptimizerCase("adamw", provider, "compact", SHAPE, BLOCK_SIZE, density)
    assert check_step(case, DEVICE, 0, BACKEND) == ""
    fn, numel, moved = step_function(case, DEVICE, 0, BACKEND)
    timed(fn, bytes_moved=moved, elements=numel, block_size=BLOCK_SIZE, density=density)
