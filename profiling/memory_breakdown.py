"""Measured memory split of a training step: weights, gradients, optimizer states, activations, rest.

Each component is counted from the tensors themselves (distinct storages, so views and shared tensors
count once):

* weights: the model's parameters, plus what block-sparse layouts (``p.smet_layout``) keep (block indices, packed
  kernel index, version tensor) and the expanded masks of masked-DST layers (modules with a ``dense_mask()`` method);
* gradients: ``p.grad`` of every parameter;
* optimizer: every tensor in ``optimizer.state``;
* activations: every non-parameter tensor autograd saves for backward during the forward pass
  (``torch.autograd.graph.saved_tensors_hooks``);
* rest: on CUDA, ``torch.cuda.max_memory_allocated()`` (after ``reset_peak_memory_stats()``) minus the four
  above — loss-backward transients, temporaries, workspaces. Without CUDA the peak is unknown and rest is ``None``.

Gradients are kept allocated between steps (``zero_grad(set_to_none=False)``) so that the components add up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


def _storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    storage = tensor.untyped_storage()
    return (str(tensor.device), storage.data_ptr())


def tensor_bytes(tensors, exclude: set | None = None) -> int:
    """Bytes of the distinct storages behind ``tensors`` (skipping storages in ``exclude``)."""
    seen = set(exclude or ())
    total = 0
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            continue
        key = _storage_key(tensor)
        if key in seen:
            continue
        seen.add(key)
        total += tensor.untyped_storage().nbytes()
    return total


def dense_masks(model: nn.Module) -> list[torch.Tensor]:
    """The expanded ``[out, in]`` masks held by masked-DST layers (modules with a ``dense_mask()`` method)."""
    return [module.dense_mask() for module in model.modules() if callable(getattr(module, "dense_mask", None))]


def layout_tensors(model: nn.Module) -> list[torch.Tensor]:
    """What the block-sparse layouts of ``model`` keep: block indices, the packed kernel index on the values'
    device and the version tensor."""
    tensors, seen = [], set()
    for p in model.parameters():
        layout = getattr(p, "smet_layout", None)
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
        if tensor.device.type != "meta":
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
        return {
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "rest": self.rest,
            "peak": self.peak,
        }


def measure_step_memory(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    forward: Callable[[], torch.Tensor],
    device: torch.device | str,
) -> MeasuredMemory:
    """Run one step (``loss = forward(); loss.backward(); optimizer.step(); optimizer.zero_grad(False)``)
    and split its memory. Run a warm-up step first so that gradients and optimizer states exist."""
    device = torch.device(device)
    cuda = device.type == "cuda"
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
        peak_source="torch.cuda.max_memory_allocated" if cuda else "unavailable on cpu",
    )
