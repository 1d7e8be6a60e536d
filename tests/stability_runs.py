"""The stability-study tests' shared set-up (tests/test_stability_sweep.py, tests/test_stability_findings.py,
tests/test_stability_report.py): the cache folders of a test, and finished run folders with synthetic metrics, as
the trainer writes them, for the findings and the report to read."""

import dataclasses
import gzip
import json
import math

import pytest

from bench import stability
from bench.stability import PRESETS, RunSpec, load_study, quality_table, spike_events


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory, monkeypatch):
    """The tokenised corpus cache (and matplotlib's font cache, read when the plots first import it) in the session's
    temporary folder, not in the home directory."""
    path = tmp_path_factory.getbasetemp() / "smet_cache"
    monkeypatch.setenv("SMET_CACHE_DIR", str(path))
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path_factory.getbasetemp() / "matplotlib"))
    return path


def _write_run(root, run: RunSpec, losses, updates=(), window=3, val_loss=2.0, peak=1 << 20, probes=()):
    """A finished run folder with a synthetic metrics.jsonl (the trainer's record format)."""
    from smet_kernels.train.spikes import SpikeTracker

    spec = dataclasses.replace(PRESETS["pilot"], steps=len(losses), spike_window=window, update_interval=10)
    config = run.train_config(spec, root).to_dict()
    out = run.directory(root)
    out.mkdir(parents=True)
    tracker, records = SpikeTracker(window), [{"type": "eval", "step": 0, "val_loss": val_loss + 1.0}]
    updates = dict(updates)
    for step, loss in enumerate(losses, start=1):
        done = tracker.add_loss(step, loss)
        record = {"type": "train", "step": step, "loss": loss}
        if step == len(losses):
            record["val_loss"] = val_loss
        records.append(record)
        if step in updates:
            tracker.add_update(step)
            records.append({"type": "topology_update", "step": step, "pruned": updates[step],
                            "regrown": updates[step], "layers": {}})
        records += [{"type": "loss_spike", **spike, "step": step} for spike in done]
    records += [{"type": "loss_spike", **spike, "step": len(losses)} for spike in tracker.finish()]
    records += [{"type": "update_probe", "step": step + window, "update_step": step, "prune_damage": damage,
                 "cold_start_rise": cold, "loss_before": 2.0, "loss_after": 2.0 + damage, "probe_losses": [],
                 "step_sizes": [{"step": 1, "regrown_update_rms": ratio, "surviving_update_rms": 1.0,
                                 "regrown_vs_surviving": ratio, "surviving_relative_update": 0.01,
                                 "regrown_relative_update": None}],
                 "window": window, "complete": True} for step, damage, cold, ratio in probes]
    with gzip.open(out / "metrics.jsonl.gz", "wt") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in records)
    summary = {"steps": len(losses), "tokens": len(losses) * 512, "final_val_loss": val_loss,
               "final_val_ppl": math.exp(val_loss), "peak_mem_bytes": peak, "peak_mem_kind": "cpu_peak_rss",
               "tokens_per_s": 1000.0, "num_parameters": 10, "device": "cpu", "config": config}
    (out / "summary.json").write_text(json.dumps(summary))


def _synthetic_study(root, seeds=(0,), naive_spike=0.5, smet_spike=0.0):
    """Flat loss 2.0; naive-DST jumps by ``naive_spike`` 2 steps after the update at step 10 (a no-op update at
    step 20 moves nothing); SMET by ``smet_spike``; dense has a small wiggle at the same place."""
    for seed in seeds:
        flat = [2.0] * 30
        wiggle = list(flat)
        wiggle[11] = 2.0 + 0.01 * (seed + 1)
        naive, smet = list(flat), list(flat)
        naive[11] += naive_spike * (1 + 0.1 * seed)
        smet[11] += smet_spike
        updates = {10: 4, 20: 0}
        _write_run(root, RunSpec("tiny", "adamw", None, None, seed), wiggle, val_loss=2.0 + 0.01 * seed)
        _write_run(root, RunSpec("tiny", "naive-dst", 0.5, 0.0, seed), naive, updates, val_loss=2.3 + 0.01 * seed)
        _write_run(root, RunSpec("tiny", "smet-linear", 0.5, 1.0, seed), smet, updates, val_loss=2.1 + 0.01 * seed)


def study_findings(root, probes=False) -> list[str]:
    """The findings the report states for the study in ``root``; with ``probes``, the update-probe ones too."""
    data = load_study(root)
    extra = (stability.probe_table(data), stability.stats.probe_events(data)) if probes else ()
    return stability.findings(data, spike_events(data), quality_table(data), *extra)
