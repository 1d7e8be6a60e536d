"""Masked dynamic sparse training baseline (SPEC §4): dense weights times a block mask.

``MaskedLinear`` computes ``y = x (W ⊙ M)ᵀ + b`` with a dense ``weight [out, in]`` and the ``b x b`` block mask
``M`` of a :class:`BlockLayout` expanded to ``[out, in]``. Gradients and (``torch.optim.AdamW``) optimizer states are
dense, as in mask-based DST libraries — the memory the compact ``BlockSparseLinear`` saves. The weight carries
``weight.smet_mask_layout`` (not ``smet_layout``, which marks compact values) so that the
:class:`~smet_kernels.topology.SMET` controller prunes and regrows its blocks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .functional import autocast_enabled, check_input
from .layout import BlockLayout, unpack_kernel_index
from .modules import BlockLayoutLinear, check_linear, skip_init, sparsify, uniform_init_
from .ops import library


class _MaskedWeight(torch.autograd.Function):
    """``W ⊙ M``, whose backward ``dW = g ⊙ M`` first checks that the layout is still at ``forward_version`` (as the
    block-sparse products do): a topology update between forward and backward raises, eagerly and compiled, also
    where activation checkpointing would recompute ``M`` from the new layout. With ``setup_context`` and a vmap rule,
    so that ``torch.func`` transforms (``grad``, ``vmap``) run through a masked layer as through ``W * M``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(weight, mask, version, forward_version):
        return weight * mask

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, mask, version, forward_version = inputs
        ctx.save_for_backward(mask, version, forward_version)

    @staticmethod
    def backward(ctx, grad):
        mask, version, forward_version = ctx.saved_tensors
        library.check_layout_version(version, forward_version)
        return grad * mask, None, None, None


class _MaskedWeightForwardAD(_MaskedWeight):
    """:class:`_MaskedWeight` with a ``jvp`` (forward-mode AD: ``torch.func.jvp``, ``jacfwd``), used eagerly only:
    Dynamo does not trace an autograd function that defines one."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        _MaskedWeight.setup_context(ctx, inputs, output)
        ctx.save_for_forward(inputs[1])

    @staticmethod
    def jvp(ctx, weight_tangent, *_):
        return weight_tangent * ctx.saved_tensors[0]


def _expand_blocks(block_mask: torch.Tensor, b: int) -> torch.Tensor:
    """The ``[rows, cols]`` block mask as ``[rows·b, cols·b]``: each entry repeated over its ``b x b`` block."""
    return block_mask.repeat_interleave(b, dim=0).repeat_interleave(b, dim=1)


class MaskedLinear(BlockLayoutLinear):
    """``y = x (W ⊙ M)ᵀ + b``: dense ``weight [out, in]``, block mask ``M`` from ``layout`` (kept current by version).

    Inactive blocks of ``weight`` are kept at zero by the controller; the mask makes them irrelevant to the
    output and gives them zero gradient. The layout is part of the ``state_dict`` (``block_indices``), restored in
    place.
    """

    layout_attribute = ("weight", "smet_mask_layout")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        density: float | None = None,
        block_size: int | None = None,
        bias: bool = False,
        layout: BlockLayout | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__(in_features, out_features, density, block_size, layout, generator, dtype)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self._mask_key: tuple | None = None
        self._mask_layout: BlockLayout | None = None
        self._dense_mask: torch.Tensor | None = None
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """``nn.Linear``'s init ``U(-1/√in, 1/√in)``, then zeros at inactive blocks."""
        bound = 1.0 / math.sqrt(self.in_features)
        uniform_init_(self.weight, bound, generator)
        with torch.no_grad():
            self.weight.mul_(self.dense_mask())
        if self.bias is not None:
            uniform_init_(self.bias, bound, generator)

    def dense_mask(self) -> torch.Tensor:
        """``M`` expanded to ``[out, in]`` in the weight's dtype and device, rebuilt when the layout changes.

        Under ``torch.compile`` it is built in the graph from the layout's kernel index, which a topology update
        rewrites in place: a guard on the Python ``layout.version`` would recompile the model at every update (and
        fail ``fullgraph=True`` at the recompile limit)."""
        if torch.compiler.is_compiling():
            return self._traced_dense_mask()
        if self.cached_dense_mask() is None:
            with torch.inference_mode(False):  # built by an evaluation under inference mode, it still serves training
                block_mask = self.layout.mask.to(device=self.weight.device, dtype=self.weight.dtype)
                self._dense_mask = _expand_blocks(block_mask, self.layout.block_size)
            self._mask_key = self._current_key()
            self._mask_layout = self.layout
        return self._dense_mask

    def cached_dense_mask(self) -> torch.Tensor | None:
        """The mask :meth:`dense_mask` holds for the current layout, weight device and dtype, else ``None`` (none is
        built: a compiled model builds its masks in its graph and keeps none)."""
        current = self._mask_key == self._current_key() and self._mask_layout is self.layout
        return self._dense_mask if current else None  # a new layout starts again at version 0: compared by identity

    def _current_key(self) -> tuple:
        return self.layout.version, self.weight.device, self.weight.dtype

    def _traced_dense_mask(self) -> torch.Tensor:
        layout, b = self.layout, self.layout.block_size
        rows, cols = layout.block_shape
        blocks = unpack_kernel_index(layout.kernel_index(self.weight.device), layout.nnz, layout.block_shape)[0].long()
        block_mask = self.weight.new_zeros(rows * cols).index_fill(0, blocks[:, 0] * cols + blocks[:, 1], 1)
        return _expand_blocks(block_mask.view(rows, cols), b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_features)
        if x.device != self.weight.device:
            raise ValueError(f"weight is on {self.weight.device} but x is on {x.device}")
        if x.dtype != self.weight.dtype and not autocast_enabled(x.device.type):
            raise TypeError(f"weight has dtype {self.weight.dtype} but x has dtype {x.dtype}")
        version = self.layout.version_tensor
        masked_weight = _MaskedWeight if torch.compiler.is_compiling() else _MaskedWeightForwardAD
        weight = masked_weight.apply(self.weight, self.dense_mask(), version, library.layout_version(version))
        return F.linear(x, weight, self.bias)

    def to_dense_weight(self) -> torch.Tensor:
        """``W ⊙ M``: the weight the layer applies (zeros at inactive blocks)."""
        return self.weight * self.dense_mask()

    @classmethod
    def from_linear(cls, linear: nn.Linear, layout: BlockLayout) -> "MaskedLinear":
        """A masked copy of ``linear`` keeping the weights of the blocks active in ``layout`` (zeros elsewhere)."""
        check_linear(linear)
        weight = linear.weight
        module = skip_init(  # no init drawn (the weights are copied below): the global RNG is left as it was
            cls,
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            layout=layout,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            module.weight.copy_(weight.detach() * module.dense_mask())
            if linear.bias is not None:
                module.bias.copy_(linear.bias.detach())
        return module


def masked_sparsify(
    model: nn.Module,
    density: float,
    block_size: int = 128,
    distribution: str = "uniform",
    include: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str | None = None,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Replace the selected ``nn.Linear`` layers of ``model`` (in place) by :class:`MaskedLinear`.

    Same selection and topology as :func:`smet_kernels.modules.sparsify` (``include``/``exclude`` regexes searched
    in module names, ``distribution`` ``uniform`` | ``erk``, random blocks from ``generator``), so both storage
    schemes start from the same topology and weights for the same generator state. Returns ``model``.
    """
    if isinstance(model, nn.Linear):
        raise ValueError("model is itself an nn.Linear: use MaskedLinear.from_linear(model, layout)")
    sparsify(
        model, density, block_size, distribution, include, exclude, generator, layer_factory=MaskedLinear.from_linear
    )
    return model
