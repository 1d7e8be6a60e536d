"""Which kernel variant of the block-sparse products runs: ``grouped``, ``persistent`` or ``tma``
(:mod:`.block_sparse_matmul`).

Without ``variant=`` a launcher runs :func:`default_variant`: ``SMET_MATMUL_VARIANT``, else :data:`DEFAULT_VARIANT`.
``tma`` needs sm_90+ (:func:`tma_supported`): on an older GPU a default ``tma`` runs as ``grouped``, and while torch
records a graph (:func:`tracing`) ``tma`` runs as ``grouped`` too (:func:`traceable_variant`): its descriptors need
real data pointers. Each is the same product, with tiles loaded by pointers.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
from torch._subclasses.fake_tensor import is_fake

VARIANTS = ("grouped", "persistent", "tma")

#: the variant used when neither ``variant=`` nor ``SMET_MATMUL_VARIANT`` names one: the fastest of
#: ``gpu_check.md``'s "Kernel variants" table (``grouped`` until a GPU has measured them)
DEFAULT_VARIANT = "grouped"


@torch.compiler.assume_constant_result
def tma_supported(device: torch.device) -> bool:
    """Whether ``variant='tma'`` can run on ``device``: a CUDA GPU of sm_90 or newer, or the CPU interpreter (a
    constant that ``torch.compile`` evaluates once)."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (9, 0)


@functools.cache
def _warn_tma_unsupported(device: torch.device) -> None:
    warnings.warn(f"SMET_MATMUL_VARIANT=tma runs as 'grouped' on {device}: TMA needs a GPU of sm_90 or newer")


@torch.compiler.assume_constant_result
def _tma_fallback(device: torch.device, requested: bool) -> str:
    """``grouped``, warned once per device when the environment ``requested`` ``tma`` (a constant that
    ``torch.compile`` evaluates outside the graph: a warning cannot be traced)."""
    if requested:
        _warn_tma_unsupported(device)
    return "grouped"


def default_variant(device: torch.device | None = None) -> str:
    """The variant used when none is passed: ``SMET_MATMUL_VARIANT`` (read at each call, so a training run can be
    A/B-timed end to end: ``SMET_MATMUL_VARIANT=tma smet-train ...``; a compiled model reads it when traced, and
    Dynamo does not guard a variable unset then), else :data:`DEFAULT_VARIANT`. On a
    ``device`` without TMA (:func:`tma_supported`) a default ``tma`` is ``grouped``, the same product (warned once
    when the environment asked for ``tma``); a ``variant='tma'`` passed explicitly is refused there instead."""
    requested = os.environ.get("SMET_MATMUL_VARIANT")
    variant = DEFAULT_VARIANT if requested is None else requested
    if variant not in VARIANTS:
        raise ValueError(f"the SMET_MATMUL_VARIANT environment variable must be one of {VARIANTS}, got {variant!r}")
    if variant == "tma" and device is not None and not tma_supported(device):
        return _tma_fallback(device, requested is not None)
    return variant


@functools.cache
def _warn_tma_traced() -> None:
    warnings.warn(
        "variant='tma' runs as 'grouped' under torch.compile: TMA descriptors need real data pointers and the TMA "
        "kernels' autotune pre_hook cannot be traced by wrap_triton",
        stacklevel=3,
    )


#: the dispatch modes that record a graph (AOTAutograd, ``make_fx``): they sit in torch's infra-mode slots
_RECORDING_MODES = (torch._C._TorchDispatchModeKey.FAKE, torch._C._TorchDispatchModeKey.PROXY,
                    torch._C._TorchDispatchModeKey.FUNCTIONAL)  # fmt: skip


def tracing(*tensors: torch.Tensor) -> bool:
    """Whether torch is recording a graph of this call rather than running it: Dynamo, a recording dispatch mode
    (AOTAutograd's functional / fake / proxy modes), or fake ``tensors``. Other dispatch modes run the call on real
    tensors (selective activation checkpointing, ``FlopCounterMode``): not tracing, so ``tma`` stays ``tma``."""
    recording = any(torch._C._get_dispatch_mode(key) is not None for key in _RECORDING_MODES)
    return torch.compiler.is_compiling() or recording or any(is_fake(t) for t in tensors)


def traceable_variant(variant: str, *tensors: torch.Tensor) -> str:
    """``variant``, or ``grouped`` for ``tma`` while :func:`tracing` (warned once): the same product, with tiles
    loaded by pointers."""
    if variant == "tma" and tracing(*tensors):
        _warn_tma_traced()
        return "grouped"
    return variant
