"""Activation checkpointing (``torch.utils.checkpoint``, non-reentrant) that keeps the block-sparse layout guard.

A checkpointed module saves only its inputs in the forward pass and runs its forward again during backward, whose
saved tensors feed the backward nodes of the first forward. A recomputed block-sparse product would read the layout
of backward time, and so would its version snapshot (``torch.ops.smet.layout_version``), so the backward's version
check would pass; a masked layer's recomputed ``W ⊙ M`` would silently use the mask of backward time (same shapes,
so ``torch.utils.checkpoint`` sees no mismatch). :func:`checkpoint` therefore

* keeps the forward's version snapshots (a selective-checkpoint policy: ``layout_version`` is saved, everything else
  recomputed), so the backward products (and a masked layer's ``W ⊙ M``) compare the live version with that of the
  first forward, eagerly and under ``torch.compile``;
* eagerly, also records ``(layout, version)`` of every sparse parameter at forward and refuses a recompute under
  another one. Under ``torch.compile`` this Python-int check is skipped: Dynamo would guard on each version and
  recompile the model at every topology update.
"""

from __future__ import annotations

import torch.utils.checkpoint
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

LAYOUT_CHANGED = ("the layout of a block-sparse layer changed between forward and backward; "
                  "perform topology updates only after optimizer.step()")


def layout_versions(module: nn.Module) -> tuple:
    """``((id(layout), version), ...)`` of the layouts of ``module``'s sparse parameters (compact values carry
    ``smet_layout``, masked weights ``smet_mask_layout``)."""
    versions = []
    for param in module.parameters():
        layout = getattr(param, "smet_layout", None) or getattr(param, "smet_mask_layout", None)
        if layout is not None:
            versions.append((id(layout), layout.version))
    return tuple(versions)


def _save_version_snapshots(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op is torch.ops.smet.layout_version.default:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _contexts():
    return create_selective_checkpoint_contexts(_save_version_snapshots)


def checkpoint(module: nn.Module, *inputs, function=None):
    """``module(*inputs)`` (or ``function(*inputs)``, the computation of ``module`` without its hooks) with its
    activations recomputed in backward (non-reentrant ``torch.utils.checkpoint``, RNG state preserved); raises
    ``RuntimeError`` if a layout of ``module`` changed before the recompute."""
    if not isinstance(module, nn.Module):  # torch.utils.checkpoint's order (function, *args) would fail on .parameters
        raise TypeError(f"module must be an nn.Module (pass a plain function as function=), "
                        f"got {type(module).__name__}")
    versions = None if torch.compiler.is_compiling() else layout_versions(module)
    function = module if function is None else function

    def run(*args):
        if versions is not None and layout_versions(module) != versions:
            raise RuntimeError(LAYOUT_CHANGED)
        return function(*args)

    return torch.utils.checkpoint.checkpoint(run, *inputs, use_reentrant=False, context_fn=_contexts)
