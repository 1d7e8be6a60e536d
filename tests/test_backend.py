"""Backend switch: which implementation runs where, and why not when Triton cannot run."""

import numpy
import pytest
import torch
import triton

from smet_kernels import backend


def test_set_backend_validates_and_resolves():
    previous = backend.get_backend()
    try:
        backend.set_backend("reference")
        assert backend.resolve_backend(torch.device("cpu")) == "reference"
        with pytest.raises(ValueError, match="backend must be one of"):
            backend.set_backend("cuda")
    finally:
        backend.set_backend(previous)


@pytest.mark.parametrize(
    "triton_version, numpy_version, broken",
    [("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False), ("3.9.0", "2.4.6", False), ("3.10.1", "3.0.0", False)],
)
def test_interpreter_incompatibility_is_named(monkeypatch, triton_version, numpy_version, broken):
    """Triton <= 3.6's interpreter cannot take a loaded scalar as a loop bound under numpy >= 2.4."""
    monkeypatch.setattr(backend, "INTERPRET", True)
    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    problem = backend._interpreter_problem()
    assert (problem is not None) == broken
    if broken:
        assert "numpy<2.4" in problem
        monkeypatch.setattr(backend, "INTERPRETER_PROBLEM", problem)
        assert not backend.triton_can_run(torch.device("cpu"))
        with pytest.raises(ValueError, match="numpy<2.4"):
            backend.resolve_backend(torch.device("cpu"), "triton")


def test_a_bad_environment_variable_is_named(monkeypatch):
    monkeypatch.setattr(backend, "_backend", "bogus")
    monkeypatch.setattr(backend, "_backend_source", "the SMET_BACKEND environment variable")
    with pytest.raises(ValueError, match="the SMET_BACKEND environment variable must be one of"):
        backend.resolve_backend(torch.device("cpu"))
