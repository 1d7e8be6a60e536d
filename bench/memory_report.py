"""``memory.md`` and plots of the memory-scaling grid (``memory.csv``, :mod:`bench.memory_scaling`).

Sections: the largest LLaMA each method trains on a 24 / 80 / 141 GB GPU (traced peak ≤ capacity, decimal GB),
traced vs measured and traced vs model per component (relative error = (other − traced) / traced), GPU runs
where a ``training.csv`` of a GPU exists (allocator and NVML peaks beside the traced peak of the same case), and
the plots: peak vs model size (log–log), stacked components at 1b and 7b, SMET and masked DST as a fraction of
dense vs density.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .memory_scaling import BLOCK_SIZE, COMPONENTS, CONFIGS, DTYPE, SPARSE_METHODS, MemoryCase
from .markdown import fmt_bytes, fmt_nvml_peak, table
from .plotting import pyplot, save
from .report import load_csv
from .report.derive import on_cpu

CAPACITIES_GB = (24, 80, 141)
GB = 1e9


def headline_settings(traced: pd.DataFrame) -> dict:
    """The settings of the plots and the headline table: the largest vocab, fp32 states where traced, the smallest
    batch (the plots show one batch shape; the headline table every one)."""
    states = set(traced["state_dtype"])
    return {"vocab_size": int(traced["vocab_size"].max()), "state_dtype": "fp32" if "fp32" in states else
            sorted(states)[0], "batch_size": int(traced["batch_size"].min())}  # fmt: skip


def plot_rows_of(traced: pd.DataFrame) -> pd.DataFrame:
    """The rows of the plots and the peak table: :func:`headline_settings`, the grid's weight dtype and block size
    (GPU cases traced beside it may have others) and one sequence length (the shortest at that batch), so that each
    method and size has one point, not the mean of several batch shapes or dtypes."""
    grid = _grid_cases(traced)  # first: a GPU case's smaller batch or larger vocab is no setting of the grid's
    rows = _settings(grid, **headline_settings(grid))
    return rows[rows["seq_len"] == rows["seq_len"].min()]


def _grid_cases(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows of the grid's weight dtype and block size, where it has any: a GPU case traced beside it (fp32
    weights, another block size) is a case of its own, in the GPU section."""
    for column, grid in (("dtype", DTYPE), ("block_size", BLOCK_SIZE)):
        if (rows[column] == grid).any():
            rows = rows[rows[column] == grid]
    return rows


def label(frame: pd.DataFrame) -> pd.Series:
    """``dense``, ``galore``, ``masked d=0.5``, ``smet d=0.1``..."""
    return pd.Series(
        [f"{m} d={d:g}" if m in SPARSE_METHODS else m for m, d in zip(frame["method"], frame["density"])],
        index=frame.index,
    )


def dense_parameters(config: str, vocab_size: int) -> int:
    """Parameters of the dense LLaMA ``config`` (hidden linears, embedding, head, norms)."""
    from profiling.memory_model import hidden_linear_shapes

    llama = MemoryCase(config, "dense", 1.0, "bf16", 1, 1, vocab_size, False).llama_config()
    hidden = sum(o * i for o, i in hidden_linear_shapes(llama).values())
    return hidden + 2 * vocab_size * llama.hidden_size + (2 * llama.num_layers + 1) * llama.hidden_size


def _settings(frame: pd.DataFrame, **settings) -> pd.DataFrame:
    """Rows with the given column values; ``state_dtype`` fp32 also keeps GaLore's bf16 rows (it has no fp32)."""
    keep = pd.Series(True, index=frame.index)
    for column, value in settings.items():
        match = frame[column] == value
        if column == "state_dtype":
            match |= frame["method"] == "galore"
        keep &= match
    return frame[keep]


def _order(frame: pd.DataFrame) -> pd.DataFrame:
    rank = {c: i for i, c in enumerate(CONFIGS)}
    methods = {m: i for i, m in enumerate(("dense", "galore", "masked", "smet"))}
    return frame.assign(_c=frame["config"].map(rank), _m=frame["method"].map(methods)).sort_values(
        ["_c", "_m", "density"], ascending=[True, True, False]
    ).drop(columns=["_c", "_m"])


# ---------------------------------------------------------------------------------------------- headline
def largest_fitting(traced: pd.DataFrame, capacity_bytes: float) -> pd.DataFrame:
    """Per method/density/state dtype/batch/vocab/checkpointing, the largest config whose traced peak fits."""
    keys = ["method", "density", "state_dtype", "batch_size", "seq_len", "vocab_size", "activation_checkpointing"]
    rank = {c: i for i, c in enumerate(CONFIGS)}
    fits = traced[traced["peak_bytes"] <= capacity_bytes].assign(rank=lambda f: f["config"].map(rank))
    best = fits.sort_values("rank").groupby(keys, as_index=False).last()
    return best[keys + ["config", "peak_bytes"]]


def headline_table(traced: pd.DataFrame, checkpointing: bool) -> pd.DataFrame:
    """Rows: method (and density, state dtype); columns: capacity × batch shape; cells: largest config (its peak)."""
    grid = _grid_cases(traced)
    rows = _settings(grid, vocab_size=headline_settings(grid)["vocab_size"],
                     activation_checkpointing=checkpointing)  # fmt: skip
    rows = rows.assign(label=label(rows))
    out = _order(rows)[["label", "method", "density", "state_dtype"]].drop_duplicates(["label", "state_dtype"])
    out = out.set_index(["label", "state_dtype"])
    shapes = sorted(set(zip(rows["batch_size"], rows["seq_len"])))
    for capacity in CAPACITIES_GB:
        best = largest_fitting(rows, capacity * GB).assign(label=lambda f: label(f))
        for batch, seq in shapes:  # every traced shape: one where nothing fits is a column of `none`, not missing
            group = best[(best["batch_size"] == batch) & (best["seq_len"] == seq)]
            cells = {
                (r.label, r.state_dtype): f"{r.config} ({r.peak_bytes / GB:.1f} GB)" for r in group.itertuples()
            }
            out[f"{capacity} GB, {batch}×{seq}"] = [cells.get(index, "none") for index in out.index]
    out = out.reset_index().drop(columns=["method", "density"])
    return out.rename(columns={"label": "method", "state_dtype": "states"})


# ---------------------------------------------------------------------------------------------- agreement
KEY = ["config", "method", "density", "dtype", "state_dtype", "block_size", "distribution", "batch_size", "seq_len",
       "vocab_size", "activation_checkpointing"]  # fmt: skip


def agreement(frame: pd.DataFrame, other: str) -> pd.DataFrame:
    """One row per (case, component) present in both the traced and the ``other`` rows, with the relative error
    ``(other − traced) / traced``."""
    traced = frame[frame["source"] == "traced"]
    compared = frame[frame["source"] == other]
    merged = traced.merge(compared, on=KEY, suffixes=("_traced", "_other"))
    rows = []
    for component in list(COMPONENTS) + ["peak"]:
        a, b = merged[f"{component}_bytes_traced"], merged[f"{component}_bytes_other"]
        present = a.notna() & b.notna() & (a > 0)
        part = merged.loc[present, KEY].assign(
            component=component, traced=a[present], other=b[present], error=(b[present] - a[present]) / a[present]
        )
        rows.append(part)
    return pd.concat(rows, ignore_index=True)


def agreement_summary(errors: pd.DataFrame) -> pd.DataFrame:
    grouped = errors.groupby("component", sort=False)["error"]
    return pd.DataFrame(
        {
            "cases": grouped.size(),
            "median abs error": grouped.apply(lambda e: f"{100 * np.median(np.abs(e)):.3f} %"),
            "max abs error": grouped.apply(lambda e: f"{100 * np.max(np.abs(e)):.3f} %"),
            "max abs difference": grouped.apply(lambda e: "")
            if errors.empty
            else errors.assign(d=(errors["other"] - errors["traced"]).abs()).groupby("component", sort=False)["d"]
            .max()
            .map(fmt_bytes),
        }
    ).reset_index()


# ---------------------------------------------------------------------------------------------- GPU runs
def gpu_rows(reports_dir: Path) -> pd.DataFrame | None:
    """The training-suite rows of every GPU folder under ``reports_dir`` (``*/training.csv`` rows whose ``gpu``
    is not a CPU), keyed like the memory grid: bf16 states = the training dtype (the suite's optimizers keep
    states in the parameter dtype), each row's vocabulary and activation checkpointing; compiled rows are left out
    (the traced step is eager autograd)."""
    frames = []
    for path in sorted(Path(reports_dir).glob("*/training.csv")):
        frame = load_csv(path)
        if frame is None:
            continue
        frame = frame[~on_cpu(frame["gpu"]) & (frame["status"] == "ok") & frame["config"].isin(CONFIGS)]
        if len(frame):
            frames.append(frame)
    if not frames:
        return None
    frame = pd.concat(frames, ignore_index=True)
    frame = frame[~frame["compiled"].astype(bool)]  # the traced step is eager autograd; Inductor saves other tensors
    return frame.assign(
        state_dtype=frame["dtype"], distribution="uniform", vocab_size=frame["vocab_size"].astype(int),
        activation_checkpointing=frame["activation_checkpointing"].astype(bool),
    )


def gpu_cases(reports_dir: Path) -> list[MemoryCase]:
    """The memory-grid cases of the GPU rows under ``reports_dir`` (traced too, so that the two compare)."""
    frame = gpu_rows(reports_dir)
    if frame is None:
        return []
    return [
        MemoryCase(r.config, r.method, float(r.density), r.state_dtype, int(r.batch_size), int(r.seq_len),
                   int(r.vocab_size), bool(r.activation_checkpointing), dtype=r.dtype,
                   block_size=int(r.block_size))  # fmt: skip
        for r in frame.itertuples()
    ]


def gpu_comparison(frame: pd.DataFrame, gpus: pd.DataFrame) -> pd.DataFrame:
    """GPU allocator and NVML peaks beside the traced peak of the same case."""
    traced = frame[frame["source"] == "traced"]
    merged = gpus.merge(traced[KEY + ["peak_bytes"]], on=KEY, how="inner")
    return merged.assign(
        allocator_vs_traced=(merged["peak_allocated_bytes"] - merged["peak_bytes"]) / merged["peak_bytes"]
    )


# ---------------------------------------------------------------------------------------------- plots
def _describe(rows: pd.DataFrame) -> str:
    """``batch 8×256, vocab 32000, bf16 weights, fp32 states`` of the plotted rows."""
    first = rows.iloc[0]
    states = sorted(set(rows.loc[rows["method"] != "galore", "state_dtype"])) or ["bf16"]
    return (f"batch {first['batch_size']}×{first['seq_len']}, vocab {first['vocab_size']}, {first['dtype']} weights, "
            f"{'/'.join(states)} states (GaLore: bf16)")


def plot_peak_vs_size(traced: pd.DataFrame, gpu: pd.DataFrame | None, path: Path) -> str:
    plt, sns = pyplot()
    data = traced.assign(label=label(traced), params=[dense_parameters(c, v) for c, v in
                                                      zip(traced["config"], traced["vocab_size"])])  # fmt: skip
    data = data.assign(peak_gb=data["peak_bytes"] / GB)
    panels = [False, True]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), squeeze=False, sharey=True)
    order = list(dict.fromkeys(_order(data)["label"]))
    for axis, ckpt in zip(axes[0], panels):
        part = data[data["activation_checkpointing"] == ckpt]
        sns.lineplot(data=part, x="params", y="peak_gb", hue="label", hue_order=order, style="label",
                     style_order=order, markers=True, dashes=False, ax=axis)  # fmt: skip
        # each GPU row in the panel of its activation checkpointing, at the parameters of its own vocabulary
        rows = gpu[gpu["activation_checkpointing"] == ckpt] if gpu is not None else None
        if rows is not None and len(rows):
            params = [dense_parameters(c, v) for c, v in zip(rows["config"], rows["vocab_size"])]
            axis.scatter(params, rows["peak_allocated_bytes"] / GB, marker="X", s=80, color="black",
                         label="GPU allocator peak (its own batch and vocab)")  # fmt: skip
            nvml = rows["nvml_peak_bytes"].where(rows["nvml_status"] == "ok")  # a failed sampler's: a lower bound
            if nvml.notna().any():
                axis.scatter(params, nvml / GB, marker="+", s=80, color="red", label="GPU NVML peak")
        for capacity in CAPACITIES_GB:
            axis.axhline(capacity, color="grey", linestyle=":", linewidth=1)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("dense parameters")
        axis.set_ylabel("traced peak (GB)")
        axis.set_title("activation checkpointing" if ckpt else "no activation checkpointing")
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    fig.suptitle(f"Peak memory of one training step vs model size\n{_describe(traced)}; dotted: 24/80/141 GB")
    return save(fig, path)


def _one_mode(rows: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The rows without activation checkpointing, or the checkpointed ones where only those were traced, and the
    mode's name."""
    checkpointed = bool(rows["activation_checkpointing"].all())
    mode = "activation checkpointing" if checkpointed else "no checkpointing"
    return rows[rows["activation_checkpointing"] == checkpointed], mode


def plot_components(traced: pd.DataFrame, configs, path: Path) -> str:
    plt, sns = pyplot()
    traced, mode = _one_mode(traced)  # a grid traced only with checkpointing drew empty panels
    colors = sns.color_palette("colorblind", len(COMPONENTS))
    fig, axes = plt.subplots(1, len(configs), figsize=(6.5 * len(configs), 4.5), squeeze=False)
    for axis, config in zip(axes[0], configs):
        part = _order(traced[traced["config"] == config])
        labels = label(part).tolist()
        bottom = np.zeros(len(part))
        for color, component in zip(colors, COMPONENTS):
            values = part[f"{component}_bytes"].to_numpy(dtype=float) / GB
            axis.bar(labels, values, bottom=bottom, color=color, label=component)
            bottom += values
        axis.set_title(config)
        axis.set_ylabel("GB")
        axis.tick_params(axis="x", rotation=45)
        axis.legend(fontsize=8)
    fig.suptitle(f"Traced components ({_describe(traced)}, {mode})")
    return save(fig, path)


def plot_fraction_of_dense(traced: pd.DataFrame, path: Path) -> str:
    plt, sns = pyplot()
    traced, mode = _one_mode(traced)  # a grid traced only with checkpointing drew empty panels
    dense = traced[traced["method"] == "dense"].set_index(["config", "activation_checkpointing"])["peak_bytes"]
    sparse = traced[traced["method"].isin(SPARSE_METHODS)]
    sparse = sparse.assign(  # a size traced without dense (another run's --methods) has no fraction to plot
        fraction=[p / dense.get((c, k), np.nan) for p, c, k in zip(sparse["peak_bytes"], sparse["config"],
                                                                    sparse["activation_checkpointing"])]  # fmt: skip
    ).dropna(subset=["fraction"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), squeeze=False, sharey=True)
    for axis, method in zip(axes[0], SPARSE_METHODS):
        part = sparse[sparse["method"] == method]
        sns.lineplot(data=part, x="density", y="fraction", hue="config", hue_order=[c for c in CONFIGS
                     if c in set(part["config"])], marker="o", ax=axis)  # fmt: skip
        axis.axhline(1.0, color="black", linewidth=1)
        axis.set_title(f"{method}: traced peak / dense peak")
        axis.set_xlabel("density")
        axis.set_ylabel("fraction of dense")
    fig.suptitle(f"{_describe(traced)}, {mode}")
    return save(fig, path)


# ---------------------------------------------------------------------------------------------- report
def write_memory_report(out_dir, reports_dir=None) -> Path:
    """Write ``<out_dir>/memory.md`` and its plots from ``<out_dir>/memory.csv``; GPU rows from
    ``<reports_dir>/*/training.csv`` (default: the parent of ``out_dir``)."""
    out_dir = Path(out_dir)
    frame = load_csv(out_dir / "memory.csv")
    if frame is None:
        raise ValueError(f"no memory.csv in {out_dir}: run `smet-bench memory` first")
    traced = frame[frame["source"] == "traced"]
    if traced.empty:  # e.g. a run stopped after its first modelled row
        raise ValueError(f"no traced row in {out_dir / 'memory.csv'}: run `smet-bench memory` to trace the grid")
    grid = _grid_cases(traced)  # the headline's rows: a GPU case of its own dtype or block size is not among them
    settings, grid_sizes = headline_settings(grid), [c for c in CONFIGS if c in set(grid["config"])]
    plot_rows = plot_rows_of(traced)
    reports_dir = Path(reports_dir) if reports_dir is not None else out_dir.parent
    gpus = gpu_rows(reports_dir)
    sizes = [c for c in CONFIGS if c in set(traced["config"])]
    lines = [f"# Memory scaling: one training step, {' to '.join(dict.fromkeys([sizes[0], sizes[-1]]))}", ""]
    commands = out_dir / "commands.txt"
    if commands.exists():
        lines += ["Made by:", "", "```", *commands.read_text().splitlines(), "```", ""]
    lines += [
        f"{len(traced)} cases traced on `meta` (nothing allocated), {int((frame['source'] == 'measured').sum())} "
        f"measured on real CPU tensors, {int((frame['source'] == 'model').sum())} predicted by "
        "`profiling/memory_model.py`; all rows in `memory.csv` (bytes per component, `source` says which).",
        "",
        "## Largest LLaMA that fits",
        "",
        f"Largest of the traced configurations ({', '.join(grid_sizes)}"
        + ("; a larger one, not traced, may fit too" if grid_sizes[-1] != CONFIGS[-1] else "")
        + ") whose traced peak (one step: weights + gradients + optimizer states + saved "
        f"activations + largest transient) is at most the GPU's memory, vocab {settings['vocab_size']}, bf16 "
        "weights, decimal GB (24e9, 80e9, 141e9 bytes: below the 24 GiB, 79.6 GiB and 140.4 GiB these cards "
        "have, leaving room for the CUDA context and allocator fragmentation, which no trace sees). `none`: not "
        f"even {grid_sizes[0]} fits.",
        "",
    ]
    for ckpt in (False, True):
        title = f"**{'With' if ckpt else 'Without'} activation checkpointing**"
        if not (grid["activation_checkpointing"] == ckpt).any():  # was a table of its header only
            lines += [f"{title}: not traced (`--activation-checkpointing {'on' if ckpt else 'off'}`).", ""]
            continue
        lines += [title, "", table(headline_table(traced, ckpt)), ""]
    lines += ["## Plots", ""]
    lines += [f"![peak vs model size]({plot_peak_vs_size(plot_rows, gpus, out_dir / 'peak_vs_model_size.png')})", ""]
    big = [c for c in ("1b", "7b") if c in set(plot_rows["config"])]
    if big:
        lines += [f"![components]({plot_components(plot_rows, big, out_dir / 'components_1b_7b.png')})", ""]
    if "dense" in set(plot_rows["method"]):
        lines += [f"![fraction of dense]({plot_fraction_of_dense(plot_rows, out_dir / 'fraction_of_dense.png')})", ""]
    else:
        lines += ["No plot of the sparse methods as a fraction of dense: `--methods` left out dense.", ""]
    lines += _agreement_section(frame)
    lines += _gpu_section(frame, gpus, reports_dir)
    lines += _peak_table(plot_rows)
    path = out_dir / "memory.md"
    path.write_text("\n".join(lines))
    return path


TRACE_NOTES = [
    "What the trace shows: the GPU path (Triton backend, fused AdamW), not the CPU reference. The block-sparse "
    "products run their `torch.library` ops' fake (`meta`) implementation, which allocates the output only, as "
    "the Triton kernels do (the split-K weight gradient's fp32 partial sums, used only when too few blocks fill "
    "the GPU, are not traced); the reference backend's dense temporaries never run. SMETAdamW's step (one fused "
    "Triton kernel) and `torch.optim.AdamW(fused=True)` update in place, so their step adds no transient; "
    "GaLore's step is PyTorch ops on a GPU as well, so its transients (projected gradient, back-projected "
    "update; the step traced is not an SVD step) are counted. Attention is the flash kernel's (q, k, v, output, "
    "fp32 logsumexp), in the forward and in the recompute of activation checkpointing (the model's own, "
    "non-reentrant `torch.utils.checkpoint`).",
    "",
]

MODEL_NOTES = [
    "Where the model and the trace differ (error above 2 %), per component:",
    "",
    "* weights, gradients, optimizer, activations: exact formulas, no difference beyond rounding.",
    "* rest: the model's transient is the largest of three working sets — the loss backward's fp32 log-prob "
    "and logits gradients (`8 T V`), an RMSNorm backward (`12 T h`), a SwiGLU backward (`3 e T i`, with "
    "checkpointing on top of the recomputed layer's activations). At vocab 32000 the loss term is the largest "
    "and exact. Where it is not, the model is an upper bound, because autograd frees each node's saved tensors "
    "once the node has run, so later gradients replace activations instead of adding to them: without "
    "checkpointing at vocab 256 the traced peak is in the final RMSNorm's backward (four fp32 `T × h` "
    "temporaries of the PyTorch-op RMSNorm, once the cross-entropy's saved log-probabilities are freed), while "
    "the model's `max` takes the larger SwiGLU term; with checkpointing (vocab 256, and masked DST at 7b, whose "
    "recomputed layer also holds its seven `W ⊙ M`) the traced peak is inside the recomputed layer's SwiGLU "
    "backward, where the down projection's saved input is already freed and not all three gradients coexist, "
    "while the model adds all three to every activation of the recomputed layer. SMET and masked DST at vocab "
    "32000 (up to 2.4 %, shrinking with the density): a layout's int64 block indices (16 B per block) stay on "
    "the CPU, where the layout is drawn; the tensor count puts them in `weights` (as the model does) but the "
    "traced device peak does not hold them, so the traced `rest` (peak − components) is lower by 16 B × nnz.",
    "* peak: the sum, so it carries the rest difference, diluted by the exact components.",
    "",
]


def rest_error_by_setting(errors: pd.DataFrame) -> pd.DataFrame:
    """Largest |error| of ``rest`` and ``peak`` per vocab size, activation checkpointing and method."""
    keys = ["vocab_size", "activation_checkpointing", "method"]
    part = errors[errors["component"].isin(["rest", "peak"])].assign(abs_error=lambda f: f["error"].abs())
    wide = part.pivot_table(index=keys, columns="component", values="abs_error", aggfunc="max").reset_index()
    for component in ("rest", "peak"):
        wide[component] = wide[component].map(lambda e: f"{100 * e:.2f} %")
    return wide.rename(columns={"rest": "max abs rest error", "peak": "max abs peak error",
                                "activation_checkpointing": "checkpointing"})  # fmt: skip


def _agreement_section(frame: pd.DataFrame) -> list[str]:
    lines = ["## Traced vs measured vs model", "", *TRACE_NOTES]
    for other, what in (("measured", "real CPU tensors"), ("model", "the analytic model")):
        errors = agreement(frame, other)
        if errors.empty:
            lines += [f"No {other} rows.", ""]
            continue
        lines += [f"**traced vs {other}** ({what}); error = ({other} − traced) / traced:", "",
                  table(agreement_summary(errors)), ""]  # fmt: skip
        if other == "model":
            lines += [*MODEL_NOTES, table(rest_error_by_setting(errors)), ""]
    return lines


def _gpu_section(frame: pd.DataFrame, gpus: pd.DataFrame | None, reports_dir: Path) -> list[str]:
    lines = ["## GPU runs", ""]
    if gpus is None:
        return lines + [f"No GPU `training.csv` in the folders of `{reports_dir}` yet: the plots and this section add "
                        "its allocator (`torch.cuda.max_memory_allocated`) and NVML peaks once one exists.",
                        ""]  # fmt: skip
    compared = gpu_comparison(frame, gpus)
    if compared.empty:
        return lines + ["GPU rows exist but none matches a traced case: rerun `smet-bench memory` to trace them.", ""]
    return lines + [
        table(
            pd.DataFrame(
                {
                    "gpu": compared["gpu"],
                    "config": compared["config"],
                    "method": label(compared),
                    "batch": compared["batch_size"].astype(int).astype(str) + "×" + compared["seq_len"].astype(int)
                    .astype(str),
                    "traced peak": compared["peak_bytes"].map(fmt_bytes),
                    "allocator peak": compared["peak_allocated_bytes"].map(fmt_bytes),
                    "NVML peak": [fmt_nvml_peak(v, s) for v, s in zip(compared["nvml_peak_bytes"],
                                                                       compared["nvml_status"])],
                    "allocator vs traced": compared["allocator_vs_traced"].map(lambda v: f"{100 * v:+.1f} %"),
                }
            )
        ),
        "",
    ]


def _peak_table(rows: pd.DataFrame) -> list[str]:
    """Traced peaks without activation checkpointing (with it where only checkpointed steps were traced)."""
    rows, mode = _one_mode(rows)
    rows = _order(rows)
    wide = rows.assign(label=label(rows)).pivot_table(index="label", columns="config", values="peak_bytes",
                                                      aggfunc="first", sort=False)  # fmt: skip
    wide = wide[[c for c in CONFIGS if c in wide.columns]].map(fmt_bytes).reset_index()
    return [f"## Traced peak per method and size ({_describe(rows)}, {mode})", "",
            table(wide.rename(columns={"label": "method"})), ""]  # fmt: skip
