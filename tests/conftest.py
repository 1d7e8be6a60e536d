"""Test set-up: run Triton kernels through the CPU interpreter when no GPU is present.

TRITON_INTERPRET is read when kernels are decorated, so it must be set before smet_kernels is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture
def reference_backend():
    """The PyTorch reference ops for the whole test (model-level CPU runs would take minutes in the interpreter)."""
    import smet_kernels

    previous = smet_kernels.get_backend()
    smet_kernels.set_backend("reference")
    yield
    smet_kernels.set_backend(previous)
