"""``BlockSparseLinear`` (compact block-sparse ``nn.Linear``) and ``sparsify`` (swap the linears of any model)."""

from __future__ import annotations

import math
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from .distribution import layer_densities
from .backend import check_backend
from .functional import REFERENCE_DTYPES, block_sparse_linear, from_dense, to_dense
from .layout import BlockLayout, check_block_size, check_density, check_generator, nnz_for_density

#: ``state_dict`` key (after the layer's prefix) of a sparse layer's ``layout.block_indices``
BLOCK_INDICES_KEY = "block_indices"


def uniform_init_(tensor: torch.Tensor, bound: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill ``tensor`` with ``U(-bound, bound)`` drawn in fp32 on the generator's device (a CPU generator may seed
    a CUDA layer), then copied in."""
    check_generator(generator)
    draw_device = generator.device if generator is not None else tensor.device
    with torch.no_grad():
        noise = torch.empty(tensor.shape, device=draw_device).uniform_(-bound, bound, generator=generator)
        return tensor.copy_(noise)


DEFAULT_BLOCK_SIZE = 128  # b of a layer built from a density alone


def _check_agrees_with_layout(layout: BlockLayout, density: float | None, block_size: int | None) -> None:
    """A ``density`` or ``block_size`` given beside an explicit layout must describe it, never be silently ignored:
    the block size equal, the density the one whose ``round(d · blocks)`` is the layout's block count."""
    if block_size is not None and block_size != layout.block_size:
        raise ValueError(f"block_size {block_size} does not match layout.block_size {layout.block_size}")
    if density is not None and nnz_for_density(layout.num_blocks, check_density(density)) != layout.nnz:
        raise ValueError(f"density {density} does not match the layout's ({layout.nnz} of {layout.num_blocks} "
                         f"blocks, {layout.density:.4g}); pass one of density and layout")  # fmt: skip


class BlockLayoutLinear(nn.Module):
    """Base of the linear layers whose weight follows a :class:`BlockLayout`.

    Checks ``dtype``, resolves the layout (given, or random at ``density``), checks it against the features, keeps
    its slot -> block map in the ``state_dict`` as the int64 tensor ``<prefix>block_indices [nnz, 2]`` (so
    safetensors and ``save_pretrained`` take it; restored in place, so references to the layout stay valid) and shows
    it in repr.
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
        block_size: int | None,
        layout: BlockLayout | None,
        generator: torch.Generator | None,
        dtype: torch.dtype | None,
    ):
        super().__init__()
        if dtype is not None and dtype not in REFERENCE_DTYPES:
            raise TypeError(f"dtype must be None or a floating dtype (fp16, bf16, fp32, fp64), got {dtype!r}")
        if layout is None:
            if density is None:
                raise TypeError(f"{type(self).__name__} needs density (or an explicit layout)")
            block_size = DEFAULT_BLOCK_SIZE if block_size is None else block_size
            layout = BlockLayout.random(out_features, in_features, block_size, density, generator=generator)
        elif not isinstance(layout, BlockLayout):
            raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
        elif layout.shape != (out_features, in_features):
            raise ValueError(
                f"layout.shape {layout.shape} does not match (out_features, in_features)={(out_features, in_features)}"
            )
        else:
            _check_agrees_with_layout(layout, density, block_size)
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
            layout.kernel_index(param.device)  # built eagerly, outside any traced graph: torch.compile finds it cached

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

    @property
    def block_indices(self) -> torch.Tensor:
        """The layout's ``[nnz, 2]`` active blocks, the tensor the state dict holds under ``block_indices``: an
        attribute for every state-dict key, as ``torch.distributed.checkpoint.state_dict`` resolves them."""
        return self.layout.block_indices

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + BLOCK_INDICES_KEY] = self.layout.block_indices.clone()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        key = prefix + BLOCK_INDICES_KEY
        legacy = prefix + "_extra_state"  # checkpoints written before the layout became a tensor key
        if key in state_dict:
            indices = state_dict[key]
        elif isinstance(state_dict.get(legacy), dict) and "block_indices" in state_dict[legacy]:
            indices = state_dict[legacy]["block_indices"]
        else:
            if strict:
                missing_keys.append(key)
            return
        for name in (key, legacy):
            if name in unexpected_keys:
                unexpected_keys.remove(name)
        try:  # in place, through the layout's checks: references stay valid and the index caches are rebuilt
            self.layout.set_block_indices(indices)
        except (TypeError, ValueError) as err:
            error_msgs.append(
                f"{key}: {err} (this layer: shape {self.layout.shape}, block_size {self.layout.block_size}, "
                f"nnz {self.layout.nnz})"
            )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}, "
            f"nnz={self.layout.nnz}, density={self.density:.4f}, bias={self.bias is not None}"
        )


class BlockSparseLinear(BlockLayoutLinear):
    """``y = x Wᵀ + b`` with ``W [out_features, in_features]`` block-sparse; only active blocks are stored.

    ``values`` is one ``nn.Parameter [nnz, b, b]`` (slot ``k`` holds block ``layout.block_indices[k]``) and carries
    the attribute ``values.smet_layout`` so that optimizers and the SMET controller find its layout. The layout is
    part of the ``state_dict`` (``block_indices``) and is restored in place.
    """

    layout_attribute = ("values", "smet_layout")

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
        backend: str | None = None,
    ):
        super().__init__(in_features, out_features, density, block_size, layout, generator, dtype)
        self.backend = backend if backend is None else check_backend(backend)
        b = self.layout.block_size
        self.values = nn.Parameter(torch.empty(self.layout.nnz, b, b, device=device, dtype=dtype))  # tagged by setattr
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """``nn.Linear``'s init: ``U(-1/√in, 1/√in)`` for the active weights and the bias."""
        bound = 1.0 / math.sqrt(self.in_features)
        uniform_init_(self.values, bound, generator)
        if self.bias is not None:
            uniform_init_(self.bias, bound, generator)

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
            backend=backend,
        )
        with torch.no_grad():
            module.values.copy_(from_dense(weight.detach(), layout))
            if linear.bias is not None:
                module.bias.copy_(linear.bias.detach())
        return module


def skip_init(cls: type, *args, device, **kwargs) -> nn.Module:
    """``cls(*args, device=device, **kwargs)`` built on the meta device (no init drawn) and then given empty tensors
    on ``device``: ``nn.utils.skip_init`` without its check of the signature, which refused a subclass that passes
    ``device`` on through ``**kwargs``."""
    return cls(*args, device="meta", **kwargs).to_empty(device=device)


def check_linear(linear) -> None:
    """``TypeError`` unless ``linear`` is an ``nn.Linear`` (a GPT-2 ``Conv1D`` raised ``AttributeError:
    in_features``): what ``from_linear`` copies."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__} (sparsify and "
                        "sparsify_with_layouts also take GPT-2 Conv1D layers)")  # fmt: skip


def _carry_mode(linear: nn.Linear, replacement: nn.Module) -> None:
    """The replacement trains (or not) as the dense layer did: train/eval mode and frozen weight or bias."""
    replacement.train(linear.training)
    for name, param in replacement.named_parameters():
        param.requires_grad_((linear.bias if name == "bias" else linear.weight).requires_grad)


#: the module's forward and backward hooks (and their flags), carried by a replacement as the same dictionaries
_HOOK_ATTRIBUTES = (
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks", "_is_full_backward_hook",
)


def _reparametrizes(hook) -> bool:
    """A hook of ``torch.nn.utils`` (``prune``, ``weight_norm``, ``spectral_norm``) that recomputes the dense layer's
    ``weight`` from its ``weight_orig``/``weight_g``... before each forward: the replacement has none of them (it
    raised ``AttributeError``); the weight it copies already holds the hook's effect."""
    from torch.nn.utils import prune
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return isinstance(hook, (prune.BasePruningMethod, SpectralNorm, WeightNorm))


def _carry_hooks(module: nn.Module, replacement: nn.Module) -> None:
    """``replacement`` runs the hooks registered on ``module``: the same dictionaries, so that the handles the user
    holds still remove them (state-dict hooks stay: the two layers' keys differ). Hooks the replacement already has
    (registered by a ``layer_factory``) are kept: added to those dictionaries after ``module``'s. A weight
    reparametrization of ``torch.nn.utils`` is not carried (copies of the dictionaries without it, then)."""
    left = {key for key, hook in getattr(module, "_forward_pre_hooks", {}).items() if _reparametrizes(hook)}
    for attribute in _HOOK_ATTRIBUTES:
        if not hasattr(module, attribute):
            continue
        carried, own = getattr(module, attribute), getattr(replacement, attribute, None)
        if isinstance(carried, dict) and left & carried.keys():
            carried = type(carried)((key, hook) for key, hook in carried.items() if key not in left)
        if isinstance(carried, dict) and isinstance(own, dict) and own is not carried:
            carried.update(own)
        elif not isinstance(carried, dict) and own and not carried:  # _is_full_backward_hook: None unless set
            continue
        setattr(replacement, attribute, carried)


def _conv1d_class() -> type | None:
    """``transformers.pytorch_utils.Conv1D`` when transformers is loaded (a model holding one has loaded it)."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def _is_dense_linear(module: nn.Module) -> bool:
    """``nn.Linear``, or GPT-2's ``Conv1D`` (``y = x W + b``, ``W [in, out]``: a linear with a transposed weight)."""
    return type(module) is nn.Linear or (_conv1d_class() is not None and type(module) is _conv1d_class())


def _as_linear(module: nn.Module) -> nn.Linear:
    """``module`` itself when an ``nn.Linear``; for a ``Conv1D`` an ``nn.Linear`` over the same tensors (weight
    ``Wᵀ``, a view; the same bias), in its mode."""
    if type(module) is nn.Linear:
        return module
    with torch.device("meta"):
        linear = nn.Linear(module.nx, module.nf, bias=False)
    linear.weight = nn.Parameter(module.weight.detach().t(), requires_grad=module.weight.requires_grad)
    linear.bias = module.bias
    return linear.train(module.training)


def _name_filter(patterns: Iterable[str] | str | None, name: str) -> list[str] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = [patterns]
    try:
        patterns = list(patterns)
    except TypeError:
        kind = type(patterns).__name__
        raise TypeError(f"{name} must be a regular expression or a list of them, got {kind}") from None
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"{name} must hold regular expressions (str), got {type(pattern).__name__}")
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"{name} holds an invalid regular expression {pattern!r}: {err}") from None
    return patterns


def _occurrences(model: nn.Module, selected: Callable[[nn.Module], bool]) -> dict[int, list[str]]:
    """``id(module) -> every qualified name`` of each ``selected`` module of ``model`` (a shared one has several)."""
    occurrences: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if selected(module):
            occurrences.setdefault(id(module), []).append(name)
    return occurrences


def _replace(model: nn.Module, aliases: list[str], replacement: nn.Module) -> None:
    """Put ``replacement`` at every name in ``aliases`` (a shared layer stays shared)."""
    for alias in aliases:
        parent_name, _, child = alias.rpartition(".")
        setattr(model.get_submodule(parent_name), child, replacement)


def sparse_linear_names(
    model: nn.Module, include: Iterable[str] | str | None = None, exclude: Iterable[str] | str | None = None
) -> list[str]:
    """Qualified names of the ``nn.Linear`` (and GPT-2 ``Conv1D``) modules selected by ``include``/``exclude``
    (regexes searched in names).

    A module reachable under several names (shared) is listed once, by its first name; it is selected when one of
    its names matches ``include`` and none matches ``exclude``.
    """
    include_p = _name_filter(include, "include")
    exclude_p = _name_filter(exclude, "exclude")
    names = []
    for aliases in _occurrences(model, _is_dense_linear).values():
        if include_p is not None and not any(re.search(p, name) for p in include_p for name in aliases):
            continue
        if exclude_p is not None and any(re.search(p, name) for p in exclude_p for name in aliases):
            continue
        names.append(aliases[0])
    return names


def _check_untied(model: nn.Module, linear: nn.Module, aliases: list[str]) -> None:
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
    are regular expressions searched in module names (default: every ``nn.Linear``). GPT-2-style
    ``transformers`` ``Conv1D`` layers (``y = x W + b``, ``W [in, out]``) count as linears with weight ``Wᵀ``; their
    replacement remembers it (``dense_class``) so that :func:`densify` gives a ``Conv1D`` back.
    ``layer_factory(linear, layout)`` builds the replacement (default: ``BlockSparseLinear.from_linear``). A layer
    reachable under several names is replaced everywhere by one replacement (it stays shared); a layer whose weight
    is tied to another module's parameter (e.g. an LM head tied to the embedding) raises ``ValueError``: exclude
    it. Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    density = check_density(density)
    check_block_size(block_size)
    _check_factory(layer_factory)
    names = sparse_linear_names(model, include, exclude)
    if not names:
        raise ValueError("sparsify found no nn.Linear layer to sparsify (check include/exclude)")
    if names == [""]:
        raise ValueError("model is itself an nn.Linear: use BlockSparseLinear.from_linear(model, layout)")
    modules, _ = _replaceable(model, names)  # before a layout is drawn: a refused model leaves generator untouched
    linears = {name: _as_linear(modules[name]) for name in names}
    for name, linear in linears.items():
        for size, what in ((linear.out_features, "out_features"), (linear.in_features, "in_features")):
            if size % block_size:
                raise ValueError(
                    f"layer '{name}': {what}={size} is not divisible by block_size={block_size} (exclude it or "
                    "choose another block_size)"
                )
    shapes = {name: (linear.out_features, linear.in_features) for name, linear in linears.items()}
    densities = layer_densities(shapes, density, distribution)
    layouts = {
        name: BlockLayout.random(*shapes[name], block_size, densities[name], generator=generator) for name in names
    }
    sparsify_with_layouts(model, layouts, backend, layer_factory)
    active = sum(layout.nnz for layout in layouts.values()) * block_size**2
    realised = active / sum(out * inp for out, inp in shapes.values())
    if abs(realised - density) > 0.1 * density:  # a relative miss: 0.004 for a target of 0.002 is twice it
        warnings.warn(
            f"sparsify: the realised density is {realised:.4g} for a target of {density:g}: every layer holds whole "
            f"{block_size}x{block_size} blocks, at least one; a smaller block_size follows the target more closely",
            RuntimeWarning,
            stacklevel=2,
        )
    return model


def _check_factory(layer_factory) -> None:
    if layer_factory is not None and not callable(layer_factory):
        raise TypeError(f"layer_factory must be None or a callable (linear, layout) -> nn.Module, got "
                        f"{type(layer_factory).__name__}")  # fmt: skip


def _replaceable(model: nn.Module, names: Iterable[str]) -> tuple[dict[str, nn.Module], dict[int, list[str]]]:
    """``(modules by name, names of each dense linear)`` of ``model``, once every one of ``names`` is checked to be a
    dense linear whose weight is not tied to another module's parameter (``ValueError`` otherwise)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    occurrences = _occurrences(model, _is_dense_linear)
    for name in names:
        module = modules.get(name)
        if module is None or not _is_dense_linear(module):
            raise ValueError(f"'{name}' is no nn.Linear (or Conv1D) of the model: {type(module).__name__}")
        _check_untied(model, module, occurrences[id(module)])
    return modules, occurrences


def sparsify_with_layouts(
    model: nn.Module,
    layouts: Mapping[str, BlockLayout],
    backend: str | None = None,
    layer_factory: Callable[[nn.Linear, BlockLayout], nn.Module] | None = None,
) -> nn.Module:
    """Replace each ``nn.Linear`` (or GPT-2 ``Conv1D``) of ``model`` named in ``layouts`` (in place) by a sparse
    layer of its layout: :func:`sparsify` once it has drawn the layouts.

    ``layer_factory(linear, layout)`` builds each replacement (default: ``BlockSparseLinear.from_linear``), which
    keeps the dense layer's mode, device and dtype, its forward and backward hooks and its weights at the active
    blocks; on the meta device nothing is allocated (a skeleton that a checkpoint then fills). A shared layer stays
    shared; one tied to another module's parameter raises ``ValueError``, and so does a name that is no dense linear.
    Returns ``model``.
    """
    _check_factory(layer_factory)
    modules, occurrences = _replaceable(model, layouts)
    replacements = {}  # every layer built before the first is swapped: one that raises leaves the model as it was
    for name, layout in layouts.items():
        module = modules[name]
        linear = _as_linear(module)
        if layer_factory is None:
            replacement = BlockSparseLinear.from_linear(linear, layout, backend=backend)
        else:
            replacement = layer_factory(linear, layout)
            if not isinstance(replacement, nn.Module):
                raise TypeError(f"layer_factory returned a {type(replacement).__name__} for layer '{name}', not an "
                                "nn.Module")  # fmt: skip
        _carry_mode(linear, replacement)
        if linear is not module:
            replacement.dense_class = type(module)
        replacements[name] = replacement
    for name, replacement in replacements.items():
        _carry_hooks(modules[name], replacement)  # here: a factory's hooks join the dense layer's dictionaries
        _replace(model, occurrences[id(modules[name])], replacement)
    return model


def _dense_layer(layer: BlockLayoutLinear) -> nn.Module:
    """The dense layer ``layer`` stands for: ``nn.Linear`` (or the ``Conv1D`` it replaced, weight transposed) with
    ``layer.to_dense_weight()``, the same bias parameter, mode and ``requires_grad``."""
    dense_class = getattr(layer, "dense_class", nn.Linear)
    weight = layer.to_dense_weight().detach()
    with torch.device("meta"):  # the weights are set below: skip the init
        if dense_class is nn.Linear:
            dense = nn.Linear(layer.in_features, layer.out_features, bias=False)
        else:
            dense = dense_class(layer.out_features, layer.in_features)  # Conv1D(nf, nx)
            weight = weight.t()
    sparse_param = getattr(layer, layer.layout_attribute[0])
    dense.weight = nn.Parameter(weight.contiguous(), requires_grad=sparse_param.requires_grad)
    dense.bias = layer.bias
    for hook in list(layer._forward_hooks.values()):  # a SMET controller's dense-gradient recorders (RigL): they
        handle = getattr(hook, "smet_handle", None)  # would keep it alive through the plain model and not pickle
        if handle is not None:
            handle.remove()
    _carry_hooks(layer, dense)
    return dense.train(layer.training)


def densify(model: nn.Module) -> nn.Module:
    """Replace every ``BlockSparseLinear`` / ``MaskedLinear`` of ``model`` (in place) by a dense layer: the inverse
    of :func:`sparsify` and :func:`~smet_kernels.masked.masked_sparsify`.

    Each becomes an ``nn.Linear`` whose weight is the layer's dense weight (zeros at inactive blocks) — or the GPT-2
    ``Conv1D`` it replaced, weight transposed — with the same dtype, device, bias, train/eval mode and
    ``requires_grad``, so the result is a plain model (``save_pretrained``, ``generate``, evaluation tools). A
    shared layer stays shared. Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, BlockLayoutLinear):
        raise ValueError("model is itself a sparse layer: use model.to_dense_weight() (and its bias)")
    modules = dict(model.named_modules(remove_duplicate=False))
    occurrences = _occurrences(model, lambda module: isinstance(module, BlockLayoutLinear))
    if not occurrences:
        raise ValueError("densify found no sparse layer (BlockSparseLinear or MaskedLinear) in model")
    for aliases in occurrences.values():
        _replace(model, aliases, _dense_layer(modules[aliases[0]]))
    return model
