"""Backend switch: ``triton`` kernels or the pure-PyTorch ``reference``.

``auto`` (the default) picks Triton where it can run — CUDA tensors, or instead CPU tensors when the
Triton CPU interpreter is on (``TRITON_INTERPRET=1`` set before import) — and the reference otherwise,
with one warning. Set globally with :func:`set_backend` or the ``SMET_BACKEND`` environment variable, or
per call with the ``backend=`` argument of the ops.
"""

from __future__ import annotations

import os
import warnings

import torch

BACKENDS = ("auto", "triton", "reference")

try:
    import triton

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - triton is a runtime dependency
    TRITON_AVAILABLE = False


def _interpret() -> bool:
    """Whether Triton runs kernels in its CPU interpreter, as Triton itself reads ``TRITON_INTERPRET`` (from 3.4
    ``true``, ``on`` or ``yes`` too, not only ``1``): both must agree on where the kernels can run."""
    knobs = getattr(triton, "knobs", None) if TRITON_AVAILABLE else None
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


INTERPRET = _interpret()


def _interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run our kernels here, or None. Triton <= 3.6 converts a loaded scalar
    (a 1-element numpy array) to a loop bound with ``int()``, which numpy >= 2.4 refuses."""
    if not (INTERPRET and TRITON_AVAILABLE):
        return None
    import numpy

    def version(module) -> tuple[int, int]:
        major, minor = module.__version__.split(".")[:2]
        return int(major), int(minor)

    if version(triton) < (3, 7) and version(numpy) >= (2, 4):
        return (
            f"the interpreter of Triton {triton.__version__} cannot run with numpy {numpy.__version__} "
            "(install numpy<2.4, or Triton >= 3.9)"
        )
    return None


INTERPRETER_PROBLEM = _interpreter_problem()
_backend = os.environ.get("SMET_BACKEND", "auto")
_backend_source = "the SMET_BACKEND environment variable" if "SMET_BACKEND" in os.environ else "backend"
_warned = False


def check_backend(name: str, source: str = "backend") -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name: str) -> None:
    """Select the default backend for every op: ``auto``, ``triton`` or ``reference``."""
    global _backend, _backend_source
    _backend = check_backend(name)
    _backend_source = "backend"


def get_backend() -> str:
    return check_backend(_backend, _backend_source)


def triton_can_run(device: torch.device) -> bool:
    """True when Triton kernels can execute on tensors of ``device``."""
    if not TRITON_AVAILABLE:
        return False
    if INTERPRET:
        return device.type == "cpu" and INTERPRETER_PROBLEM is None
    return device.type == "cuda"


def resolve_device(name: str | None = "auto", source: str = "device") -> torch.device:
    """The device ``name`` names: ``auto`` (or None) is ``cuda`` where CUDA is available, else ``cpu``; otherwise
    ``cpu``, ``cuda`` or ``cuda:N``, checked to exist here (``ValueError`` naming ``source`` and the device)."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):  # an unknown device type such as "tpu"
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"{source} must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{source} {name!r} requested but CUDA is not available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"{source} {name!r}: only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """The concrete backend (``triton`` | ``reference``) for tensors on ``device``."""
    name = check_backend(backend if backend is not None else get_backend())
    if name == "reference":
        return name
    if triton_can_run(device):
        return "triton"
    reason = INTERPRETER_PROBLEM if INTERPRET and device.type == "cpu" else None
    if name == "triton":
        raise ValueError(
            f"backend='triton' cannot run on device {device}: "
            + (reason or "Triton needs a CUDA tensor, or TRITON_INTERPRET=1 set before importing smet_kernels "
               "for CPU tensors (the slow interpreter); or use backend 'reference'")
        )
    return _reference_fallback(device, reason)


@torch.compiler.assume_constant_result
def _reference_fallback(device: torch.device, reason: str | None) -> str:
    """``reference``, warned once per process (a constant that ``torch.compile`` evaluates outside the graph: a
    warning cannot be traced, and ``fullgraph=True`` refused a first call that was compiled)."""
    global _warned
    if not _warned:
        warnings.warn(
            f"smet_kernels: Triton cannot run on device '{device}' "
            f"({reason or 'no CUDA, TRITON_INTERPRET unset'}); using the pure-PyTorch reference ops",
            RuntimeWarning,
            stacklevel=4,
        )
        _warned = True
    return "reference"
