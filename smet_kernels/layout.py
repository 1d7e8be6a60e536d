"""Block layout of a block-sparse weight: which ``b x b`` blocks of ``W [out, in]`` are active.

Value slot ``k`` of a compact values tensor ``[nnz, b, b]`` holds block ``block_indices[k] = (r, c)``,
i.e. ``W[r*b:(r+1)*b, c*b:(c+1)*b]``. The kernels need two orderings of the active blocks, built once
per layout version and cached per device:

* row-major (CSR): for each block row ``r`` the slots and block columns of its active blocks;
* column-major (CSC): for each block column ``c`` the slots and block rows of its active blocks.

A topology update (:meth:`BlockLayout.replace_blocks`) rewrites ``block_indices`` in place and bumps
``version``; the orderings are rebuilt lazily on next use.

The custom ops (:mod:`smet_kernels.ops.library`) take all of it as one packed int32 tensor per device,
:meth:`BlockLayout.kernel_index`, which a topology update rewrites *in place* (same tensor, same shape, as nnz is
constant), and the int64 ``[1]`` CPU tensor :attr:`BlockLayout.version_tensor`: a compiled graph keeps reading the
same inputs across topology updates, so it is not recompiled.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)


@dataclass(frozen=True)
class BlockIndex:
    """A compressed ordering of the active blocks (CSR when ``major`` is rows, CSC when columns).

    ``ptr[i]:ptr[i+1]`` are the positions of major index ``i``; ``slots[p]`` is the value slot and
    ``minor[p]`` the minor block index (column for CSR, row for CSC) at position ``p``; ``by_count`` lists the
    major indices by their number of active blocks, largest first (ties by index), for schedules that run long
    rows first. All int32.
    """

    ptr: torch.Tensor
    slots: torch.Tensor
    minor: torch.Tensor
    by_count: torch.Tensor


def check_block_size(block_size: int, name: str = "block_size") -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"{name} must be an int in {SUPPORTED_BLOCK_SIZES}, got {type(block_size).__name__}")
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"{name} must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size}")
    return block_size


def check_density(density: float, name: str = "density") -> float:
    if isinstance(density, bool) or not isinstance(density, numbers.Real):
        raise TypeError(f"{name} must be a float in (0, 1], got {type(density).__name__}")
    if not (0.0 < float(density) <= 1.0) or math.isnan(density):
        raise ValueError(f"{name} must be in (0, 1], got {density}")
    return float(density)


def check_divisible(size: int, block_size: int, name: str) -> int:
    if isinstance(size, bool) or not isinstance(size, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(size).__name__}")
    size = int(size)
    if size <= 0:
        raise ValueError(f"{name} must be positive, got {size}")
    if size % block_size != 0:
        raise ValueError(f"{name}={size} is not divisible by block_size={block_size}")
    return size


def check_generator(generator: torch.Generator | None, name: str = "generator") -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator or None, got {type(generator).__name__}")


def _static(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` marked static for Dynamo: under ``dynamic=True`` its sizes were symbols, duck-sized with an equal
    token count ``M``, which a comparison with the layout's constant sizes then fixed (a recompile at the next M)."""
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static(tensor)
    return tensor


def nnz_for_density(num_blocks: int, density: float) -> int:
    """``round(d * blocks)``, at least one block: Python's ``round`` of the float product (a decimal tie may go
    either way by the density's float error, 0.07 · 150 -> 11; kept, as every saved layout's nnz depends on it)."""
    return max(1, min(num_blocks, int(round(density * num_blocks))))


class BlockLayout:
    """Active ``b x b`` blocks of a ``[out_features, in_features]`` weight.

    Build with :meth:`from_mask` or :meth:`random`; both number the slots in row-major order.
    """

    def __init__(self, block_indices: torch.Tensor, shape: tuple[int, int], block_size: int):
        check_block_size(block_size)
        if not isinstance(shape, (tuple, list)) or len(shape) != 2:
            raise ValueError(f"shape must be (out_features, in_features), got {shape!r}")
        out_features = check_divisible(shape[0], block_size, "out_features")
        in_features = check_divisible(shape[1], block_size, "in_features")
        if not isinstance(block_indices, torch.Tensor):
            raise TypeError(f"block_indices must be a torch.Tensor, got {type(block_indices).__name__}")
        if block_indices.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"block_indices must be an integer tensor, got {block_indices.dtype}")
        if block_indices.dim() != 2 or block_indices.shape[1] != 2:
            raise ValueError(f"block_indices must have shape [nnz, 2], got {tuple(block_indices.shape)}")
        if block_indices.is_meta:
            raise ValueError("block_indices is a meta tensor: a layout needs the indices' values")
        if block_indices.shape[0] == 0:
            raise ValueError("block_indices must hold at least one active block (nnz >= 1)")
        self._block_size = block_size
        self._shape = (out_features, in_features)
        self.version = 0
        self._cache: dict = {}
        # tensors a layout made under inference mode keeps for training: normal ones (an inference tensor can
        # neither be saved for backward nor be rewritten in place by a topology update)
        with torch.inference_mode(False):
            self._block_indices = _static(block_indices.to(torch.int64).contiguous().clone())
            self._check_indices(self._block_indices)
            # device -> packed index (built here, eagerly, so a traced graph finds it), rewritten in place by _bump
            self._kernel_index = {str(self.device): _static(self._pack_kernel_index())}
            #: ``[version]`` as an int64 CPU tensor, rewritten in place by a topology update (see :meth:`kernel_index`)
            self.version_tensor = _static(torch.zeros(1, dtype=torch.int64, device="cpu"))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_mask(cls, mask: torch.Tensor, block_size: int) -> "BlockLayout":
        """Layout whose active blocks are the ``True`` entries of ``mask [out//b, in//b]`` (row-major slots)."""
        check_block_size(block_size)
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.dim() != 2:
            raise ValueError(f"mask must be 2-D [out//b, in//b], got shape {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        if mask.is_meta:
            raise ValueError("mask is a meta tensor: a layout needs the mask's values")
        if not bool(mask.any()):
            raise ValueError("mask must have at least one active block")
        indices = mask.nonzero()  # row-major order
        shape = (mask.shape[0] * block_size, mask.shape[1] * block_size)
        return cls(indices.to(mask.device), shape, block_size)

    @classmethod
    def random(
        cls,
        out_features: int,
        in_features: int,
        block_size: int,
        density: float,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> "BlockLayout":
        """Exactly ``round(density * blocks)`` (>= 1) active blocks chosen uniformly at random."""
        check_block_size(block_size)
        check_divisible(out_features, block_size, "out_features")
        check_divisible(in_features, block_size, "in_features")
        density = check_density(density)
        check_generator(generator)
        rows, cols = out_features // block_size, in_features // block_size
        nnz = nnz_for_density(rows * cols, density)
        draw_device = generator.device if generator is not None else "cpu"  # a CUDA generator draws on CUDA
        chosen = torch.randperm(rows * cols, generator=generator, device=draw_device)[:nnz].sort().values.cpu()
        indices = torch.stack([chosen // cols, chosen % cols], dim=1)
        return cls(indices.to(device or "cpu"), (out_features, in_features), block_size)

    # ------------------------------------------------------------------ properties
    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    @property
    def block_shape(self) -> tuple[int, int]:
        """``(out//b, in//b)``: the shape of :attr:`mask`."""
        return (self._shape[0] // self._block_size, self._shape[1] // self._block_size)

    @property
    def num_blocks(self) -> int:
        return self.block_shape[0] * self.block_shape[1]

    @property
    def nnz(self) -> int:
        return int(self._block_indices.shape[0])

    @property
    def density(self) -> float:
        return self.nnz / self.num_blocks

    @property
    def device(self) -> torch.device:
        return self._block_indices.device

    @property
    def block_indices(self) -> torch.Tensor:
        """LongTensor ``[nnz, 2]``: (block row, block col) held by each value slot."""
        return self._block_indices

    @property
    def mask(self) -> torch.Tensor:
        """Bool ``[out//b, in//b]``, True at active blocks."""
        key = ("mask", self.version)
        if key not in self._cache:
            mask = torch.zeros(self.block_shape, dtype=torch.bool, device=self.device)
            mask[self._block_indices[:, 0], self._block_indices[:, 1]] = True
            self._cache[key] = mask
        return self._cache[key]

    # ------------------------------------------------------------------ kernel index structures
    def row_index(self, device: torch.device | str | None = None) -> BlockIndex:
        """CSR ordering: block row -> (slots, block columns), columns ascending."""
        return self._index("row", torch.device(device) if device is not None else self.device)

    def col_index(self, device: torch.device | str | None = None) -> BlockIndex:
        """CSC ordering: block column -> (slots, block rows), rows ascending."""
        return self._index("col", torch.device(device) if device is not None else self.device)

    def _index(self, major: str, device: torch.device) -> BlockIndex:
        key = (major, self.version, str(device))
        if key not in self._cache:
            index = _compressed_index(self._block_indices.cpu(), major, self.block_shape)
            tensors = (index.ptr, index.slots, index.minor, index.by_count)
            self._cache[key] = BlockIndex(*(t.to(device) for t in tensors))
        return self._cache[key]

    def block_indices_on(self, device: torch.device | str) -> torch.Tensor:
        """:attr:`block_indices` as contiguous int32 ``[nnz, 2]`` on ``device`` (cached per version)."""
        key = ("block_indices_i32", self.version, str(torch.device(device)))
        if key not in self._cache:
            self._cache[key] = self._block_indices.to(device=device, dtype=torch.int32).contiguous()
        return self._cache[key]

    def kernel_index(self, device: torch.device | str) -> torch.Tensor:
        """Every index the ops need, packed as one int32 tensor on ``device`` (see :func:`unpack_kernel_index`):
        ``[block_indices (2·nnz) | CSR ptr, slots, cols, by_count | CSC ptr, slots, rows, by_count]``.

        One tensor per device for the layout's lifetime: a topology update rewrites it in place, so a compiled
        graph that reads it stays valid (no recompile) and the version check, not a stale copy, catches a backward
        that runs after the update."""
        key = str(torch.device(device))
        if key not in self._kernel_index:  # a copy of the layout device's index (traceable: no data-dependent shape)
            with torch.inference_mode(False):  # first built under inference mode, it still serves training
                self._kernel_index[key] = _static(self._kernel_index[str(self.device)].to(device))
        return self._kernel_index[key]

    def _pack_kernel_index(self) -> torch.Tensor:
        """The packed index, on the layout's device."""
        indices = self._block_indices.cpu()
        parts = [indices.reshape(-1)]
        for major in ("row", "col"):
            index = _compressed_index(indices, major, self.block_shape)
            parts += [index.ptr, index.slots, index.minor, index.by_count]
        return torch.cat([p.to(torch.int32) for p in parts]).to(self.device)

    # ------------------------------------------------------------------ topology updates
    def replace_blocks(self, slots: torch.Tensor, new_blocks: torch.Tensor) -> None:
        """Move value slots ``slots`` to blocks ``new_blocks [n, 2]`` in place (prune + regrow).

        The new layout must hold no duplicate blocks. Bumps :attr:`version` so index structures are rebuilt.
        """
        slots = _integer_tensor(slots, "slots").to(self.device).reshape(-1)
        new_blocks = _integer_tensor(new_blocks, "new_blocks").to(self.device)
        if new_blocks.numel() and (new_blocks.dim() > 2 or new_blocks.shape[-1:] != (2,)):
            raise ValueError(f"new_blocks must have shape [n, 2], got {tuple(new_blocks.shape)}")
        new_blocks = new_blocks.reshape(-1, 2)
        if slots.numel() != new_blocks.shape[0]:
            raise ValueError(f"slots ({slots.numel()}) and new_blocks ({new_blocks.shape[0]}) differ in length")
        if slots.numel() == 0:
            return
        if int(slots.min()) < 0 or int(slots.max()) >= self.nnz:
            raise ValueError(f"slots must lie in [0, {self.nnz}), got range [{int(slots.min())}, {int(slots.max())}]")
        if torch.unique(slots).numel() != slots.numel():
            raise ValueError("slots must not repeat")
        updated = self._block_indices.clone()
        updated[slots] = new_blocks
        self._check_indices(updated)
        self._block_indices.copy_(updated)
        self._bump()

    def set_block_indices(self, block_indices: torch.Tensor) -> None:
        """Replace the whole slot -> block map (same nnz), e.g. when restoring a checkpoint."""
        block_indices = self.check_block_indices(block_indices)
        self._block_indices.copy_(block_indices.to(self.device))
        self._bump()

    def check_block_indices(self, block_indices: torch.Tensor) -> torch.Tensor:
        """``block_indices`` as int64 if :meth:`set_block_indices` would take it, else ``TypeError``/``ValueError``;
        changes nothing (for callers that check several layouts before restoring any)."""
        block_indices = _integer_tensor(block_indices, "block_indices")
        if tuple(block_indices.shape) != tuple(self._block_indices.shape):
            raise ValueError(
                f"block_indices must have shape {tuple(self._block_indices.shape)}, got {tuple(block_indices.shape)}"
            )
        self._check_indices(block_indices)
        return block_indices

    def _bump(self) -> None:
        self.version += 1
        self._cache.clear()
        # in place, through .data: autograd's saved-tensor check must not pre-empt the ops' own version check
        self.version_tensor.data.fill_(self.version)
        packed = self._pack_kernel_index()
        for index in self._kernel_index.values():
            index.data.copy_(packed)

    def _check_indices(self, indices: torch.Tensor) -> None:
        n_rows, n_cols = self.block_shape
        if indices.numel() and (
            int(indices[:, 0].min()) < 0
            or int(indices[:, 0].max()) >= n_rows
            or int(indices[:, 1].min()) < 0
            or int(indices[:, 1].max()) >= n_cols
        ):
            raise ValueError(f"block_indices out of range for a block grid of {n_rows}x{n_cols}")
        flat = indices[:, 0] * n_cols + indices[:, 1]
        if torch.unique(flat).numel() != flat.numel():
            raise ValueError("block_indices must not contain duplicate blocks")

    # ------------------------------------------------------------------ misc
    def to(self, device: torch.device | str) -> "BlockLayout":
        """This layout with ``block_indices`` on ``device`` (self when already there)."""
        if torch.device(device) == self.device:
            return self
        return BlockLayout(self._block_indices.to(device), self._shape, self._block_size)

    def clone(self) -> "BlockLayout":
        return BlockLayout(self._block_indices.clone(), self._shape, self._block_size)

    def state_dict(self) -> dict:
        return {
            "block_indices": self._block_indices.cpu().clone(),
            "shape": self._shape,
            "block_size": self._block_size,
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> "BlockLayout":
        """The layout of a :meth:`state_dict` (checked as the constructor checks its arguments)."""
        keys = ("block_indices", "shape", "block_size")
        missing = [key for key in keys if not isinstance(state, dict) or key not in state]
        if missing:  # e.g. a layer's state dict, which holds block_indices only
            raise ValueError(f"state is not a BlockLayout.state_dict(): it lacks {missing}")
        shape, block_size = state["shape"], state["block_size"]
        shape = tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else shape
        block_size = int(block_size) if isinstance(block_size, numbers.Integral) else block_size  # 16.7 is refused
        return cls(state["block_indices"], shape, block_size)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlockLayout):
            return NotImplemented
        return (
            self._shape == other._shape
            and self._block_size == other._block_size
            and torch.equal(self._block_indices.cpu(), other._block_indices.cpu())
        )

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        return (
            f"BlockLayout(shape={self._shape}, block_size={self._block_size}, nnz={self.nnz}, "
            f"density={self.density:.4f})"
        )


def _integer_tensor(value, name: str) -> torch.Tensor:
    """``value`` as an int64 tensor, or ``TypeError`` naming ``name`` if it holds float, complex or bool values (a
    cast would truncate ``0.9`` to block 0; an empty ``[]``, float for torch, holds none)."""
    value = torch.as_tensor(value, device=value.device if isinstance(value, torch.Tensor) else "cpu")
    if value.numel() and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
    return value.to(torch.int64)


def _compressed_index(block_indices: torch.Tensor, major: str, block_shape: tuple[int, int]) -> BlockIndex:
    """CSR (``major="row"``) or CSC ordering of CPU ``block_indices [nnz, 2]`` (int32 tensors on the CPU)."""
    rows, cols = block_indices[:, 0], block_indices[:, 1]
    n_rows, n_cols = block_shape
    if major == "row":
        major_idx, minor_idx, n_major, n_minor = rows, cols, n_rows, n_cols
    else:
        major_idx, minor_idx, n_major, n_minor = cols, rows, n_cols, n_rows
    order = torch.argsort(major_idx * n_minor + minor_idx)
    counts = torch.bincount(major_idx, minlength=n_major)
    ptr = torch.zeros(n_major + 1, dtype=torch.int64, device="cpu")  # never the default device of a `with` block
    ptr[1:] = torch.cumsum(counts, 0)
    return BlockIndex(
        ptr=ptr.to(torch.int32),
        slots=order.to(torch.int32),
        minor=minor_idx[order].to(torch.int32),
        by_count=torch.argsort(-counts, stable=True).to(torch.int32),
    )


def unpack_kernel_index(
    index: torch.Tensor, nnz: int, block_shape: tuple[int, int]
) -> tuple[torch.Tensor, BlockIndex, BlockIndex]:
    """Views ``(block_indices [nnz, 2], CSR, CSC)`` of a :meth:`BlockLayout.kernel_index` tensor."""
    n_rows, n_cols = block_shape
    sizes = [2 * nnz, n_rows + 1, nnz, nnz, n_rows, n_cols + 1, nnz, nnz, n_cols]
    parts = torch.split(index, sizes)
    return parts[0].view(nnz, 2), BlockIndex(*parts[1:5]), BlockIndex(*parts[5:9])
