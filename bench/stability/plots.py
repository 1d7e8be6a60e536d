"""Seaborn plots of a study: validation-loss curves and the mean loss profile around topology updates."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..plotting import pyplot
from .load import StudyData
from .spec import DENSE_METHOD, METHOD_ORDER
from .stats import GROUP, _same, missing


def _palette() -> dict:
    """One fixed colour per method, the same in every plot."""
    sns = pyplot()[1]
    return dict(zip(METHOD_ORDER, sns.color_palette("tab10", len(METHOD_ORDER))))


def plot_val_curves(data: StudyData, config: str, path: Path) -> Path:
    """Validation loss vs tokens: one panel per (density, α), the dense-like methods repeated in each panel."""
    import pandas as pd

    plt, sns = pyplot()

    runs = data.runs[data.runs["config"] == config]
    curves = data.evals.join(runs.set_index("key")[GROUP + ["seed"]], on="key", how="inner")
    densities = sorted(runs["density"].dropna().unique(), reverse=True) or [math.nan]
    alphas = sorted(runs["alpha"].dropna().unique()) or [math.nan]
    panels = []
    for density in densities:
        for alpha in alphas:
            keep = (_same(curves["density"], None) | (curves["density"] == density)) & \
                   (_same(curves["alpha"], None) | (curves["alpha"] == alpha))
            panel = curves[keep].copy()
            panel["panel_density"], panel["panel_alpha"] = f"d={density:g}", f"α={alpha:g}"
            panels.append(panel)
    frame = pd.concat(panels, ignore_index=True)
    hue_order = [m for m in METHOD_ORDER if m in set(frame["method"])]
    grid = sns.relplot(data=frame, x="tokens", y="val_loss", hue="method", hue_order=hue_order, kind="line",
                       palette=_palette(),
                       row="panel_density", col="panel_alpha", errorbar=("pi", 100), height=2.6, aspect=1.35,
                       facet_kws={"sharey": True})
    late = frame[frame["tokens"] >= 0.2 * frame["tokens"].max()]["val_loss"]
    if len(late):
        spread = late.max() - late.min()
        grid.set(ylim=(late.min() - 0.05 * spread, late.max() + 0.05 * spread))
    grid.set_titles("{row_name}, {col_name}")
    grid.set_axis_labels("tokens", "validation loss")
    grid.figure.suptitle(f"{config}: validation loss (band: min–max over seeds)", y=1.02)
    grid.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(grid.figure)
    return path


def plot_spike_profile(data: StudyData, events, config: str, path: Path) -> Path | None:
    """Excess training loss over the dense run of the same seed (same batches), minus its pre-update mean, from
    −k+1 to k steps around the updates that moved blocks; mean over updates and seeds (GaLore as a control;
    dense is 0 by construction). None when no update moved a block."""
    import pandas as pd

    plt, sns = pyplot()

    runs = data.runs.set_index("key")
    losses = {key: dict(zip(group["step"].astype(int), group["loss"])) for key, group in data.losses.groupby("key")}
    dense = {(run.config, run.seed): losses[key] for key, run in runs[runs["method"] == DENSE_METHOD].iterrows()}
    mine = events[(events["config"] == config) & (events["method"] != DENSE_METHOD)]
    densities = sorted(mine["density"].dropna().unique(), reverse=True)
    rows = []
    for event in mine.itertuples():
        reference = dense.get((config, event.seed))
        if reference is None:
            continue
        window = int(runs.loc[event.key, "window"])
        curve, step = losses[event.key], int(event.update_step)
        excess = {s: curve[s] - reference[s] for s in range(step - window + 1, step + window + 1)
                  if s in curve and s in reference}
        before = [excess[s] for s in range(step - window + 1, step + 1) if s in excess]
        if not before:
            continue
        for density in densities if missing(event.density) else [event.density]:
            rows += [{"method": event.method, "panel": f"d={density:g}",
                      "α": "-" if missing(event.alpha) else f"{event.alpha:g}", "offset": s - step,
                      "excess": value - np.mean(before)} for s, value in excess.items()]
    if not rows:
        return None
    frame = pd.DataFrame(rows)
    hue_order = [m for m in METHOD_ORDER if m in set(frame["method"])]
    grid = sns.relplot(data=frame, x="offset", y="excess", hue="method", hue_order=hue_order, style="α",
                       palette=_palette(), kind="line", col="panel", errorbar=None, height=3.0, aspect=1.5)
    for axis in grid.axes.flat:
        axis.axvline(0.5, color="grey", lw=0.8, ls=":")
        axis.axhline(0.0, color="grey", lw=0.8)
    grid.set_titles("{col_name}")
    grid.set_axis_labels("steps after the topology update", "loss − dense loss (pre-update mean removed)")
    grid.figure.suptitle(f"{config}: training loss minus dense around topology updates\n"
                         "(mean over the updates that moved blocks and over seeds)", y=1.08)
    grid.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(grid.figure)
    return Path(path)
