"""Stability-study tooling (bench/stability/): sweep enumeration, resume, spike statistics, report rendering."""

import argparse
import dataclasses
import gzip
import json
import math

import pandas as pd
import pytest
import torch
from conftest import usage_error

from bench import stability
from bench.cli import main as bench_main
from bench.stability import sweep
from bench.stability import (
    PRESETS,
    RunSpec,
    enumerate_runs,
    load_study,
    quality_table,
    run_sweep,
    spike_events,
    spike_table,
    write_report,
)
from bench.stability.cli import RUN_OPTIONS


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory, monkeypatch):
    """The tokenised corpus cache (and matplotlib's font cache, read when the plots first import it) in the session's
    temporary folder, not in the home directory."""
    path = tmp_path_factory.getbasetemp() / "smet_cache"
    monkeypatch.setenv("SMET_CACHE_DIR", str(path))
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path_factory.getbasetemp() / "matplotlib"))
    return path


def test_h100_sweep_enumerates_every_method_density_alpha_seed():
    spec = PRESETS["h100"]
    runs = enumerate_runs(spec)
    # adamw, galore, masked-dst x d, naive-dst and warmup-only x d (alpha 0), density-lr-only x d x (alpha > 0),
    # 2 SMET warm-ups x d x alpha
    per_config_seed = 1 + 1 + 3 + 3 + 3 + 3 * 2 + 2 * 3 * 3
    assert len(runs) == per_config_seed * len(spec.configs) * len(spec.seeds)
    assert len({(r.config, r.name) for r in runs}) == len(runs)
    assert spec.tokens_per_run >= 50_000_000
    assert RunSpec("20m", "adamw", None, None, 0) in runs
    assert RunSpec("60m", "naive-dst", 0.1, 0.0, 1) in runs and RunSpec("60m", "naive-dst", 0.1, 0.5, 1) not in runs
    assert RunSpec("60m", "density-lr-only", 0.1, 0.5, 1) in runs and RunSpec("20m", "warmup-only", 0.5, 0.0, 0) in runs
    assert RunSpec("20m", "masked-dst", 0.25, None, 0) in runs
    assert not any(r.method == "masked-dst" and r.alpha is not None for r in runs)
    configs = [r.train_config(spec, "out") for r in runs]
    for run, config in zip(runs, configs):  # same data, seed list and token budget for every method
        assert (config.max_steps, config.batch_size, config.seq_len, config.data) == (4000, 64, 256, "stdlib")
        assert config.out_dir.endswith(f"runs/{run.config}/{run.name}")
        config.validate()
    naive = next(c for r, c in zip(runs, configs) if r.method == "naive-dst")
    ramp = next(c for r, c in zip(runs, configs) if r.method == "smet-momentum_ramp")
    assert naive.optimizer == "naive-dst" and ramp.optimizer == "smet" and ramp.warmup_mode == "momentum_ramp"
    assert RunSpec("20m", "smet-linear", 0.25, 0.5, 1).name == "smet-linear-d0.25-a0.5-s1"


def test_study_blocks_move_at_the_lowest_density():
    """Every sparse layer must trade >= 1 block at the first update, else the spike study measures nothing."""
    from smet_kernels.prune_regrow import blocks_to_move
    from smet_kernels.train.model import model_config

    spec = PRESETS["h100"]
    for config in spec.configs:
        block = spec.block_sizes[config]
        shape = model_config(config, 256, block)
        zeta = 0.005 + (spec.prune_fraction - 0.005) * (1 + math.cos(math.pi * spec.update_interval / spec.steps)) / 2
        for out_f, in_f in ((shape.hidden_size, shape.hidden_size), (shape.intermediate_size, shape.hidden_size)):
            nnz = round(min(spec.densities) * (out_f // block) * (in_f // block))
            assert blocks_to_move(zeta, nnz) >= 1, (config, out_f, in_f, block)


def test_spec_validation_names_the_field(capsys):
    with pytest.raises(ValueError, match="methods"):
        dataclasses.replace(PRESETS["pilot"], methods=("adamw", "sgd")).validate()
    with pytest.raises(ValueError, match="densities"):
        dataclasses.replace(PRESETS["pilot"], densities=(0.5, 1.5)).validate()
    with pytest.raises(ValueError, match="adamw"):
        dataclasses.replace(PRESETS["pilot"], methods=("smet-linear",)).validate()
    error = usage_error(bench_main, ["stability", "run", "--quick", "--densities", "0", "--dry-run"], capsys)
    assert error == "smet-bench: error: --densities must lie in (0, 1), got [0.0]"


def test_every_option_an_error_of_stability_run_names_is_an_option_of_it():
    parser = argparse.ArgumentParser()
    stability.add_arguments(parser)
    run = next(action for action in parser._actions if action.choices and "run" in action.choices).choices["run"]
    assert set(RUN_OPTIONS.values()) <= {option for action in run._actions for option in action.option_strings}


def test_the_help_of_each_option_states_the_default_that_cpu_study_gives_it(capsys):
    """``stability run --help`` names each preset that changes an option's default: ``--cpu-study`` (lr 2e-3, 3 seeds,
    3000 steps, ...) as well as ``--quick``."""
    with pytest.raises(SystemExit):
        bench_main(["stability", "run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.001; 0.002 with --quick or --cpu-study)" in text
    assert "(default: 0,1; 0,1,2 with --cpu-study)" in text
    assert "(default: 200; 10 with --quick; 100 with --cpu-study)" in text
    assert "(default: 4000; 200 with --quick; 3000 with --cpu-study)" in text


@pytest.mark.parametrize("dry_run", [False, True])
@pytest.mark.parametrize(
    "option, value, named",
    [
        ("--data", "/nonexistent", "/nonexistent"),
        ("--data", "{tmp}/empty.txt", "empty.txt"),
        ("--lr", "-1", "--lr must be in (0, inf), got -1.0"),
        ("--lr-warmup-steps", "-5", "--lr-warmup-steps must be an int >= 0, got -5"),
        ("--lr-warmup-steps", "500", "--lr-warmup-steps (500) must be < --steps (200)"),
        ("--seeds", "0,-1", "--seeds must be ints >= 0, got [-1]"),
        pytest.param("--device", "cuda", "CUDA", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA")),
    ],
)
def test_options_every_run_would_reject_fail_up_front(tmp_path, monkeypatch, capsys, option, value, named, dry_run):
    """One error line before any run starts (also for --dry-run), no commands.txt, no "render with"."""
    (tmp_path / "empty.txt").write_text("")
    monkeypatch.setattr(sweep, "_train_in_fresh_process", lambda config: pytest.fail("a run was started"))
    out_dir = tmp_path / "study"
    argv = ["stability", "run", "--quick", "--out-dir", str(out_dir), option, value.format(tmp=tmp_path)]
    error = usage_error(bench_main, argv + ["--dry-run"] * dry_run, capsys)
    assert error.startswith("smet-bench: error: ") and named in error
    assert not (out_dir / "commands.txt").exists()


def _fake_train(calls):
    def train_one(config_dict):
        calls.append(config_dict["out_dir"])
        from pathlib import Path

        out = Path(config_dict["out_dir"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text("")
        (out / "summary.json").write_text(json.dumps({"config": config_dict, "final_val_loss": 1.0}))

    return train_one


def test_finished_runs_are_skipped_and_mismatches_refused(tmp_path, monkeypatch):
    spec = dataclasses.replace(PRESETS["pilot"], methods=("adamw", "naive-dst"), densities=(0.5,), alphas=(1.0,),
                               seeds=(0,))
    calls = []
    monkeypatch.setattr(sweep, "_train_in_this_process", _fake_train(calls))
    first = run_sweep(spec, tmp_path, isolate=False, log=lambda *_: None)
    assert first == {"total": 2, "skipped": 0, "trained": 2, "failed": 0, "not_started": 0}
    calls.clear()
    more_seeds = dataclasses.replace(spec, seeds=(0, 1))
    second = run_sweep(more_seeds, tmp_path, isolate=False, log=lambda *_: None)
    assert second["skipped"] == 2 and second["trained"] == 2
    assert all(path.endswith("-s1") for path in calls)
    with pytest.raises(ValueError, match="max_steps"):
        run_sweep(dataclasses.replace(spec, steps=300), tmp_path, isolate=False, log=lambda *_: None)


def test_interrupted_run_resumes_from_its_latest_checkpoint(tmp_path, monkeypatch):
    spec = dataclasses.replace(PRESETS["pilot"], methods=("adamw",), seeds=(0,), checkpoint_every=50)
    run_dir = enumerate_runs(spec)[0].directory(tmp_path)
    from smet_kernels.train.checkpoint import write_checkpoint
    from smet_kernels.train.trainer import TrainConfig

    for step in (50, 100):  # complete checkpoints (verified against their manifests); their content is not read
        write_checkpoint(run_dir, step, {}, TrainConfig())
    resumed = []
    monkeypatch.setattr(sweep, "_train_in_this_process", lambda config: resumed.append(config["resume"]))
    counts = run_sweep(spec, tmp_path, isolate=False, log=lambda *_: None)
    assert resumed == [str(run_dir / "checkpoints" / "step_0000100")]
    assert counts["failed"] == 1  # the stub wrote no summary.json: reported, retried next time


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


def test_spike_table_on_a_known_spike(tmp_path):
    _synthetic_study(tmp_path)
    data = load_study(tmp_path)
    table, thresholds = spike_table(data)
    rows = {row["method"]: row for row in table.to_dict("records")}
    naive = rows["naive-dst"]
    assert naive["updates"] == "1/2"  # the update at step 20 moved no block
    assert naive["spikes"] is None  # one dense rise: no spread to estimate, so no noise floor to call a spike by
    assert naive["mean_rise"] == pytest.approx(0.5) and naive["max_rise"] == pytest.approx(0.5)
    assert naive["mean_rel_rise"] == pytest.approx(0.25)
    assert naive["mean_excess"] == pytest.approx(0.49)  # minus the dense wiggle at the same step
    assert rows["smet-linear"]["mean_rise"] == pytest.approx(0.0) and rows["smet-linear"]["spikes"] is None
    assert rows["adamw"]["updates"] == "1 (control)" and rows["adamw"]["mean_rise"] == pytest.approx(0.01)
    assert math.isnan(thresholds["tiny"])
    seeded = tmp_path / "seeds"
    _synthetic_study(seeded, seeds=(0, 1, 2))  # three dense rises: a noise floor
    table, thresholds = spike_table(load_study(seeded))
    rows = {row["method"]: row for row in table.to_dict("records")}
    assert thresholds["tiny"] > 0 and rows["naive-dst"]["spikes"] == 3 and rows["smet-linear"]["spikes"] == 0


def test_quality_and_findings_with_seed_noise(tmp_path):
    _synthetic_study(tmp_path, seeds=(0, 1, 2))
    data = load_study(tmp_path)
    quality = quality_table(data).set_index("method")
    assert quality.loc["naive-dst", "vs_dense"] == pytest.approx(0.3)
    assert quality.loc["smet-linear", "ppl_vs_dense"] == pytest.approx(math.exp(0.1), rel=1e-3)
    lines = "\n".join(stability.findings(data, spike_events(data), quality_table(data)))
    assert "tiny, d=0.5, α=0: +0.5" in lines and "spikes above dense: holds" in lines
    assert "smet-linear removes the spike** — naive-DST rise minus smet-linear rise: holds in 1, reversed in 0" in lines
    assert "tiny naive-dst d=0.5 (best α=0 of 1): +0.3000" in lines and "worse than dense" in lines
    assert "**Consistency check**" not in lines  # no masked-dst or warmup-only runs to check against


def test_findings_say_within_noise_when_it_is(tmp_path):
    _synthetic_study(tmp_path, seeds=(0, 1), naive_spike=0.0, smet_spike=0.0)
    lines = "\n".join(stability.findings(load_study(tmp_path), spike_events(load_study(tmp_path)),
                                         quality_table(load_study(tmp_path))))
    assert "within noise in 1" in lines


def test_report_from_short_real_runs(tmp_path):
    """Three 6-step tiny runs through the trainer (one process), then stability.md with tables and PNGs."""
    spec = dataclasses.replace(
        PRESETS["pilot"], methods=("adamw", "naive-dst", "smet-linear"), densities=(0.5,), alphas=(1.0,), seeds=(0,),
        steps=6,
        batch_size=2, seq_len=16, update_interval=2, spike_window=2, optimizer_warmup_steps=2, lr_warmup_steps=0,
        eval_every=3, eval_batches=1,
    )
    counts = run_sweep(spec, tmp_path, isolate=False, log=lambda *_: None)
    assert counts["trained"] == 3 and counts["failed"] == 0
    data = load_study(tmp_path)
    assert len(data.runs) == 3 and set(data.runs["tokens"]) == {6 * 2 * 16}
    assert len(data.updates) > 0 and (data.updates["moved"] > 0).any()
    path = write_report(tmp_path)
    text = path.read_text()
    for heading in ("CPU pilot, not the H100 study", "## Reproduce", "## What was measured (no verdict)",
                    "## Loss spikes per topology update", "## Final validation loss and perplexity",
                    "## Peak memory and throughput per run", "stability_val_loss_tiny.png"):
        assert heading in text
    assert (tmp_path / "stability_val_loss_tiny.png").stat().st_size > 1000
    assert (tmp_path / "stability_spikes_tiny.png").stat().st_size > 1000
    assert "naive-dst" in text and "smet-linear" in text


def test_report_command_on_synthetic_runs(tmp_path, capsys):
    _synthetic_study(tmp_path, seeds=(0, 1))
    assert bench_main(["stability", "report", "--out-dir", str(tmp_path)]) == 0
    text = (tmp_path / "stability.md").read_text()
    assert "CPU pilot" in text and "smet-bench stability report --out-dir" in text
    (tmp_path / "empty").mkdir()
    error = usage_error(bench_main, ["stability", "report", "--out-dir", str(tmp_path / "empty")], capsys)
    assert error.startswith("smet-bench: error: no finished runs under ")
    for out_dir in (tmp_path / "stability.md", tmp_path / "missing"):  # a file, nothing
        error = usage_error(bench_main, ["stability", "report", "--out-dir", str(out_dir)], capsys)
        assert error == f"smet-bench: error: --out-dir '{out_dir}' is not a folder"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_h100_preset_settings_train_on_the_gpu(tmp_path):
    """A few steps of every method with the H100 preset's settings (20m, Triton backend) on the GPU."""
    spec = dataclasses.replace(PRESETS["h100"], configs=("20m",), densities=(0.1,), alphas=(1.0,), seeds=(0,),
                               steps=8, update_interval=2, spike_window=2, lr_warmup_steps=0, eval_every=4,
                               eval_batches=1, checkpoint_every=4)
    counts = run_sweep(spec, tmp_path, log=lambda *_: None)
    assert counts["failed"] == 0 and counts["trained"] == len(enumerate_runs(spec))
    data = load_study(tmp_path)
    first_update = data.updates[data.updates["step"] == 2]
    assert len(first_update) == 4 and (first_update["moved"] > 0).all()  # masked, naive, 2 x smet
    assert set(data.runs["peak_mem_kind"]) == {"cuda_max_memory_allocated"}
    assert not any((tmp_path / "runs").glob("*/*/checkpoints"))
    write_report(tmp_path)


def test_spike_verdicts_count_seeds_not_updates(tmp_path):
    """Updates of one run are not independent samples: one seed gives no noise estimate, however many updates."""
    _synthetic_study(tmp_path, seeds=(0,))
    data = load_study(tmp_path)
    lines = "\n".join(stability.findings(data, spike_events(data), quality_table(data)))
    assert "in 1 seed (seed means compared) — one sample only" in lines
    assert "spikes above dense: holds" not in lines


def test_ablation_arms_and_update_probe_reach_the_findings(tmp_path):
    """Warm-up only removes the cold-start rise, density-LR only does not; prune damage is the same for both."""
    for seed in (0, 1, 2):
        flat = [2.0] * 30
        noise = 0.01 * seed
        _write_run(tmp_path, RunSpec("tiny", "adamw", None, None, seed), flat, probes=[(10, 0.0, -0.01, 1.0)])
        for method, cold, ratio in (("naive-dst", 0.3, 3.0), ("warmup-only", 0.0, 0.01),
                                    ("density-lr-only", 0.3 + noise, 3.0)):
            alpha = 1.0 if method == "density-lr-only" else 0.0
            _write_run(tmp_path, RunSpec("tiny", method, 0.5, alpha, seed), flat, {10: 4},
                       probes=[(10, 0.05 + noise, cold + noise, ratio)])
    data = load_study(tmp_path)
    table = stability.probe_table(data).set_index("method")
    assert table.loc["naive-dst", "cold_start_rise"] == pytest.approx(0.31)
    assert table.loc["warmup-only", "regrown_vs_surviving_1"] == pytest.approx(0.01)
    assert table.loc["adamw", "prune_damage"] == 0.0 and table.loc["naive-dst", "updates"] == 3
    lines = "\n".join(stability.findings(data, spike_events(data), quality_table(data), stability.probe_table(data),
                                         stability.stats.probe_events(data)))
    assert ("**warmup-only removes the cold-start rise** — naive-DST cold start rise minus warmup-only cold start "
            "rise: holds in 1") in lines
    assert "**density-lr-only removes the cold-start rise**" in lines and "tiny, d=0.5, α=1 (naive α=0)" in lines
    assert "prune damage, tiny d=0.5 naive-dst α=0: +0.0600" in lines
    assert "naive-dst α=0 3.00× (3×1)" in lines
    assert "warmup-only removes the cold-start rise of naive DST (cold start rise): reproduces — holds in 1" in lines
    assert "density-lr-only removes the cold-start rise of naive DST (cold start rise): does NOT reproduce" in lines


def test_report_names_the_gpu_command_of_the_same_sweep(tmp_path):
    _synthetic_study(tmp_path, seeds=(0,))
    spec = dataclasses.replace(PRESETS["cpu"], seeds=(0, 1, 2))
    (tmp_path / "study.json").write_text(json.dumps(spec.to_dict()))
    text = write_report(tmp_path).read_text()
    command = stability.gpu_command(spec.to_dict())
    assert command in text and "--configs 20m,60m" in command and "--alphas 0,0.5,1" in command
    assert "--methods adamw,naive-dst,warmup-only,density-lr-only,smet-linear" in command
    on_this_machine = command.replace("--device cuda", "--device cpu").split()[3:]  # the options parse and validate
    assert bench_main(["stability", "run", *on_this_machine, "--dry-run"]) == 0


def test_cpu_study_moves_blocks_at_every_density():
    """Every sparse layer trades >= 1 block at every update of the CPU study (released rule, b = 16)."""
    from smet_kernels.layout import nnz_for_density
    from smet_kernels.prune_regrow import blocks_to_move
    from smet_kernels.train.model import model_config

    spec = PRESETS["cpu"]
    assert spec.steps >= 3000 and len(spec.seeds) >= 3 and 100 <= spec.update_interval <= 200
    for config in spec.configs:
        block = spec.block_sizes[config]
        shape = model_config(config, 256, block)
        for out_f, in_f in ((shape.hidden_size, shape.hidden_size), (shape.intermediate_size, shape.hidden_size)):
            for density in spec.densities:
                nnz = nnz_for_density((out_f // block) * (in_f // block), density)
                assert blocks_to_move(0.005, nnz) >= 1, (config, out_f, in_f, density)


def test_the_interval_is_students_t_with_n_minus_one_degrees_of_freedom_and_the_sample_sd():
    """Differences 1, 2, 3: mean 2, sd 1 (n − 1), half-width t(0.975, df=2) · 1/√3 = 4.303/√3 = 2.4843 > 2, so
    within noise (a z-interval, 1.960/√3 = 1.13, or df = n, 3.182/√3 = 1.84, would call it a difference)."""
    mean, half_width, verdict = stability.stats.compare([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    assert mean == 2.0 and half_width == pytest.approx(4.303 / math.sqrt(3), rel=1e-12) and verdict == "within noise"
    assert stability.stats.compare([2.0, 3.0, 4.0], [0.0, 0.0, 0.0])[2] == "a > b"  # 3 > 2.4843
    assert stability.stats.compare([0.0, 0.0, 0.0], [2.0, 3.0, 4.0])[2] == "a < b"


def test_the_t_quantile_between_table_entries_is_the_conservative_lower_df_one():
    quantile = stability.stats.t_quantile_975
    assert [quantile(df) for df in (1, 2, 10, 11, 13, 16, 121, 999, 1000)] == [
        12.706, 4.303, 2.228, 2.228, 2.179, 2.131, 1.980, 1.980, 1.960]


def test_identical_samples_are_within_noise_and_a_constant_nonzero_difference_is_not():
    """A zero-width interval at 0 does not exclude 0 (``|mean| <= half-width``); a constant offset has a zero-width
    interval away from 0."""
    assert stability.stats.compare([2.5, 2.25], [2.5, 2.25]) == (0.0, 0.0, "within noise")
    assert stability.stats.compare([0.5, 0.5, 0.5], [0.25, 0.25, 0.25]) == (0.25, 0.0, "a > b")


def test_noise_threshold_is_mean_plus_two_sample_sds_of_the_dense_rises(tmp_path):
    _synthetic_study(tmp_path, seeds=(0, 1, 2))  # dense rises 0.01, 0.02, 0.03: mean 0.02, sd (n − 1) 0.01
    _, thresholds = spike_table(load_study(tmp_path))
    assert thresholds["tiny"] == pytest.approx(0.02 + 2 * 0.01, rel=1e-6)


def test_quality_table_and_its_sentence_give_the_paired_mean_its_standard_error_and_t_interval(tmp_path):
    """naive − dense final losses 0.1, 0.3, 0.2 over three seeds: mean 0.2, sd 0.1, SE 0.1/√3, CI ± 4.303·0.1/√3."""
    flat = [2.0] * 30
    for seed, naive_loss in zip((0, 1, 2), (2.1, 2.3, 2.2)):
        _write_run(tmp_path, RunSpec("tiny", "adamw", None, None, seed), flat, val_loss=2.0)
        _write_run(tmp_path, RunSpec("tiny", "naive-dst", 0.5, 0.0, seed), flat, {10: 4}, val_loss=naive_loss)
    data = load_study(tmp_path)
    quality = quality_table(data).set_index("method")
    assert quality.loc["naive-dst", "vs_dense"] == pytest.approx(0.2)
    assert quality.loc["naive-dst", "vs_dense_se"] == pytest.approx(0.1 / math.sqrt(3))
    assert quality.loc["naive-dst", "val_loss_sd"] == pytest.approx(0.1)
    lines = "\n".join(stability.findings(data, spike_events(data), quality_table(data)))
    assert f"tiny naive-dst d=0.5 (best α=0 of 1): +0.2000 ± {4.303 * 0.1 / math.sqrt(3):.4f} (95% CI)" in lines
    assert "— within noise" in lines.split("tiny naive-dst d=0.5 (best α=0 of 1)")[1].splitlines()[0]


def _two_density_study(root):
    """Naive DST spikes by 0.5 (+ 0.05 per seed) after the update at d=0.5 and not at all at d=0.25; dense wiggles
    by 0.01 (seed + 1) at the same step; three seeds."""
    for seed in (0, 1, 2):
        flat = [2.0] * 30
        wiggle = list(flat)
        wiggle[11] += 0.01 * (seed + 1)
        spiking = list(flat)
        spiking[11] += 0.5 + 0.05 * seed
        _write_run(root, RunSpec("tiny", "adamw", None, None, seed), wiggle)
        _write_run(root, RunSpec("tiny", "naive-dst", 0.5, 0.0, seed), spiking, {10: 4})
        _write_run(root, RunSpec("tiny", "naive-dst", 0.25, 0.0, seed), flat, {10: 4})


def test_a_claim_that_holds_in_one_of_two_settings_and_is_within_noise_in_the_other_reproduces_in_part(tmp_path):
    _two_density_study(tmp_path)
    data = load_study(tmp_path)
    lines = stability.findings(data, spike_events(data), quality_table(data))
    assert ("  - naive DST's loss rises more than dense after topology updates: reproduces in part — holds in 1, "
            "reversed in 0 of 2 measurable settings") in lines
    assert any(line.startswith("  - tiny, d=0.5, α=0: +0.5300") and line.endswith("spikes above dense: holds")
               for line in lines)
    assert any(line.startswith("  - tiny, d=0.25, α=0: -0.0200") and line.endswith("within noise") for line in lines)


def test_a_claim_within_noise_everywhere_is_measurable_and_does_not_reproduce(tmp_path):
    _synthetic_study(tmp_path, seeds=(0, 1), naive_spike=0.0, smet_spike=0.0)
    data = load_study(tmp_path)
    lines = stability.findings(data, spike_events(data), quality_table(data))
    assert ("  - naive DST's loss rises more than dense after topology updates: does NOT reproduce at this scale — "
            "holds in 0, reversed in 0 of 1 measurable settings") in lines


def test_two_updates_of_one_seed_are_one_sample_not_two(tmp_path):
    """Both updates move blocks and both spike: still one seed, so no noise estimate and no verdict."""
    flat = [2.0] * 30
    spiking = list(flat)
    spiking[11] += 0.5
    spiking[21] += 0.6
    _write_run(tmp_path, RunSpec("tiny", "adamw", None, None, 0), flat)
    _write_run(tmp_path, RunSpec("tiny", "naive-dst", 0.5, 0.0, 0), spiking, {10: 4, 20: 4})
    data = load_study(tmp_path)
    lines = "\n".join(stability.findings(data, spike_events(data), quality_table(data)))
    assert "tiny, d=0.5, α=0: +0.5500 over 2 updates in 1 seed (seed means compared) — one sample only" in lines
    assert "spikes above dense: holds" not in lines


def test_best_alpha_density_lr_and_default_sentences_say_which_side_is_worse(tmp_path):
    """smet-linear at α=0 ends 0.10, 0.12, 0.11 above dense, at α=1 0.20, 0.23, 0.21: the best α is 0
    (+0.11 ± 4.303·0.01/√3 above dense: worse than dense); α=1 − α=0 is 0.10, 0.11, 0.10
    (+0.1033 ± 4.303·0.00577/√3 = 0.0143: α=1 is worse), and the library default (smet-linear, α=1) is that same
    comparison against the best (the default is worse)."""
    flat = [2.0] * 30
    for seed, low, high in zip((0, 1, 2), (2.10, 2.12, 2.11), (2.20, 2.23, 2.21)):
        _write_run(tmp_path, RunSpec("tiny", "adamw", None, None, seed), flat, val_loss=2.0)
        _write_run(tmp_path, RunSpec("tiny", "smet-linear", 0.5, 0.0, seed), flat, {10: 4}, val_loss=low)
        _write_run(tmp_path, RunSpec("tiny", "smet-linear", 0.5, 1.0, seed), flat, {10: 4}, val_loss=high)
    data = load_study(tmp_path)
    lines = stability.findings(data, spike_events(data), quality_table(data))
    best_ci, alpha_ci = 4.303 * 0.01 / math.sqrt(3), 4.303 * math.sqrt(1 / 3) * 0.01 / math.sqrt(3)
    assert (f"  - tiny smet-linear d=0.5 (best α=0 of 2): +0.1100 ± {best_ci:.4f} (95% CI), ppl × "
            f"{math.exp(0.11):.3f} — worse than dense") in lines
    assert f"  - tiny smet-linear d=0.5: +0.1033 ± {alpha_ci:.4f} (95% CI) — α=1 is worse" in lines
    assert (f"  - tiny d=0.5: smet-linear α=0 (val loss 2.1100); default − best +0.1033 ± {alpha_ci:.4f} (95% CI): "
            "the default is worse") in lines


def test_a_pair_without_a_final_loss_is_no_agreement_in_the_consistency_check(tmp_path):
    flat = [2.0] * 12
    for seed, masked_loss in ((0, 2.0004), (1, float("nan"))):  # the NaN gap after a finite one
        _write_run(tmp_path, RunSpec("tiny", "naive-dst", 0.5, 0.0, seed), flat, val_loss=2.0)
        _write_run(tmp_path, RunSpec("tiny", "masked-dst", 0.5, None, seed), flat, val_loss=masked_loss)
    data = load_study(tmp_path)
    lines = "\n".join(stability.findings(data, spike_events(data), quality_table(data)))
    assert "largest final-loss gap nan over 2 pairs (they DISAGREE: investigate)" in lines


def test_a_pair_without_a_final_loss_has_no_verdict_and_is_not_better_than_dense(tmp_path):
    """A NaN difference gave a NaN mean and interval, and ``NaN > 0`` is False: the verdict was 'a < b'."""
    flat = [2.0] * 12
    for seed, naive_loss in ((0, 2.1), (1, float("nan")), (2, 2.2)):
        _write_run(tmp_path, RunSpec("tiny", "adamw", None, None, seed), flat, val_loss=2.0)
        _write_run(tmp_path, RunSpec("tiny", "naive-dst", 0.5, 0.0, seed), flat, val_loss=naive_loss)
    data = load_study(tmp_path)
    lines = "\n".join(stability.findings(data, spike_events(data), quality_table(data)))
    assert "tiny naive-dst d=0.5 (best α=0 of 1): n/a" in lines and "better than dense" not in lines
    assert "a run without a finite value: no verdict" in lines
    assert stability.stats.compare([1.0, float("inf")], [0.0, 0.0])[2] == "not finite"


def test_an_alpha_with_a_seed_without_a_final_loss_is_not_the_best_alpha(tmp_path):
    """pandas' mean skips NaN: α=0 (2.10, NaN, 2.12) averaged 2.11 over the two seeds that ended and beat α=1."""
    flat = [2.0] * 12
    for seed, low, high in zip((0, 1, 2), (2.10, float("nan"), 2.12), (2.15, 2.16, 2.17)):
        _write_run(tmp_path, RunSpec("tiny", "adamw", None, None, seed), flat, val_loss=2.0)
        _write_run(tmp_path, RunSpec("tiny", "smet-linear", 0.5, 0.0, seed), flat, val_loss=low)
        _write_run(tmp_path, RunSpec("tiny", "smet-linear", 0.5, 1.0, seed), flat, val_loss=high)
    data = load_study(tmp_path)
    quality = quality_table(data)
    assert quality[quality["alpha"] == 0.0][["val_loss", "val_loss_sd", "ppl"]].isna().all(axis=None)
    lines = "\n".join(stability.findings(data, spike_events(data), quality))
    assert "tiny smet-linear d=0.5 (best α=1 of 2): +0.1600" in lines
    assert "tiny d=0.5: smet-linear α=1 (val loss 2.1600); the default is best" in lines


def test_an_arm_pairs_with_naive_dst_at_its_own_alpha_else_at_the_smallest_one_naive_dst_ran():
    """The smallest is α = 0, the paper's naive DST; where naive DST did not run at all, the arm's own α."""
    from bench.stability.findings import NAIVE, naive_alpha

    runs = [{"config": "tiny", "method": NAIVE, "density": 0.5, "alpha": alpha} for alpha in (2.0, 0.0, 1.0)]
    runs.append({"config": "tiny", "method": "masked-dst", "density": 0.25, "alpha": 3.0})
    runs = pd.DataFrame(runs)
    assert naive_alpha(runs, "tiny", 0.5, 1.0) == 1.0
    assert naive_alpha(runs, "tiny", 0.5, 0.5) == 0.0
    assert naive_alpha(runs, "tiny", 0.25, 0.5) == 0.5


@pytest.mark.parametrize("gap, verdict", [(5e-4, "agree"), (5e-3, "they DISAGREE: investigate")])
def test_the_consistency_check_calls_a_final_loss_gap_of_1e_3_or_more_a_disagreement(tmp_path, gap, verdict):
    """naive DST at α = 0 and masked DST apply the same update: final losses within 1e-3 agree, beyond it do not."""
    flat = [2.0] * 12
    for seed in (0, 1):
        _write_run(tmp_path, RunSpec("tiny", "naive-dst", 0.5, 0.0, seed), flat, val_loss=2.0 + 0.01 * seed)
        _write_run(tmp_path, RunSpec("tiny", "masked-dst", 0.5, None, seed), flat, val_loss=2.0 + 0.01 * seed + gap)
    data = load_study(tmp_path)
    lines = "\n".join(stability.findings(data, spike_events(data), quality_table(data)))
    assert f"largest final-loss gap {gap:.2e} over 2 pairs ({verdict})" in lines


def test_the_prune_damage_of_one_seed_has_no_interval_and_of_two_seeds_a_t_interval(tmp_path):
    """One seed: no spread, so no interval (never ±0). Two seeds, damage 0.2 and 0.3: mean 0.25, sample sd 0.0707,
    interval ± 12.706 · 0.0707 / √2 = 0.6353 (t with 1 degree of freedom)."""
    lines = {}
    for seeds in ((0,), (0, 1)):
        root = tmp_path / str(len(seeds))
        for seed in seeds:
            _write_run(root, RunSpec("tiny", "adamw", None, None, seed), [2.0] * 20)
            _write_run(root, RunSpec("tiny", "naive-dst", 0.5, 0.0, seed), [2.0] * 20, {10: 4},
                       probes=[(10, 0.2 + 0.1 * seed, 0.1, 3.0)])  # fmt: skip
        data = load_study(root)
        found = stability.findings(data, spike_events(data), quality_table(data), stability.probe_table(data),
                                   stability.stats.probe_events(data))  # fmt: skip
        lines[len(seeds)] = [line for line in found if line.startswith("  - prune damage,")]
    assert lines[1] == ["  - prune damage, tiny d=0.5 naive-dst α=0: +0.2000"]
    assert lines[2] == ["  - prune damage, tiny d=0.5 naive-dst α=0: +0.2500 ± 0.6353 (95% CI)"]


def test_a_cold_start_at_updates_that_moved_no_block_is_not_measurable_rather_than_a_verdict(tmp_path):
    """At d=0.1 no update moved a block: no block was regrown, so there is no cold start to remove (the spike
    comparison already says so); the probe rows of those updates must not yield a cold-start verdict either."""
    for seed in (0, 1, 2):
        flat, noise = [2.0] * 30, 0.01 * seed
        _write_run(tmp_path, RunSpec("tiny", "adamw", None, None, seed), flat, probes=[(10, 0.0, 0.0, None)])
        for method, cold in (("naive-dst", 0.3), ("warmup-only", 0.0)):
            _write_run(tmp_path, RunSpec("tiny", method, 0.1, 0.0, seed), flat, {10: 0},
                       probes=[(10, 0.0, cold + noise, None)])
    data = load_study(tmp_path)
    lines = stability.findings(data, spike_events(data), quality_table(data), stability.probe_table(data),
                               stability.stats.probe_events(data))
    assert ("  - warmup-only removes the cold-start rise of naive DST (cold start rise): not measurable here — holds "
            "in 0, reversed in 0 of 0 measurable settings") in lines
    assert not any(line.startswith("  - cold-start rise, tiny d=0.1") for line in lines)
    assert set(stability.probe_table(data)["method"]) == {"adamw"}


def test_an_update_at_the_last_step_has_no_cold_start_and_is_not_counted_among_the_updates_compared(tmp_path):
    """The update at the final step (30) has no steps after it: its probe has a prune damage but neither a cold-start
    rise nor a first step, so the cold-start and first-step sentences count one update per seed, not two."""
    for seed in (0, 1, 2):
        flat, noise = [2.0] * 30, 0.01 * seed
        _write_run(tmp_path, RunSpec("tiny", "adamw", None, None, seed), flat)
        for method, cold, ratio in (("naive-dst", 0.3, 3.0), ("warmup-only", 0.0, 0.01)):
            _write_run(tmp_path, RunSpec("tiny", method, 0.5, 0.0, seed), flat, {10: 4, 30: 4},
                       probes=[(10, 0.05, cold + noise, ratio), (30, 0.05, None, None)])
    data = load_study(tmp_path)
    lines = "\n".join(stability.findings(data, spike_events(data), quality_table(data), stability.probe_table(data),
                                         stability.stats.probe_events(data)))
    cold_start = lines.split("**warmup-only removes the cold-start rise**")[1].splitlines()[1]
    assert cold_start.startswith("  - tiny, d=0.5, α=0: +0.3000") and "over 3 updates in 3 seeds" in cold_start
    assert "naive-dst α=0 3.00× (3×1); warmup-only α=0 0.01× (3×1)" in lines


def test_a_setting_without_a_naive_dst_or_dense_run_to_pair_with_is_not_said_to_have_moved_no_block(tmp_path):
    """smet-linear ran at d=0.5 and d=0.25, naive DST at d=0.5 only, and the dense run of the only seed is missing:
    every update moved blocks, so 'no update moved a block' would be false; the sentence names the missing run."""
    flat = [2.0] * 30
    for density in (0.5, 0.25):
        _write_run(tmp_path, RunSpec("tiny", "smet-linear", density, 0.0, 0), flat, {10: 4})
    _write_run(tmp_path, RunSpec("tiny", "naive-dst", 0.5, 0.0, 0), flat, {10: 4})
    data = load_study(tmp_path)
    lines = stability.findings(data, spike_events(data), quality_table(data))
    assert "  - tiny, d=0.25, α=0: no finished naive-dst run at α=0 here — nothing to compare" in lines
    assert "  - tiny, d=0.5, α=0: no finished adamw run here — nothing to compare" in lines
    assert not any("no update moved a block" in line for line in lines)


def test_the_perplexity_ratio_to_dense_is_over_the_seeds_paired_with_a_dense_run(tmp_path):
    """The dense run of seed 2 is missing: the loss difference is over seeds 0 and 1, and so must be the perplexity
    ratio (with seed 2's 3.0 in the numerator only it read exp(~0.57) instead of exp(0.1))."""
    flat = [2.0] * 12
    for seed, loss in ((0, 2.1), (1, 2.1), (2, 3.0)):
        if seed < 2:
            _write_run(tmp_path, RunSpec("tiny", "adamw", None, None, seed), flat, val_loss=2.0)
        _write_run(tmp_path, RunSpec("tiny", "naive-dst", 0.5, 0.0, seed), flat, val_loss=loss)
    quality = quality_table(load_study(tmp_path)).set_index("method")
    assert quality.loc["naive-dst", "vs_dense"] == pytest.approx(0.1)
    assert quality.loc["naive-dst", "ppl_vs_dense"] == pytest.approx(math.exp(0.1))


def test_the_best_alpha_is_chosen_on_the_seeds_every_alpha_finished(tmp_path):
    """α=1 ends lower than α=0 on both seeds α=0 finished (2.12 < 2.15, 2.13 < 2.16); its mean over three seeds,
    with the hard seed 2 (2.40) that α=0 did not finish, was higher, and α=0 was named the best α."""
    flat = [2.0] * 12
    for seed, low, high in zip((0, 1, 2), (2.15, 2.16, None), (2.12, 2.13, 2.40)):
        _write_run(tmp_path, RunSpec("tiny", "adamw", None, None, seed), flat, val_loss=2.0)
        if low is not None:
            _write_run(tmp_path, RunSpec("tiny", "smet-linear", 0.5, 0.0, seed), flat, val_loss=low)
        _write_run(tmp_path, RunSpec("tiny", "smet-linear", 0.5, 1.0, seed), flat, val_loss=high)
    data = load_study(tmp_path)
    lines = "\n".join(stability.findings(data, spike_events(data), quality_table(data)))
    assert "tiny smet-linear d=0.5 (best α=1 of 2): +0.2167" in lines
    assert "tiny d=0.5: smet-linear α=1 (val loss 2.2167); the default is best" in lines


def test_the_standard_error_of_the_mean_excess_is_over_seeds_not_updates(tmp_path):
    """Both seeds spike by 0.5 after the update at step 10 and by 0.7 after the one at step 20: the seed means agree
    (0.6, 0.6), so the SE is 0; over the four updates as if independent it read 0.0577. With one seed: no SE."""
    for seed in (0, 1):
        spiking = [2.0] * 30
        spiking[11] += 0.5
        spiking[21] += 0.7
        _write_run(tmp_path, RunSpec("tiny", "adamw", None, None, seed), [2.0] * 30)
        _write_run(tmp_path, RunSpec("tiny", "naive-dst", 0.5, 0.0, seed), spiking, {10: 4, 20: 4})
    table, _ = spike_table(load_study(tmp_path))
    naive = table.set_index("method").loc["naive-dst"]
    assert naive["mean_excess"] == pytest.approx(0.6) and naive["excess_se"] == pytest.approx(0.0, abs=1e-12)
    for path in (tmp_path / "runs" / "tiny").glob("*-s1"):
        for file in path.iterdir():
            file.unlink()
        path.rmdir()
    table, _ = spike_table(load_study(tmp_path))
    assert math.isnan(table.set_index("method").loc["naive-dst", "excess_se"])


def test_study_json_holds_the_grid_of_every_command_into_the_folder_not_only_the_last(tmp_path, monkeypatch):
    """The README's CPU study is three commands into one folder (the last: --methods adamw,smet-linear --alphas 0.5);
    study.json, whose grid the report's GPU command repeats, kept only the last command's methods and α."""
    from bench.stability import cli

    monkeypatch.setattr(cli, "run_sweep", lambda *args, **kwargs: {"failed": 0})
    out_dir = tmp_path / "study"
    for extra in ([], ["--methods", "adamw,masked-dst,galore,smet-momentum_ramp", "--alphas", "1.0"],
                  ["--methods", "adamw,smet-linear", "--alphas", "0.5"]):
        assert bench_main(["stability", "run", "--cpu-study", "--out-dir", str(out_dir), *extra]) == 0
    study = json.loads((out_dir / "study.json").read_text())
    assert study["methods"] == list(stability.METHODS) and study["alphas"] == [0.5, 1.0]
    assert study["densities"] == [0.5, 0.25, 0.1] and study["seeds"] == [0, 1, 2] and study["steps"] == 3000
    assert "--methods adamw,galore,masked-dst,naive-dst,warmup-only" in stability.gpu_command(study)


def test_a_naive_dst_run_at_alpha_one_from_before_the_density_lr_only_arm_loads_as_that_arm(tmp_path):
    """The CPU pilot ran naive DST at every α: its α = 1 runs are the density-LR-only arm (no warm-up, global bias
    correction, lr × d^−α), not the paper's naive DST; they must not enter the naive-DST spike claim nor be the naive
    DST an arm at α = 1 is paired with."""
    for seed in (0, 1):
        spiking = [2.0] * 30
        spiking[11] += 0.5 + 0.05 * seed
        _write_run(tmp_path, RunSpec("tiny", "adamw", None, None, seed), [2.0] * 30)
        for alpha in (0.0, 1.0):
            _write_run(tmp_path, RunSpec("tiny", "naive-dst", 0.5, alpha, seed), spiking, {10: 4})
            _write_run(tmp_path, RunSpec("tiny", "smet-linear", 0.5, alpha, seed), [2.0] * 30, {10: 4})
    data = load_study(tmp_path)
    runs = data.runs.set_index("path")
    assert runs.loc["runs/tiny/naive-dst-d0.5-a1-s0", ["method", "alpha"]].tolist() == ["density-lr-only", 1.0]
    assert runs.loc["runs/tiny/naive-dst-d0.5-a0-s0", ["method", "alpha"]].tolist() == ["naive-dst", 0.0]
    lines = stability.findings(data, spike_events(data), quality_table(data))
    naive = lines[lines.index(next(line for line in lines if line.startswith("**Naive DST"))) + 1:]
    assert naive[0].startswith("  - tiny, d=0.5, α=0: +0.5") and not naive[1].startswith("  - tiny, d=0.5, α=1")
    assert any(line.startswith("  - tiny, d=0.5, α=1 (naive α=0): +0.5") for line in lines)
    assert "**density-lr-only removes the spike**" in "\n".join(lines)


def test_a_pilot_report_gives_no_verdict_that_its_banner_disowns_and_a_study_still_does(tmp_path):
    """The pilot's banner says its numbers are no evidence for or against the claims: its findings name the side of 0
    of each interval, never 'reproduces', 'holds', 'worse than dense' or 'α=… is better'."""
    _synthetic_study(tmp_path, seeds=(0, 1, 2))  # naive DST spikes, smet-linear does not: every claim holds
    text = write_report(tmp_path).read_text()
    assert "CPU pilot, not the H100 study" in text
    measured = text.split("## What was measured (no verdict)")[1].split("\n## ")[0]
    for verdict in ("reproduce", "holds", "does not hold", "worse than dense", "better than dense", "is better"):
        assert verdict not in measured
    assert ("  - smet-linear removes the spike of naive DST (rise): interval on the claim's side of 0 in 1, on the "
            "other side in 0 of 1 measurable settings") in measured
    assert "over 3 updates in 3 seeds (seed means compared) — interval above 0" in measured
    data = load_study(tmp_path)
    study = "\n".join(stability.findings(data, spike_events(data), quality_table(data)))
    assert "smet-linear removes the spike of naive DST (rise): reproduces — holds in 1" in study
    assert "spikes above dense: holds" in study and "worse than dense" in study


def test_the_probe_table_counts_the_updates_its_cold_start_and_first_step_means_cover(tmp_path):
    """Updates at steps 10 and 30 (the final step) in each of three seeds: the prune damage is a mean over the 6
    updates probed, the cold start and first step over the 3 with steps after them, as in the findings' counts; the
    table said 6 beside means over 3."""
    for seed in (0, 1, 2):
        flat = [2.0] * 30
        _write_run(tmp_path, RunSpec("tiny", "adamw", None, None, seed), flat,
                   probes=[(10, 0.0, 0.01, None), (30, 0.0, None, None)])
        spiking = list(flat)
        spiking[11] += 0.3
        _write_run(tmp_path, RunSpec("tiny", "naive-dst", 0.5, 0.0, seed), spiking, {10: 4, 30: 4}, val_loss=2.3,
                   probes=[(10, 0.05, 0.3, 3.0), (30, 0.15, None, None)])
    data = load_study(tmp_path)
    table = stability.probe_table(data).set_index("method")
    assert table.loc["naive-dst", ["updates", "with_steps_after", "first_steps"]].tolist() == [6, 3, 3]
    assert table.loc["adamw", ["updates", "with_steps_after", "first_steps"]].tolist() == [6, 3, 0]
    assert table.loc["naive-dst", "prune_damage"] == pytest.approx(0.1)
    assert table.loc["naive-dst", "cold_start_rise"] == pytest.approx(0.3)
    text = write_report(tmp_path).read_text()
    assert "| seeds   | updates   | after   | damage   | cold start   |" in text
    assert "| 3       | 6         | 3       | +0.1000  | +0.3000      |" in text
