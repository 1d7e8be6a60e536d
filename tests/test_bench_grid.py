"""The full-size benchmark grid (enumerated, not run), timing quantiles and the smet result check."""

import pytest
import torch

from bench import kernels, optimizer, training
from bench.results import KERNEL_KEY, TRAINING_KEY, _canonical
from bench.timing import measure


def _key(row, columns):
    return tuple(_canonical(row.get(c)) for c in columns)


def test_full_kernel_grid():
    shapes = kernels.linear_shapes(kernels.FULL_CONFIGS)
    assert len(shapes) == 18
    assert {(s.N, s.K) for s in shapes} >= {(11008, 4096), (4096, 11008), (5504, 2048), (2816, 1024), (1408, 512)}
    assert all(s.N % 128 == 0 and s.K % 128 == 0 for s in shapes)
    cases = list(
        kernels.kernel_cases(
            kernels.FULL_CONFIGS,
            kernels.FULL_DENSITIES,
            kernels.FULL_BLOCK_SIZES,
            kernels.FULL_TOKENS,
            torch.bfloat16,
        )
    )
    per_point = len(kernels.OPS) * (1 + len(kernels.FULL_BLOCK_SIZES) * len(kernels.FULL_DENSITIES) * 3)
    assert len(cases) == len(shapes) * len(kernels.FULL_TOKENS) * per_point
    keys = {_key(c.key_row("triton"), KERNEL_KEY) for c in cases}
    assert len(keys) == len(cases)  # resume relies on distinct keys


def test_full_optimizer_and_training_grids():
    opt_cases = list(optimizer.optimizer_cases(kernels.FULL_CONFIGS, kernels.FULL_DENSITIES, kernels.FULL_BLOCK_SIZES))
    assert len({_key(c.key_row("triton"), KERNEL_KEY) for c in opt_cases}) == len(opt_cases)
    assert {c.provider for c in opt_cases} == {"device_copy", "smet", "torch_adamw_fused", "torch_adamw_foreach"}
    train_cases = list(
        training.training_cases(
            training.FULL_CONFIGS, training.METHODS, training.FULL_DENSITIES, 64, 16, 256, torch.bfloat16
        )
    )
    assert len(train_cases) == len(training.FULL_CONFIGS) * (2 + 2 * len(training.FULL_DENSITIES))
    assert len({_key(c.key_row("triton"), TRAINING_KEY) for c in train_cases}) == len(train_cases)


def test_unknown_grid_entries_raise():
    with pytest.raises(ValueError, match="configs"):
        kernels.linear_shapes(["70b"])
    with pytest.raises(ValueError, match="providers"):
        list(kernels.kernel_cases(["tiny"], [0.5], [32], [64], torch.float32, providers=["cutlass"]))
    with pytest.raises(ValueError, match="methods"):
        list(training.training_cases(["tiny"], ["sgd"], [0.5], 32, 2, 32, torch.float32))


def test_cpu_timing_quantiles():
    calls = []
    timing = measure(lambda: calls.append(1), "cpu", warmup=2, min_repeats=5, max_repeats=5, budget_s=0.0)
    assert len(calls) == 7
    assert 0 <= timing.ms_p20 <= timing.ms_p50 <= timing.ms_p80
    with pytest.raises(ValueError, match="min_repeats"):
        measure(lambda: None, "cpu", min_repeats=0)


def test_smet_result_check_flags_wrong_results():
    shape = kernels.LinearShape("tiny:gate_up", 128, 64)
    case = kernels.KernelCase("forward", "smet", shape, 64, 32, 0.5, torch.float32)
    operands = kernels.make_operands(case, torch.device("cpu"))
    right = kernels.case_function(case, operands, "reference")()
    assert kernels.check_smet_result(case, operands, right) == ""
    assert "relative error" in kernels.check_smet_result(case, operands, right + 1.0)
