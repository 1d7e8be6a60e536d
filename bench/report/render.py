"""``report.md``: the sections of :mod:`.sections` over the CSVs and JSON files of one results folder."""

from __future__ import annotations

from pathlib import Path

from .load import load_benchmark_json, load_csv
from .sections import (
    environment_section,
    kernel_section,
    optimizer_section,
    pytest_benchmark_section,
    skipped_section,
    training_section,
)


def write_report(out_dir, benchmark_json=None) -> Path:
    """Write ``<out_dir>/report.md`` and its PNG plots; returns the report's path."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} is not a folder")
    kernels = load_csv(out_dir / "kernels.csv")
    training = load_csv(out_dir / "training.csv")
    if benchmark_json is not None:
        bench_json = load_benchmark_json(benchmark_json, option="--benchmark-json")
    else:
        bench_json = load_benchmark_json(sorted(out_dir.glob("*.json")))
    if kernels is None and training is None and bench_json is None:
        raise ValueError(
            f"no kernels.csv, training.csv or pytest-benchmark JSON in {out_dir}: run `smet-bench run` first"
        )
    lines = ["# smet_kernels benchmark report", ""]
    lines += environment_section([kernels, training])
    commands = out_dir / "commands.txt"
    if commands.exists():
        lines += ["Made by:", "", "```", *commands.read_text().splitlines(), "```", ""]
    if kernels is not None:
        lines += kernel_section(kernels, out_dir)
        lines += optimizer_section(kernels)
    if training is not None:
        lines += training_section(training, out_dir)
    lines += skipped_section(kernels, training)
    lines += pytest_benchmark_section(bench_json)
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
