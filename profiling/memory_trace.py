"""Exact memory of a training step traced on the ``meta`` device: nothing is allocated, every size is real.

A model built on ``meta`` runs the same operators as on a GPU, with real shapes and dtypes but no data, so the
tensor-counted components of :mod:`profiling.memory_breakdown` (weights, gradients, optimizer states, saved
activations) are exact. The peak needs the transients too; :class:`LiveBytes` (a ``TorchDispatchMode``) sees every
operator's outputs, counts each new storage on the traced device once, and subtracts it when the storage is freed
(a ``weakref.finalize`` on the storage), so ``peak`` is the largest sum of live bytes, what a caching allocator's
``max_memory_allocated`` would report without rounding or fragmentation.

    with LiveBytes("meta") as live, FlashAttentionOnMeta():
        model, optimizer, forward = make("meta")       # built inside: its storages are counted
        memory = trace_step_memory(model, optimizer, forward, live)

What runs on ``meta`` is what the GPU allocates, with two deliberate choices:

* the block-sparse products are ``torch.library`` custom ops (:mod:`smet_kernels.ops.library`) whose fake
  implementation is their ``meta`` kernel: each allocates its output only, as the Triton kernels do (the split-K
  weight gradient's fp32 ``[split, nnz, b, b]`` partial sums, used only when the blocks are too few to fill the
  GPU, are not traced); the reference backend's dense temporaries never run;
* ``in_place_step=True`` (SMETAdamW's Triton kernel and ``torch.optim.AdamW(fused=True)`` update parameters and
  states in place, without temporaries) leaves the optimizer step's transients out of the peak; on ``meta`` the
  step itself runs the PyTorch reference (no fused kernel exists there), whose per-tensor fp32 temporaries a GPU
  never allocates. Optimizers made of PyTorch ops (GaLore-style) keep their transients (``in_place_step=False``).

Activation checkpointing is the model's own (``LlamaModel.activation_checkpointing``, non-reentrant
``torch.utils.checkpoint``): the checkpoint stores each layer's inputs as saved tensors (``_CheckpointFrame.
save_inputs`` packs them before its own hooks are entered), so :class:`~profiling.memory_breakdown.SavedActivations`
counts them as activations, byte for byte what a reentrant checkpoint saves.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .memory_breakdown import MeasuredMemory, measure_step_memory


class LiveBytes(TorchDispatchMode):
    """Live and peak bytes of the storages created on ``device`` while the mode is active.

    ``live``: bytes of the counted storages still alive; ``peak``: the largest ``live`` since the last
    :meth:`reset_peak`. A storage counts from the operator that creates it until it is freed.
    """

    def __init__(self, device: torch.device | str):
        super().__init__()
        self.device = torch.device(device)
        self.live = 0
        self.peak = 0
        self._storages: set[int] = set()

    def reset_peak(self) -> None:
        self.peak = self.live

    def _release(self, key: int, nbytes: int) -> None:
        self._storages.discard(key)
        self.live -= nbytes

    def _count(self, tensor: torch.Tensor) -> None:
        if tensor.device != self.device:
            return
        storage = tensor.untyped_storage()
        key = storage._cdata  # the StorageImpl: shared by views, unique while the storage lives
        if key in self._storages:
            return
        nbytes = storage.nbytes()
        self._storages.add(key)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key, nbytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._count(leaf)
        return out


def _flash_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if attn_mask is not None or enable_gqa:  # what the flash kernels do not take: the math path, as before
        return torch.ops.aten._scaled_dot_product_attention_math(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
        )[0]  # fmt: skip
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, scale=scale
    )[0]  # fmt: skip


class FlashAttentionOnMeta:
    """On ``meta``, ``F.scaled_dot_product_attention`` would take the math path (it saves the ``S × S`` attention
    matrix); inside this context it runs the flash-attention op instead, which saves q, k, v, the output and an fp32
    logsumexp per row — what the CPU and CUDA flash/memory-efficient kernels keep.

    A kernel of ``aten::scaled_dot_product_attention`` for the ``AutogradMeta`` dispatch key (ahead of the op's
    composite decomposition, for ``meta`` tensors only), registered on enter and removed on exit: unlike a
    ``TorchFunctionMode``, which is off while its own handler runs ``backward``, it also holds for the attention
    that activation checkpointing recomputes in backward."""

    def __enter__(self) -> "FlashAttentionOnMeta":
        self._scope = torch.library._scoped_library("aten", "IMPL")
        self._scope.__enter__().impl("scaled_dot_product_attention", _flash_attention, "AutogradMeta")
        return self

    def __exit__(self, *exc) -> None:
        self._scope.__exit__(*exc)


def _without_transients(step: Callable, live: LiveBytes) -> Callable:
    """``step`` whose temporaries do not raise ``live.peak``: the peak over it is what stays live after it."""

    def run(*args, **kwargs):
        peak = live.peak
        result = step(*args, **kwargs)
        live.peak = max(peak, live.live)
        return result

    return run


def trace_step_memory(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    forward: Callable[[], torch.Tensor],
    live: LiveBytes,
    in_place_step: bool = False,
) -> MeasuredMemory:
    """One warm-up step (gradients and optimizer states come to exist), then one step split into components
    (:func:`profiling.memory_breakdown.measure_step_memory`) with ``live.peak`` over it as the peak.
    Build ``model`` and ``optimizer`` inside ``live`` so that every storage on its device is counted.
    ``in_place_step``: the optimizer's GPU step is one fused in-place kernel, so its traced temporaries (those of
    the PyTorch ops that stand in for it on ``meta``) are left out of the peak."""
    forward().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    if in_place_step:
        optimizer.step = _without_transients(optimizer.step, live)
    try:
        return measure_step_memory(model, optimizer, forward, live.device, live=live)
    finally:
        if in_place_step:
            del optimizer.step  # the instance attribute: the class's step again
