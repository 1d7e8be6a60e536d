"""Stability-study tooling (bench/stability/), the report: the spike, quality and probe tables and their statistics
(Student-t intervals over seeds, the dense noise floor, paired means and standard errors), and stability.md with its
plots, rendered by ``smet-bench stability report`` from synthetic runs and from short real runs of the trainer."""

import dataclasses
import json
import math

import pytest
from conftest import usage_error

from bench import stability
from bench.cli import main as bench_main
from bench.stability import (
    PRESETS,
    RunSpec,
    load_study,
    quality_table,
    run_sweep,
    spike_events,
    spike_table,
    write_report,
)
from stability_runs import _synthetic_study, _write_run, cache_dir, study_findings  # noqa: F401 -- cache_dir: autouse


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


def test_noise_threshold_is_mean_plus_two_sample_sds_of_the_dense_rises(tmp_path):
    _synthetic_study(tmp_path, seeds=(0, 1, 2))  # dense rises 0.01, 0.02, 0.03: mean 0.02, sd (n − 1) 0.01
    _, thresholds = spike_table(load_study(tmp_path))
    assert thresholds["tiny"] == pytest.approx(0.02 + 2 * 0.01, rel=1e-6)


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


def test_the_mean_excess_is_the_mean_of_the_seed_means_its_standard_error_and_the_findings_are_over(tmp_path):
    """Seed 0 spikes by 0.5 and 0.9 after two updates, seed 1 by 0.5 after its one update that moved blocks: seed means
    0.7 and 0.5, so the mean excess is 0.6 (as in the findings) with SE sd(0.7, 0.5)/√2 = 0.1, not the mean over the
    three updates (0.6333) nor an SE over them; the largest rise is 0.9."""
    for seed, updates in ((0, {10: 4, 20: 4}), (1, {10: 4, 20: 0})):
        spiking = [2.0] * 30
        spiking[11] += 0.5
        spiking[22] += 0.9 if seed == 0 else 0.0
        _write_run(tmp_path, RunSpec("tiny", "adamw", None, None, seed), [2.0] * 30)
        _write_run(tmp_path, RunSpec("tiny", "naive-dst", 0.5, 0.0, seed), spiking, updates)
    data = load_study(tmp_path)
    table, _ = spike_table(data)
    naive = table.set_index("method").loc["naive-dst"]
    assert naive["mean_excess"] == pytest.approx(0.6) and naive["excess_se"] == pytest.approx(0.1)
    assert naive["max_rise"] == pytest.approx(0.9) and naive["updates"] == "3/4"
    lines = study_findings(tmp_path)
    assert any(line.startswith("  - tiny, d=0.5, α=0: +0.6000 ± ") for line in lines)


def test_a_dense_runs_rise_and_relative_rise_at_an_update_step_are_the_trainers_for_the_same_curve(tmp_path):
    """The loss is 2.3 at the update (step 10) and 2.4 two steps later: before = mean(2.0, 2.0, 2.3) = 2.1 over the
    window ending at the update, rise 0.3, relative rise 0.3/2.1, for the dense control as for naive DST's record."""
    curve = [2.0] * 30
    curve[9], curve[11] = 2.3, 2.4
    _write_run(tmp_path, RunSpec("tiny", "adamw", None, None, 0), curve)
    _write_run(tmp_path, RunSpec("tiny", "naive-dst", 0.5, 0.0, 0), curve, {10: 4})
    table = spike_table(load_study(tmp_path))[0].set_index("method")
    for method in ("adamw", "naive-dst"):
        assert table.loc[method, "mean_rise"] == pytest.approx(0.3)
        assert table.loc[method, "mean_rel_rise"] == pytest.approx(0.3 / 2.1)
    assert table.loc["naive-dst", "mean_excess"] == pytest.approx(0.0, abs=1e-12)


def test_a_dense_run_is_measured_at_the_update_steps_of_its_own_seed(tmp_path):
    """Naive DST of seed 0 moved blocks at step 10, of seed 1 at step 20: each dense run is one control update."""
    for seed, step in ((0, 10), (1, 20)):
        _write_run(tmp_path, RunSpec("tiny", "adamw", None, None, seed), [2.0] * 30)
        _write_run(tmp_path, RunSpec("tiny", "naive-dst", 0.5, 0.0, seed), [2.0] * 30, {step: 4})
    events = spike_events(load_study(tmp_path))
    dense = events[events["method"] == "adamw"]
    assert sorted(zip(dense["seed"], dense["update_step"])) == [(0, 10), (1, 20)]
    assert spike_table(load_study(tmp_path))[0].set_index("method").loc["adamw", "updates"] == "2 (control)"


def test_a_rise_equal_to_the_noise_threshold_is_not_a_spike(tmp_path):
    """Both dense rises are 0.01: threshold 0.01 + 2·0; smet-linear rising by exactly that is not above it."""
    wiggle = [2.0] * 30
    wiggle[11] = 2.01
    for seed in (0, 1):
        _write_run(tmp_path, RunSpec("tiny", "adamw", None, None, seed), wiggle)
        _write_run(tmp_path, RunSpec("tiny", "smet-linear", 0.5, 1.0, seed), wiggle, {10: 4})
    table, thresholds = spike_table(load_study(tmp_path))
    assert thresholds["tiny"] == table.set_index("method").loc["smet-linear", "max_rise"]
    assert table["spikes"].tolist() == [0, 0]


def test_a_setting_whose_seeds_trained_on_different_token_counts_is_mixed_in_the_quality_table(tmp_path):
    for seed, steps in ((0, 12), (1, 20)):
        _write_run(tmp_path, RunSpec("tiny", "adamw", None, None, seed), [2.0] * steps)
    assert quality_table(load_study(tmp_path))["tokens"].tolist() == ["mixed"]


def test_a_run_folder_without_summary_json_is_listed_as_unfinished_and_not_loaded(tmp_path):
    _write_run(tmp_path, RunSpec("tiny", "adamw", None, None, 0), [2.0] * 12)
    _write_run(tmp_path, RunSpec("tiny", "adamw", None, None, 1), [2.0] * 12)
    (RunSpec("tiny", "adamw", None, None, 1).directory(tmp_path) / "summary.json").unlink()
    data = load_study(tmp_path)
    assert data.runs["seed"].tolist() == [0] and data.unfinished == ["runs/tiny/adamw-s1"]


def test_an_older_releases_naive_dst_run_at_alpha_one_beside_its_density_lr_only_twin_is_an_error_not_two_seeds(
        tmp_path, capsys):
    run = RunSpec("tiny", "density-lr-only", 0.5, 1.0, 0)
    _write_run(tmp_path, RunSpec("tiny", "adamw", None, None, 0), [2.0] * 12)
    _write_run(tmp_path, run, [2.0] * 12, {10: 4})
    older = run.directory(tmp_path).parent / "naive-dst-d0.5-a1-s0"  # the same run, as an older release named it
    older.mkdir()
    summary = json.loads((run.directory(tmp_path) / "summary.json").read_text())
    summary["config"]["optimizer"] = "naive-dst"
    (older / "summary.json").write_text(json.dumps(summary))
    (older / "metrics.jsonl.gz").write_bytes((run.directory(tmp_path) / "metrics.jsonl.gz").read_bytes())
    error = usage_error(bench_main, ["stability", "report", "--out-dir", str(tmp_path)], capsys)
    assert error == ("smet-bench: error: runs/tiny/density-lr-only-d0.5-a1-s0 and runs/tiny/naive-dst-d0.5-a1-s0 are "
                     "the same run (tiny/density-lr-only-d0.5-a1-s0; an older release named a density-lr-only run "
                     "naive-dst-…-a<α>): remove one of them")


def test_the_validation_losses_are_those_of_eval_records_and_of_train_records_that_carry_one(tmp_path):
    _write_run(tmp_path, RunSpec("tiny", "adamw", None, None, 0), [2.0] * 12, val_loss=2.5)
    evals = load_study(tmp_path).evals
    assert evals[["step", "val_loss"]].values.tolist() == [[0, 3.5], [12, 2.5]]


def test_metrics_are_read_from_plain_or_gzipped_jsonl_and_a_folder_without_either_is_an_error(tmp_path):
    from bench.stability.load import read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"type": "train", "step": 1}\n\n{"type": "train", "step": 2}\n')
    assert read_metrics(tmp_path) == [{"type": "train", "step": 1}, {"type": "train", "step": 2}]
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        read_metrics(tmp_path / "missing")


def test_a_probe_row_takes_the_first_step_after_the_update_and_averages_the_ratio_over_the_window():
    from bench.stability.load import probe_row

    sizes = [{"regrown_update_rms": 3.0, "surviving_update_rms": 1.0, "regrown_vs_surviving": 3.0,
              "surviving_relative_update": 0.01},
             {"regrown_update_rms": 1.0, "surviving_update_rms": 1.0, "regrown_vs_surviving": 1.0,
              "surviving_relative_update": 0.02}]
    row = probe_row("k", {"update_step": 10, "prune_damage": 0.1, "cold_start_rise": 0.2, "step_sizes": sizes})
    assert [row[c] for c in ("regrown_rms_1", "regrown_vs_surviving_1", "surviving_relative_1")] == [3.0, 3.0, 0.01]
    assert row["regrown_vs_surviving_mean"] == 2.0


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
    lines = "\n".join(study_findings(tmp_path))
    assert f"tiny naive-dst d=0.5 (best α=0 of 1): +0.2000 ± {4.303 * 0.1 / math.sqrt(3):.4f} (95% CI)" in lines
    assert "— within noise" in lines.split("tiny naive-dst d=0.5 (best α=0 of 1)")[1].splitlines()[0]


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


def test_a_finished_run_without_metrics_or_with_an_unreadable_summary_is_a_one_line_error_naming_its_folder(
        tmp_path, capsys):
    run = RunSpec("tiny", "adamw", None, None, 0)
    _write_run(tmp_path, run, [2.0] * 12)
    folder = run.directory(tmp_path)
    (folder / "metrics.jsonl.gz").unlink()
    error = usage_error(bench_main, ["stability", "report", "--out-dir", str(tmp_path)], capsys)
    assert error.startswith(f"smet-bench: error: no metrics.jsonl(.gz) in {folder}: the finished run lost its metrics")
    for text in ("{", '{"steps": 12}'):  # cut short; another tool's summary, without the trainer's config
        (folder / "summary.json").write_text(text)
        error = usage_error(bench_main, ["stability", "report", "--out-dir", str(tmp_path)], capsys)
        assert error.startswith(f"smet-bench: error: {folder / 'summary.json'} is not a trainer's summary (")


def test_a_report_output_that_is_a_folder_or_lies_under_a_file_is_a_one_line_error_naming_output(tmp_path, capsys):
    _synthetic_study(tmp_path)
    (tmp_path / "notes.md").write_text("")
    argv = ["stability", "report", "--out-dir", str(tmp_path), "--output"]
    error = usage_error(bench_main, argv + [str(tmp_path / "runs")], capsys)
    assert error == f"smet-bench: error: --output '{tmp_path / 'runs'}' is a folder, not a markdown file"
    error = usage_error(bench_main, argv + [str(tmp_path / "notes.md" / "stability.md")], capsys)
    assert error == f"smet-bench: error: --output's folder '{tmp_path / 'notes.md'}' exists and is not a folder"


def test_a_run_of_a_method_outside_the_study_is_a_one_line_error_naming_its_folder(tmp_path, capsys):
    run = RunSpec("tiny", "smet-linear", 0.5, 1.0, 0)
    _write_run(tmp_path, run, [2.0] * 12)
    summary = json.loads((run.directory(tmp_path) / "summary.json").read_text())
    summary["config"]["warmup_mode"] = "none"  # a smet-train run without warm-up, copied into the study's runs/
    (run.directory(tmp_path) / "summary.json").write_text(json.dumps(summary))
    error = usage_error(bench_main, ["stability", "report", "--out-dir", str(tmp_path)], capsys)
    assert error.startswith("smet-bench: error: runs/tiny/smet-linear-d0.5-a1-s0: run with optimizer 'smet' / "
                            "warmup_mode 'none' is not a method of the study")


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


def test_the_gpu_command_carries_the_topology_settings_the_study_changed_and_only_those():
    spec = dataclasses.replace(PRESETS["cpu"], regrow="gradient", regrow_init="normal", regrow_init_std=0.01,
                               update_end_step=2500)
    command = stability.gpu_command(spec.to_dict())
    assert "--regrow gradient --regrow-init normal --regrow-init-std 0.01" in command
    assert "--update-end-step 2500" in command
    assert "--prune-fraction" not in command and "--distribution" not in command  # the defaults
    older = {k: v for k, v in PRESETS["cpu"].to_dict().items() if k not in ("regrow_init", "update_end_step")}
    assert "--regrow" not in stability.gpu_command(older)  # a study.json of an older release: its defaults
    on_this_machine = command.replace("--device cuda", "--device cpu").split()[3:]
    assert bench_main(["stability", "run", *on_this_machine, "--dry-run"]) == 0


def test_the_setup_names_the_topology_schedule_and_the_regrow_init_of_the_runs(tmp_path):
    _synthetic_study(tmp_path, seeds=(0,))
    text = write_report(tmp_path).read_text()
    setup = ("prune fraction 0.2 cosine-decayed to 0.005, regrow random (regrown blocks start at zero), uniform "
             "density distribution")
    assert setup in text
    for summary in tmp_path.glob("runs/*/*/summary.json"):  # runs of a release before these settings: its defaults
        saved = json.loads(summary.read_text())
        for name in ("min_prune_fraction", "update_end_step", "regrow_init", "regrow_init_std"):
            del saved["config"][name]
        summary.write_text(json.dumps(saved))
    assert setup in write_report(tmp_path).read_text()


def test_a_pilot_report_gives_no_verdict_that_its_banner_disowns_and_a_study_still_does(tmp_path):
    """The pilot's banner says its numbers are no evidence for or against the claims: its findings name the side of 0
    of each interval, never 'reproduces', 'holds', 'worse than dense' or 'α=… is better'."""
    _synthetic_study(tmp_path, seeds=(0, 1, 2))  # naive DST spikes, smet-linear does not: every claim holds
    text = write_report(tmp_path).read_text()
    assert "CPU pilot, not the H100 study" in text
    measured = text.split("## What was measured (no verdict)")[1].split("\n## ")[0]
    for verdict in ("reproduce", "holds", "does not hold", "worse than dense", "better than dense", "is better"):
        assert verdict not in measured
    assert ("  - smet-linear reduces the spike of naive DST (rise): interval on the claim's side of 0 in 1, on the "
            "other side in 0 of 1 measurable settings") in measured
    assert "over 3 updates in 3 seeds (seed means compared) — interval above 0" in measured
    study = "\n".join(study_findings(tmp_path))
    assert "smet-linear reduces the spike of naive DST (rise): reproduces — holds in 1" in study
    assert "spikes above dense: holds" in study and "worse than dense" in study


def _set_saved_config(root, **settings) -> None:
    """Rewrite the trainer config saved in every run's summary.json of the study under ``root``."""
    for summary in root.glob("runs/*/*/summary.json"):
        saved = json.loads(summary.read_text())
        saved["config"].update(settings)
        summary.write_text(json.dumps(saved))


def test_a_cpu_study_of_fewer_than_1000_steps_is_a_pilot_and_one_of_1000_is_not(tmp_path):
    _synthetic_study(tmp_path, seeds=(0,))
    _set_saved_config(tmp_path, max_steps=999)
    assert "CPU pilot, not the H100 study" in write_report(tmp_path).read_text()
    _set_saved_config(tmp_path, max_steps=1000)
    text = write_report(tmp_path).read_text()
    assert "CPU pilot" not in text and "> **CPU study at small scale** (tiny; 1000 steps of 8 × 64 tokens)" in text


def test_the_reproduce_section_lists_each_command_of_commands_txt_once_without_its_time_stamp(tmp_path):
    _synthetic_study(tmp_path, seeds=(0,))
    (tmp_path / "commands.txt").write_text(
        "2026-01-01T00:00:00Z smet-bench stability run --quick --seeds 0\n"
        "2026-01-02T00:00:00Z smet-bench stability run --quick --seeds 1\n"
        "2026-01-03T00:00:00Z smet-bench stability run --quick --seeds 0\n")
    text = write_report(tmp_path).read_text()
    reproduce = text.split("## Reproduce")[1].split("```")[1]
    assert reproduce.splitlines()[1:] == ["smet-bench stability run --quick --seeds 0",
                                          "smet-bench stability run --quick --seeds 1",
                                          f"smet-bench stability report --out-dir {tmp_path}"]


def test_a_study_of_short_runs_on_a_gpu_has_neither_cpu_banner_and_one_run_on_a_cpu_makes_it_a_cpu_pilot(tmp_path):
    _synthetic_study(tmp_path, seeds=(0,))
    summaries = sorted(tmp_path.glob("runs/*/*/summary.json"))
    for summary in summaries:
        saved = json.loads(summary.read_text())
        summary.write_text(json.dumps(saved | {"device": "cuda:0"}))
    text = write_report(tmp_path).read_text()
    assert "CPU pilot" not in text and "CPU study" not in text and "- devices: cuda:0;" in text
    saved = json.loads(summaries[-1].read_text())
    summaries[-1].write_text(json.dumps(saved | {"device": "cpu"}))
    text = write_report(tmp_path).read_text()
    assert "CPU pilot, not the H100 study" in text and "- devices: cpu, cuda:0;" in text


def test_the_gpu_command_keeps_the_studys_grid_update_schedule_and_changed_settings_and_at_least_the_h100_steps():
    spec = dataclasses.replace(PRESETS["pilot"], steps=5000, alphas=(0.25,), prune_fraction=0.3,
                               min_prune_fraction=0.01, distribution="erk", warmup_scope="regrown")
    assert stability.gpu_command(spec.to_dict()) == (
        "smet-bench stability run --configs 20m,60m --methods adamw,galore,masked-dst,naive-dst,warmup-only,"
        "density-lr-only,smet-linear,smet-momentum_ramp --densities 0.5,0.1 --alphas 0,0.25,0.5,1 --seeds 0,1 "
        "--steps 5000 --update-interval 20 --spike-window 8 --optimizer-warmup-steps 20 --device cuda --backend auto "
        "--out-dir reports/stability-gpu --prune-fraction 0.3 --min-prune-fraction 0.01 --distribution erk "
        "--warmup-scope regrown")
    assert " --steps 4000 " in stability.gpu_command(PRESETS["pilot"].to_dict())  # the pilot's 200: the H100 budget


def test_the_gpu_command_gives_the_studys_densities_and_topology_settings_to_the_last_digit():
    spec = dataclasses.replace(PRESETS["pilot"], densities=(0.1234567,), alphas=(0.3333333,), regrow_init="normal",
                               regrow_init_std=0.01234567)
    command = stability.gpu_command(spec.to_dict())  # ":g" wrote 0.123457, 0.333333 and 0.0123457
    assert "--densities 0.1234567 --alphas 0,0.3333333,0.5,1 " in command
    assert "--regrow-init-std 0.01234567" in command


def test_the_setup_names_the_last_update_step_the_regrow_init_std_the_warm_up_scope_and_unequal_token_budgets(tmp_path):
    _synthetic_study(tmp_path, seeds=(0,))
    text = write_report(tmp_path).read_text()
    assert "update every 10 steps up to step 30," in text and "SMETAdamW warm-up scope `all`" in text
    assert "every run of a config has the same token budget" in text
    _set_saved_config(tmp_path, update_end_step=25, regrow_init="normal", regrow_init_std=0.01, warmup_scope="regrown")
    summary = next(tmp_path.glob("runs/tiny/adamw-s0/summary.json"))
    summary.write_text(json.dumps(json.loads(summary.read_text()) | {"tokens": 1024}))
    text = write_report(tmp_path).read_text()
    assert "update every 10 steps up to step 25," in text and "(regrown blocks start at N(0, 0.01²))" in text
    assert "SMETAdamW warm-up scope `regrown`" in text and "**token budgets differ between runs of a config**" in text
    for summary in tmp_path.glob("runs/*/*/summary.json"):  # a release before the option: warm-up of regrown blocks
        saved = json.loads(summary.read_text())
        del saved["config"]["warmup_scope"]
        summary.write_text(json.dumps(saved))
    assert "SMETAdamW warm-up scope `regrown`" in write_report(tmp_path).read_text()
