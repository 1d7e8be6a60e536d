"""Triton kernels of a block-sparse linear layer ``y = x Wᵀ`` with ``W [N, K]`` stored as ``values [nnz, b, b]``.

* forward (``bsmm_forward``): one program per (tile of ``BLOCK_M`` tokens, block row ``n`` of W), scheduled in
  groups of ``GROUP_M`` token tiles for L2 reuse; it walks the active blocks of row ``n`` in CSR order:
  ``y[m, n] = Σ_c x[m, c] · W[n, c]ᵀ``.
* input grad (``bsmm_grad_input``): one program per (token tile, block column ``c``); it walks the active blocks of
  column ``c`` in CSC order over the same values (no transposed copy): ``dx[m, c] = Σ_n dy[m, n] · W[n, c]``.
* weight grad (``bsmm_grad_weight``): one program per (active block ``k``, split of the token axis):
  ``dvalues[k] = Σ_m dy[m, rows(k)]ᵀ · x[m, cols(k)]``; with ``split_k > 1`` fp32 partial sums are reduced after.

Forward and input grad come in three variants of the same tile computation (``variant=``; A/B-timed by the kernel
benchmarks, ``bench/KERNEL_NOTES.md``): ``grouped``, ``persistent`` (one program per SM slot, longest block rows
first) and ``tma`` (grouped, tiles moved by Hopper TMA descriptors); the weight grad has a ``tma`` variant too.
Which one runs without ``variant=``, and when ``tma`` runs as ``grouped`` (an older GPU, a traced call), is decided
in :mod:`.variant`; an explicit ``tma`` is refused on a GPU older than sm_90. An operand a TMA descriptor cannot read
(misaligned base or row stride) is copied first. The TMA autotune configs need a ``pre_hook``, which ``wrap_triton``
cannot trace. Eager calls launch the kernels directly; only a traced call goes through ``wrap_triton``
(:func:`.variant.tracing`).

Launchers ``triton_<op>`` (dispatched by :mod:`.library`); kernels ``bsmm_dense_sparse_kernel`` (forward and input
grad: the same product over the CSR or the CSC index), its ``_persistent`` and ``_tma`` variants,
``bsmm_grad_weight_kernel`` and ``bsmm_grad_weight_tma_kernel``. Autotune spaces, pruning rules and program counts:
:mod:`.launch_config`.

All accumulate in fp32 and store in the input dtype. Under the Triton interpreter, bf16 operands are upcast before
``tl.dot`` (the interpreter's bf16 dot is wrong, SPEC §8); fp32 uses IEEE precision (no TF32) to match PyTorch.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.tools.tensor_descriptor import TensorDescriptor

from ..backend import INTERPRET
from ..layout import BlockIndex
from ..reference.matmul import guard_or_false
from .launch_config import (
    DENSE_SPARSE_BLOCK_MS,
    GRAD_WEIGHT_BLOCK_MS,
    GROUP_M,
    default_split_k,
    matmul_configs,
    persistent_programs,
    precision_flags,
    prune_configs,
    prune_grad_weight_configs,
    prune_persistent_configs,
    with_pre_hook,
)
from .rounding import downcast
from .variant import VARIANTS, default_variant, tma_supported, tracing, traceable_variant

#: the block-index pointers: views at any int32 offset of a layer's packed kernel index (``unpack_kernel_index``), read
#: by scalar loads; a binary specialised on their 16-byte alignment would compile again for each offset's parity
INDEX_POINTERS = ["index_ptr_ptr", "index_slots_ptr", "index_minor_ptr", "order_ptr"]


@triton.jit
def _grouped_tile(tile, M, OUT_COLS, BLOCK_SIZE: tl.constexpr, GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr):
    """Tile number → (token tile, output-block rank): groups of ``GROUP_M`` token tiles × every output block, token
    tiles fastest inside a group, so that a group's input tiles stay in L2 while all output blocks read them."""
    programs_per_group = GROUP_M * (OUT_COLS // BLOCK_SIZE)
    first_m = (tile // programs_per_group) * GROUP_M
    group_m = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    return first_m + (tile % programs_per_group) % group_m, (tile % programs_per_group) // group_m


@triton.jit
def _dense_sparse_tile(
    a_ptr,
    values_ptr,
    bias_ptr,
    out_ptr,
    index_ptr_ptr,
    index_slots_ptr,
    index_minor_ptr,
    M,
    stride_am,
    stride_om,
    pid_m,
    out_block,
    HAS_BIAS: tl.constexpr,
    TRANSPOSE_BLOCKS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """One output tile: ``out[m, j] = Σ_p a[m, minor(p)] · B_p (+ bias[j])`` over the active blocks ``p`` of output
    block ``j``, for the ``BLOCK_M`` tokens of tile ``pid_m``."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    token_rows = offs_m.to(tl.int64)  # row offsets reach M * stride, past int32 for long token batches
    offs_b = tl.arange(0, BLOCK_SIZE)
    m_mask = offs_m < M
    start = tl.load(index_ptr_ptr + out_block)
    end = tl.load(index_ptr_ptr + out_block + 1)
    if TRANSPOSE_BLOCKS:
        block_offsets = offs_b[None, :] * BLOCK_SIZE + offs_b[:, None]
    else:
        block_offsets = offs_b[:, None] * BLOCK_SIZE + offs_b[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_SIZE), dtype=tl.float32)
    for p in range(start, end):
        slot = tl.load(index_slots_ptr + p).to(tl.int64)
        minor = tl.load(index_minor_ptr + p)
        a = tl.load(
            a_ptr + token_rows[:, None] * stride_am + (minor * BLOCK_SIZE + offs_b)[None, :],
            mask=m_mask[:, None],
            other=0.0,
        )
        block = tl.load(values_ptr + slot * BLOCK_SIZE * BLOCK_SIZE + block_offsets)
        if UPCAST:
            a = a.to(tl.float32)
            block = block.to(tl.float32)
        acc = tl.dot(a, block, acc, input_precision=INPUT_PRECISION)
    offs_out = out_block * BLOCK_SIZE + offs_b
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_out).to(tl.float32)[None, :]
    tl.store(
        out_ptr + token_rows[:, None] * stride_om + offs_out[None, :],
        downcast(acc, out_ptr.dtype.element_ty),
        mask=m_mask[:, None],
    )


@triton.autotune(
    configs=matmul_configs(DENSE_SPARSE_BLOCK_MS),
    key=["M", "IN_COLS", "OUT_COLS", "BLOCK_SIZE", "TRANSPOSE_BLOCKS"],
    prune_configs_by={"early_config_prune": prune_configs},
)
@triton.jit(do_not_specialize_on_alignment=INDEX_POINTERS)
def bsmm_dense_sparse_kernel(
    a_ptr,
    values_ptr,
    bias_ptr,
    out_ptr,
    index_ptr_ptr,
    index_slots_ptr,
    index_minor_ptr,
    M,
    IN_COLS,
    OUT_COLS,
    stride_am,
    stride_om,
    HAS_BIAS: tl.constexpr,
    TRANSPOSE_BLOCKS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """``out = a · B`` over the block index, one program per output tile (:func:`_dense_sparse_tile`).

    Forward: ``a = x``, CSR index of W (``j`` = block row), ``B_p = W_pᵀ``. Input grad: ``a = dy``, CSC index of W
    (``j`` = block column), ``B_p = W_p``. Programs run in groups of ``GROUP_M`` token tiles × every output block,
    so that a group's ``a`` tiles stay in L2 while all output blocks read them.
    """
    pid_m, out_block = _grouped_tile(tl.program_id(0), M, OUT_COLS, BLOCK_SIZE, GROUP_M, BLOCK_M)
    _dense_sparse_tile(
        a_ptr, values_ptr, bias_ptr, out_ptr, index_ptr_ptr, index_slots_ptr, index_minor_ptr, M, stride_am,
        stride_om, pid_m, out_block, HAS_BIAS, TRANSPOSE_BLOCKS, BLOCK_SIZE, UPCAST, INPUT_PRECISION, BLOCK_M,
    )


@triton.autotune(
    configs=matmul_configs(DENSE_SPARSE_BLOCK_MS),
    key=["M", "IN_COLS", "OUT_COLS", "BLOCK_SIZE", "TRANSPOSE_BLOCKS"],
    prune_configs_by={"early_config_prune": prune_persistent_configs},
)
@triton.jit(do_not_specialize_on_alignment=INDEX_POINTERS)
def bsmm_dense_sparse_persistent_kernel(
    a_ptr,
    values_ptr,
    bias_ptr,
    out_ptr,
    index_ptr_ptr,
    index_slots_ptr,
    index_minor_ptr,
    order_ptr,
    M,
    IN_COLS,
    OUT_COLS,
    stride_am,
    stride_om,
    HAS_BIAS: tl.constexpr,
    TRANSPOSE_BLOCKS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Persistent, nnz-balanced variant of :func:`bsmm_dense_sparse_kernel`: a fixed number of programs (about the
    number that fit on the GPU at once) stride over the output tiles. Tiles are numbered as in the grouped kernel,
    but inside a group the output blocks run longest first (``order``: output blocks by active-block count,
    descending), so each program's successive tiles pair long rows with short ones and the last tiles of the grid are
    the cheapest. (Triton 3.9 neither flattens this loop nest, ``tl.range(flatten=True)``, nor warp-specialises it on
    sm_90: a tile's epilogue does not overlap the next tile's loads; ``bench/KERNEL_NOTES.md``.)
    """
    tiles = tl.cdiv(M, BLOCK_M) * (OUT_COLS // BLOCK_SIZE)
    for tile in tl.range(tl.program_id(0), tiles, tl.num_programs(0)):
        pid_m, rank = _grouped_tile(tile, M, OUT_COLS, BLOCK_SIZE, GROUP_M, BLOCK_M)
        out_block = tl.load(order_ptr + rank)
        _dense_sparse_tile(
            a_ptr, values_ptr, bias_ptr, out_ptr, index_ptr_ptr, index_slots_ptr, index_minor_ptr, M, stride_am,
            stride_om, pid_m, out_block, HAS_BIAS, TRANSPOSE_BLOCKS, BLOCK_SIZE, UPCAST, INPUT_PRECISION, BLOCK_M,
        )


def _tma_block_shapes(nargs: dict) -> None:
    """Autotune pre-hook: the token-tile descriptors' block shape follows the config's ``BLOCK_M``."""
    nargs["a_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_SIZE"]]
    nargs["out_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_SIZE"]]


@triton.autotune(
    configs=with_pre_hook(matmul_configs(DENSE_SPARSE_BLOCK_MS), _tma_block_shapes),
    key=["M", "IN_COLS", "OUT_COLS", "BLOCK_SIZE", "TRANSPOSE_BLOCKS"],
    prune_configs_by={"early_config_prune": prune_configs},
)
@triton.jit(do_not_specialize_on_alignment=INDEX_POINTERS)
def bsmm_dense_sparse_tma_kernel(
    a_desc,
    values_desc,
    bias_ptr,
    out_desc,
    index_ptr_ptr,
    index_slots_ptr,
    index_minor_ptr,
    M,
    IN_COLS,
    OUT_COLS,
    HAS_BIAS: tl.constexpr,
    TRANSPOSE_BLOCKS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """:func:`bsmm_dense_sparse_kernel` (same grouped program order and arithmetic) with every tile moved by the
    Hopper Tensor Memory Accelerator: ``a [M, IN_COLS]`` and ``out [M, OUT_COLS]`` in ``[BLOCK_M, b]`` boxes, the
    values as ``[nnz·b, b]`` in ``[b, b]`` boxes. The copy engine computes the addresses and zero-fills / clips the
    token tail, so the loop holds no pointer tensors. (Targets without TMA get equivalent pointer loads.)
    """
    pid_m, out_block = _grouped_tile(tl.program_id(0), M, OUT_COLS, BLOCK_SIZE, GROUP_M, BLOCK_M)
    start = tl.load(index_ptr_ptr + out_block)
    end = tl.load(index_ptr_ptr + out_block + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_SIZE), dtype=tl.float32)
    for p in range(start, end):
        slot = tl.load(index_slots_ptr + p)
        minor = tl.load(index_minor_ptr + p)
        a = a_desc.load([pid_m * BLOCK_M, minor * BLOCK_SIZE])
        block = values_desc.load([slot * BLOCK_SIZE, 0])
        if TRANSPOSE_BLOCKS:
            block = tl.trans(block)
        if UPCAST:
            a = a.to(tl.float32)
            block = block.to(tl.float32)
        acc = tl.dot(a, block, acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + out_block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)).to(tl.float32)[None, :]
    out_desc.store([pid_m * BLOCK_M, out_block * BLOCK_SIZE], downcast(acc, out_desc.dtype))


@triton.autotune(
    configs=matmul_configs(GRAD_WEIGHT_BLOCK_MS),
    key=["M", "N", "K", "BLOCK_SIZE", "SPLIT_K"],
    prune_configs_by={"early_config_prune": prune_grad_weight_configs},
)
@triton.jit(do_not_specialize=["nnz"])  # nnz only counts whole b×b blocks: one binary for any layer, not two
def bsmm_grad_weight_kernel(
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
        token_rows = offs_m.to(tl.int64)
        m_mask = offs_m < M
        dy_t = tl.load(dy_ptr + token_rows[None, :] * stride_dym + offs_n[:, None], mask=m_mask[None, :], other=0.0)
        x = tl.load(x_ptr + token_rows[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None], other=0.0)
        if UPCAST:
            dy_t = dy_t.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(dy_t, x, acc, input_precision=INPUT_PRECISION)
    out = out_ptr + (split * nnz + slot) * BLOCK_SIZE * BLOCK_SIZE
    tl.store(out + offs_b[:, None] * BLOCK_SIZE + offs_b[None, :], downcast(acc, out_ptr.dtype.element_ty))


def _tma_token_block_shapes(nargs: dict) -> None:
    """Autotune pre-hook of the TMA weight grad: ``dy`` and ``x`` boxes of ``BLOCK_M`` tokens × ``b`` features."""
    nargs["dy_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_SIZE"]]
    nargs["x_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_SIZE"]]


@triton.autotune(
    configs=with_pre_hook(matmul_configs(GRAD_WEIGHT_BLOCK_MS), _tma_token_block_shapes),
    key=["M", "N", "K", "BLOCK_SIZE", "SPLIT_K"],
    prune_configs_by={"early_config_prune": prune_grad_weight_configs},
)
@triton.jit(do_not_specialize=["nnz"])  # nnz only counts whole b×b blocks: one binary for any layer, not two
def bsmm_grad_weight_tma_kernel(
    dy_desc,
    x_desc,
    out_desc,
    block_indices_ptr,
    M,
    N,
    K,
    nnz,
    BLOCK_SIZE: tl.constexpr,
    SPLIT_K: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """:func:`bsmm_grad_weight_kernel` with the ``dy`` / ``x`` token tiles and the ``b × b`` result moved by TMA
    (``out`` viewed as ``[SPLIT_K · nnz · b, b]``); the copy engine zero-fills the token tail."""
    slot = tl.program_id(0)
    split = tl.program_id(1)
    block_row = tl.load(block_indices_ptr + 2 * slot)
    block_col = tl.load(block_indices_ptr + 2 * slot + 1)
    tiles = tl.cdiv(M, BLOCK_M)
    tiles_per_split = tl.cdiv(tiles, SPLIT_K)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tiles)
    acc = tl.zeros((BLOCK_SIZE, BLOCK_SIZE), dtype=tl.float32)
    for tile in range(first, last):
        dy_t = tl.trans(dy_desc.load([tile * BLOCK_M, block_row * BLOCK_SIZE]))
        x = x_desc.load([tile * BLOCK_M, block_col * BLOCK_SIZE])
        if UPCAST:
            dy_t = dy_t.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(dy_t, x, acc, input_precision=INPUT_PRECISION)
    out_desc.store([(split * nnz + slot) * BLOCK_SIZE, 0], downcast(acc, out_desc.dtype))


def _device_guard(device: torch.device):
    """Triton launches on the current CUDA device: make it the operands' device (``cuda:1`` while ``cuda:0`` is set)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check_tma_device(device: torch.device) -> None:
    if not tma_supported(device):
        raise ValueError("variant='tma' needs a GPU with the Tensor Memory Accelerator (sm_90 or newer)")


def _tma_operand(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or a copy of it where TMA could not read it: a descriptor needs a 16-byte aligned base and row
    stride and unit stride along the last dimension (a fresh allocation is: 512-byte aligned on CUDA, 64 on a CPU)."""
    aligned = tensor.data_ptr() % 16 == 0 and tensor.stride(0) * tensor.element_size() % 16 == 0
    return tensor if aligned and tensor.stride(-1) == 1 else tensor.clone(memory_format=torch.contiguous_format)


def _check_row_major(**tensors: torch.Tensor) -> None:
    for name, tensor in tensors.items():
        if tensor.dim() != 2 or tensor.stride(1) != 1:
            raise ValueError(f"{name} must be a 2-D tensor with unit stride along its last dimension")


def _check_same_dtype(first: str, a: torch.Tensor, second: str, b: torch.Tensor) -> None:
    """``tl.dot`` takes operands of one dtype: a mix is a ``TypeError`` naming both, not a Triton compile error."""
    if a.dtype != b.dtype:
        raise TypeError(f"{second} has dtype {b.dtype} but {first} has dtype {a.dtype}")


def _launchable(kernel, traced: bool):
    """``wrap_triton(kernel)`` (the higher-order op Inductor sees) while traced, else the kernel itself. Called
    eagerly outside a ``triton_op`` (kernel tests, benchmarks), ``wrap_triton`` would route every launch through that
    op's dispatch (torch 2.11: about 1 ms a launch; an autotune ``pre_hook`` is refused). Interpreted kernels are never
    wrapped: their ops are opaque (``custom_op``), and torch 2.11 cannot wrap them."""
    return wrap_triton(kernel) if traced and not INTERPRET else kernel


def _dense_sparse(
    a: torch.Tensor,
    values: torch.Tensor,
    index,
    out_cols: int,
    block_size: int,
    transpose_blocks: bool,
    bias: torch.Tensor | None,
    group_m: int | None,
    variant: str | None,
) -> torch.Tensor:
    if group_m is None:
        group_m = GROUP_M
    elif isinstance(group_m, bool) or not isinstance(group_m, int) or group_m < 1:
        raise ValueError(f"group_m must be a positive int, got {group_m!r}")
    if variant is None:
        variant = default_variant(a.device)
    elif variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    traced = tracing(a, values)
    variant = traceable_variant(variant, a, values)
    if variant == "tma" and values.shape[0] == 0:  # no active block: no values descriptor (0 rows are refused)
        variant = "grouped"
    values = values.contiguous()  # blocks and bias are read by offsets: a strided tensor is copied first
    m, in_cols = a.shape
    out = torch.empty((m, out_cols), dtype=a.dtype, device=a.device)
    # no token tile: launch nothing (a grid of zero programs is an error on some drivers); a token count known only
    # at run time (x[mask] under torch.compile) cannot be tested while tracing: launched, Triton's launcher skips
    # an empty grid
    if guard_or_false(m == 0):
        return out
    out_blocks = out_cols // block_size
    constexprs = dict(
        HAS_BIAS=bias is not None,
        TRANSPOSE_BLOCKS=transpose_blocks,
        BLOCK_SIZE=block_size,
        GROUP_M=group_m,
        **precision_flags(a.dtype),
    )
    index_args = (index.ptr, index.slots, index.minor)
    bias_arg = bias.contiguous() if bias is not None else out

    def tile_grid(meta):  # one program per (token tile, output block)
        return (triton.cdiv(m, meta["BLOCK_M"]) * out_blocks,)

    with _device_guard(a.device):
        if variant == "grouped":
            _launchable(bsmm_dense_sparse_kernel, traced)[tile_grid](
                a, values, bias_arg, out, *index_args, m, in_cols, out_cols, a.stride(0), out.stride(0), **constexprs
            )
        elif variant == "persistent":

            def grid(meta):
                tiles = triton.cdiv(m, meta["BLOCK_M"]) * out_blocks
                return (persistent_programs(tiles, meta["BLOCK_M"], block_size, a),)

            _launchable(bsmm_dense_sparse_persistent_kernel, traced)[grid](
                a, values, bias_arg, out, *index_args, index.by_count, m, in_cols, out_cols, a.stride(0),
                out.stride(0), **constexprs
            )
        else:
            _check_tma_device(a.device)
            block = [block_size, block_size]  # the token-tile boxes are set per config by _tma_block_shapes
            bsmm_dense_sparse_tma_kernel[tile_grid](
                TensorDescriptor.from_tensor(_tma_operand(a), block),
                TensorDescriptor.from_tensor(_tma_operand(values.reshape(-1, block_size)), block),
                bias_arg,
                TensorDescriptor.from_tensor(out, block),
                *index_args,
                m,
                in_cols,
                out_cols,
                **constexprs,
            )
    return out


def triton_bsmm_forward(
    x: torch.Tensor,
    values: torch.Tensor,
    row_index: BlockIndex,
    out_features: int,
    bias: torch.Tensor | None = None,
    group_m: int | None = None,
    variant: str | None = None,
) -> torch.Tensor:
    """``y [M, N] = x [M, K] · Wᵀ (+ bias)``, walking the active blocks of each block row (CSR ``row_index``).

    ``group_m``: token tiles per L2 group of the program order (default ``GROUP_M``; at least the number of token
    tiles gives the plain token-tile-fastest order). ``variant``: ``"grouped"`` (one program per output tile),
    ``"persistent"`` (about one program per SM slot, longest block rows first in each group) or ``"tma"`` (grouped,
    tiles moved by TMA descriptors, sm_90+; an operand it cannot read, misaligned, is copied first); None:
    :func:`default_variant`. Shapes are checked by the caller (``functional``); ``values`` of another dtype than ``x``
    is refused.
    """
    _check_row_major(x=x)
    _check_same_dtype("x", x, "values", values)
    return _dense_sparse(x, values, row_index, out_features, values.shape[-1], True, bias, group_m, variant)


def triton_bsmm_grad_input(
    dy: torch.Tensor,
    values: torch.Tensor,
    col_index: BlockIndex,
    in_features: int,
    group_m: int | None = None,
    variant: str | None = None,
) -> torch.Tensor:
    """``dx [M, K] = dy [M, N] · W``, walking the active blocks of each block column (CSC ``col_index``) over the
    same values (``group_m`` and ``variant`` as in :func:`triton_bsmm_forward`)."""
    _check_row_major(dy=dy)
    _check_same_dtype("dy", dy, "values", values)
    return _dense_sparse(dy, values, col_index, in_features, values.shape[-1], False, None, group_m, variant)


def triton_bsmm_grad_weight(
    dy: torch.Tensor,
    x: torch.Tensor,
    block_indices: torch.Tensor,
    block_size: int,
    split_k: int | None = None,
    variant: str | None = None,
) -> torch.Tensor:
    """``dvalues [nnz, b, b]``: ``dvalues[k] = dy[:, rows(k)]ᵀ · x[:, cols(k)]`` with ``(rows(k), cols(k))`` row
    ``k`` of the int32 ``block_indices [nnz, 2]``; never a dense ``[N, K]`` gradient.

    ``variant="tma"`` moves the token tiles by TMA descriptors (sm_90+); the other variants (and None, see
    :func:`default_variant`) run the pointer kernel: program order does not apply to this grid of blocks.
    """
    _check_row_major(dy=dy, x=x)
    _check_same_dtype("x", x, "dy", dy)
    block_indices = block_indices.contiguous()  # read by offsets: a strided tensor is copied first
    if variant is None:
        variant = default_variant(x.device)
    elif variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    traced = tracing(dy, x)
    variant = traceable_variant(variant, dy, x)
    m, k = x.shape
    n = dy.shape[1]
    b = block_size
    nnz = block_indices.shape[0]
    if split_k is None:
        split = int(default_split_k(m, nnz, x.device))  # a SymInt when m is dynamic: the grid needs a plain int
    elif isinstance(split_k, bool) or not isinstance(split_k, int) or split_k < 1:
        raise ValueError(f"split_k must be a positive int, got {split_k!r}")
    else:
        split = split_k
    # no token or no block: zero gradients, no launch (a 0-row TMA descriptor is refused); a run-time token count:
    # launched (a split past the last token tile stores zeros)
    if guard_or_false(m == 0) or nnz == 0:
        return torch.zeros((nnz, b, b), dtype=x.dtype, device=x.device)
    out_dtype = x.dtype if split == 1 else torch.float32
    out = torch.empty((split, nnz, b, b), dtype=out_dtype, device=x.device)
    constexprs = dict(BLOCK_SIZE=b, SPLIT_K=split, **precision_flags(x.dtype))
    with _device_guard(x.device):
        if variant == "tma":
            _check_tma_device(x.device)
            block = [b, b]  # the token boxes are set per config by _tma_token_block_shapes
            bsmm_grad_weight_tma_kernel[(nnz, split)](
                TensorDescriptor.from_tensor(_tma_operand(dy), block),
                TensorDescriptor.from_tensor(_tma_operand(x), block),
                TensorDescriptor.from_tensor(out.view(-1, b), block),
                block_indices, m, n, k, nnz, **constexprs,
            )  # fmt: skip
        else:
            _launchable(bsmm_grad_weight_kernel, traced)[(nnz, split)](
                dy, x, out, block_indices, m, n, k, nnz, dy.stride(0), x.stride(0), **constexprs
            )
    if split == 1:
        return out[0]
    return out.sum(0).to(x.dtype)
