"""Hugging Face ``transformers`` integration: :class:`SMETCallback` drives the SMET controller from ``Trainer``;
:func:`load_sparse_pretrained` loads a sparse ``save_pretrained`` folder (compact or masked layers) without building
dense weights that it does not hold.

Needs the optional extra ``hf`` (``pip install "smet_kernels[hf]"``)::

    optimizer = sk.SMETAdamW(model.parameters(), lr=1e-3)
    smet = sk.SMET(model, optimizer, update_interval=100, total_steps=args.max_steps)  # the run's optimizer steps
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None),
                      callbacks=[SMETCallback(smet)])

``total_steps`` counts optimizer steps: an epoch-based run (``max_steps=-1``) makes
``num_train_epochs × ceil(batches per epoch / gradient_accumulation_steps)`` of them.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from transformers import TrainerCallback

from .backend import resolve_device
from .layout import SUPPORTED_BLOCK_SIZES, BlockLayout
from .masked import MaskedLinear
from .modules import BLOCK_INDICES_KEY, _as_linear, _is_dense_linear, sparsify_with_layouts
from .prune_regrow import block_l1
from .topology import SMET

#: key of the controller's state in the optimizer's ``state_dict`` (the Trainer's ``optimizer.pt``)
STATE_KEY = "smet"
#: key of the number of optimizer steps the loss scaler skipped, beside it
SKIPPED_KEY = "smet_skipped_steps"


class SMETCallback(TrainerCallback):
    """Runs ``smet.step()`` after every optimizer step of a ``transformers.Trainer`` and checkpoints the controller.

    The update runs in ``on_optimizer_step``, which the Trainer fires right after ``optimizer.step()`` and before
    ``model.zero_grad()``: the step's gradients still exist (RigL's dense gradients are recorded by the
    controller's own hooks during the backward pass). The controller's :meth:`SMET.state_dict` travels inside the
    optimizer's: a state-dict hook of ``smet.optimizer`` adds it under ``"smet"`` — so every Trainer checkpoint
    holds it in ``optimizer.pt``, next to the model's layouts (``block_indices`` tensors in the safetensors) — and a
    load hook restores it, so ``trainer.train(resume_from_checkpoint=...)`` continues the topology schedule
    exactly. The Trainer must step ``smet.optimizer``: pass ``optimizers=(smet.optimizer, None)``. A newer callback of
    the same optimizer (e.g. for a new Trainer, or a new controller, resuming in the same process) takes the
    checkpointing over.

    A step that fp16 loss scaling skipped (an overflow: ``optimizer.step_was_skipped``) is not counted, as the Trainer
    does not step its LR schedule then: its dense gradients (non-finite) are dropped, and a due update runs at the
    next step taken. The skipped steps are counted (and checkpointed) beside the controller: with them, its step
    count matches the Trainer's ``global_step``. ``total_steps``/``end_step`` thus count steps taken, as the LR
    schedule's ``max_steps`` does: with k skipped steps the run takes ``max_steps − k`` of them and both schedules
    stop there (``ζ_t`` at t ≤ ``max_steps − k``; an update due later, e.g. at ``T_end = max_steps``, does not run).
    """

    def __init__(self, smet: SMET):
        if not isinstance(smet, SMET):
            raise TypeError(f"smet must be an smet_kernels.SMET controller, got {type(smet).__name__}")
        self.smet = smet
        self.skipped_steps = 0
        self._take_over()

    def _take_over(self) -> None:
        """Checkpoint the controller through this callback's optimizer hooks, not an earlier callback's of the
        optimizer (whose skipped-step count would be saved and loaded instead of this one's, or whose controller,
        built earlier on the same optimizer, would load the checkpoint instead of this one's)."""
        optimizer = self.smet.optimizer
        for handle in getattr(optimizer, "_smet_hf_callback_hooks", ()):
            handle.remove()
        optimizer._smet_hf_callback_hooks = (
            optimizer.register_state_dict_post_hook(self._add_controller_state),
            optimizer.register_load_state_dict_pre_hook(self._check_controller_state),
            optimizer.register_load_state_dict_post_hook(self._restore_controller_state),
        )
        self._checked = None

    def _add_controller_state(self, optimizer, state_dict: dict) -> dict:
        return {**state_dict, STATE_KEY: self.smet.state_dict(), SKIPPED_KEY: self.skipped_steps}

    def _check_controller_state(self, optimizer, state_dict: dict) -> dict:
        """Before the optimizer loads: check the controller's state and take it out of the optimizer's."""
        self._checked = None
        if STATE_KEY not in state_dict:
            return state_dict
        state_dict = dict(state_dict)
        checked = self.smet._check_state(state_dict.pop(STATE_KEY))
        self._checked = checked, int(state_dict.pop(SKIPPED_KEY, 0))  # none skipped in an earlier release's
        return state_dict

    def _restore_controller_state(self, optimizer) -> None:
        """Once the optimizer has loaded (its checks passed): restore the controller, so a refused ``optimizer.pt``
        leaves the topology as it was."""
        if self._checked is not None:
            checked, self.skipped_steps = self._checked
            self._checked = None
            self.smet._apply_state(checked)

    def _check_optimizer(self, optimizer, created: bool = False) -> None:
        stepped = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it in an AcceleratedOptimizer
        if (stepped is not None or created) and stepped is not self.smet.optimizer:
            which = "would create its own optimizer, not step" if stepped is None else "steps another optimizer than"
            raise ValueError(f"the Trainer {which} the SMET controller's: pass "
                             "Trainer(..., optimizers=(smet.optimizer, None))")  # fmt: skip

    def on_init_end(self, args, state, control, optimizer=None, **kwargs):
        """Refuse, when the Trainer is built, an optimizer other than ``smet.optimizer``, or none (the Trainer would
        create its own: a resume then fails loading this one's ``optimizer.pt`` into it, before training begins);
        the callback of the Trainer takes the checkpointing over (from one built later and never given to it)."""
        self._check_optimizer(optimizer, created=True)
        self._take_over()

    def on_train_begin(self, args, state, control, optimizer=None, model=None, **kwargs):
        """Refuse an optimizer other than ``smet.optimizer``, a model that does not hold the controller's sparse
        parameters, a controller out of step with the Trainer, and a controller that two callbacks of one Trainer (or
        one callback given twice) would step twice a step; take the checkpointing over (from a callback of another
        Trainer built since, which would save its skipped-step count instead of this one's)."""
        if getattr(self.smet, "_hf_trainer_state", None) is state:  # a TrainerState is made anew by each train()
            raise ValueError(
                "the Trainer has the SMET controller's callback twice (callbacks=[...] holds SMETCallback of this "
                "controller twice, or add_callback added another): it would count each optimizer step twice; "
                "give it one SMETCallback"
            )
        self.smet._hf_trainer_state = state
        self._take_over()
        self._check_optimizer(optimizer)
        held = set() if model is None else {id(param) for param in model.parameters()}
        missing = [target.name for target in self.smet.targets if model is not None and id(target.param) not in held]
        if missing:
            raise ValueError(
                f"the Trainer trains another model than the SMET controller's (its sparse parameter '{missing[0]}' "
                "is not the Trainer's model's, e.g. a model loaded anew): build the optimizer and SMET on the model "
                "given to the Trainer"
            )
        if self.smet.step_count + self.skipped_steps != state.global_step:
            skipped = f" (and {self.skipped_steps} skipped)" if self.skipped_steps else ""
            raise ValueError(
                f"the SMET controller has counted {self.smet.step_count} optimizer steps{skipped} but the Trainer "
                f"starts at step {state.global_step}: resume from a checkpoint saved with SMETCallback (its "
                "optimizer.pt holds the controller; save_only_model=True checkpoints have none), with a fresh "
                "controller"
            )

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if getattr(optimizer, "step_was_skipped", False):  # accelerate's AcceleratedOptimizer under fp16 scaling
            self.skipped_steps += 1
            self.smet.discard_dense_grad()
            return
        self.smet.step()


def _empty_model(model_class: type, config, dtype: torch.dtype | None) -> transformers.PreTrainedModel:
    """The model of ``config`` with every parameter on the meta device (nothing allocated) and its non-persistent
    buffers (e.g. rotary frequencies, never in a checkpoint) computed on the CPU, as transformers 5's
    ``from_pretrained`` does."""
    build = getattr(model_class, "from_config", None) or model_class._from_config  # an Auto class, or a model class
    with torch.device("meta"):
        model = build(config, **({} if dtype is None else {"dtype": dtype}))
    for name, buffer in model.named_non_persistent_buffers():
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, torch.empty_like(buffer, device="cpu"))
    model.initialize_weights()  # fills those buffers; on meta, the parameters take nothing
    return model


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a ``save_pretrained`` folder: the shards its index names, or ``model.safetensors``."""
    index = folder / transformers.utils.SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        files = [folder / name for name in dict.fromkeys(json.loads(index.read_text())["weight_map"].values())]
    elif (folder / transformers.utils.SAFE_WEIGHTS_NAME).is_file():
        files = [folder / transformers.utils.SAFE_WEIGHTS_NAME]
    else:
        raise FileNotFoundError(f"{folder} holds no model.safetensors nor model.safetensors.index.json")
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{file.name}, named in {index.name}, is not in {folder}")
    return files


def _read_headers(files: list[Path]) -> tuple[dict[str, tuple[Path, list[int]]], dict[str, torch.Tensor]]:
    """``key -> (file, shape)`` of every tensor of the checkpoint, from the safetensors headers, and its
    ``<layer>.block_indices`` tensors (small), each file opened once."""
    shapes, indices = {}, {}
    for file in files:
        with safe_open(file, "pt") as f:
            for key in f.keys():
                shapes[key] = (file, f.get_slice(key).get_shape())
                if key.endswith("." + BLOCK_INDICES_KEY):
                    indices[key] = f.get_tensor(key)
    return shapes, indices


def _key_prefixes(model: torch.nn.Module, keys) -> tuple[str, str]:
    """``(stored, own)``: the key prefix of the checkpoint and the one ``model`` gives it, as ``from_pretrained`` maps
    them: a head model's ``<base_model_prefix>.`` keys read into its base model (``(prefix, "")``, the head's keys left
    out), a base model's into a head model (``("", prefix)``); ``("", "")`` when the keys match."""
    prefix = model.base_model_prefix + "."
    stored = any(key.startswith(prefix) for key in keys)
    own = any(key.startswith(prefix) for key in model.state_dict())
    return (prefix if stored and not own else "", prefix if own and not stored else "")


def _model_keys(keys, prefixes: tuple[str, str]) -> dict[str, str]:
    """``stored key -> model key`` of the checkpoint keys under the stored prefix (:func:`_key_prefixes`)."""
    stored, own = prefixes
    return {key: own + key[len(stored):] for key in keys if key.startswith(stored)}


def _saved_layouts(
    model: torch.nn.Module, shapes: dict, indices: dict[str, torch.Tensor], prefixes: tuple[str, str]
) -> tuple[dict[str, BlockLayout], dict[str, BlockLayout]]:
    """``(compact, masked)``: the layout of each layer whose ``<layer>.block_indices`` the checkpoint holds, shaped as
    the model's linear there; compact beside ``<layer>.values [nnz, b, b]`` (block size b), masked beside a dense
    ``<layer>.weight`` (block size found by :func:`_masked_layouts`, which reads it under the stored ``prefixes``)."""
    compact, masked = {}, {}
    for key, block_indices in indices.items():
        file, indices_shape = shapes[key]
        name = key[: -len(BLOCK_INDICES_KEY) - 1]
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        if not _is_dense_linear(module):
            found = "no such module" if module is None else f"a {type(module).__name__}"
            raise ValueError(f"unexpected key '{key}' in {file.name}: '{name}' of the {type(model).__name__} built "
                             f"from config.json is {found}, not an nn.Linear")  # fmt: skip
        linear = _as_linear(module)
        shape = (linear.out_features, linear.in_features)
        if name + ".values" in shapes:
            values_shape = shapes[name + ".values"][1]
            if len(values_shape) != 3 or values_shape[1] != values_shape[2] or values_shape[0] != indices_shape[0]:
                raise ValueError(f"'{name}.values' {values_shape} does not hold one b x b block per row of '{key}' "
                                 f"{indices_shape}")  # fmt: skip
            try:
                compact[name] = BlockLayout(block_indices, shape, values_shape[1])
            except (TypeError, ValueError) as err:
                raise ValueError(f"'{key}' in {file.name}: {err}") from None
        elif name + ".weight" in shapes:
            masked[name] = shape
        else:
            raise ValueError(f"'{name}.values' (or a masked layer's '{name}.weight') is missing from the checkpoint "
                             f"(its '{key}' is in {file.name})")  # fmt: skip
    return compact, _masked_layouts(masked, shapes, indices, prefixes)


def _masked_layouts(
    layers: dict[str, tuple[int, int]], shapes: dict, indices: dict[str, torch.Tensor], prefixes: tuple[str, str]
) -> dict[str, BlockLayout]:
    """The layout of each masked layer ``name -> (out, in)``, whose block size the checkpoint does not keep: the one
    supported size at which its ``block_indices`` fit the layer and its dense weight is zero outside their blocks
    (the files that hold such weights opened once each)."""
    by_file: dict[Path, list[str]] = {}
    for name in layers:
        by_file.setdefault(shapes[name + ".weight"][0], []).append(name)
    layouts = {}
    for file, names in by_file.items():
        with safe_open(file, "pt") as f:
            for name in names:
                weight = f.get_tensor(prefixes[0] + name[len(prefixes[1]):] + ".weight")
                if list(weight.shape) != list(layers[name]):
                    raise ValueError(f"'{name}.weight' in {file.name} has shape {list(weight.shape)}, the model's "
                                     f"{list(layers[name])}")  # fmt: skip
                block_indices = indices[f"{name}.{BLOCK_INDICES_KEY}"]
                fits = [_layout_if_fits(block_indices, weight, b) for b in SUPPORTED_BLOCK_SIZES]
                fits = [layout for layout in fits if layout is not None]
                if len(fits) != 1:
                    sizes = [layout.block_size for layout in fits]
                    raise ValueError(f"masked layer '{name}' in {file.name}: its block_indices and dense weight fit "
                                     f"{len(fits)} of the block sizes {SUPPORTED_BLOCK_SIZES} {sizes}, not one: build "
                                     "the model, masked_sparsify it alike, then load_sharded_checkpoint(model, "
                                     "folder)")  # fmt: skip
                layouts[name] = fits[0]
    return layouts


def _layout_if_fits(block_indices: torch.Tensor, weight: torch.Tensor, block_size: int) -> BlockLayout | None:
    """The layout of ``block_indices`` over ``weight``'s shape at ``block_size`` if the weight is zero outside its
    blocks, else ``None`` (also when they do not fit the block grid)."""
    try:
        layout = BlockLayout(block_indices, tuple(weight.shape), block_size)
    except (TypeError, ValueError):
        return None
    return None if block_l1(weight, block_size)[~layout.mask].ne(0).any() else layout


def _check_keys(model: torch.nn.Module, shapes: dict) -> None:
    """Refuse a checkpoint tensor the model does not hold, or holds at another shape (before loading any)."""
    expected = model.state_dict()
    for key, (file, shape) in shapes.items():
        if key not in expected:
            raise ValueError(f"unexpected key '{key}' in {file.name}: the {type(model).__name__} built from "
                             "config.json has no such parameter or buffer")  # fmt: skip
        if list(expected[key].shape) != shape:
            raise ValueError(f"'{key}' in {file.name} has shape {shape}, the model's {list(expected[key].shape)}")


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _load_dtypes(model: transformers.PreTrainedModel, dtype: torch.dtype | None) -> dict[str, torch.dtype]:
    """``dtype``, or fp32 where the model class keeps its modules in fp32 (``_keep_in_fp32_modules`` in fp16,
    ``_keep_in_fp32_modules_strict`` in fp16 and bf16), as ``from_pretrained`` casts: ``{"": dtype, pattern:
    torch.float32, ...}`` with each pattern a glob searched in the checkpoint key."""
    plan = model._get_dtype_plan(dtype) if dtype is not None and hasattr(model, "_get_dtype_plan") else {}
    return {"": dtype, **plan}


def _key_dtype(key: str, dtypes: dict[str, torch.dtype]) -> torch.dtype | None:
    kept = [pattern for pattern in dtypes if pattern and re.search(pattern.replace("*", ".*"), key)]
    return dtypes[kept[0]] if kept else dtypes[""]


def load_sparse_pretrained(
    folder: str | Path,
    model_class: type = transformers.AutoModelForCausalLM,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    backend: str | None = None,
) -> transformers.PreTrainedModel:
    """Load a sparse model saved with ``save_pretrained`` (sharded or not) without building a dense weight that the
    checkpoint does not hold.

    Builds the model of ``folder``'s ``config.json`` with its parameters on the meta device (buffers real) and puts a
    sparse layer of the saved layout at every layer whose ``<layer>.block_indices`` the checkpoint holds: a
    ``BlockSparseLinear`` beside compact ``<layer>.values [nnz, b, b]`` (block size b), a ``MaskedLinear`` beside a
    dense ``<layer>.weight`` (a masked model's, whose block size the checkpoint does not keep: the one supported size
    at which the indices fit the layer and the weight is zero outside their blocks). Then assigns the safetensors
    shards one by one on ``device`` (floating tensors cast to ``dtype``, but those of the modules the model class
    keeps in fp32, as ``from_pretrained`` does; default: as saved) and re-ties tied weights. ``model_class`` is an
    ``AutoModel...`` class or a model class. Returns the model in eval mode, like ``from_pretrained``; its layouts are
    live, so SMET trains on. ``device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``. Raises on a ``model_class`` that
    is no model class or takes another config class than the folder's, a ``dtype`` that is no floating
    ``torch.dtype``, a ``device`` not here, a folder without config or weights, a checkpoint without sparse layer, a
    masked layer that not exactly one block size fits, and on a missing, unexpected or misshapen key. As in
    ``from_pretrained``, a base model class (``AutoModel``) loads the backbone of a head model's checkpoint (its
    ``<base_model_prefix>.`` keys; the head's left out) and a head model class a base model's checkpoint.
    """
    if not hasattr(transformers.PreTrainedModel, "named_non_persistent_buffers"):
        raise ImportError(f"load_sparse_pretrained needs transformers >= 5, found {transformers.__version__}")
    if not isinstance(model_class, type) or not any(hasattr(model_class, f) for f in ("from_config", "_from_config")):
        raise TypeError(f"model_class must be an AutoModel... class or a PreTrainedModel subclass, got {model_class!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be None or a floating torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
    device = resolve_device(device, "device")
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"folder must be a path (str or os.PathLike) of a save_pretrained folder, got {folder!r}")
    folder = Path(folder)
    if not (folder / transformers.utils.CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{folder} holds no config.json: not a save_pretrained folder")
    files = _weight_files(folder)
    shapes, indices = _read_headers(files)
    if not indices:
        raise ValueError(f"{folder} holds no sparse layer (no '<layer>.block_indices' key): load it with "
                         f"{model_class.__name__}.from_pretrained")  # fmt: skip
    config = transformers.AutoConfig.from_pretrained(folder)
    config_class = getattr(model_class, "config_class", None)  # None for the Auto classes, which pick the model
    if isinstance(config_class, type) and not isinstance(config, config_class):
        raise ValueError(f"model_class {model_class.__name__} takes a {config_class.__name__}, but {folder} holds a "
                         f"{type(config).__name__}: pass its model class or an AutoModel... class")  # fmt: skip
    model = _empty_model(model_class, config, dtype)
    prefixes = _key_prefixes(model, shapes)
    renamed = _model_keys(shapes, prefixes)
    shapes = {renamed[key]: shape for key, shape in shapes.items() if key in renamed}
    indices = {renamed[key]: tensor for key, tensor in indices.items() if key in renamed}
    compact, masked = _saved_layouts(model, shapes, indices, prefixes)
    sparsify_with_layouts(model, compact, backend=backend)
    sparsify_with_layouts(model, masked, layer_factory=MaskedLinear.from_linear)
    _check_keys(model, shapes)
    dtypes = _load_dtypes(model, dtype)
    for file in files:
        with safe_open(file, "pt", device=str(device)) as f:
            state = {name: _cast(f.get_tensor(key), _key_dtype(name, dtypes))
                     for key, name in _model_keys(f.keys(), prefixes).items()}
        model.load_state_dict(state, strict=False, assign=True)  # the keys were checked above
        del state  # before the next shard is read
    model.tie_weights()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_meta:
            raise ValueError(f"'{name}' is missing from the checkpoint in {folder}")
    if model.can_generate() and (folder / transformers.utils.GENERATION_CONFIG_NAME).is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
    return model.to(device).eval()  # the buffers built on the CPU; each layout's kernel index on the device
