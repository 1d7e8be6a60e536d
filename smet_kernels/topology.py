"""The SMET topology controller: periodic prune + regrow of the active blocks of every sparse layer.

One class, :class:`SMET`, hence one module over 600 lines: its schedule, RigL hooks, rank agreement and
checkpointing all act on the same per-layer targets; the selection rules live in :mod:`.prune_regrow`.

Every ``ΔT = update_interval`` optimizer steps, from step ``ΔT`` up to and including ``T_end``, each sparse
layer with ``nnz`` active blocks trades ``n = nnz − max(1, floor(nnz · (1 − ζ_t)))`` of them (the authors' released
rule: at least one block kept, at least one moved while ``ζ_t > 0`` and ``nnz ≥ 2``), with the cosine-decayed fraction

    ζ_t = ζ_min + (ζ0 − ζ_min) · (1 + cos(π t / T_end)) / 2

* prune: the ``n`` active blocks of smallest block L1 norm ``Σ|w|`` (ties: lower slot first);
* regrow: ``n`` blocks that were inactive before this update (so never one just pruned), either
  ``random`` (SET: uniform, from a generator seeded with ``seed``) or ``gradient`` (RigL: largest block L1
  norm of the dense gradient ``dL/dW = dyᵀx`` of this step; ties: lower row-major block index first).

Regrown blocks reuse the pruned blocks' value slots, so parameter shapes never change. Two kinds of
sparse parameters are handled, found in ``model.parameters()`` by a marker attribute:

* compact values ``[nnz, b, b]`` carrying ``p.smet_layout`` (``BlockSparseLinear``): the layout's slots
  are moved with :meth:`BlockLayout.replace_blocks` and the slots' values, Adam moments and per-block
  step are reset by :func:`smet_kernels.ops.library.regrow_blocks` (the other per-weight state of torch.optim's
  optimizers, e.g. AMSGrad's ``max_exp_avg_sq``, SGD's ``momentum_buffer`` or Adafactor's per-slot factors, restarts
  there too: at zero, Adagrad's ``sum`` at its ``initial_accumulator_value``, Rprop's ``step_size`` at its ``lr``);
* dense masked weights ``[out, in]`` carrying ``p.smet_mask_layout`` (:class:`smet_kernels.masked.MaskedLinear`):
  the layout (hence the mask) is updated the same way, pruned blocks are zeroed, regrown blocks get the
  init values and the optimizer's per-weight state restarts at both (as for compact values).

Both kinds share one schedule and one selection rule (:mod:`smet_kernels.prune_regrow`).

**Dense gradients (RigL).** Only on update steps: when ``regrow="gradient"`` the controller puts a forward
hook on each sparse layer when it is built (on each layer using it, for a weight that several layers share: their
``dyᵀx`` sum into one probe), and the hooks record only right before an update step
(:meth:`SMET.needs_dense_grad` is then True). While armed, the hook passes the layer's output ``y`` through an
autograd function with a zero fp32 ``probe`` (``[out, in]`` stored as one element): ``y`` is unchanged and every
backward through the layer accumulates ``probe.grad += dyᵀx`` (fp32; ``x`` saved in its own dtype, as the layer
saves it); gradient accumulation over micro-batches therefore sums as the parameter gradients do, and an
activation-checkpointed layer counts it once. The training loop needs no change: ``forward, backward,
optimizer.step(), smet.step()`` as usual. A controller built on a model takes over its layers: it removes the hooks
an earlier controller put there (which would keep that one, and its optimizer, alive). A model compiled after the
controller is built traces the hooks (no tensor hook, so no graph break: ``fullgraph=True`` works; compiled once
while they record and once while they do not). Dynamo does not guard on module hooks, so it never sees a hook added
to a model it compiled before, nor one of a model whose class it already compiled in this process without them
(``torch._dynamo.reset()`` first, as ``smet-train --compile`` does for RigL).

**Distributed.** Decisions depend only on weights (identical across DDP ranks), the step and the seeded
generator (rank 0's state, broadcast when the controller is built; then consumed identically on every rank). In
addition, when ``torch.distributed`` is initialised the dense RigL gradients are averaged over ranks before scoring,
and the chosen slots and blocks of all layers are broadcast from rank 0 in one small int64 tensor, so every rank
applies exactly rank 0's update.

**FSDP2.** Under ``fully_shard`` the parameters are ``DTensor``s sharded on dim 0; the layouts stay replicated.
Compact values: each rank computes the L1 norms of its own slots and all ranks gather the ``[nnz]`` scores;
the regrow writes only the slots a rank owns (values, moments, ``block_step``), and the ``"normal"`` init is
drawn for all regrown slots on every rank (the generator stays in step). Masked weights (dense baseline): the
weight and its moments are gathered, updated as above and each rank keeps its rows. The controller must be
built after ``fully_shard`` (it holds the sharded parameters, as the optimizer does).
"""

from __future__ import annotations

import copy
import inspect
import math
import numbers
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from .backend import resolve_backend
from .dense_grad import RecordDenseGrad, zero_probe
from .layout import BlockLayout
from .ops.library import regrow_blocks
from .ops.regrow import check_inputs as check_regrow_inputs
from .prune_regrow import block_l1, blocks_to_move, choose_blocks, cosine_prune_fraction
from .sharding import check_row_sharded, full, gather_rows, is_sharded, local, row_range

REGROW_MODES = ("random", "gradient")
REGROW_INITS = ("zeros", "normal")
_REGROW_STATE_KEYS = ("exp_avg", "exp_avg_sq", "block_step")  # the state regrow_blocks resets
# torch.optim's state of one value per weight, which a regrown block must not inherit from the pruned one (Adam's,
# NAdam's, RAdam's moments, AMSGrad's maximum, Adamax's norm, SGD's momentum, RMSprop's and Adadelta's averages,
# Adagrad's sum, Rprop's signs and step sizes, ASGD's average); other state (GaLore's projection, a [d, d]
# preconditioner of a square layer) is not per weight and stays
_ELEMENTWISE_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_inf", "momentum_buffer", "square_avg",
                           "grad_avg", "acc_delta", "sum", "prev", "step_size", "ax")  # fmt: skip
# those of them that start at another value than zero: key -> the param-group entry holding that value
_FRESH_STATE = {"sum": "initial_accumulator_value", "step_size": "lr"}
# per-slot state of compact values not shaped like them: Adafactor's factored second moment ([nnz, b, 1], [nnz, 1, b])
_SLOT_STATE_KEYS = ("row_var", "col_var")

# why a RigL update found no dense gradient after remove_hooks(), and what to do
DETACHED_HOOKS = ("remove_hooks() detached the recording hooks before the backward (attached again now: run the "
                  "forward and backward again, then step())")


# ---------------------------------------------------------------------------------------------- controller
@dataclass(eq=False)
class _SparseTarget:
    """One sparse parameter under control: ``kind`` is ``compact`` (values) or ``masked`` (dense weight)."""

    name: str
    param: nn.Parameter
    layout: BlockLayout
    kind: str
    modules: tuple[nn.Module, ...]  # every module holding it (a shared weight: each use records into one probe)
    probe: torch.Tensor | None = field(default=None, repr=False)  # zero fp32 [out, in] while RigL records
    hooks: list = field(default_factory=list, repr=False)

    @property
    def dense_grad(self) -> torch.Tensor | None:
        """``dL/dW = Σ dyᵀx`` recorded since the controller armed (``probe.grad``); None if no backward ran."""
        return None if self.probe is None else self.probe.grad


def _first_input_name(module: nn.Module) -> str:
    """The name of the first argument of ``module.forward`` (the layer input when it is called by keyword); ``x``, as
    this library's layers name it, for a forward without a named first argument (``*args``, ``**kwargs``, none, or no
    signature, e.g. a builtin)."""
    try:
        arguments = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return "x"
    named = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return arguments[0].name if arguments and arguments[0].kind in named else "x"


def _check_int(value, name: str, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def _check_float(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    return float(value)


def _local_regrow_operands(param: torch.Tensor, state: dict, slots: torch.Tensor) -> tuple:
    """``(values, slots, states, mine)`` of this rank for a regrow of ``slots`` in values sharded on dim 0: its local
    values and state shards, the slots it owns renumbered from its first row, and the mask of those in ``slots``."""
    check_row_sharded(param, "values")
    start, stop = row_range(param)
    mine = (slots >= start) & (slots < stop)
    states = [None if state.get(key) is None else local(state[key]) for key in _REGROW_STATE_KEYS]
    return local(param.data), slots[mine] - start, states, mine


def _plain_name(name: str, ddp_wrappers: tuple[str, ...] = ()) -> str:
    """A parameter's name without the ``_orig_mod`` of ``torch.compile`` wrappers and the ``module`` of the
    ``DistributedDataParallel`` wrappers named ``ddp_wrappers`` in the model: a controller built on a compiled or
    DDP-wrapped model keeps the names of the plain model, so their states load into each other (a DDP run's state
    into one process and back)."""
    for wrapper in sorted(ddp_wrappers, key=len, reverse=True):
        head = f"{wrapper}.module." if wrapper else "module."
        if name.startswith(head):
            name = name[: len(head) - len("module.")] + name[len(head):]
            break
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def _ddp_wrappers(model: nn.Module) -> tuple[str, ...]:
    """The names in ``model`` of its ``DistributedDataParallel`` wrappers (``""``: the model itself)."""
    return tuple(name for name, module in model.named_modules()
                 if isinstance(module, nn.parallel.DistributedDataParallel))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class NoUpdateWarning(RuntimeWarning):
    """A controller built to update no topology: its first update (step ``ΔT``) is past ``T_end``."""


class SMET:
    """Topology controller for dynamic sparse training; call :meth:`step` after every ``optimizer.step()``.

    Args:
        model: module whose parameters include compact sparse values (``p.smet_layout``) and/or masked
            dense weights (``p.smet_mask_layout``). Those frozen (``requires_grad=False``) when the controller is
            built are left out (they need not be in ``optimizer``), and an update passes over those frozen since: a
            frozen layer keeps its blocks.
        optimizer: the optimizer of ``model``; its per-parameter state is reset for regrown blocks.
        update_interval: ``ΔT``, optimizer steps between topology updates (first update at step ``ΔT``).
        prune_fraction: ``ζ0`` in (0, 1), the fraction of each layer's active blocks swapped at t = 0.
        min_prune_fraction: ``ζ_min`` in [0, ζ0], the fraction reached at ``T_end``.
        end_step: ``T_end``, the last step at which an update may happen and the period of the cosine decay.
            ``None`` means "the whole run": ``total_steps`` when given; when both are None the fraction stays
            ``ζ0`` and updates never stop.
        total_steps: length of the run, the default ``T_end``.
        regrow: ``"random"`` (SET) or ``"gradient"`` (RigL, dense gradient formed on update steps only).
        regrow_init: values of regrown blocks, ``"zeros"`` or ``"normal"`` (``N(0, init_std²)``).
        init_std: standard deviation of the ``"normal"`` regrow init.
        seed: seed of the controller's CPU generator (random regrow and normal init).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        update_interval: int = 100,
        prune_fraction: float = 0.2,
        min_prune_fraction: float = 0.005,
        end_step: int | None = None,
        total_steps: int | None = None,
        regrow: str = "random",
        regrow_init: str = "zeros",
        init_std: float = 0.02,
        seed: int = 0,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.update_interval = _check_int(update_interval, "update_interval", 1)
        self.prune_fraction = _check_float(prune_fraction, "prune_fraction")
        if not 0.0 < self.prune_fraction < 1.0:
            raise ValueError(f"prune_fraction must be in (0, 1), got {prune_fraction}")
        self.min_prune_fraction = _check_float(min_prune_fraction, "min_prune_fraction")
        if not 0.0 <= self.min_prune_fraction <= self.prune_fraction:
            raise ValueError(
                f"min_prune_fraction must be in [0, prune_fraction={self.prune_fraction}], got {min_prune_fraction}"
            )
        if end_step is not None:
            _check_int(end_step, "end_step", 1)
        if total_steps is not None:
            _check_int(total_steps, "total_steps", 1)
        self.end_step = end_step if end_step is not None else total_steps
        if regrow not in REGROW_MODES:
            raise ValueError(f"regrow must be one of {REGROW_MODES}, got {regrow!r}")
        self.regrow = regrow
        if regrow_init not in REGROW_INITS:
            raise ValueError(f"regrow_init must be one of {REGROW_INITS}, got {regrow_init!r}")
        self.regrow_init = regrow_init
        self.init_std = _check_float(init_std, "init_std")
        if not 0.0 < self.init_std < math.inf:
            raise ValueError(f"init_std must be a finite float > 0, got {init_std}")
        self.seed = _check_int(seed, "seed", 0, 2**64 - 1)  # what torch.Generator.manual_seed takes

        self.model = model
        self.optimizer = optimizer
        found = self._find_targets(model)
        self.targets = [target for target in found if target.param.requires_grad]  # a frozen layer keeps its blocks
        if not found:
            raise ValueError(
                "model has no sparse parameters (none carries smet_layout or smet_mask_layout); "
                "sparsify it first (smet_kernels.modules.sparsify or smet_kernels.masked.masked_sparsify)"
            )
        if not self.targets:
            raise ValueError(f"every sparse parameter of model is frozen (requires_grad=False), e.g. "
                             f"'{found[0].name}': SMET updates the topology of the layers that train")
        self._check_targets(optimizer)
        if regrow == "gradient":
            self._check_recordable()
        static = [t.name for t in self.targets if blocks_to_move(self.prune_fraction, t.layout.nnz) == 0]
        if static:
            warnings.warn(
                f"SMET: prune_fraction={self.prune_fraction} moves no block of {len(static)} layer(s) with a single "
                f"active block (at least one block is kept), e.g. '{static[0]}'; their topology stays fixed. Use a "
                "smaller block size or a higher density.",
                RuntimeWarning,
                stacklevel=2,
            )
        if self.end_step is not None and self.update_interval > self.end_step:
            warnings.warn(
                f"SMET: no topology update will run: update_interval={self.update_interval} is past T_end="
                f"{self.end_step} (end_step, else total_steps), the last step an update may run at; the topology "
                "stays as it is",
                NoUpdateWarning,
                stacklevel=2,
            )
        self.generator = torch.Generator(device="cpu").manual_seed(self.seed)
        if _distributed():  # rank 0's generator everywhere: the "normal" regrow init draws on every rank
            state = self.generator.get_state().to(_collective_device())
            dist.broadcast(state, src=0)
            self.generator.set_state(state.cpu())
        self.history: list[dict] = []
        self._step = 0
        self._detach_earlier_recorders()
        self._sync_hooks()

    # ------------------------------------------------------------------ discovery
    @staticmethod
    def _find_targets(model: nn.Module) -> list[_SparseTarget]:
        owners: dict[int, list[nn.Module]] = {}
        for module in model.modules():
            for param in module.parameters(recurse=False):
                owners.setdefault(id(param), []).append(module)
        targets, wrappers = [], _ddp_wrappers(model)
        for name, param in model.named_parameters():
            name = _plain_name(name, wrappers)
            if hasattr(param, "smet_layout"):
                targets.append(_SparseTarget(name, param, param.smet_layout, "compact", tuple(owners[id(param)])))
            elif hasattr(param, "smet_mask_layout"):
                targets.append(_SparseTarget(name, param, param.smet_mask_layout, "masked", tuple(owners[id(param)])))
        return targets

    def _check_targets(self, optimizer: torch.optim.Optimizer) -> None:
        """Each sparse parameter has a layout of its own and its state in ``optimizer`` (else an update would move
        another layer's blocks, or leave a regrown block with the pruned block's Adam moments)."""
        owners: dict[int, str] = {}
        for target in self.targets:
            other = owners.setdefault(id(target.layout), target.name)
            if other != target.name:
                raise ValueError(
                    f"sparse parameters '{other}' and '{target.name}' share one BlockLayout object: a topology update "
                    "of one would move the blocks of the other. Give each layer its own layout (layout.clone())."
                )
        if _distributed():
            self._check_same_layouts_on_every_rank()
        held = {id(param) for group in optimizer.param_groups for param in group["params"]}
        missing = [target.name for target in self.targets if id(target.param) not in held]
        if missing:
            raise ValueError(
                f"optimizer does not hold the sparse parameter(s) {missing}: SMET resets the optimizer state of "
                "regrown blocks, so pass the optimizer that steps them"
            )

    def _check_recordable(self) -> None:
        """RigL records ``dyᵀx`` at every module holding a sparse parameter: a weight shared by modules of different
        kinds (a tied embedding and head) has a use whose gradient is not ``dyᵀx``."""
        for target in self.targets:
            kinds = sorted({type(module).__name__ for module in target.modules})
            if len(kinds) > 1:
                raise ValueError(
                    f"regrow='gradient' records the dense gradient of '{target.name}' as dyᵀx at each module using "
                    f"it, but modules of different kinds hold it ({', '.join(kinds)}); use regrow='random'"
                )

    # ------------------------------------------------------------------ schedule
    @property
    def step_count(self) -> int:
        """Optimizer steps counted so far."""
        return self._step

    def is_update_step(self, step: int) -> bool:
        """True when a topology update happens after optimizer step ``step`` (1-based)."""
        return (
            step >= self.update_interval
            and step % self.update_interval == 0
            and (self.end_step is None or step <= self.end_step)
        )

    def prune_fraction_at(self, step: int) -> float:
        """``ζ_t`` of the cosine schedule at ``step``."""
        return cosine_prune_fraction(step, self.end_step, self.prune_fraction, self.min_prune_fraction)

    def needs_dense_grad(self) -> bool:
        """True when the next backward must record dense gradients (RigL, next step is an update step)."""
        return self.regrow == "gradient" and self.is_update_step(self._step + 1)

    def discard_dense_grad(self) -> None:
        """Drop the dense gradients recorded since the last step (a step that was not taken, e.g. skipped for a
        non-finite loss: the retried step records them again, and RigL must not score the skipped one's)."""
        for target in self.targets:
            if target.probe is not None:
                target.probe.grad = None

    # ------------------------------------------------------------------ stepping
    def step(self) -> dict | None:
        """Count one optimizer step; on update steps prune + regrow every layer and return the record.

        An update that raises (e.g. RigL without a dense gradient) changes nothing: the step is not counted and the
        generator is not advanced, so calling :meth:`step` again retries the same update."""
        self._step += 1
        record = None
        if self.is_update_step(self._step):
            generator_state = self.generator.get_state()
            try:
                record = self._update()
            except Exception:  # raised before any layer changed (every check precedes the first change)
                self._step -= 1
                self.generator.set_state(generator_state)
                self._attach_hooks()  # detached by remove_hooks(): the retry's backward records again
                raise
        self._sync_hooks()
        return record

    @torch.no_grad()
    def _update(self) -> dict:
        zeta = self.prune_fraction_at(self._step)
        targets = [t for t in self.targets if t.param.requires_grad]  # one frozen since the build keeps its blocks
        if self.regrow == "gradient" and _distributed():  # fail on every rank together, not hang in all_reduce
            missing = torch.tensor([sum(t.dense_grad is None for t in targets)], device=_collective_device())
            dist.all_reduce(missing)
            if int(missing.item()):
                raise RuntimeError(
                    f"regrow='gradient' needs the dense gradient of every sparse layer on every rank at update step "
                    f"{self._step}, but some rank ran no backward pass through some layer since the previous "
                    "optimizer step" + ("" if all(t.hooks for t in targets) else f" ({DETACHED_HOOKS})")
                )
        decisions = []
        for target in targets:
            n = blocks_to_move(zeta, target.layout.nnz)
            decisions.append(
                choose_blocks(target.layout, self._prune_scores(target), n, self._regrow_scores(target), self.generator)
            )
        if _distributed() and decisions:
            decisions = self._broadcast(decisions)
        for target, (slots, _) in zip(targets, decisions):  # before the first layer changes
            if slots.numel():
                self._check_regrow(target, slots)
        record = {"step": self._step, "prune_fraction": zeta, "layers": {}}
        for target, (slots, new_blocks) in zip(targets, decisions):
            if slots.numel():
                self._apply(target, slots, new_blocks)
            record["layers"][target.name] = {"pruned": int(slots.numel()), "regrown": int(new_blocks.shape[0])}
        self.history.append(record)
        return record

    def _prune_scores(self, target: _SparseTarget) -> torch.Tensor:
        """``Σ|w|`` of each slot's block, summed as ``[nnz, b, b]`` values in both kinds (bit-identical scores, so
        compact and masked weights prune the same blocks)."""
        if target.kind == "compact":  # under FSDP2: this rank's slots, then all slots gathered
            scores = local(target.param.detach()).abs().sum(dim=(1, 2), dtype=torch.float32)
            return gather_rows(scores, target.param)
        layout, b = target.layout, target.layout.block_size
        indices = layout.block_indices.to(target.param.device)
        grid = full(target.param.detach()).view(layout.block_shape[0], b, layout.block_shape[1], b).permute(0, 2, 1, 3)
        return grid[indices[:, 0], indices[:, 1]].contiguous().abs().sum(dim=(1, 2), dtype=torch.float32)

    def _regrow_scores(self, target: _SparseTarget) -> torch.Tensor | None:
        if self.regrow == "random":
            return None
        if target.dense_grad is None:
            why = (
                "no backward pass went through its layer since the previous optimizer step (under torch.compile: build "
                "the controller before the model is first compiled, and call torch._dynamo.reset() before compiling "
                "where this process compiled a model of its class without the controller's hooks)"
                if target.hooks else DETACHED_HOOKS
            )
            raise RuntimeError(f"regrow='gradient' needs the dense gradient of {target.name!r} at update step "
                               f"{self._step}, but {why}")
        if _distributed():
            dist.all_reduce(target.dense_grad)
            target.dense_grad.div_(dist.get_world_size())
        return block_l1(target.dense_grad, target.layout.block_size)

    def _check_same_layouts_on_every_rank(self) -> None:
        """Rank 0's decisions are applied on every rank, so every rank must start from rank 0's layouts."""
        local = torch.cat([t.layout.block_indices.flatten().cpu() for t in self.targets]).to(torch.int64)
        reference = local.clone().to(_collective_device())
        dist.broadcast(reference, src=0)
        differs = torch.tensor([int(not torch.equal(reference.cpu(), local))], device=_collective_device())
        dist.all_reduce(differs)
        if int(differs.item()):
            raise ValueError(
                "the block layouts differ between ranks: build them from the same seed on every rank (e.g. pass "
                "sparsify a generator seeded identically everywhere) before creating SMET"
            )

    @staticmethod
    def _broadcast(decisions: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        packed = torch.cat([torch.cat([slots, blocks.flatten()]) for slots, blocks in decisions])
        packed = packed.to(_collective_device())
        dist.broadcast(packed, src=0)
        packed = packed.cpu()
        out, offset = [], 0
        for slots, _ in decisions:
            n = slots.numel()
            out.append((packed[offset : offset + n], packed[offset + n : offset + 3 * n].reshape(n, 2)))
            offset += 3 * n
        return out

    def _init_values(self, n: int, block_size: int, like: torch.Tensor) -> torch.Tensor:
        """Regrown block values for a masked weight, drawn as :func:`regrow_blocks` draws them (fp32 on CPU)."""
        if self.regrow_init == "zeros":
            return torch.zeros(n, block_size, block_size, dtype=like.dtype, device=like.device)
        noise = torch.randn((n, block_size, block_size), generator=self.generator, device=self.generator.device,
                            dtype=torch.float32)  # fmt: skip
        return (noise * self.init_std).to(dtype=like.dtype, device=like.device)

    def _check_regrow(self, target: _SparseTarget, slots: torch.Tensor) -> None:
        """Raise what the regrow of compact ``target``'s ``slots`` in :meth:`_apply` would raise (e.g. fp64 values, or
        the global backend ``"triton"`` where Triton cannot run), so that an update fails before it moves any layout,
        not after moving those of the layers before (or this one's, whose regrow then raised)."""
        if target.kind != "compact":
            return
        state = self.optimizer.state.get(target.param, {})
        if is_sharded(target.param):
            values, slots, states, _ = _local_regrow_operands(target.param, state, slots)
        else:
            values, states = target.param.data, [state.get(key) for key in _REGROW_STATE_KEYS]
        check_regrow_inputs(values, slots.to(values.device), *states, self.regrow_init, self.init_std, self.generator)
        resolve_backend(values.device)

    def _apply(self, target: _SparseTarget, slots: torch.Tensor, new_blocks: torch.Tensor) -> None:
        layout, param, b = target.layout, target.param, target.layout.block_size
        state = self.optimizer.state.get(param, {})
        if target.kind == "compact":
            layout.replace_blocks(slots, new_blocks)
            if is_sharded(param):
                self._regrow_sharded(param, state, slots)
                return
            regrow_blocks(
                param.data,
                slots.to(param.device),
                state.get("exp_avg"),
                state.get("exp_avg_sq"),
                state.get("block_step"),
                init=self.regrow_init,
                init_std=self.init_std,
                generator=self.generator,
            )
            self._reset_other_state(param, state, param.data, slots)
            return
        if is_sharded(param):
            self._apply_masked_sharded(target, slots, new_blocks, state)
            return
        pruned_blocks = layout.block_indices[slots.to(layout.device)].cpu()
        layout.replace_blocks(slots, new_blocks)
        rows_b, cols_b = layout.block_shape
        pruned = pruned_blocks.to(param.device)
        grown = new_blocks.to(param.device)
        for tensor, value in [(param.data, 0.0), *self._fresh_states(param, state)]:
            blocks = tensor.view(rows_b, b, cols_b, b).permute(0, 2, 1, 3)
            blocks[pruned[:, 0], pruned[:, 1]] = value
            blocks[grown[:, 0], grown[:, 1]] = value
        param.data.view(rows_b, b, cols_b, b).permute(0, 2, 1, 3)[grown[:, 0], grown[:, 1]] = self._init_values(
            slots.numel(), b, param
        )

    def _fresh_states(self, param: torch.Tensor, state: dict, skip: tuple[str, ...] = ()) -> list[tuple]:
        """``(tensor, value)`` of each tensor of ``param``'s optimizer ``state`` that holds one value per weight
        (:data:`_ELEMENTWISE_STATE_KEYS`, shaped like ``param``; but those of ``skip``), with the value a fresh
        optimizer starts it at (:data:`_FRESH_STATE` in ``param``'s group, else 0)."""
        group = next(group for group in self.optimizer.param_groups if any(p is param for p in group["params"]))
        return [(state[key], float(group.get(_FRESH_STATE[key], 0.0)) if key in _FRESH_STATE else 0.0)
                for key in _ELEMENTWISE_STATE_KEYS
                if key not in skip and isinstance(state.get(key), torch.Tensor) and state[key].shape == param.shape]

    def _reset_other_state(self, param: torch.Tensor, state: dict, values: torch.Tensor, slots: torch.Tensor) -> None:
        """Restart the state that :func:`regrow_blocks` leaves as the pruned blocks had it (every elementwise state
        but its own: AMSGrad's maximum, SGD's momentum, ...; Adafactor's per-slot factors) at (this rank's) ``values``'
        ``slots``."""
        for tensor, value in self._fresh_states(param, state, skip=_REGROW_STATE_KEYS):
            local(tensor)[slots.to(values.device)] = value
        for key in _SLOT_STATE_KEYS:
            tensor = state.get(key)
            if isinstance(tensor, torch.Tensor) and tensor.dim() == param.dim() and tensor.shape[0] == param.shape[0]:
                local(tensor)[slots.to(values.device)] = 0.0

    def _regrow_sharded(self, param: torch.Tensor, state: dict, slots: torch.Tensor) -> None:
        """Regrow ``slots`` of values sharded on dim 0: each rank resets the slots it owns. The ``"normal"`` init
        draws all ``n`` blocks on every rank exactly as :func:`regrow_blocks` draws them, then keeps its own."""
        values, local_slots, states, mine = _local_regrow_operands(param, state, slots)
        local_slots = local_slots.to(values.device)
        regrow_blocks(values, local_slots, *states, init="zeros")
        self._reset_other_state(param, state, values, local_slots)
        if self.regrow_init == "normal":
            b = values.shape[1]
            noise = torch.randn((slots.numel(), b, b), generator=self.generator, device=self.generator.device,
                                dtype=torch.float32)  # fmt: skip
            new_values = (noise * self.init_std)[mine].to(device=values.device, dtype=values.dtype)
            values[local_slots] = new_values

    def _apply_masked_sharded(self, target: _SparseTarget, slots, new_blocks, state: dict) -> None:
        """The masked update on a weight sharded on dim 0: gather weight and moments, update them as one process
        would, keep this rank's rows (the dense baseline: memory is not what it measures)."""
        param = target.param
        check_row_sharded(param, target.name)
        start, stop = row_range(param)
        starts = [(param.data, 0.0), *self._fresh_states(param, state)]
        shards = [tensor for tensor, _ in starts]
        gathered = [full(t).clone() for t in shards]
        layout, b = target.layout, target.layout.block_size
        pruned = layout.block_indices[slots.to(layout.device)].cpu().to(gathered[0].device)
        layout.replace_blocks(slots, new_blocks)
        grown = new_blocks.to(gathered[0].device)
        rows_b, cols_b = layout.block_shape
        for tensor, (_, value) in zip(gathered, starts):
            blocks = tensor.view(rows_b, b, cols_b, b).permute(0, 2, 1, 3)
            blocks[pruned[:, 0], pruned[:, 1]] = value
            blocks[grown[:, 0], grown[:, 1]] = value
        gathered[0].view(rows_b, b, cols_b, b).permute(0, 2, 1, 3)[grown[:, 0], grown[:, 1]] = self._init_values(
            slots.numel(), b, gathered[0]
        )
        for shard, whole in zip(shards, gathered):
            local(shard).copy_(whole[start:stop])

    # ------------------------------------------------------------------ dense-gradient hooks (RigL)
    def _sync_hooks(self) -> None:
        """Arm the recording for the next step when due (a fresh zero probe per layer, no dense gradient yet);
        with RigL, (re-)attach any missing hook."""
        self._recording = self.needs_dense_grad()
        if self.regrow != "gradient":
            return
        for target in self.targets:  # none for a layer frozen since the build: its update is passed over
            recording = self._recording and target.param.requires_grad
            target.probe = zero_probe(target.layout.shape, target.param.device) if recording else None
        self._attach_hooks()

    def _attach_hooks(self) -> None:
        """With RigL, a recording hook on every layer of a target that has none (new, or detached by
        :meth:`remove_hooks`)."""
        if self.regrow != "gradient":
            return
        for target in self.targets:
            if not target.hooks:
                for module in target.modules:
                    recorder = self._make_recorder(target, module)
                    recorder.smet_handle = module.register_forward_hook(recorder, with_kwargs=True)
                    target.hooks.append(recorder.smet_handle)

    def _detach_earlier_recorders(self) -> None:
        """Remove the dense-gradient hooks that an earlier controller left on these layers: they would keep it (and
        its optimizer) alive through the model, and record at every backward if it was armed."""
        for module in {id(module): module for target in self.targets for module in target.modules}.values():
            for hook in list(module._forward_hooks.values()):
                handle = getattr(hook, "smet_handle", None)
                if handle is not None:
                    handle.remove()

    def _make_recorder(self, target: _SparseTarget, layer: nn.Module):
        keyword = _first_input_name(layer)

        def record_input(module, inputs, kwargs, output):
            """While armed: ``y`` through :class:`RecordDenseGrad`, so ``probe.grad = Σ dyᵀx`` (fp32), ``x`` the first
            positional input or, called by keyword, the argument named like the first of ``forward``; traceable, no
            tensor hook: under ``torch.compile`` no graph break, one graph armed and one not."""
            recording = self._recording and target.probe is not None and torch.is_grad_enabled()
            if not (recording and isinstance(output, torch.Tensor) and output.requires_grad):
                return None
            x = inputs[0] if inputs else kwargs.get(keyword)
            if not isinstance(x, torch.Tensor):
                raise TypeError(
                    f"regrow='gradient' records the dense gradient of '{target.name}' as dyᵀx with x the input of "
                    f"{type(module).__name__}.forward, but it was called without a tensor as its first argument "
                    f"('{keyword}'); call it with its input first"
                )
            return RecordDenseGrad.apply(output, x.detach(), target.probe)

        return record_input

    def remove_hooks(self) -> None:
        """Detach the controller's dense-gradient hooks from the model (which then no longer keeps the controller
        alive); the next :meth:`step` attaches them again. An update step right after finds no dense gradient: it
        raises and attaches them, and its retry after another forward and backward updates. A model compiled with
        the hooks keeps them in its graph (``torch._dynamo.reset()`` before it is compiled again)."""
        for target in self.targets:
            for hook in target.hooks:
                hook.remove()
            target.hooks.clear()

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """Step counter, generator state, history and every layer's slot -> block map (by parameter name)."""
        return {
            "step": self._step,
            "generator": self.generator.get_state(),
            "history": copy.deepcopy(self.history),
            "layouts": {target.name: target.layout.state_dict() for target in self.targets},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output; layouts are restored in place (same objects as the layers')."""
        self._apply_state(self._check_state(state))

    def _check_state(self, state: dict) -> tuple:
        """Every check of :meth:`load_state_dict`, changing nothing: what :meth:`_apply_state` then restores."""
        missing = [key for key in ("step", "generator", "history", "layouts") if not isinstance(state, dict)
                   or key not in state]  # fmt: skip
        if missing:
            raise ValueError(f"state is not an SMET.state_dict(): it lacks {missing}")
        wrappers = _ddp_wrappers(self.model)  # a state saved with the wrapper's names loads too
        layouts = {_plain_name(name, wrappers): layout for name, layout in state["layouts"].items()}
        names = {target.name for target in self.targets}
        if set(layouts) != names:
            raise ValueError(
                f"state's layouts are for {sorted(layouts)}, this controller manages {sorted(names)}"
            )
        # every check before the first change: a state incompatible with a later layer leaves every layout as it was
        restored = []
        for target in self.targets:
            saved = layouts[target.name]
            if tuple(saved["shape"]) != target.layout.shape or int(saved["block_size"]) != target.layout.block_size:
                raise ValueError(f"layout of {target.name!r} in state does not match the model's layer")
            restored.append(target.layout.check_block_indices(saved["block_indices"]))
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"state's step must be an int >= 0, got {step!r}")
        if not isinstance(state["history"], list):  # else the next update raised appending to it, layouts moved
            raise ValueError(f"state's history must be a list, got {type(state['history']).__name__}")
        generator_state = state["generator"].cpu()  # a CPU ByteTensor even if the state was mapped to a GPU
        torch.Generator(device="cpu").set_state(generator_state)  # raises here, not after the layouts are restored
        return restored, int(step), generator_state, copy.deepcopy(state["history"])

    def _apply_state(self, checked: tuple) -> None:
        restored, step, generator_state, history = checked
        for target, block_indices in zip(self.targets, restored):
            target.layout.set_block_indices(block_indices)
        self._step = step
        self.generator.set_state(generator_state)
        self.history = history
        self._sync_hooks()

    def __repr__(self) -> str:
        return (
            f"SMET(layers={len(self.targets)}, update_interval={self.update_interval}, "
            f"prune_fraction={self.prune_fraction}, min_prune_fraction={self.min_prune_fraction}, "
            f"end_step={self.end_step}, regrow={self.regrow!r}, regrow_init={self.regrow_init!r}, step={self._step})"
        )
