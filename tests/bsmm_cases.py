"""The block-sparse product tests' shared cases (tests/test_bsmm.py: the kernels, tests/test_block_sparse_linear.py:
the layer over them): layouts with empty, single and full block rows, operands in any dtype, the tolerance of each
dtype, and whether the GPU here has the Tensor Memory Accelerator (sm_90+; the CPU interpreter runs the TMA kernels)."""

import torch

from conftest import DEVICE
from smet_kernels import BlockLayout

ON_GPU = DEVICE == "cuda"
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
HAS_TMA = not ON_GPU or torch.cuda.get_device_capability() >= (9, 0)


def _mask_layout(kind: str, rows: int, cols: int, block_size: int) -> BlockLayout:
    g = torch.Generator().manual_seed(rows * 31 + cols)
    if kind == "random":
        return BlockLayout.random(rows * block_size, cols * block_size, block_size, 0.4, generator=g)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    if kind == "dense":
        mask[:] = True
    elif kind == "single":
        mask[rows - 1, 0] = True
    elif kind == "empty_rows_cols":  # block row 0 and block column 1 empty, one full row
        mask = torch.rand(rows, cols, generator=g) < 0.5
        mask[0, :] = False
        mask[:, 1] = False
        mask[rows - 1, :] = True
        mask[rows - 1, 1] = False
    return BlockLayout.from_mask(mask, block_size)


def _inputs(layout, m, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, k = layout.shape
    b = layout.block_size
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    values = (torch.randn(layout.nnz, b, b, generator=g) / k**0.5).to(DEVICE, dtype)
    dy = torch.randn(m, n, generator=g).to(DEVICE, dtype)
    bias = torch.randn(n, generator=g).to(DEVICE, dtype)
    return x, values, dy, bias


def _close(actual, expected, dtype):
    atol, rtol = TOL[dtype]
    scale = expected.float().abs().max().clamp_min(1.0)
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol * scale.item(), rtol=rtol)
