"""Gradient clipping of the trainer: ``g ← g · min(1, max_norm / ‖g‖₂)`` over every gradient, with the norm reduced
in fp32."""

from __future__ import annotations

import torch


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (returns the norm before clipping) with the norm in fp32 for bf16/fp16
    gradients: torch reduces them to a norm in their own dtype (8 significant bits in bf16), so under
    ``precision="bf16"`` the reported norm and the clip coefficient were off by up to 0.4 % (a norm just above
    ``max_norm`` could round to it and escape clipping). The gradients' norms are reduced in fp32 from their own
    values (no fp32 copy), one multi-tensor launch per (device, dtype, tensor type) as in torch; FSDP2's DTensor
    gradients work as in torch."""
    parameters = [p for p in parameters if p.grad is not None]
    if not any(p.grad.dtype in (torch.float16, torch.bfloat16) for p in parameters):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in parameters:
        groups.setdefault((p.grad.device, p.grad.dtype, type(p.grad)), []).append(p.grad)
    norms = [norm for grads in groups.values() for norm in torch._foreach_norm(grads, 2.0, dtype=torch.float32)]
    total = torch.linalg.vector_norm(torch.stack(norms))
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return total
