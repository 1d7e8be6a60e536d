"""``BlockSparseLinear`` (compact block-sparse ``nn.Linear``) and ``sparsify`` (swap the linears of any model)."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .distribution import layer_densities
from .functional import block_sparse_linear, from_dense, to_dense
from .layout import BlockLayout, check_block_size, check_density


def uniform_init_(tensor: torch.Tensor, bound: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill ``tensor`` with ``U(-bound, bound)`` drawn in fp32 on the generator's device (a CPU generator may seed
    a CUDA layer), then copied in."""
    draw_device = generator.device if generator is not None else tensor.device
    with torch.no_grad():
        noise = torch.empty(tensor.shape, device=draw_device).uniform_(-bound, bound, generator=generator)
        return tensor.copy_(noise)


class BlockLayoutLinear(nn.Module):
    """Base of the linear layers whose weight follows a :class:`BlockLayout`.

    Resolves the layout (given, or random at ``density``), checks it against the features, keeps it in the
    ``state_dict`` as extra state (restored in place, so references to the layout stay valid) and shows it in repr.
    """

    #: ``(parameter name, attribute name)``: the parameter that carries the layout as an attribute. The attribute is
    #: re-attached whenever that parameter object is replaced (``load_state_dict(assign=True)``, ``copy.deepcopy``,
    #: ``.to()`` with parameter overwrite), which would otherwise drop it silently.
    layout_attribute: tuple[str, str] | None = None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        density: float | None,
        block_size: int,
        layout: BlockLayout | None,
        generator: torch.Generator | None,
    ):
        super().__init__()
        if layout is None:
            if density is None:
                raise TypeError(f"{type(self).__name__} needs density (or an explicit layout)")
            layout = BlockLayout.random(out_features, in_features, block_size, density, generator=generator)
        elif not isinstance(layout, BlockLayout):
            raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
        elif layout.shape != (out_features, in_features):
            raise ValueError(
                f"layout.shape {layout.shape} does not match (out_features, in_features)={(out_features, in_features)}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.layout = layout

    @property
    def block_size(self) -> int:
        return self.layout.block_size

    @property
    def density(self) -> float:
        return self.layout.density

    def _attach_layout(self) -> None:
        if self.layout_attribute is None:
            return
        param_name, attribute = self.layout_attribute
        param = self._parameters.get(param_name)
        layout = self.__dict__.get("layout")
        if param is not None and layout is not None:
            setattr(param, attribute, layout)

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if self.layout_attribute is not None and name in (self.layout_attribute[0], "layout"):
            self._attach_layout()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._attach_layout()

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        self._attach_layout()
        return module

    def get_extra_state(self) -> dict:
        return self.layout.state_dict()

    def set_extra_state(self, state: dict) -> None:
        if tuple(state["shape"]) != self.layout.shape or int(state["block_size"]) != self.layout.block_size:
            raise ValueError(
                f"checkpoint layout (shape {tuple(state['shape'])}, block_size {state['block_size']}) does not match "
                f"this layer (shape {self.layout.shape}, block_size {self.layout.block_size})"
            )
        self.layout.set_block_indices(state["block_indices"])

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}, "
            f"nnz={self.layout.nnz}, density={self.density:.4f}, bias={self.bias is not None}"
        )


class BlockSparseLinear(BlockLayoutLinear):
    """``y = x Wᵀ + b`` with ``W [out_features, in_features]`` block-sparse; only active blocks are stored.

    ``values`` is one ``nn.Parameter [nnz, b, b]`` (slot ``k`` holds block ``layout.block_indices[k]``) and carries
    the attribute ``values.smet_layout`` so that optimizers and the SMET controller find its layout. The layout is
    part of the ``state_dict`` (extra state) and is restored in place.
    """

    layout_attribute = ("values", "smet_layout")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        density: float | None = None,
        block_size: int = 128,
        bias: bool = False,
        layout: BlockLayout | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
        backend: str | None = None,
    ):
        super().__init__(in_features, out_features, density, block_size, layout, generator)
        self.backend = backend
        b = self.layout.block_size
        self.values = nn.Parameter(torch.empty(self.layout.nnz, b, b, device=device, dtype=dtype))  # tagged by setattr
        self.layout.kernel_index(self.values.device)  # built eagerly (below), so torch.compile finds it cached
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """``nn.Linear``'s init: ``U(-1/√in, 1/√in)`` for the active weights and the bias."""
        bound = 1.0 / math.sqrt(self.in_features)
        uniform_init_(self.values, bound, generator)
        if self.bias is not None:
            uniform_init_(self.bias, bound, generator)

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        self.layout.kernel_index(self.values.device)  # the index of the new device, built outside any traced graph
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return block_sparse_linear(x, self.values, self.layout, self.bias, backend=self.backend)

    def to_dense_weight(self) -> torch.Tensor:
        """The dense ``[out, in]`` weight (zeros at inactive blocks)."""
        return to_dense(self.values, self.layout)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, layout: BlockLayout, backend: str | None = None
    ) -> "BlockSparseLinear":
        """A block-sparse copy of ``linear`` keeping the weights of the blocks active in ``layout``."""
        weight = linear.weight
        module = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            layout=layout,
            device=weight.device,
            dtype=weight.dtype,
            backend=backend,
        )
        with torch.no_grad():
            module.values.copy_(from_dense(weight.detach(), layout))
            if linear.bias is not None:
                module.bias.copy_(linear.bias.detach())
        return module


def _carry_mode(linear: nn.Linear, replacement: nn.Module) -> None:
    """The replacement trains (or not) as the dense layer did: train/eval mode and frozen weight or bias."""
    replacement.train(linear.training)
    for name, param in replacement.named_parameters():
        param.requires_grad_((linear.bias if name == "bias" else linear.weight).requires_grad)


def _name_filter(patterns: Iterable[str] | str | None, name: str) -> list[str] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = list(patterns)
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"{name} must hold regular expressions (str), got {type(pattern).__name__}")
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"{name} holds an invalid regular expression {pattern!r}: {err}") from None
    return patterns


def _linear_occurrences(model: nn.Module) -> dict[int, list[str]]:
    """``id(linear) -> every qualified name`` of each ``nn.Linear`` of ``model`` (a shared module has several)."""
    occurrences: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if type(module) is nn.Linear:
            occurrences.setdefault(id(module), []).append(name)
    return occurrences


def sparse_linear_names(
    model: nn.Module, include: Iterable[str] | str | None = None, exclude: Iterable[str] | str | None = None
) -> list[str]:
    """Qualified names of the ``nn.Linear`` modules selected by ``include``/``exclude`` (regexes searched in names).

    A module reachable under several names (shared) is listed once, by its first name; it is selected when one of
    its names matches ``include`` and none matches ``exclude``.
    """
    include_p = _name_filter(include, "include")
    exclude_p = _name_filter(exclude, "exclude")
    names = []
    for aliases in _linear_occurrences(model).values():
        if include_p is not None and not any(re.search(p, name) for p in include_p for name in aliases):
            continue
        if exclude_p is not None and any(re.search(p, name) for p in exclude_p for name in aliases):
            continue
        names.append(aliases[0])
    return names


def _check_untied(model: nn.Module, linear: nn.Linear, aliases: list[str]) -> None:
    """Raise when a parameter of ``linear`` is also held outside it (tied weights): sparsifying would untie it."""
    own = {f"{alias}.{attr}".lstrip(".") for alias in aliases for attr in ("weight", "bias")}
    for name, param in model.named_parameters(remove_duplicate=False):
        if name not in own and any(param is p for p in (linear.weight, linear.bias)):
            raise ValueError(
                f"layer '{aliases[0]}' shares a parameter with '{name}' (tied weights); sparsifying it would untie "
                "them: exclude it"
            )


def sparsify(
    model: nn.Module,
    density: float,
    block_size: int = 128,
    distribution: str = "uniform",
    include: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str | None = None,
    generator: torch.Generator | None = None,
    backend: str | None = None,
    layer_factory: Callable[[nn.Linear, BlockLayout], nn.Module] | None = None,
) -> nn.Module:
    """Replace the selected ``nn.Linear`` layers of ``model`` (in place) by ``BlockSparseLinear``.

    Per-layer densities follow ``distribution`` (``uniform`` | ``erk``) for the global ``density``; each layer's
    active blocks are chosen at random (``generator``) and keep the dense layer's weights. ``include`` / ``exclude``
    are regular expressions searched in module names (default: every ``nn.Linear``). ``layer_factory(linear,
    layout)`` builds the replacement (default: ``BlockSparseLinear.from_linear``). A layer reachable under several
    names is replaced everywhere by one replacement (it stays shared); a layer whose weight is tied to another
    module's parameter (e.g. an LM head tied to the embedding) raises ``ValueError``: exclude it. Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    density = check_density(density)
    check_block_size(block_size)
    names = sparse_linear_names(model, include, exclude)
    if not names:
        raise ValueError("sparsify found no nn.Linear layer to sparsify (check include/exclude)")
    if names == [""]:
        raise ValueError("model is itself an nn.Linear: use BlockSparseLinear.from_linear(model, layout)")
    modules = dict(model.named_modules(remove_duplicate=False))
    occurrences = _linear_occurrences(model)
    shapes = {}
    for name in names:
        linear = modules[name]
        for size, what in ((linear.out_features, "out_features"), (linear.in_features, "in_features")):
            if size % block_size:
                raise ValueError(
                    f"layer '{name}': {what}={size} is not divisible by block_size={block_size} (exclude it or "
                    "choose another block_size)"
                )
        _check_untied(model, linear, occurrences[id(linear)])
        shapes[name] = (linear.out_features, linear.in_features)
    densities = layer_densities(shapes, density, distribution)
    active = 0
    for name in names:
        linear = modules[name]
        layout = BlockLayout.random(
            linear.out_features, linear.in_features, block_size, densities[name], generator=generator
        )
        if layer_factory is None:
            replacement = BlockSparseLinear.from_linear(linear, layout, backend=backend)
        else:
            replacement = layer_factory(linear, layout)
        _carry_mode(linear, replacement)
        active += layout.nnz * block_size**2
        for alias in occurrences[id(linear)]:  # a shared layer stays shared
            parent_name, _, child = alias.rpartition(".")
            setattr(modules[parent_name] if parent_name else model, child, replacement)
    realised = active / sum(out * inp for out, inp in shapes.values())
    if abs(realised - density) > max(0.01, 0.1 * density):
        warnings.warn(
            f"sparsify: the realised density is {realised:.4g} for a target of {density:g}: every layer holds whole "
            f"{block_size}x{block_size} blocks, at least one; a smaller block_size follows the target more closely",
            RuntimeWarning,
            stacklevel=2,
        )
    return model
