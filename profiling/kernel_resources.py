"""Static resource report of the library's Triton kernels, compiled ahead of time for a GPU target — no GPU needed.

Each kernel × dtype × block size × autotune config is compiled with ``triton.compile`` for ``sm_<arch>`` (ptxas ships
with Triton) and its cubin read back with ``cuobjdump``. Per variant the report gives shared memory, registers,
stack bytes (``> 0``: register spills or a stack frame), and what the main loop became: tensor-core instructions
(``wgmma`` on Hopper, ``mma.sync`` before) and asynchronous copies (``cp.async``: a software-pipelined loop; TMA
``cp.async.bulk``); for the elementwise kernels, vectorised global loads (``ld.global.v2/v4``). Integer and
pointer arguments are assumed 16-divisible, as Triton's JIT specialises them for the benchmark shapes (M = 8192,
K = N = 4096); a variant that is not pipelined under that assumption never will be.
Each case is named after its op (``bsmm_forward``, ``bsmm_grad_input``, ``bsmm_grad_weight`` with a variant suffix,
``adamw_step[<warm-up>]``, ``regrow_blocks``); signatures are read from the kernels' parameters
(:func:`kernel_signature`), autotune spaces and pruning rules from :mod:`smet_kernels.ops.launch_config`.

    python -m profiling.kernel_resources --arch 90 --dtypes bf16 --out-dir reports/static-sm90   # the committed report

These are compiler facts, not timings: they tell whether a kernel can run at speed (no spills, pipelined, fits in
shared memory) and which autotune configs the shared-memory pruner keeps, before any GPU time is spent.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton
import triton.language as tl

from smet_kernels.ops import launch_config
from smet_kernels.ops.adamw import TL_DTYPES, WARMUP_CODES, adamw_step_kernel
from smet_kernels.ops.block_sparse_matmul import (
    bsmm_dense_sparse_kernel,
    bsmm_dense_sparse_persistent_kernel,
    bsmm_dense_sparse_tma_kernel,
    bsmm_grad_weight_kernel,
    bsmm_grad_weight_tma_kernel,
)
from smet_kernels.ops.regrow import regrow_blocks_kernel

from .memory_model import parse_dtype

SHARED_MEMORY_LIMIT = launch_config.SHARED_MEMORY_LIMITS
DTYPES = ("bf16", "fp16", "fp32")  # operand dtypes, by the names the kernel signatures use (parse_dtype)
DEFAULT_BLOCK_SIZES = [16, 32, 64, 128]
INSTRUCTIONS = {
    "wgmma": "wgmma.mma_async",
    "mma_sync": "mma.sync",
    "cp_async": "cp.async.cg",
    "tma": "cp.async.bulk",
    "vector_loads": "ld.global.v",
}
MATMUL_KERNELS = {  # report name (op and variant) -> the kernel that serves it
    "bsmm_forward": bsmm_dense_sparse_kernel,
    "bsmm_forward_persistent": bsmm_dense_sparse_persistent_kernel,
    "bsmm_forward_tma": bsmm_dense_sparse_tma_kernel,
    "bsmm_grad_input": bsmm_dense_sparse_kernel,
    "bsmm_grad_input_persistent": bsmm_dense_sparse_persistent_kernel,
    "bsmm_grad_input_tma": bsmm_dense_sparse_tma_kernel,
}
KERNELS = [*MATMUL_KERNELS, "bsmm_grad_weight", "bsmm_grad_weight_split_k", "bsmm_grad_weight_tma", "adamw_step",
           "regrow_blocks"]
#: argument types that do not follow the rule of :func:`kernel_signature` (pointers to the operand dtype, int32
#: scalars): the int32 block-index tables of a layout, the AdamW tables (int64 addresses and sizes, fp32 per-tensor
#: scalars, int32 work items) and regrow's fp32 draws and state, int32 steps and int64 slots
ARGUMENT_TYPES = {
    "index_ptr_ptr": "*i32", "index_slots_ptr": "*i32", "index_minor_ptr": "*i32", "order_ptr": "*i32",
    "block_indices_ptr": "*i32",
    "pointers_ptr": "*i64", "sizes_ptr": "*i64", "scalars_ptr": "*fp32", "work_ptr": "*i32",
    "new_values_ptr": "*fp32", "exp_avg_ptr": "*fp32", "exp_avg_sq_ptr": "*fp32", "block_step_ptr": "*i32",
    "slots_ptr": "*i64",
}  # fmt: skip
FIELDS = [
    "kernel", "dtype", "block_size", "BLOCK_M", "num_warps", "num_stages", "kept_by_pruner", "arch",
    "shared_bytes", "fits_shared", "registers", "stack_bytes", *INSTRUCTIONS, "triton", "ptxas",
]


class ToolchainMissing(RuntimeError):
    """Triton's NVIDIA backend (ptxas, cuobjdump) is not available in this installation."""


@dataclass
class KernelCase:
    """One compilation: a ``@triton.jit`` function, its argument types and constexprs, and launch options."""

    kernel: str
    fn: object  # a @triton.jit kernel, autotuned or not; the jit function itself after __post_init__
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int
    num_stages: int
    dtype: str
    block_size: int | None = None
    block_m: int | None = None
    kept_by_pruner: bool | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.fn = _jit_function(self.fn)
        missing = [name for name in self.fn.arg_names if name not in self.signature]
        unknown = [name for name in self.signature if name not in self.fn.arg_names]
        if missing or unknown:
            raise ValueError(
                f"signature of {self.kernel} is out of date with the kernel: missing {missing}, unknown {unknown}"
            )
        self.signature = {name: self.signature[name] for name in self.fn.arg_names}


def _jit_function(kernel):
    """The ``@triton.jit`` function behind a kernel (unwraps the autotuner)."""
    return kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel


def kernel_signature(
    kernel, operand: str, descriptors: dict | None = None, types: dict | None = None,
    scalar: str = "i32",
) -> dict[str, str]:
    """The compile signature of ``kernel``, read from its parameters: constexprs as such, ``*_desc`` TMA
    descriptors of ``operand`` with the box shape given in ``descriptors``, other arguments typed by ``types`` or
    :data:`ARGUMENT_TYPES`, else ``*_ptr`` as pointers to ``operand`` and scalars as ``scalar``."""
    types = {**ARGUMENT_TYPES, **(types or {})}
    signature = {}
    for name, parameter in inspect.signature(_jit_function(kernel).fn).parameters.items():
        if parameter.annotation in (tl.constexpr, "tl.constexpr"):
            signature[name] = "constexpr"
        elif name in types:
            signature[name] = types[name]
        elif name.endswith("_desc"):
            signature[name] = f"tensordesc<{operand}{list((descriptors or {})[name])}>"
        else:
            signature[name] = "*" + operand if name.endswith("_ptr") else scalar
    return signature


def matmul_cases(dtypes: list[str], block_sizes: list[int], arch: int = 90) -> list[KernelCase]:
    """Every GPU autotune config of the block-sparse matmul kernels, marked kept or pruned for ``sm_<arch>``."""
    limit = SHARED_MEMORY_LIMIT.get(arch, launch_config.HOPPER_SHARED_MEMORY)
    cases = []
    for dtype_name in dtypes:
        dtype, t = parse_dtype(dtype_name), dtype_name
        flags = launch_config.precision_flags(dtype, interpret=False)
        probe = {"a": torch.empty(0, dtype=dtype)}
        for b in block_sizes:
            configs = launch_config.matmul_configs(launch_config.DENSE_SPARSE_BLOCK_MS, interpret=False)
            for name, kernel in MATMUL_KERNELS.items():
                prune = launch_config.prune_persistent_configs if name.endswith("_persistent") else \
                    launch_config.prune_configs
                kept = prune(configs, probe, limit, BLOCK_SIZE=b)
                transpose = name.startswith("bsmm_forward")
                for config in configs:
                    block_m = config.kwargs["BLOCK_M"]
                    constexprs = {"HAS_BIAS": transpose, "TRANSPOSE_BLOCKS": transpose, "BLOCK_SIZE": b, **flags,
                                  "GROUP_M": launch_config.GROUP_M, **config.kwargs}
                    descriptors = {"a_desc": (block_m, b), "values_desc": (b, b), "out_desc": (block_m, b)}
                    signature = kernel_signature(kernel, t, descriptors)
                    cases.append(KernelCase(name, kernel, signature, constexprs, config.num_warps,
                                            config.num_stages, dtype_name, b, block_m, config in kept))
            configs = launch_config.matmul_configs(launch_config.GRAD_WEIGHT_BLOCK_MS, interpret=False)
            kept = launch_config.prune_grad_weight_configs(configs, probe, limit, BLOCK_SIZE=b)
            for name, kernel, split_k, out_type in (
                ("bsmm_grad_weight", bsmm_grad_weight_kernel, 1, t),
                ("bsmm_grad_weight_split_k", bsmm_grad_weight_kernel, 2, "fp32"),  # fp32 partial sums
                ("bsmm_grad_weight_tma", bsmm_grad_weight_tma_kernel, 1, t),
            ):
                for config in configs:
                    block_m = config.kwargs["BLOCK_M"]
                    constexprs = {"BLOCK_SIZE": b, "SPLIT_K": split_k, **flags, **config.kwargs}
                    descriptors = {"dy_desc": (block_m, b), "x_desc": (block_m, b), "out_desc": (b, b)}
                    signature = kernel_signature(kernel, t, descriptors, {"out_ptr": "*" + out_type})
                    cases.append(KernelCase(name, kernel, signature, constexprs, config.num_warps,
                                            config.num_stages, dtype_name, b, block_m, config in kept))
    return cases


def optimizer_cases(dtypes: list[str]) -> list[KernelCase]:
    """The fused AdamW kernel (each warm-up mode; fp32 states) and the regrow kernel, at their GPU launch settings
    (:mod:`smet_kernels.ops.launch_config`)."""
    cases = []
    for dtype_name in dtypes:
        t = dtype_name
        for warmup, code in WARMUP_CODES.items():
            constexprs = {"PARAM_DTYPE": TL_DTYPES[parse_dtype(dtype_name)], "STATE_DTYPE": tl.float32, "WARMUP": code,
                          "ALIGNED": True, "STEP_PER_TILE": True, "TILE": launch_config.ADAMW_GPU_TILE}
            signature = kernel_signature(adamw_step_kernel, t, scalar="fp32")
            cases.append(KernelCase(f"adamw_step[{warmup}]", adamw_step_kernel, signature, constexprs,
                                    launch_config.ADAMW_NUM_WARPS, 3, dtype_name))
        constexprs = {"HAS_NEW_VALUES": True, "HAS_EXP_AVG": True, "HAS_EXP_AVG_SQ": True, "HAS_BLOCK_STEP": True,
                      "TILE": launch_config.REGROW_MAX_TILE}
        signature = kernel_signature(regrow_blocks_kernel, t)
        cases.append(KernelCase("regrow_blocks", regrow_blocks_kernel, signature, constexprs,
                                launch_config.REGROW_NUM_WARPS, 3, dtype_name))
    return cases


def _toolchain(arch: int) -> tuple[str, str]:
    """Paths of cuobjdump and the ptxas version string, or :class:`ToolchainMissing`."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        cuobjdump = triton.knobs.nvidia.cuobjdump.path
        ptxas = get_ptxas(arch)
        ptxas_version = ptxas.version
        usage = subprocess.run([ptxas.path, "--help"], capture_output=True, text=True).stdout
    except Exception as error:  # any failure here means no usable NVIDIA toolchain
        raise ToolchainMissing(f"Triton's NVIDIA toolchain is not usable here: {error}") from error
    match = re.search(r"release ([\d.]+)", ptxas_version)
    # an arch ptxas has no target for failed at the first compile, with a PTXASError traceback
    targets = sorted({int(number) for number in re.findall(r"'sm_(\d+)'", usage)})
    if targets and arch not in targets:
        from smet_kernels.train.config import ConfigError

        raise ConfigError(f"--arch {arch}: ptxas has no sm_{arch} target (it has {', '.join(map(str, targets))})")
    return cuobjdump, match.group(1) if match else ptxas_version.strip().splitlines()[-1]


def _resource_usage(cuobjdump: str, cubin: bytes) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        output = subprocess.run([cuobjdump, "--dump-resource-usage", str(path)], capture_output=True, text=True,
                                check=True).stdout
    usage = dict(re.findall(r"(\w+):(\d+)", next(line for line in output.splitlines() if "REG:" in line)))
    return {"registers": int(usage["REG"]), "stack_bytes": int(usage["STACK"]) + int(usage.get("LOCAL", 0))}


def compile_case(case: KernelCase, arch: int, cuobjdump: str) -> dict:
    """Compile ``case`` for ``sm_<arch>`` and return its report row (without the version columns)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    aligned = {
        (index,): [["tt.divisibility", 16]]
        for index, name in enumerate(case.fn.arg_names)
        if case.signature[name] not in ("constexpr", "fp32") and not case.signature[name].startswith("tensordesc")
    }
    source = ASTSource(fn=case.fn, signature=case.signature, constexprs=case.constexprs, attrs=aligned)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": case.num_warps, "num_stages": case.num_stages})
    ptx = compiled.asm["ptx"]
    shared = int(compiled.metadata.shared)
    limit = SHARED_MEMORY_LIMIT.get(arch)
    return {
        "kernel": case.kernel,
        "dtype": case.dtype,
        "block_size": case.block_size,
        "BLOCK_M": case.block_m,
        "num_warps": case.num_warps,
        "num_stages": case.num_stages,
        "kept_by_pruner": case.kept_by_pruner,
        "arch": f"sm_{arch}",
        "shared_bytes": shared,
        "fits_shared": None if limit is None else shared <= limit,
        **_resource_usage(cuobjdump, compiled.asm["cubin"]),
        **{column: ptx.count(instruction) for column, instruction in INSTRUCTIONS.items()},
    }


def collect(
    arch: int,
    dtypes: list[str],
    block_sizes: list[int],
    kernels: list[str] | None = None,
    configs: list[tuple[int, int, int]] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Report rows for every case (optionally only ``kernels`` and matmul ``configs`` ``(BLOCK_M, warps, stages)``).

    Each row carries the Triton and ptxas versions. Compilation needs the real Triton frontend: run it in a process
    without ``TRITON_INTERPRET=1`` (the interpreter replaces ``@triton.jit`` functions at import).
    """
    from tqdm import tqdm

    from smet_kernels.train.config import ConfigError

    selected = [case for case in matmul_cases(dtypes, block_sizes, arch) + optimizer_cases(dtypes)
                if kernels is None or case.kernel.split("[")[0] in kernels]  # fmt: skip
    space = list(dict.fromkeys((c.block_m, c.num_warps, c.num_stages) for c in selected if c.block_m is not None))
    if unknown := [config for config in configs or [] if config not in space]:
        def named(items):
            return ",".join(":".join(map(str, config)) for config in items)

        raise ConfigError(f"--configs {named(unknown)} not in the autotune space of the selected matmul kernels "
                          f"({named(space) or 'none: --kernels names no matmul kernel'})")
    cuobjdump, ptxas_version = _toolchain(arch)
    if triton.knobs.runtime.interpret:
        raise ToolchainMissing("kernels cannot be compiled with TRITON_INTERPRET=1 set: run in a process without it")
    cases = [case for case in selected
             if configs is None or case.block_m is None or (case.block_m, case.num_warps, case.num_stages) in configs]
    rows = []
    for case in tqdm(cases, desc=f"compiling for sm_{arch}", disable=not progress):
        row = compile_case(case, arch, cuobjdump)
        row.update(triton=triton.__version__, ptxas=ptxas_version)
        rows.append(row)
    return rows


def _summary(rows: list[dict]) -> list[dict]:
    """Per kernel/dtype/block size: configs kept by the pruner, and how many of them spill / are not pipelined."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["kernel"], row["dtype"], row["block_size"]), []).append(row)
    summary = []
    for (kernel, dtype, b), members in groups.items():
        kept = [r for r in members if r["kept_by_pruner"] is not False]
        if not kept:
            continue
        fitting_pruned = [r for r in members if r["kept_by_pruner"] is False and r["fits_shared"]]
        summary.append({
            "kernel": kernel, "dtype": dtype, "block_size": b if b is not None else "-",
            "configs kept": f"{len(kept)}/{len(members)}",
            "kept but too big": sum(1 for r in kept if r["fits_shared"] is False),
            "pruned, fitting shared memory": len(fitting_pruned),
            "kept spilling": sum(1 for r in kept if r["stack_bytes"] > 0),
            "kept not pipelined": "-" if b is None else sum(1 for r in kept if r["cp_async"] + r["tma"] == 0),
            "tensor cores": "wgmma" if all(r["wgmma"] for r in kept) else
                            "mma.sync" if all(r["mma_sync"] or r["wgmma"] for r in kept) else "no",
            "vector loads": "-" if b is not None else min(r["vector_loads"] for r in kept),
            "max shared KiB": round(max(r["shared_bytes"] for r in kept) / 1024, 1),
            "max regs": max(r["registers"] for r in kept),
        })
    return summary


def write_report(rows: list[dict], out_dir: Path, arch: int, command: str | None = None) -> Path:
    """``kernel_resources.csv`` (one row per compiled variant) and ``kernel_resources.md`` (summary tables);
    ``command``, the command line that made ``rows``, goes into the report as "Regenerate with"."""
    from tabulate import tabulate

    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "kernel_resources.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    versions = sorted({(r["triton"], r["ptxas"]) for r in rows})
    matmul = [r for r in rows if r["block_size"] is not None]
    shown = "bf16" if any(r["dtype"] == "bf16" for r in matmul) else next((r["dtype"] for r in matmul), "bf16")
    lines = [
        f"# Static kernel resources, sm_{arch}",
        "",
        "Compiled ahead of time with `triton.compile` (no GPU); "
        + ", ".join(f"Triton {t}, ptxas {p}" for t, p in versions) + ". "
        + (f"Regenerate with `{command}`. " if command else "") + "Compiler facts, not timings: "
        "`stack` > 0 means register spills, `cp_async`/`tma` = 0 means the main loop is not software-pipelined. "
        f"Shared-memory limit per block on sm_{arch}: {SHARED_MEMORY_LIMIT.get(arch, 'unknown')} bytes.",
        "",
        "## Summary per kernel",
        "",
        tabulate(_summary(rows), headers="keys", tablefmt="github"),
        "",
        f"## Matmul autotune configs ({shown})",
        "",
        tabulate(
            [{k: r[k] for k in ("kernel", "block_size", "BLOCK_M", "num_warps", "num_stages", "kept_by_pruner",
                                "shared_bytes", "fits_shared", "registers", "stack_bytes", "wgmma", "cp_async")}
             for r in matmul if r["dtype"] == shown],
            headers="keys", tablefmt="github",
        ),
        "",
    ]
    path = out_dir / "kernel_resources.md"
    path.write_text("\n".join(lines))
    return path


def _config(text: str) -> tuple[int, int, int]:
    try:
        block_m, warps, stages = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BLOCK_M:WARPS:STAGES such as 128:8:3, got {text!r}") from None
    return block_m, warps, stages


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m profiling.kernel_resources",
        description="Compile every Triton kernel of smet_kernels for a GPU architecture without a GPU and report "
                    "shared memory, registers, spills and whether the main loops are pipelined tensor-core loops.",
    )
    parser.add_argument("--arch", type=int, default=90,
                        help="target compute capability as an int, e.g. 90 = H100, 80 = A100 (default: 90)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES), metavar="DTYPE",
                        help=f"operand dtypes to compile, from {' '.join(DTYPES)} (default: all)")
    parser.add_argument("--block-sizes", nargs="+", type=int, choices=DEFAULT_BLOCK_SIZES, default=None, metavar="B",
                        help="block sizes b of the matmul kernels "
                        f"(default: {' '.join(map(str, DEFAULT_BLOCK_SIZES))})")
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=None, metavar="KERNEL",
                        help=f"only these kernels, from {' '.join(KERNELS)} (default: all)")
    parser.add_argument("--configs", nargs="+", type=_config, default=None, metavar="BLOCK_M:WARPS:STAGES",
                        help="only these matmul autotune configs, e.g. 128:8:3 (default: the whole autotune space)")
    parser.add_argument("--out-dir", type=Path, required=True,
                        help="folder for kernel_resources.csv and kernel_resources.md (required; no default)")
    return parser


def regenerate_command(args: argparse.Namespace) -> str:
    """The command line that reproduces ``args``: arch, dtypes and out-dir, plus block sizes, kernels and configs
    when they were given."""
    parts = ["python", "-m", "profiling.kernel_resources", "--arch", str(args.arch), "--dtypes", *args.dtypes]
    if args.block_sizes:
        parts += ["--block-sizes", *map(str, args.block_sizes)]
    if args.kernels:
        parts += ["--kernels", *args.kernels]
    if args.configs:
        parts += ["--configs", *(":".join(map(str, config)) for config in args.configs)]
    return shlex.join([*parts, "--out-dir", str(args.out_dir)])


def main(argv: list[str] | None = None) -> int:
    from smet_kernels.train.config import ConfigError, check_output_folder

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_output_folder(args.out_dir, "--out-dir")
        rows = collect(args.arch, args.dtypes, args.block_sizes or DEFAULT_BLOCK_SIZES, args.kernels, args.configs)
    except (ConfigError, ToolchainMissing) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(write_report(rows, args.out_dir, args.arch, regenerate_command(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
