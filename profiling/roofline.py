"""Roofline lower bounds of the block-sparse linear kernels: the time no implementation can beat.

For tokens ``x [M, K]``, a weight ``W [N, K]`` with ``nnz`` active ``b × b`` blocks (density ``d``) and ``e`` bytes
per element, each op must do its useful FLOPs and move its compulsory HBM bytes at least once:

==============  ==================  ==========================================================================
op              FLOPs               compulsory bytes
==============  ==================  ==========================================================================
forward         ``2 M K N d``       read the ``x`` columns of non-empty block columns, the values; write ``y``
grad_input      ``2 M K N d``       read the ``dy`` columns of non-empty block rows, the values; write ``dx``
grad_weight     ``2 M K N d``       read those ``dy`` and ``x`` columns; write ``dvalues`` (``nnz b² e``)
==============  ==================  ==========================================================================

``bound = max(FLOPs / P, bytes / B)`` with ``P`` the attainable tensor-core rate and ``B`` the attainable memory
bandwidth. The dense product (cuBLAS) is bounded the same way (``2 M K N`` FLOPs; read ``x``, ``W``, write ``y``)
and is compute-bound at these shapes. A bar of ``c × d × dense`` can only be met where
``sparse bound ≤ c × d × dense time``; with the dense time at its own bound that is ``ratio = sparse bound /
(d × dense bound) ≤ c``, and otherwise only if cuBLAS runs at no more than ``c / ratio`` of its roofline at that
shape (``max_dense_efficiency``). At low density the output write (``M N e`` for the forward, independent of ``d``)
makes the sparse products memory-bound.

    python -m profiling.roofline --out-dir reports/roofline-h200-anchors

Defaults for ``P`` and ``B`` are the SPEC §7 anchors of the project's GPU, an H200 (bf16 8192³ matmul 769–798
TFLOP/s, device copy ~4.3 TB/s); the H100's were ~730 TFLOP/s and ~3.0 TB/s. Pass the ceilings measured in the same
run as the kernels (``smet-bench``'s ``cublas_dense`` and ``device_copy`` rows) when they exist.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from smet_kernels.layout import BlockLayout

OPS = ("forward", "grad_input", "grad_weight")
H200_TFLOPS = 780.0  # bf16 8192x8192x8192 matmul through PyTorch on an H200 (SPEC §7: 769-798 TFLOP/s)
H200_TBPS = 4.3  # device-to-device copy, bytes read + written (SPEC §7)
# the kernel bars of the project (× d × dense): ≤ 1.25 at d = 0.5 / 0.25, ≤ 1.6 at d = 0.1
BARS = {0.5: 1.25, 0.25: 1.25, 0.1: 1.6}


@dataclass(frozen=True)
class Roofline:
    """Lower bound of one op: FLOPs, compulsory bytes and the time each ceiling allows (seconds)."""

    op: str
    flops: float
    bytes: float
    compute_s: float
    memory_s: float

    @property
    def bound_s(self) -> float:
        return max(self.compute_s, self.memory_s)

    @property
    def limited_by(self) -> str:
        return "memory" if self.memory_s > self.compute_s else "compute"


def compulsory_bytes(op: str, m: int, n: int, k: int, block_size: int, nnz: int, element_size: int,
                     used_rows: float, used_cols: float) -> float:
    """HBM bytes ``op`` must move at least once: ``used_rows`` / ``used_cols`` are the block rows / columns of
    ``W [n, k]`` that hold an active block (only their activation columns are read)."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    b = block_size
    moved = {
        "forward": m * used_cols * b + m * n,  # read x, write y (every column of y: empty block rows get zeros)
        "grad_input": m * used_rows * b + m * k,  # read dy, write dx
        "grad_weight": m * used_rows * b + m * used_cols * b,  # read dy and x; dvalues below
    }[op]
    return float((moved + nnz * b * b) * element_size)


def expected_used_lines(lines: int, per_line: int, nnz: int) -> float:
    """Expected number of the ``lines`` block rows (or columns) of ``per_line`` blocks each that hold at least one of
    ``nnz`` blocks placed uniformly at random without repetition: ``lines · (1 − C(T − per_line, nnz) / C(T, nnz))``
    with ``T = lines · per_line`` (the benchmark's random layouts)."""
    total = lines * per_line
    if nnz > total - per_line:
        return float(lines)
    log_empty = (math.lgamma(total - per_line + 1) - math.lgamma(total - per_line - nnz + 1)
                 - math.lgamma(total + 1) + math.lgamma(total - nnz + 1))
    return lines * (1.0 - math.exp(log_empty))


def sparse_roofline(op: str, m: int, layout: BlockLayout, element_size: int, tflops: float, tbps: float) -> Roofline:
    """The roofline of ``op`` at ``m`` tokens over ``layout``."""
    n, k = layout.shape
    b = layout.block_size
    mask = layout.mask
    moved = compulsory_bytes(op, m, n, k, b, layout.nnz, element_size, int(mask.any(1).sum()), int(mask.any(0).sum()))
    flops = 2.0 * m * layout.nnz * b * b
    return Roofline(op, flops, moved, flops / (tflops * 1e12), moved / (tbps * 1e12))


def dense_roofline(m: int, n: int, k: int, element_size: int, tflops: float, tbps: float) -> Roofline:
    """The dense product ``y = x Wᵀ``: ``2 M K N`` FLOPs; read ``x`` and ``W``, write ``y``."""
    flops = 2.0 * m * n * k
    moved = (m * k + n * k + m * n) * element_size
    return Roofline("dense", flops, float(moved), flops / (tflops * 1e12), moved / (tbps * 1e12))


def bar_rows(config_names, densities, tokens, block_size, element_size, tflops, tbps, seed=0) -> list[dict]:
    """One row per (shape, tokens, density, op): the bound in µs and in units of ``d × dense``, and the bar."""
    import torch

    from smet_kernels.train.model import linear_shapes

    rows = []
    for shape in linear_shapes(config_names):
        for d in densities:
            layout = BlockLayout.random(shape.N, shape.K, block_size, d, generator=torch.Generator().manual_seed(seed))
            for m in tokens:
                dense = dense_roofline(m, shape.N, shape.K, element_size, tflops, tbps).bound_s
                for op in OPS:
                    line = sparse_roofline(op, m, layout, element_size, tflops, tbps)
                    bar = BARS.get(d)
                    ratio = line.bound_s / (layout.density * dense)
                    # min(1, c / ratio), below 1 whenever the bound exceeds the bar c: 0.996 must not round to 1.0
                    efficiency = None if bar is None else 1.0 if ratio <= bar else min(round(bar / ratio, 2), 0.99)
                    rows.append({
                        "shape": shape.label, "M": m, "K": shape.K, "N": shape.N, "density": d, "op": op,
                        "sparse_bound_us": round(line.bound_s * 1e6, 1), "limited_by": line.limited_by,
                        "dense_bound_us": round(dense * 1e6, 1), "bound_vs_d_dense": round(ratio, 2),
                        "bar_vs_d_dense": bar,
                        "max_dense_efficiency": efficiency,
                    })
    return rows


def write_report(rows: list[dict], out_dir: Path, command: str, tflops: float, tbps: float) -> Path:
    """``roofline.csv`` and ``roofline.md`` (tabulate) in ``out_dir``."""
    import csv

    from tabulate import tabulate

    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "roofline.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    barred = [r for r in rows if r["max_dense_efficiency"] is not None]
    beyond = [r for r in barred if r["max_dense_efficiency"] < 1.0]
    lines = [
        "# Roofline bounds of the block-sparse kernels",
        "",
        f"Ceilings: {tflops:g} TFLOP/s (tensor cores, attainable), {tbps:g} TB/s (HBM, attainable). Generated by "
        f"`{command}`. `bound_vs_d_dense` is the lowest time any kernel can reach, in units of `d ×` the dense "
        "product's own bound; `limited_by` names the ceiling that sets it. Where it exceeds the bar "
        "(`bar_vs_d_dense`), the bar can be met only if cuBLAS runs at no more than `max_dense_efficiency` of its "
        "roofline at that shape (cuBLAS reaches ~0.9–1.0 at the SPEC §7 anchor shapes).",
        "",
        f"**Bars beyond the roofline** (`bound_vs_d_dense` > bar): {len(beyond)} of {len(barred)} cases with a bar.",
        "",
        tabulate(beyond, headers="keys", tablefmt="github") if beyond else "(none)",
        "",
        "## All cases",
        "",
        tabulate(rows, headers="keys", tablefmt="github"),
        "",
    ]
    path = out_dir / "roofline.md"
    path.write_text("\n".join(lines))
    return path


def _csv(kind):
    def parse(text: str):
        try:
            return [kind(part) for part in text.split(",") if part]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None

    return parse


def _check(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` (one line) naming the first bad option."""
    from smet_kernels.layout import check_density
    from smet_kernels.train.config import check_choices, check_output_folder
    from smet_kernels.train.model import MODEL_CONFIGS

    if not (0 < args.tflops < math.inf and 0 < args.tbps < math.inf):  # NaN fails both comparisons
        raise ValueError(f"--tflops and --tbps must be finite and > 0, got {args.tflops:g} and {args.tbps:g}")
    for option, values in (("--configs", args.configs), ("--densities", args.densities), ("--tokens", args.tokens)):
        if not values:
            raise ValueError(f"{option} names no value: give at least one")
    check_choices("--configs", args.configs, MODEL_CONFIGS)
    for config in args.configs:  # the SwiGLU widths are rounded up to a multiple of 128: the hidden size decides
        if MODEL_CONFIGS[config].hidden_size % args.block_size:
            raise ValueError(f"--block-size {args.block_size} does not divide the hidden size "
                             f"{MODEL_CONFIGS[config].hidden_size} of --configs {config}")
    for density in args.densities:
        check_density(density, "--densities")
    if bad := [m for m in args.tokens if m < 1]:
        raise ValueError(f"--tokens must be positive, got {','.join(map(str, bad))}")
    check_output_folder(args.out_dir, "--out-dir")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m profiling.roofline",
        description="Roofline lower bounds (compute vs compulsory HBM traffic) of the block-sparse forward, input "
                    "grad and weight grad, against the kernel bars; no GPU needed.",
    )
    parser.add_argument("--configs", type=_csv(str), default=["350m", "1b", "7b"],
                        help="model presets whose hidden linear shapes to bound (default: 350m,1b,7b)")
    parser.add_argument("--densities", type=_csv(float), default=[0.5, 0.25, 0.1, 0.05],
                        help="densities (default: 0.5,0.25,0.1,0.05)")
    parser.add_argument("--tokens", type=_csv(int), default=[8192, 16384], help="token counts M (default: 8192,16384)")
    parser.add_argument("--block-size", type=int, default=128, choices=(16, 32, 64, 128),
                        help="block size b (default: 128)")
    parser.add_argument("--element-size", type=int, default=2, choices=(2, 4),
                        help="bytes per element: 2 = bf16/fp16, 4 = fp32 (default: 2)")
    parser.add_argument("--tflops", type=float, default=H200_TFLOPS,
                        help=f"attainable tensor-core TFLOP/s (default: {H200_TFLOPS:g}, a bf16 matmul on an H200)")
    parser.add_argument("--tbps", type=float, default=H200_TBPS,
                        help=f"attainable memory bandwidth in TB/s (default: {H200_TBPS:g}, an H200 device copy)")
    parser.add_argument("--out-dir", type=Path, required=True,
                        help="folder for roofline.csv and roofline.md (required; no default)")
    args = parser.parse_args(argv)
    try:
        _check(args)
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    rows = bar_rows(args.configs, args.densities, args.tokens, args.block_size, args.element_size, args.tflops,
                    args.tbps)
    command = "python -m profiling.roofline " + " ".join(argv if argv is not None else sys.argv[1:])
    print(write_report(rows, args.out_dir, command, args.tflops, args.tbps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
