"""Every call of ``smet-bench gpu-check`` into ``smet_kernels.ops``, in one place (the launchers' names may change).

* :func:`matmul_ops`: the three raw block-sparse matmul launchers of one kernel variant;
* :func:`adamw_step` / :func:`regrow`: the fused AdamW step and the regrow initialisation (Triton or reference);
* :func:`autotuners` and :func:`restrict_configs`: the Triton autotuners of the matmul kernels and a context that
  limits each to a small set of configs (the compile / autotune budget of a bounded GPU run); :func:`pinned_configs`
  is that set for one block size; :func:`tuning_caches` carries a block's picks into a later one.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from smet_kernels.ops.variant import VARIANTS

from .plan import PINNED_CONFIGS

# kernel family of each autotuner: the dense-sparse loop (forward / input grad), its persistent form, the weight grad
_AUTOTUNERS = {
    "bsmm_dense_sparse_kernel": "dense_sparse",
    "bsmm_dense_sparse_persistent_kernel": "dense_sparse_persistent",
    "bsmm_dense_sparse_tma_kernel": "dense_sparse",
    "bsmm_grad_weight_kernel": "grad_weight",
    "bsmm_grad_weight_tma_kernel": "grad_weight",
}


def matmul_ops(variant: str) -> dict[str, Callable]:
    """``forward(x, values, layout)``, ``grad_input(dy, values, layout)``, ``grad_weight(dy, x, layout, split_k)``
    of ``variant`` (the weight grad has no persistent form: ``persistent`` runs the pointer kernel, as the library)."""
    from smet_kernels.ops import block_sparse_matmul as bsmm

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return {
        "forward": lambda x, values, layout: bsmm.triton_bsmm_forward(
            x, values, layout.row_index(x.device), layout.shape[0], variant=variant
        ),
        "grad_input": lambda dy, values, layout: bsmm.triton_bsmm_grad_input(
            dy, values, layout.col_index(dy.device), layout.shape[1], variant=variant
        ),
        "grad_weight": lambda dy, x, layout, split_k: bsmm.triton_bsmm_grad_weight(
            dy, x, layout.block_indices_on(x.device), layout.block_size, split_k=split_k, variant=variant
        ),
    }


def adamw_step(param, grad, exp_avg, exp_avg_sq, block_step, *, lr, backend, **hyper) -> None:
    """One SMET AdamW step of one sparse tensor in place: the fused kernel (``backend="triton"``) or the reference."""
    from smet_kernels.ops.library import adamw_step as library_adamw_step
    from smet_kernels.reference.adamw import torch_adamw_step

    if backend == "reference":
        torch_adamw_step(param, grad, exp_avg, exp_avg_sq, block_step, lr=lr, **hyper)
    else:
        library_adamw_step([param], [grad], [exp_avg], [exp_avg_sq], [block_step], [lr], [None], backend=backend,
                           **hyper)  # fmt: skip


def regrow(values, slots, exp_avg, exp_avg_sq, block_step, generator, backend) -> None:
    """Regrow ``slots`` with ``N(0, 0.02²)`` blocks drawn from ``generator`` and reset their AdamW state."""
    from smet_kernels.ops.library import regrow_blocks

    regrow_blocks(values, slots, exp_avg, exp_avg_sq, block_step, init="normal", generator=generator, backend=backend)


def warmup_modes() -> tuple[str, ...]:
    from smet_kernels.reference.adamw import WARMUP_MODES

    return WARMUP_MODES


def autotuners() -> Iterator[tuple[str, str, object]]:
    """``(name, family, autotuner)`` of each block-sparse matmul kernel."""
    from smet_kernels.ops import block_sparse_matmul as bsmm

    for name, family in _AUTOTUNERS.items():
        yield name, family, getattr(bsmm, name)


def per_kernel(by_family: dict[str, set]) -> dict[str, set]:
    """A config selection per kernel family (``dense_sparse``, ``dense_sparse_persistent``, ``grad_weight``) spelled
    per kernel, the form :func:`restrict_configs` takes."""
    return {name: by_family.get(family, set()) for name, family, _ in autotuners()}


def pinned_configs(block_size: int, device: torch.device) -> dict[str, set] | None:
    """The pinned configs of ``block_size`` per kernel on a GPU (``plan.PINNED_CONFIGS``), the form
    :func:`restrict_configs` takes; None (every config, the interpreter's single one) elsewhere."""
    return per_kernel(PINNED_CONFIGS.get(block_size, {})) if device.type == "cuda" else None


def config_key(config) -> tuple[int, int, int]:
    return config.kwargs["BLOCK_M"], config.num_warps, config.num_stages


@contextlib.contextmanager
def restrict_configs(allowed: dict[str, set[tuple[int, int, int]]] | None, caches: dict[str, dict] | None = None):
    """Within the block, each matmul autotuner keeps only the configs whose ``(BLOCK_M, num_warps, num_stages)`` is
    in ``allowed[kernel name]`` (its own config objects, so TMA pre-hooks stay) and starts with an empty tuning
    cache (and no ``best_config``), or with the picks among those configs in ``caches[kernel name]`` (what
    :func:`tuning_caches` saved in an earlier block: those keys are not tuned again). The kernel's pruner still
    applies to two or more configs; Triton launches a lone config without it, so a pinned config must be one the
    pruner keeps (``plan.PINNED_CONFIGS`` are, see ``reports/static-sm90``). ``None`` or an empty selection leave a
    kernel as it is (the interpreter's single config). The original configs and cache come back afterwards."""
    saved = []
    try:
        for name, _, tuner in autotuners():
            keep = [c for c in tuner.configs if config_key(c) in (allowed or {}).get(name, set())]
            if keep:
                saved.append((tuner, tuner.configs, dict(tuner.cache), getattr(tuner, "best_config", None)))
                kept = {id(c) for c in keep}
                cache = {key: c for key, c in (caches or {}).get(name, {}).items() if id(c) in kept}
                tuner.configs, tuner.cache, tuner.best_config = keep, cache, None
        yield
    finally:
        for tuner, configs, cache, best in saved:
            tuner.configs, tuner.cache, tuner.best_config = configs, cache, best


def tuning_caches() -> dict[str, dict]:
    """Per kernel, a copy of its autotuner's tuning cache (key -> picked config), for a later
    :func:`restrict_configs` on the same configs to start from."""
    return {name: dict(tuner.cache) for name, _, tuner in autotuners()}


def chosen_configs() -> dict[str, set[tuple[int, int, int]]]:
    """Per kernel, the configs its autotuner picked since :func:`restrict_configs` cleared its cache (one per tuned
    key, e.g. forward and input grad of the headline shape; a lone config is run untuned, as ``best_config``): later
    shapes choose among these, compiled already. A kernel that did not run since then has none."""
    chosen: dict[str, set[tuple[int, int, int]]] = {}
    for name, _, tuner in autotuners():
        picks = list(tuner.cache.values()) or [getattr(tuner, "best_config", None)]
        keys = {config_key(c) for c in picks if c is not None and "BLOCK_M" in c.kwargs}
        if keys:
            chosen[name] = keys
    return chosen
