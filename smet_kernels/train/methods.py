"""The training methods: one registry (:data:`METHODS`) and the factories built on it.

A method says what it sparsifies (``none``; ``compact``: hidden linears as ``BlockSparseLinear``, values, gradients
and states compact; ``masked``: dense weights × block mask), which optimizer trains it (``adamw``:
``torch.optim.AdamW``; ``galore``: :class:`GaLoreAdamW` on the hidden linears; ``smet_adamw``: :class:`SMETAdamW`
in one of its arms), whether the SMET topology controller moves its blocks (every sparse method), and which trainer
options apply to it. The trainer (``smet-train --optimizer``), the stability study, the training benchmark and the
memory model all take their method lists from here; the benchmarks name the four families by
:attr:`Method.bench_name` (``dense``, ``galore``, ``masked``, ``smet``), the trainer by :attr:`Method.name`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .model import HIDDEN_LINEAR_NAMES

SPARSITIES = ("none", "compact", "masked")
HIDDEN_LINEAR_PATTERN = r"\.(" + "|".join(HIDDEN_LINEAR_NAMES) + r")$"

GALORE_OPTIONS = ("galore_rank", "galore_update_gap", "galore_scale")
SMET_ADAMW_OPTIONS = ("warmup_mode", "optimizer_warmup_steps", "density_lr_exponent", "warmup_scope")
WARMUP_OPTIONS = tuple(option for option in SMET_ADAMW_OPTIONS if option != "density_lr_exponent")
SPARSE_OPTIONS = ("density", "block_size", "distribution", "supar", "supar_base_width", "update_interval",
                  "prune_fraction", "min_prune_fraction", "update_end_step", "regrow", "regrow_init",
                  "regrow_init_std") + SMET_ADAMW_OPTIONS
METHOD_OPTIONS = SPARSE_OPTIONS + GALORE_OPTIONS  # the options that act in some methods only
#: the sparse schedule a dense run's update probe follows (its control steps): options that act there while it is on
PROBE_SCHEDULE_OPTIONS = ("update_interval", "update_end_step")


@dataclass(frozen=True)
class SMETAdamWArm:
    """An ablation arm of :class:`SMETAdamW` (issue 16): warm-up (``"config"``: the trainer's ``warmup_mode``, or a
    fixed mode), bias correction, the default α of the density-aware LR and whether α may be set."""

    warmup: str
    bias_correction: str
    default_alpha: float
    alpha_settable: bool


@dataclass(frozen=True)
class Method:
    """One training method (see the module docstring)."""

    name: str
    sparsity: str
    optimizer: str
    bench_name: str | None = None  # the benchmarks' name of the family this method represents
    arm: SMETAdamWArm | None = None

    def __post_init__(self):
        if self.sparsity not in SPARSITIES:
            raise ValueError(f"sparsity must be one of {list(SPARSITIES)}, got {self.sparsity!r}")

    @property
    def sparse(self) -> bool:
        return self.sparsity != "none"

    @property
    def options(self) -> tuple[str, ...]:
        """The trainer options that act in this method (``smet-train`` names the others it is given as ignored): the
        :class:`SMETAdamW` options only where it is the optimizer (not ``masked-dst``'s ``torch.optim.AdamW``), its
        warm-up options only in an arm that takes the configured warm-up (not ``naive-dst``'s fixed ``"none"``)."""
        if not self.sparse:
            return GALORE_OPTIONS if self.optimizer == "galore" else ()
        if self.optimizer != "smet_adamw":
            return tuple(option for option in SPARSE_OPTIONS if option not in SMET_ADAMW_OPTIONS)
        if self.arm.warmup != "config":
            return tuple(option for option in SPARSE_OPTIONS if option not in WARMUP_OPTIONS)
        return SPARSE_OPTIONS

    @property
    def ignored_options(self) -> tuple[str, ...]:
        """The options of other methods, without effect in this one (named, not refused, when given)."""
        return tuple(option for option in METHOD_OPTIONS if option not in self.options)


_REGISTRY = (
    Method("adamw", "none", "adamw", bench_name="dense"),
    Method("galore", "none", "galore", bench_name="galore"),
    Method("masked-dst", "masked", "adamw", bench_name="masked"),
    # SMET = warm-up + density-aware LR; naive DST = neither (the paper's)
    Method("smet", "compact", "smet_adamw", bench_name="smet", arm=SMETAdamWArm("config", "local", 1.0, True)),
    Method("naive-dst", "compact", "smet_adamw", arm=SMETAdamWArm("none", "global", 0.0, True)),
    Method("warmup-only", "compact", "smet_adamw", arm=SMETAdamWArm("config", "local", 0.0, False)),
    Method("density-lr-only", "compact", "smet_adamw", arm=SMETAdamWArm("none", "global", 1.0, True)),
)
METHODS: dict[str, Method] = {m.name: m for m in _REGISTRY}
BENCH_METHODS: dict[str, Method] = {m.bench_name: m for m in _REGISTRY if m.bench_name}

TRAINER_NAMES = tuple(METHODS)  # smet-train --optimizer
SPARSE_TRAINER_NAMES = tuple(m.name for m in _REGISTRY if m.sparse)
BENCH_NAMES = tuple(BENCH_METHODS)  # dense, galore, masked, smet
SPARSE_BENCH_NAMES = tuple(name for name, m in BENCH_METHODS.items() if m.sparse)


def method(name: str) -> Method:
    """The method called ``name`` by the trainer (``smet``, ``masked-dst``...) or by the benchmarks (``dense``...)."""
    if name in METHODS:
        return METHODS[name]
    if name in BENCH_METHODS:
        return BENCH_METHODS[name]
    raise ValueError(f"method must be one of {list(TRAINER_NAMES)} or {list(BENCH_NAMES)}, got {name!r}")


def build_model(
    shape,
    name: str,
    *,
    density: float,
    block_size: int,
    dtype: torch.dtype,
    device,
    backend: str | None = None,
    distribution: str = "uniform",
    seed: int = 0,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """The :class:`LlamaModel` of ``shape`` (a ``LlamaConfig``) on ``device``, initialised from ``seed``, with its
    hidden linears as method ``name`` trains them: block-sparse (``compact``), masked dense (``masked``) or dense;
    the sparsity layouts drawn from ``generator`` (default: one seeded with ``seed``)."""
    from .model import LlamaModel

    sparsity = method(name).sparsity
    torch.manual_seed(seed)
    generator = generator if generator is not None else torch.Generator().manual_seed(seed)
    model = LlamaModel(shape, device=device, dtype=dtype)
    if sparsity == "compact":
        from ..modules import sparsify

        sparsify(model, density, block_size=block_size, distribution=distribution, include=HIDDEN_LINEAR_PATTERN,
                 generator=generator, backend=backend)
    elif sparsity == "masked":
        from ..masked import masked_sparsify

        masked_sparsify(model, density, block_size=block_size, distribution=distribution,
                        include=HIDDEN_LINEAR_PATTERN, generator=generator)
    return model


def build_optimizer(
    name: str,
    model: nn.Module,
    params=None,
    *,
    fused: bool | None = None,
    backend: str | None = None,
    galore: dict | None = None,
    smet_adamw: dict | None = None,
    **hyper,
) -> torch.optim.Optimizer:
    """The optimizer of method ``name`` over ``params`` (default: the trainable parameters of ``model``).

    ``hyper``: ``lr``, ``betas``, ``eps``, ``weight_decay`` (each optimizer's own default where not given);
    ``fused``: torch AdamW's ``fused`` flag; ``galore``: the :func:`galore_param_groups` options (``rank``
    required); ``smet_adamw``: the :class:`SMETAdamW` options of the arm (warm-up, α, ``state_dtype``...).
    """
    kind = method(name).optimizer
    if kind == "galore" and params is not None:  # else dropped: the groups come from model's layers
        raise ValueError("params: galore builds its param groups from model (galore_param_groups); give none")
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    if kind == "adamw":
        return torch.optim.AdamW(params, fused=fused, **hyper)
    if kind == "galore":
        from ..optim.galore import GaLoreAdamW, galore_param_groups

        return GaLoreAdamW(galore_param_groups(model, **(galore or {})), **hyper)
    from ..optim.smet_adamw import SMETAdamW

    return SMETAdamW(params, **(smet_adamw or {}), backend=backend, **hyper)


def build_controller(name: str, model: nn.Module, optimizer: torch.optim.Optimizer, **options):
    """The SMET topology controller of a sparse method (``options``: :class:`~smet_kernels.topology.SMET`'s), or
    None for a dense one."""
    if not method(name).sparse:
        return None
    from ..topology import SMET, NoUpdateWarning

    with warnings.catch_warnings():  # smet-train says it in terms of its options (--update-interval, --max-steps)
        warnings.simplefilter("ignore", NoUpdateWarning)
        return SMET(model, optimizer, **options)
