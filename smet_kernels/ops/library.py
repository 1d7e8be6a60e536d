"""The one place that dispatches each op of the library between its Triton launcher (``triton_<op>``) and its
PyTorch reference (``torch_<op>``, :mod:`smet_kernels.reference`): the three block-sparse products of a linear
layer as ``torch.library`` custom ops, and the AdamW step and regrow as plain functions (below).

With ``W = to_dense(values, layout)`` ``[N, K]``, ``x [M, K]`` and ``dy [M, N]``:

* ``torch.ops.smet.bsmm_forward``      ``y = x Wᵀ (+ bias)``
* ``torch.ops.smet.bsmm_grad_input``   ``dx = dy W``
* ``torch.ops.smet.bsmm_grad_weight``  ``dvalues[k] = dy[:, rows(k)]ᵀ x[:, cols(k)]`` (active blocks only)

Each is a :func:`torch.library.triton_op`, so ``torch.compile`` traces a model through it without a graph break and
Inductor sees the Triton kernels (``wrap_triton``); a fake implementation gives output shapes (``meta`` / fake
tensors). Under the Triton CPU interpreter (``TRITON_INTERPRET=1``) the kernels are plain Python, not traceable, so
the ops are opaque :func:`torch.library.custom_op` instead (same schema, fake and autograd). The ops take tensors,
not a ``BlockLayout``: ``index`` is the layout's packed int32 kernel index (:meth:`BlockLayout.kernel_index`),
``version`` its ``version_tensor``; both are rewritten in place by a topology
update, so a compiled graph keeps the same inputs (no recompile). ``backend`` (``"triton"`` | ``"reference"``) and
``variant`` (``SMET_MATMUL_VARIANT``) are string arguments resolved by the caller (:func:`block_sparse_linear`):
a change of either is a new constant in the graph (a recompile), not a hidden global read inside the op. (Dynamo
guards ``SMET_MATMUL_VARIANT`` only where it was set when the graph was traced: set it before the first compiled
call.)

Autograd (``register_autograd``) is closed over the three ops: each product is bilinear, so the derivative of each is
another of them; through the reference the backward is differentiable again (double backward), through Triton it is
once-differentiable (differentiating it again raises). Each backward formula first calls
``torch.ops.smet.check_layout_version``, which raises unless the layout version equals the one saved at forward (a
topology update between forward and backward is an error, not a gradient for blocks that moved). That check is its
own opaque custom op with an ordered effect, never inside a product's body (which AOTAutograd traces for a
``triton_op``, seeing fake tensors only), so it runs on the live version tensor eagerly and in every compiled graph
(``aot_eager``, Inductor; interpreter or not), and it returns nothing (no copy of the gradient).

AdamW step and regrow (:func:`adamw_step`, :func:`regrow_blocks`; kernels in :mod:`.adamw`, :mod:`.regrow`) are not
registered: they mutate parameters and optimizer state in ``optimizer.step()`` / ``SMET.step()``, which run outside
the compiled model graph, so a custom op would add mutation schemas and fake kernels that no traced graph ever calls.
They resolve the backend per call (:func:`smet_kernels.backend.resolve_backend`) like the products' caller does.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch._library.effects import EffectType
from torch.library import custom_op, triton_op

from ..backend import INTERPRET, resolve_backend
from ..layout import unpack_kernel_index
from ..reference.adamw import torch_adamw_step
from ..reference.matmul import torch_bsmm_forward, torch_bsmm_grad_input, torch_bsmm_grad_weight
from ..reference.regrow import torch_regrow_blocks
from .adamw import check_hyperparameters, check_tensors, triton_adamw_step
from .block_sparse_matmul import triton_bsmm_forward, triton_bsmm_grad_input, triton_bsmm_grad_weight
from .regrow import check_inputs, triton_regrow_blocks


#: triton_op lets Inductor trace the body into its graph; the interpreter's kernels cannot be traced (opaque op)
_register = custom_op if INTERPRET else triton_op


def _unpack(index: torch.Tensor, nnz: int, n: int, k: int, b: int):
    return unpack_kernel_index(index, nnz, (n // b, k // b))


def _without_autocast(device: torch.device):
    """Autocast off for a reference product, which computes in fp32 as the kernels do: an op's body runs inside the
    caller's autocast, which rounded its matmuls to bf16 first (and a bf16 output with bias twice)."""
    available = torch.amp.is_autocast_available(device.type)  # not on meta
    return torch.autocast(device.type, enabled=False) if available else contextlib.nullcontext()


@custom_op("smet::check_layout_version", mutates_args=())
def check_layout_version(version: torch.Tensor, forward_version: torch.Tensor) -> None:
    """Nothing if the layout version (int64 ``[1]`` CPU) still equals the one saved at forward, else a
    ``RuntimeError``: a topology update between forward and backward is an error, not a gradient for blocks that
    moved. An opaque op with an ordered effect (below), so a compiled backward keeps it although nothing reads an
    output (no tracing into it, no dead-code elimination), runs it on the live version tensor, and copies nothing."""
    if int(version) != int(forward_version):
        raise RuntimeError(
            f"the layout of a block-sparse layer changed between forward (version {int(forward_version)}) and "
            f"backward (version {int(version)}); perform topology updates only after optimizer.step()"
        )


@check_layout_version.register_fake
def _(version, forward_version):
    return None


check_layout_version.register_effect(EffectType.ORDERED)


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
    (:func:`layout_version` of it, taken by the caller) are only saved for the backward's
    :func:`check_layout_version` (so are those of the two grad ops, for their own backward)."""
    nnz, b = values.shape[0], values.shape[-1]
    block_indices, rows, _ = _unpack(index, nnz, out_features, x.shape[1], b)
    if backend == "triton":
        return triton_bsmm_forward(x, values, rows, out_features, bias, variant=variant)
    with _without_autocast(x.device):
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
    nnz, b = values.shape[0], values.shape[-1]
    block_indices, _, cols = _unpack(index, nnz, dy.shape[1], in_features, b)
    if backend == "triton":
        return triton_bsmm_grad_input(dy, values, cols, in_features, variant=variant)
    with _without_autocast(dy.device):
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
    block_indices, _, _ = _unpack(index, nnz, dy.shape[1], x.shape[1], block_size)
    if backend == "triton":
        return triton_bsmm_grad_weight(dy, x, block_indices, block_size, variant=variant)
    with _without_autocast(x.device):
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
    """A copy of the layout's version tensor, taken at forward and passed to :func:`bsmm_forward`. An opaque op with
    an ordered effect (below), so that a compiled graph's partitioner can neither recompute the copy in the backward
    from the (since updated) version tensor nor move it there, as it would a ``clone`` in setup_context."""
    return version.clone()


@layout_version.register_fake
def _(version):
    return torch.empty_like(version)


# a pure op that only the backward reads would be moved there by the partitioner (a traced triton_op body does not
# read it): the effect keeps it in the forward graph
layout_version.register_effect(EffectType.ORDERED)


def _row_major(dy: torch.Tensor) -> torch.Tensor:
    """``dy`` row-major: an expanded gradient (``y.sum()``) is copied, also when empty (``contiguous`` keeps its zero
    strides then). Decided by strides, not ``numel``: a token count known only at run time (``x[mask]`` under
    ``torch.compile``) cannot be tested for zero while tracing."""
    return dy if dy.stride(-1) == 1 and dy.is_contiguous() else dy.clone(memory_format=torch.contiguous_format)


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
    check_layout_version(version, forward_version)
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
    check_layout_version(version, forward_version)
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
    check_layout_version(version, forward_version)
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


# ---------------------------------------------------------------- AdamW step and regrow (mutating; not registered)
@torch.no_grad()
def adamw_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    block_steps: Sequence[torch.Tensor | None],
    lrs: Sequence[float],
    global_steps: Sequence[int | None],
    dense_warmups: Sequence[bool] | None = None,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    warmup: str = "linear",
    warmup_steps: int = 100,
    backend: str | None = None,
    cache: dict | None = None,
) -> None:
    """Apply one SMET AdamW step to every tensor, in place: one fused :func:`triton_adamw_step` launch per
    (device, parameter dtype, state dtype) group, or :func:`torch_adamw_step` per tensor.

    ``block_steps[i]``: int32 ``[nnz]`` local steps of sparse values ``[nnz, b, b]`` (bumped by one), or None for
    a dense tensor. ``lrs[i]``: effective learning rate (density factor included). ``global_steps[i]``: step
    count including this step used for the bias correction instead of the local one, or None (local; sparse
    only). ``dense_warmups[i]``: warm the dense tensor ``i`` up by its global step (default: no dense warm-up;
    ignored for sparse values). ``cache``: a dict kept by the caller so device tables are reused while tensor
    addresses are unchanged.
    """
    check_hyperparameters(betas, eps, weight_decay, warmup, warmup_steps)
    params, grads, exp_avgs, exp_avg_sqs = list(params), list(grads), list(exp_avgs), list(exp_avg_sqs)
    block_steps, lrs, global_steps = list(block_steps), [float(lr) for lr in lrs], list(global_steps)
    dense_warmups = [False] * len(params) if dense_warmups is None else [bool(w) for w in dense_warmups]
    check_tensors(params, grads, exp_avgs, exp_avg_sqs, block_steps, lrs, global_steps, dense_warmups)
    hyper = dict(betas=tuple(betas), eps=eps, weight_decay=weight_decay, warmup=warmup, warmup_steps=warmup_steps)
    launch_adamw_step(params, grads, exp_avgs, exp_avg_sqs, block_steps, lrs, global_steps, dense_warmups, hyper,
                      backend, cache)  # fmt: skip


def launch_adamw_step(params, grads, exp_avgs, exp_avg_sqs, block_steps, lrs, global_steps, dense_warmups,
                      hyper: dict, backend: str | None, cache: dict | None) -> None:  # fmt: skip
    """:func:`adamw_step` without its checks, on lists (``hyper``: its ``betas``, ``eps``, ``weight_decay``,
    ``warmup``, ``warmup_steps``), for a caller that made them (``SMETAdamW.step`` checks every batch before the first
    runs, so that a step refused for a later batch changes nothing). The numbers of ``hyper`` are taken as Python
    floats and int (a numpy scalar is none)."""
    betas = tuple(float(beta) for beta in hyper["betas"])
    hyper = dict(hyper, betas=betas, eps=float(hyper["eps"]), weight_decay=float(hyper["weight_decay"]),
                 warmup_steps=int(hyper["warmup_steps"]))  # fmt: skip
    groups: dict[tuple, list[int]] = {}
    for i, (p, m) in enumerate(zip(params, exp_avgs)):
        groups.setdefault((p.device, p.dtype, m.dtype), []).append(i)
    for key, indices in groups.items():
        if resolve_backend(key[0], backend) == "reference":
            for i in indices:
                torch_adamw_step(
                    params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], block_steps[i],
                    lr=lrs[i], global_step=global_steps[i], dense_warmup=dense_warmups[i], **hyper,
                )  # fmt: skip
            continue
        triton_adamw_step(
            [(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], block_steps[i]) for i in indices],
            [lrs[i] for i in indices],
            [global_steps[i] for i in indices],
            [dense_warmups[i] for i in indices],
            cache=cache,
            cache_key=key,
            **hyper,
        )


@torch.no_grad()
def regrow_blocks(
    values: torch.Tensor,
    slots: torch.Tensor,
    exp_avg: torch.Tensor | None = None,
    exp_avg_sq: torch.Tensor | None = None,
    block_step: torch.Tensor | None = None,
    init: str = "zeros",
    init_std: float = 0.02,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> None:
    """Initialise regrown slots of ``values [nnz, b, b]`` in place and reset their AdamW state
    (:func:`triton_regrow_blocks` or :func:`torch_regrow_blocks`).

    ``slots``: distinct slot indices ``[n]``. ``init="zeros"`` writes zero blocks; ``init="normal"`` writes
    ``N(0, init_std^2)`` drawn (fp32, then cast to ``values.dtype``) with ``generator`` on its device.
    ``exp_avg``/``exp_avg_sq`` (shape of ``values``) are zeroed and ``block_step`` (int32 ``[nnz]``) set to 0
    at those slots; any of them may be None.
    """
    check_inputs(values, slots, exp_avg, exp_avg_sq, block_step, init, init_std, generator)
    if slots.numel() == 0:
        return
    new_values = None
    if init == "normal":
        b = values.shape[1]
        draw_device = generator.device if generator is not None else values.device
        noise = torch.randn((slots.numel(), b, b), generator=generator, device=draw_device, dtype=torch.float32)
        new_values = (noise * init_std).to(values.device)
    if resolve_backend(values.device, backend) == "reference":
        torch_regrow_blocks(values, slots, new_values, exp_avg, exp_avg_sq, block_step)
    else:
        triton_regrow_blocks(values, slots, new_values, exp_avg, exp_avg_sq, block_step)
