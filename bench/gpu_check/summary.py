"""``DIR/gpu_check.md``: correctness pass/fail (failures first), then every bar with its measured ratio and pass/miss.

Bars (the kernel ratios come from :func:`bench.report.kernel_comparison`: ``vs d×dense = t / (d · t_dense)`` and
``vs roofline = t / max(d · t_dense, compulsory bytes / copy bandwidth)``, both ceilings measured in this run):

* at the first block size (b = 128 on the GPU), d in ``roofline.BARS``: ``vs d×dense ≤ c`` where the roofline allows
  it, i.e. the op is compute-bound (``compulsory bytes / copy bandwidth ≤ d · t_dense``: the 7b and 1b shapes at
  d ≥ 0.25, 7b at d = 0.1, as the GPU issue lists them), else ``vs roofline ≤ 1.2``;
* every block size and density: ``t_bsr / t ≥ 1.5`` (torch BSR) and, at d ≤ 0.5, ``t ≤ t_dense``;
* the kernel variants (not a bar): each variant's geometric-mean time against ``grouped``, the data for choosing
  the default variant; then each KERNEL_NOTES prediction beside its measured value (:mod:`.predictions`);
* compact AdamW: GB/s ≥ 90 % of the copy ceiling of stage ``env``;
* SMET training at the last training config: more tokens/s than dense AdamW, lower peak memory than dense and GaLore
  (eager steps without activation checkpointing); beside them, not bars, what activation checkpointing does to the
  peak and the tokens/s of SMET and dense there.

Only this plan's rows count: its kernel and optimizer cases (:func:`kernels_of_this_plan`) and training sizes
(:func:`of_this_plan`); rows another run added to the folder are counted and left out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from bench.kernels import OPS, VARIANT_OPS
from bench.markdown import fmt_nvml_peak, table
from bench.report import kernel_comparison, load_csv
from bench.report.derive import peak_column, side_by_side
from bench.results import KERNEL_KEY, canonical
from profiling.roofline import BARS
from smet_kernels.ops.variant import VARIANTS

from .plan import Sizes
from .predictions import prediction_section

ROOFLINE_BAR = 1.2
BSR_BAR = 1.5
ADAMW_BAR = 0.9
VARIANT_PROVIDERS = {"triton_grouped": "grouped", "triton_plain_order": "plain_order",
                     "triton_persistent": "persistent", "triton_tma": "tma"}  # fmt: skip


def _verdict(ok) -> str:
    return "not measured" if ok is None else ("pass" if ok else "miss")


def _gib(value) -> str:
    return "" if value is None or pd.isna(value) else _num(value / 2.0**30)


def _num(value, spec: str = ".3g") -> str:
    return "" if value is None or pd.isna(value) else format(value, spec)


def _ratio(numerator, denominator) -> str:
    """``numerator / denominator`` to 3 decimals; empty where either is missing or the denominator is 0 (a failed
    measurement must not take the section, and the bars in it, down with a ZeroDivisionError)."""
    if pd.isna(numerator) or pd.isna(denominator) or denominator == 0:
        return ""
    return f"{numerator / denominator:.3f}"


def correctness_section(rows: list[dict], not_run: list[str], origin: str = "", selected: bool = False) -> list[str]:
    lines = ["## Correctness", ""]
    if not rows and not not_run:
        return lines + ["No check has finished yet (see the stage table)." if selected else "Not selected.", ""]
    if origin:
        lines += [f"These checks are {origin}.", ""]
    frame = pd.DataFrame(rows)
    failed = frame[frame["status"] != "pass"] if len(frame) else frame
    lines.append(f"{len(frame) - len(failed)} of {len(frame)} checks pass, {len(failed)} fail, {len(not_run)} not run.")
    lines.append("")
    if len(frame):
        ordered = pd.concat([failed, frame[frame["status"] == "pass"]])
        for column in ("error", "bound"):
            if column in ordered:
                ordered[column] = ordered[column].map(_num)
        if "block_size" in ordered:  # a float column once a row without a block size (poison) is in the frame
            ordered["block_size"] = ordered["block_size"].map(lambda b: "" if pd.isna(b) else str(int(b)))
        lines += [table(ordered.fillna("")), ""]
        matmul = frame[frame["check"] == "matmul"] if "check" in frame else frame.iloc[:0]
        if len(matmul):
            bounds = matmul.groupby("dtype")["bound"].agg(["min", "max"])
            spelled = ", ".join(f"{dtype} {low:.3g}–{high:.3g}" for dtype, (low, high) in bounds.iterrows())
            lines += [f"Matmul bound per dtype: ‖out − ref‖ / ‖ref‖ against float64 ≤ max(2 × PyTorch's own error "
                      f"(`F.linear` / its backward matmuls in that dtype, same inputs), 1e-6): {spelled}. Each "
                      "check ran twice on NaN-poisoned outputs after a warm-up call (compile, autotune).", ""]
    if not_run:
        lines += ["Not run (budget): " + "; ".join(not_run), ""]
    return lines


def _roofline_term(point) -> str:
    """Which ceiling sets the op's roofline: ``compute`` (d × the dense time) or ``memory`` (compulsory bytes)."""
    if pd.isna(point.roofline_ms):
        return ""
    return "memory" if point.roofline_ms > point.exact_density * point.dense_ms else "compute"


def _kernel_rows(kernels: pd.DataFrame, sizes: Sizes) -> pd.DataFrame:
    """One row per (shape, b, d, op): the ``grouped`` variant's time (``triton_grouped``), ratios, bars, and each
    variant's time at the same token count and dtype."""
    comparison = kernel_comparison(kernels)
    comparison = comparison[comparison["status"] == "ok"]
    rows = []
    grouped = comparison[comparison["provider"] == "triton_grouped"]
    for point in grouped.itertuples():
        same = comparison[
            (comparison["shape"] == point.shape)
            & (comparison["op"] == point.op)
            & (comparison["block_size"] == point.block_size)
            & (comparison["density"] == point.density)
            & (comparison["M"] == point.M)
            & (comparison["dtype"] == point.dtype)
        ]
        times = {VARIANT_PROVIDERS.get(p, p): t for p, t in zip(same["provider"], same["ms_p50"])}
        c = BARS.get(round(float(point.density), 6))
        headline = point.block_size == sizes.kernel_block_sizes[0] and c is not None
        row = {"shape": point.shape, "b": int(point.block_size), "d": point.density, "op": point.op,
               "ms": _num(point.ms_p50), "dense ms": _num(point.dense_ms), "vs d×dense": _num(point.vs_d_dense),
               "vs roofline": _num(point.vs_roofline), "roofline term": _roofline_term(point)}  # fmt: skip
        if headline and pd.isna(point.roofline_ms):  # no dense row or no copy ceiling: no bar can be set
            row |= {"kernel bar": "", "kernel": _verdict(None)}
        elif headline:
            allowed = point.roofline_ms <= point.exact_density * point.dense_ms  # compute-bound
            bar, value = (f"≤ {c} × d×dense", point.vs_d_dense) if allowed else (f"≤ {ROOFLINE_BAR} × roofline",
                                                                                  point.vs_roofline)  # fmt: skip
            row |= {"kernel bar": bar, "kernel": _verdict(value <= (c if allowed else ROOFLINE_BAR))}
        bsr = times.get("torch_bsr")
        row["vs BSR"] = _num(bsr / point.ms_p50) if bsr else ""
        row[f"BSR ≥ {BSR_BAR}×"] = _verdict(None if not bsr else bsr / point.ms_p50 >= BSR_BAR)
        if point.density <= 0.5:
            row["≤ dense"] = _verdict(None if pd.isna(point.dense_ms) else point.ms_p50 <= point.dense_ms)
        variants = {name: t for name, t in times.items() if name in VARIANT_PROVIDERS.values()}
        best = min(variants, key=variants.get)
        row |= {name: _num(variants.get(name)) for name in VARIANT_PROVIDERS.values()}
        row["best"] = f"{best} ({_num(variants[best] / point.ms_p50, '.2f')}×)"
        rows.append(row)
    return pd.DataFrame(rows)


def kernel_section(kernels: pd.DataFrame | None, sizes: Sizes) -> list[str]:
    lines = ["## Kernel bars", ""]
    if kernels is None or not (kernels["provider"] == "triton_grouped").any():
        return lines + ["Not measured.", ""]
    frame = _kernel_rows(kernels, sizes)
    if frame.empty:
        return lines + ["No triton_grouped row matched the fp32 dense computation (status ok).", ""]
    for column in ("kernel", f"BSR ≥ {BSR_BAR}×", "≤ dense"):
        if column in frame:
            counts = frame[column].value_counts()
            lines.append(f"* {column}: {counts.get('pass', 0)} pass, {counts.get('miss', 0)} miss, "
                         f"{counts.get('not measured', 0)} not measured")  # fmt: skip
    # a timed case whose result failed its check (status wrong) or did not run is in no bar: named, not dropped
    unjudged = kernels[(kernels["suite"] == "kernels") & (kernels["provider"] == "triton_grouped")
                       & (kernels["status"] != "ok")]  # fmt: skip
    lines += [f"* not judged: {r.shape} b={_num(r.block_size, '.0f')} d={_num(r.density, 'g')} {r.op} {r.provider}: "
              f"{r.status}" + (f" ({r.note})" if isinstance(r.note, str) and r.note else "")
              for r in unjudged.itertuples()]  # fmt: skip
    lines += ["", "`ms`: the `grouped` variant (`triton_grouped`); the variant columns are the same op A/B-timed in "
              "this run (ms), `best` its time relative to `grouped`. A miss names its limit: `roofline term` is "
              "the larger term of the op's roofline, `vs roofline` how far the kernel is from it (≈ 1: at the "
              "ceiling). `vs BSR`: torch's `bsr_dense_mm` / `sampled_addmm` over our time, with the launch "
              "parameters the environment's `torch_bsr_params` names.", "", table(frame.fillna("")), ""]  # fmt: skip
    return lines


def variant_section(kernels: pd.DataFrame | None) -> list[str]:
    """Per op and block size, each timed variant's time relative to ``grouped``: the geometric mean of
    ``t / t_grouped`` over the shapes and densities where both ran, and how often each was the fastest. The ``all``
    row compares what ``SMET_MATMUL_VARIANT`` selects, one variant for all three ops (an op a variant does not change
    runs the grouped kernel: ratio 1), so ``plain_order``, the benchmark's baseline order, is not in it."""
    lines = ["## Kernel variants", ""]
    not_measured = lines + ["Not measured (needs `triton_grouped` and another variant timed on the same points).", ""]
    if kernels is None:
        return not_measured
    # the timed rows alone: the ratios and rooflines of kernel_comparison are not needed here
    measured = kernels[(kernels["suite"] == "kernels") & kernels["ms_p50"].notna() & (kernels["status"] == "ok")
                       & kernels["provider"].isin(list(VARIANT_PROVIDERS))]  # fmt: skip
    if measured["provider"].nunique() < 2 or not (measured["provider"] == "triton_grouped").any():
        return not_measured
    wide = measured.pivot_table(index=["op", "block_size", "shape", "density", "M", "dtype"], columns="provider",
                                values="ms_p50")
    wide = wide.rename(columns=VARIANT_PROVIDERS).dropna(subset=["grouped"])
    log_ratio = np.log(wide.div(wide["grouped"], axis=0))
    ops = log_ratio.index.get_level_values("op")
    selected = pd.DataFrame({name: log_ratio[name].where(ops.isin(VARIANT_OPS.get(f"triton_{name}", OPS)), 0.0)
                             for name in VARIANTS if name in log_ratio})  # fmt: skip
    rows = []
    for (op, block_size), group in [*log_ratio.groupby(level=["op", "block_size"]), (("all", ""), selected)]:
        wins = group.idxmin(axis=1).value_counts()
        row = {"op": op, "b": block_size if op == "all" else int(block_size), "points": len(group)}
        row |= {name: _num(np.exp(group[name].mean()), ".3f") if name in group else "" for name in wide.columns}
        row["fastest (points)"] = ", ".join(f"{name} {count}" for name, count in wins.items())
        rows.append(row)
    overall = np.exp(selected.mean())
    lines += [f"Geometric mean of t / t_grouped (< 1: faster than `grouped`). Of the variants `SMET_MATMUL_VARIANT` "
              f"selects, over every op and block size, `{overall.idxmin()}` is the fastest ({overall.min():.3f}× "
              "grouped).", "", table(pd.DataFrame(rows)), ""]  # fmt: skip
    return lines


def adamw_section(kernels: pd.DataFrame | None) -> list[str]:
    lines = ["## Compact AdamW", ""]
    if kernels is None:
        return lines + ["Not measured.", ""]
    optimizer = kernels[(kernels["suite"] == "optimizer") & kernels["gbps"].notna()]
    ceiling = optimizer[optimizer["shape"] == "dense:ceiling"]["gbps"]
    smet = optimizer[(optimizer["provider"] == "smet_adamw") & (optimizer["density"] == 0.25)]
    if smet.empty:
        return lines + ["Not measured.", ""]
    rows = [{"provider": r.provider, "tensor": r.shape, "ms": _num(r.ms_p50), "GB/s": _num(r.gbps),
             "status": r.status + (f" ({r.note})" if r.status != "ok" else "")} for r in optimizer.itertuples()]
    lines += [table(pd.DataFrame(rows)), ""]
    if (smet["status"] != "ok").any():  # a fast step that computes something else passes no bar
        return lines + [f"Bar: compact AdamW — **{_verdict(False)}**: a step does not match its reference "
                        "(status wrong above).", ""]  # fmt: skip
    if ceiling.empty:
        return lines + [f"Bar (≥ {ADAMW_BAR:.0%} of the copy ceiling): not measured (stage env did not run).", ""]
    best = ceiling.max()  # this GPU's best copy, as the predictions take it; every compact step is judged on it
    ratio = smet["gbps"].min() / best
    lines += [f"Bar: compact AdamW at {ratio:.1%} of the copy ceiling ({_num(best, '.4g')} GB/s, "
              f"bytes read + written) — **{_verdict(ratio >= ADAMW_BAR)}** (≥ {ADAMW_BAR:.0%}).", ""]  # fmt: skip
    return lines


def kernels_of_this_plan(kernels: pd.DataFrame, sizes: Sizes) -> pd.DataFrame:
    """The kernels.csv rows of this plan's cases (:func:`.measure.plan_keys`): rows of other sizes, token counts or
    dtypes that another run added to the folder must not stand in for this run's in the bars, variants, predictions
    or ceilings."""
    from .measure import plan_keys

    keys, columns = plan_keys(sizes), [k for k in KERNEL_KEY if k != "backend"]
    return kernels[[tuple(canonical(v) for v in row) in keys for row in kernels[columns].itertuples(index=False)]]


def of_this_plan(training: pd.DataFrame, sizes: Sizes) -> pd.DataFrame:
    """The rows at this plan's training sizes (batch, sequence length, dtype, block size, vocabulary, density): another
    run into the same folder may have added rows of other sizes, which must not stand in for this run's."""
    from .measure import TRAINING_DENSITY

    return training[(training["batch_size"] == sizes.training_batch) & (training["seq_len"] == sizes.training_seq)
                    & (training["dtype"] == sizes.dtype) & (training["block_size"] == sizes.training_block_size)
                    & (training["vocab_size"] == sizes.training_vocab)
                    & training["density"].isin([TRAINING_DENSITY, 1.0])]  # fmt: skip


def training_section(training: pd.DataFrame | None, sizes: Sizes, compile_row: dict | None,
                     compile_origin: str = "") -> list[str]:  # fmt: skip
    lines = ["## Training steps", ""]
    if training is not None and not training.empty:
        mine = of_this_plan(training, sizes)
        if len(mine) < len(training):
            lines += [f"{len(training) - len(mine)} row(s) of training.csv at other sizes than this plan's ("
                      f"{sizes.training_batch} × {sizes.training_seq} tokens, {sizes.dtype}, "
                      f"b {sizes.training_block_size}, vocab {sizes.training_vocab}) are left out.", ""]  # fmt: skip
        training = mine
    if training is None or training.empty:
        lines += ["Not measured.", ""]
    else:
        gib = 2.0**30
        rows = [
            {
                "config": r.config,
                "method": r.method,
                "d": r.density,
                "act. ckpt": "yes" if r.activation_checkpointing else "no",
                "tokens/s": _num(r.tokens_per_s, ".4g"),
                "warm-up s": _num(getattr(r, "warmup_s", float("nan")), ".3g"),
                "peak allocated GiB": _num(r.peak_allocated_bytes / gib),
                "NVML peak GiB": fmt_nvml_peak(r.nvml_peak_bytes, r.nvml_status, _gib) or r.nvml_status,
                "predicted peak GiB": _num(r.pred_peak_bytes / gib),
                "status": r.status,
            }
            for r in training.itertuples()
        ]
        lines += [table(pd.DataFrame(rows)), ""]
        config = sizes.training_configs[-1]  # the config of the bars
        plain = ~training["compiled"] & ~training["activation_checkpointing"]
        by_method = {r.method: r for r in training[(training["config"] == config) & plain
                                                   & (training["status"] == "ok")].itertuples()}  # fmt: skip
        smet = by_method.get("smet")
        for other, column, better, what in (("dense", "tokens_per_s", "more", "tokens/s"),
                                            ("dense", "peak_allocated_bytes", "less", "peak memory"),
                                            ("galore", "peak_allocated_bytes", "less", "peak memory")):  # fmt: skip
            if smet is None or other not in by_method:
                lines.append(f"* SMET {what} vs {other} at {config}: not measured")
                continue
            mine, theirs = getattr(smet, column), getattr(by_method[other], column)
            if pd.isna(mine) or pd.isna(theirs):
                lines.append(f"* SMET {what} vs {other} at {config}: not measured (no {column} on this device)")
                continue
            ok = mine > theirs if better == "more" else mine < theirs
            lines.append(f"* SMET {what} vs {other} at {config}: {mine / theirs:.3f}× — **{_verdict(ok)}** "
                         f"({better} is the bar)")  # fmt: skip
        lines += checkpointing_lines(training[(training["config"] == config) & (training["status"] == "ok")], config)
        lines.append("")
    lines += ["### torch.compile", ""]
    if compile_row is None:
        return lines + ["Not run.", ""]
    if compile_origin:
        lines += [f"This result is {compile_origin}.", ""]
    if compile_row.get("status") != "ok":
        return lines + [f"SMET step at {compile_row.get('config')}: eager "
                        f"{_num(compile_row.get('eager_tokens_per_s'), '.4g')} tokens/s; compiled "
                        f"{compile_row.get('status')}", ""]  # fmt: skip
    ratio = compile_row["compiled_tokens_per_s"] / compile_row["eager_tokens_per_s"]
    return lines + [f"SMET step at {compile_row['config']}: eager {compile_row['eager_tokens_per_s']:.4g}, compiled "
                    f"{compile_row['compiled_tokens_per_s']:.4g} tokens/s ({ratio:.2f}×).", ""]  # fmt: skip


def checkpointing_lines(training: pd.DataFrame, config: str) -> list[str]:
    """Per method measured with and without activation checkpointing at ``config``: the peak (allocated on CUDA,
    else the accounted components) and its prediction, without → with, and the tokens/s ratio."""
    if training.empty or not training["activation_checkpointing"].any():
        return [f"* activation checkpointing at {config}: not measured"]
    peak, label = peak_column(training)
    pairs = side_by_side(training.assign(peak=peak), "activation_checkpointing",
                         ["peak", "pred_peak_bytes", "tokens_per_s"])  # fmt: skip
    gib, source = 2.0**30, label.split(" (")[0].split(":")[0]
    lines = []
    for r in pairs[~pairs["compiled"]].itertuples():
        lines.append(f"* activation checkpointing at {config}, {r.method}: peak {_num(r.peak_off / gib)} → "
                     f"{_num(r.peak_on / gib)} GiB ({_ratio(r.peak_on, r.peak_off)}×; predicted "
                     f"{_num(r.pred_peak_bytes_off / gib)} → {_num(r.pred_peak_bytes_on / gib)} GiB), tokens/s "
                     f"{_ratio(r.tokens_per_s_on, r.tokens_per_s_off)}× (peak: {source})")  # fmt: skip
    return lines


def _this_machine(frame: pd.DataFrame | None, gpu: str) -> pd.DataFrame | None:
    return None if frame is None else frame[frame["gpu"] == gpu]


def write(out_dir: Path, sizes: Sizes, env: dict, stages: list[dict], correctness: tuple[list, list],
          compile_row: dict | None, command: str, origins: dict[str, str] | None = None) -> Path:  # fmt: skip
    """Render ``out_dir/gpu_check.md`` from the stage results and this machine's rows of the CSVs; ``origins``
    names the stages whose result an earlier run into ``out_dir`` made (:func:`.saved.origin`)."""
    origins = origins or {}
    kernels = _this_machine(load_csv(out_dir / "kernels.csv"), env["device"])
    training = _this_machine(load_csv(out_dir / "training.csv"), env["device"])
    lines = [f"# gpu-check: {env['device']}", "", f"Made by `{command}` ({sizes.name} sizes).", "",
             " · ".join(f"{k} {v}" for k, v in env.items()), ""]  # fmt: skip
    if kernels is not None:
        mine = kernels_of_this_plan(kernels, sizes)
        if len(mine) < len(kernels):
            lines += [f"{len(kernels) - len(mine)} row(s) of kernels.csv measure other cases than this plan's "
                      f"({sizes.kernel_tokens} tokens, {sizes.dtype}, b {', '.join(map(str, sizes.kernel_block_sizes))}"
                      "): they are left out of every section below.", ""]  # fmt: skip
        kernels = mine
    if kernels is not None:
        matmul = kernels[(kernels["shape"] == "ceiling") & kernels["tflops"].notna()]["tflops"]
        copy = kernels[(kernels["shape"] == "dense:ceiling") & kernels["gbps"].notna()]["gbps"]
        lines += [f"Ceilings (stage env; this GPU's best in kernels.csv): matmul {_num(matmul.max(), '.4g')} "
                  "TFLOP/s "
                  f"({sizes.ceiling_matmul}³ {sizes.dtype}), device copy {_num(copy.max(), '.4g')} GB/s "
                  "(bytes read + written).", ""]  # fmt: skip
    if sizes.name == "cpu":
        lines += ["CPU run: interpreter sizes and times. It checks that every stage, check and bar is produced; "
                  "its ratios say nothing about the GPU bars.", ""]  # fmt: skip
    stage_frame = pd.DataFrame(stages)
    lines += ["## Stages", "", table(stage_frame.fillna("")), ""]
    selected = any(row["stage"] == "correctness" and row["status"] != "not selected" for row in stages)
    sections = (("Correctness", correctness_section, (*correctness, origins.get("correctness", ""), selected)),
                ("Kernel bars", kernel_section, (kernels, sizes)),
                ("Kernel variants", variant_section, (kernels,)),
                ("Predicted vs measured", prediction_section, (kernels, sizes.kernel_block_sizes[0])),
                ("Compact AdamW", adamw_section, (kernels,)),
                ("Training steps", training_section, (training, sizes, compile_row, origins.get("compile", ""))))
    for title, render, arguments in sections:
        try:  # one section that cannot render its rows must not cost the summary the others
            lines += render(*arguments)
        except Exception as error:
            lines += [f"## {title}", "", f"Could not render this section: {type(error).__name__}: {error}", ""]
    path = out_dir / "gpu_check.md"
    partial = path.with_suffix(".md.partial")
    partial.write_text("\n".join(lines))
    partial.replace(path)  # atomic: a run stopped while writing leaves the previous summary whole
    return path
