"""Device memory sampled by NVML (``pynvml``) in a background thread.

``torch.cuda.max_memory_allocated`` sees only the caching allocator's live tensors; NVML sees what the
driver has handed to the process (allocator cache, CUDA context, cuBLAS workspaces, Triton modules).
The sampler polls ``nvmlDeviceGetMemoryInfo(handle).used`` every ``interval_s`` and keeps the peak.

Without a GPU, without the ``nvidia-ml-py`` package or without an NVIDIA driver it does not fail: it
reports ``available = False`` and a ``status`` string that says why, and its peak is ``None``.

NVML numbers all GPUs of the machine; torch numbers only the visible ones (``CUDA_VISIBLE_DEVICES``), so
``cuda:0`` is not NVML device 0 in general: :func:`nvml_device_index` / :meth:`NvmlMemorySampler.for_device`
translate. NVML's ``used`` is device-wide (every process on the GPU), so measure on an otherwise idle GPU.
"""

from __future__ import annotations

import math
import threading
import time

import torch


def nvml_device_index(device: torch.device | str | int) -> int:
    """NVML's index of the torch CUDA ``device`` (``CUDA_VISIBLE_DEVICES`` taken into account, indices or UUIDs)."""
    if isinstance(device, int):
        device = torch.device("cuda", device)
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device must be a CUDA device, got {device}")
    index = device.index if device.index is not None else torch.cuda.current_device()
    return int(torch.cuda._get_nvml_device_index(index))


class NvmlMemorySampler:
    """Context manager: ``with NvmlMemorySampler(device_index) as s: ...; s.peak_used_bytes``.

    ``device_index`` is NVML's index (see :meth:`for_device` for a torch device). ``status`` is ``"ok"`` when
    sampling worked, ``"unavailable: <reason>"`` when it could not start and ``"failed: <reason>"`` when NVML
    stopped answering mid-run (the peak so far is kept).
    """

    def __init__(self, device_index: int = 0, interval_s: float = 0.005):
        if isinstance(device_index, bool) or not isinstance(device_index, int) or device_index < 0:
            raise ValueError(f"device_index must be a non-negative int, got {device_index!r}")
        # NaN failed the first sleep; an infinite interval slept forever and stop() never returned
        if isinstance(interval_s, bool) or not isinstance(interval_s, (int, float)) or not 0 < interval_s < math.inf:
            raise ValueError(f"interval_s must be a positive finite number, got {interval_s!r}")
        self.device_index = device_index
        self.interval_s = float(interval_s)
        self.status = "not started"
        self.peak_used_bytes: int | None = None
        self.baseline_used_bytes: int | None = None
        self._nvml = None
        self._handle = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unresolved: str | None = None

    @classmethod
    def for_device(cls, device: torch.device | str | int, interval_s: float = 0.005) -> "NvmlMemorySampler":
        """A sampler of the GPU that torch calls ``device``; when its NVML index cannot be resolved the sampler
        reports ``unavailable`` with the reason instead of sampling another GPU."""
        try:
            index = nvml_device_index(device)
        except Exception as error:  # noqa: BLE001 - e.g. OSError: torch resolving GPU UUIDs cannot load NVML
            sampler = cls(0, interval_s)
            sampler._unresolved = f"unavailable: no NVML index for {device}: {error}"
            return sampler
        return cls(index, interval_s)

    @property
    def available(self) -> bool:
        """True once sampling has started successfully (stays True after :meth:`stop`)."""
        return self.status == "ok"

    def _open(self) -> None:
        if self._unresolved is not None:
            self.status = self._unresolved
            return
        try:
            import pynvml
        except ImportError:
            self.status = "unavailable: the nvidia-ml-py package (pynvml) is not installed"
            return
        try:
            pynvml.nvmlInit()
        except Exception as error:  # noqa: BLE001 - NVMLError, or the library failing to load
            self.status = f"unavailable: {type(error).__name__}: {error}"
            return
        try:
            count = pynvml.nvmlDeviceGetCount()
            if self.device_index >= count:
                _shutdown(pynvml)
                self.status = f"unavailable: NVML sees {count} device(s), no index {self.device_index}"
                return
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(self.device_index)
            self._nvml = pynvml
        except Exception as error:  # noqa: BLE001 - an NVMLError after nvmlInit: its init is undone
            self.status = f"unavailable: {type(error).__name__}: {error}"
            _shutdown(pynvml)

    def _used(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._sample()
                time.sleep(self.interval_s)
        except Exception as error:  # noqa: BLE001 - e.g. the GPU fell off the bus: keep the peak so far, say so
            self.status = f"failed: {type(error).__name__}: {error}"

    def _sample(self) -> None:
        used = self._used()
        if self.peak_used_bytes is None or used > self.peak_used_bytes:
            self.peak_used_bytes = used

    def start(self) -> "NvmlMemorySampler":
        if self._thread is not None:
            raise RuntimeError("NvmlMemorySampler is already running; stop() it before starting it again")
        self._open()
        if self._handle is None:
            return self
        try:
            self.baseline_used_bytes = self._used()
        except self._nvml.NVMLError as error:
            self.status = f"failed: {type(error).__name__}: {error}"
            return self
        self.peak_used_bytes = self.baseline_used_bytes
        self._stop.clear()
        self.status = "ok"
        self._thread = threading.Thread(target=self._run, name="nvml-memory-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            if self.status == "ok":
                try:
                    self._sample()
                except self._nvml.NVMLError as error:
                    self.status = f"failed: {type(error).__name__}: {error}"
        if self._nvml is not None:
            _shutdown(self._nvml)  # the samples were all taken (a failed one set the status): they stand
            self._nvml = None
            self._handle = None

    def __enter__(self) -> "NvmlMemorySampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _shutdown(pynvml) -> None:
    """``nvmlShutdown``, whose own failure (the GPU fell off the bus) changes nothing the sampler reports."""
    try:
        pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        pass
