"""Reference SMET trainer: ``train(TrainConfig(...)) -> summary dict`` (the ``smet-train`` CLI wraps it).

One optimizer step (global batch ``batch_size`` sequences, split over ``grad_accum`` micro-steps and the
data-parallel ranks) is ``forward/backward per micro-batch -> clip -> lr schedule -> optimizer.step() ->
topology controller.step()``. Optimizer modes:

* ``adamw``: dense model, ``torch.optim.AdamW``;
* ``galore``: dense model, :class:`~smet_kernels.optim.galore.GaLoreAdamW` on the hidden linears;
* ``smet``: hidden linears -> ``BlockSparseLinear``, :class:`SMETAdamW` (local bias correction, warm-up,
  density-aware LR) and the :class:`~smet_kernels.topology.SMET` controller;
* ``naive-dst``: the paper's naive DST: compact storage and plain Adam, ``warmup="none"``,
  ``bias_correction="global"`` (cold start), α = 0 unless given;
* ``warmup-only`` / ``density-lr-only``: the ablation arms between them (SMET with α = 0; naive DST with α = 1
  unless given) — see :data:`SMET_ADAMW_ARMS`;
* ``masked-dst``: hidden linears -> masked dense layers, ``torch.optim.AdamW``, same controller.

LR: linear warm-up over ``lr_warmup_steps``, then cosine decay to ``0.1 * lr`` at ``max_steps``.

Outputs in ``out_dir`` (rank 0): ``metrics.jsonl`` (one object per logged step: ``type="train"``, ``step``,
``loss``, ``lr``, ``tokens_per_s``, ``peak_mem_bytes`` — ``torch.cuda.max_memory_allocated`` on CUDA, the
process peak resident set size (``ru_maxrss``) on CPU — plus ``val_loss``/``val_ppl`` on eval steps; one
``type="topology_update"`` object per update and one ``type="loss_spike"`` object per measured spike, written
at the step its window closes, ``update_step`` naming the update; ``step`` is always the step of writing),
``summary.json`` and ``checkpoints/step_XXXXXXX/`` (written to a temporary folder, then renamed). The summary's
``tokens_per_s`` is all tokens over all step time (kernel compilation and autotuning of the first steps
included); ``steady_tokens_per_s`` is one step's tokens over the median step time of this process, its first
step left out.

Multi-process: under ``torchrun`` (``WORLD_SIZE > 1``) the process group is initialised from the environment
(``nccl`` on CUDA, ``gloo`` on CPU); every rank takes its own slice of each global batch, so the training matches
one process. ``parallel="ddp"`` (default) wraps the model in ``DistributedDataParallel`` (on the compact
parameters). ``parallel="fsdp"`` applies FSDP2 (``fully_shard`` to each decoder layer, then the root) before the
optimizer is built: every parameter, compact values included, becomes a ``DTensor`` sharded on dim 0 (whole slots
per rank), and so do the optimizer states (``block_step`` included); :class:`SMETAdamW` and the SMET controller
work on the local shards (prune scores gathered over ranks, each rank regrows the slots it owns). Checkpoints of an
fsdp run are gathered to full tensors and written by rank 0 in the single-process format; on resume every rank
loads them and keeps its shard. GaLore is rejected under fsdp (its projection needs whole gradient matrices).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import random
import resource
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .. import backend as backend_module
from ..layout import SUPPORTED_BLOCK_SIZES, nnz_for_density
from ..sharding import full, is_sharded, shard_like
from ..topology import SMET
from ..optim.galore import GALORE_DEFAULT_RANK, GaLoreAdamW, galore_param_groups
from .data import DataError, PackedBatches, eval_windows, load_corpus, window_batch
from .model import HIDDEN_LINEAR_NAMES, MODEL_CONFIGS, LlamaModel, lm_loss, model_config
from .probe import UpdateProbe
from .spikes import SpikeTracker

# --- SMETAdamW arms (issue 16): name -> (warm-up: "config" = TrainConfig.warmup_mode, bias correction,
#     default α, whether α may be set). SMET = warm-up + density-aware LR; naive DST = neither (the paper's).
SMET_ADAMW_ARMS = {
    "smet": ("config", "local", 1.0, True),
    "naive-dst": ("none", "global", 0.0, True),
    "warmup-only": ("config", "local", 0.0, False),
    "density-lr-only": ("none", "global", 1.0, True),
}
OPTIMIZERS = ("adamw", "galore", "smet", "masked-dst", "naive-dst", "warmup-only", "density-lr-only")
PARALLEL_MODES = ("ddp", "fsdp")
SPARSE_OPTIMIZERS = ("smet", "masked-dst", "naive-dst", "warmup-only", "density-lr-only")
WARMUP_SCOPES = ("all", "regrown")
# settings a resumed run must share with its checkpoint (model shape and topology, data order and position)
FIXED_ON_RESUME = ("model", "optimizer", "density", "block_size", "distribution", "data", "seq_len",
                   "batch_size", "seed", "spike_window")
PRECISIONS = ("fp32", "bf16-autocast", "bf16")
HIDDEN_LINEAR_PATTERN = r"\.(" + "|".join(HIDDEN_LINEAR_NAMES) + r")$"
MIN_LR_RATIO = 0.1


class ConfigError(ValueError):
    """A bad training configuration or unusable data (the CLI prints it as a one-line error)."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in every checkpoint). See ``smet-train --help``."""

    model: str = "tiny"
    optimizer: str = "smet"
    density: float = 0.5
    block_size: int | None = None
    distribution: str = "uniform"
    update_interval: int = 100
    prune_fraction: float = 0.2
    regrow: str = "random"
    warmup_mode: str = "linear"
    optimizer_warmup_steps: int = 100
    density_lr_exponent: float | None = None  # None: the arm's default (SMET_ADAMW_ARMS); to_dict records it
    warmup_scope: str = "all"
    supar: bool = False
    supar_base_width: int = 256
    galore_rank: int | None = None
    galore_update_gap: int = 200
    galore_scale: float = 0.25
    lr: float = 1e-3
    lr_warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    precision: str = "fp32"
    batch_size: int = 8
    seq_len: int = 128
    grad_accum: int = 1
    grad_clip: float = 1.0
    max_steps: int = 100
    parallel: str = "ddp"
    seed: int = 0
    eval_every: int = 50
    eval_batches: int = 4
    log_every: int = 1
    spike_window: int = 10
    update_probe: bool = True
    data: str = "stdlib"
    device: str = "auto"
    backend: str = "auto"
    compile: bool = False
    out_dir: str | None = None
    checkpoint_every: int = 0
    resume: str | None = None
    progress: bool = True

    def resolved_block_size(self) -> int:
        """``block_size``, or by default the largest supported size that gives at least 4 blocks per hidden row and
        gives a ``hidden × hidden`` layer enough active blocks that the first topology update moves a fraction ζ0 of
        them (``ζ0 · nnz ≥ 1``; the released rule moves at least one block of any layer with two, however coarse)."""
        if self.block_size is not None:
            return self.block_size
        hidden = MODEL_CONFIGS[self.model].hidden_size
        candidates = [b for b in SUPPORTED_BLOCK_SIZES if hidden % b == 0 and hidden // b >= 4]
        movable = [
            b
            for b in candidates
            if self.prune_fraction * nnz_for_density((hidden // b) ** 2, self.density) >= 1
        ]
        return max(movable or [min(SUPPORTED_BLOCK_SIZES)])

    def resolved_density_lr_exponent(self) -> float:
        """α: ``density_lr_exponent``, or the default of the optimizer's arm (0 where the arm has no density LR)."""
        if self.density_lr_exponent is not None:
            return float(self.density_lr_exponent)
        return SMET_ADAMW_ARMS[self.optimizer][2] if self.optimizer in SMET_ADAMW_ARMS else 0.0

    def validate(self) -> "TrainConfig":
        """Raise :class:`ConfigError` naming the first bad field."""

        def choice(name, options):
            if getattr(self, name) not in options:
                raise ConfigError(f"{name} must be one of {list(options)}, got {getattr(self, name)!r}")

        def integer(name, minimum):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")

        def number(name, low, high, low_open=False, high_open=False):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise ConfigError(f"{name} must be a number, got {value!r}")
            if value < low or value > high or (low_open and value == low) or (high_open and value == high):
                raise ConfigError(
                    f"{name} must be in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}, got {value}"
                )

        choice("model", MODEL_CONFIGS)
        choice("optimizer", OPTIMIZERS)
        choice("distribution", ("uniform", "erk"))
        choice("regrow", ("random", "gradient"))
        choice("warmup_mode", ("linear", "momentum_ramp", "none"))
        choice("precision", PRECISIONS)
        choice("parallel", PARALLEL_MODES)
        choice("backend", backend_module.BACKENDS)
        number("density", 0.0, 1.0, low_open=True)
        number("prune_fraction", 0.0, 1.0, low_open=True, high_open=True)
        choice("warmup_scope", WARMUP_SCOPES)
        if self.density_lr_exponent is not None:
            number("density_lr_exponent", 0.0, math.inf)
            if self.optimizer == "warmup-only" and self.density_lr_exponent != 0:
                raise ConfigError(f"optimizer 'warmup-only' has no density-aware LR (α = 0), got "
                                  f"density_lr_exponent={self.density_lr_exponent}: use --optimizer smet")
        number("galore_scale", 0.0, math.inf, low_open=True)
        number("lr", 0.0, math.inf, low_open=True)
        number("weight_decay", 0.0, math.inf)
        number("eps", 0.0, math.inf)
        number("grad_clip", 0.0, math.inf)
        for name in ("update_interval", "optimizer_warmup_steps", "galore_update_gap", "batch_size", "seq_len",
                     "grad_accum", "max_steps", "log_every", "spike_window", "eval_batches"):
            integer(name, 1)
        for name in ("lr_warmup_steps", "eval_every", "checkpoint_every", "seed"):
            integer(name, 0)
        if self.galore_rank is not None:
            integer("galore_rank", 1)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.lr_warmup_steps >= self.max_steps and self.lr_warmup_steps > 0:
            raise ConfigError(f"lr_warmup_steps ({self.lr_warmup_steps}) must be < max_steps ({self.max_steps})")
        if self.batch_size % self.grad_accum != 0:
            raise ConfigError(f"batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})")
        if self.block_size is not None and self.block_size not in SUPPORTED_BLOCK_SIZES:
            raise ConfigError(f"block_size must be one of {list(SUPPORTED_BLOCK_SIZES)}, got {self.block_size!r}")
        integer("supar_base_width", 1)
        if self.parallel == "fsdp" and self.optimizer == "galore":
            raise ConfigError(
                "parallel 'fsdp' does not support optimizer 'galore': its SVD projection needs each weight's whole "
                "gradient and its moments live in the projected space, not in dim-0 shards (use --parallel ddp)"
            )
        if self.supar and self.optimizer not in SPARSE_OPTIMIZERS:
            raise ConfigError(f"supar needs a sparse optimizer mode {list(SPARSE_OPTIMIZERS)}, got {self.optimizer!r}")
        hidden = MODEL_CONFIGS[self.model].hidden_size
        if self.optimizer in SPARSE_OPTIMIZERS and hidden % self.resolved_block_size() != 0:
            raise ConfigError(f"block_size {self.block_size} does not divide the hidden size {hidden} of {self.model}")
        if self.out_dir is not None and Path(self.out_dir).exists() and not Path(self.out_dir).is_dir():
            raise ConfigError(f"out_dir {self.out_dir!r} exists and is not a folder")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}") from None
        return self

    def to_dict(self) -> dict:
        """All fields, α resolved (a naive-DST run records α = 0)."""
        return dataclasses.asdict(self) | {"density_lr_exponent": self.resolved_density_lr_exponent()}

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config fields {unknown}")
        values = dict(values)
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        return cls(**values)


# ---------------------------------------------------------------------------------------------- helpers
def lr_factor(step: int, warmup_steps: int, max_steps: int) -> float:
    """Multiplier of the base LR at optimizer step ``step`` (1-based): ``step / warmup`` during warm-up, then
    ``0.1 + 0.9 · (1 + cos(π · progress)) / 2`` with progress from 0 (end of warm-up) to 1 (``max_steps``)."""
    if warmup_steps > 0 and step <= warmup_steps:
        return step / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return MIN_LR_RATIO + (1.0 - MIN_LR_RATIO) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    """``(bytes, kind)``: CUDA max allocated, or the process peak RSS (``ru_maxrss``) on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "cpu_peak_rss"


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(value)
            value = value / self.world_size
        return value


def _init_distributed(device_name: str) -> _Dist:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return _Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and not device_name.startswith("cpu")
    initialised_here = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        initialised_here = True
    return _Dist(rank, world_size, local_rank, initialised_here)


def _resolve_device(name: str, ddp: _Dist) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' requested but CUDA is not available")
        device = torch.device("cuda", ddp.local_rank if ddp.enabled else (device.index or 0))
        torch.cuda.set_device(device)
    return device


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint folder for ``path``: a ``step_*`` folder itself, or the latest one in ``path/checkpoints``."""
    path = Path(path)
    if (path / "state.pt").is_file():
        return path
    candidates = sorted((path / "checkpoints").glob("step_*")) if path.is_dir() else []
    candidates = [c for c in candidates if (c / "state.pt").is_file()]
    if not candidates:
        raise ConfigError(f"no checkpoint found in {str(path)!r} (expected state.pt or checkpoints/step_*/)")
    return candidates[-1]


def load_checkpoint_config(path: str | os.PathLike) -> TrainConfig:
    """The :class:`TrainConfig` saved in the checkpoint at ``path`` (with ``resume`` pointing to it)."""
    checkpoint = find_checkpoint(path)
    values = json.loads((checkpoint / "config.json").read_text())
    values["resume"] = str(checkpoint)
    return TrainConfig.from_dict(values)


def _atomic_replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete folder ``tmp`` to ``final`` with a rename; an older ``final`` is removed afterwards."""
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _rng_state(device: torch.device) -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


# ---------------------------------------------------------------------------------------------- setup
def build_model(config: TrainConfig, vocab_size: int, device: torch.device) -> nn.Module:
    """The LLaMA model of ``config`` on ``device``; hidden linears made sparse in the sparse modes."""
    block_size = config.resolved_block_size()
    sparse = config.optimizer in SPARSE_OPTIMIZERS
    shape = model_config(config.model, vocab_size, block_size if sparse else None, max_seq_len=config.seq_len)
    dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
    torch.manual_seed(config.seed)
    model = LlamaModel(shape, device=device, dtype=dtype)
    generator = torch.Generator().manual_seed(config.seed + 1)
    backend = None if config.backend == "auto" else config.backend
    if config.optimizer in SMET_ADAMW_ARMS:
        from ..modules import sparsify

        sparsify(model, config.density, block_size=block_size, distribution=config.distribution,
                 include=HIDDEN_LINEAR_PATTERN, generator=generator, backend=backend)
    elif config.optimizer == "masked-dst":
        from ..masked import masked_sparsify

        masked_sparsify(model, config.density, block_size=block_size, distribution=config.distribution,
                        include=HIDDEN_LINEAR_PATTERN, generator=generator)
    if config.supar:
        from ..supar import supar_init_

        supar_init_(model, base_std=shape.init_std, width=shape.hidden_size, base_width=config.supar_base_width,
                    generator=generator)
    return model


def shard_model(model: LlamaModel, device: torch.device) -> LlamaModel:
    """FSDP2: ``fully_shard`` each decoder layer, then the root (embedding, final norm, head), over all ranks of the
    default process group on ``device``'s type (explicit: FSDP2's default mesh would pick CUDA whenever it exists).
    Every parameter becomes a ``DTensor`` sharded on dim 0; the layouts stay attached to the sharded values."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _reshard(model: nn.Module) -> None:
    """Free the unsharded parameters FSDP2 keeps after a forward without backward (the root's, after eval)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _full_state(value, keep: bool):
    """``value`` (a state-dict tree) with every DTensor gathered to a full CPU tensor (collectives on every rank);
    the result is kept only where ``keep`` (rank 0), other ranks get None."""
    if isinstance(value, dict):
        out = {key: _full_state(item, keep) for key, item in value.items()}
        return out if keep else None
    if isinstance(value, list):
        out = [_full_state(item, keep) for item in value]
        return out if keep else None
    if is_sharded(value):
        gathered = full(value)
        return gathered.cpu() if keep else None
    return value


def _sharded_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> dict:
    """A full (single-process format) optimizer state dict cut into this rank's shards: each state tensor of a
    sharded parameter whose dim 0 is the parameter's (moments, ``block_step``) becomes a DTensor placed like it."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved_ids = [i for group in saved["param_groups"] for i in group["params"]]
    if len(params) != len(saved_ids):
        raise ConfigError(f"checkpoint optimizer has {len(saved_ids)} parameters, this model {len(params)}")
    state = {}
    for saved_id, param in zip(saved_ids, params):
        entry = saved["state"].get(saved_id)
        if entry is None:
            continue
        state[saved_id] = {
            key: shard_like(value, param)
            if is_sharded(param) and isinstance(value, torch.Tensor) and value.dim() >= 1
            and value.shape[0] == param.shape[0] else value
            for key, value in entry.items()
        }
    return {**saved, "state": state}


def build_optimizer(config: TrainConfig, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    common = dict(lr=config.lr, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay)
    params: list | list[dict] = [p for p in model.parameters() if p.requires_grad]
    if config.supar:
        from ..supar import supar_param_groups

        params = supar_param_groups(model, config.lr, width=model.config.hidden_size,
                                    base_width=config.supar_base_width)
    if config.optimizer in ("adamw", "masked-dst"):
        return torch.optim.AdamW(params, fused=device.type == "cuda", **common)
    if config.optimizer == "galore":
        rank = config.galore_rank or GALORE_DEFAULT_RANK[config.model]
        return GaLoreAdamW(
            galore_param_groups(model, rank, config.galore_update_gap, config.galore_scale), **common
        )
    from ..optim.smet_adamw import SMETAdamW

    backend = None if config.backend == "auto" else config.backend
    return SMETAdamW(params, **smet_adamw_options(config), backend=backend, **common)


def smet_adamw_options(config: TrainConfig) -> dict:
    """The :class:`SMETAdamW` options of the config's arm (issue 16): warm-up, bias correction, α, warm-up scope."""
    warmup, bias_correction, _, _ = SMET_ADAMW_ARMS[config.optimizer]
    return dict(
        warmup=config.warmup_mode if warmup == "config" else warmup,
        warmup_steps=config.optimizer_warmup_steps,
        warmup_scope=config.warmup_scope,
        density_lr_exponent=config.resolved_density_lr_exponent(),
        bias_correction=bias_correction,
    )


def build_controller(config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer):
    if config.optimizer not in SPARSE_OPTIMIZERS:
        return None
    return SMET(
        model,
        optimizer,
        update_interval=config.update_interval,
        prune_fraction=config.prune_fraction,
        total_steps=config.max_steps,
        regrow=config.regrow,
        seed=config.seed,
    )


# ---------------------------------------------------------------------------------------------- the run
class _Run:
    """State of one training run (rank-local); :func:`train` drives it."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.ddp = _init_distributed(config.device)
        self.device = _resolve_device(config.device, self.ddp)
        self.is_main = self.ddp.rank == 0
        if config.backend == "triton" and not backend_module.triton_can_run(self.device):
            raise ConfigError(
                f"backend 'triton' cannot run on device {self.device}: use a CUDA device, or set TRITON_INTERPRET=1 "
                "for the (slow) CPU interpreter, or --backend reference"
            )
        try:
            corpus = load_corpus(config.data)
        except DataError as error:
            raise ConfigError(str(error)) from None
        if config.batch_size % (config.grad_accum * self.ddp.world_size) != 0:
            raise ConfigError(
                f"batch_size ({config.batch_size}) must be divisible by grad_accum x world size "
                f"({config.grad_accum} x {self.ddp.world_size})"
            )
        try:
            self.batches = PackedBatches(corpus.train, config.seq_len, config.batch_size, config.seed)
            val_count = config.eval_batches * config.batch_size
            self.val_indices = eval_windows(corpus.val, config.seq_len, val_count) if val_count else None
        except DataError as error:
            raise ConfigError(str(error)) from None
        self.model = build_model(config, corpus.vocab_size, self.device)
        self.fsdp = self.ddp.enabled and config.parallel == "fsdp"
        if self.fsdp:  # before the optimizer and controller: they hold the sharded parameters
            shard_model(self.model, self.device)
        self.optimizer = build_optimizer(config, self.model, self.device)
        self.controller = build_controller(config, self.model, self.optimizer)
        self.val_tokens = corpus.val
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]  # before a resume overwrites them
        self.spikes = SpikeTracker(config.spike_window)
        # --- update probe (issue 16): prune damage / cold start / first-step sizes; plain tensors only (not fsdp)
        self.probe = UpdateProbe(self.model, self.probe_loss, config.spike_window) if (
            config.update_probe and not self.fsdp and self.val_indices is not None) else None
        self.step = 0
        self.tokens_seen = 0
        self.train_time = 0.0
        self.initial_val_loss: float | None = None
        self.out_dir = Path(config.out_dir) if config.out_dir else None
        if config.resume:
            self._load(find_checkpoint(config.resume))
            if self.step >= config.max_steps:  # before anything in out_dir is touched
                raise ConfigError(
                    f"the run in {config.resume!r} already reached step {self.step} (max_steps={config.max_steps}): "
                    "pass a larger --max-steps to continue it"
                )
        self.wrapped = self.model  # fully_shard works in place: the model is its own wrapper under fsdp
        if self.ddp.enabled and not self.fsdp:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.wrapped = nn.parallel.DistributedDataParallel(
                self.model, device_ids=device_ids, broadcast_buffers=False
            )
        if config.compile:  # one graph per model: the block-sparse products are custom ops (torch.ops.smet)
            self.wrapped = torch.compile(self.wrapped, fullgraph=not self.ddp.enabled)
        self.metrics_file = self._open_metrics() if self.is_main and self.out_dir else None

    # ---------------------------------------------------------------- io
    def _open_metrics(self):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / "metrics.jsonl"
        kept = []
        if self.config.resume and path.exists():
            # drop records past the checkpoint (an interrupted run's tail) and the end-of-run measurements of
            # unfinished spike windows: the resumed run measures those updates again, with their full window
            records = [json.loads(line) for line in path.read_text().splitlines() if line]
            kept = [json.dumps(r) for r in records if r["step"] <= self.step and r.get("complete", True)]
        handle = path.open("w")
        handle.writelines(line + "\n" for line in kept)
        handle.flush()
        return handle

    def log(self, record: dict) -> None:
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()

    def save_checkpoint(self) -> Path | None:
        if not self.out_dir:
            return None
        model_state, optimizer_state = None, None
        if self.fsdp:  # gather the shards (every rank takes part); rank 0 keeps full CPU tensors
            model_state = _full_state(self.model.state_dict(), self.is_main)
            optimizer_state = _full_state(self.optimizer.state_dict(), self.is_main)
        if not self.is_main:
            return None
        root = self.out_dir / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step_{self.step:07d}"
        tmp = root / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        state = {
            "step": self.step,
            "model": model_state if self.fsdp else self.model.state_dict(),
            "optimizer": optimizer_state if self.fsdp else self.optimizer.state_dict(),
            "controller": self.controller.state_dict() if self.controller is not None else None,
            "data": self.batches.state_dict(),
            "rng": _rng_state(self.device),
            "spikes": self.spikes.state_dict(),
            "probe": self.probe.state_dict() if self.probe is not None else None,  # update probe (issue 16)
            "progress": {"tokens_seen": self.tokens_seen, "train_time": self.train_time,
                         "initial_val_loss": self.initial_val_loss},
        }
        torch.save(state, tmp / "state.pt")
        (tmp / "config.json").write_text(json.dumps(self.config.to_dict(), indent=1))
        for name in ("state.pt", "config.json"):  # on disk before the rename makes the checkpoint visible
            with open(tmp / name, "rb+") as handle:
                os.fsync(handle.fileno())
        _atomic_replace_dir(tmp, final)
        return final

    def _load(self, checkpoint: Path) -> None:
        saved = json.loads((checkpoint / "config.json").read_text())
        changed = [name for name in FIXED_ON_RESUME if saved.get(name) != getattr(self.config, name)]
        if changed:
            raise ConfigError(
                f"cannot change {', '.join(changed)} when resuming {str(checkpoint)!r} (saved: "
                + ", ".join(f"{name}={saved.get(name)!r}" for name in changed)
                + "): the model, its topology and the data position depend on them"
            )
        # read to CPU: RNG states must stay CPU ByteTensors; the load_state_dict calls move the rest to the device
        state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=False)
        if self.fsdp:  # full tensors (the single-process format) -> this rank's shards
            current = self.model.state_dict()
            state["model"] = {key: shard_like(value, current[key]) if key in current else value
                              for key, value in state["model"].items()}
            state["optimizer"] = _sharded_optimizer_state(self.optimizer, state["optimizer"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.controller is not None:
            self.controller.load_state_dict(state["controller"])
        self.batches.load_state_dict(state["data"])
        _set_rng_state(state["rng"], self.device)
        self.spikes.load_state_dict(state["spikes"])
        if self.probe is not None and state.get("probe") is not None:  # update probe (issue 16)
            self.probe.load_state_dict(state["probe"])
        self.step = int(state["step"])
        self.tokens_seen = int(state["progress"]["tokens_seen"])
        self.train_time = float(state["progress"]["train_time"])
        self.initial_val_loss = state["progress"]["initial_val_loss"]

    # ---------------------------------------------------------------- compute
    def _autocast(self):
        if self.config.precision == "bf16-autocast":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over the fixed validation windows (sharded over ranks, in the training micro-batch
        size so that evaluation fits wherever training does)."""
        self.model.eval()
        config = self.config
        micro = config.batch_size // (self.ddp.world_size * config.grad_accum)
        shards = self.val_indices.view(-1, self.ddp.world_size, micro)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch in shards[:, self.ddp.rank]:
            x, y = window_batch(self.val_tokens, batch, config.seq_len)
            with self._autocast():
                logits = self.model(x.to(self.device))
            total += lm_loss(logits, y.to(self.device)).double()
        self.model.train()
        if self.fsdp:
            _reshard(self.model)
        return float(self.ddp.mean(total / shards.shape[0]))

    @torch.no_grad()
    def probe_loss(self) -> float:
        """Loss of one fixed held-out micro-batch (the first validation windows), for the update probe."""
        micro = self.config.batch_size // (self.ddp.world_size * self.config.grad_accum)
        x, y = window_batch(self.val_tokens, self.val_indices[:micro], self.config.seq_len)
        self.model.eval()
        with self._autocast():
            loss = lm_loss(self.model(x.to(self.device)), y.to(self.device))
        self.model.train()
        return float(loss)

    def is_probe_step(self, step: int) -> bool:
        """Update steps of the controller; for a dense run the steps it would update at (the control)."""
        if self.controller is not None:
            return self.controller.is_update_step(step)
        return step % self.config.update_interval == 0

    def train_step(self) -> tuple[float, float | None]:
        """One optimizer step; returns (mean training loss over the global batch, grad norm or None)."""
        config = self.config
        indices = self.batches.next_global()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for micro in range(config.grad_accum):
            shard = PackedBatches.shard(indices, micro, config.grad_accum, self.ddp.rank, self.ddp.world_size)
            x, y = self.batches.batch(shard)
            last = micro == config.grad_accum - 1
            # DDP: all-reduce on the last micro-step only; FSDP2 reduce-scatters every micro-step (sharded grads)
            sync = contextlib.nullcontext() if (last or not self.ddp.enabled or self.fsdp) else self.wrapped.no_sync()
            with sync:
                with self._autocast():
                    logits = self.wrapped(x.to(self.device, non_blocking=True))
                loss = lm_loss(logits, y.to(self.device, non_blocking=True))
                (loss / config.grad_accum).backward()
            loss_sum += loss.detach().double()
        grad_norm = None
        if config.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
            grad_norm = float(full(norm))  # a replicated DTensor under fsdp
        factor = lr_factor(self.step + 1, config.lr_warmup_steps, config.max_steps)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * factor
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return float(self.ddp.mean(loss_sum / config.grad_accum)), grad_norm

    def params_checksum(self) -> torch.Tensor:
        """Sum and sum of squares of every parameter and layout index (fp64), to compare ranks. Under fsdp the
        parameters are gathered first (one copy of the values: the comparison checks the replicated layouts and
        that every rank gathers the same model)."""
        parts = []
        for p in self.model.parameters():
            data = full(p.detach()).double()
            parts += [data.sum(), (data * data).sum()]
            layout = getattr(p, "smet_layout", None) or getattr(p, "smet_mask_layout", None)
            if layout is not None:
                slots = torch.arange(1, layout.nnz + 1, dtype=torch.float64, device=layout.device)
                parts.append((layout.block_indices.double() * slots[:, None]).sum().to(data.device))
        return torch.stack(parts)

    def ranks_in_sync(self) -> bool:
        if not self.ddp.enabled:
            return True
        local = self.params_checksum().cpu() if self.device.type == "cpu" else self.params_checksum()
        gathered = [torch.empty_like(local) for _ in range(self.ddp.world_size)]
        dist.all_gather(gathered, local)
        return all(torch.equal(gathered[0], other) for other in gathered[1:])


def train(config: TrainConfig) -> dict:
    """Train per ``config``; returns the summary (also written to ``out_dir/summary.json`` on rank 0)."""
    config.validate()
    previous_backend = backend_module.get_backend()
    backend_module.set_backend(config.backend)
    run = None
    try:
        run = _Run(config)
        return _train_loop(run)
    finally:
        backend_module.set_backend(previous_backend)
        if run is not None and run.metrics_file is not None:
            run.metrics_file.close()
        if run is not None and run.ddp.initialised_here:
            # Free the DDP wrapper while the process group is still alive: if its Reducer held the group's last
            # reference, the group would be destroyed from C++ with the GIL held, joining a gloo worker thread
            # that may need the GIL to free a finished collective's tensors -- an intermittent deadlock at exit.
            run.wrapped = None
            gc.collect()
            dist.destroy_process_group()


def _perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))  # exp overflows a float past ~709


def _train_loop(run: _Run) -> dict:
    config = run.config
    tokens_per_step = config.batch_size * config.seq_len
    last_val_loss = None
    if run.val_indices is not None and config.eval_every > 0 and run.step == 0:
        run.initial_val_loss = last_val_loss = run.evaluate()
        run.log({"type": "eval", "step": 0, "val_loss": last_val_loss, "val_ppl": _perplexity(last_val_loss)})
    bar = tqdm(total=config.max_steps, initial=run.step, disable=not (config.progress and run.is_main),
               desc="smet-train", dynamic_ncols=True)
    window_tokens, window_time, last_loss = 0, 0.0, float("nan")
    step_times: list[float] = []  # this process's step times, for the steady-state throughput
    while run.step < config.max_steps:
        run._synchronize()
        started = time.perf_counter()
        loss, grad_norm = run.train_step()
        probe_records, probe_time = [], 0.0  # --- update probe (issue 16), its time left out of the step time
        if run.probe is not None:
            probe_started = time.perf_counter()
            probe_records += run.probe.after_step()
            if run.is_probe_step(run.step):
                run.probe.before_update()
            probe_time += time.perf_counter() - probe_started
        update = run.controller.step() if run.controller is not None else None
        if run.probe is not None and run.is_probe_step(run.step):
            probe_started = time.perf_counter()
            probe_records += run.probe.after_update(run.step)
            probe_time += time.perf_counter() - probe_started
        run._synchronize()
        elapsed = time.perf_counter() - started - probe_time
        step = run.step
        run.train_time += elapsed
        step_times.append(elapsed)
        run.tokens_seen += tokens_per_step
        window_tokens += tokens_per_step
        window_time += elapsed
        last_loss = loss
        spikes = run.spikes.add_loss(step, loss)
        if update is not None:
            run.spikes.add_update(step)
        final = step == config.max_steps
        val_loss = None
        if run.val_indices is not None and config.eval_every > 0 and (step % config.eval_every == 0 or final):
            val_loss = last_val_loss = run.evaluate()
        if step % config.log_every == 0 or final:
            record = {
                "type": "train",
                "step": step,
                "loss": loss,
                "lr": run.optimizer.param_groups[0]["lr"],
                "tokens_per_s": window_tokens / window_time if window_time > 0 else None,
                "peak_mem_bytes": peak_memory_bytes(run.device)[0],
                "tokens": run.tokens_seen,
                "grad_norm": grad_norm,
            }
            window_tokens, window_time = 0, 0.0
            if val_loss is not None:
                record.update(val_loss=val_loss, val_ppl=_perplexity(val_loss))
            run.log(record)
        elif val_loss is not None:
            run.log({"type": "eval", "step": step, "val_loss": val_loss, "val_ppl": _perplexity(val_loss)})
        if update is not None:
            layers = update.get("layers", {})
            run.log({
                "type": "topology_update",
                **{k: v for k, v in update.items() if k != "layers"},
                "pruned": sum(layer["pruned"] for layer in layers.values()),
                "regrown": sum(layer["regrown"] for layer in layers.values()),
                "layers": layers,
            })
        for spike in spikes:
            run.log({"type": "loss_spike", **spike, "step": step})
        for record in probe_records:
            run.log({**record, "step": step})
        if config.checkpoint_every and (step % config.checkpoint_every == 0 or final):
            run.save_checkpoint()
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
    bar.close()
    for spike in run.spikes.finish():
        run.log({"type": "loss_spike", **spike, "step": run.step})
    for record in run.probe.finish() if run.probe is not None else []:
        run.log({**record, "step": run.step})
    peak, peak_kind = peak_memory_bytes(run.device)
    summary = {
        "steps": run.step,
        "final_train_loss": last_loss,
        "initial_val_loss": run.initial_val_loss,
        "final_val_loss": last_val_loss,
        "final_val_ppl": _perplexity(last_val_loss) if last_val_loss is not None else None,
        "tokens": run.tokens_seen,
        "train_time_s": run.train_time,
        "tokens_per_s": run.tokens_seen / run.train_time if run.train_time > 0 else None,
        "steady_tokens_per_s": tokens_per_step / statistics.median(step_times[1:]) if len(step_times) > 1 else None,
        "peak_mem_bytes": peak,
        "peak_mem_kind": peak_kind,
        "num_parameters": sum(p.numel() for p in run.model.parameters()),
        "topology_updates": len(run.controller.history) if run.controller is not None else 0,
        "loss_spikes": run.spikes.summary(),
        "world_size": run.ddp.world_size,
        "rank": run.ddp.rank,
        "ranks_in_sync": run.ranks_in_sync(),
        "device": str(run.device),
        "block_size": config.resolved_block_size() if config.optimizer in SPARSE_OPTIMIZERS else None,
        "config": config.to_dict(),
    }
    if run.is_main and run.out_dir:
        (run.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
