"""Stability-study tooling (bench/stability/), the sweep: the presets' runs (every method, density, α and seed, and
blocks that move at every density), option validation before any run starts, skipping finished runs and resuming
interrupted ones, study.json across commands into one folder, and the H100 preset's settings training on a GPU."""

import argparse
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import usage_error

from bench import stability
from bench.cli import main as bench_main
from bench.stability import PRESETS, RunSpec, enumerate_runs, load_study, run_sweep, sweep, write_report
from bench.stability.cli import RUN_OPTIONS
from bench.stability.spec import TRAINER_SETTINGS
from smet_kernels.train.cli import main as train_main
from smet_kernels.train.config import MAX_SEED, TrainConfig
from stability_runs import cache_dir  # noqa: F401 -- autouse: the token and matplotlib caches of the session

NOTHING_RUN = {"total": 0, "skipped": 0, "trained": 0, "failed": 0, "not_started": 0}  # run_sweep's counts, stubbed


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


def test_a_dense_run_trains_at_density_1_without_a_block_size_and_a_sparse_run_at_its_density_and_the_configs_block():
    spec = PRESETS["h100"]
    dense = RunSpec("60m", "galore", None, None, 0).train_config(spec, "out")
    sparse = RunSpec("60m", "masked-dst", 0.25, None, 0).train_config(spec, "out")
    assert (dense.density, dense.block_size) == (1.0, None) and (sparse.density, sparse.block_size) == (0.25, 32)


def test_a_run_takes_the_update_schedule_warm_up_evaluation_and_device_of_the_study_and_its_own_seed():
    config = RunSpec("tiny", "smet-momentum_ramp", 0.1, 1.0, 3).train_config(PRESETS["pilot"], "out")
    assert (config.update_interval, config.optimizer_warmup_steps, config.spike_window) == (20, 20, 8)
    assert (config.lr, config.lr_warmup_steps, config.eval_every, config.eval_batches) == (2e-3, 10, 20, 4)
    assert (config.backend, config.device, config.checkpoint_every, config.seed) == ("reference", "cpu", 0, 3)
    assert (config.warmup_mode, config.density_lr_exponent, config.block_size) == ("momentum_ramp", 1.0, 16)


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


def test_the_spec_refuses_density_1_an_unsupported_block_size_and_lr_warm_up_over_all_steps_but_not_the_largest_seed():
    with pytest.raises(ValueError, match=r"densities must lie in \(0, 1\), got \[1\.0\]"):
        dataclasses.replace(PRESETS["pilot"], densities=(0.5, 1.0)).validate()  # 1 is dense, not a sparse density
    assert dataclasses.replace(PRESETS["pilot"], seeds=(0, MAX_SEED)).validate().seeds == (0, MAX_SEED)
    with pytest.raises(ValueError, match=r"block_sizes\['tiny'\] must be one of \[.*\], got 24"):
        dataclasses.replace(PRESETS["pilot"], block_sizes={"tiny": 24}).validate()
    with pytest.raises(ValueError, match=r"lr_warmup_steps \(200\) must be < steps \(200\)"):
        dataclasses.replace(PRESETS["pilot"], lr_warmup_steps=200).validate()


@pytest.mark.parametrize("options, limit", [(dict(steps=15, lr_warmup_steps=5), "steps \\(15\\)"),
                                            (dict(update_end_step=10), "update_end_step \\(10\\)")])
def test_the_spec_refuses_a_study_whose_sparse_runs_would_make_no_topology_update(options, limit):
    """The pilot's update interval is 20: its sparse runs trained all steps and the report found nothing to measure."""
    with pytest.raises(ValueError, match=rf"update_interval \(20\) is past {limit}: the sparse runs would make no "
                                         "topology update"):
        dataclasses.replace(PRESETS["pilot"], **options).validate()
    dense_only = dict(methods=("adamw",))
    assert dataclasses.replace(PRESETS["pilot"], **options, **dense_only).validate()


@pytest.mark.parametrize("option, values", [("--densities", "0.5,0.1,0.1000001"), ("--alphas", "0.5,0.5000001")])
def test_two_densities_or_alphas_that_would_train_into_one_run_folder_are_refused_before_any_run(capsys, option,
                                                                                                values):
    error = usage_error(bench_main, ["stability", "run", "--quick", option, values, "--dry-run"], capsys)
    assert error == (f"smet-bench: error: {option} {[float(v) for v in values.split(',')]} name the same run folder "
                     "twice (6 significant digits): give values that differ within them")


def test_density_lr_only_with_no_alpha_above_zero_is_refused_not_silently_left_out_of_the_sweep(capsys):
    argv = ["stability", "run", "--quick", "--methods", "adamw,density-lr-only", "--alphas", "0", "--dry-run"]
    assert usage_error(bench_main, argv, capsys) == ("smet-bench: error: --methods density-lr-only runs each α > 0 and "
                                                     "--alphas [0.0] has none: it would run nothing")


@pytest.mark.parametrize("field", ["configs", "methods", "densities", "alphas", "seeds"])
def test_an_empty_list_of_configs_methods_densities_alphas_or_seeds_is_refused_naming_the_field(field):
    """Only a Python caller gets here: the command line refuses an empty list while parsing."""
    with pytest.raises(ValueError, match=f"^{field} must not be empty$"):
        dataclasses.replace(PRESETS["pilot"], **{field: ()}).validate()


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
        ("--data", "/nonexistent", "--data: data path '/nonexistent' does not exist"),
        ("--data", "{tmp}/empty.txt", "empty.txt"),
        ("--lr", "-1", "--lr must be in (0, inf), got -1.0"),
        ("--lr-warmup-steps", "-5", "--lr-warmup-steps must be an int >= 0, got -5"),
        ("--lr-warmup-steps", "500", "--lr-warmup-steps (500) must be < --steps (200)"),
        ("--seeds", "0,-1", "--seeds must be ints in [0, 4294967295], got [-1]"),
        ("--seeds", "4294967296", "--seeds must be ints in [0, 4294967295], got [4294967296]"),
        ("--min-prune-fraction", "0.5", "--min-prune-fraction (0.5) must be <= --prune-fraction (0.2)"),
        ("--configs", "tiny,tiny", "--configs has duplicates: ['tiny', 'tiny']"),
        ("--configs", "tiny,huge", "--configs must be from tiny,20m,60m,130m,350m,1b,7b, got huge"),
        ("--alphas", "0,-1", "--alphas must be finite and >= 0, got [-1.0]"),
        ("--alphas", "nan,inf", "--alphas must be finite and >= 0, got [nan, inf]"),
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


TRAINER_OPTIONS = {"--prune-fraction": "0.3", "--min-prune-fraction": "0.05", "--update-end-step": "150",
                   "--regrow": "gradient", "--regrow-init": "normal", "--regrow-init-std": "0.01",
                   "--distribution": "erk", "--warmup-scope": "regrown"}


def test_the_topology_and_warm_up_options_of_stability_run_reach_every_run_as_given(tmp_path):
    parser = argparse.ArgumentParser()
    stability.add_arguments(parser)
    args = parser.parse_args(["run", "--quick", *(item for pair in TRAINER_OPTIONS.items() for item in pair)])
    spec = stability.spec_from_args(args)
    for run in enumerate_runs(spec):
        config = run.train_config(spec, tmp_path).validate()
        assert (config.prune_fraction, config.min_prune_fraction, config.update_end_step) == (0.3, 0.05, 150)
        assert (config.regrow, config.regrow_init, config.regrow_init_std) == ("gradient", "normal", 0.01)
        assert (config.distribution, config.warmup_scope) == ("erk", "regrown")
    default = enumerate_runs(PRESETS["pilot"])[-1].train_config(PRESETS["pilot"], tmp_path)
    trainer = TrainConfig()
    for name in TRAINER_SETTINGS:  # without the options: smet-train's own defaults
        assert getattr(default, name) == getattr(trainer, name), name


@pytest.mark.parametrize("option, value", [("--prune-fraction", "1"), ("--min-prune-fraction", "-0.1"),
                                           ("--regrow-init-std", "0"), ("--update-end-step", "0"),
                                           ("--update-interval", "x"), ("--optimizer-warmup-steps", "0"),
                                           ("--regrow", "magnitude"), ("--warmup-scope", "none")])
def test_a_bad_topology_option_is_refused_by_stability_run_as_by_smet_train(capsys, option, value):
    """One definition of the options: the same check, the same error, before any run."""
    errors = []
    for main, argv in ((bench_main, ["stability", "run", "--quick", "--dry-run"]), (train_main, [])):
        with pytest.raises(SystemExit) as raised:
            main([*argv, option, value])
        assert raised.value.code == 2
        errors.append(capsys.readouterr().err.splitlines()[-1].split(": error: ")[1])
    assert errors[0] == errors[1] and errors[0].startswith(f"argument {option}: ")


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


def test_a_command_refused_for_a_finished_run_trained_otherwise_leaves_commands_and_study_json_as_they_were(
        tmp_path, monkeypatch, capsys):
    """Nor does its --dry-run list that run as finished: the report would have repeated a command that trained nothing
    and a grid (here seed 5) that was never run."""
    monkeypatch.setattr(sweep, "_train_in_fresh_process", _fake_train([]))
    argv = ["stability", "run", "--quick", "--out-dir", str(tmp_path), "--methods", "adamw", "--seeds", "0"]
    assert bench_main(argv) == 0
    before = [(tmp_path / name).read_text() for name in ("commands.txt", "study.json")]
    for extra in ([], ["--dry-run"]):
        error = usage_error(bench_main, argv + ["--lr", "0.01", "--seeds", "0,5", *extra], capsys)
        assert error.startswith("smet-bench: error: finished run ") and "--lr: saved 0.002 != requested 0.01" in error
    assert [(tmp_path / name).read_text() for name in ("commands.txt", "study.json")] == before


def test_a_finished_runs_summary_cut_short_or_without_the_trainers_config_is_a_one_line_error_naming_it(tmp_path,
                                                                                                          capsys):
    summary = RunSpec("tiny", "adamw", None, None, 0).directory(tmp_path) / "summary.json"
    summary.parent.mkdir(parents=True)
    for text in ("{", "{}"):
        summary.write_text(text)
        error = usage_error(bench_main, ["stability", "run", "--quick", "--out-dir", str(tmp_path), "--dry-run"],
                            capsys)
        assert error.startswith(f"smet-bench: error: {summary} is not a trainer's summary (")


def test_a_run_finished_before_the_topology_schedule_and_regrow_init_options_is_skipped_not_refused(tmp_path,
                                                                                                    monkeypatch):
    """Its summary lacks min_prune_fraction, update_end_step, regrow_init and regrow_init_std: it trained with what
    they default to (the controller's own defaults), so it is the run the study asks for."""
    def as_an_older_release(config):
        for name in ("min_prune_fraction", "update_end_step", "regrow_init", "regrow_init_std"):
            del config[name]

    spec = _two_run_spec()
    for summary in _finished_runs(spec, tmp_path, monkeypatch):
        _edit_saved_config(summary, as_an_older_release)
    assert run_sweep(spec, tmp_path, isolate=False, log=lambda *_: None)["skipped"] == 2
    _edit_saved_config(summary, lambda config: config.update(regrow_init="normal"))  # a saved setting is compared
    with pytest.raises(ValueError, match="regrow_init: saved 'normal' != requested 'zeros'"):
        run_sweep(spec, tmp_path, isolate=False, log=lambda *_: None)


def test_interrupted_run_resumes_from_its_latest_checkpoint(tmp_path, monkeypatch):
    spec = dataclasses.replace(PRESETS["pilot"], methods=("adamw",), seeds=(0,), checkpoint_every=50)
    run_dir = enumerate_runs(spec)[0].directory(tmp_path)
    from smet_kernels.train.checkpoint import write_checkpoint

    for step in (50, 100):  # complete checkpoints (verified against their manifests); only their config is read
        write_checkpoint(run_dir, step, {}, enumerate_runs(spec)[0].train_config(spec, tmp_path))
    resumed = []
    monkeypatch.setattr(sweep, "_train_in_this_process", lambda config: resumed.append(config["resume"]))
    counts = run_sweep(spec, tmp_path, isolate=False, log=lambda *_: None)
    assert resumed == [str(run_dir / "checkpoints" / "step_0000100")]
    assert counts["failed"] == 1  # the stub wrote no summary.json: reported, retried next time


def test_an_interrupted_run_whose_checkpoint_was_trained_with_another_lr_is_refused_not_resumed_into_a_mixed_run(
        tmp_path, monkeypatch, capsys):
    """A resume keeps only the trainer's fixed settings: the run would have finished its second part at the new
    --lr and its summary, naming that lr only, passed for a run of it."""
    from smet_kernels.train.checkpoint import write_checkpoint

    spec = dataclasses.replace(PRESETS["pilot"], methods=("adamw",), seeds=(0,), checkpoint_every=50)
    run = enumerate_runs(spec)[0]
    write_checkpoint(run.directory(tmp_path), 50, {}, run.train_config(spec, tmp_path))
    monkeypatch.setattr(sweep, "_train_in_fresh_process", lambda config: pytest.fail("a run was started"))
    argv = ["stability", "run", "--quick", "--out-dir", str(tmp_path), "--methods", "adamw", "--seeds", "0"]
    error = usage_error(bench_main, argv + ["--lr", "0.01"], capsys)
    assert error == (f"smet-bench: error: interrupted run {run.directory(tmp_path)} (checkpoint step_0000050) was "
                     "trained with other settings (--lr: saved 0.002 != requested 0.01); use another --out-dir or "
                     "delete that folder")


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


def test_study_json_holds_the_grid_of_every_command_into_the_folder_not_only_the_last(tmp_path, monkeypatch):
    """The README's CPU study is three commands into one folder (the last: --methods adamw,smet-linear --alphas 0.5);
    study.json, whose grid the report's GPU command repeats, kept only the last command's methods and α."""
    from bench.stability import cli

    monkeypatch.setattr(cli, "run_sweep", lambda *args, **kwargs: dict(NOTHING_RUN))
    out_dir = tmp_path / "study"
    for extra in ([], ["--methods", "adamw,masked-dst,galore,smet-momentum_ramp", "--alphas", "1.0"],
                  ["--methods", "adamw,smet-linear", "--alphas", "0.5"]):
        assert bench_main(["stability", "run", "--cpu-study", "--out-dir", str(out_dir), *extra]) == 0
    study = json.loads((out_dir / "study.json").read_text())
    assert study["methods"] == list(stability.METHODS) and study["alphas"] == [0.5, 1.0]
    assert study["densities"] == [0.5, 0.25, 0.1] and study["seeds"] == [0, 1, 2] and study["steps"] == 3000
    assert "--methods adamw,galore,masked-dst,naive-dst,warmup-only" in stability.gpu_command(study)


def test_a_command_stopped_while_writing_study_json_leaves_the_earlier_one_whole(tmp_path, monkeypatch):
    """A cut-short study.json made every later run and report of the folder end in a JSONDecodeError."""
    from bench.stability import cli

    monkeypatch.setattr(cli, "run_sweep", lambda *args, **kwargs: dict(NOTHING_RUN))
    out_dir = tmp_path / "study"
    assert bench_main(["stability", "run", "--cpu-study", "--out-dir", str(out_dir)]) == 0
    before = (out_dir / "study.json").read_text()

    def stopped(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.os, "replace", stopped)
    with pytest.raises(KeyboardInterrupt):
        bench_main(["stability", "run", "--cpu-study", "--out-dir", str(out_dir), "--alphas", "0.5"])
    assert (out_dir / "study.json").read_text() == before


def test_stability_run_passes_its_time_limit_and_checkpoint_choice_to_the_sweep_and_exits_1_when_a_run_failed(
        tmp_path, monkeypatch, capsys):
    from bench.stability import cli

    calls = []
    counts = {"total": 3, "skipped": 1, "trained": 1, "failed": 1, "not_started": 0}
    monkeypatch.setattr(cli, "run_sweep", lambda spec, out_dir, **kwargs: calls.append(kwargs) or counts)
    argv = ["stability", "run", "--quick", "--out-dir", str(tmp_path), "--max-minutes", "30", "--keep-checkpoints"]
    assert bench_main(argv) == 1 and calls == [{"max_minutes": 30.0, "keep_checkpoints": True}]
    assert ("smet-bench: 3 runs: 1 skipped, 1 trained, 1 failed, 0 not started; render with: smet-bench stability "
            "report --out-dir") in capsys.readouterr().out  # a sentence, not a Python dict
    assert (tmp_path / "commands.txt").read_text().split(" ", 1)[1] == "smet-bench " + " ".join(argv) + "\n"


def test_a_dry_run_lists_each_run_as_finished_or_to_run_and_counts_them_and_their_tokens(tmp_path, capsys):
    run = RunSpec("tiny", "adamw", None, None, 1)
    run.directory(tmp_path).mkdir(parents=True)
    config = run.train_config(PRESETS["pilot"], tmp_path).to_dict()  # trained as asked: listed, not refused
    (run.directory(tmp_path) / "summary.json").write_text(json.dumps({"config": config}))
    assert bench_main(["stability", "run", "--quick", "--out-dir", str(tmp_path), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    runs = enumerate_runs(PRESETS["pilot"])
    assert lines[:2] == ["tiny/adamw-s0: to run", "tiny/galore-s0: to run"] and "tiny/adamw-s1: finished" in lines
    assert lines.count("tiny/adamw-s1: finished") == 1 and len(lines) == len(runs) + 1
    assert lines[-1] == f"{len(runs)} runs, 102,400 tokens each" and not (tmp_path / "commands.txt").exists()


def test_stability_run_without_out_dir_writes_into_the_folder_of_its_preset(tmp_path, monkeypatch):
    from bench.stability import cli

    folders = []
    monkeypatch.setattr(cli, "run_sweep", lambda spec, out_dir, **kwargs: folders.append(out_dir) or dict(NOTHING_RUN))
    monkeypatch.chdir(tmp_path)
    for preset in ([], ["--quick"], ["--cpu-study"]):
        assert bench_main(["stability", "run", *preset]) == 0
    assert folders == [Path("reports/stability"), Path("runs/stability-pilot"), Path("reports/stability-cpu")]


def test_the_cpu_pilot_runs_as_documented_beside_the_committed_older_pilot_runs(tmp_path, monkeypatch, capsys):
    """``stability run --quick`` wrote into reports/cpu-pilot-stability, whose 32 committed runs predate settings a
    rerun checks (``--warmup-scope``): the documented command was refused; it now starts a fresh folder."""
    import shutil

    from bench.stability import cli

    pilot = Path(__file__).resolve().parents[1] / "reports" / "cpu-pilot-stability"
    shutil.copytree(pilot, tmp_path / "reports" / "cpu-pilot-stability")
    folders = []
    monkeypatch.setattr(cli, "run_sweep", lambda spec, out_dir, **kwargs: folders.append(out_dir) or dict(NOTHING_RUN))
    monkeypatch.chdir(tmp_path)
    assert bench_main(["stability", "run", "--quick"]) == 0 and folders == [Path("runs/stability-pilot")]
    with pytest.raises(SystemExit):  # the committed runs themselves are still refused, naming the setting
        bench_main(["stability", "run", "--quick", "--out-dir", "reports/cpu-pilot-stability"])
    assert "--warmup-scope" in capsys.readouterr().err


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


def _two_run_spec():
    return dataclasses.replace(PRESETS["pilot"], methods=("adamw", "naive-dst"), densities=(0.5,), alphas=(1.0,),
                               seeds=(0,))


def _finished_runs(spec, tmp_path, monkeypatch) -> list:
    """The summary.json of each run of ``spec``, trained (faked) into ``tmp_path``."""
    monkeypatch.setattr(sweep, "_train_in_this_process", _fake_train([]))
    run_sweep(spec, tmp_path, isolate=False, log=lambda *_: None)
    return [run.directory(tmp_path) / "summary.json" for run in enumerate_runs(spec)]


def _edit_saved_config(summary, edit) -> None:
    """Rewrite the config saved in ``summary`` (a summary.json) by ``edit(config)``."""
    saved = json.loads(summary.read_text())
    edit(saved["config"])
    summary.write_text(json.dumps(saved))


def test_a_finished_run_whose_summary_lacks_a_defining_setting_of_no_older_release_is_refused(tmp_path, monkeypatch):
    spec = _two_run_spec()
    _edit_saved_config(_finished_runs(spec, tmp_path, monkeypatch)[0], lambda config: config.pop("spike_window"))
    with pytest.raises(ValueError, match="saved None != requested"):
        run_sweep(spec, tmp_path, isolate=False, log=lambda *_: None)


def test_metrics_larger_than_the_limit_are_gzipped_and_smaller_ones_left_plain(tmp_path):
    import gzip

    for name, size in (("small", 100), ("large", 200)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("x" * size)
        sweep.compress_metrics(tmp_path / name, above_bytes=150)
    assert (tmp_path / "small" / "metrics.jsonl").is_file() and not (tmp_path / "small" / "metrics.jsonl.gz").exists()
    assert not (tmp_path / "large" / "metrics.jsonl").exists()
    assert gzip.decompress((tmp_path / "large" / "metrics.jsonl.gz").read_bytes()) == b"x" * 200


@pytest.mark.parametrize("keep", [False, True])
def test_a_finished_runs_checkpoints_are_deleted_unless_asked_to_keep_them(tmp_path, monkeypatch, keep):
    calls = []
    fake = _fake_train(calls)

    def train_with_checkpoint(config_dict):
        fake(config_dict)
        (Path(config_dict["out_dir"]) / "checkpoints" / "step_0000010").mkdir(parents=True)

    monkeypatch.setattr(sweep, "_train_in_this_process", train_with_checkpoint)
    run_sweep(_two_run_spec(), tmp_path, isolate=False, keep_checkpoints=keep, log=lambda *_: None)
    assert [(Path(path) / "checkpoints").is_dir() for path in calls] == [keep, keep]


def test_a_sweep_past_its_time_limit_starts_no_further_run_and_counts_them_as_not_started(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "_train_in_this_process", lambda config: pytest.fail("a run was started"))
    counts = run_sweep(_two_run_spec(), tmp_path, isolate=False, max_minutes=0.0, log=lambda *_: None)
    assert counts == {"total": 2, "skipped": 0, "trained": 0, "failed": 0, "not_started": 2}


def test_a_failed_run_is_counted_and_the_sweep_goes_on_to_the_next(tmp_path, monkeypatch):
    calls = []
    fake = _fake_train(calls)

    def first_fails(config_dict):
        if not calls:
            calls.append("failed")
            raise RuntimeError("out of memory")
        fake(config_dict)

    monkeypatch.setattr(sweep, "_train_in_this_process", first_fails)
    counts = run_sweep(_two_run_spec(), tmp_path, isolate=False, log=lambda *_: None)
    assert counts == {"total": 2, "skipped": 0, "trained": 1, "failed": 1, "not_started": 0} and len(calls) == 2


def test_a_finished_run_whose_saved_seed_is_not_its_folders_is_refused(tmp_path, monkeypatch):
    spec = _two_run_spec()
    _edit_saved_config(_finished_runs(spec, tmp_path, monkeypatch)[0], lambda config: config.update(seed=7))
    with pytest.raises(ValueError, match="saved 7 != requested 0"):
        run_sweep(spec, tmp_path, isolate=False, log=lambda *_: None)


def test_a_study_json_an_older_release_cut_short_stops_run_and_report_in_one_line_naming_it(tmp_path, monkeypatch,
                                                                                             capsys):
    """Written in place by an older release, a cut-short study.json stopped `stability run` with a JSONDecodeError
    traceback (after recording the command), and the report with json's message alone, naming no file."""
    from stability_runs import _synthetic_study

    from bench.stability import cli

    monkeypatch.setattr(cli, "run_sweep", lambda *args, **kwargs: dict(NOTHING_RUN))
    _synthetic_study(tmp_path / "report")
    for folder in ("run", "report"):
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / "study.json").write_text('{"configs": ["tiny"')
    error = usage_error(bench_main, ["stability", "run", "--cpu-study", "--out-dir", str(tmp_path / "run")], capsys)
    assert error.startswith(f"smet-bench: error: {tmp_path / 'run' / 'study.json'} is not a study's settings"), error
    assert not (tmp_path / "run" / "commands.txt").exists()
    error = usage_error(bench_main, ["stability", "report", "--out-dir", str(tmp_path / "report")], capsys)
    assert error.startswith(f"smet-bench: error: {tmp_path / 'report' / 'study.json'} is not a study's"), error
