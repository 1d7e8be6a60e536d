"""User-facing functional API: ``block_sparse_linear``, ``to_dense``, ``from_dense``.

``block_sparse_linear(x, values, layout, bias)`` computes ``y = x Wᵀ + bias`` with ``W = to_dense(values, layout)``
and back-propagates to ``x`` (``dx = dy W``), ``values`` (``dvalues[k] = dy[:, rows(k)]ᵀ x[:, cols(k)]``, active blocks
only) and ``bias`` (``Σ_m dy``). It checks its arguments, applies autocast and resolves the backend
(:mod:`smet_kernels.backend`) and kernel variant, then calls the custom op ``torch.ops.smet.bsmm_forward``
(:mod:`smet_kernels.ops.library`), so ``torch.compile(model, fullgraph=True)`` traces through it.
"""

from __future__ import annotations

import torch

from .backend import get_backend, resolve_backend
from .layout import BlockLayout
from .ops import library
from .ops.variant import default_variant
from .reference.matmul import from_dense_reference, to_dense_reference

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REFERENCE_DTYPES = TRITON_DTYPES + (torch.float64,)


def _check_layout(layout: BlockLayout) -> None:
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")


def _check_floating(tensor: torch.Tensor, name: str) -> None:
    if tensor.dtype not in REFERENCE_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp16, bf16, fp32, fp64), got {tensor.dtype}")


def _check_values(values: torch.Tensor, layout: BlockLayout, name: str = "values") -> None:
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(values).__name__}")
    b = layout.block_size
    if tuple(values.shape) != (layout.nnz, b, b):
        raise ValueError(f"{name} must have shape [nnz, b, b] = {(layout.nnz, b, b)}, got {tuple(values.shape)}")
    _check_floating(values, name)


def check_input(x: torch.Tensor, in_features: int) -> None:
    """``x`` is a floating tensor ``[..., in_features]`` (``TypeError``/``ValueError`` naming ``x`` otherwise)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must have shape [..., {in_features}] (in_features of the layout), got {tuple(x.shape)}")
    _check_floating(x, "x")


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (traceable by ``torch.compile``)."""
    return _autocast_available(device_type) and torch.is_autocast_enabled(device_type)


@torch.compiler.assume_constant_result
def _autocast_available(device_type: str) -> bool:
    """Whether ``device_type`` has autocast at all (``meta`` has none): a constant that ``torch.compile`` evaluates
    once while tracing (Dynamo of torch 2.11 cannot trace ``torch.amp.is_autocast_available``)."""
    return torch.amp.is_autocast_available(device_type)


def _select_backend(x: torch.Tensor, backend: str | None) -> str:
    """The backend for ``x``: ``auto`` runs fp64 through the reference; ``triton``, asked for by argument or set
    globally (:func:`smet_kernels.backend.set_backend`, ``SMET_BACKEND``), refuses it."""
    name = resolve_backend(x.device, backend)
    if name == "triton" and x.dtype not in TRITON_DTYPES:
        if (backend if backend is not None else get_backend()) == "triton":
            raise TypeError(f"x of dtype {x.dtype} is not supported by the triton backend (fp16, bf16, fp32)")
        return "reference"
    return name


def block_sparse_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    layout: BlockLayout,
    bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``y = x Wᵀ + bias`` for ``x [..., in_features]`` and block-sparse ``W [out_features, in_features]``.

    ``values [nnz, b, b]`` holds block ``layout.block_indices[k]`` in slot ``k``. Under autocast the operands but fp64
    ones are cast to the autocast dtype, as for ``F.linear`` (gradients flow back to the original dtypes).
    ``torch.compile`` traces through it (a custom op, no graph break); the Triton backward is not differentiable again
    (double backward raises). ``torch.vmap`` maps over it; ``torch.func.grad`` and ``jvp`` do not apply (its autograd
    is registered with ``torch.library``, which they refuse): take gradients with ``torch.autograd``.
    """
    _check_layout(layout)
    out_features, in_features = layout.shape
    check_input(x, in_features)
    _check_values(values, layout)
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must have shape [{out_features}], got {tuple(bias.shape)}")
    if autocast_enabled(x.device.type):  # fp64 operands stay fp64, as autocast leaves them for F.linear
        dtype = torch.get_autocast_dtype(x.device.type)
        x, values, bias = (t if t is None or t.dtype == torch.float64 else t.to(dtype) for t in (x, values, bias))
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
    name = _select_backend(x, backend)
    variant = default_variant(x.device) if name == "triton" else "grouped"
    index = layout.kernel_index(x.device)
    version = layout.version_tensor
    y = library.bsmm_forward(
        x2d, values, bias, index, version, library.layout_version(version), out_features, name, variant
    )
    return y if x.dim() == 2 else y.reshape(*lead_shape, out_features)  # no view of the output for 2-D inputs


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
    _check_floating(weight, "weight")
    return from_dense_reference(weight, layout)
