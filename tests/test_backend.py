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


def test_auto_on_a_device_triton_cannot_use_warns_once_and_falls_back_to_the_reference(monkeypatch):
    import warnings

    monkeypatch.setattr(backend, "_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [backend.resolve_backend(torch.device("meta"), "auto") for _ in range(3)] == ["reference"] * 3
    assert [str(w.message) for w in caught if w.category is RuntimeWarning] == [
        "smet_kernels: Triton cannot run on device 'meta' (no CUDA, TRITON_INTERPRET unset); using the pure-PyTorch "
        "reference ops"
    ]


def test_the_fallback_warning_does_not_break_a_first_call_compiled_with_fullgraph(monkeypatch):
    """``torch.compile(sparsify(model), fullgraph=True)`` on a CPU without the interpreter (``auto`` is the reference
    there): its first call resolved the backend in the graph, and Dynamo cannot trace ``warnings.warn``."""
    monkeypatch.setattr(backend, "_warned", False)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: t + len(backend.resolve_backend(torch.device("meta"), "auto")), fullgraph=True,
                             backend="eager")  # fmt: skip
    with pytest.warns(RuntimeWarning, match="Triton cannot run on device 'meta'") as caught:
        assert [compiled(torch.zeros(1)).item() for _ in range(2)] == [len("reference")] * 2
    assert len(caught) == 1


@pytest.mark.parametrize("env, expected", [
    ({}, ("auto", "backend")),
    ({"SMET_BACKEND": "reference"}, ("reference", "the SMET_BACKEND environment variable")),
])
def test_the_default_backend_is_auto_unless_smet_backend_names_one(env, expected):
    import os
    import subprocess
    import sys

    child_env = {k: v for k, v in os.environ.items() if k != "SMET_BACKEND"} | env
    code = "from smet_kernels import backend; print(backend.get_backend(), '|', backend._backend_source)"
    out = subprocess.run([sys.executable, "-c", code], env=child_env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == " | ".join(expected)


def test_resolve_device_names_the_setting_for_a_device_type_it_cannot_train_on():
    for name in ("meta", "tpu", "cuda:x"):
        expected = rf"^--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got '{name}'"
        with pytest.raises(ValueError, match=expected):
            backend.resolve_device(name, "--device")
    assert backend.resolve_device(None) == backend.resolve_device("auto")
    assert backend.resolve_device("cpu").type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_resolve_device_says_cuda_is_not_available_on_a_cpu_machine():
    with pytest.raises(ValueError, match="^--device 'cuda:0' requested but CUDA is not available"):
        backend.resolve_device("cuda:0", "--device")


def test_without_the_interpreter_triton_runs_on_cuda_tensors_only(monkeypatch):
    monkeypatch.setattr(backend, "INTERPRET", False)
    assert [backend.triton_can_run(torch.device(d)) for d in ("cuda", "cpu", "meta")] == [True, False, False]
    with pytest.raises(ValueError, match="^backend='triton' cannot run on device cpu: Triton needs a CUDA tensor"):
        backend.resolve_backend(torch.device("cpu"), "triton")


@pytest.mark.parametrize("value", ["1", "true", "on"])
def test_triton_interpret_is_read_as_triton_reads_it(value):
    """``TRITON_INTERPRET=true`` makes Triton interpret its kernels: ``backend='triton'`` then runs on CPU tensors
    (it was refused as 'Triton needs a CUDA tensor', and ``auto`` fell back to the reference, warning 'unset')."""
    import os
    import subprocess
    import sys

    if not hasattr(triton, "knobs"):
        pytest.skip("Triton < 3.4 reads only TRITON_INTERPRET=1")
    code = ("import torch, smet_kernels as sk; from smet_kernels import backend; "
            "print(backend.INTERPRET, backend.resolve_backend(torch.device('cpu'), 'triton'))")
    env = dict(os.environ, TRITON_INTERPRET=value)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "triton"]
