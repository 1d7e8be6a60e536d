"""pytest-benchmark suite: ``pytest bench --benchmark-only`` (full size on a GPU, tiny on CPU).

Without CUDA the Triton kernels run through the CPU interpreter: ``TRITON_INTERPRET`` must be set before
``smet_kernels`` is imported, so it is set here, at collection time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from smet_kernels.backend import resolve_device  # noqa: E402

DEVICE = resolve_device("auto")
FULL_SIZE = DEVICE.type == "cuda"


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def timed(benchmark, device):
    """``timed(fn, flops=None, bytes_moved=None, **info)``: benchmark ``fn`` with a device synchronise inside each
    timed call (so GPU work is finished before the clock stops) and record TFLOP/s or GB/s in ``extra_info``."""

    def run(fn, flops: int | None = None, bytes_moved: int | None = None, **info):
        def call():
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        call()  # compile / autotune outside the timed rounds
        rounds = 20 if device.type == "cuda" else 3
        benchmark.pedantic(call, rounds=rounds, warmup_rounds=2 if device.type == "cuda" else 0, iterations=1)
        benchmark.extra_info.update(info)
        stats = getattr(benchmark, "stats", None)
        if stats is not None:
            median_s = stats.stats.median
            if flops is not None:
                benchmark.extra_info["tflops"] = flops / median_s / 1e12
            if bytes_moved is not None:
                benchmark.extra_info["gbps"] = bytes_moved / median_s / 1e9

    return run
