"""Helpers for parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``).

FSDP2 replaces every parameter by a ``DTensor`` sharded on dim 0 in contiguous ``torch.chunk`` pieces (rank ``r``
of ``k`` holds rows ``[r·c, min((r+1)·c, n))`` with ``c = ceil(n / k)``; the last pieces may be shorter or empty).
For compact sparse values ``[nnz, b, b]`` dim 0 is the slot, so every rank owns whole slots: a slot's block,
its Adam moments and its per-block step live on one rank. The layout (slot -> block map) stays replicated.

Plain tensors pass through every helper unchanged, so single-process and DDP code paths are unaffected.
"""

from __future__ import annotations

import torch

try:  # torch.distributed may be unavailable in some builds
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
except ImportError:  # pragma: no cover - builds without torch.distributed
    DTensor = Replicate = Shard = distribute_tensor = None


def is_sharded(tensor) -> bool:
    """True for a ``DTensor`` (a parameter or state tensor managed by FSDP2)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The rank's local shard of a ``DTensor`` (same storage, in-place updates reach the parameter); else itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def check_row_sharded(tensor: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` unless ``tensor`` is plain or a ``DTensor`` sharded only on dim 0 (and/or replicated)."""
    if not is_sharded(tensor):
        return
    for placement in tensor.placements:
        if type(placement) is Replicate or (type(placement) is Shard and placement.dim == 0):
            continue
        raise ValueError(
            f"{name}: sharded as {tuple(tensor.placements)}, but block-sparse values must be sharded on dim 0 "
            "(whole slots per rank), as fully_shard does by default"
        )


def row_range(tensor: torch.Tensor) -> tuple[int, int]:
    """``(start, stop)``: the rows (dim-0 indices) of the global tensor held by this rank."""
    if not is_sharded(tensor):
        return 0, tensor.shape[0]
    check_row_sharded(tensor, "tensor")
    start, length = 0, tensor.shape[0]
    mesh = tensor.device_mesh
    for mesh_dim, placement in enumerate(tensor.placements):
        if isinstance(placement, Shard):
            parts, coordinate = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
            chunk = -(-length // parts)
            low = min(coordinate * chunk, length)
            high = min(low + chunk, length)
            start, length = start + low, high - low
    if length != tensor.to_local().shape[0]:
        raise RuntimeError(f"local shard has {tensor.to_local().shape[0]} rows, expected {length} (torch.chunk layout)")
    return start, start + length


def gather_rows(local_rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """All ranks' ``local_rows`` (one entry per local row of ``like``) joined into the global ``[like.shape[0], ...]``
    tensor on every rank (a collective when ``like`` is sharded)."""
    if not is_sharded(like):
        return local_rows
    shape = torch.Size([like.shape[0], *local_rows.shape[1:]])
    stride = torch.empty(shape, device="meta").stride()
    sharded = DTensor.from_local(local_rows.contiguous(), like.device_mesh, like.placements, shape=shape, stride=stride)
    return sharded.full_tensor()


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (all-gather of a ``DTensor``; a collective), or the tensor itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def shard_like(full_tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full_tensor`` (identical on every rank) cut into a ``DTensor`` with the mesh and placements of ``like``
    (no communication: each rank keeps its own rows)."""
    if not is_sharded(like):
        return full_tensor
    return distribute_tensor(full_tensor.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def zeros_per_row(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A ``[like.shape[0]]`` zero tensor of ``dtype`` sharded on dim 0 like ``like`` (e.g. the per-slot step)."""
    if not is_sharded(like):
        return torch.zeros(like.shape[0], dtype=dtype, device=like.device)
    zeros = torch.zeros(like.to_local().shape[0], dtype=dtype, device=like.to_local().device)
    return DTensor.from_local(zeros, like.device_mesh, like.placements, shape=torch.Size([like.shape[0]]), stride=(1,))
