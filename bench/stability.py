"""Stability study: loss spikes after topology updates (naive DST vs SMET), quality against dense and
GaLore at equal tokens, and a density × density-LR-exponent (α) sweep.

    smet-bench stability run                                        # H100 study -> reports/stability/
    smet-bench stability run --quick --out-dir reports/cpu-pilot-stability   # CPU pilot (tiny config)
    smet-bench stability report --out-dir reports/stability         # stability.md + PNG plots

(``python -m bench.stability run|report ...`` is the same without the console entry point.)

**Sweep.** Every run uses the trainer's Python API (:func:`smet_kernels.train.trainer.train`) with the same data,
seed list and token budget ``steps × batch_size × seq_len``; only the method, density and α differ. Methods:

* ``adamw`` (dense), ``galore``: no topology, one run per seed (α and density do not apply);
* ``masked-dst``: dense weights × mask and ``torch.optim.AdamW`` (α does not apply), one run per density;
* ``naive-dst``, ``smet-linear``, ``smet-momentum_ramp``: SMETAdamW (cold start / linear warm-up / momentum
  ramp), one run per density and α.

Each run writes ``runs/<config>/<method>[-d<density>][-a<alpha>]-s<seed>/`` (``metrics.jsonl[.gz]``,
``summary.json``); a folder with ``summary.json`` is finished and skipped, so rerunning the same command
resumes. A finished run whose saved configuration differs from the requested one is an error, never silently
mixed in. Each run executes in a fresh process, so the CPU peak-RSS figure belongs to that run alone.

**Spike statistics** (the trainer's window ``k``, :mod:`smet_kernels.train.spikes`): for an update after step
``s``, ``rise = max(loss[s+1..s+k]) − mean(loss[s−k+1..s])``. Only updates that moved at least one block
count. The dense run of the same seed sees the same batches, so its rise at the same steps is the noise floor;
``excess = rise − rise_dense`` (paired by seed and step) removes batch-to-batch noise. A *spike* is an update
whose rise exceeds the noise threshold ``mean + 2·sd`` of the dense rises of that config.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import multiprocessing
import shlex
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

# ---------------------------------------------------------------------------------------------- sweep spec
METHODS = {
    # name: (trainer optimizer, SMETAdamW warm-up mode or None, sparse, sweeps α)
    "adamw": ("adamw", None, False, False),
    "galore": ("galore", None, False, False),
    "masked-dst": ("masked-dst", None, True, False),
    "naive-dst": ("naive-dst", None, True, True),
    "smet-linear": ("smet", "linear", True, True),
    "smet-momentum_ramp": ("smet", "momentum_ramp", True, True),
}
METHOD_ORDER = tuple(METHODS)
DENSE_METHOD = "adamw"
RUNS_DIR = "runs"
COMMANDS_FILE = "commands.txt"
REPORT_FILE = "stability.md"
GZIP_ABOVE_BYTES = 16 * 1024
# Fields of the saved TrainConfig that may differ between a finished run and a new request without changing it.
_NON_DEFINING_FIELDS = ("out_dir", "progress", "resume", "checkpoint_every", "device", "backend")


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
    prune_fraction: float = 0.2
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
                fail(f"{name} must not be empty")
            if len(set(values)) != len(values):
                fail(f"{name} has duplicates: {list(values)}")
        if unknown := [c for c in self.configs if c not in MODEL_CONFIGS]:
            fail(f"configs must be from {list(MODEL_CONFIGS)}, got {unknown}")
        if unknown := [m for m in self.methods if m not in METHODS]:
            fail(f"methods must be from {list(METHODS)}, got {unknown}")
        if bad := [d for d in self.densities if not (isinstance(d, (int, float)) and 0.0 < d < 1.0)]:
            fail(f"densities must lie in (0, 1), got {bad}")
        if bad := [a for a in self.alphas if not (isinstance(a, (int, float)) and a >= 0.0)]:
            fail(f"alphas must be >= 0, got {bad}")
        if bad := [s for s in self.seeds if isinstance(s, bool) or not isinstance(s, int) or s < 0]:
            fail(f"seeds must be ints >= 0, got {bad}")
        for config in self.configs:
            block = self.block_sizes.get(config)
            if block is not None and block not in SUPPORTED_BLOCK_SIZES:
                fail(f"block_sizes[{config!r}] must be one of {list(SUPPORTED_BLOCK_SIZES)}, got {block}")
        if self.lr_warmup_steps >= self.steps and self.lr_warmup_steps > 0:
            fail(f"lr_warmup_steps ({self.lr_warmup_steps}) must be < steps ({self.steps})")
        if DENSE_METHOD not in self.methods:
            fail(f"methods must include {DENSE_METHOD!r}: it is the reference (noise floor, quality) of the study")
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
        from smet_kernels.train.trainer import TrainConfig

        optimizer, warmup_mode, sparse, _ = METHODS[self.method]
        return TrainConfig(
            model=self.config,
            optimizer=optimizer,
            density=self.density if sparse else 1.0,
            block_size=spec.block_sizes.get(self.config) if sparse else None,
            update_interval=spec.update_interval,
            prune_fraction=spec.prune_fraction,
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


def enumerate_runs(spec: StudySpec) -> list[RunSpec]:
    """All runs of ``spec``: per config and seed, dense methods once, masked-DST per density, the SMETAdamW
    methods per density × α (config-major, then seed, so a partial sweep holds complete comparisons)."""
    runs = []
    for config in spec.configs:
        for seed in spec.seeds:
            for method in spec.methods:
                _, _, sparse, sweeps_alpha = METHODS[method]
                densities = spec.densities if sparse else (None,)
                alphas = spec.alphas if sweeps_alpha else (None,)
                runs += [RunSpec(config, method, float(d) if d is not None else None,
                                 float(a) if a is not None else None, seed) for d in densities for a in alphas]
    return runs


# ---------------------------------------------------------------------------------------------- running
def is_done(run_dir: Path) -> bool:
    """A run is finished once the trainer wrote ``summary.json`` (its last action)."""
    return (Path(run_dir) / "summary.json").is_file()


def _defining(config: dict) -> dict:
    values = {k: v for k, v in config.items() if k not in _NON_DEFINING_FIELDS}
    values["betas"] = list(values.get("betas", ()))
    return values


def check_finished_run(run: RunSpec, spec: StudySpec, out_dir: Path) -> None:
    """Raise ValueError when the finished run in ``run``'s folder was trained with other settings."""
    saved = json.loads((run.directory(out_dir) / "summary.json").read_text())["config"]
    wanted = _defining(run.train_config(spec, out_dir).to_dict())
    differing = sorted(k for k in wanted if _defining(saved).get(k) != wanted[k])
    if differing:
        details = ", ".join(f"{k}: saved {_defining(saved).get(k)!r} != requested {wanted[k]!r}" for k in differing)
        raise ValueError(f"finished run {run.directory(out_dir)} was trained with other settings ({details}); "
                         "use another --out-dir or delete that folder")


def compress_metrics(run_dir: Path, above_bytes: int = GZIP_ABOVE_BYTES) -> None:
    """Gzip ``metrics.jsonl`` into ``metrics.jsonl.gz`` when it is larger than ``above_bytes``."""
    path = Path(run_dir) / "metrics.jsonl"
    if path.is_file() and path.stat().st_size > above_bytes:
        with path.open("rb") as source, gzip.open(path.with_suffix(".jsonl.gz"), "wb", compresslevel=9) as target:
            shutil.copyfileobj(source, target)
        path.unlink()


def _train_in_this_process(config_dict: dict) -> None:
    from smet_kernels.train.trainer import TrainConfig, train

    train(TrainConfig.from_dict(config_dict))


def _train_in_fresh_process(config_dict: dict) -> None:
    """Run one training in a spawned process (own peak RSS / CUDA allocator statistics, no state leaks)."""
    process = multiprocessing.get_context("spawn").Process(target=_train_in_this_process, args=(config_dict,))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"training process exited with code {process.exitcode}")


def _latest_checkpoint(run_dir: Path) -> str | None:
    """The newest complete checkpoint of an interrupted run (verified against its manifest; a corrupt newer one is
    named in a warning), or None (the run then starts from scratch)."""
    from smet_kernels.train.trainer import ConfigError, find_checkpoint

    try:
        return str(find_checkpoint(run_dir))
    except ConfigError:
        return None


def check_runnable(spec: StudySpec, out_dir) -> None:
    """Raise ValueError (one line, naming the setting) for what every run of ``spec`` would reject: the trainer's
    :meth:`TrainConfig.validate`, a device or backend that is not available, unreadable or too short data."""
    import torch

    from smet_kernels import backend as backend_module
    from smet_kernels.train.data import DataError, PackedBatches, eval_windows, load_corpus

    spec.validate()
    for run in enumerate_runs(spec):
        run.train_config(spec, out_dir).validate()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if spec.device == "auto" else spec.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec.device!r} requested but CUDA is not available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {spec.device!r}: only {torch.cuda.device_count()} GPU(s) are visible")
    if spec.backend == "triton" and not backend_module.triton_can_run(device):
        raise ValueError(f"backend 'triton' cannot run on device {device}: use a CUDA device, TRITON_INTERPRET=1 "
                         "(the slow CPU interpreter) or backend 'reference'")
    try:
        corpus = load_corpus(spec.data)
        PackedBatches(corpus.train, spec.seq_len, spec.batch_size, seed=0)
        if spec.eval_batches:
            eval_windows(corpus.val, spec.seq_len, spec.eval_batches * spec.batch_size)
    except DataError as error:
        raise ValueError(str(error)) from None


def run_sweep(spec: StudySpec, out_dir, isolate: bool = True, max_minutes: float | None = None,
              keep_checkpoints: bool = False, log=print) -> dict:
    """Train every run of ``spec`` that is not finished yet into ``out_dir``; returns counts
    ``{"total", "skipped", "trained", "failed", "not_started"}``. Failed runs are reported and retried next time;
    an interrupted run resumes from its latest checkpoint when it has one (``spec.checkpoint_every``)."""
    out_dir = Path(out_dir)
    check_runnable(spec, out_dir)  # a bad setting fails here, not once per run hours later
    runs = enumerate_runs(spec)
    todo = []
    for run in runs:
        if is_done(run.directory(out_dir)):
            check_finished_run(run, spec, out_dir)
            compress_metrics(run.directory(out_dir))
        else:
            todo.append(run)
    counts = {"total": len(runs), "skipped": len(runs) - len(todo), "trained": 0, "failed": 0, "not_started": 0}
    log(f"stability: {len(runs)} runs, {counts['skipped']} finished already, {len(todo)} to train, "
        f"{spec.tokens_per_run:,} tokens each, out-dir {out_dir}")
    deadline = None if max_minutes is None else time.monotonic() + 60.0 * max_minutes
    train_one = _train_in_fresh_process if isolate else _train_in_this_process
    for index, run in enumerate(todo):
        if deadline is not None and time.monotonic() >= deadline:
            counts["not_started"] = len(todo) - index
            log(f"stability: --max-minutes reached, {counts['not_started']} runs not started; rerun to resume")
            break
        run_dir = run.directory(out_dir)
        config = run.train_config(spec, out_dir)
        config.resume = _latest_checkpoint(run_dir)
        started = time.monotonic()
        try:
            train_one(config.to_dict())
        except Exception:  # one broken run must not stop a sweep of hours; it is retried on the next invocation
            counts["failed"] += 1
            log(f"stability: {run.config}/{run.name} failed:\n{traceback.format_exc()}")
            continue
        if not is_done(run_dir):
            counts["failed"] += 1
            log(f"stability: {run.config}/{run.name} ended without summary.json")
            continue
        compress_metrics(run_dir)
        if not keep_checkpoints:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        summary = json.loads((run_dir / "summary.json").read_text())
        counts["trained"] += 1
        log(f"stability: [{counts['skipped'] + index + 1}/{len(runs)}] {run.config}/{run.name}: "
            f"{time.monotonic() - started:.0f}s, final val loss {summary['final_val_loss']:.4f}")
    return counts


# ---------------------------------------------------------------------------------------------- loading
def read_metrics(run_dir: Path) -> list[dict]:
    """The records of ``metrics.jsonl`` or ``metrics.jsonl.gz`` in ``run_dir``."""
    run_dir = Path(run_dir)
    plain, packed = run_dir / "metrics.jsonl", run_dir / "metrics.jsonl.gz"
    if plain.is_file():
        text = plain.read_text()
    elif packed.is_file():
        with gzip.open(packed, "rt") as handle:
            text = handle.read()
    else:
        raise FileNotFoundError(f"no metrics.jsonl(.gz) in {run_dir}")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def run_from_config(config: dict) -> RunSpec:
    """The sweep identity (config, method, density, α, seed) of a saved TrainConfig."""
    optimizer = config["optimizer"]
    method = f"smet-{config['warmup_mode']}" if optimizer == "smet" else optimizer
    if method not in METHODS:
        raise ValueError(f"run with optimizer {optimizer!r} / warmup_mode {config['warmup_mode']!r} is not a "
                         f"method of the study ({list(METHODS)})")
    _, _, sparse, sweeps_alpha = METHODS[method]
    return RunSpec(config["model"], method, float(config["density"]) if sparse else None,
                   float(config["density_lr_exponent"]) if sweeps_alpha else None, int(config["seed"]))


@dataclass
class StudyData:
    """The finished runs under ``out_dir/runs`` as tables; ``key`` = ``<config>/<run name>`` links them."""

    runs: "pd.DataFrame"  # one row per run: identity, summary numbers, path
    losses: "pd.DataFrame"  # key, step, tokens, loss (every logged training step)
    evals: "pd.DataFrame"  # key, step, tokens, val_loss
    updates: "pd.DataFrame"  # key, step, moved (blocks pruned = regrown, all layers)
    spikes: "pd.DataFrame"  # key, update_step, rise, relative_rise, loss_before, max_loss_after (trainer records)
    unfinished: list[str]


def load_study(out_dir) -> StudyData:
    import pandas as pd

    root = Path(out_dir) / RUNS_DIR
    rows, losses, evals, updates, spikes, unfinished = [], [], [], [], [], []
    for run_dir in sorted(p for p in root.glob("*/*") if p.is_dir()):
        if not is_done(run_dir):
            unfinished.append(str(run_dir.relative_to(out_dir)))
            continue
        summary = json.loads((run_dir / "summary.json").read_text())
        config = summary["config"]
        run = run_from_config(config)
        key = f"{run.config}/{run.name}"
        tokens_per_step = config["batch_size"] * config["seq_len"]
        rows.append({
            "key": key, "config": run.config, "method": run.method, "density": run.density, "alpha": run.alpha,
            "seed": run.seed, "steps": summary["steps"], "tokens": summary["tokens"],
            "final_val_loss": summary["final_val_loss"], "final_val_ppl": summary["final_val_ppl"],
            "peak_mem_bytes": summary["peak_mem_bytes"], "peak_mem_kind": summary["peak_mem_kind"],
            "tokens_per_s": summary["tokens_per_s"], "num_parameters": summary["num_parameters"],
            "device": summary["device"], "block_size": config["block_size"], "window": config["spike_window"],
            "update_interval": config["update_interval"], "path": str(run_dir.relative_to(out_dir)),
        })
        for record in read_metrics(run_dir):
            kind, step = record.get("type"), record["step"]
            if kind == "train":
                losses.append({"key": key, "step": step, "tokens": step * tokens_per_step, "loss": record["loss"]})
            if kind in ("train", "eval") and record.get("val_loss") is not None:
                evals.append({"key": key, "step": step, "tokens": step * tokens_per_step,
                              "val_loss": record["val_loss"]})
            elif kind == "topology_update":
                updates.append({"key": key, "step": step, "moved": record["pruned"]})
            elif kind == "loss_spike":
                spikes.append({"key": key, **{k: record[k] for k in ("update_step", "rise", "relative_rise",
                                                                    "loss_before", "max_loss_after")}})
    columns = {
        "losses": ["key", "step", "tokens", "loss"], "evals": ["key", "step", "tokens", "val_loss"],
        "updates": ["key", "step", "moved"],
        "spikes": ["key", "update_step", "rise", "relative_rise", "loss_before", "max_loss_after"],
    }
    frames = {name: pd.DataFrame(data, columns=columns[name])
              for name, data in (("losses", losses), ("evals", evals), ("updates", updates), ("spikes", spikes))}
    return StudyData(runs=pd.DataFrame(rows), unfinished=unfinished, **frames)


# ---------------------------------------------------------------------------------------------- statistics
def control_rises(losses: dict[int, float], update_steps, window: int) -> dict[int, float]:
    """``rise`` at each of ``update_steps`` of a loss curve without updates (same formula as the trainer)."""
    from smet_kernels.train.spikes import SpikeTracker

    tracker = SpikeTracker(window)
    for step in sorted(update_steps):
        tracker.add_update(step)
    for step in sorted(losses):
        tracker.add_loss(step, losses[step])
    tracker.finish()
    return {record["update_step"]: record["rise"] for record in tracker.records}


def spike_events(data: StudyData):
    """One row per measured topology update that moved blocks (and one per dense/GaLore run at the same steps:
    ``method`` adamw/galore, the noise floor), with ``rise``, ``relative_rise`` and paired ``excess`` over the
    dense run of the same config and seed."""
    import pandas as pd

    runs = data.runs.set_index("key")
    moved = data.updates[data.updates["moved"] > 0]
    events = data.spikes.merge(moved.rename(columns={"step": "update_step"}), on=["key", "update_step"])
    events = events.join(runs[["config", "method", "density", "alpha", "seed", "window"]], on="key")
    control_rows = []
    for key, run in runs[~runs["method"].map(lambda m: METHODS[m][2])].iterrows():
        same = events[(events["config"] == run["config"]) & (events["seed"] == run["seed"])]
        steps = sorted(set(same["update_step"]))
        curve = data.losses[data.losses["key"] == key]
        curve = dict(zip(curve["step"].astype(int), curve["loss"]))
        for step, rise in control_rises(curve, steps, int(run["window"])).items():
            before = np.mean([curve[s] for s in range(step - int(run["window"]) + 1, step + 1) if s in curve])
            control_rows.append({"key": key, "update_step": step, "rise": rise, "relative_rise": rise / before,
                                 "moved": 0, **{c: run[c] for c in ("config", "method", "density", "alpha", "seed")}})
    controls = pd.DataFrame(control_rows, columns=["key", "update_step", "rise", "relative_rise", "moved", "config",
                                                   "method", "density", "alpha", "seed"])
    dense = controls[controls["method"] == DENSE_METHOD][["config", "seed", "update_step", "rise"]]
    dense = dense.rename(columns={"rise": "dense_rise"})
    events = pd.concat([events, controls], ignore_index=True) if len(controls) else events
    events = events.merge(dense, on=["config", "seed", "update_step"], how="left")
    events["excess"] = events["rise"] - events["dense_rise"]
    return events


def noise_thresholds(events) -> dict[str, float]:
    """Per config: ``mean + 2·sd`` of the dense rises at the update steps (NaN with fewer than two: no noise floor,
    so no rise is called a spike)."""
    thresholds = {}
    for config, group in events.groupby("config"):
        dense = group.loc[group["method"] == DENSE_METHOD, "rise"].to_numpy(dtype=float)
        thresholds[config] = float(dense.mean() + 2 * dense.std(ddof=1)) if len(dense) >= 2 else math.nan
    return thresholds


GROUP = ["config", "method", "density", "alpha"]


def _in_study_order(frame, extra=()):
    """``frame`` sorted by config size, method (study order), density, α (and ``extra`` columns)."""
    from .report import CONFIG_ORDER

    order = {"_config": frame["config"].map(lambda c: CONFIG_ORDER.index(c) if c in CONFIG_ORDER else 99),
             "_method": frame["method"].map(METHOD_ORDER.index)}
    frame = frame.assign(**order).sort_values(["_config", "_method", "density", "alpha", *extra], na_position="first")
    return frame.drop(columns=list(order)).reset_index(drop=True)


def spike_table(data: StudyData, events=None):
    """Per (config, method, density, α): runs, updates (moving blocks / all), spikes above the noise threshold,
    mean and max rise, mean relative rise, mean paired excess over dense and its standard error."""
    import pandas as pd

    events = spike_events(data) if events is None else events
    thresholds = noise_thresholds(events)
    rows = []
    for (config, method, density, alpha), group in data.runs.groupby(GROUP, dropna=False, sort=False):
        mine = events[events["key"].isin(group["key"])]
        excess = mine["excess"].dropna().to_numpy(dtype=float)
        if METHODS[method][2]:
            updates = f"{len(mine)}/{int(data.updates['key'].isin(group['key']).sum())}"
        else:
            updates = f"{len(mine)} (control)"
        rows.append({
            "config": config, "method": method, "density": density, "alpha": alpha, "runs": len(group),
            "updates": updates,
            "spikes": None if math.isnan(thresholds.get(config, math.nan))
            else int((mine["rise"] > thresholds[config]).sum()),
            "mean_rise": mine["rise"].mean(), "max_rise": mine["rise"].max(),
            "mean_rel_rise": mine["relative_rise"].mean(),
            "mean_excess": excess.mean() if len(excess) else math.nan,
            "excess_se": excess.std(ddof=1) / math.sqrt(len(excess)) if len(excess) >= 2 else math.nan,
        })
    return _in_study_order(pd.DataFrame(rows)), thresholds


def _same(series, value):
    return series.isna() if value is None or (isinstance(value, float) and math.isnan(value)) else series == value


def quality_table(data: StudyData):
    """Per (config, method, density, α): seeds, tokens, final validation loss (mean, sd over seeds), paired
    difference to dense (same config and seed), perplexity and its ratio to dense."""
    import pandas as pd

    runs = data.runs
    dense = runs[runs["method"] == DENSE_METHOD].set_index(["config", "seed"])
    rows = []
    for group_key, group in runs.groupby(GROUP, dropna=False, sort=False):
        config, method, density, alpha = group_key
        paired = [(row["final_val_loss"], dense.loc[(config, row["seed"]), "final_val_loss"])
                  for _, row in group.iterrows() if (config, row["seed"]) in dense.index]
        diffs = np.array([a - b for a, b in paired], dtype=float)
        ppl = group["final_val_ppl"].mean()
        dense_ppl = np.mean([math.exp(b) for _, b in paired]) if paired else math.nan
        rows.append({
            "config": config, "method": method, "density": density, "alpha": alpha, "seeds": len(group),
            "tokens": int(group["tokens"].iloc[0]) if group["tokens"].nunique() == 1 else "mixed",
            "val_loss": group["final_val_loss"].mean(),
            "val_loss_sd": group["final_val_loss"].std(ddof=1) if len(group) >= 2 else math.nan,
            "vs_dense": diffs.mean() if len(diffs) else math.nan,
            "vs_dense_se": diffs.std(ddof=1) / math.sqrt(len(diffs)) if len(diffs) >= 2 else math.nan,
            "ppl": ppl, "ppl_vs_dense": ppl / dense_ppl if paired else math.nan,
        })
    return _in_study_order(pd.DataFrame(rows))


# two-sided 95% quantiles of Student's t by degrees of freedom (a df between entries uses the lower entry)
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}


def t_quantile_975(df: int) -> float:
    """Two-sided 95% critical value of Student's t with ``df`` degrees of freedom (conservative between entries)."""
    return _T975[max(k for k in _T975 if k <= df)] if df < 1000 else 1.960


def compare(a, b) -> tuple[float, float, str]:
    """Paired comparison of equal-length samples ``a``, ``b``: ``(mean(a−b), half-width of its 95% t-interval,
    verdict)``; verdict ``"a > b"`` / ``"a < b"`` when the interval excludes 0, else ``"within noise"``;
    ``"one sample"`` when n < 2 (no noise estimate)."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(diff) == 0:
        return math.nan, math.nan, "no data"
    mean = float(diff.mean())
    if len(diff) < 2:
        return mean, math.nan, "one sample"
    half_width = t_quantile_975(len(diff) - 1) * float(diff.std(ddof=1)) / math.sqrt(len(diff))
    if abs(mean) <= half_width:
        return mean, half_width, "within noise"
    return mean, half_width, "a > b" if mean > 0 else "a < b"


# ---------------------------------------------------------------------------------------------- findings
def findings(data: StudyData, events, quality) -> list[str]:
    """Plain-language statements computed from the numbers (markdown lines). A difference counts only when the 95%
    t-interval of the paired (same seed, same update step) differences excludes 0; otherwise it is reported as
    within noise, and a single pair as giving no noise estimate."""
    runs = data.runs
    lines: list[str] = []

    def signed(value):
        return "n/a" if _missing(value) else f"{value:+.4f}"

    def plus_minus(half_width):
        return "" if _missing(half_width) else f" ± {half_width:.4f} (95% CI)"

    def select(frame, config, method, density, alpha):
        return frame[(frame["config"] == config) & (frame["method"] == method) & _same(frame["density"], density)
                     & _same(frame["alpha"], alpha)]

    def final_losses(config, method, density, alpha):
        return select(runs, config, method, density, alpha).set_index("seed")["final_val_loss"]

    def paired_losses(a, b):
        seeds = sorted(set(a.index) & set(b.index))
        return a.loc[seeds].to_numpy(), b.loc[seeds].to_numpy()

    def seed_means(frame, a, b):
        """Per seed, the mean over its updates: seeds, not updates, are the independent samples."""
        means = frame.groupby("seed")[[a, b]].mean()
        return means[a].to_numpy(), means[b].to_numpy(), len(frame)

    def paired_rises(method_a, method_b, config, density, alpha):
        merged = select(events, config, method_a, density, alpha).merge(
            select(events, config, method_b, density, alpha), on=["seed", "update_step"], suffixes=("_a", "_b"))
        return seed_means(merged, "rise_a", "rise_b")

    def over(updates, seeds):
        return f"over {updates} updates in {seeds} seed{'s' if seeds != 1 else ''} (seed means compared)"

    def verdict_words(verdict, more, less):
        return {"a > b": more, "a < b": less, "within noise": "within noise",
                "one sample": "one sample only: no noise estimate", "no data": "nothing to compare"}[verdict]

    methods = set(runs["method"])
    sparse_settings = sorted({(r.config, r.density, r.alpha) for r in runs.itertuples() if METHODS[r.method][3]},
                             key=lambda s: (s[0], -s[1], s[2]))

    def label(config, density, alpha):
        return f"{config}, d={density:g}, α={alpha:g}"

    # 1. naive DST against the dense noise floor at the same steps
    if sparse_settings and "naive-dst" in methods:
        lines.append("**Naive DST (cold start) spikes after topology updates** — rise minus the dense run's rise "
                     "at the same steps and batches:")
        for config, density, alpha in sparse_settings:
            naive = select(events, config, "naive-dst", density, alpha).dropna(subset=["dense_rise"])
            if not len(naive):
                lines.append(f"  - {label(config, density, alpha)}: no update moved a block (floor(ζ·nnz) = 0 in every layer: too few active blocks per layer; a smaller block size fixes it) — nothing to measure")
                continue
            rise, dense_rise, updates = seed_means(naive, "rise", "dense_rise")
            mean, ci, verdict = compare(rise, dense_rise)
            lines.append(f"  - {label(config, density, alpha)}: {signed(mean)}{plus_minus(ci)} "
                         f"{over(updates, len(rise))} — "
                         f"{verdict_words(verdict, 'spikes above dense: holds', 'rises less than dense')}")

    # 2. warm-up against cold start, paired by seed and update
    for method in ("smet-linear", "smet-momentum_ramp"):
        if not sparse_settings or method not in methods or "naive-dst" not in methods:
            continue
        tally, details = {"holds": 0, "reversed": 0, "noise": 0, "none": 0}, []
        for config, density, alpha in sparse_settings:
            naive_rise, smet_rise, updates = paired_rises("naive-dst", method, config, density, alpha)
            if not len(naive_rise):
                tally["none"] += 1
                details.append(f"{label(config, density, alpha)}: no update moved a block (floor(ζ·nnz) = 0 in every layer: too few active blocks per layer; a smaller block size fixes it) — nothing to measure")
                continue
            mean, ci, verdict = compare(naive_rise, smet_rise)
            tally[{"a > b": "holds", "a < b": "reversed"}.get(verdict, "noise")] += 1
            details.append(f"{label(config, density, alpha)}: {signed(mean)}{plus_minus(ci)} "
                           f"{over(updates, len(naive_rise))} — "
                           f"{verdict_words(verdict, 'holds', f'{method} spikes MORE: does not hold')}")
        lines.append(f"**{method} removes the spike** — naive-DST rise minus {method} rise: holds in "
                     f"{tally['holds']}, reversed in {tally['reversed']}, within noise in {tally['noise']}, not "
                     f"measurable in {tally['none']} of {len(sparse_settings)} settings:")
        lines += [f"  - {d}" for d in details]

    # 3. quality against dense at equal tokens (best α per method and density)
    lines.append("**Quality against dense at equal tokens** — final validation loss minus dense, paired by seed "
                 "(SMETAdamW methods at their best α, chosen on these same seeds: with several α the interval is "
                 "optimistic):")
    for config in _in_study_order(runs)["config"].unique():
        dense = final_losses(config, DENSE_METHOD, None, None)
        candidates = quality[(quality["config"] == config) & (quality["method"] != DENSE_METHOD)]
        for (method, density), group in candidates.groupby(["method", "density"], dropna=False, sort=False):
            best = group.sort_values("val_loss").iloc[0]
            a, b = paired_losses(final_losses(config, method, density, best["alpha"]), dense)
            mean, ci, verdict = compare(a, b)
            name = method + ("" if _missing(density) else f" d={density:g}") + \
                ("" if _missing(best["alpha"]) else f" (best α={best['alpha']:g} of {len(group)})")
            lines.append(f"  - {config} {name}: {signed(mean)}{plus_minus(ci)}, ppl × {best['ppl_vs_dense']:.3f} — "
                         f"{verdict_words(verdict, 'worse than dense', 'better than dense')}")

    # 4. density-aware LR: largest α against α = 0
    alphas = sorted(runs["alpha"].dropna().unique())
    if len(alphas) >= 2:
        low, high = alphas[0], alphas[-1]
        lines.append(f"**Density-aware LR** — final validation loss at α={high:g} minus α={low:g}, paired by seed:")
        for config, density, _ in [s for s in sparse_settings if s[2] == low]:
            for method in [m for m in METHOD_ORDER if METHODS[m][3] and m in set(runs["method"])]:
                a, b = paired_losses(final_losses(config, method, density, high),
                                     final_losses(config, method, density, low))
                mean, ci, verdict = compare(a, b)
                lines.append(f"  - {config} {method} d={density:g}: {signed(mean)}{plus_minus(ci)} — "
                             f"{verdict_words(verdict, f'α={high:g} is worse', f'α={high:g} is better')}")

    # 5. consistency: naive DST at α = 0 is masked DST with compact storage (same arithmetic)
    pairs = [(c, d) for c, d, a in sparse_settings if a == 0.0]
    if pairs and "masked-dst" in set(runs["method"]):
        gaps = []
        for config, density in pairs:
            a, b = paired_losses(final_losses(config, "naive-dst", density, 0.0),
                                 final_losses(config, "masked-dst", density, None))
            gaps += list(np.abs(a - b))
        if gaps:
            lines.append(f"**Consistency check** — naive-DST at α=0 and masked-DST apply the same update (compact "
                         f"vs dense-masked storage): largest final-loss gap {max(gaps):.2e} over {len(gaps)} pairs "
                         f"({'agree' if max(gaps) < 1e-3 else 'they DISAGREE: investigate'}).")

    # 6. library defaults (TrainConfig: warm-up linear, α = 1)
    from smet_kernels.train.trainer import TrainConfig

    default = TrainConfig()
    default_method, default_alpha = f"smet-{default.warmup_mode}", default.density_lr_exponent
    smet = quality[quality["method"].isin(["smet-linear", "smet-momentum_ramp"])]
    if len(smet):
        lines.append(f"**Defaults** (library: warm-up `{default.warmup_mode}`, α={default_alpha:g}; per-block warm-up "
                     f"length as in this study) — best SMETAdamW setting per density by final validation loss (chosen "
                     f"on the same seeds it is compared on, so a 'default is worse' verdict is optimistic):")
        for (config, density), group in smet.groupby(["config", "density"]):
            best = group.sort_values("val_loss").iloc[0]
            mine = final_losses(config, default_method, density, default_alpha)
            a, b = paired_losses(mine, final_losses(config, best["method"], density, best["alpha"]))
            mean, ci, verdict = compare(a, b)
            if best["method"] == default_method and best["alpha"] == default_alpha:
                outcome = "the default is best"
            elif not len(a):
                outcome = "the default setting was not run"
            else:
                outcome = (f"default − best {signed(mean)}{plus_minus(ci)}: "
                           + verdict_words(verdict, "the default is worse", "the default is better"))
            lines.append(f"  - {config} d={density:g}: {best['method']} α={best['alpha']:g} "
                         f"(val loss {best['val_loss']:.4f}); {outcome}")
        if any(d.startswith("cpu") for d in runs["device"]):
            lines.append("  - CPU pilot: no default is changed on the strength of these runs.")
    paragraphs = []
    for line in lines:  # a blank line before each statement, so it does not join the previous list
        paragraphs += ["", line] if line.startswith("**") and paragraphs else [line]
    return paragraphs


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


# ---------------------------------------------------------------------------------------------- plots
def _palette() -> dict:
    """One fixed colour per method, the same in every plot."""
    import seaborn as sns

    return dict(zip(METHOD_ORDER, sns.color_palette("tab10", len(METHOD_ORDER))))


def plot_val_curves(data: StudyData, config: str, path: Path) -> Path:
    """Validation loss vs tokens: one panel per (density, α), the dense-like methods repeated in each panel."""
    import matplotlib

    matplotlib.use("Agg")
    import pandas as pd
    import seaborn as sns
    from matplotlib import pyplot as plt

    runs = data.runs[data.runs["config"] == config]
    curves = data.evals.join(runs.set_index("key")[GROUP + ["seed"]], on="key", how="inner")
    densities = sorted(runs["density"].dropna().unique(), reverse=True) or [math.nan]
    alphas = sorted(runs["alpha"].dropna().unique()) or [math.nan]
    panels = []
    for density in densities:
        for alpha in alphas:
            keep = (_same(curves["density"], None) | (curves["density"] == density)) & \
                   (_same(curves["alpha"], None) | (curves["alpha"] == alpha))
            panel = curves[keep].copy()
            panel["panel_density"], panel["panel_alpha"] = f"d={density:g}", f"α={alpha:g}"
            panels.append(panel)
    frame = pd.concat(panels, ignore_index=True)
    hue_order = [m for m in METHOD_ORDER if m in set(frame["method"])]
    grid = sns.relplot(data=frame, x="tokens", y="val_loss", hue="method", hue_order=hue_order, kind="line",
                       palette=_palette(),
                       row="panel_density", col="panel_alpha", errorbar=("pi", 100), height=2.6, aspect=1.35,
                       facet_kws={"sharey": True})
    late = frame[frame["tokens"] >= 0.2 * frame["tokens"].max()]["val_loss"]
    if len(late):
        spread = late.max() - late.min()
        grid.set(ylim=(late.min() - 0.05 * spread, late.max() + 0.05 * spread))
    grid.set_titles("{row_name}, {col_name}")
    grid.set_axis_labels("tokens", "validation loss")
    grid.figure.suptitle(f"{config}: validation loss (band: min–max over seeds)", y=1.02)
    grid.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(grid.figure)
    return path


def plot_spike_profile(data: StudyData, events, config: str, path: Path) -> Path | None:
    """Excess training loss over the dense run of the same seed (same batches), minus its pre-update mean, from
    −k+1 to k steps around the updates that moved blocks; mean over updates and seeds (GaLore as a control;
    dense is 0 by construction). None when no update moved a block."""
    import matplotlib

    matplotlib.use("Agg")
    import pandas as pd
    import seaborn as sns
    from matplotlib import pyplot as plt

    runs = data.runs.set_index("key")
    losses = {key: dict(zip(group["step"].astype(int), group["loss"])) for key, group in data.losses.groupby("key")}
    dense = {(run.config, run.seed): losses[key] for key, run in runs[runs["method"] == DENSE_METHOD].iterrows()}
    mine = events[(events["config"] == config) & (events["method"] != DENSE_METHOD)]
    densities = sorted(mine["density"].dropna().unique(), reverse=True)
    rows = []
    for event in mine.itertuples():
        reference = dense.get((config, event.seed))
        if reference is None:
            continue
        window = int(runs.loc[event.key, "window"])
        curve, step = losses[event.key], int(event.update_step)
        excess = {s: curve[s] - reference[s] for s in range(step - window + 1, step + window + 1)
                  if s in curve and s in reference}
        before = [excess[s] for s in range(step - window + 1, step + 1) if s in excess]
        if not before:
            continue
        for density in densities if _missing(event.density) else [event.density]:
            rows += [{"method": event.method, "panel": f"d={density:g}",
                      "α": "-" if _missing(event.alpha) else f"{event.alpha:g}", "offset": s - step,
                      "excess": value - np.mean(before)} for s, value in excess.items()]
    if not rows:
        return None
    frame = pd.DataFrame(rows)
    hue_order = [m for m in METHOD_ORDER if m in set(frame["method"])]
    grid = sns.relplot(data=frame, x="offset", y="excess", hue="method", hue_order=hue_order, style="α",
                       palette=_palette(), kind="line", col="panel", errorbar=None, height=3.0, aspect=1.5)
    for axis in grid.axes.flat:
        axis.axvline(0.5, color="grey", lw=0.8, ls=":")
        axis.axhline(0.0, color="grey", lw=0.8)
    grid.set_titles("{col_name}")
    grid.set_axis_labels("steps after the topology update", "loss − dense loss (pre-update mean removed)")
    grid.figure.suptitle(f"{config}: training loss minus dense around topology updates\n"
                         "(mean over the updates that moved blocks and over seeds)", y=1.08)
    grid.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(grid.figure)
    return Path(path)


# ---------------------------------------------------------------------------------------------- report
def _display(table, columns: dict[str, str], floats: dict[str, str]):
    frame = table.copy()
    for column in ("density", "alpha"):
        if column in frame:
            frame[column] = frame[column].map(lambda v: "-" if _missing(v) else f"{v:g}")
    for column, spec in floats.items():
        frame[column] = frame[column].map(lambda v: "n/a" if _missing(v) else format(v, spec))
    return frame[list(columns)].rename(columns=columns).to_markdown(index=False, disable_numparse=True)


def _commands(out_dir: Path) -> list[str]:
    path = out_dir / COMMANDS_FILE
    commands = [line.split(" ", 1)[1] for line in path.read_text().splitlines() if " " in line] if path.exists() else []
    return list(dict.fromkeys(commands))  # each distinct command once, in first-use order


def write_report(out_dir, output: str | Path | None = None) -> Path:
    """Render ``stability.md`` (and the PNGs next to it) from the finished runs in ``out_dir``."""
    out_dir = Path(out_dir)
    data = load_study(out_dir)
    if not len(data.runs):
        raise ValueError(f"no finished runs under {out_dir / RUNS_DIR}; run `smet-bench stability run` first")
    output = Path(output) if output else out_dir / REPORT_FILE
    output.parent.mkdir(parents=True, exist_ok=True)
    events = spike_events(data)
    spikes, thresholds = spike_table(data, events)
    quality = quality_table(data)
    runs = data.runs
    devices = sorted(set(runs["device"]))
    cpu = any(d.startswith("cpu") for d in devices)
    lines = ["# Stability study: loss spikes after topology updates, quality vs dense", ""]
    if cpu:
        lines += ["> **CPU pilot, not the H100 study.** Tiny models and short runs on a CPU: these numbers show that "
                  "the tooling works end to end; they are no evidence for or against the method's claims.", ""]
    first = json.loads((out_dir / runs.iloc[0]["path"] / "summary.json").read_text())["config"]
    lines += [
        "## Setup", "",
        f"- runs: {len(runs)} finished ({', '.join(f'{c}: {n}' for c, n in runs.groupby('config').size().items())})"
        + (f"; unfinished: {', '.join(data.unfinished)}" if data.unfinished else ""),
        f"- devices: {', '.join(devices)}; backend {first['backend']}, precision {first['precision']}, data "
        f"`{first['data']}`",
        f"- tokens per run: {', '.join(f'{c}: {t:,}' for c, t in runs.groupby('config')['tokens'].max().items())} "
        f"(steps × batch × seq = {first['max_steps']} × {first['batch_size']} × {first['seq_len']}); "
        + ("every run of a config has the same token budget" if runs.groupby("config")["tokens"].nunique().max() == 1
           else "**token budgets differ between runs of a config**"),
        f"- seeds: {sorted(set(runs['seed']))}; same seeds, data order and budget for every method",
        f"- topology: update every {first['update_interval']} steps, prune fraction {first['prune_fraction']} "
        f"(cosine-decayed), regrow {first['regrow']}, block size "
        f"{', '.join(f'{c}: {b:g}' for c, b in runs.groupby('config')['block_size'].max().dropna().items())}",
        f"- optimizer: lr {first['lr']} (linear warm-up {first['lr_warmup_steps']} steps, cosine to 10%), "
        f"SMETAdamW per-block warm-up {first['optimizer_warmup_steps']} steps, spike window k = "
        f"{first['spike_window']}",
        "- methods: `adamw` dense; `galore` GaLore-style; `masked-dst` dense weights × mask + AdamW; `naive-dst` "
        "SMETAdamW cold start (global bias correction, no warm-up); `smet-linear` / `smet-momentum_ramp` SMETAdamW "
        "with per-block warm-up; α = density-LR exponent (lr × d^−α)",
        "",
        "## Reproduce", "",
        "```bash",
        *(_commands(out_dir) or [f"smet-bench stability run --out-dir {out_dir}"]),
        f"smet-bench stability report --out-dir {out_dir}",
        "```", "",
        "## What holds and what does not", "",
        *findings(data, events, quality), "",
    ]
    for config in _in_study_order(runs)["config"].unique():
        curve = plot_val_curves(data, config, output.parent / f"stability_val_loss_{config}.png")
        lines += [f"## {config}: validation loss", "", f"![validation loss {config}]({curve.name})", ""]
        profile = plot_spike_profile(data, events, config, output.parent / f"stability_spikes_{config}.png")
        if profile is not None:
            lines += [f"![spike profile {config}]({profile.name})", ""]
    lines += [
        "## Loss spikes per topology update", "",
        f"`updates` = measured updates that moved ≥ 1 block / all topology updates (the last one, at the final "
        f"step, has no steps after it; for adamw/galore: the same steps, as a control). "
        f"`rise` = max loss over the k steps after an update − mean loss over the k steps up to it; "
        f"`excess` = rise − rise of the dense run at the same step and seed (± 1 SE). `spikes` = updates with rise "
        f"above the dense noise threshold (mean + 2 sd of the dense rises: "
        f"{', '.join(f'{c}: {t:.4f}' if not math.isnan(t) else f'{c}: none (fewer than two dense rises)' for c, t in thresholds.items())}).", "",
        _display(spikes, {"config": "config", "method": "method", "density": "density", "alpha": "α",
                          "runs": "runs", "updates": "updates", "spikes": "spikes", "mean_rise": "mean rise",
                          "max_rise": "max rise", "mean_rel_rise": "mean rel. rise", "mean_excess": "mean excess",
                          "excess_se": "± SE"},
                 {"mean_rise": ".4f", "max_rise": ".4f", "mean_rel_rise": ".2%", "mean_excess": "+.4f",
                  "excess_se": ".4f"}) if len(spikes) else "(no topology updates)", "",
        "## Final validation loss and perplexity at equal tokens", "",
        "`vs dense` = final validation loss − dense (same config and seed; ± 1 SE over seeds).", "",
        _display(quality, {"config": "config", "method": "method", "density": "density", "alpha": "α",
                           "seeds": "seeds", "tokens": "tokens", "val_loss": "val loss", "val_loss_sd": "sd",
                           "vs_dense": "vs dense", "vs_dense_se": "± SE", "ppl": "ppl",
                           "ppl_vs_dense": "ppl / dense"},
                 {"val_loss": ".4f", "val_loss_sd": ".4f", "vs_dense": "+.4f", "vs_dense_se": ".4f", "ppl": ".2f",
                  "ppl_vs_dense": ".3f"}), "",
        "## Peak memory and throughput per run", "",
        "CUDA: `torch.cuda.max_memory_allocated`; CPU: peak resident set size of the run's own process (includes "
        "the Python runtime, so differences between methods are hidden at this size).", "",
    ]
    memory = _in_study_order(runs, extra=("seed",))
    memory = memory.assign(peak_mib=memory["peak_mem_bytes"] / 2**20)
    lines += [_display(memory, {"config": "config", "method": "method", "density": "density", "alpha": "α",
                                "seed": "seed", "num_parameters": "parameters", "peak_mib": "peak MiB",
                                "peak_mem_kind": "measured as", "tokens_per_s": "tokens/s", "path": "raw data"},
                       {"peak_mib": ".1f", "tokens_per_s": ",.0f"}), ""]
    lines += ["## Raw data", "",
              f"`{RUNS_DIR}/<config>/<run>/`: `summary.json` (trainer summary with the full config) and `metrics.jsonl` "
              f"(gzipped as `metrics.jsonl.gz` above {GZIP_ABOVE_BYTES // 1024} KiB): per-step `train` records, "
              "`val_loss` on eval steps, `topology_update` and `loss_spike` records (see smet_kernels/train/loop.py).",
              ""]
    output.write_text("\n".join(lines))
    return output


# ---------------------------------------------------------------------------------------------- CLI
def _csv(kind):
    def parse(text: str):
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        try:
            return tuple(kind(item) for item in items)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _default(name: str) -> str:
    """``(default: <H100 study value>; <CPU pilot value> with --quick)`` of the :class:`StudySpec` field ``name``."""

    def show(value) -> str:
        return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)

    study, pilot = show(getattr(PRESETS["h100"], name)), show(getattr(PRESETS["pilot"], name))
    return f"(default: {study})" if study == pilot else f"(default: {study}; {pilot} with --quick)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``run`` / ``report`` sub-commands (shared by ``smet-bench stability`` and ``python -m bench.stability``)."""
    commands = parser.add_subparsers(dest="stability_command", required=True, metavar="{run,report}")
    h100 = PRESETS["h100"]
    run = commands.add_parser(
        "run", help="train the sweep's runs into <out-dir>/runs (resumable)",
        description="Train every run of the sweep that is not finished yet (rerun the same command to resume). "
        f"Default grid (H100 study): configs {','.join(h100.configs)}, methods {','.join(h100.methods)}, densities "
        f"{','.join(map(str, h100.densities))}, α {','.join(map(str, h100.alphas))}, seeds "
        f"{','.join(map(str, h100.seeds))}, {h100.steps} steps × {h100.batch_size} × {h100.seq_len} = "
        f"{h100.tokens_per_run / 1e6:.1f}M tokens per run. Lists are comma-separated.")
    pilot = PRESETS["pilot"]
    run.add_argument("--quick", action="store_true",
                     help=f"CPU pilot preset: config {','.join(pilot.configs)}, densities "
                     f"{','.join(map(str, pilot.densities))}, α {','.join(map(str, pilot.alphas))}, seeds "
                     f"{','.join(map(str, pilot.seeds))}, {pilot.steps} steps × {pilot.batch_size} × {pilot.seq_len}, "
                     f"update every {pilot.update_interval} steps, {pilot.backend} backend (~15 min on 2 cores); "
                     "options below still override")
    run.add_argument("--out-dir", default=None,
                     help="output folder (default: reports/stability; reports/cpu-pilot-stability with --quick)")
    run.add_argument("--configs", type=_csv(str),
                     help=f"model configurations from tiny,20m,60m,130m,350m,1b,7b {_default('configs')}")
    run.add_argument("--methods", type=_csv(str),
                     help=f"methods from {','.join(METHODS)}; must include {DENSE_METHOD} (default: all)")
    run.add_argument("--densities", type=_csv(float),
                     help=f"block densities in (0, 1) of the sparse methods {_default('densities')}")
    run.add_argument("--alphas", type=_csv(float),
                     help=f"density-LR exponents α >= 0 of the SMETAdamW methods (lr × d^-α) {_default('alphas')}")
    run.add_argument("--seeds", type=_csv(int), help=f"seeds; every method runs every seed {_default('seeds')}")
    run.add_argument("--steps", type=_positive_int,
                     help=f"optimizer steps per run; token budget = steps × batch × seq {_default('steps')}")
    run.add_argument("--batch-size", type=_positive_int,
                     help=f"sequences per optimizer step {_default('batch_size')}")
    run.add_argument("--seq-len", type=_positive_int, help=f"tokens per sequence {_default('seq_len')}")
    run.add_argument("--update-interval", type=_positive_int,
                     help=f"steps between topology updates {_default('update_interval')}")
    run.add_argument("--spike-window", type=_positive_int,
                     help=f"k of the loss-spike statistic, in steps {_default('spike_window')}")
    run.add_argument("--optimizer-warmup-steps", type=_positive_int,
                     help=f"SMETAdamW per-block warm-up steps {_default('optimizer_warmup_steps')}")
    run.add_argument("--lr", type=float, help=f"peak learning rate, same for every method {_default('lr')}")
    run.add_argument("--lr-warmup-steps", type=int,
                     help=f"linear LR warm-up steps, same for every method {_default('lr_warmup_steps')}")
    run.add_argument("--precision", choices=("fp32", "bf16-autocast", "bf16"),
                     help=f"training precision {_default('precision')}")
    run.add_argument("--data",
                     help=f"training data: stdlib, a text file or folder, a uint16 .bin token file or hf:NAME "
                     f"(as smet-train --data) {_default('data')}")
    run.add_argument("--backend", choices=("auto", "triton", "reference"),
                     help=f"smet_kernels backend {_default('backend')}")
    run.add_argument("--device", help=f"auto, cpu, cuda or cuda:N {_default('device')}")
    run.add_argument("--max-minutes", type=float, default=None,
                     help="start no new run after this many minutes; rerun the same command to resume "
                     "(default: no limit)")
    run.add_argument("--keep-checkpoints", action="store_true", help="keep each finished run's checkpoints")
    run.add_argument("--dry-run", action="store_true", help="list the runs and their state, train nothing")
    report = commands.add_parser("report", help="write <out-dir>/stability.md and PNG plots from the runs",
                                 description="Render stability.md (tables, findings, commands) and seaborn PNGs "
                                 "from the finished runs in <out-dir>/runs.")
    report.add_argument("--out-dir", required=True, help="folder of the study, holding runs/ (required; no default)")
    report.add_argument("--output", default=None, help="markdown file to write (default: <out-dir>/stability.md)")


def spec_from_args(args: argparse.Namespace) -> StudySpec:
    spec = dataclasses.replace(PRESETS["pilot" if args.quick else "h100"])
    overrides = {name: getattr(args, name) for name in (
        "configs", "methods", "densities", "alphas", "seeds", "steps", "batch_size", "seq_len", "update_interval",
        "spike_window", "optimizer_warmup_steps", "lr", "lr_warmup_steps", "precision", "data", "backend", "device")
        if getattr(args, name) is not None}
    spec = dataclasses.replace(spec, **overrides)
    return spec.validate()


def main_from_args(args: argparse.Namespace, prog: str, argv: list[str]) -> int:
    """Execute a parsed ``run``/``report`` command; bad options end with ``<prog>: error`` (exit code 2)."""
    if args.stability_command == "report":
        try:
            path = write_report(args.out_dir, args.output)
        except ValueError as error:
            print(f"{prog}: error: {error}", file=sys.stderr)
            return 2
        print(f"{prog}: wrote {path}")
        return 0
    out_dir = Path(args.out_dir or ("reports/cpu-pilot-stability" if args.quick else "reports/stability"))
    try:
        spec = spec_from_args(args)
        check_runnable(spec, out_dir)
    except ValueError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    if args.dry_run:
        for run in enumerate_runs(spec):
            state = "finished" if is_done(run.directory(out_dir)) else "to run"
            print(f"{run.config}/{run.name}: {state}")
        print(f"{len(enumerate_runs(spec))} runs, {spec.tokens_per_run:,} tokens each")
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with (out_dir / COMMANDS_FILE).open("a") as handle:
        handle.write(f"{stamp} {prog} {shlex.join(argv)}\n")
    (out_dir / "study.json").write_text(json.dumps(spec.to_dict(), indent=1))
    try:
        counts = run_sweep(spec, out_dir, max_minutes=args.max_minutes, keep_checkpoints=args.keep_checkpoints)
    except ValueError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    print(f"{prog}: {counts}; render with: smet-bench stability report --out-dir {out_dir}")
    return 1 if counts["failed"] else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m bench.stability", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return main_from_args(parser.parse_args(argv), "python -m bench.stability", argv)


if __name__ == "__main__":
    sys.exit(main())
