"""``smet-bench gpu-check``: GPU validation in one bounded process (compile, check, time, report).

Stages in priority order (``plan.STAGES``): ``env`` (versions and the matmul / copy ceilings), ``correctness``,
``kernels``, ``adamw``, ``training``, ``compile``. When the ``--minutes`` budget runs out no new case starts and
everything not reached is listed as "not run"; a failing correctness check is reported first and the timings still
run; a timed case whose result is wrong (status ``wrong``) fails the command too, named in its stage's row. A timed
stage of many cases may use its estimate's share of the time left (``SHARED_STAGES``). On a CPU the same stages run
at interpreter sizes (``plan.CPU``). Compilation is spread over the CPU cores during ``correctness``
(:mod:`.parallel`). Output: ``DIR/gpu_check.md`` (rewritten after every stage, and inside a timed stage after a
measured row at most every ``SNAPSHOT_EVERY_S``), the long-format ``kernels.csv`` / ``training.csv`` that
``smet-bench report --out-dir DIR`` renders, and ``gpu_check_results.json`` (:mod:`.saved`): the correctness and
compile results, which a later run into ``DIR`` without those stages shows as an earlier run's.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import time

from ..options import seed_int
from ..runner import check_minutes, usage_error
from .plan import STAGES, format_plan, sizes_for

ATOMIC_STAGES = ("compile",)  # one long case: started only when its estimate fits in what is left of the budget
# timed stages of many cases: each may use its estimate's share of the time left for it and the selected stages after
# it, so that a slow stage (the first GPU run's unknown per-case cost) cannot starve the later ones
SHARED_STAGES = ("kernels", "adamw", "training")
SNAPSHOT_EVERY_S = 15.0  # inside a timed stage the summary is rewritten after a measured row at most this often


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out-dir", required=True, help="folder of gpu_check.md and the CSVs (required; no default)")
    parser.add_argument(
        "--minutes",
        type=float,
        default=8.0,
        help="time budget: no new case starts after it; what is left is listed as not run (default: 8)",
    )
    parser.add_argument("--plan", action="store_true",
                        help="print the stages with estimated times and exit (default: run them)")
    parser.add_argument(
        "--stages",
        default=",".join(STAGES),
        help=f"comma-separated stages to run, in priority order, from {','.join(STAGES)} (default: all)",
    )
    parser.add_argument("--device", default=None,
                        help="auto, cpu, cuda or cuda:N (default: auto, cuda when available, else cpu)")
    parser.add_argument("--seed", type=seed_int, default=0,
                        help="seed of layouts, values and tokens (default: 0)")
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bars (default: shown)")


def validate(args) -> list[str]:
    """The selected stages; a bad option ends the command (:func:`usage_error`) before anything runs."""
    from smet_kernels.train.config import check_output_folder

    from ..results import check_results_files

    stages = [s.strip() for s in args.stages.split(",")]
    if any(s not in STAGES for s in stages):  # an empty item too (``env,,kernels``), as every comma-list option
        usage_error(f"--stages must be a comma-separated list from {','.join(STAGES)}, got {args.stages!r}")
    try:
        check_minutes(args.minutes, "--minutes")
        check_output_folder(args.out_dir, "--out-dir")
        check_results_files(args.out_dir)  # the summary reads both files, whatever the stages
    except ValueError as error:
        usage_error(error)
    return stages


def run(args, argv: list[str]) -> int:
    """Validate, print the plan, run the stages in order under the budget, write gpu_check.md."""
    from bench.cli import prepare_device

    stages = validate(args)
    device, backend = prepare_device(args.device, "auto")
    sizes = sizes_for(device.type)
    print(format_plan(sizes, stages, args.minutes), flush=True)
    if args.plan:
        return 0

    from bench.runner import CommandLog, Deadline, make_out_dir

    from . import correctness, measure, saved, summary

    out_dir = make_out_dir(args.out_dir)
    budget = Deadline(args.minutes)
    commands = CommandLog(out_dir, argv)
    ctx = measure.Context(device, backend, sizes, out_dir, budget, commands, args.seed, args.no_progress)
    env = measure.environment(device) | {"backend": backend}  # SMET_BACKEND may have chosen the reference
    command = "smet-bench " + shlex.join(argv)
    earlier = saved.load(out_dir, env["device"])  # shown for the stages this run does not run again
    checks: tuple[list, list] = tuple(earlier["correctness"]["value"]) if "correctness" in earlier else ([], [])
    compile_row = earlier["compile"]["value"] if "compile" in earlier else None
    origins = {stage: saved.origin(entry) for stage, entry in earlier.items()}
    table, failures = [], 0
    last_write = [-float("inf")]

    def write_so_far() -> None:
        """So that a run stopped from outside (a command time limit) leaves what it measured."""
        last_write[0] = time.monotonic()
        try:
            summary.write(out_dir, sizes, env, table + _not_reached(table, sizes), checks, compile_row, command,
                          origins)  # fmt: skip
        except Exception as error:  # a rendering problem must not stop the measurements; the last write retries
            print(f"gpu-check: could not write the summary so far: {type(error).__name__}: {error}", flush=True)

    def after_row() -> None:
        if time.monotonic() - last_write[0] >= SNAPSHOT_EVERY_S:
            write_so_far()

    ctx.after_row = after_row

    def stopped(signum, frame) -> None:
        """SIGTERM (a command time limit): the summary as of now, the running stage named as stopped, then exit."""
        for row in table:
            if row["status"] == "running when this summary was written":
                row["status"] = f"stopped by {signal.Signals(signum).name} after {time.monotonic() - started:.0f} s"
                row["seconds"] = f"{time.monotonic() - started:.0f}"
        write_so_far()
        raise SystemExit(128 + signum)

    previous_handler = signal.signal(signal.SIGTERM, stopped)
    try:
        for stage in STAGES:
            row = {"stage": stage, "estimated s": sizes.estimates_s[stage], "seconds": "", "status": "",
                   "not run": ""}  # fmt: skip
            table.append(row)
            if stage not in stages:
                row["status"] = "not selected"
                continue
            if budget.expired():
                row["status"] = "not run (budget)"
                continue
            if stage in ATOMIC_STAGES and budget.left_s() < sizes.estimates_s[stage]:
                row["status"] = f"not run (budget: ~{sizes.estimates_s[stage]} s needed, {budget.left_s():.0f} s left)"
                continue
            print(f"gpu-check: stage {stage} ({budget.left_s():.0f} s of budget left)", flush=True)
            started = time.monotonic()  # before the status a SIGTERM handler looks for, which reads it
            row["status"] = "running when this summary was written"
            shared = stage in SHARED_STAGES
            ctx.budget = budget.share(_share(stage, stages, sizes, budget.left_s())) if shared else budget
            not_run: list[str] = []
            try:
                if stage == "correctness":
                    checks = correctness.run(sizes, device, args.seed, budget)
                    saved.save(out_dir, stage, checks, env["device"], command)
                    origins.pop(stage, None)
                    not_run = checks[1]
                    failed = [r for r in checks[0] if r["status"] != "pass"]
                    failures += len(failed)
                    _print_failures(failed)
                    row["status"] = f"{len(checks[0]) - len(failed)} pass, {len(failed)} fail"
                elif stage == "compile":
                    compile_row = measure.run_compile(ctx)
                    saved.save(out_dir, stage, compile_row, env["device"], command)
                    origins.pop(stage, None)
                    commands.record()
                    row["status"] = compile_row["status"]
                    failures += compile_row["status"] != "ok"  # ``failed: ...``: the SPEC says a SMET model compiles
                else:
                    run_stage = {"env": measure.run_env, "kernels": measure.run_kernels, "adamw": measure.run_adamw,
                                 "training": measure.run_training}[stage]  # fmt: skip
                    ctx.wrong = []
                    failed_cases, not_run = run_stage(ctx)
                    failures += failed_cases + len(ctx.wrong)  # a wrong result on the real shapes fails the check
                    row["status"] = f"{failed_cases} case(s) raised (see stderr)" if failed_cases else "done"
                    if ctx.wrong:
                        row["status"] += f"; {len(ctx.wrong)} wrong: " + "; ".join(ctx.wrong[:5]) + (
                            " ..." if len(ctx.wrong) > 5 else "")
                    if not_run and not budget.expired():
                        row["status"] += f"; stopped at its share of the budget ({ctx.budget.end - started:.0f} s)"
            except Exception as error:  # one broken stage must not cost the others their time
                failures += 1
                row["status"] = f"failed: {type(error).__name__}: {error}"[:200]
                print(f"gpu-check: stage {stage} {row['status']}", flush=True)
            row["seconds"] = f"{time.monotonic() - started:.0f}"
            if not_run:
                row["not run"] = f"{len(not_run)}: " + "; ".join(not_run[:20]) + (" ..." if len(not_run) > 20 else "")
            write_so_far()
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    path = summary.write(out_dir, sizes, env, table, checks, compile_row, command, origins)
    print(f"gpu-check: wrote {path}; render the CSVs with: smet-bench report --out-dir {out_dir}")
    return 1 if failures else 0


def _share(stage: str, stages: list[str], sizes, left_s: float) -> float:
    """``stage``'s estimate over the estimates of it and the selected stages after it, of ``left_s`` seconds left.
    An atomic stage after it counts only where its own share would reach its estimate: with less it does not start,
    and the time kept for it would be lost to the stages before it."""
    estimates = sizes.estimates_s
    later = [s for s in STAGES[STAGES.index(stage):] if s in stages]
    while True:
        total = sum(estimates[s] for s in later)
        short = [s for s in later if s in ATOMIC_STAGES and left_s * estimates[s] / total < estimates[s]]
        if not short:
            return estimates[stage] / total
        later = [s for s in later if s not in short]


def _not_reached(table: list[dict], sizes) -> list[dict]:
    """Rows of the stages after the last one in ``table``, for a summary written while the run goes on."""
    done = {row["stage"] for row in table}
    return [{"stage": stage, "estimated s": sizes.estimates_s[stage], "seconds": "",
             "status": "not reached when this summary was written", "not run": ""}
            for stage in STAGES if stage not in done]  # fmt: skip


def _print_failures(failed: list[dict]) -> None:
    """Failed correctness checks, printed as soon as the stage ends (the timings still run)."""
    for row in failed:
        where = " ".join(str(row.get(k, "")) for k in ("check", "variant", "dtype", "block_size", "op"))
        print(f"gpu-check: FAIL {where}: {row.get('note', '')}", flush=True)
