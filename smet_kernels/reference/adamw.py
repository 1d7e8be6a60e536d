"""Pure-PyTorch SMET AdamW step: ground truth for the fused Triton kernel and its CPU fallback.

Per element of value slot ``k`` (SPEC §2), with ``t_k`` the slot's local step incremented first::

    m = b1 m + (1 - b1) g            v = b2 v + (1 - b2) g^2
    m_hat = m / (1 - b1^s)           v_hat = v / (1 - b2^s)      s = t_k, or the global step if given
    w = min(t_k / W, 1)   (linear)   |  m <- m min(t_k / W, 1) stored (momentum_ramp)  |  1 (none)
    theta = theta - lr (w m_hat / (sqrt(v_hat) + eps) + weight_decay theta)

``lr`` is the layer's effective rate (the optimizer applies the density factor ``d^-alpha``). A dense
tensor (``block_step=None``) takes the AdamW update with bias correction by ``global_step``, without warm-up,
or with ``dense_warmup=True`` warmed up by its own step count: ``t = global_step`` in the formulas above (the
released code counts a step per element; every element of a dense tensor is stepped together, so one count per
tensor is the same). Math in fp32; parameters and moments are written back in their own dtypes.
"""

from __future__ import annotations

import math

import torch

WARMUP_MODES = ("linear", "momentum_ramp", "none")


def bias_correction(beta: float, step: torch.Tensor) -> torch.Tensor:
    """``1 - beta^step`` as ``1 - exp2(step log2 beta)`` (the form the kernel evaluates), fp32."""
    log2_beta = -math.inf if beta == 0.0 else math.log2(beta)
    return 1.0 - torch.exp2(step * log2_beta)


@torch.no_grad()
def torch_adamw_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    block_step: torch.Tensor | None = None,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    warmup: str = "linear",
    warmup_steps: int = 100,
    global_step: int | None = None,
    dense_warmup: bool = False,
) -> None:
    """One SMET AdamW step on one tensor, in place (``param``, moments and ``block_step``).

    ``param``/``grad``/moments: sparse values ``[nnz, b, b]`` with ``block_step`` int32 ``[nnz]``, or
    any dense tensor with ``block_step=None``. ``global_step`` (the step count including this step)
    replaces the local step in the bias correction; it is required for dense tensors. ``dense_warmup``: warm a
    dense tensor up by ``global_step`` (ignored for sparse values, which warm up by their local steps).
    """
    if warmup not in WARMUP_MODES:
        raise ValueError(f"warmup must be one of {WARMUP_MODES}, got {warmup!r}")
    if block_step is None and global_step is None:
        raise ValueError("global_step is required for a dense tensor (block_step=None)")
    beta1, beta2 = betas
    if block_step is not None:
        block_step += 1
        local_step = block_step.to(torch.float32).reshape(-1, *([1] * (param.dim() - 1)))
    else:
        local_step = torch.ones((), dtype=torch.float32, device=param.device)
    if global_step is not None:
        corrected_step = torch.full_like(local_step, float(global_step))
    else:
        corrected_step = local_step

    g = grad.to(torch.float32)
    theta = param.to(torch.float32)
    m = beta1 * exp_avg.to(torch.float32) + (1.0 - beta1) * g
    v = beta2 * exp_avg_sq.to(torch.float32) + (1.0 - beta2) * g * g
    if block_step is not None:
        ramp = torch.clamp(local_step / warmup_steps, max=1.0)
    else:
        ramp = torch.clamp(corrected_step / warmup_steps, max=1.0) if dense_warmup else None
    if warmup == "momentum_ramp" and ramp is not None:
        m = m * ramp
    update = (m / bias_correction(beta1, corrected_step)) / (
        torch.sqrt(v / bias_correction(beta2, corrected_step)) + eps
    )
    if warmup == "linear" and ramp is not None:
        update = update * ramp
    theta = theta - lr * (update + weight_decay * theta)

    param.copy_(theta)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
