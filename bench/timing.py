"""Timing of a callable: p20 / median / p80 in milliseconds.

On CUDA this is ``triton.testing.do_bench(fn, quantiles=[0.2, 0.5, 0.8])`` with ``device`` the current device — CUDA
events around each call after warm-up, the L2 cache flushed between calls, a device synchronise before the clock is
read (all on the current device: on another, the events would time an idle stream).
On CPU it is ``time.perf_counter`` around each call after ``warmup`` calls, repeated until both
``min_repeats`` calls and ``budget_s`` seconds have passed (at most ``max_repeats`` calls).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

QUANTILES = (0.2, 0.5, 0.8)


@dataclass(frozen=True)
class Timing:
    ms_p20: float
    ms_p50: float
    ms_p80: float


def measure(
    fn: Callable[[], object],
    device: torch.device | str,
    *,
    warmup: int = 1,
    min_repeats: int = 3,
    max_repeats: int = 50,
    budget_s: float = 0.2,
    gpu_warmup_ms: int = 25,
    gpu_rep_ms: int = 100,
) -> Timing:
    """Quantiles (20 %, 50 %, 80 %) of the wall time of ``fn()`` on ``device``, in ms."""
    device = torch.device(device)
    if device.type == "cuda":
        import triton.testing

        with torch.cuda.device(device):  # do_bench's events, cache flush and synchronise act on the current device
            p20, p50, p80 = triton.testing.do_bench(fn, warmup=gpu_warmup_ms, rep=gpu_rep_ms, quantiles=list(QUANTILES))
        return Timing(float(p20), float(p50), float(p80))
    if min_repeats < 1 or max_repeats < min_repeats:
        raise ValueError(f"need 1 <= min_repeats <= max_repeats, got {min_repeats}, {max_repeats}")
    for _ in range(warmup):
        fn()
    times_ms: list[float] = []
    started = time.perf_counter()
    while len(times_ms) < max_repeats and (len(times_ms) < min_repeats or time.perf_counter() - started < budget_s):
        t0 = time.perf_counter()
        fn()
        times_ms.append((time.perf_counter() - t0) * 1e3)
    p20, p50, p80 = np.quantile(np.asarray(times_ms), QUANTILES)
    return Timing(float(p20), float(p50), float(p80))
