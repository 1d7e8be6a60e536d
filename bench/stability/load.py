"""Loading a study: the finished runs under ``<out-dir>/runs`` as pandas tables (:class:`StudyData`)."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .spec import METHODS, RUNS_DIR, RunSpec
from .sweep import is_done

if TYPE_CHECKING:
    import pandas as pd


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
    """The sweep identity (config, method, density, α, seed) of a saved TrainConfig. A ``naive-dst`` run at α > 0
    (the study ran naive DST at every α before the ``density-lr-only`` arm existed) is that arm: the same optimizer
    (no warm-up, global bias correction) with the density-aware LR."""
    optimizer = config["optimizer"]
    method = f"smet-{config['warmup_mode']}" if optimizer == "smet" else optimizer
    if method == "naive-dst" and config["density_lr_exponent"]:
        method = "density-lr-only"
    if method not in METHODS:
        raise ValueError(f"run with optimizer {optimizer!r} / warmup_mode {config['warmup_mode']!r} is not a "
                         f"method of the study ({list(METHODS)})")
    method_spec = METHODS[method]
    alpha = config["density_lr_exponent"]
    return RunSpec(config["model"], method, float(config["density"]) if method_spec.sparse else None,
                   None if method_spec.alphas is None or alpha is None else float(alpha), int(config["seed"]))


PROBE_COLUMNS = ["key", "update_step", "prune_damage", "cold_start_rise", "regrown_rms_1", "surviving_rms_1",
                 "regrown_vs_surviving_1", "surviving_relative_1", "regrown_vs_surviving_mean"]


def probe_row(key: str, record: dict) -> dict:
    """One ``update_probe`` record as a row: prune damage, cold-start rise, first-step sizes (step 1 after the update)
    and the regrown/surviving step ratio averaged over the window (None where nothing was measured)."""
    sizes = record.get("step_sizes") or []
    first = sizes[0] if sizes else {}
    ratios = [s["regrown_vs_surviving"] for s in sizes if s.get("regrown_vs_surviving") is not None]
    return {"key": key, "update_step": record["update_step"], "prune_damage": record["prune_damage"],
            "cold_start_rise": record["cold_start_rise"], "regrown_rms_1": first.get("regrown_update_rms"),
            "surviving_rms_1": first.get("surviving_update_rms"),
            "regrown_vs_surviving_1": first.get("regrown_vs_surviving"),
            "surviving_relative_1": first.get("surviving_relative_update"),
            "regrown_vs_surviving_mean": sum(ratios) / len(ratios) if ratios else None}


@dataclass
class StudyData:
    """The finished runs under ``out_dir/runs`` as tables; ``key`` = ``<config>/<run name>`` links them."""

    runs: "pd.DataFrame"  # one row per run: identity, summary numbers, path
    losses: "pd.DataFrame"  # key, step, tokens, loss (every logged training step)
    evals: "pd.DataFrame"  # key, step, tokens, val_loss
    updates: "pd.DataFrame"  # key, step, moved (blocks pruned = regrown, all layers)
    spikes: "pd.DataFrame"  # key, update_step, rise, relative_rise, loss_before, max_loss_after (trainer records)
    unfinished: list[str]
    probes: "pd.DataFrame" = None  # key, update_step, prune_damage, cold_start_rise, first-step sizes (update probe)


def load_study(out_dir) -> StudyData:
    import pandas as pd

    root = Path(out_dir) / RUNS_DIR
    rows, losses, evals, updates, spikes, probes, unfinished = [], [], [], [], [], [], []
    paths = {}  # key -> the run folder loaded under it
    for run_dir in sorted(p for p in root.glob("*/*") if p.is_dir()):
        if not is_done(run_dir):
            unfinished.append(str(run_dir.relative_to(out_dir)))
            continue
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
            config = summary["config"]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{run_dir / 'summary.json'} is not a trainer's summary ({error!r}); remove that run "
                             "folder, or give the --out-dir of a stability study") from None
        try:
            run = run_from_config(config)
        except ValueError as error:
            raise ValueError(f"{run_dir.relative_to(out_dir)}: {error}") from None
        key = f"{run.config}/{run.name}"
        if key in paths:
            raise ValueError(f"{paths[key]} and {run_dir.relative_to(out_dir)} are the same run ({key}; an older "
                             "release named a density-lr-only run naive-dst-…-a<α>): remove one of them")
        paths[key] = run_dir.relative_to(out_dir)
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
        try:
            records = read_metrics(run_dir)
        except FileNotFoundError as error:
            raise ValueError(f"{error}: the finished run lost its metrics; restore them, or remove that run folder "
                             "and rerun the sweep to train it again") from None
        for record in records:
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
            elif kind == "update_probe":
                probes.append(probe_row(key, record))
    columns = {
        "losses": ["key", "step", "tokens", "loss"], "evals": ["key", "step", "tokens", "val_loss"],
        "updates": ["key", "step", "moved"],
        "spikes": ["key", "update_step", "rise", "relative_rise", "loss_before", "max_loss_after"],
        "probes": PROBE_COLUMNS,
    }
    frames = {name: pd.DataFrame(data, columns=columns[name])
              for name, data in (("losses", losses), ("evals", evals), ("updates", updates), ("spikes", spikes),
                                 ("probes", probes))}
    return StudyData(runs=pd.DataFrame(rows), unfinished=unfinished, **frames)
