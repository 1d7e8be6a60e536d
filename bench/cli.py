"""``smet-bench``: run the benchmark suites into resumable CSVs and render the markdown report.

    smet-bench run --quick --out-dir reports/quick        # about a minute on a 2-core CPU
    smet-bench run                                        # full grid on a GPU -> reports/<gpu-slug>/
    smet-bench report --out-dir reports/<gpu-slug>        # report.md + PNG plots
    smet-bench stability run --quick                      # stability study, CPU pilot; see bench/stability/
    smet-bench memory                                     # memory scaling 20m..7b traced on meta, any machine

Also runnable as ``python -m bench.cli``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import torch

from .options import comma_list, seed_int
from .runner import CommandLog, Deadline, check_minutes, make_out_dir, run_cases, usage_error

SUITES = ("kernels", "optimizer", "training")
MODES = {"off": (False,), "on": (True,), "both": (False, True)}  # --compile / --activation-checkpointing
REPORTS_EXTRA = ("pandas", "seaborn", "tabulate")  # modules of the `reports` extra that smet-bench imports


def build_parser() -> argparse.ArgumentParser:
    from . import kernels, optimizer, training

    parser = argparse.ArgumentParser(
        prog="smet-bench",
        description="Benchmarks of smet_kernels: kernels, optimizer step, end-to-end training memory and speed.",
    )
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="{run,report,gpu-check,stability,memory}"
    )

    run = commands.add_parser(
        "run",
        help="measure and append results to <out-dir>/kernels.csv and training.csv (resumable)",
        description="Measure the selected suites; rows already in the CSVs are skipped, so an interrupted run "
        "resumes where it stopped. Lists are comma-separated.",
    )
    run.add_argument(
        "--suites",
        type=comma_list(str),
        default=list(SUITES),
        help=f"suites to run, from {','.join(SUITES)} (default: all)",
    )
    run.add_argument(
        "--quick",
        action="store_true",
        help="tiny grid (config tiny, 64 tokens, block size 32, densities 0.5,0.25 for kernels) that finishes "
        "in about a minute on a 2-core CPU; explicit options still override it (default: the full GPU grid)",
    )
    run.add_argument(
        "--out-dir",
        default=None,
        help="folder of the CSVs (default: reports/<device-name-slug>, e.g. reports/cpu-x86-64-2cores)",
    )
    run.add_argument(
        "--configs",
        type=comma_list(str),
        default=None,
        help="model configurations (SPEC §5) from tiny,20m,60m,130m,350m,1b,7b (default: 20m..7b for kernels and "
        "optimizer, 60m,130m,350m,1b for training; tiny with --quick)",
    )
    run.add_argument(
        "--densities",
        type=comma_list(float),
        default=None,
        help="block densities in (0, 1] (default: 0.5,0.25,0.1,0.05 for kernels and optimizer, 0.5,0.25,0.1 for "
        "training; 0.5,0.25 for kernels and optimizer with --quick)",
    )
    run.add_argument(
        "--block-sizes",
        type=comma_list(int),
        default=None,
        help="block sizes b of the kernels and optimizer suites, from 16,32,64,128 (default: 32,64,128; 32 with "
        "--quick)",
    )
    run.add_argument(
        "--tokens",
        type=comma_list(int),
        default=None,
        help="token counts M of the kernel benchmarks (default: 8192,16384; 64 with --quick)",
    )
    run.add_argument(
        "--providers",
        type=comma_list(str),
        default=None,
        help=f"kernel providers from {','.join(kernels.PROVIDERS)} and optimizer providers "
        f"from {','.join(optimizer.PROVIDERS)}, at least one for each of these suites in --suites (default: all that "
        "apply)",
    )
    run.add_argument(
        "--methods",
        type=comma_list(str),
        default=None,
        help=f"training methods from {','.join(training.METHODS)} (default: all)",
    )
    run.add_argument(
        "--training-block-size",
        type=int,
        default=None,
        help="block size b of the training suite, from 16,32,64,128; must divide the configs' hidden size "
        "(default: 64; 32 with --quick)",
    )
    run.add_argument(
        "--batch-size", type=int, default=None, help="training batch size in sequences (default: 16; 2 with --quick)"
    )
    run.add_argument(
        "--seq-len", type=int, default=None, help="training sequence length in tokens (default: 256; 32 with --quick)"
    )
    run.add_argument(
        "--steps", type=int, default=None,
        help="timed training steps per case (default: 10; 3 with --quick); not part of a row's key, as --seed is not: "
             "a case already in the folder is kept, so measure with other steps into another --out-dir",
    )
    run.add_argument(
        "--compile",
        choices=tuple(MODES),
        default="off",
        help="training suite: steps through torch.compile(model) (on), eager (off), or both side by side; "
        "compiling costs each compiled case tens of seconds on a CPU (default: off)",
    )
    run.add_argument(
        "--activation-checkpointing",
        choices=tuple(MODES),
        default="off",
        help="training suite: recompute each decoder layer in backward (on), save its activations (off), or both "
        "side by side (default: off)",
    )
    run.add_argument(
        "--dtype",
        choices=("bf16", "fp16", "fp32"),
        default=None,
        help="kernel and training dtype (default: bf16 on GPU, fp32 on CPU where Triton's interpreter mishandles "
        "bf16 dot products); optimizer benchmarks always use fp32 parameters",
    )
    run.add_argument(
        "--backend",
        choices=("auto", "triton", "reference"),
        default="auto",
        help="smet_kernels backend: triton (the CPU interpreter without a GPU), the PyTorch reference, or auto = "
        "triton where it can run, else reference (default: auto)",
    )
    run.add_argument(
        "--device", default=None, help="auto, cpu, cuda or cuda:N (default: auto, cuda when available, else cpu)"
    )
    run.add_argument("--seed", type=seed_int, default=0,
                     help="seed of layouts, weights and tokens (default: 0)")
    run.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bars (default: shown)")
    run.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="start no new case after this many minutes; the CSVs stay consistent, rerun the same command to "
        "resume (default: no limit)",
    )

    report = commands.add_parser(
        "report",
        help="write <out-dir>/report.md with tables and PNG plots from the CSVs",
        description="Render report.md (tabulate tables) and PNG plots (seaborn) from kernels.csv, training.csv "
        "and any pytest-benchmark JSON files.",
    )
    report.add_argument(
        "--out-dir", required=True, help="folder holding kernels.csv / training.csv (required; no default)"
    )
    report.add_argument(
        "--benchmark-json",
        nargs="*",
        default=None,
        help="pytest-benchmark JSON files (pytest bench --benchmark-json=FILE) to include; default: every "
        "*.json in --out-dir that pytest-benchmark wrote",
    )

    from . import gpu_check

    check = commands.add_parser(
        "gpu-check",
        help="GPU validation in one bounded run: ceilings, compiled correctness, headline kernel, AdamW and "
        "training timings, DIR/gpu_check.md",
        description="Run the stages env, correctness, kernels, adamw, training, compile in priority order within "
        "--minutes; what the budget does not reach is listed as not run. On a CPU the same stages run at "
        "interpreter sizes.",
    )
    gpu_check.add_arguments(check)

    from .stability import add_arguments as add_stability_arguments

    stability = commands.add_parser(
        "stability",
        help="stability study (loss spikes after topology updates, quality vs dense): `stability run` trains the "
        "sweep, `stability report` renders it",
        description="Stability study: naive DST vs SMET loss spikes after topology updates, quality vs dense and "
        "GaLore at equal tokens, density x alpha sweep (see bench/stability/).",
    )
    add_stability_arguments(stability)

    from .memory_scaling import add_arguments as add_memory_arguments

    memory = commands.add_parser(
        "memory",
        help="memory scaling 20m..7b: one step of every method traced on meta (exact bytes, nothing allocated), "
        "measured on the CPU where small, and modelled; writes memory.csv, memory.md and plots",
        description="Trace one training step per method, size, density, state dtype, batch shape, vocab and "
        "activation checkpointing on the meta device (see bench/memory_scaling.py), then render the report.",
    )
    add_memory_arguments(memory)
    return parser


def _prepare_interpreter(device_name: str | None, backend: str) -> None:
    """Route Triton kernels through the CPU interpreter on CPU runs (no CUDA, or ``--device cpu``); it must be on
    before smet_kernels is imported."""
    on_cpu = not torch.cuda.is_available() or (device_name or "").startswith("cpu")
    if on_cpu and backend != "reference" and "smet_kernels" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _run_kernels(args, device, backend, dtype, out_dir, timing_kwargs, deadline, commands) -> int:
    from . import kernels
    from .results import kernels_file

    file = kernels_file(out_dir)
    providers = [p for p in (args.providers or kernels.default_providers(backend)) if p in kernels.PROVIDERS]
    cases = list(
        kernels.kernel_cases(
            args.configs or (kernels.QUICK_CONFIGS if args.quick else kernels.FULL_CONFIGS),
            args.densities or (kernels.QUICK_DENSITIES if args.quick else kernels.FULL_DENSITIES),
            args.block_sizes or (kernels.QUICK_BLOCK_SIZES if args.quick else kernels.FULL_BLOCK_SIZES),
            args.tokens or (kernels.QUICK_TOKENS if args.quick else kernels.FULL_TOKENS),
            dtype,
            providers=providers,
        )
    )
    state = {"key": None, "operands": None}

    def run_one(case):
        key = kernels.operands_key(case)
        if key != state["key"]:
            # the key is recorded only once its operands exist: after a failure the next case rebuilds them
            state["operands"] = kernels.make_operands(case, device, args.seed, previous=state["operands"])
            state["key"] = key
        return kernels.run_case(case, state["operands"], backend, device, timing_kwargs)

    return run_cases("kernels", cases, run_one, file, backend, device, args.no_progress, deadline, commands)


def _run_optimizer(args, device, backend, out_dir, timing_kwargs, deadline, commands) -> int:
    from . import kernels, optimizer
    from .results import kernels_file

    file = kernels_file(out_dir)
    providers = [p for p in (args.providers or optimizer.PROVIDERS) if p in optimizer.PROVIDERS]
    cases = list(
        optimizer.optimizer_cases(
            args.configs or (kernels.QUICK_CONFIGS if args.quick else kernels.FULL_CONFIGS),
            args.densities or (kernels.QUICK_DENSITIES if args.quick else kernels.FULL_DENSITIES),
            args.block_sizes or (kernels.QUICK_BLOCK_SIZES if args.quick else kernels.FULL_BLOCK_SIZES),
            providers=providers,
        )
    )
    return run_cases(
        "optimizer",
        cases,
        lambda case: optimizer.run_case(case, device, timing_kwargs, args.seed, backend),
        file,
        backend,
        device,
        args.no_progress,
        deadline,
        commands,
    )


def _training_configs(args) -> list[str]:
    from . import training

    return args.configs or list(training.QUICK_CONFIGS if args.quick else training.FULL_CONFIGS)


def _training_block_size(args) -> int:
    return args.training_block_size or (32 if args.quick else 64)


def _run_training(args, device, backend, dtype, out_dir, deadline, commands) -> int:
    from . import training
    from .results import training_file

    file = training_file(out_dir)
    quick = args.quick
    cases = list(
        training.training_cases(
            _training_configs(args),
            args.methods or training.METHODS,
            args.densities or (training.QUICK_DENSITIES if quick else training.FULL_DENSITIES),
            _training_block_size(args),
            args.batch_size or (2 if quick else 16),
            args.seq_len or (32 if quick else 256),
            dtype,
            compiled=MODES[args.compile],
            activation_checkpointing=MODES[args.activation_checkpointing],
        )
    )
    steps = args.steps or (3 if quick else 10)
    return run_cases(
        "training",
        cases,
        lambda case: training.run_case(case, device, backend, steps, args.seed),
        file,
        backend,
        device,
        args.no_progress,
        deadline,
        commands,
    )


def _validate(args) -> None:
    """Reject bad options up front (:func:`usage_error` naming the option) rather than failing case by case."""
    from smet_kernels.layout import SUPPORTED_BLOCK_SIZES
    from smet_kernels.train.config import check_output_folder
    from smet_kernels.train.model import MODEL_CONFIGS, model_config

    from . import kernels, optimizer, training

    _refuse_unknown("--suites", args.suites, SUITES)
    if args.out_dir is not None:
        from .results import check_results_files

        try:
            check_output_folder(args.out_dir, "--out-dir")
            check_results_files(args.out_dir, kernels=bool({"kernels", "optimizer"} & set(args.suites)),
                                training="training" in args.suites)  # fmt: skip
        except ValueError as error:
            usage_error(error)
    _refuse_unknown("--providers", args.providers, (*kernels.PROVIDERS, *optimizer.PROVIDERS))
    for suite, suite_providers in (("kernels", kernels.PROVIDERS), ("optimizer", optimizer.PROVIDERS)):
        if args.providers and suite in args.suites and not set(args.providers) & set(suite_providers):
            usage_error(f"--providers {','.join(args.providers)} names no provider of the {suite} suite (from "
                        f"{','.join(suite_providers)}): add one, or leave {suite} out of --suites")
    _refuse_unknown("--configs", args.configs, MODEL_CONFIGS)
    _refuse_unknown("--methods", args.methods, training.METHODS)
    if args.densities and any(not 0.0 < d <= 1.0 for d in args.densities):
        usage_error(f"--densities must lie in (0, 1], got {args.densities}")
    _refuse_unknown("--block-sizes", args.block_sizes, SUPPORTED_BLOCK_SIZES)
    if {"kernels", "optimizer"} & set(args.suites):  # a block size no shape takes would leave only dense rows
        from smet_kernels.train.model import linear_shapes

        configs = args.configs or (kernels.QUICK_CONFIGS if args.quick else kernels.FULL_CONFIGS)
        shapes = linear_shapes(configs) if "kernels" in args.suites else optimizer.optimizer_shapes(configs)
        block_sizes = args.block_sizes or (kernels.QUICK_BLOCK_SIZES if args.quick else kernels.FULL_BLOCK_SIZES)
        if unused := [b for b in block_sizes if all(s.N % b or s.K % b for s in shapes)]:
            usage_error(f"--block-sizes {','.join(map(str, unused))} divides no weight shape of --configs "
                        f"{','.join(configs)} ({', '.join(f'{s.label} {s.N}x{s.K}' for s in shapes)}): no sparse "
                        "case would run")
    _refuse_unknown("--training-block-size", [args.training_block_size] if args.training_block_size is not None
                    else [], SUPPORTED_BLOCK_SIZES)
    for option, mode in (("--compile", args.compile), ("--activation-checkpointing", args.activation_checkpointing)):
        if mode != "off" and "training" not in args.suites:
            usage_error(f"{option} {mode} applies to the training suite, which --suites {','.join(args.suites)} "
                        "leaves out")
    if "training" in args.suites:
        block_size = _training_block_size(args)
        for config in _training_configs(args):
            try:
                model_config(config, block_size=block_size)
            except ValueError as error:
                usage_error(f"--training-block-size {block_size}: {error}")
    try:
        check_minutes(args.max_minutes, "--max-minutes")
    except ValueError as error:
        usage_error(error)
    for option, values in (
        ("--tokens", args.tokens),
        ("--batch-size", [args.batch_size]),
        ("--seq-len", [args.seq_len]),
        ("--steps", [args.steps]),
    ):
        if any(v is not None and v < 1 for v in values or []):
            usage_error(f"{option} must be positive, got {values}")


def prepare_device(name: str | None, backend: str) -> tuple[torch.device, str]:
    """The device of ``--device`` (made the current GPU) and the smet_kernels backend that runs there (``auto``:
    Triton where it can run); on a CPU the Triton interpreter is switched on first. A bad ``SMET_BACKEND`` or
    ``SMET_MATMUL_VARIANT`` ends the command here, not each case that reads it."""
    _prepare_interpreter(name, backend)
    from smet_kernels.backend import resolve_backend, resolve_device
    from smet_kernels.ops.variant import default_variant

    try:
        device = resolve_device(name, "--device")
    except ValueError as error:
        usage_error(error)
    if device.type == "cuda" and device.index is not None:  # what launches on the current GPU runs on --device
        torch.cuda.set_device(device)  # (torch's BSR kernels launch Triton there)
    try:
        default_variant()
        return device, resolve_backend(device, None if backend == "auto" else backend)
    except ValueError as error:  # the SMET_MATMUL_VARIANT or SMET_BACKEND environment variable
        usage_error(error)


def run(args) -> int:
    device, backend = prepare_device(args.device, args.backend)
    from profiling.memory_model import parse_dtype

    from .kernels import dtype_name
    from .results import device_slug

    # the default folder is checked like a given one (a CSV of another release in it is refused before any suite)
    args.out_dir = args.out_dir or str(Path("reports") / device_slug(device))
    _validate(args)
    dtype = parse_dtype(args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
    out_dir = make_out_dir(args.out_dir)
    commands = CommandLog(out_dir, getattr(args, "argv", None))
    if device.type == "cpu" and not args.quick:
        print(
            "smet-bench: warning: without --quick the defaults are the full GPU grid, which takes days on a CPU; "
            "add --quick for a grid that finishes in minutes",
            file=sys.stderr,
        )
    if device.type == "cuda":
        timing_kwargs = {}
    else:
        timing_kwargs = {"warmup": 1, "min_repeats": 3, "max_repeats": 20, "budget_s": 0.05 if args.quick else 0.5}
    print(f"smet-bench: device {device}, backend {backend}, dtype {dtype_name(dtype)}, out-dir {out_dir}")
    deadline = Deadline(args.max_minutes)
    failures = 0
    if "kernels" in args.suites:
        failures += _run_kernels(args, device, backend, dtype, out_dir, timing_kwargs, deadline, commands)
    if "optimizer" in args.suites:
        failures += _run_optimizer(args, device, backend, out_dir, timing_kwargs, deadline, commands)
    if "training" in args.suites:
        failures += _run_training(args, device, backend, dtype, out_dir, deadline, commands)
    if failures:
        print(f"smet-bench: {failures} case(s) failed (see above); rerun to retry them", file=sys.stderr)
        return 1
    if deadline.hit:
        print(f"smet-bench: stopped after --max-minutes {args.max_minutes:g}; rerun the same command to resume")
        return 0
    print(f"smet-bench: results in {out_dir}; render with: smet-bench report --out-dir {out_dir}")
    return 0


def _route_interpreter_early(argv: list[str]) -> None:
    """Read ``--device`` / ``--backend`` of ``run`` and ``gpu-check`` before the parser is built: the parser lists the
    method registry, which imports smet_kernels, and the interpreter must be on before that import."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("command", nargs="?")
    early.add_argument("--device", default=None)
    early.add_argument("--backend", default="auto")
    known, _ = early.parse_known_args(argv)
    if known.command in ("run", "gpu-check"):
        _prepare_interpreter(known.device, known.backend)


def _refuse_unknown(option: str, given, allowed) -> None:
    """One line naming the values of ``option`` that are not in ``allowed`` (listed in their catalogue order)."""
    from smet_kernels.train.config import check_choices

    try:
        check_choices(option, given, allowed)
    except ValueError as error:
        usage_error(error)


def _check_reports_extra() -> None:
    """smet-bench's tables and plots need the ``reports`` extra: one line naming what is missing, not a traceback."""
    missing = [name for name in REPORTS_EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        usage_error(f"needs the reports extra ({', '.join(missing)} not installed): pip install -e \".[reports]\"")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _check_reports_extra()
    _route_interpreter_early(argv)
    from smet_kernels.train.cli import one_line_warnings  # after the interpreter is routed

    from .results import ResultsWarning

    with one_line_warnings("smet-bench", (ResultsWarning,)):
        return _main(argv)


def console_main(argv: list[str] | None = None) -> None:
    """The ``smet-bench`` command: :func:`main`; a Ctrl-C ends in one line and by SIGINT
    (:func:`smet_kernels.train.cli.end_interrupted`, imported only then: smet_kernels is imported after :func:`main`
    has routed the Triton interpreter)."""
    try:
        code = main(argv)
    except KeyboardInterrupt:
        from smet_kernels.train.cli import end_interrupted

        end_interrupted("smet-bench: interrupted; the rows and runs finished so far are kept: rerun the same command "
                        "to continue")
    sys.exit(code)


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "stability":
        from .stability import main_from_args

        return main_from_args(args, "smet-bench", argv)
    if args.command == "memory":
        from .memory_scaling import main_from_args as memory_main

        return memory_main(args, "smet-bench", argv)
    if args.command == "run":
        args.argv = argv
        return run(args)
    if args.command == "gpu-check":
        from .gpu_check import run as run_gpu_check

        return run_gpu_check(args, argv)
    from .report import write_report

    if not Path(args.out_dir).is_dir():
        usage_error(f"--out-dir {args.out_dir!r} is not a folder")
    try:
        path = write_report(args.out_dir, benchmark_json=args.benchmark_json)
    except (ValueError, FileNotFoundError) as err:
        usage_error(err)
    print(f"smet-bench: wrote {path}")
    return 0


if __name__ == "__main__":
    console_main()
