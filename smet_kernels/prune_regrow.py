"""The rules of one SMET topology update (SPEC §2), as pure functions of the layout and the scores:

* :func:`cosine_prune_fraction`: the fraction ``ζ_t`` to move at step ``t``;
* :func:`blocks_to_move`: how many of a layer's ``nnz`` blocks that is;
* :func:`choose_blocks`: which slots to prune and which inactive blocks to regrow into them;
* :func:`block_l1`: the block L1 norms that score a dense weight or gradient.

:class:`smet_kernels.topology.SMET` applies them to every sparse layer.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from .layout import BlockLayout


# ---------------------------------------------------------------------------------------------- schedule
def cosine_prune_fraction(step: int, end_step: int | None, prune_fraction: float, min_prune_fraction: float) -> float:
    """``ζ_t = ζ_min + (ζ0 − ζ_min)(1 + cos(π t / T_end)) / 2`` with t clamped to ``T_end``; ``ζ0`` if no ``T_end``."""
    if end_step is None:
        return float(prune_fraction)
    t = min(max(step, 0), end_step)
    return min_prune_fraction + (prune_fraction - min_prune_fraction) * (1.0 + math.cos(math.pi * t / end_step)) / 2.0


def blocks_to_move(prune_fraction: float, nnz: int) -> int:
    """``n = nnz − max(1, floor(nnz · (1 − ζ)))`` (released SMET rule), 0 for an empty layer.

    Exact for decimal fractions: ``ζ`` is read as the decimal its ``repr`` shows, in exact rational arithmetic, so
    ``nnz = 180, ζ = 0.35`` keeps ``floor(180 · 0.65) = 117`` and moves 63 (binary floating point would give
    ``180 · 0.65 = 116.99…``), and a tiny ``ζ > 0`` still moves a block."""
    if nnz <= 0:
        return 0
    keep = math.floor(nnz * (1 - Fraction(repr(float(prune_fraction)))))
    return nnz - max(1, keep)


# ---------------------------------------------------------------------------------------------- selection
def choose_blocks(
    layout: BlockLayout,
    prune_scores: torch.Tensor,
    n: int,
    regrow_scores: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``n`` slots to prune and ``n`` currently inactive blocks to regrow into them.

    ``prune_scores [nnz]``: score of each slot's block (its L1 norm); the ``n`` smallest are pruned, ties
    to the lower slot. ``regrow_scores [rows, cols]`` (RigL): the ``n`` inactive blocks with the largest
    score are grown, ties to the lower row-major index; ``None`` grows ``n`` inactive blocks uniformly at
    random with ``generator`` (CPU). ``n`` is capped at the number of inactive blocks and at ``nnz``.

    Returns CPU int64 ``slots [n]`` (ascending) and ``new_blocks [n, 2]`` (row-major ascending), ready for
    :meth:`BlockLayout.replace_blocks`.
    """
    prune_scores = prune_scores.detach().cpu()
    if prune_scores.shape != (layout.nnz,):
        raise ValueError(f"prune_scores must have shape [{layout.nnz}], got {tuple(prune_scores.shape)}")
    inactive = (~layout.mask.cpu()).flatten().nonzero().squeeze(1)
    n = min(int(n), inactive.numel(), layout.nnz)
    if n <= 0:
        return torch.empty(0, dtype=torch.int64, device="cpu"), torch.empty(0, 2, dtype=torch.int64, device="cpu")
    slots = torch.sort(prune_scores, stable=True).indices[:n]
    if regrow_scores is None:
        # on the CPU, whatever the default device (torch.set_default_device("cuda") refused the CPU generator)
        grown = inactive[torch.randperm(inactive.numel(), generator=generator, device="cpu")[:n]]
    else:
        regrow_scores = regrow_scores.detach().cpu()
        if regrow_scores.shape != layout.block_shape:
            raise ValueError(
                f"regrow_scores must have shape {list(layout.block_shape)}, got {tuple(regrow_scores.shape)}"
            )
        candidate_scores = regrow_scores.flatten()[inactive]
        grown = inactive[torch.sort(candidate_scores, descending=True, stable=True).indices[:n]]
    grown = grown.sort().values
    n_cols = layout.block_shape[1]
    return slots.sort().values, torch.stack([grown // n_cols, grown % n_cols], dim=1)


def block_l1(weight: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[out//b, in//b]`` block L1 norms ``Σ|w|`` of a dense ``[out, in]`` tensor, in fp32."""
    out_features, in_features = weight.shape
    blocks = weight.detach().reshape(out_features // block_size, block_size, in_features // block_size, block_size)
    return blocks.abs().sum(dim=(1, 3), dtype=torch.float32)
