"""Pure-PyTorch regrow initialisation: ground truth for the Triton kernel and its CPU fallback.

For every regrown slot ``k``: ``values[k] = init[i]`` (zeros when ``init`` is None), ``exp_avg[k] = exp_avg_sq[k] = 0``
and ``block_step[k] = 0`` (SPEC §2), so the block's first update uses local step ``t = 1``.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def torch_regrow_blocks(
    values: torch.Tensor,
    slots: torch.Tensor,
    new_values: torch.Tensor | None = None,
    exp_avg: torch.Tensor | None = None,
    exp_avg_sq: torch.Tensor | None = None,
    block_step: torch.Tensor | None = None,
) -> None:
    """Write ``new_values [n, b, b]`` (or zeros) into ``values[slots]``; reset the slots' optimizer state. In place."""
    if new_values is None:
        values[slots] = 0
    else:
        values[slots] = new_values.to(values.dtype)
    for state in (exp_avg, exp_avg_sq, block_step):
        if state is not None:
            state[slots] = 0
