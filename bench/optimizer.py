"""Optimizer-step benchmarks: the compact SMET AdamW kernel vs ``torch.optim.AdamW`` (fused, foreach).

An AdamW step over ``n`` fp32 elements reads parameter, gradient and both moments and writes parameter and
both moments: ``7 · 4 · n`` bytes (the SMET step also reads and writes one int32 local step per block).
Throughput is reported in GB/s next to a device copy (``dst.copy_(src)``: ``2 · 4 · n`` bytes) measured in the
same run — the practical bandwidth ceiling.

Variants: ``dense`` — a ``[N, K]`` tensor (density 1); ``compact`` — the ``[nnz, b, b]`` values of a layout of
density ``d`` (what SMET stores), stepped by torch AdamW (providers ``torch_adamw_fused``, ``torch_adamw_foreach``) and
by :class:`~smet_kernels.optim.smet_adamw.SMETAdamW` (``smet_adamw``). Shapes: the largest hidden linear of each
configuration (:func:`optimizer_shapes`), or every hidden weight of a model as one tensor (:func:`model_shape`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from smet_kernels.train.model import LinearShape, hidden_linear_shapes, linear_shapes, model_config

from .timing import measure

PROVIDERS = ("smet_adamw", "torch_adamw_fused", "torch_adamw_foreach")
ADAMW_BYTES_PER_ELEMENT = 7 * 4
COPY_BYTES_PER_ELEMENT = 2 * 4


@dataclass(frozen=True)
class OptimizerCase:
    """``op`` (adamw | copy) by ``provider`` on a ``variant`` (dense | compact) tensor of ``shape``."""

    op: str
    provider: str
    variant: str
    shape: LinearShape
    block_size: int | None
    density: float

    def key_row(self, backend: str) -> dict:
        return {
            "suite": "optimizer",
            "op": self.op,
            "provider": self.provider,
            "shape": f"{self.variant}:{self.shape.label}",
            "M": None,
            "K": self.shape.K,
            "N": self.shape.N,
            "block_size": self.block_size,
            "density": self.density,
            "dtype": "fp32",
            "backend": backend if self.provider == "smet_adamw" else "torch",
        }


def optimizer_shapes(config_names) -> list[LinearShape]:
    """The largest hidden linear shape (the SwiGLU gate/up ``[i, h]``) of each configuration."""
    shapes = linear_shapes(config_names)
    by_config: dict[str, LinearShape] = {}
    for shape in shapes:
        config = shape.label.split(":")[0]
        if config not in by_config or shape.N * shape.K > by_config[config].N * by_config[config].K:
            by_config[config] = shape
    return list(by_config.values())


def model_shape(config_name: str, block_size: int = 128) -> LinearShape:
    """Every hidden linear weight of ``config_name`` as one ``[N, h]`` tensor (``h`` the hidden size, ``N`` rounded
    up to a multiple of ``block_size``), labelled ``<config>:hidden``: what one optimizer step of the whole model moves,
    long enough that the GPU, not the step's launch path, sets its time (one ``1b`` gate/up weight at d = 0.25 is
    ~80 MB, ~20 µs of traffic, less than the Python work of a step)."""
    config = model_config(config_name, block_size=block_size)
    total = sum(n * k for n, k in hidden_linear_shapes(config).values())
    h = config.hidden_size
    rows = -(-total // h // block_size) * block_size
    return LinearShape(f"{config_name}:hidden", rows, h)


def optimizer_cases(config_names, densities, block_sizes, providers=PROVIDERS) -> Iterator[OptimizerCase]:
    for provider in providers:
        if provider not in PROVIDERS:
            raise ValueError(f"providers must be in {PROVIDERS}, got {provider!r}")
    for shape in optimizer_shapes(config_names):
        yield OptimizerCase("copy", "device_copy", "dense", shape, None, 1.0)
        for provider in providers:
            if provider != "smet_adamw":
                yield OptimizerCase("adamw", provider, "dense", shape, None, 1.0)
        for b in block_sizes:
            if shape.N % b or shape.K % b:
                continue
            for d in densities:
                for provider in providers:
                    yield OptimizerCase("adamw", provider, "compact", shape, b, d)


def step_function(
    case: OptimizerCase, device: torch.device, seed: int, backend: str | None = None
) -> tuple[Callable[[], None], int, int]:
    """(timed callable, elements, bytes moved per call); ``backend`` selects SMETAdamW's Triton or reference path."""
    fn, numel, moved, _ = _step(case, device, seed, backend)
    return fn, numel, moved


def check_step(case: OptimizerCase, device: torch.device, seed: int = 0, backend: str | None = None) -> str:
    """Empty when one call of the timed step leaves its tensor as the reference does, else a note with the error:
    the copy its source; torch AdamW (fused, foreach) a single-tensor ``torch.optim.AdamW`` step; SMETAdamW its
    pure-PyTorch reference backend. Tolerance: 0.1 % of ``lr`` (a first Adam step moves each element by ~``lr``, by
    ``lr`` / 100 at the start of SMETAdamW's warm-up)."""
    fn, _, _, result = _step(case, device, seed, backend)
    reference, _, _, expected = _step(case, device, seed, backend, reference=True)
    fn()
    reference()
    error = (result.detach().float() - expected.detach().float()).abs().max().item()
    tolerance = 0.0 if case.op == "copy" else 1e-3 * LR
    return "" if error <= tolerance else f"max error {error:.3g} > {tolerance:g}"


LR = 1e-4


def _step(case: OptimizerCase, device: torch.device, seed: int, backend: str | None, reference: bool = False):
    """``(step, elements, bytes moved, the tensor the step writes)``; ``reference``: the step of :func:`check_step`'s
    reference instead."""
    from smet_kernels.layout import BlockLayout

    generator = torch.Generator().manual_seed(seed)
    values = torch.Generator(device).manual_seed(seed)  # drawn where they live: a whole model's values are GBs
    n, k = case.shape.N, case.shape.K
    if case.variant == "dense":
        size, layout = (n, k), None
    else:
        layout = BlockLayout.random(n, k, case.block_size, case.density, generator=generator).to(device)
        size = (layout.nnz, case.block_size, case.block_size)
    numel = int(torch.Size(size).numel())
    if case.op == "copy":
        src = torch.randn(size, generator=values, device=device)
        dst = src.clone() if reference else torch.empty_like(src)
        return (lambda: dst.copy_(src)), numel, COPY_BYTES_PER_ELEMENT * numel, dst
    param = torch.nn.Parameter(0.02 * torch.randn(size, generator=values, device=device))
    param.grad = 0.01 * torch.randn(size, generator=values, device=device)
    moved = ADAMW_BYTES_PER_ELEMENT * numel
    if case.provider == "smet_adamw":
        from smet_kernels.optim.smet_adamw import SMETAdamW

        param.smet_layout = layout
        optimizer = SMETAdamW([param], lr=LR, weight_decay=0.01, backend="reference" if reference else backend)
        moved += 2 * 4 * layout.nnz
    elif reference:
        optimizer = torch.optim.AdamW([param], lr=LR, weight_decay=0.01, fused=False, foreach=False)
    else:
        fused = case.provider == "torch_adamw_fused"
        optimizer = torch.optim.AdamW([param], lr=LR, weight_decay=0.01, fused=fused, foreach=not fused)
    return optimizer.step, numel, moved, param


def run_case(
    case: OptimizerCase,
    device: torch.device,
    timing_kwargs: dict,
    seed: int = 0,
    backend: str | None = None,
    check: bool = True,
) -> dict:
    """Measure ``case``; ``check``: first compare one step with its reference (:func:`check_step`), a mismatch
    recorded as ``status = "wrong"`` with the error as the note (the time is still measured, as for kernels)."""
    note = check_step(case, device, seed, backend) if check else ""
    fn, numel, moved = step_function(case, device, seed, backend)
    fn()  # the first step allocates the optimizer state: outside the clock whatever warm-up the timing does
    timing = measure(fn, device, **timing_kwargs)
    return {
        "nnz_blocks": numel // case.block_size**2 if case.block_size else None,
        "ms_p20": timing.ms_p20,
        "ms_p50": timing.ms_p50,
        "ms_p80": timing.ms_p80,
        "bytes_moved": moved,
        "gbps": moved / (timing.ms_p50 * 1e-3) / 1e9,
        "status": "wrong" if note else "ok",
        "note": note or f"{numel} elements",
    }
