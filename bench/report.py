"""Markdown report (tabulate tables) and PNG plots (seaborn) from the benchmark CSVs.

Derived kernel columns: ``vs_dense = t / t_dense`` and ``vs_d_dense = t / (d · t_dense)`` — the second is 1 at
the physical limit of a block-sparse product (``d`` the layout's exact density, ``t_dense`` the dense baseline's
time of the same op and shape: cuBLAS on CUDA, torch's CPU matmul on a CPU), and ``vs_roofline = t / max(d · t_dense,
compulsory bytes / copy bandwidth)`` — the ceilings measured in the same run (the dense time, and the device copy
of the optimizer suite; ``profiling.roofline``): 1 = the op runs at its roofline. Memory-model error =
``(predicted − measured) / measured``. A timing whose p80 / p20 exceeds ``NOISY_SPREAD`` is marked as noise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from .results import current_provider

CONFIG_ORDER = ("tiny", "20m", "60m", "130m", "350m", "1b", "7b")
OP_ORDER = ("forward", "grad_input", "grad_weight")
COMPONENTS = ("weights", "gradients", "optimizer", "activations", "rest")
NOISY_SPREAD = 1.5  # p80 / p20 above which a timing is flagged as noise
NOISY_MARK = "†"
CPU_BACKENDS = {  # what each backend column value means for rows measured on a CPU
    "triton": "the Triton CPU interpreter (`TRITON_INTERPRET=1`), which runs each kernel program in Python: "
    "these times measure the interpreter and are not representative of GPU speed",
    "reference": "the pure-PyTorch reference ops, not the Triton kernels",
    "torch": "PyTorch's own CPU ops",
}


# ---------------------------------------------------------------------------------------------- loading
def load_csv(path: Path) -> pd.DataFrame | None:
    if not path.exists() or path.stat().st_size == 0:
        return None
    frame = pd.read_csv(path, keep_default_na=True)
    for column in ("status", "note", "nvml_status", "peak_source", "variant"):
        if column in frame:
            frame[column] = frame[column].astype(object).fillna("")
    if {"suite", "provider", "backend"} <= set(frame.columns):  # files written under the old provider names
        frame["provider"] = [
            current_provider(suite, provider, backend)
            for suite, provider, backend in zip(frame["suite"], frame["provider"], frame["backend"])
        ]
    return frame


def load_benchmark_json(paths) -> pd.DataFrame | None:
    """Rows (name, params, stats in ms, extra_info) of pytest-benchmark JSON files."""
    rows = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or "benchmarks" not in data:
            continue
        for bench in data["benchmarks"]:
            stats = bench.get("stats", {})
            extra = bench.get("extra_info", {}) or {}
            rows.append(
                {
                    "file": Path(path).name,
                    "name": bench.get("name", ""),
                    "group": bench.get("group") or "",
                    "ms_q1": 1e3 * stats.get("q1", math.nan),
                    "ms_median": 1e3 * stats.get("median", math.nan),
                    "ms_q3": 1e3 * stats.get("q3", math.nan),
                    "rounds": stats.get("rounds", 0),
                    "extra": ", ".join(f"{k}={_short(v)}" for k, v in sorted(extra.items())),
                }
            )
    return pd.DataFrame(rows) if rows else None


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------------- derived
DENSE_MATCH = ["op", "M", "K", "N", "dtype", "gpu"]


def kernel_comparison(kernels: pd.DataFrame) -> pd.DataFrame:
    """Sparse-provider rows of the kernel suite with ``dense_ms``, ``exact_density``, ``vs_dense``, ``vs_d_dense``,
    ``noisy`` and ``dense_noisy``; ``t_dense`` is the ``cublas_dense`` row of the same op, shape, dtype and GPU (a
    folder may hold several machines' rows)."""
    measured = kernels[(kernels["suite"] == "kernels") & kernels["ms_p50"].notna()]
    dense = measured[(measured["provider"] == "cublas_dense") & (measured["status"] == "ok")]
    dense = dense.assign(dense_noisy=noisy_flags(dense))[DENSE_MATCH + ["ms_p50", "dense_noisy"]]
    dense = dense.rename(columns={"ms_p50": "dense_ms"}).drop_duplicates(DENSE_MATCH)
    sparse = measured[measured["provider"] != "cublas_dense"].merge(dense, on=DENSE_MATCH, how="left")
    sparse["dense_noisy"] = sparse["dense_noisy"].astype(object).fillna(False).astype(bool)
    sparse["noisy"] = noisy_flags(sparse)
    sparse["exact_density"] = sparse["nnz_blocks"] * sparse["block_size"] ** 2 / (sparse["N"] * sparse["K"])
    sparse["vs_dense"] = sparse["ms_p50"] / sparse["dense_ms"]
    sparse["vs_d_dense"] = sparse["ms_p50"] / (sparse["exact_density"] * sparse["dense_ms"])
    copy_gbps = sparse["gpu"].map(copy_bandwidth_gbps(kernels))
    memory_ms = [
        compulsory_bytes_of(row) / (gbps * 1e9) * 1e3 if gbps == gbps else math.nan
        for row, gbps in zip(sparse.itertuples(), copy_gbps)
    ]
    # np.maximum keeps NaN: without a dense row of the same run there is no compute ceiling, so no roofline
    sparse["roofline_ms"] = np.maximum(sparse["exact_density"] * sparse["dense_ms"], memory_ms).where(copy_gbps.notna())
    sparse["vs_roofline"] = sparse["ms_p50"] / sparse["roofline_ms"]
    return sparse


ELEMENT_SIZE = {"bf16": 2, "fp16": 2, "fp32": 4}


def copy_bandwidth_gbps(kernels: pd.DataFrame) -> dict:
    """Per GPU, the best ``dst.copy_(src)`` bandwidth of the optimizer suite (fp32: 8 bytes per element)."""
    copies = kernels[(kernels["suite"] == "optimizer") & (kernels["op"] == "copy") & kernels["ms_p50"].notna()]
    gbps = copies["N"] * copies["K"] * 8 / (copies["ms_p50"] * 1e-3) / 1e9
    return gbps.groupby(copies["gpu"]).max().to_dict()


def compulsory_bytes_of(row) -> float:
    """:func:`profiling.roofline.compulsory_bytes` of a kernel row, for its uniformly random layout."""
    from profiling.roofline import compulsory_bytes, expected_used_lines

    b, nnz = int(row.block_size), int(row.nnz_blocks)
    block_rows, block_cols = int(row.N) // b, int(row.K) // b
    return compulsory_bytes(
        row.op, int(row.M), int(row.N), int(row.K), b, nnz, ELEMENT_SIZE[row.dtype],
        expected_used_lines(block_rows, block_cols, nnz), expected_used_lines(block_cols, block_rows, nnz),
    )


def noisy_flags(frame: pd.DataFrame) -> pd.Series:
    """True where a row's timing spread p80 / p20 exceeds ``NOISY_SPREAD``."""
    return (frame["ms_p80"] / frame["ms_p20"].where(frame["ms_p20"] > 0)) > NOISY_SPREAD


def on_cpu(gpus: pd.Series) -> pd.Series:
    """True for the rows whose ``gpu`` column names a CPU (``cpu-<machine>-<n>cores``)."""
    return gpus.astype(str).str.startswith("cpu")


def dense_label(gpus: pd.Series) -> str:
    """What the ``cublas_dense`` provider ran on the machines ``gpus``: cuBLAS on CUDA, torch's matmul on a CPU."""
    labels = {"dense torch (CPU)" if cpu else "cuBLAS dense" for cpu in on_cpu(gpus)}
    return " / ".join(sorted(labels))


def _geomean(values: pd.Series) -> float:
    values = values.dropna()
    values = values[values > 0]
    return float(np.exp(np.log(values).mean())) if len(values) else math.nan


def peak_column(training: pd.DataFrame) -> tuple[pd.Series, str]:
    """Measured peak bytes: ``torch.cuda.max_memory_allocated`` where known, else the sum of the accounted
    components."""
    accounted = training[[f"{c}_bytes" for c in COMPONENTS[:4]]].sum(axis=1)
    if training["peak_allocated_bytes"].notna().all():
        return training["peak_allocated_bytes"], "peak allocated (torch.cuda.max_memory_allocated)"
    if training["peak_allocated_bytes"].notna().any():
        return training["peak_allocated_bytes"].fillna(accounted), "peak allocated where measured, else accounted"
    return accounted, "accounted: weights + gradients + optimizer + activations (no allocator peak on CPU)"


def method_label(row) -> str:
    return f"{row['method']} d={row['density']:g}" if row["method"] in ("masked", "smet") else row["method"]


def memory_errors(training: pd.DataFrame) -> pd.DataFrame:
    """One row per (case, component) with measured and predicted bytes and the relative error."""
    rows = []
    for _, row in training.iterrows():
        components = list(COMPONENTS) + ["peak"]
        for component in components:
            if component == "peak":
                measured, predicted = row.get("peak_allocated_bytes"), row.get("pred_peak_bytes")
            else:
                measured, predicted = row.get(f"{component}_bytes"), row.get(f"pred_{component}_bytes")
            if pd.isna(measured) or pd.isna(predicted) or measured == 0:
                continue
            rows.append(
                {
                    "config": row["config"],
                    "method": method_label(row),
                    "component": component,
                    "measured": measured,
                    "predicted": predicted,
                    "error": (predicted - measured) / measured,
                }
            )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------- formatting
def fmt_bytes(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    value = float(value)
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} B"


def fmt_ms(p50, p20=None, p80=None, mark: str = "") -> str:
    if p50 is None or pd.isna(p50):
        return ""
    if p20 is None or pd.isna(p20):
        return f"{p50:.4g}{mark}"
    return f"{p50:.4g}{mark} [{p20:.4g}–{p80:.4g}]"


def fmt_timings(frame: pd.DataFrame) -> list[str]:
    """``median [p20–p80]`` per row, the median marked ``NOISY_MARK`` where the row is noisy."""
    marks = noisy_flags(frame).map({True: NOISY_MARK, False: ""})
    return [fmt_ms(*values) for values in zip(frame["ms_p50"], frame["ms_p20"], frame["ms_p80"], marks)]


def noise_footnote(noisy) -> list[str]:
    """The footnote of ``NOISY_MARK``, when any of ``noisy`` is true."""
    if not any(noisy):
        return []
    return [
        f"{NOISY_MARK} noisy: p80 / p20 > {NOISY_SPREAD:g}, the repeated timings spread widely, so read this "
        "median (and the ratios built on it) as rough.",
        "",
    ]


def fmt_num(value, spec: str = ".3g") -> str:
    return "" if value is None or pd.isna(value) else format(value, spec)


def table(frame: pd.DataFrame) -> str:
    """A GitHub markdown table; columns empty in every row are left out and named once below it."""
    from tabulate import tabulate

    empty = [c for c in frame.columns if len(frame) and frame[c].map(lambda v: pd.isna(v) or v == "").all()]
    kept = frame.drop(columns=empty)
    text = tabulate(kept, headers="keys", tablefmt="github", showindex=False, disable_numparse=True)
    if empty:
        text += "\n\nEmpty in every row, so left out: " + ", ".join(f"`{c}`" for c in empty) + "."
    return text


def cpu_note(frame: pd.DataFrame, name_column: str) -> list[str]:
    """What the ``backend`` values of ``frame``'s rows measured on a CPU mean (``name_column`` names the rows)."""
    rows = frame[on_cpu(frame["gpu"]) & frame["ms_p50"].notna()]
    parts = [
        f"backend `{backend}` ({', '.join(dict.fromkeys(names.astype(str)))}) = {meaning}"
        for backend, meaning in CPU_BACKENDS.items()
        if len(names := rows.loc[rows["backend"] == backend, name_column])
    ]
    machines = ", ".join(sorted(set(rows["gpu"].astype(str))))
    return [f"**Measured on a CPU** ({machines}): " + "; ".join(parts) + ".", ""] if parts else []


# ---------------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    return plt, sns


def _config_order(values) -> list[str]:
    present = list(dict.fromkeys(values))
    return [c for c in CONFIG_ORDER if c in present] + sorted(c for c in present if c not in CONFIG_ORDER)


def provider_palette(providers) -> dict:
    """One fixed colour per provider, the same in every panel: the known providers' order picks it."""
    from .kernels import SPARSE_PROVIDERS

    names = list(SPARSE_PROVIDERS) + sorted(set(providers) - set(SPARSE_PROVIDERS))
    return dict(zip(names, _plt()[1].color_palette("colorblind", len(names))))


def plot_kernel_times(comparison: pd.DataFrame, path: Path) -> str:
    """Kernel time (log scale) vs density for the largest measured shape and block size, with the dense and
    d × dense lines."""
    plt, sns = _plt()
    largest = comparison.assign(work=comparison["M"] * comparison["K"] * comparison["N"])
    largest = largest.sort_values(["work", "block_size"], ascending=False).iloc[0]
    pick = comparison[
        (comparison["M"] == largest["M"])
        & (comparison["K"] == largest["K"])
        & (comparison["N"] == largest["N"])
        & (comparison["block_size"] == largest["block_size"])
        & (comparison["gpu"] == largest["gpu"])
        & (comparison["dtype"] == largest["dtype"])
        & (comparison["backend"].isin([largest["backend"], "torch"]))  # one smet backend; torch baselines
    ]
    ops = [op for op in OP_ORDER if op in set(pick["op"])]
    palette = provider_palette(comparison["provider"])
    baseline = dense_label(pick["gpu"])
    fig, axes = plt.subplots(1, len(ops), figsize=(5 * len(ops), 4), squeeze=False)
    for axis, op in zip(axes[0], ops):
        data = pick[pick["op"] == op].sort_values("density")
        hue_order = [p for p in palette if p in set(data["provider"])]
        sns.lineplot(
            data=data, x="exact_density", y="ms_p50", hue="provider", hue_order=hue_order, palette=palette,
            marker="o", ax=axis,
        )  # fmt: skip
        dense_ms = data["dense_ms"].dropna()
        if len(dense_ms):
            densities = np.linspace(0.01, 1, 100)  # from 0.01: d × dense is 0 at d = 0, off a log axis
            axis.axhline(dense_ms.iloc[0], color="black", linewidth=1, label=baseline)
            axis.plot(densities, densities * dense_ms.iloc[0], "k--", linewidth=1, label="d × dense")
        axis.set_yscale("log")
        axis.set_xlim(0, max(0.55, float(data["exact_density"].max()) * 1.1))
        axis.set_title(op)
        axis.set_xlabel("density")
        axis.set_ylabel("ms (median, log scale)")
        axis.legend(fontsize=8)
    fig.suptitle(
        f"M={largest['M']:.0f}, K={largest['K']:.0f}, N={largest['N']:.0f}, b={largest['block_size']:.0f}, "
        f"{largest['dtype']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plot_peak_vs_model(training: pd.DataFrame, peak_label: str, unit: str, path: Path) -> str:
    """Peak memory per config, each method shifted sideways by its own offset and drawn with its own marker, so
    methods with equal peaks stay apart."""
    plt, sns = _plt()
    fig, axis = plt.subplots(figsize=(8, 4.5))
    order = _config_order(training["config"])
    labels = list(dict.fromkeys(training["label"]))
    offsets = dict(zip(labels, (np.arange(len(labels)) - (len(labels) - 1) / 2) * (0.6 / max(len(labels) - 1, 1))))
    data = training.assign(
        x=training["config"].map({c: i for i, c in enumerate(order)}) + training["label"].map(offsets)
    )
    sns.lineplot(
        data=data.sort_values("x"), x="x", y="peak_mem", hue="label", style="label", hue_order=labels,
        style_order=labels, markers=True, dashes=False, markersize=8, ax=axis,
    )  # fmt: skip
    axis.set_xticks(range(len(order)), order)
    axis.set_xlim(-0.5, len(order) - 0.5)
    axis.set_xlabel("model configuration")
    axis.set_ylabel(unit)
    axis.set_title(f"Peak memory per method ({peak_label.split(':')[0].split(' (')[0]})")
    axis.legend(fontsize=8, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plot_vs_density(training: pd.DataFrame, column: str, ylabel: str, title: str, path: Path) -> str:
    """``column`` vs density per config: masked/SMET as lines, dense/GaLore as horizontal lines."""
    plt, sns = _plt()
    configs = _config_order(training["config"])
    fig, axes = plt.subplots(1, len(configs), figsize=(4.5 * len(configs), 4), squeeze=False)
    for axis, config in zip(axes[0], configs):
        data = training[training["config"] == config]
        sparse = data[data["method"].isin(["masked", "smet"])]
        if len(sparse):
            sns.lineplot(data=sparse, x="density", y=column, hue="method", marker="o", ax=axis)
        for method, style in (("dense", "k-"), ("galore", "k:")):
            value = data[data["method"] == method][column]
            if len(value):
                axis.axhline(float(value.iloc[0]), linestyle=style[1:], color="black", linewidth=1, label=method)
        axis.set_title(config)
        axis.set_xlabel("density")
        axis.set_ylabel(ylabel)
        axis.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plot_predicted_vs_measured(errors: pd.DataFrame, path: Path) -> str:
    plt, sns = _plt()
    fig, axis = plt.subplots(figsize=(5.5, 5))
    data = errors[(errors["measured"] > 0) & (errors["predicted"] > 0)]
    sns.scatterplot(data=data, x="measured", y="predicted", hue="component", style="component", ax=axis)
    low = float(min(data["measured"].min(), data["predicted"].min()))
    high = float(max(data["measured"].max(), data["predicted"].max()))
    axis.plot([low, high], [low, high], "k--", linewidth=1)
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("measured bytes")
    axis.set_ylabel("predicted bytes")
    axis.set_title("Memory model: predicted vs measured")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


# ---------------------------------------------------------------------------------------------- sections
def _environment_section(frames) -> list[str]:
    rows = []
    for frame in frames:
        if frame is None:
            continue
        for _, row in frame[["gpu", "torch", "triton"]].drop_duplicates().iterrows():
            rows.append({"device": row["gpu"], "torch": row["torch"], "triton": row["triton"]})
    lines = ["## Environment", ""]
    if rows:
        env = pd.DataFrame(rows).drop_duplicates()
        stamps = pd.concat([f["timestamp"] for f in frames if f is not None])
        lines += [table(env), "", f"Measured from {stamps.min()} to {stamps.max()}.", ""]
    return lines


def _kernel_section(kernels: pd.DataFrame, out_dir: Path) -> list[str]:
    comparison = kernel_comparison(kernels)
    if comparison.empty:
        return []
    lines = ["## Kernels", ""]
    lines += [
        f"Median time of each op relative to the dense baseline ({dense_label(comparison['gpu'])}; `vs dense`) "
        "and to the block-sparse limit d × dense (`vs d×dense`, 1 = the limit), geometric means over the measured "
        "shapes and token counts (rows with status `ok` only); TFLOP/s counts useful FLOPs (2·M·K·N·d). "
        "`vs roofline` also counts the bytes the op must move at the device-copy bandwidth of the same run "
        "(`max(d × dense, bytes / copy)`; 1 = the op's roofline; needs the optimizer suite's copy rows).",
        "",
    ]
    kernel_rows = kernels[kernels["suite"] == "kernels"]
    baseline = kernel_rows["provider"].replace("cublas_dense", "dense baseline")
    lines += cpu_note(kernel_rows.assign(provider=baseline), "provider")
    summary = (
        comparison[comparison["status"] == "ok"]  # a wrong result's time is listed below, not averaged
        .groupby(["gpu", "dtype", "backend", "op", "provider", "block_size", "density"])
        .agg(
            vs_dense=("vs_dense", _geomean),
            vs_d_dense=("vs_d_dense", _geomean),
            vs_roofline=("vs_roofline", _geomean),
            tflops=("tflops", "median"),
            cases=("ms_p50", "size"),
            noisy=("noisy", "sum"),
            dense_noisy=("dense_noisy", "sum"),
        )
        .reset_index()
    )
    summary["op"] = pd.Categorical(summary["op"], OP_ORDER, ordered=True)
    summary = summary.sort_values(
        ["gpu", "dtype", "op", "block_size", "density", "provider", "backend"],
        ascending=[True, True, True, True, False, True, True],
    )
    several_gpus = summary["gpu"].nunique() > 1
    several = {column: summary[column].nunique() > 1 for column in ("dtype", "backend")}
    noisy_cases = summary["noisy"] + summary["dense_noisy"]
    lines += [
        table(
            pd.DataFrame(
                {
                    **({"device": summary["gpu"]} if several_gpus else {}),
                    **({"dtype": summary["dtype"]} if several["dtype"] else {}),
                    "op": summary["op"].astype(str),
                    "provider": summary["provider"],
                    **({"backend": summary["backend"]} if several["backend"] else {}),
                    "b": summary["block_size"].map(lambda v: f"{v:.0f}"),
                    "d": summary["density"].map(lambda v: f"{v:g}"),
                    "vs dense": summary["vs_dense"].map(fmt_num),
                    "vs d×dense": summary["vs_d_dense"].map(fmt_num),
                    "vs roofline": summary["vs_roofline"].map(fmt_num),
                    "TFLOP/s (median)": summary["tflops"].map(lambda v: fmt_num(v, ".4g")),
                    "cases": [f"{c} ({n}{NOISY_MARK})" if n else str(c) for c, n in zip(summary["cases"], noisy_cases)],
                }
            )
        ),
        "",
    ]
    if noisy_cases.any():
        lines += [
            f"`cases` (n{NOISY_MARK}): n noisy timings among them (the op's or its dense baseline's p80 / p20 > "
            f"{NOISY_SPREAD:g}, marked in the table below).",
            "",
        ]
    plot = plot_kernel_times(comparison, out_dir / "kernel_time_vs_density.png")
    lines += [f"![kernel time vs density]({plot})", ""]
    detail = comparison.copy()
    detail["time"] = fmt_timings(detail)
    detail["op"] = pd.Categorical(detail["op"], OP_ORDER, ordered=True)
    detail = detail.sort_values(
        ["op", "N", "K", "M", "block_size", "density", "provider"], ascending=[True] * 5 + [False, True]
    )
    lines += [
        "### All kernel measurements (ms median [p20–p80])",
        "",
        table(
            pd.DataFrame(
                {
                    **({"device": detail["gpu"]} if several_gpus else {}),
                    "op": detail["op"].astype(str),
                    "shape": detail["variant"],
                    "M×K×N": [f"{m:.0f}×{k:.0f}×{n:.0f}" for m, k, n in zip(detail["M"], detail["K"], detail["N"])],
                    "b": detail["block_size"].map(lambda v: f"{v:.0f}"),
                    "d": detail["exact_density"].map(lambda v: f"{v:.3g}"),
                    "provider": detail["provider"],
                    "backend": detail["backend"],
                    "time": detail["time"],
                    "dense ms": [
                        fmt_num(v, ".4g") + (NOISY_MARK if noisy else "")
                        for v, noisy in zip(detail["dense_ms"], detail["dense_noisy"])
                    ],
                    "TFLOP/s": detail["tflops"].map(lambda v: fmt_num(v, ".4g")),
                    "vs dense": detail["vs_dense"].map(fmt_num),
                    "vs d×dense": detail["vs_d_dense"].map(fmt_num),
                    "vs roofline": detail["vs_roofline"].map(fmt_num),
                    "status": detail["status"],
                }
            )
        ),
        "",
    ]
    return lines + noise_footnote(detail["noisy"] | detail["dense_noisy"])


def _optimizer_section(kernels: pd.DataFrame) -> list[str]:
    rows = kernels[(kernels["suite"] == "optimizer") & kernels["ms_p50"].notna()].copy()
    if rows.empty:
        return []
    rows["shape"] = rows["variant"].str.split(":", n=1).str[1]
    rows["tensor"] = rows["variant"].str.split(":").str[0]
    copy_gbps = {  # the device copy of the same shape on the same GPU
        (row["shape"], row["gpu"]): row["N"] * row["K"] * 8 / (row["ms_p50"] * 1e-3) / 1e9
        for _, row in rows[rows["op"] == "copy"].iterrows()
    }
    adamw = rows[rows["op"] == "adamw"].sort_values(
        ["shape", "tensor", "density", "provider"], ascending=[True, True, False, True]
    )
    copy_of = [copy_gbps.get((shape, gpu)) for shape, gpu in zip(adamw["shape"], adamw["gpu"])]
    lines = [
        "## Optimizer step",
        "",
        "AdamW traffic = 7 fp32 reads+writes per element (+ the int32 local step per block for SMET); "
        "`% copy` compares with `dst.copy_(src)` of the dense tensor measured in the same run.",
        "",
    ]
    lines += [
        table(
            pd.DataFrame(
                {
                    "shape": adamw["shape"],
                    "N×K": [f"{n:.0f}×{k:.0f}" for n, k in zip(adamw["N"], adamw["K"])],
                    "tensor": adamw["tensor"],
                    "b": adamw["block_size"].map(lambda v: "" if pd.isna(v) else f"{v:.0f}"),
                    "d": adamw["density"].map(lambda v: f"{v:g}"),
                    "provider": adamw["provider"],
                    "ms": fmt_timings(adamw),
                    "GB/s": adamw["gbps"].map(lambda v: fmt_num(v, ".4g")),
                    "copy GB/s": [fmt_num(c, ".4g") for c in copy_of],
                    "% copy": [fmt_num(100 * g / c, ".3g") if c else "" for g, c in zip(adamw["gbps"], copy_of)],
                }
            )
        ),
        "",
    ]
    return lines + noise_footnote(noisy_flags(adamw)) + cpu_note(rows, "provider")


def _training_section(training: pd.DataFrame, out_dir: Path) -> list[str]:
    measured = training[training["status"] == "ok"].copy()
    lines = ["## End-to-end training step", ""]
    failed = training[training["status"] != "ok"]
    if measured.empty:
        return lines + ["No training measurements.", ""]
    peak, peak_label = peak_column(measured)
    measured["peak"] = peak
    unit, scale = ("GiB", 2**30) if peak.max() >= 2**30 else ("MiB", 2**20)
    measured["peak_mem"] = peak / scale
    measured["label"] = measured.apply(method_label, axis=1)
    measured["config_rank"] = (
        measured["config"].map({c: i for i, c in enumerate(CONFIG_ORDER)}).fillna(len(CONFIG_ORDER))
    )
    measured = measured.sort_values(["config_rank", "method", "density"], ascending=[True, True, False])
    first = measured.iloc[0]
    lines += [
        f"batch {first['batch_size']:.0f} × sequence {first['seq_len']:.0f}, {first['dtype']}, block size "
        f"{first['block_size']:.0f}; peak = {peak_label}. Components are counted from the tensors themselves; "
        "`rest` = allocator peak − the four others (loss-backward transients, temporaries).",
        "",
        table(
            pd.DataFrame(
                {
                    "config": measured["config"],
                    "method": measured["label"],
                    "backend": measured["backend"],
                    "tokens/s": measured["tokens_per_s"].map(lambda v: fmt_num(v, ".4g")),
                    "step ms": fmt_timings(measured),
                    "peak": measured["peak"].map(fmt_bytes),
                    "nvml peak": measured["nvml_peak_bytes"].map(fmt_bytes),
                    **{c: measured[f"{c}_bytes"].map(fmt_bytes) for c in COMPONENTS},
                }
            )
        ),
        "",
        *noise_footnote(noisy_flags(measured)),
        *cpu_note(measured, "label"),
    ]
    nvml = sorted(set(measured["nvml_status"]))
    lines += [f"NVML sampling: {', '.join(nvml)}.", ""]
    plots = [
        (
            "peak memory vs model size",
            plot_peak_vs_model(measured, peak_label, unit, out_dir / "peak_memory_vs_model.png"),
        ),
        (
            "memory vs density",
            plot_vs_density(measured, "peak_mem", unit, "Peak memory vs density", out_dir / "memory_vs_density.png"),
        ),
        (
            "throughput vs density",
            plot_vs_density(
                measured,
                "tokens_per_s",
                "tokens/s",
                "Training throughput vs density",
                out_dir / "throughput_vs_density.png",
            ),
        ),
    ]
    lines += [f"![{title}]({name})" for title, name in plots] + [""]
    if len(failed):
        lines += ["Cases not measured:", "", table(failed[["config", "method", "density", "status", "note"]]), ""]
    lines += _memory_model_section(measured, out_dir)
    return lines


def _memory_model_section(measured: pd.DataFrame, out_dir: Path) -> list[str]:
    errors = memory_errors(measured)
    lines = ["## Memory model: predicted vs measured", ""]
    if errors.empty:
        return lines + ["No measurements to compare.", ""]
    summary = (
        errors.groupby("component", sort=False)
        .agg(
            median_abs_error=("error", lambda e: float(np.median(np.abs(e)))),
            max_abs_error=("error", lambda e: float(np.max(np.abs(e)))),
            cases=("error", "size"),
        )
        .reset_index()
    )
    lines += [
        "Error = (predicted − measured) / measured, over every training case above (`profiling/memory_model.py`).",
        "",
        table(
            pd.DataFrame(
                {
                    "component": summary["component"],
                    "median abs error": summary["median_abs_error"].map(lambda v: f"{100 * v:.1f} %"),
                    "max abs error": summary["max_abs_error"].map(lambda v: f"{100 * v:.1f} %"),
                    "cases": summary["cases"],
                }
            )
        ),
        "",
    ]
    if "peak" not in set(errors["component"]):
        lines += ["The allocator peak (and so `rest` and `peak`) is measured only on CUDA.", ""]
    plot = plot_predicted_vs_measured(errors, out_dir / "memory_model.png")
    lines += [f"![predicted vs measured memory]({plot})", ""]
    lines += [
        table(
            pd.DataFrame(
                {
                    "config": errors["config"],
                    "method": errors["method"],
                    "component": errors["component"],
                    "measured": errors["measured"].map(fmt_bytes),
                    "predicted": errors["predicted"].map(fmt_bytes),
                    "error": errors["error"].map(lambda v: f"{100 * v:+.1f} %"),
                }
            )
        ),
        "",
    ]
    return lines


def _skipped_section(kernels: pd.DataFrame | None, training: pd.DataFrame | None) -> list[str]:
    rows = []
    for frame, columns in ((kernels, ["suite", "provider"]), (training, ["method"])):
        if frame is None:
            continue
        skipped = frame[~frame["status"].isin(["ok"])]
        for keys, group in skipped.groupby(columns + ["status", "note"]):
            rows.append(
                {
                    "what": " / ".join(str(k) for k in keys[: len(columns)]),
                    "status": keys[-2],
                    "reason": keys[-1],
                    "rows": len(group),
                }
            )
    if not rows:
        return []
    return ["## Not measured or flagged", "", table(pd.DataFrame(rows)), ""]


def _pytest_benchmark_section(frame: pd.DataFrame | None) -> list[str]:
    if frame is None:
        return []
    return [
        "## pytest-benchmark",
        "",
        table(
            pd.DataFrame(
                {
                    "file": frame["file"],
                    "benchmark": frame["name"],
                    "median ms [q1–q3]": [
                        fmt_ms(a, b, c) for a, b, c in zip(frame["ms_median"], frame["ms_q1"], frame["ms_q3"])
                    ],
                    "rounds": frame["rounds"],
                    "extra": frame["extra"],
                }
            )
        ),
        "",
    ]


def write_report(out_dir, benchmark_json=None) -> Path:
    """Write ``<out_dir>/report.md`` and its PNG plots; returns the report's path."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} is not a folder")
    kernels = load_csv(out_dir / "kernels.csv")
    training = load_csv(out_dir / "training.csv")
    json_paths = benchmark_json if benchmark_json is not None else sorted(out_dir.glob("*.json"))
    bench_json = load_benchmark_json(json_paths)
    if kernels is None and training is None and bench_json is None:
        raise ValueError(
            f"no kernels.csv, training.csv or pytest-benchmark JSON in {out_dir}: run `smet-bench run` first"
        )
    lines = ["# smet_kernels benchmark report", ""]
    lines += _environment_section([kernels, training])
    commands = out_dir / "commands.txt"
    if commands.exists():
        lines += ["Made by:", "", "```", *commands.read_text().splitlines(), "```", ""]
    if kernels is not None:
        lines += _kernel_section(kernels, out_dir)
        lines += _optimizer_section(kernels)
    if training is not None:
        lines += _training_section(training, out_dir)
    lines += _skipped_section(kernels, training)
    lines += _pytest_benchmark_section(bench_json)
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
