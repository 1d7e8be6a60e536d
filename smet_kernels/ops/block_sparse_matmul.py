"""Triton kernels of a block-sparse linear layer ``y = x Wᵀ`` with ``W [N, K]`` stored as ``values [nnz, b, b]``.

* forward (``bsmm_forward``): one program per (tile of ``BLOCK_M`` tokens, block row ``n`` of W); it walks the
  active blocks of row ``n`` in CSR order: ``y[m, n] = Σ_c x[m, c] · W[n, c]ᵀ``.
* input grad (``bsmm_grad_input``): one program per (token tile, block column ``c``); it walks the active blocks of
  column ``c`` in CSC order over the same values (no transposed copy): ``dx[m, c] = Σ_n dy[m, n] · W[n, c]``.
* weight grad (``bsmm_grad_weight``): one program per (active block ``k``, split of the token axis):
  ``dvalues[k] = Σ_m dy[m, rows(k)]ᵀ · x[m, cols(k)]``; with ``split_k > 1`` fp32 partial sums are reduced after.

All accumulate in fp32 and store in the input dtype. Under the Triton interpreter, bf16 operands are upcast before
``tl.dot`` (the interpreter's bf16 dot is wrong, SPEC §8); fp32 uses IEEE precision (no TF32) to match PyTorch.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..backend import INTERPRET
from ..layout import BlockLayout


def _matmul_configs(block_ms: tuple[int, ...]) -> list[triton.Config]:
    """GPU autotune space; one small config under the interpreter (autotuning there costs minutes)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32}, num_warps=1, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
        for bm in block_ms
        for w in (4, 8)
        for s in (2, 3, 4)
    ]


def _prune_configs(configs, named_args, **kwargs):
    """Drop tiles whose double-buffered operands would not fit in shared memory (fp32, b = 128)."""
    b = kwargs.get("BLOCK_SIZE", named_args.get("BLOCK_SIZE"))
    elem = next(arg for arg in named_args.values() if isinstance(arg, torch.Tensor)).element_size()
    kept = [c for c in configs if (c.kwargs["BLOCK_M"] * b + b * b) * elem * c.num_stages <= 200 * 1024]
    return kept or configs[:1]


@triton.autotune(
    configs=_matmul_configs((64, 128, 256)),
    key=["M", "N", "K", "BLOCK_SIZE"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def _bsmm_forward_kernel(
    x_ptr,
    values_ptr,
    bias_ptr,
    y_ptr,
    row_ptr_ptr,
    row_slots_ptr,
    row_cols_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    block_row = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_b = tl.arange(0, BLOCK_SIZE)
    m_mask = offs_m < M
    start = tl.load(row_ptr_ptr + block_row)
    end = tl.load(row_ptr_ptr + block_row + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_SIZE), dtype=tl.float32)
    for p in range(start, end):
        slot = tl.load(row_slots_ptr + p).to(tl.int64)
        col = tl.load(row_cols_ptr + p)
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + (col * BLOCK_SIZE + offs_b)[None, :],
            mask=m_mask[:, None],
            other=0.0,
        )
        # W block is [out i, in j] row-major; load its transpose [j, i].
        w_t = tl.load(values_ptr + slot * BLOCK_SIZE * BLOCK_SIZE + offs_b[None, :] * BLOCK_SIZE + offs_b[:, None])
        if UPCAST:
            x = x.to(tl.float32)
            w_t = w_t.to(tl.float32)
        acc = tl.dot(x, w_t, acc, input_precision=INPUT_PRECISION)
    offs_n = block_row * BLOCK_SIZE + offs_b
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=m_mask[:, None],
    )


@triton.autotune(
    configs=_matmul_configs((64, 128, 256)),
    key=["M", "N", "K", "BLOCK_SIZE"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def _bsmm_grad_input_kernel(
    dy_ptr,
    values_ptr,
    dx_ptr,
    col_ptr_ptr,
    col_slots_ptr,
    col_rows_ptr,
    M,
    N,
    K,
    stride_dym,
    stride_dxm,
    BLOCK_SIZE: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    block_col = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_b = tl.arange(0, BLOCK_SIZE)
    m_mask = offs_m < M
    start = tl.load(col_ptr_ptr + block_col)
    end = tl.load(col_ptr_ptr + block_col + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_SIZE), dtype=tl.float32)
    for p in range(start, end):
        slot = tl.load(col_slots_ptr + p).to(tl.int64)
        row = tl.load(col_rows_ptr + p)
        dy = tl.load(
            dy_ptr + offs_m[:, None] * stride_dym + (row * BLOCK_SIZE + offs_b)[None, :],
            mask=m_mask[:, None],
            other=0.0,
        )
        w = tl.load(values_ptr + slot * BLOCK_SIZE * BLOCK_SIZE + offs_b[:, None] * BLOCK_SIZE + offs_b[None, :])
        if UPCAST:
            dy = dy.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(dy, w, acc, input_precision=INPUT_PRECISION)
    offs_k = block_col * BLOCK_SIZE + offs_b
    tl.store(
        dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :],
        acc.to(dx_ptr.dtype.element_ty),
        mask=m_mask[:, None],
    )


@triton.autotune(
    configs=_matmul_configs((32, 64, 128)),
    key=["M", "N", "K", "BLOCK_SIZE", "SPLIT_K"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def _bsmm_grad_weight_kernel(
    dy_ptr,
    x_ptr,
    out_ptr,
    block_indices_ptr,
    M,
    N,
    K,
    nnz,
    stride_dym,
    stride_xm,
    BLOCK_SIZE: tl.constexpr,
    SPLIT_K: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    slot = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    block_row = tl.load(block_indices_ptr + 2 * slot)
    block_col = tl.load(block_indices_ptr + 2 * slot + 1)
    offs_b = tl.arange(0, BLOCK_SIZE)
    offs_n = block_row * BLOCK_SIZE + offs_b
    offs_k = block_col * BLOCK_SIZE + offs_b
    tiles = tl.cdiv(M, BLOCK_M)
    tiles_per_split = tl.cdiv(tiles, SPLIT_K)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tiles)
    acc = tl.zeros((BLOCK_SIZE, BLOCK_SIZE), dtype=tl.float32)
    for tile in range(first, last):
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        dy_t = tl.load(dy_ptr + offs_m[None, :] * stride_dym + offs_n[:, None], mask=m_mask[None, :], other=0.0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None], other=0.0)
        if UPCAST:
            dy_t = dy_t.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(dy_t, x, acc, input_precision=INPUT_PRECISION)
    out = out_ptr + (split * nnz + slot) * BLOCK_SIZE * BLOCK_SIZE
    tl.store(out + offs_b[:, None] * BLOCK_SIZE + offs_b[None, :], acc.to(out_ptr.dtype.element_ty))


def _kernel_flags(dtype: torch.dtype) -> dict:
    return {
        "UPCAST": INTERPRET and dtype == torch.bfloat16,
        "INPUT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
    }


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_split_k(m: int, nnz: int, device: torch.device) -> int:
    """Splits of the token axis so that ``nnz * split_k`` programs fill the GPU about twice over."""
    if device.type != "cuda":
        return 1
    programs_wanted = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    max_split = max(1, triton.cdiv(m, 128))
    return max(1, min(max_split, triton.cdiv(programs_wanted, nnz), 16))


def bsmm_forward(
    x: torch.Tensor, values: torch.Tensor, layout: BlockLayout, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``y [M, N] = x [M, K] · Wᵀ (+ bias)``. Inputs are checked by the caller (see ``functional``)."""
    m, k = x.shape
    n = layout.shape[0]
    b = layout.block_size
    index = layout.row_index(x.device)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), n // b)

    _bsmm_forward_kernel[grid](
        x,
        values,
        bias if bias is not None else y,
        y,
        index.ptr,
        index.slots,
        index.minor,
        m,
        n,
        k,
        x.stride(0),
        y.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_SIZE=b,
        **_kernel_flags(x.dtype),
    )
    return y


def bsmm_grad_input(dy: torch.Tensor, values: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """``dx [M, K] = dy [M, N] · W``, walking the active blocks of each block column (CSC)."""
    m, n = dy.shape
    k = layout.shape[1]
    b = layout.block_size
    index = layout.col_index(dy.device)
    dx = torch.empty((m, k), dtype=dy.dtype, device=dy.device)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), k // b)

    _bsmm_grad_input_kernel[grid](
        dy,
        values,
        dx,
        index.ptr,
        index.slots,
        index.minor,
        m,
        n,
        k,
        dy.stride(0),
        dx.stride(0),
        BLOCK_SIZE=b,
        **_kernel_flags(dy.dtype),
    )
    return dx


def bsmm_grad_weight(
    dy: torch.Tensor, x: torch.Tensor, layout: BlockLayout, split_k: int | None = None
) -> torch.Tensor:
    """``dvalues [nnz, b, b]``: ``dvalues[k] = dy[:, rows(k)]ᵀ · x[:, cols(k)]``; never a dense ``[N, K]`` gradient."""
    m, k = x.shape
    n = layout.shape[0]
    b = layout.block_size
    nnz = layout.nnz
    split = split_k if split_k is not None else default_split_k(m, nnz, x.device)
    if isinstance(split, bool) or not isinstance(split, int) or split < 1:
        raise ValueError(f"split_k must be a positive int, got {split_k!r}")
    out_dtype = x.dtype if split == 1 else torch.float32
    out = torch.empty((split, nnz, b, b), dtype=out_dtype, device=x.device)
    _bsmm_grad_weight_kernel[(nnz, split)](
        dy,
        x,
        out,
        layout.block_indices_on(x.device),
        m,
        n,
        k,
        nnz,
        dy.stride(0),
        x.stride(0),
        BLOCK_SIZE=b,
        SPLIT_K=split,
        **_kernel_flags(x.dtype),
    )
    if split == 1:
        return out[0]
    return out.sum(0).to(x.dtype)

