"""Kernel timings under pytest-benchmark: the SPEC §7 anchor shapes at b = 128 on a GPU, a tiny shape on CPU; each
result is checked once against the fp32 dense computation (:func:`bench.kernels.check_result`) before it is timed."""

import pytest
import torch

from bench.conftest import DEVICE, FULL_SIZE
from bench.kernels import (
    LIBRARY_PROVIDERS,
    OPS,
    KernelCase,
    KernelUnavailable,
    LinearShape,
    case_function,
    check_result,
    make_operands,
    useful_flops,
)
from smet_kernels.backend import resolve_backend

if FULL_SIZE:
    SHAPES = [  # SPEC §7: M×K×N = 8192×4096×4096, 8192×4096×11008, 16384×1024×4096
        LinearShape("7b:qkvo", 4096, 4096),
        LinearShape("7b:gate_up", 11008, 4096),
        LinearShape("spec7:1024to4096", 4096, 1024),
    ]
    TOKENS = {"7b:qkvo": 8192, "7b:gate_up": 8192, "spec7:1024to4096": 16384}
    DENSITIES, BLOCK_SIZE, DTYPE = (0.5, 0.25, 0.1), 128, torch.bfloat16
else:
    SHAPES = [LinearShape("tiny:gate_up", 128, 64)]
    TOKENS = {"tiny:gate_up": 64}
    DENSITIES, BLOCK_SIZE, DTYPE = (0.5,), 32, torch.float32

BACKEND = resolve_backend(DEVICE)
LIBRARY = LIBRARY_PROVIDERS[BACKEND][0]  # triton_grouped, or torch_reference without Triton


def _case(op, provider, shape, density):
    block_size = None if provider == "cublas_dense" else BLOCK_SIZE
    return KernelCase(op, provider, shape, TOKENS[shape.label], block_size, density, DTYPE)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s.label}-{s.N}x{s.K}")
@pytest.mark.parametrize("op", OPS)
def test_dense(timed, shape, op):
    case = _case(op, "cublas_dense", shape, 1.0)
    operands = make_operands(case, DEVICE)
    fn = case_function(case, operands, BACKEND)
    assert check_result(case, operands, fn()) == ""
    timed(fn, flops=useful_flops(case, operands), M=case.M, K=shape.K, N=shape.N)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s.label}-{s.N}x{s.K}")
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("provider", [LIBRARY, "masked_dense", "torch_bsr"])
@pytest.mark.parametrize("op", OPS)
def test_sparse(timed, shape, density, provider, op):
    case = _case(op, provider, shape, density)
    operands = make_operands(case, DEVICE)
    try:
        fn = case_function(case, operands, BACKEND)
    except KernelUnavailable as reason:
        pytest.skip(str(reason))
    assert check_result(case, operands, fn()) == ""
    timed(
        fn,
        flops=useful_flops(case, operands),
        M=case.M,
        K=shape.K,
        N=shape.N,
        block_size=BLOCK_SIZE,
        density=operands.layout.density,
        backend=BACKEND if provider == LIBRARY else "torch",
    )
