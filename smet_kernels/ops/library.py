"""The three block-sparse products of a linear layer as ``torch.library`` custom ops: the one place that dispatches
between the Triton kernels (``triton_<op>``, :mod:`.block_sparse_matmul`) and the PyTorch reference
(``torch_<op>``, :mod:`smet_kernels.reference.matmul`).

With ``W = to_dense(values, layout)`` ``[N, K]``, ``x [M, K]`` and ``dy [M, N]``:

* ``torch.ops.smet.bsmm_forward``      ``y = x Wᵀ (+ bias)``
* ``torch.ops.smet.bsmm_grad_input``   ``dx = dy W``
* ``torch.ops.smet.bsmm_grad_weight``  ``dvalues[k] = dy[:, rows(k)]ᵀ x[:, cols(k)]`` (active blocks only)

Each is a :func:`torch.library.triton_op`, so ``torch.compile`` traces a model through it without a graph break and
Inductor sees the Triton kernels (``wrap_triton``); a fake implementation gives output shapes (``meta`` / fake
tensors). Under the Triton CPU interpreter (``TRITON_INTERPRET=1``) the kernels are plain Python, not traceable, so
the ops are opaque :func:`torch.library.custom_op` instead (same schema, fake and autograd). The ops take tensors, not a ``BlockLayout``: ``index`` is the layout's packed int32 kernel index
(:meth:`BlockLayout.kernel_index`), ``version`` its ``version_tensor``; both are rewritten in place by a topology
update, so a compiled graph keeps the same inputs (no recompile). ``backend`` (``"triton"`` | ``"reference"``) and
``variant`` (``SMET_MATMUL_VARIANT``) are string arguments resolved by the caller (:func:`block_sparse_linear`):
a change of either is a new constant in the graph (a recompile), not a hidden global read inside the op.

Autograd (``register_autograd``) is closed over the three ops: each product is bilinear, so the derivative of each is
another of them; through the reference the backward is differentiable again (double backward), through Triton it is
once-differentiable (differentiating it again raises). The backward ops check that the layout version equals the one
saved at forward (a topology update between forward and backward is an error, not a gradient for blocks that moved);
the check reads the version tensor when the op runs: eagerly, and under ``torch.compile`` with backends that keep the
op opaque (``aot_eager``); where Inductor lowers the op body into its own kernels the check is compiled out.

AdamW step and regrow (:mod:`.adamw`, :mod:`.regrow`) are not registered: they mutate parameters and optimizer state
in ``optimizer.step()`` / ``SMET.step()``, which run outside the compiled model graph, so a custom op would add
mutation schemas and fake kernels that no traced graph ever calls.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.library import custom_op, triton_op

from ..backend import INTERPRET
from ..layout import unpack_kernel_index
from ..reference.matmul import torch_bsmm_forward, torch_bsmm_grad_input, torch_bsmm_grad_weight
from .block_sparse_matmul import triton_bsmm_forward, triton_bsmm_grad_input, triton_bsmm_grad_weight


#: triton_op lets Inductor trace the body into its graph; the interpreter's kernels cannot be traced (opaque op)
_register = custom_op if INTERPRET else triton_op


def _unpack(index: torch.Tensor, nnz: int, n: int, k: int, b: int):
    return unpack_kernel_index(index, nnz, (n // b, k // b))


def _check_version(version: torch.Tensor, forward_version: torch.Tensor) -> None:
    """The layout must not change between forward and backward (both are int64 ``[1]`` CPU tensors)."""
    if is_fake(version):  # traced (Inductor lowers this body): no value to compare
        return
    if int(version) != int(forward_version):
        raise RuntimeError(
            f"the layout of a block-sparse layer changed between forward (version {int(forward_version)}) and "
            f"backward (version {int(version)}); perform topology updates only after optimizer.step()"
        )


@_register("smet::bsmm_forward", mutates_args=())
def bsmm_forward(
    x: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    index: torch.Tensor,
    version: torch.Tensor,
    forward_version: torch.Tensor,
    out_features: int,
    backend: str,
    variant: str,
) -> torch.Tensor:
    """``y [M, N] = x [M, K] Wᵀ (+ bias)``. ``version`` (the layout's live version tensor) and ``forward_version``
    (:func:`layout_version` of it, taken by the caller) are only saved for the backward's check."""
    nnz, b = values.shape[0], values.shape[-1]
    block_indices, rows, _ = _unpack(index, nnz, out_features, x.shape[1], b)
    if backend == "triton":
        return triton_bsmm_forward(x, values, rows, out_features, bias, variant=variant)
    return torch_bsmm_forward(x, values, block_indices, out_features, bias)


@_register("smet::bsmm_grad_input", mutates_args=())
def bsmm_grad_input(
    dy: torch.Tensor,
    values: torch.Tensor,
    index: torch.Tensor,
    version: torch.Tensor,
    forward_version: torch.Tensor,
    in_features: int,
    backend: str,
    variant: str,
) -> torch.Tensor:
    """``dx [M, K] = dy [M, N] W``."""
    _check_version(version, forward_version)
    nnz, b = values.shape[0], values.shape[-1]
    block_indices, _, cols = _unpack(index, nnz, dy.shape[1], in_features, b)
    if backend == "triton":
        return triton_bsmm_grad_input(dy, values, cols, in_features, variant=variant)
    return torch_bsmm_grad_input(dy, values, block_indices, in_features)


@_register("smet::bsmm_grad_weight", mutates_args=())
def bsmm_grad_weight(
    dy: torch.Tensor,
    x: torch.Tensor,
    index: torch.Tensor,
    version: torch.Tensor,
    forward_version: torch.Tensor,
    nnz: int,
    block_size: int,
    backend: str,
    variant: str,
) -> torch.Tensor:
    """``dvalues [nnz, b, b]``, ``dvalues[k] = dy[:, rows(k)]ᵀ x[:, cols(k)]``."""
    _check_version(version, forward_version)
    block_indices, _, _ = _unpack(index, nnz, dy.shape[1], x.shape[1], block_size)
    if backend == "triton":
        return triton_bsmm_grad_weight(dy, x, block_indices, block_size, variant=variant)
    return torch_bsmm_grad_weight(dy, x, block_indices, block_size)


@bsmm_forward.register_fake
def _(x, values, bias, index, version, forward_version, out_features, backend, variant):
    return x.new_empty(x.shape[0], out_features)


@bsmm_grad_input.register_fake
def _(dy, values, index, version, forward_version, in_features, backend, variant):
    return dy.new_empty(dy.shape[0], in_features)


@bsmm_grad_weight.register_fake
def _(dy, x, index, version, forward_version, nnz, block_size, backend, variant):
    return x.new_empty(nnz, block_size, block_size)


@custom_op("smet::layout_version", mutates_args=())
def layout_version(version: torch.Tensor) -> torch.Tensor:
    """A copy of the layout's version tensor, taken at forward and passed to :func:`bsmm_forward`. An opaque op that
    the forward output depends on, so that a compiled graph's partitioner can neither recompute the copy in the
    backward from the (since updated) version tensor nor move it there, as it would a ``clone`` in setup_context."""
    return version.clone()


@layout_version.register_fake
def _(version):
    return torch.empty_like(version)


def _row_major(dy: torch.Tensor) -> torch.Tensor:
    """An empty ``dy`` may keep the zero strides of an expanded gradient (``y.sum()`` of no tokens): row-major."""
    return dy.contiguous() if dy.numel() else dy.new_zeros(dy.shape)


def _once_differentiable(backend: str) -> None:
    if backend == "triton":
        raise RuntimeError(
            "trying to differentiate twice through the Triton backward of block_sparse_linear (its kernels are "
            "once-differentiable); use backend='reference' for double backward"
        )


# ---------------------------------------------------------------- forward: dx = dy W, dvalues, dbias = Σ_m dy
def _forward_setup(ctx, inputs, output):
    x, values, bias, index, version, forward_version, out_features, backend, variant = inputs
    ctx.args = (x.shape[1], values.shape[0], values.shape[-1], backend, variant)
    ctx.has_bias = bias is not None
    # dx needs only values and dvalues only x: a frozen layer (or a constant input) keeps no extra activation
    ctx.save_for_backward(
        x if ctx.needs_input_grad[1] else None,
        values if ctx.needs_input_grad[0] else None,
        index,
        version,
        forward_version,
    )


def _forward_backward(ctx, dy):
    x, values, index, version, forward_version = ctx.saved_tensors
    in_features, nnz, b, backend, variant = ctx.args
    dy = _row_major(dy)
    dx = dvalues = dbias = None
    if ctx.needs_input_grad[0]:
        dx = bsmm_grad_input(dy, values, index, version, forward_version, in_features, backend, variant)
    if ctx.needs_input_grad[1]:
        dvalues = bsmm_grad_weight(dy, x, index, version, forward_version, nnz, b, backend, variant)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        dbias = dy.sum(0, dtype=torch.float64 if dy.dtype == torch.float64 else torch.float32).to(dy.dtype)
    return dx, dvalues, dbias, None, None, None, None, None, None


# ---------------------------------------------------------------- dx = dy W: d dy = g Wᵀ, dvalues = dyᵀ g (blocks)
def _grad_input_setup(ctx, inputs, output):
    dy, values, index, version, forward_version, in_features, backend, variant = inputs
    ctx.args = (dy.shape[1], values.shape[0], values.shape[-1], backend, variant)
    ctx.save_for_backward(dy, values, index, version, forward_version)


def _grad_input_backward(ctx, g):
    dy, values, index, version, forward_version = ctx.saved_tensors
    out_features, nnz, b, backend, variant = ctx.args
    _once_differentiable(backend)
    g = _row_major(g)
    d_dy = d_values = None
    if ctx.needs_input_grad[0]:
        d_dy = bsmm_forward(g, values, None, index, version, forward_version, out_features, backend, variant)
    if ctx.needs_input_grad[1]:
        d_values = bsmm_grad_weight(dy, g, index, version, forward_version, nnz, b, backend, variant)
    return d_dy, d_values, None, None, None, None, None, None


# ---------------------------------------------------------------- dvalues: d dy = x Gᵀ, dx = dy G (G: [nnz, b, b])
def _grad_weight_setup(ctx, inputs, output):
    dy, x, index, version, forward_version, nnz, block_size, backend, variant = inputs
    ctx.args = (dy.shape[1], x.shape[1], backend, variant)
    ctx.save_for_backward(dy, x, index, version, forward_version)


def _grad_weight_backward(ctx, g):
    dy, x, index, version, forward_version = ctx.saved_tensors
    out_features, in_features, backend, variant = ctx.args
    _once_differentiable(backend)
    g = g.contiguous()
    d_dy = d_x = None
    if ctx.needs_input_grad[0]:
        d_dy = bsmm_forward(x, g, None, index, version, forward_version, out_features, backend, variant)
    if ctx.needs_input_grad[1]:
        d_x = bsmm_grad_input(dy, g, index, version, forward_version, in_features, backend, variant)
    return d_dy, d_x, None, None, None, None, None, None, None


bsmm_forward.register_autograd(_forward_backward, setup_context=_forward_setup)
bsmm_grad_input.register_autograd(_grad_input_backward, setup_context=_grad_input_setup)
bsmm_grad_weight.register_autograd(_grad_weight_backward, setup_context=_grad_weight_setup)
