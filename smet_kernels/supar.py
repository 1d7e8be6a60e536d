"""SμPar (Dey et al. 2024): width- and density-aware init and learning rate of the hidden sparse layers.

With ``m_d = width / base_width`` and ``m_ρ = density / base_density`` (SPEC §2)::

    σ_hidden = σ_base / sqrt(m_d · m_ρ)        η_hidden = η_base / (m_d · m_ρ)

Hidden layers are the sparse ones (parameters carrying ``smet_layout`` or ``smet_mask_layout``); their density is
their own layout's (so ERK layers each get their own factor). Embeddings, norms and the head keep the base values.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .layout import check_generator


def _positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive number, got {type(value).__name__}")
    if not (0.0 < value < math.inf):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def _density(value, name: str) -> float:
    value = _positive(value, name)
    if value > 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return value


def supar_multiplier(width: float, base_width: float, density: float, base_density: float = 1.0) -> float:
    """``m_d · m_ρ = (width / base_width) · (density / base_density)``."""
    return (_positive(width, "width") / _positive(base_width, "base_width")) * (
        _density(density, "density") / _density(base_density, "base_density")
    )


def supar_init_std(
    base_std: float, width: float, base_width: float, density: float, base_density: float = 1.0
) -> float:
    """Hidden-weight init std ``σ_base / sqrt(m_d · m_ρ)``."""
    return _positive(base_std, "base_std") / math.sqrt(supar_multiplier(width, base_width, density, base_density))


def supar_lr(lr: float, width: float, base_width: float, density: float, base_density: float = 1.0) -> float:
    """Hidden-weight Adam learning rate ``η_base / (m_d · m_ρ)``."""
    return _positive(lr, "lr") / supar_multiplier(width, base_width, density, base_density)


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")


def _sparse_layout(param: torch.Tensor):
    return getattr(param, "smet_layout", None) or getattr(param, "smet_mask_layout", None)


@torch.no_grad()
def supar_init_(
    model: nn.Module,
    base_std: float,
    width: float,
    base_width: float,
    base_density: float = 1.0,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Re-initialise every hidden sparse weight of ``model`` in place with ``N(0, supar_init_std(...)²)``.

    Compact values are drawn directly; masked dense weights are drawn then zeroed at inactive blocks.
    Returns ``model``.
    """
    _check_model(model)
    check_generator(generator)
    found = False
    for param in model.parameters():
        layout = _sparse_layout(param)
        if layout is None:
            continue
        found = True
        std = supar_init_std(base_std, width, base_width, layout.density, base_density)
        # drawn where the generator lives (a CPU generator may seed a CUDA model), in fp32, then copied
        draw_device = generator.device if generator is not None else param.device
        noise = torch.randn(param.shape, generator=generator, device=draw_device, dtype=torch.float32)
        param.copy_(noise.mul_(std))
        if hasattr(param, "smet_mask_layout"):
            b = layout.block_size
            mask = layout.mask.to(device=param.device, dtype=param.dtype)
            param.mul_(mask.repeat_interleave(b, dim=0).repeat_interleave(b, dim=1))
    if not found:
        raise ValueError("model has no sparse parameters (smet_layout / smet_mask_layout); sparsify it first")
    return model


def supar_param_groups(
    model: nn.Module,
    lr: float,
    width: float,
    base_width: float,
    base_density: float = 1.0,
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: one per hidden sparse weight with ``supar_lr(lr, ...)``, one for the rest at ``lr``.

    The sparse groups set ``density_lr_exponent=0`` because ``η / m_ρ`` already is SMETAdamW's density-aware LR
    ``η · d^-1`` (for ``base_density = 1``); ``torch.optim`` optimizers ignore the key. ``group_options`` (e.g.
    ``weight_decay``) are copied into every group. Works with ``SMETAdamW`` and ``torch.optim.AdamW``.
    """
    _check_model(model)
    lr = _positive(lr, "lr")
    if group_options.get("density_lr_exponent", 0.0) != 0.0:  # it would replace the sparse groups' 0: d counted twice
        raise ValueError(f"density_lr_exponent must be 0, got {group_options['density_lr_exponent']}: SμPar's "
                         "lr / m_rho already is the density-aware LR")
    groups: list[dict[str, Any]] = []
    others = []
    frozen = 0
    for param in model.parameters():
        if not param.requires_grad:
            frozen += _sparse_layout(param) is not None
            continue
        layout = _sparse_layout(param)
        if layout is None:
            others.append(param)
            continue
        hidden_lr = supar_lr(lr, width, base_width, layout.density, base_density)
        groups.append({"params": [param], "lr": hidden_lr, "density_lr_exponent": 0.0, **group_options})
    if not groups:
        raise ValueError(f"every sparse parameter of model is frozen (requires_grad=False): {frozen} sparse layers"
                         if frozen else
                         "model has no sparse parameters (smet_layout / smet_mask_layout); sparsify it first")
    if others:
        groups.insert(0, {"params": others, "lr": lr, **group_options})
    return groups
