"""SMETAdamW: AdamW over compact block-sparse values with per-block local steps, warm-up and density-aware LR.

Sparse parameters are recognised by their ``smet_layout`` attribute (a :class:`~smet_kernels.layout.BlockLayout`;
values ``[nnz, b, b]``). Per element of slot ``k`` (SPEC §2), local step ``t_k`` incremented before the update::

    m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2
    m_hat = m / (1 - b1^s),  v_hat = v / (1 - b2^s)       s = t_k ("local") or the global step ("global")
    w = min(t_k / W, 1) ("linear") | m <- m min(t_k / W, 1), stored ("momentum_ramp") | 1 ("none")
    lr_l = lr * density^(-alpha)                           alpha = density_lr_exponent (0 disables)
    theta = theta - lr_l (w m_hat / (sqrt(v_hat) + eps) + weight_decay theta)

Every other parameter (embeddings, norms, head) takes the AdamW update with its own step count ``t`` (bias
correction by ``t``, no density factor, decoupled weight decay) and, with ``warmup_scope="all"`` (the default, the
authors' released behaviour), the same warm-up by ``t``; ``warmup_scope="regrown"`` limits the warm-up to the
sparse values (the others take the standard AdamW update). All tensors of the parameter groups that share betas, eps,
weight decay, warm-up and backend go through one fused Triton launch per (device, dtype)
(``smet_kernels.ops.library.launch_adamw_step``, after the checks of ``adamw_step``; lr and bias correction are
per tensor), or the PyTorch reference.

``bias_correction="global"`` with ``warmup="none"`` is the **naive DST (cold start)** baseline: a regrown block
restarts from m = v = 0 but is bias-corrected with the parameter's global step count ``t``, so its first update is
about (1 - b1) sqrt((1 - b2^t) / (1 - b2)) times the learning rate (SPEC §2; default betas: about 1x at t = 100,
2.5x at 1,000, tending to 3.16x) — the spike SMET removes.
With ``"global"`` the warm-up (if any) still follows the local step.

State of a sparse parameter: ``exp_avg``, ``exp_avg_sq`` (shape of the values, ``state_dtype``) and
``block_step`` (int32 ``[nnz]``), plus ``step`` (CPU float scalar, the global count) in ``"global"`` mode. Dense
parameters hold ``exp_avg``, ``exp_avg_sq`` and ``step``. Regrown slots are reset by
:func:`smet_kernels.ops.library.regrow_blocks` with these state tensors.

**FSDP2.** Parameters sharded by ``fully_shard`` are ``DTensor``s split on dim 0 (whole slots per rank). Their
state tensors are ``DTensor``s with the same placements (``block_step`` too: each rank holds the steps of the
slots it owns), and the step updates each rank's local shard (``to_local()`` of parameter, gradient and state):
the per-slot arithmetic is exactly that of the unsharded parameter. A rank whose shard is empty only counts the
step. ``state_dict()`` therefore holds ``DTensor``s; the trainer gathers them to full tensors for checkpoints.
"""

from __future__ import annotations

import numbers
from collections import OrderedDict
from itertools import chain
from typing import Any, Callable, Iterable

import torch

from ..backend import check_backend, resolve_backend
from ..ops.adamw import PARAM_DTYPES, check_finite, check_hyperparameters, check_tensors
from ..ops.library import launch_adamw_step
from ..sharding import check_row_sharded, local, zeros_per_row

BIAS_CORRECTIONS = ("local", "global")
WARMUP_SCOPES = ("all", "regrown")
# torch.optim.AdamW options this optimizer does not implement: refused when true (not silently ignored) in a group
# given to add_param_group or loaded from a state dict
_UNSUPPORTED_FLAGS = ("amsgrad", "maximize", "capturable", "differentiable")
_BATCH_FIELDS = ("params", "grads", "exp_avgs", "exp_avg_sqs", "block_steps", "lrs", "global_steps", "dense_warmups")


def _lr_value(lr):
    """``lr`` as a Python float: a real number, or a one-element tensor (accepted by ``torch.optim.AdamW`` and kept a
    tensor by the LR schedulers; on a GPU, one sync); anything else as it is, for ``check_finite`` to name."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"lr as a tensor must hold one element, got shape {tuple(lr.shape)}")
        return float(lr)
    return float(lr) if isinstance(lr, numbers.Real) and not isinstance(lr, bool) else lr


def _check_group(group: dict) -> None:
    for flag in _UNSUPPORTED_FLAGS:
        if group.get(flag):
            raise ValueError(f"{flag}=True is not supported by SMETAdamW")
    if group.get("decoupled_weight_decay") is False and group["weight_decay"]:  # a torch.optim.Adam state
        raise ValueError("decoupled_weight_decay=False (L2 weight decay) is not supported by SMETAdamW")
    check_finite(_lr_value(group["lr"]), "lr")
    check_hyperparameters(group["betas"], group["eps"], group["weight_decay"], group["warmup"], group["warmup_steps"])
    _check_step_options(group, "")
    if group["backend"] is not None:
        check_backend(group["backend"])


def _check_step_options(group: dict, where: str) -> None:
    """The options a step reads per tensor, which ``check_hyperparameters`` (run on every batch) does not check: set
    by hand in ``param_groups`` after construction, a typo (``bias_correction="Global"``) was silently read as the
    other mode, a NaN ``density_lr_exponent`` raised naming the fused batch's ``lrs[0]`` and a ``state_dtype`` of
    ``torch.float64`` made moments that the step then refused, naming ``exp_avgs[0]``, and kept."""
    try:
        check_finite(group["density_lr_exponent"], "density_lr_exponent")
    except ValueError as err:
        raise ValueError(where + str(err)) from None
    for name, choices in (("warmup_scope", WARMUP_SCOPES), ("bias_correction", BIAS_CORRECTIONS)):
        if group[name] not in choices:
            raise ValueError(f"{where}{name} must be one of {choices}, got {group[name]!r}")
    if not isinstance(group["state_dtype"], torch.dtype):
        raise TypeError(f"{where}state_dtype must be a torch.dtype, got {type(group['state_dtype']).__name__}")
    if group["state_dtype"] not in PARAM_DTYPES:
        raise ValueError(f"{where}state_dtype must be one of {PARAM_DTYPES}, got {group['state_dtype']}")


def _step_counter() -> torch.Tensor:
    """A parameter's step count: a CPU float scalar whatever the default device (``torch.set_default_device``,
    a ``with torch.device(...)`` block), since :meth:`SMETAdamW.step` reads it with ``.item()`` for every dense
    parameter at every step: a CUDA one cost a device sync each."""
    return torch.zeros((), device="cpu")


class SMETAdamW(torch.optim.Optimizer):
    """AdamW for SMET: compact sparse values get per-block local steps, warm-up and ``lr * density^-alpha``.

    Args: ``lr``, ``betas``, ``eps``, ``weight_decay`` (decoupled) as in AdamW; ``warmup``: ``"linear"``,
    ``"momentum_ramp"`` or ``"none"`` over ``warmup_steps`` local steps; ``warmup_scope``: ``"all"`` (dense
    parameters warm up by their own step count too; released behaviour) or ``"regrown"`` (sparse values only);
    ``density_lr_exponent``: alpha;
    ``bias_correction``: ``"local"`` (per block) or ``"global"`` (per parameter; the naive-DST baseline with
    ``warmup="none"``); ``state_dtype``: dtype of the moments (fp32 by default, also for bf16 weights);
    ``backend``: ``None``/``"auto"``, ``"triton"`` or ``"reference"``. All may be set per parameter group.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup: str = "linear",
        warmup_steps: int = 100,
        warmup_scope: str = "all",
        density_lr_exponent: float = 1.0,
        bias_correction: str = "local",
        state_dtype: torch.dtype = torch.float32,
        backend: str | None = None,
    ):
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            warmup=warmup,
            warmup_steps=warmup_steps,
            warmup_scope=warmup_scope,
            density_lr_exponent=density_lr_exponent,
            bias_correction=bias_correction,
            state_dtype=state_dtype,
            backend=backend,
        )
        _check_group(defaults)
        self._tables: dict[tuple, dict] = {}  # device tables of the fused step, per batch (its groups' indices)
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:
        """``load_state_dict`` keeps the saved groups' options (missing ones filled by :meth:`_fill_options`). An
        unpickled or deep-copied optimizer starts without device tables (``torch.optim.Optimizer`` pickles only
        defaults, state and groups)."""
        super().__setstate__(state)
        self._tables = {}
        for group in self.param_groups:
            self._fill_options(group)

    def _fill_options(self, group: dict) -> dict:
        """Fill the options a saved group lacks, in place. ``warmup_scope`` is ``"regrown"``: a state saved before
        warm-up scopes existed warmed up the sparse values only, and a ``torch.optim.AdamW`` state's dense parameters
        continue as plain AdamW. Any other option (SMET's, in such a state) takes this optimizer's default, but not
        the flags torch's ``__setstate__`` adds to the defaults (``differentiable``)."""
        group.setdefault("warmup_scope", "regrown")
        for name, default in self.defaults.items():
            if name not in _UNSUPPORTED_FLAGS:
                group.setdefault(name, default)
        return group

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (defaults filled in); a group with an invalid option raises and is not added.

        A parameter listed twice is rejected (torch only warns): the fused step would update it from two
        programs at once.
        """
        super().add_param_group(param_group)
        try:
            group = self.param_groups[-1]
            if len(set(group["params"])) != len(group["params"]):
                raise ValueError("params of a parameter group must not repeat a parameter")
            _check_group(group)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Standard restore, but keep the saved state dtypes (torch casts float state to the parameter dtype,
        which would turn fp32 moments of bf16/fp16 weights into bf16/fp16). A saved group with an invalid or
        unsupported option (e.g. ``amsgrad=True`` from ``torch.optim.AdamW``) raises and changes nothing. The
        state of sparse values saved by ``torch.optim.AdamW`` has no ``block_step``: every slot took its ``step``.
        A ``step`` counter stays on the CPU (torch moves it to the parameter's device for a group saved as ``fused``).

        Hooks run as in ``torch.optim.Optimizer``: the load pre-hooks first (the dict a hook returns is the one
        checked and loaded), the post-hooks last, once the dtypes and ``block_step`` above are restored."""
        pre_hooks, post_hooks = self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks
        state_dict = state_dict.copy()  # shallow, as torch's: a pre-hook may rewrite its entries in place
        for pre_hook in pre_hooks.values():
            hooked = pre_hook(self, state_dict)
            state_dict = state_dict if hooked is None else hooked
        for saved_group in state_dict["param_groups"]:
            _check_group(self._fill_options(dict(saved_group)))
        self._check_saved_shapes(state_dict)
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()  # torch's load without the hooks, run here around it
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre_hooks
            self._optimizer_load_state_dict_post_hooks = post_hooks
        saved_ids = chain.from_iterable(group["params"] for group in state_dict["param_groups"])
        params = chain.from_iterable(group["params"] for group in self.param_groups)
        for saved_id, param in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if key != "step" and isinstance(value, torch.Tensor) and value.dtype != self.state[param][key].dtype:
                    self.state[param][key] = value.to(device=param.device, copy=True)
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state.get(param)
                if state and isinstance(state.get("step"), torch.Tensor) and state["step"].device.type != "cpu":
                    # torch moves it to the parameter's device for a saved group that says fused (torch's AdamW
                    # fused=True): the step reads it back each step, a device sync per parameter
                    state["step"] = state["step"].cpu()
                if state and getattr(param, "smet_layout", None) is not None and "block_step" not in state:
                    step = state["step"] if group["bias_correction"] == "global" else state.pop("step")
                    state["block_step"] = zeros_per_row(param, torch.int32).add_(int(step))
        for post_hook in post_hooks.values():
            post_hook(self)

    def _check_saved_shapes(self, state_dict: dict[str, Any]) -> None:
        """``ValueError`` naming the parameter whose saved moments (or ``block_step``) are not of its shape: the state
        of another model (e.g. other densities), which ``torch.optim.Optimizer`` loads without a look and a step
        then refused naming positions in its fused batch. Groups of other sizes are left to torch's own error."""
        saved_groups = state_dict["param_groups"]
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in self.param_groups]:
            return
        for group_index, (saved_group, group) in enumerate(zip(saved_groups, self.param_groups)):
            for param_index, (saved_id, param) in enumerate(zip(saved_group["params"], group["params"])):
                for key, value in state_dict["state"].get(saved_id, {}).items():
                    expected = {"exp_avg": param.shape, "exp_avg_sq": param.shape,
                                "block_step": param.shape[:1]}.get(key)  # fmt: skip
                    if expected is not None and isinstance(value, torch.Tensor) and value.shape != expected:
                        raise ValueError(
                            f"state of parameter {param_index} of param group {group_index}: {key} has shape "
                            f"{tuple(value.shape)} but the parameter needs {tuple(expected)} (a state dict of "
                            "another model?)"
                        )

    def _init_state(self, param: torch.Tensor, sparse: bool, group: dict) -> None:
        state = self.state[param]
        state["exp_avg"] = torch.zeros_like(param, dtype=group["state_dtype"], memory_format=torch.contiguous_format)
        state["exp_avg_sq"] = torch.zeros_like(param, dtype=group["state_dtype"], memory_format=torch.contiguous_format)
        if sparse:  # sharded like the values under FSDP2: each rank holds the steps of its own slots
            state["block_step"] = zeros_per_row(param, torch.int32)
        else:
            state["step"] = _step_counter()

    @staticmethod
    def _check_param(param: torch.Tensor, name: str) -> None:
        grad = param.grad
        if param.dtype not in PARAM_DTYPES:
            raise TypeError(f"{name} must be one of {PARAM_DTYPES}, got {param.dtype}")
        if grad.is_sparse:
            raise TypeError(f"{name}: torch sparse gradients are not supported (SMET grads are compact dense values)")
        if grad.shape != param.shape:
            raise ValueError(f"{name}: grad has shape {tuple(grad.shape)} but the parameter has {tuple(param.shape)}")
        if grad.dtype != param.dtype:
            raise TypeError(f"{name}: grad has dtype {grad.dtype} but the parameter has {param.dtype}")
        if not local(param).is_contiguous():
            raise ValueError(f"{name} must be contiguous")
        layout = getattr(param, "smet_layout", None)
        if layout is not None:
            check_row_sharded(param, name)
            b = layout.block_size
            if tuple(param.shape) != (layout.nnz, b, b):
                raise ValueError(
                    f"{name}: sparse values must have shape {(layout.nnz, b, b)} (its smet_layout), "
                    f"got {tuple(param.shape)}"
                )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One optimizer step over every parameter with a gradient; returns ``closure()`` when given.

        Groups that share betas, eps, weight decay, warm-up and backend are stepped together (one fused launch
        per device and dtype): lr, the density factor and the bias-correction step are per tensor.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stepped = [
            (group_index, group, param, f"parameter {param_index} of param group {group_index}")
            for group_index, group in enumerate(self.param_groups)
            for param_index, param in enumerate(group["params"])
            if param.grad is not None
        ]
        for _, _, param, name in stepped:  # every check before any state changes: a bad parameter changes nothing
            self._check_param(param, name)
        stepped_groups = {group_index: group for group_index, group, _, _ in stepped}
        lrs = {}
        for index, group in stepped_groups.items():  # a scheduler or a hand-set lr: named as set, before the density
            try:  # factor; a two-element tensor raised torch's message, an infinite lr made every weight inf/NaN
                lrs[index] = _lr_value(group["lr"])
                check_finite(lrs[index], "lr")
            except ValueError as err:
                raise ValueError(f"param group {index}: {err}") from None
        for index, group in stepped_groups.items():  # the per-tensor options a hand-edited group may hold
            _check_step_options(group, f"param group {index}: ")
        batches: dict[tuple, dict[str, list]] = {}
        batch_groups: dict[tuple, dict[int, None]] = {}  # the groups of each batch, in order: its tables' cache key
        counters = []  # step counts to bump once every batch is checked (a failed step must not count)
        for group_index, group, param, _ in stepped:
            key = (tuple(group["betas"]), group["eps"], group["weight_decay"], group["warmup"],
                   group["warmup_steps"], group["backend"])  # fmt: skip
            batch = batches.setdefault(key, {name: [] for name in _BATCH_FIELDS})
            batch_groups.setdefault(key, {})[group_index] = None
            layout = getattr(param, "smet_layout", None)
            state = self.state[param]
            if not state:
                self._init_state(param, layout is not None, group)
            if layout is not None:
                block_step = state["block_step"]
                lr = lrs[group_index] * layout.density ** (-group["density_lr_exponent"])
                global_step = None
                if group["bias_correction"] == "global":
                    if "step" not in state:
                        state["step"] = _step_counter()
                    counters.append(state["step"])
                    global_step = int(state["step"].item()) + 1
            else:
                counters.append(state["step"])
                block_step, lr, global_step = None, lrs[group_index], int(state["step"].item()) + 1
            param_local = local(param)
            if param_local.numel() == 0:  # FSDP2: this rank holds no slot / element of the parameter
                continue
            batch["params"].append(param_local)
            batch["grads"].append(local(param.grad).contiguous())
            batch["exp_avgs"].append(local(state["exp_avg"]))
            batch["exp_avg_sqs"].append(local(state["exp_avg_sq"]))
            batch["block_steps"].append(None if block_step is None else local(block_step))
            batch["lrs"].append(lr)
            batch["global_steps"].append(global_step)
            batch["dense_warmups"].append(layout is None and group["warmup_scope"] == "all")
        for key, batch in batches.items():  # adamw_step's checks of every batch, before the first runs
            if batch["params"]:
                check_hyperparameters(*key[:5])
                check_tensors(*(batch[name] for name in _BATCH_FIELDS))
                for device in {param.device for param in batch["params"]}:  # e.g. backend="triton" on CPU tensors
                    resolve_backend(device, key[5])
        for counter in counters:
            counter.add_(1)
        # tables cached by the batch's groups, not its hyper-parameters (scheduled, e.g. OneCycleLR's betas), and only
        # those of this step's batches kept: a cache keyed by values that change every step grew without bound
        tables, self._tables = self._tables, {}
        for key, batch in batches.items():
            if not batch["params"]:
                continue
            betas, eps, weight_decay, warmup, warmup_steps, backend = key
            hyper = dict(betas=betas, eps=eps, weight_decay=weight_decay, warmup=warmup, warmup_steps=warmup_steps)
            groups = tuple(batch_groups[key])
            cache = self._tables[groups] = tables.get(groups, {})
            launch_adamw_step(*(batch[name] for name in _BATCH_FIELDS), hyper, backend, cache)  # checked above
        return loss
