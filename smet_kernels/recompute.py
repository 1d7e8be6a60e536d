"""Activation checkpointing (``torch.utils.checkpoint``, non-reentrant) that keeps the block-sparse layout guard.

A checkpointed module saves only its inputs in the forward pass and runs its forward again during backward, whose
saved tensors feed the backward nodes of the first forward. Those nodes of
:class:`~smet_kernels.functional.BlockSparseLinearFunction` still check the layout version, but a masked layer's
recomputed ``W ⊙ M`` would silently use the mask of backward time (same shapes, so ``torch.utils.checkpoint`` sees
no mismatch). :func:`checkpoint` records ``(layout, version)`` of every sparse parameter at forward and refuses a
recompute under another one.
"""

from __future__ import annotations

import torch.utils.checkpoint
from torch import nn

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


def checkpoint(module: nn.Module, *inputs):
    """``module(*inputs)`` with its activations recomputed in backward (non-reentrant ``torch.utils.checkpoint``,
    RNG state preserved); raises ``RuntimeError`` if a layout of ``module`` changed before the recompute."""
    versions = layout_versions(module)

    def run(*args):
        if layout_versions(module) != versions:
            raise RuntimeError(LAYOUT_CHANGED)
        return module(*args)

    return torch.utils.checkpoint.checkpoint(run, *inputs, use_reentrant=False)
