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
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
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


class FlashAttentionOnMeta(TorchFunctionMode):
    """On ``meta``, ``F.scaled_dot_product_attention`` would take the math path (it saves the ``S × S`` attention
    matrix); this mode runs the flash-attention op instead, which saves q, k, v, the output and an fp32 logsumexp
    per row — what the CPU and CUDA flash/memory-efficient kernels keep."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and args[0].device.type == "meta":
            query, key, value = args[:3]
            options = dict(zip(("attn_mask", "dropout_p", "is_causal", "scale"), args[3:])) | kwargs
            if options.get("attn_mask") is None and not options.get("enable_gqa", False):
                return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    query, key, value, options.get("dropout_p", 0.0), options.get("is_causal", False),
                    scale=options.get("scale"),
                )[0]  # fmt: skip
        return func(*args, **kwargs)


def checkpoint_layers(layers: nn.ModuleList) -> None:
    """Activation checkpointing per layer: each layer saves only its inputs and recomputes its forward during
    backward (``torch.utils.checkpoint``, reentrant, so its saved inputs pass through saved-tensor hooks and are
    counted as activations; the layers draw no random numbers, so no RNG state is kept)."""
    from torch.utils.checkpoint import checkpoint

    for layer in layers:
        forward = layer.forward
        layer.forward = lambda *args, _forward=forward: checkpoint(
            _forward, *args, use_reentrant=True, preserve_rng_state=False
        )


def trace_step_memory(
    model: nn.Module, optimizer: torch.optim.Optimizer, forward: Callable[[], torch.Tensor], live: LiveBytes
) -> MeasuredMemory:
    """One warm-up step (gradients and optimizer states come to exist), then one step split into components
    (:func:`profiling.memory_breakdown.measure_step_memory`) with ``live.peak`` over it as the peak.
    Build ``model`` and ``optimizer`` inside ``live`` so that every storage on its device is counted."""
    forward().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    return measure_step_memory(model, optimizer, forward, live.device, live=live)
