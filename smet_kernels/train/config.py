"""Training configuration: :class:`TrainConfig` (every setting of a run, saved in each checkpoint), its validation
and the option vocabularies (optimizer modes from :mod:`.methods`, parallel modes, precisions)."""

from __future__ import annotations

import dataclasses
import math
import os
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import backend as backend_module
from ..distribution import DISTRIBUTIONS
from ..layout import SUPPORTED_BLOCK_SIZES, nnz_for_density
from ..ops.variant import default_variant
from ..reference.adamw import WARMUP_MODES
from ..topology import REGROW_INITS, REGROW_MODES
from .methods import METHODS, SPARSE_TRAINER_NAMES, TRAINER_NAMES
from .model import MODEL_CONFIGS
from .tokenizer import TokenizerError, parse_tokenizer

OPTIMIZERS = TRAINER_NAMES  # the method registry's names (smet_kernels.train.methods)
PARALLEL_MODES = ("ddp", "fsdp")
SPARSE_OPTIMIZERS = SPARSE_TRAINER_NAMES
WARMUP_SCOPES = ("all", "regrown")
# settings a resumed run must share with its checkpoint (model shape and topology, data order and position, GaLore's
# projected moments, SuPar's parameter groups); ``data`` may change where the checkpoint saves the digest of its tokens
FIXED_ON_RESUME = ("model", "optimizer", "density", "block_size", "distribution", "data", "tokenizer", "seq_len",
                   "batch_size", "seed", "spike_window", "galore_rank", "supar")
PRECISIONS = ("fp32", "bf16-autocast", "bf16")
NONFINITE_ACTIONS = ("stop", "skip")
CHECKPOINT_FORMATS = ("sharded", "full")
#: the largest seed: seeds are combined with stream and epoch numbers into torch's 64-bit generator seeds
MAX_SEED = 2**32 - 1


class ConfigError(ValueError):
    """A bad training configuration or unusable data (the CLI prints it as a one-line error)."""


_OPTION_NAMES: ContextVar[dict[str, str]] = ContextVar("option_names", default={})


def interval(low: float, high: float, low_open: bool = False, high_open: bool = False) -> str:
    """``[low, high]`` with ``(`` / ``)`` at an open end; an infinite end is always open (``inf`` is refused)."""
    low_open, high_open = low_open or math.isinf(low), high_open or math.isinf(high)
    return f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def setting(field: str) -> str:
    """How an error message names the configuration field ``field``: as itself for Python callers, by the
    command-line option that sets it inside :func:`naming_options` (``--batch-size`` for ``batch_size``)."""
    return _OPTION_NAMES.get().get(field, field)


@contextmanager
def naming_options(options: dict[str, str]):
    """Within it, :func:`setting` names each field of ``options`` (field -> option) by its option: a command line
    wraps its run in it, so that every error names what the user typed."""
    token = _OPTION_NAMES.set(options)
    try:
        yield
    finally:
        _OPTION_NAMES.reset(token)


def check_output_folder(path, name: str = "out_dir") -> None:
    """Raise :class:`ConfigError` (one line, naming ``name``) when ``path`` cannot be a folder to write into: it, or
    the nearest of its parents that exists, is not a folder (creating it would fail with a raw ``OSError``)."""
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        problem = "exists and is" if existing == path else f"cannot be created: {str(existing)!r} is"
        raise ConfigError(f"{name} {str(path)!r} {problem} not a folder")


def last_update_step(update_end_step: int | None, steps: int) -> int:
    """``T_end`` of a run of ``steps`` steps: the last step a topology update may run at (``update_end_step``, None:
    the run's last, and never past it)."""
    return min(update_end_step or steps, steps)


def check_choices(name: str, given, allowed) -> None:
    """Raise :class:`ConfigError` (one line, naming ``name``) listing the values of ``given`` not in ``allowed``:
    ``--configs must be from tiny,20m,... got tiyn`` (the choices in ``allowed``'s order)."""
    allowed = tuple(allowed)  # compared by ==, so an unhashable value is named too, not a TypeError
    if bad := [str(value) for value in given or () if value not in allowed]:
        raise ConfigError(f"{name} must be from {','.join(map(str, allowed))}, got {','.join(bad)}")


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
    min_prune_fraction: float = 0.005
    update_end_step: int | None = None  # None: max_steps (the whole run)
    regrow: str = "random"
    regrow_init: str = "zeros"
    regrow_init_std: float = 0.02
    warmup_mode: str = "linear"
    optimizer_warmup_steps: int = 100
    density_lr_exponent: float | None = None  # None: the arm's default (the method's arm); to_dict records it
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
    activation_checkpointing: bool = False
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
    tokenizer: str = "byte"
    device: str = "auto"
    backend: str = "auto"
    compile: bool = False
    out_dir: str | None = None
    checkpoint_every: int = 0
    checkpoint_format: str = "sharded"
    resume: str | None = None
    progress: bool = True
    on_nonfinite: str = "stop"
    max_consecutive_skips: int = 5

    def __post_init__(self):
        # a pathlib.Path, as Python callers give one: kept, it crashed the first checkpoint's config.json write (not
        # JSON), after the steps before it had run, and load_corpus refused it as data
        for name in ("data", "out_dir", "resume"):
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))

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
        """α: ``density_lr_exponent``, or the default of the optimizer's arm; 0 for a method without SMETAdamW (what
        it trains with, whatever was given)."""
        arm = METHODS[self.optimizer].arm if self.optimizer in METHODS else None
        if arm is None:
            return 0.0
        return float(self.density_lr_exponent) if self.density_lr_exponent is not None else arm.default_alpha

    def validate(self) -> "TrainConfig":
        """Raise :class:`ConfigError` naming the first bad field."""

        def choice(name, options):  # a str first: an unhashable value (a list) raised TypeError in a dict's `in`
            if not isinstance(getattr(self, name), str) or getattr(self, name) not in options:
                raise ConfigError(f"{setting(name)} must be one of {list(options)}, got {getattr(self, name)!r}")

        def integer(name, minimum):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"{setting(name)} must be an int >= {minimum}, got {value!r}")

        def number(name, low, high, low_open=False, high_open=False):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{setting(name)} must be a finite number, got {value!r}")
            if value < low or value > high or (low_open and value == low) or (high_open and value == high):
                raise ConfigError(f"{setting(name)} must be in {interval(low, high, low_open, high_open)}, got {value}")

        choice("model", MODEL_CONFIGS)
        choice("optimizer", OPTIMIZERS)
        choice("distribution", DISTRIBUTIONS)
        choice("regrow", REGROW_MODES)
        choice("regrow_init", REGROW_INITS)
        choice("warmup_mode", WARMUP_MODES)
        choice("precision", PRECISIONS)
        choice("parallel", PARALLEL_MODES)
        choice("on_nonfinite", NONFINITE_ACTIONS)
        choice("checkpoint_format", CHECKPOINT_FORMATS)
        try:
            parse_tokenizer(self.tokenizer, setting("tokenizer"))
        except TokenizerError as error:
            raise ConfigError(str(error)) from None
        choice("backend", backend_module.BACKENDS)
        try:  # the SMET_BACKEND and SMET_MATMUL_VARIANT environment variables the ops read
            backend_module.get_backend()
            default_variant()
        except ValueError as error:
            raise ConfigError(str(error)) from None
        number("density", 0.0, 1.0, low_open=True)
        number("prune_fraction", 0.0, 1.0, low_open=True, high_open=True)
        number("min_prune_fraction", 0.0, 1.0)
        if self.min_prune_fraction > self.prune_fraction:
            raise ConfigError(f"{setting('min_prune_fraction')} ({self.min_prune_fraction}) must be <= "
                              f"{setting('prune_fraction')} ({self.prune_fraction}): the decay would end above its "
                              "start "
                              f"(lower {setting('min_prune_fraction')} or raise {setting('prune_fraction')})")
        number("regrow_init_std", 0.0, math.inf, low_open=True)
        choice("warmup_scope", WARMUP_SCOPES)
        if self.density_lr_exponent is not None:
            number("density_lr_exponent", 0.0, math.inf)
            arm = METHODS[self.optimizer].arm
            if arm and not arm.alpha_settable and self.density_lr_exponent != arm.default_alpha:
                raise ConfigError(f"{setting('optimizer')} {self.optimizer!r} has no density-aware LR (α = "
                                  f"{arm.default_alpha:g}), got {setting('density_lr_exponent')} "
                                  f"{self.density_lr_exponent}: use {setting('optimizer')} 'smet'")
        if self.optimizer == "warmup-only" and self.warmup_mode == "none":  # the arm is its warm-up (SPEC §2)
            raise ConfigError(f"{setting('optimizer')} 'warmup-only' needs a warm-up, got {setting('warmup_mode')} "
                              f"'none': use {setting('optimizer')} 'naive-dst'")
        number("galore_scale", 0.0, math.inf, low_open=True)
        number("lr", 0.0, math.inf, low_open=True)
        number("weight_decay", 0.0, math.inf)
        number("eps", 0.0, math.inf, low_open=True)  # eps = 0 steps a gradient element that stays 0 by 0 / 0
        number("grad_clip", 0.0, math.inf)
        for name in ("update_interval", "optimizer_warmup_steps", "galore_update_gap", "batch_size", "seq_len",
                     "grad_accum", "max_steps", "log_every", "spike_window", "eval_batches",
                     "max_consecutive_skips"):
            integer(name, 1)
        for name in ("lr_warmup_steps", "eval_every", "checkpoint_every", "seed"):
            integer(name, 0)
        if self.seed > MAX_SEED:
            raise ConfigError(f"{setting('seed')} must be <= {MAX_SEED}, got {self.seed}")
        if self.galore_rank is not None:
            integer("galore_rank", 1)
        if self.update_end_step is not None:
            integer("update_end_step", 1)
        if (not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0
                           for b in self.betas)):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.lr / (1.0 - self.betas[0]) > torch.finfo(torch.float32).max:  # Adam's first step size, in fp32
            raise ConfigError(f"{setting('lr')} {self.lr:g} overflows float32 in the first step's size "
                              "lr / (1 - beta1)")
        if self.lr_warmup_steps >= self.max_steps and self.lr_warmup_steps > 0:
            raise ConfigError(f"{setting('lr_warmup_steps')} ({self.lr_warmup_steps}) must be < {setting('max_steps')} "
                              f"({self.max_steps})")
        if self.batch_size % self.grad_accum != 0:
            raise ConfigError(f"{setting('batch_size')} ({self.batch_size}) must be divisible by "
                              f"{setting('grad_accum')} ({self.grad_accum})")
        if self.block_size is not None and (isinstance(self.block_size, bool) or not isinstance(self.block_size, int)
                                            or self.block_size not in SUPPORTED_BLOCK_SIZES):
            raise ConfigError(f"{setting('block_size')} must be one of {list(SUPPORTED_BLOCK_SIZES)}, got "
                              f"{self.block_size!r}")
        integer("supar_base_width", 1)
        if self.parallel == "fsdp" and self.optimizer == "galore":
            raise ConfigError(
                f"{setting('parallel')} 'fsdp' does not support {setting('optimizer')} 'galore': its SVD projection "
                "needs each weight's whole gradient and its moments live in the projected space, not in dim-0 shards "
                f"(use {setting('parallel')} 'ddp')"
            )
        if self.supar and self.optimizer not in SPARSE_OPTIMIZERS:
            raise ConfigError(f"{setting('supar')} needs a sparse {setting('optimizer')} mode "
                              f"{list(SPARSE_OPTIMIZERS)}, got {self.optimizer!r}")
        hidden = MODEL_CONFIGS[self.model].hidden_size
        if self.optimizer in SPARSE_OPTIMIZERS and hidden % self.resolved_block_size() != 0:
            raise ConfigError(f"{setting('block_size')} {self.resolved_block_size()} does not divide the hidden size "
                              f"{hidden} of {setting('model')} {self.model!r}")
        for name in ("supar", "activation_checkpointing", "update_probe", "compile", "progress"):
            if not isinstance(getattr(self, name), bool):  # a truthy "false" or "no" (a hand-edited dict) turned it on
                raise ConfigError(f"{setting(name)} must be True or False, got {getattr(self, name)!r}")
        for name in ("data", "device"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{setting(name)} must be a string, got {getattr(self, name)!r}")
        for name in ("out_dir", "resume"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), (str, os.PathLike)):
                raise ConfigError(f"{setting(name)} must be a path or None, got {getattr(self, name)!r}")
        if self.checkpoint_every and self.out_dir is None:  # the run wrote no checkpoint and said nothing
            raise ConfigError(f"{setting('checkpoint_every')} {self.checkpoint_every} needs {setting('out_dir')}: "
                              "a run without one writes no checkpoint")
        if self.out_dir is not None:
            check_output_folder(self.out_dir, setting("out_dir"))
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ConfigError(f"{setting('device')} must be 'auto', 'cpu', 'cuda' or 'cuda:N', got "
                                  f"{self.device!r}") from None
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
        if isinstance(values.get("betas"), list):  # JSON's list; anything else is left to validate's one-line refusal
            values["betas"] = tuple(values["betas"])
        return cls(**values)
