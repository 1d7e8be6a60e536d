"""The study's grid: methods (:data:`METHODS`), the shared settings (:class:`StudySpec`, :data:`PRESETS`) and one
run's identity and training configuration (:class:`RunSpec`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from smet_kernels.train.config import MAX_SEED, TrainConfig, check_choices, last_update_step, setting
from smet_kernels.train.methods import METHODS as TRAINER_METHODS


class Method(NamedTuple):
    """A method of the study: the trainer's method (:data:`smet_kernels.train.methods.METHODS`), the SMETAdamW
    warm-up mode (None: the trainer default) and which α it runs: None (α does not apply), a fixed value, or
    ``"sweep"`` / ``"sweep>0"`` (every α of the spec / every α > 0: at α = 0 the arm is another one)."""

    optimizer: str
    warmup_mode: str | None
    alphas: str | float | None

    @property
    def sparse(self) -> bool:
        """Whether its hidden linears are sparse (the registry's word)."""
        return TRAINER_METHODS[self.optimizer].sparse


METHODS = {
    "adamw": Method("adamw", None, None),
    "galore": Method("galore", None, None),
    "masked-dst": Method("masked-dst", None, None),
    "naive-dst": Method("naive-dst", None, 0.0),  # the paper's: no warm-up, no density LR
    "warmup-only": Method("warmup-only", "linear", 0.0),
    "density-lr-only": Method("density-lr-only", None, "sweep>0"),  # at α = 0 it is naive-dst
    "smet-linear": Method("smet", "linear", "sweep"),  # at α = 0 it is warmup-only (a consistency check)
    "smet-momentum_ramp": Method("smet", "momentum_ramp", "sweep"),
}
ABLATION_ARMS = ("warmup-only", "density-lr-only", "smet-linear", "smet-momentum_ramp")  # each against naive-dst
METHOD_ORDER = tuple(METHODS)
DENSE_METHOD = "adamw"
RUNS_DIR = "runs"
COMMANDS_FILE = "commands.txt"
REPORT_FILE = "stability.md"
# the StudySpec fields every run takes unchanged as the TrainConfig field (and smet-train option) of the same name
TRAINER_SETTINGS = ("prune_fraction", "min_prune_fraction", "update_end_step", "regrow", "regrow_init",
                    "regrow_init_std", "distribution", "warmup_scope")


@dataclass
class StudySpec:
    """The grid and the shared training settings of a stability study (token budget = steps × batch × seq)."""

    configs: tuple[str, ...] = ("20m", "60m")
    methods: tuple[str, ...] = METHOD_ORDER
    densities: tuple[float, ...] = (0.5, 0.25, 0.1)
    alphas: tuple[float, ...] = (0.0, 0.5, 1.0)
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 4000
    batch_size: int = 64
    seq_len: int = 256
    # b per config: small enough that floor(ζ·nnz) >= 1 at density 0.1 in every layer (with b = 64 the 20m
    # attention layers hold 2 blocks at d = 0.1 and no update would move any)
    block_sizes: dict[str, int] = field(default_factory=lambda: {"tiny": 16, "20m": 16, "60m": 32})
    update_interval: int = 100
    # the topology and warm-up settings below are the trainer's own defaults (smet-train's options of the same name)
    prune_fraction: float = TrainConfig.prune_fraction
    min_prune_fraction: float = TrainConfig.min_prune_fraction
    update_end_step: int | None = TrainConfig.update_end_step  # None: the run's last step
    regrow: str = TrainConfig.regrow
    regrow_init: str = TrainConfig.regrow_init
    regrow_init_std: float = TrainConfig.regrow_init_std
    distribution: str = TrainConfig.distribution
    warmup_scope: str = TrainConfig.warmup_scope
    spike_window: int = 10
    optimizer_warmup_steps: int = 100
    lr: float = 1e-3
    lr_warmup_steps: int = 200
    precision: str = "fp32"  # no bf16 rounding of the small first updates of regrown weights: one confounder less
    eval_every: int = 200
    eval_batches: int = 16
    data: str = "stdlib"
    backend: str = "auto"
    device: str = "auto"
    checkpoint_every: int = 1000

    @property
    def tokens_per_run(self) -> int:
        return self.steps * self.batch_size * self.seq_len

    def validate(self) -> "StudySpec":
        from smet_kernels.layout import SUPPORTED_BLOCK_SIZES
        from smet_kernels.train.model import MODEL_CONFIGS

        def fail(message: str):
            raise ValueError(message)

        for name, values in (("configs", self.configs), ("methods", self.methods), ("densities", self.densities),
                             ("alphas", self.alphas), ("seeds", self.seeds)):
            if not values:
                fail(f"{setting(name)} must not be empty")
            if len(set(values)) != len(values):
                fail(f"{setting(name)} has duplicates: {list(values)}")
        check_choices(setting("configs"), self.configs, MODEL_CONFIGS)
        check_choices(setting("methods"), self.methods, METHODS)
        if bad := [d for d in self.densities if not (isinstance(d, (int, float)) and 0.0 < d < 1.0)]:
            fail(f"{setting('densities')} must lie in (0, 1), got {bad}")
        if bad := [a for a in self.alphas if not (isinstance(a, (int, float)) and 0.0 <= a < math.inf)]:
            fail(f"{setting('alphas')} must be finite and >= 0, got {bad}")
        for name, values in (("densities", self.densities), ("alphas", self.alphas)):
            if len({f"{v:g}" for v in values}) != len(values):  # the run folders' d<density> / a<α>
                fail(f"{setting(name)} {list(values)} name the same run folder twice (6 significant digits): give "
                     "values that differ within them")
        if bad := [m for m in self.methods if not method_alphas(m, self.alphas)]:
            fail(f"{setting('methods')} {','.join(bad)} runs each α > 0 and {setting('alphas')} {list(self.alphas)} "
                 "has none: it would run nothing")
        if bad := [s for s in self.seeds if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED]:
            fail(f"{setting('seeds')} must be ints in [0, {MAX_SEED}], got {bad}")
        for config in self.configs:
            block = self.block_sizes.get(config)
            if block is not None and block not in SUPPORTED_BLOCK_SIZES:
                fail(f"block_sizes[{config!r}] must be one of {list(SUPPORTED_BLOCK_SIZES)}, got {block}")
        if self.lr_warmup_steps >= self.steps and self.lr_warmup_steps > 0:
            fail(f"{setting('lr_warmup_steps')} ({self.lr_warmup_steps}) must be < {setting('steps')} ({self.steps})")
        last = last_update_step(self.update_end_step, self.steps)
        if self.update_interval > last and any(METHODS[m].sparse for m in self.methods):
            limit = setting("steps") if last == self.steps else setting("update_end_step")
            fail(f"{setting('update_interval')} ({self.update_interval}) is past {limit} ({last}): the sparse runs "
                 "would make no topology update, and the study measures what follows updates")
        if DENSE_METHOD not in self.methods:
            fail(f"{setting('methods')} must include {DENSE_METHOD!r}: it is the reference (noise floor, quality) of "
                 "the study")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS = {
    # H100 study: 4000 steps x 64 x 256 = 65.5M tokens per run (the study asks >= ~50M tokens for 20m).
    "h100": StudySpec(),
    # CPU pilot: proves the tooling end to end in ~15 min on 2 cores; not evidence for or against the claims.
    "pilot": StudySpec(
        configs=("tiny",), densities=(0.5, 0.1), alphas=(0.0, 1.0), seeds=(0, 1), steps=200, batch_size=8,
        seq_len=64, update_interval=20, spike_window=8, optimizer_warmup_steps=20, lr=2e-3, lr_warmup_steps=10,
        precision="fp32", eval_every=20, eval_batches=4, backend="reference", device="cpu", checkpoint_every=0,
    ),
    # CPU study: the key arms on the tiny model, long enough for a cold start (see reports/stability-cpu).
    "cpu": StudySpec(
        configs=("tiny",), methods=("adamw", "naive-dst", "warmup-only", "density-lr-only", "smet-linear"),
        densities=(0.5, 0.25, 0.1), alphas=(1.0,), seeds=(0, 1, 2), steps=3000, batch_size=8, seq_len=64,
        update_interval=100, spike_window=10, optimizer_warmup_steps=100, lr=2e-3, lr_warmup_steps=100,
        precision="fp32", eval_every=250, eval_batches=4, backend="reference", device="cpu", checkpoint_every=500,
    ),
}


@dataclass(frozen=True)
class RunSpec:
    """One run of the sweep; ``density`` is None for dense methods, ``alpha`` None where α does not apply."""

    config: str
    method: str
    density: float | None
    alpha: float | None
    seed: int

    @property
    def name(self) -> str:
        parts = [self.method]
        if self.density is not None:
            parts.append(f"d{self.density:g}")
        if self.alpha is not None:
            parts.append(f"a{self.alpha:g}")
        parts.append(f"s{self.seed}")
        return "-".join(parts)

    def directory(self, out_dir: Path) -> Path:
        return Path(out_dir) / RUNS_DIR / self.config / self.name

    def train_config(self, spec: StudySpec, out_dir: Path):
        """The :class:`TrainConfig` of this run: shared settings from ``spec``, method settings from the run."""
        optimizer, warmup_mode, _ = METHODS[self.method]
        sparse = METHODS[self.method].sparse
        return TrainConfig(
            model=self.config,
            optimizer=optimizer,
            density=self.density if sparse else 1.0,
            block_size=spec.block_sizes.get(self.config) if sparse else None,
            update_interval=spec.update_interval,
            **{name: getattr(spec, name) for name in TRAINER_SETTINGS},
            warmup_mode=warmup_mode or "linear",
            optimizer_warmup_steps=spec.optimizer_warmup_steps,
            density_lr_exponent=self.alpha if self.alpha is not None else 0.0,
            lr=spec.lr,
            lr_warmup_steps=spec.lr_warmup_steps,
            precision=spec.precision,
            batch_size=spec.batch_size,
            seq_len=spec.seq_len,
            max_steps=spec.steps,
            seed=self.seed,
            eval_every=spec.eval_every,
            eval_batches=spec.eval_batches,
            log_every=1,
            spike_window=spec.spike_window,
            data=spec.data,
            device=spec.device,
            backend=spec.backend,
            out_dir=str(self.directory(out_dir)),
            checkpoint_every=spec.checkpoint_every,
            progress=False,
        )


def method_alphas(method: str, alphas) -> tuple:
    """The α values ``method`` runs for the spec's ``alphas`` (``(None,)`` where α does not apply)."""
    rule = METHODS[method].alphas
    if rule is None:
        return (None,)
    if rule == "sweep":
        return tuple(alphas)
    if rule == "sweep>0":
        return tuple(a for a in alphas if a > 0)
    return (rule,)


def enumerate_runs(spec: StudySpec) -> list[RunSpec]:
    """All runs of ``spec``: per config and seed, dense methods once, masked-DST per density, the SMETAdamW
    methods per density × α (config-major, then seed, so a partial sweep holds complete comparisons)."""
    runs = []
    for config in spec.configs:
        for seed in spec.seeds:
            for method in spec.methods:
                densities = spec.densities if METHODS[method].sparse else (None,)
                alphas = method_alphas(method, spec.alphas)
                runs += [RunSpec(config, method, float(d) if d is not None else None,
                                 float(a) if a is not None else None, seed) for d in densities for a in alphas]
    return runs
