"""The sections of ``report.md``, each a list of markdown lines: environment, kernels, optimizer, training,
memory model, what was not measured, pytest-benchmark."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from profiling.memory_model import COMPONENTS

from ..markdown import fmt_bytes, fmt_num, fmt_nvml_peak, table
from ..plotting import CONFIG_ORDER
from .derive import (
    NOISY_SPREAD,
    dense_label,
    geomean,
    kernel_comparison,
    memory_errors,
    method_label,
    mode_label,
    noisy_flags,
    peak_column,
    plainest_mode,
    side_by_side,
)
from .plots import OP_ORDER, plot_kernel_times, plot_peak_vs_model, plot_predicted_vs_measured, plot_vs_density
from .tables import NOISY_MARK, cpu_note, fmt_ms, fmt_timings, noise_footnote


def environment_section(frames) -> list[str]:
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


def kernel_section(kernels: pd.DataFrame, out_dir: Path) -> list[str]:
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
            vs_dense=("vs_dense", geomean),
            vs_d_dense=("vs_d_dense", geomean),
            vs_roofline=("vs_roofline", geomean),
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
    valid = comparison[comparison["status"] == "ok"]  # a wrong result's time is not plotted either
    if len(valid):
        plot = plot_kernel_times(valid, out_dir / "kernel_time_vs_density.png")
        lines += [f"![kernel time vs density]({plot})", ""]
    detail = comparison.copy()
    detail["time"] = fmt_timings(detail)
    detail["op"] = pd.Categorical(detail["op"], OP_ORDER, ordered=True)
    detail = detail.sort_values(
        ["op", "N", "K", "M", "block_size", "density", "provider", "dtype"], ascending=[True] * 5 + [False, True, True]
    )
    lines += [
        "### All kernel measurements (ms median [p20–p80])",
        "",
        table(
            pd.DataFrame(
                {
                    **({"device": detail["gpu"]} if several_gpus else {}),
                    **({"dtype": detail["dtype"]} if detail["dtype"].nunique() > 1 else {}),
                    "op": detail["op"].astype(str),
                    "shape": detail["shape"],
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


def optimizer_section(kernels: pd.DataFrame) -> list[str]:
    # a wrong step's time is listed under "Not measured or flagged", not here
    rows = kernels[(kernels["suite"] == "optimizer") & (kernels["status"] == "ok") & kernels["ms_p50"].notna()].copy()
    if rows.empty:
        return []
    rows["tensor"] = rows["shape"].str.split(":").str[0]
    rows["shape"] = rows["shape"].str.split(":", n=1).str[1]
    copy_gbps = {  # the device copy of the same shape on the same GPU
        (row["shape"], row["gpu"]): row["N"] * row["K"] * 8 / (row["ms_p50"] * 1e-3) / 1e9
        for _, row in rows[(rows["op"] == "copy") & (rows["ms_p50"] > 0)].iterrows()  # 0 ms: no bandwidth
    }
    adamw = rows[rows["op"] == "adamw"].sort_values(
        ["gpu", "shape", "tensor", "density", "provider", "backend"], ascending=[True, True, True, False, True, True]
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
                    **({"device": adamw["gpu"]} if adamw["gpu"].nunique() > 1 else {}),
                    "shape": adamw["shape"],
                    "N×K": [f"{n:.0f}×{k:.0f}" for n, k in zip(adamw["N"], adamw["K"])],
                    "tensor": adamw["tensor"],
                    "b": adamw["block_size"].map(lambda v: "" if pd.isna(v) else f"{v:.0f}"),
                    "d": adamw["density"].map(lambda v: f"{v:g}"),
                    "provider": adamw["provider"],
                    # smet_adamw measured with both backends (--backend reference, then triton): two rows, else alike
                    **({"backend": adamw["backend"]} if adamw.loc[adamw["backend"] != "torch", "backend"].nunique() > 1
                       else {}),
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


def training_section(training: pd.DataFrame, out_dir: Path) -> list[str]:
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
    measured["mode"] = measured.apply(mode_label, axis=1)
    several_modes = measured["mode"].nunique() > 1
    measured["config_rank"] = (
        measured["config"].map({c: i for i, c in enumerate(CONFIG_ORDER)}).fillna(len(CONFIG_ORDER))
    )
    measured["setting"] = setting_labels(measured)
    measured = measured.sort_values(  # each machine's and setting's rows together
        ["gpu", "setting", "config_rank", "method", "density", "compiled", "activation_checkpointing"],
        ascending=[True, True, True, True, False, True, True],
    )
    several = {"setting": measured["setting"].nunique() > 1}
    lines += [
        ("" if several["setting"] else measured["setting"].iloc[0] + "; ")
        + f"peak = {peak_label}. Components are counted from the tensors themselves; "
        "`rest` = allocator peak − the four others (loss-backward transients, temporaries)."
        + (" `mode`: eager or `torch.compile(model)`, `+ ckpt` = activation checkpointing per decoder layer."
           if several_modes else ""),
        "",
        table(
            pd.DataFrame(
                {
                    **_device_column(measured),
                    **({"setting": measured["setting"]} if several["setting"] else {}),
                    "config": measured["config"],
                    "method": measured["label"],
                    **({"mode": measured["mode"]} if several_modes else {}),
                    "backend": measured["backend"],
                    "tokens/s": measured["tokens_per_s"].map(lambda v: fmt_num(v, ".4g")),
                    "step ms": fmt_timings(measured),
                    "peak": measured["peak"].map(fmt_bytes),
                    "nvml peak": [fmt_nvml_peak(v, s) for v, s in zip(measured["nvml_peak_bytes"],
                                                                       measured["nvml_status"])],
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
    plotted = plainest_mode(measured)
    if several_modes:
        lines += [f"The plots show the {plotted['mode'].iloc[0]} steps; the modes compare in the tables below.", ""]
    machine = plotted.groupby(["gpu", "setting"], sort=False).size().idxmax()  # most measured; a tie: the first
    if plotted["gpu"].nunique() > 1 or plotted["setting"].nunique() > 1:
        lines += [f"The plots show the steps on {machine[0]} at {machine[1]}: one point per case; the table above "
                  "lists every machine and setting.", ""]
    plotted = plotted[(plotted["gpu"] == machine[0]) & (plotted["setting"] == machine[1])]
    library = [b for b in ("triton", "reference") if b in set(plotted["backend"])][:1]  # one smet backend, as
    plotted = plotted[plotted["backend"].isin(library + ["torch"])]  # the kernel plot: a line is not two backends' mean
    plots = [
        (
            "peak memory vs model size",
            plot_peak_vs_model(plotted, peak_label, unit, out_dir / "peak_memory_vs_model.png"),
        ),
        (
            "memory vs density",
            plot_vs_density(plotted, "peak_mem", unit, "Peak memory vs density", out_dir / "memory_vs_density.png"),
        ),
        (
            "throughput vs density",
            plot_vs_density(
                plotted,
                "tokens_per_s",
                "tokens/s",
                "Training throughput vs density",
                out_dir / "throughput_vs_density.png",
            ),
        ),
    ]
    lines += [f"![{title}]({name})" for title, name in plots] + [""]
    lines += compile_section(measured) + checkpointing_section(measured, peak_label)
    if len(failed):
        failed = failed.assign(mode=failed.apply(mode_label, axis=1))
        columns = ["config", "method", "density"] + (["mode"] if several_modes else []) + ["status", "note"]
        device = _device_column(failed)
        lines += ["Cases not measured:", "", table(failed.assign(**device)[[*device, *columns]]), ""]
    lines += memory_model_section(measured, out_dir)
    return lines


def setting_labels(training: pd.DataFrame) -> pd.Series:
    """``batch 2 × sequence 32, fp32, block size 32, vocab 256`` per row: what a step's time and memory depend on
    besides its config, method and mode."""
    return pd.Series([f"batch {b:.0f} × sequence {s:.0f}, {d}, block size {k:.0f}, vocab {v:.0f}" for b, s, d, k, v in
                      zip(training["batch_size"], training["seq_len"], training["dtype"], training["block_size"],
                          training["vocab_size"])], index=training.index, dtype=object)  # fmt: skip


def _device_column(rows: pd.DataFrame) -> dict:
    """The ``device`` column, for tables of rows of several machines."""
    return {"device": rows["gpu"]} if rows["gpu"].nunique() > 1 else {}


def _other_mode_column(pairs: pd.DataFrame, mode: str, title: str) -> dict:
    """The column of the other mode, for tables that compare ``mode`` where both values of it occur."""
    return {title: pairs[mode].map({True: "yes", False: "no"})} if pairs[mode].nunique() > 1 else {}


def compile_section(measured: pd.DataFrame) -> list[str]:
    """Compiled vs eager tokens/s of every case measured both ways."""
    pairs = side_by_side(measured, "compiled", ["label", "tokens_per_s"])
    if pairs.empty:
        return []
    return [
        "### Compiled vs eager",
        "",
        "`torch.compile(model)` (Inductor; the block-sparse products are `torch.ops.smet` custom ops, so the model is "
        "one graph) against the eager step of the same case; the two warm-up steps compile, the timed steps do not.",
        "",
        table(
            pd.DataFrame(
                {
                    **_device_column(pairs),
                    "config": pairs["config"],
                    "method": pairs["label_off"],
                    **_other_mode_column(pairs, "activation_checkpointing", "act. ckpt"),
                    "backend": pairs["backend"],
                    "eager tokens/s": pairs["tokens_per_s_off"].map(lambda v: fmt_num(v, ".4g")),
                    "compiled tokens/s": pairs["tokens_per_s_on"].map(lambda v: fmt_num(v, ".4g")),
                    "compiled / eager": (pairs["tokens_per_s_on"] / pairs["tokens_per_s_off"]).map(fmt_num),
                }
            )
        ),
        "",
    ]


def checkpointing_section(measured: pd.DataFrame, peak_label: str) -> list[str]:
    """Peak memory, activations and tokens/s with activation checkpointing against without, measured and
    predicted, for every case measured both ways."""
    columns = ["label", "peak", "activations_bytes", "pred_peak_bytes", "pred_activations_bytes", "tokens_per_s"]
    pairs = side_by_side(measured, "activation_checkpointing", columns)
    if pairs.empty:
        return []

    def ratio(column: str) -> pd.Series:
        return (pairs[f"{column}_on"] / pairs[f"{column}_off"]).map(fmt_num)

    return [
        "### Activation checkpointing",
        "",
        f"Each decoder layer saves only its input and recomputes the rest in backward. Peak = {peak_label}; "
        "predicted = `profiling/memory_model.py` with `activation_checkpointing`; `tokens/s ckpt / not` is the "
        "price of the recompute.",
        "",
        table(
            pd.DataFrame(
                {
                    **_device_column(pairs),
                    "config": pairs["config"],
                    "method": pairs["label_off"],
                    **_other_mode_column(pairs, "compiled", "compiled"),
                    "peak": pairs["peak_off"].map(fmt_bytes),
                    "peak ckpt": pairs["peak_on"].map(fmt_bytes),
                    "ckpt / not": ratio("peak"),
                    "predicted peak": pairs["pred_peak_bytes_off"].map(fmt_bytes),
                    "predicted ckpt": pairs["pred_peak_bytes_on"].map(fmt_bytes),
                    "activations": pairs["activations_bytes_off"].map(fmt_bytes),
                    "activations ckpt": pairs["activations_bytes_on"].map(fmt_bytes),
                    "predicted activations ckpt": pairs["pred_activations_bytes_on"].map(fmt_bytes),
                    "tokens/s ckpt / not": ratio("tokens_per_s"),
                }
            )
        ),
        "",
    ]


def memory_model_section(measured: pd.DataFrame, out_dir: Path) -> list[str]:
    errors = memory_errors(measured[~measured["compiled"]])  # the model predicts eager steps
    lines = ["## Memory model: predicted vs measured", ""]
    if measured["compiled"].any():
        lines += ["Eager steps only: the model predicts what eager autograd saves, and Inductor chooses other tensors "
                  "to save (compiled steps are in the tables above).", ""]  # fmt: skip
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
        "Error = (predicted − measured) / measured, over every eager training case above "
        "(`profiling/memory_model.py`; `+ ckpt`: with activation checkpointing).",
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
                    **_device_column(errors),
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


def skipped_section(kernels: pd.DataFrame | None, training: pd.DataFrame | None) -> list[str]:
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


def pytest_benchmark_section(frame: pd.DataFrame | None) -> list[str]:
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
