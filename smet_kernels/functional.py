"""User-facing functional API: ``block_sparse_linear``, ``to_dense``, ``from_dense``.

``block_sparse_linear(x, values, layout, bias)`` computes ``y = x Wᵀ + bias`` with ``W = to_dense(values, layout)``
and back-propagates to ``x`` (``dx = dy W``), ``values`` (``dvalues[k] = dy[:, rows(k)]ᵀ x[:, cols(k)]``, active blocks
only) and ``bias`` (``Σ_m dy``). It runs the Triton kernels or the PyTorch reference (see :mod:`smet_kernels.backend`).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .backend import resolve_backend
from .layout import BlockLayout
from .reference.matmul import (
    bsmm_forward_reference,
    bsmm_grad_input_reference,
    bsmm_grad_weight_reference,
    from_dense_reference,
    to_dense_reference,
)

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REFERENCE_DTYPES = TRITON_DTYPES + (torch.float64,)


def _check_layout(layout: BlockLayout) -> None:
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")


def _check_values(values: torch.Tensor, layout: BlockLayout, name: str = "values") -> None:
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(values).__name__}")
    b = layout.block_size
    if tuple(values.shape) != (layout.nnz, b, b):
        raise ValueError(f"{name} must have shape [nnz, b, b] = {(layout.nnz, b, b)}, got {tuple(values.shape)}")
    if values.dtype not in REFERENCE_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp16, bf16, fp32, fp64), got {values.dtype}")


def _select_backend(x: torch.Tensor, backend: str | None) -> str:
    name = resolve_backend(x.device, backend)
    if name == "triton" and x.dtype not in TRITON_DTYPES:
        if backend == "triton":
            raise TypeError(f"x of dtype {x.dtype} is not supported by the triton backend (fp16, bf16, fp32)")
        return "reference"
    return name


class BlockSparseLinearFunction(torch.autograd.Function):
    """Autograd of ``y = x Wᵀ + bias`` over 2-D ``x [M, K]`` with a compact block-sparse ``W``."""

    @staticmethod
    def forward(ctx, x, values, bias, layout, backend):
        ctx.layout = layout
        ctx.layout_version = layout.version
        ctx.backend = backend
        ctx.has_bias = bias is not None
        # dx needs only values and dvalues only x: a frozen layer (or a constant input) keeps no extra activation
        ctx.save_for_backward(
            x if ctx.needs_input_grad[1] else None, values if ctx.needs_input_grad[0] else None
        )
        if backend == "triton":
            from .ops.block_sparse_matmul import bsmm_forward

            return bsmm_forward(x, values, layout, bias)
        return bsmm_forward_reference(x, values, layout, bias)

    @staticmethod
    def backward(ctx, dy):
        if ctx.layout.version != ctx.layout_version:
            raise RuntimeError(
                "the layout of a block-sparse layer changed between forward and backward; "
                "perform topology updates only after optimizer.step()"
            )
        if ctx.backend == "triton":
            return _backward_triton(ctx, dy)
        return _backward(ctx, dy, bsmm_grad_input_reference, bsmm_grad_weight_reference)


def _backward(ctx, dy, grad_input, grad_weight):
    """``dx = dy W``, ``dvalues`` at the active blocks, ``dbias = Σ_m dy`` (each only when needed)."""
    x, values = ctx.saved_tensors
    # an empty dy may keep the zero strides of an expanded gradient (y.sum() of no tokens): make it row-major
    dy = dy.contiguous() if dy.numel() else torch.zeros(dy.shape, dtype=dy.dtype, device=dy.device)
    dx = dvalues = dbias = None
    if ctx.needs_input_grad[0]:
        dx = grad_input(dy, values, ctx.layout)
    if ctx.needs_input_grad[1]:
        dvalues = grad_weight(dy, x, ctx.layout)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        dbias = dy.sum(0, dtype=torch.float64 if dy.dtype == torch.float64 else torch.float32).to(dy.dtype)
    return dx, dvalues, dbias, None, None


@once_differentiable
def _backward_triton(ctx, dy):
    """The Triton backward; its kernels are not differentiable, so double backward raises (use the reference)."""
    from .ops.block_sparse_matmul import bsmm_grad_input, bsmm_grad_weight

    return _backward(ctx, dy, bsmm_grad_input, bsmm_grad_weight)


def block_sparse_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    layout: BlockLayout,
    bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``y = x Wᵀ + bias`` for ``x [..., in_features]`` and block-sparse ``W [out_features, in_features]``.

    ``values [nnz, b, b]`` holds block ``layout.block_indices[k]`` in slot ``k``. Under autocast the operands are cast
    to the autocast dtype (gradients flow back to the original dtypes). Under ``torch.compile`` the op runs eagerly
    (a graph break); the Triton backward is not differentiable again (double backward raises).
    """
    _check_layout(layout)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    _check_values(values, layout)
    out_features, in_features = layout.shape
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must have shape [..., {in_features}] (in_features of the layout), got {tuple(x.shape)}")
    if x.dtype not in REFERENCE_DTYPES:
        raise TypeError(f"x must be a floating tensor (fp16, bf16, fp32, fp64), got {x.dtype}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must have shape [{out_features}], got {tuple(bias.shape)}")
    if _has_autocast(x) and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, values = x.to(dtype), values.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    for name, tensor in (("values", values), ("bias", bias)):
        if tensor is None:
            continue
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}")
        if tensor.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {tensor.dtype} but x has dtype {x.dtype}")
    lead_shape = x.shape[:-1]
    x2d = x.reshape(-1, in_features).contiguous()
    values = values.contiguous()
    bias = bias.contiguous() if bias is not None else None
    y = _apply_block_sparse_linear(x2d, values, bias, layout, _select_backend(x, backend))
    return y if x.dim() == 2 else y.reshape(*lead_shape, out_features)  # no view of the output for 2-D inputs


@torch.compiler.disable
def _apply_block_sparse_linear(x, values, bias, layout, backend):
    """Runs eagerly under ``torch.compile`` (a graph break): the layout's cached index structures and the Triton
    launch stay outside the traced graph."""
    if not _has_autocast(x):
        return BlockSparseLinearFunction.apply(x, values, bias, layout, backend)
    with torch.autocast(x.device.type, enabled=False):
        return BlockSparseLinearFunction.apply(x, values, bias, layout, backend)


def _has_autocast(x: torch.Tensor) -> bool:
    """Whether autocast exists on ``x``'s device (not on ``meta``, where memory is traced without allocating)."""
    return torch.amp.is_autocast_available(x.device.type)


def to_dense(values: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Dense ``[out_features, in_features]`` weight of ``values`` (zeros at inactive blocks); differentiable."""
    _check_layout(layout)
    _check_values(values, layout)
    return to_dense_reference(values, layout)


def from_dense(weight: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Compact ``[nnz, b, b]`` values of the active blocks of a dense ``[out_features, in_features]`` weight."""
    _check_layout(layout)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if tuple(weight.shape) != tuple(layout.shape):
        raise ValueError(f"weight must have the layout's shape {tuple(layout.shape)}, got {tuple(weight.shape)}")
    return from_dense_reference(weight, layout)
