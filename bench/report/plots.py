"""The report's PNG plots (seaborn): kernel time vs density, peak memory per method and vs density, the memory
model against the measurement."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..plotting import config_order, pyplot, save
from .derive import dense_label

OP_ORDER = ("forward", "grad_input", "grad_weight")


def provider_palette(providers) -> dict:
    """One fixed colour per provider, the same in every panel: the known providers' order picks it."""
    from ..kernels import SPARSE_PROVIDERS

    names = list(SPARSE_PROVIDERS) + sorted(set(providers) - set(SPARSE_PROVIDERS))
    return dict(zip(names, pyplot()[1].color_palette("colorblind", len(names))))


def plot_kernel_times(comparison: pd.DataFrame, path: Path) -> str:
    """Kernel time (log scale) vs density for the largest measured shape and block size, with the dense and
    d × dense lines."""
    plt, sns = pyplot()
    largest = comparison.assign(work=comparison["M"] * comparison["K"] * comparison["N"])
    largest = largest.sort_values(["work", "block_size"], ascending=False).iloc[0]
    pick = comparison[
        (comparison["M"] == largest["M"])
        & (comparison["K"] == largest["K"])
        & (comparison["N"] == largest["N"])
        & (comparison["block_size"] == largest["block_size"])
        & (comparison["gpu"] == largest["gpu"])
        & (comparison["dtype"] == largest["dtype"])
    ]
    library = [b for b in ("triton", "reference") if b in set(pick["backend"])][:1]  # Triton where measured
    pick = pick[pick["backend"].isin(library + ["torch"])]  # one smet backend; torch baselines
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
    return save(fig, path)


def plot_peak_vs_model(training: pd.DataFrame, peak_label: str, unit: str, path: Path) -> str:
    """Peak memory per config, each method shifted sideways by its own offset and drawn with its own marker, so
    methods with equal peaks stay apart."""
    plt, sns = pyplot()
    fig, axis = plt.subplots(figsize=(8, 4.5))
    order = config_order(training["config"])
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
    return save(fig, path)


def plot_vs_density(training: pd.DataFrame, column: str, ylabel: str, title: str, path: Path) -> str:
    """``column`` vs density per config: masked/SMET as lines, dense/GaLore as horizontal lines."""
    plt, sns = pyplot()
    configs = config_order(training["config"])
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
    return save(fig, path)


def plot_predicted_vs_measured(errors: pd.DataFrame, path: Path) -> str:
    plt, sns = pyplot()
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
    return save(fig, path)
