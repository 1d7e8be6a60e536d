"""Measured memory split of a training step: weights, gradients, optimizer states, activations, rest.

Each component is counted from the tensors themselves (distinct storages, so views and shared tensors
count once):

* weights: the model's parameters, plus what block layouts (``p.smet_layout``, ``p.smet_mask_layout``) keep (block
  indices, packed kernel index, version tensor) and the expanded masks that masked-DST layers hold (an eager forward
  builds them);
* gradients: ``p.grad`` of every parameter;
* optimizer: every tensor in ``optimizer.state``;
* activations: every non-parameter tensor autograd saves for backward during the forward pass
  (``torch.autograd.graph.saved_tensors_hooks``);
* rest: the step's peak minus the four above — loss-backward transients, temporaries, workspaces. The peak is
  ``torch.cuda.max_memory_allocated()`` (after ``reset_peak_memory_stats()``) on CUDA, the live bytes of a
  :class:`profiling.memory_trace.LiveBytes` tracker when one is given (a model traced on ``meta``), else unknown
  (``None``) — a CPU has no allocator peak.

Storages are told apart by their ``StorageImpl`` (views and shared tensors count once), which works on ``meta``
too, where every data pointer is 0.

Gradients are kept allocated between steps (``zero_grad(set_to_none=False)``) so that the components add up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .memory_model import COMPONENTS


def _storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    return (str(tensor.device), tensor.untyped_storage()._cdata)


def tensor_bytes(tensors, exclude: set | None = None) -> int:
    """Bytes of the distinct storages behind ``tensors`` (skipping storages in ``exclude``)."""
    seen = set(exclude or ())
    total = 0
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor):
            continue
        key = _storage_key(tensor)
        if key in seen:
            continue
        seen.add(key)
        total += tensor.untyped_storage().nbytes()
    return total


def dense_masks(model: nn.Module) -> list[torch.Tensor]:
    """The expanded ``[out, in]`` masks that masked-DST layers hold (``cached_dense_mask()``), none built here: a
    compiled model builds its masks in its graph, where they are activations, and holds none."""
    masks = [module.cached_dense_mask() for module in model.modules() if hasattr(module, "cached_dense_mask")]
    return [mask for mask in masks if mask is not None]


def layout_tensors(model: nn.Module) -> list[torch.Tensor]:
    """What the block layouts of ``model`` keep (compact values' ``smet_layout``, masked weights'
    ``smet_mask_layout``): block indices, the packed kernel index on the parameter's device and the version tensor."""
    tensors, seen = [], set()
    for p in model.parameters():
        layout = getattr(p, "smet_layout", None) or getattr(p, "smet_mask_layout", None)
        if layout is not None and id(layout) not in seen:
            seen.add(id(layout))
            tensors += [layout.block_indices, layout.kernel_index(p.device), layout.version_tensor]
    return tensors


def weight_bytes(model: nn.Module) -> int:
    return tensor_bytes(list(model.parameters()) + dense_masks(model) + layout_tensors(model))


def gradient_bytes(model: nn.Module) -> int:
    return tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    tensors = []
    for state in optimizer.state.values():
        tensors += [value for value in state.values() if isinstance(value, torch.Tensor)]
    return tensor_bytes(tensors)


class SavedActivations:
    """Context manager counting the bytes of tensors autograd saves for backward (excluding the parameters,
    buffers, dense masks and layout tensors of the module ``exclude``).

    ``with SavedActivations(exclude=model) as acts: loss = model(x)...`` then ``acts.bytes``.
    """

    def __init__(self, exclude: nn.Module | None = None):
        self._exclude: set = set()
        if exclude is not None:
            tensors = (list(exclude.parameters()) + list(exclude.buffers()) + dense_masks(exclude)
                       + layout_tensors(exclude))
            self._exclude = {_storage_key(t) for t in tensors}
        self._seen: set = set()
        self.bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in self._exclude and key not in self._seen:
            self._seen.add(key)
            self.bytes += tensor.untyped_storage().nbytes()
        return tensor

    @staticmethod
    def _unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def __enter__(self) -> "SavedActivations":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


@dataclass(frozen=True)
class MeasuredMemory:
    weights: int
    gradients: int
    optimizer: int
    activations: int
    peak: int | None
    rest: int | None
    peak_source: str

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in COMPONENTS} | {"peak": self.peak}


def measure_step_memory(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    forward: Callable[[], torch.Tensor],
    device: torch.device | str,
    live=None,
) -> MeasuredMemory:
    """Run one step (``loss = forward(); loss.backward(); optimizer.step(); optimizer.zero_grad(False)``)
    and split its memory. Run a warm-up step first so that gradients and optimizer states exist. ``live``: a
    :class:`profiling.memory_trace.LiveBytes` whose peak over the step is the peak (instead of CUDA's)."""
    device = torch.device(device)
    cuda = device.type == "cuda" and live is None
    if live is not None:
        live.reset_peak()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with SavedActivations(exclude=model) as saved:
        loss = forward()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    peak = None
    if cuda:
        torch.cuda.synchronize(device)
        peak = int(torch.cuda.max_memory_allocated(device))
    elif live is not None:
        peak = live.peak
    weights = weight_bytes(model)
    gradients = gradient_bytes(model)
    states = optimizer_state_bytes(optimizer)
    rest = None if peak is None else peak - weights - gradients - states - saved.bytes
    return MeasuredMemory(
        weights=weights,
        gradients=gradients,
        optimizer=states,
        activations=saved.bytes,
        peak=peak,
        rest=rest,
        peak_source="torch.cuda.max_memory_allocated" if cuda else "traced live bytes" if live is not None
        else f"unavailable on {device.type}",
    )
