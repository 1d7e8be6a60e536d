"""Per-layer densities of a sparse model: ``uniform`` or ``erk`` (Erdős–Rényi-kernel), SPEC §2.

ERK: raw density ``r_l ∝ (n_in + n_out) / (n_in · n_out)``, scaled by ε so that the active parameters add up
to ``density · Σ numel``; layers whose ``ε r_l`` would exceed 1 are made dense and ε is re-solved for the rest.
"""

from __future__ import annotations

from .layout import check_density

DISTRIBUTIONS = ("uniform", "erk")


def layer_densities(
    shapes: dict[str, tuple[int, int]], density: float, distribution: str = "uniform"
) -> dict[str, float]:
    """Density of each layer ``name -> (out_features, in_features)`` for a global target ``density``."""
    density = check_density(density)
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if not isinstance(shapes, dict):
        raise TypeError(f"shapes must be a dict name -> (out_features, in_features), got {type(shapes).__name__}")
    for name, shape in shapes.items():
        if (
            not isinstance(shape, (tuple, list))
            or len(shape) != 2
            or any(isinstance(size, bool) or not isinstance(size, int) or size <= 0 for size in shape)
        ):
            raise ValueError(f"shapes[{name!r}] must be (out_features, in_features) of positive ints, got {shape!r}")
    if not shapes:
        return {}
    if distribution == "uniform":
        return {name: density for name in shapes}
    numel = {name: out_f * in_f for name, (out_f, in_f) in shapes.items()}
    raw = {name: (out_f + in_f) / (out_f * in_f) for name, (out_f, in_f) in shapes.items()}
    budget = density * sum(numel.values())
    dense: set[str] = set()
    while True:
        sparse = [name for name in shapes if name not in dense]
        if not sparse:
            break
        remaining = budget - sum(numel[name] for name in dense)
        epsilon = remaining / sum(raw[name] * numel[name] for name in sparse)
        overflow = {name for name in sparse if epsilon * raw[name] > 1.0}
        if not overflow:
            break
        dense |= overflow
    return {name: 1.0 if name in dense else min(1.0, epsilon * raw[name]) for name in shapes}
