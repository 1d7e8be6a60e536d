"""The ``run`` / ``report`` sub-commands of ``smet-bench stability`` (also ``python -m bench.stability``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import time
from pathlib import Path

from smet_kernels.train.cli import add_topology_arguments, int_at_least
from smet_kernels.train.config import check_output_folder, naming_options

from ..options import comma_list
from ..runner import check_minutes, make_out_dir, usage_error
from .report import read_study, write_report
from .spec import COMMANDS_FILE, DENSE_METHOD, METHODS, PRESETS, TRAINER_SETTINGS, StudySpec, enumerate_runs
from .sweep import check_runnable, is_done, run_sweep


def _default(name: str, study_text: str | None = None) -> str:
    """``(default: <H100 study value>; <value> with --quick; <value> with --cpu-study)`` of the :class:`StudySpec`
    field ``name``: a preset is named where it changes the value (one clause for both where they agree)."""

    def show(value) -> str:
        return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)

    study = show(getattr(PRESETS["h100"], name))
    presets: dict[str, list[str]] = {}
    for flag, preset in (("--quick", "pilot"), ("--cpu-study", "cpu")):
        value = show(getattr(PRESETS[preset], name))
        if value != study:
            presets.setdefault(value, []).append(flag)
    clauses = [study_text or study] + [f"{value} with {' or '.join(flags)}" for value, flags in presets.items()]
    return f"(default: {'; '.join(clauses)})"


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
                     "options below still override (default: neither preset, the H100 study)")
    cpu = PRESETS["cpu"]
    run.add_argument("--cpu-study", action="store_true",
                     help=f"CPU study preset: config {','.join(cpu.configs)}, methods {','.join(cpu.methods)}, "
                     f"densities {','.join(map(str, cpu.densities))}, α {','.join(map(str, cpu.alphas))}, seeds "
                     f"{','.join(map(str, cpu.seeds))}, {cpu.steps} steps × {cpu.batch_size} × {cpu.seq_len}, update "
                     f"every {cpu.update_interval} steps, {cpu.backend} backend; options below still override "
                     "(default: neither preset, the H100 study)")
    run.add_argument("--out-dir", default=None,
                     help="output folder (default: reports/stability; runs/stability-pilot with --quick; "
                     "reports/stability-cpu with --cpu-study)")
    run.add_argument("--configs", type=comma_list(str, container=tuple),
                     help=f"model configurations from tiny,20m,60m,130m,350m,1b,7b {_default('configs')}")
    run.add_argument("--methods", type=comma_list(str, container=tuple),
                     help=f"methods from {','.join(METHODS)}; must include {DENSE_METHOD} {_default('methods', 'all')}")
    run.add_argument("--densities", type=comma_list(float, container=tuple),
                     help=f"block densities in (0, 1) of the sparse methods {_default('densities')}")
    run.add_argument("--alphas", type=comma_list(float, container=tuple),
                     help=f"density-LR exponents α >= 0 of the SMETAdamW methods (lr × d^-α) {_default('alphas')}")
    run.add_argument("--seeds", type=comma_list(int, container=tuple),
                     help=f"seeds; every method runs every seed {_default('seeds')}")
    run.add_argument("--steps", type=int_at_least(1),
                     help=f"optimizer steps per run; token budget = steps × batch × seq {_default('steps')}")
    run.add_argument("--batch-size", type=int_at_least(1),
                     help=f"sequences per optimizer step {_default('batch_size')}")
    run.add_argument("--seq-len", type=int_at_least(1), help=f"tokens per sequence {_default('seq_len')}")
    steps_text = {"update_end_step": "--steps, the whole run"}
    add_topology_arguments(run, lambda name: _default(name, steps_text.get(name)))
    run.add_argument("--spike-window", type=int_at_least(1),
                     help=f"k of the loss-spike statistic, in steps {_default('spike_window')}")
    run.add_argument("--lr", type=float, help=f"peak learning rate, same for every method {_default('lr')}")
    run.add_argument("--lr-warmup-steps", type=int,
                     help=f"linear LR warm-up steps, same for every method {_default('lr_warmup_steps')}")
    run.add_argument("--precision", choices=("fp32", "bf16-autocast", "bf16"),
                     help=f"training precision {_default('precision')}")
    run.add_argument("--data",
                     help=f"training data: stdlib, a text file or folder, a uint16 .bin token file or "
                     f"hf:NAME[:CONFIG][@REVISION] (as smet-train --data) {_default('data')}")
    run.add_argument("--backend", choices=("auto", "triton", "reference"),
                     help=f"smet_kernels backend {_default('backend')}")
    run.add_argument("--device", help=f"auto, cpu, cuda or cuda:N {_default('device')}")
    run.add_argument("--max-minutes", type=float, default=None,
                     help="start no new run after this many minutes; rerun the same command to resume "
                     "(default: no limit)")
    run.add_argument("--keep-checkpoints", action="store_true",
                     help="keep each finished run's checkpoints (default: deleted once it has finished)")
    run.add_argument("--dry-run", action="store_true",
                     help="list the runs and their state, train nothing (default: train)")
    report = commands.add_parser("report", help="write <out-dir>/stability.md and PNG plots from the runs",
                                 description="Render stability.md (tables, findings, commands) and seaborn PNGs "
                                 "from the finished runs in <out-dir>/runs.")
    report.add_argument("--out-dir", required=True, help="folder of the study, holding runs/ (required; no default)")
    report.add_argument("--output", default=None, help="markdown file to write (default: <out-dir>/stability.md)")


# the StudySpec fields that `run` options of the same name override
OVERRIDES = ("configs", "methods", "densities", "alphas", "seeds", "steps", "batch_size", "seq_len", "update_interval",
             *TRAINER_SETTINGS, "spike_window", "optimizer_warmup_steps", "lr", "lr_warmup_steps", "precision", "data",
             "backend", "device")
# the `run` option behind each StudySpec field and each TrainConfig field a study run takes from another one: errors
# name it (smet_kernels.train.config.setting)
RUN_OPTIONS = {name: "--" + name.replace("_", "-") for name in (*OVERRIDES, "out_dir")} | {
    "model": "--configs", "density": "--densities", "density_lr_exponent": "--alphas", "seed": "--seeds",
    "max_steps": "--steps"}


def _preset(args: argparse.Namespace) -> str:
    if args.quick and args.cpu_study:
        raise ValueError("--quick and --cpu-study are two presets: give one")
    return "pilot" if args.quick else "cpu" if args.cpu_study else "h100"


def spec_from_args(args: argparse.Namespace) -> StudySpec:
    spec = dataclasses.replace(PRESETS[_preset(args)])
    overrides = {name: getattr(args, name) for name in OVERRIDES if getattr(args, name) is not None}
    spec = dataclasses.replace(spec, **overrides)
    return spec.validate()


def merged_study(saved: dict, spec: dict) -> dict:
    """``spec`` with its grid (configs, methods, densities, α, seeds) extended by the one an earlier command saved in
    the same folder: the study is all its runs (the report's GPU command repeats it), not the last command's. Their
    other settings agree: every command reruns the dense runs, and a finished run trained otherwise is refused."""
    merged = dict(spec)
    for name in ("configs", "methods", "densities", "alphas", "seeds"):
        merged[name] = list(dict.fromkeys([*saved.get(name, []), *spec[name]]))
    merged["methods"] = [m for m in METHODS if m in merged["methods"]]
    merged["densities"] = sorted(merged["densities"], reverse=True)
    merged["alphas"], merged["seeds"] = sorted(merged["alphas"]), sorted(merged["seeds"])
    return merged


def main_from_args(args: argparse.Namespace, prog: str, argv: list[str]) -> int:
    """Execute a parsed ``run``/``report`` command; bad options end with ``<prog>: error: ...`` (exit code 2), failed
    runs with exit code 1."""
    if args.stability_command == "report":
        if not Path(args.out_dir).is_dir():
            usage_error(f"--out-dir {args.out_dir!r} is not a folder", prog)
        try:
            if args.output is not None:
                if Path(args.output).is_dir():
                    raise ValueError(f"--output {args.output!r} is a folder, not a markdown file")
                check_output_folder(Path(args.output).parent, "--output's folder")
            path = write_report(args.out_dir, args.output)
        except ValueError as error:
            usage_error(error, prog)
        print(f"{prog}: wrote {path}")
        return 0
    # the pilot's committed runs (reports/cpu-pilot-stability) predate settings a rerun checks: a fresh folder
    default_dirs = {"pilot": "runs/stability-pilot", "cpu": "reports/stability-cpu", "h100": "reports/stability"}
    try:
        out_dir = Path(args.out_dir or default_dirs[_preset(args)])
        check_minutes(args.max_minutes, "--max-minutes")
        with naming_options(RUN_OPTIONS):
            spec = spec_from_args(args)
            check_runnable(spec, out_dir)
        study = out_dir / "study.json"
        saved = read_study(study) if study.is_file() else {}
    except ValueError as error:
        usage_error(error, prog)
    if args.dry_run:
        for run in enumerate_runs(spec):
            state = "finished" if is_done(run.directory(out_dir)) else "to run"
            print(f"{run.config}/{run.name}: {state}")
        print(f"{len(enumerate_runs(spec))} runs, {spec.tokens_per_run:,} tokens each")
        return 0
    make_out_dir(out_dir, prog)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with (out_dir / COMMANDS_FILE).open("a") as handle:
        handle.write(f"{stamp} {prog} {shlex.join(argv)}\n")
    temporary = study.with_name("study.json.tmp")  # replaced whole: a cut-short study.json stopped every command
    temporary.write_text(json.dumps(merged_study(saved, spec.to_dict()), indent=1))
    os.replace(temporary, study)
    try:
        with naming_options(RUN_OPTIONS):
            counts = run_sweep(spec, out_dir, max_minutes=args.max_minutes, keep_checkpoints=args.keep_checkpoints)
    except ValueError as error:
        usage_error(error, prog)
    summary = ", ".join(f"{count} {name.replace('_', ' ')}" for name, count in counts.items() if name != "total")
    print(f"{prog}: {counts['total']} runs: {summary}; render with: smet-bench stability report --out-dir {out_dir}")
    return 1 if counts["failed"] else 0
