"""The kernel predictions of ``bench/KERNEL_NOTES.md``, written before the first GPU run, and the section of
``gpu_check.md`` that sets each beside its measured value: within the predicted range, better or worse.

A prediction is a range of one ratio over a set of points (op × density, at the first block size of the run, every
timed shape): ``vs d×dense`` (``t / (d · t_dense)``, d the layout's exact density), ``vs grouped`` (``t /
t_grouped`` on the same point) or, for the compact AdamW step, the fraction of the copy ceiling (higher is better).
The measured value is the geometric mean over the points (the mean for the AdamW fraction). A value outside its range
is a miss of the model, to be explained in KERNEL_NOTES — not a bar (the bars are in the sections above).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from bench.markdown import table
from bench.report import kernel_comparison

FORWARD_OPS = ("forward", "grad_input")


@dataclass(frozen=True)
class Prediction:
    entry: str  # the KERNEL_NOTES entry that makes it
    provider: str
    ops: tuple[str, ...]
    densities: tuple[float, ...]
    against: str  # "d×dense", "grouped" or "copy"
    low: float
    high: float

    @property
    def higher_is_better(self) -> bool:
        return self.against == "copy"


PREDICTIONS = (
    Prediction("v2 grouped order", "triton_grouped", FORWARD_OPS, (0.5, 0.25), "d×dense", 1.1, 1.3),
    Prediction("v1 (v2: no change at d = 0.1)", "triton_grouped", FORWARD_OPS, (0.1,), "d×dense", 1.8, 2.5),
    Prediction("v1 weight grad", "triton_grouped", ("grad_weight",), (0.5, 0.25), "d×dense", 1.1, 1.4),
    Prediction("v2 on the H200 (v1 order)", "triton_plain_order", FORWARD_OPS, (0.5, 0.25), "grouped", 1.2, 1.4),
    Prediction("v2 (no change at d = 0.1)", "triton_plain_order", FORWARD_OPS, (0.1,), "grouped", 0.95, 1.05),
    Prediction("v3 persistent", "triton_persistent", FORWARD_OPS, (0.5, 0.25), "grouped", 0.95, 1.05),
    Prediction("v3 persistent", "triton_persistent", FORWARD_OPS, (0.1,), "grouped", 0.90, 1.0),
    Prediction("v4 TMA", "triton_tma", FORWARD_OPS, (0.5, 0.25), "grouped", 0.90, 1.0),
    Prediction("v4 TMA", "triton_tma", FORWARD_OPS, (0.1,), "grouped", 0.80, 0.90),
    Prediction("AdamW v3", "smet_adamw", ("adamw",), (0.25,), "copy", 0.88, 0.98),
)


def _kernel_values(comparison: pd.DataFrame, prediction: Prediction, block_size: int) -> np.ndarray:
    comparison = comparison[(comparison["status"] == "ok") & (comparison["block_size"] == block_size)
                            & comparison["op"].isin(prediction.ops)
                            & comparison["density"].round(6).isin(prediction.densities)]  # fmt: skip
    mine = comparison[comparison["provider"] == prediction.provider]
    if prediction.against == "d×dense":
        return mine["vs_d_dense"].to_numpy(dtype=float)
    point = ["shape", "op", "density", "M", "dtype"]
    grouped = comparison[comparison["provider"] == "triton_grouped"][point + ["ms_p50"]]
    paired = mine[point + ["ms_p50"]].merge(grouped, on=point, suffixes=("", "_grouped"))
    return (paired["ms_p50"] / paired["ms_p50_grouped"]).to_numpy(dtype=float)


def _copy_fraction(kernels: pd.DataFrame, prediction: Prediction) -> np.ndarray:
    optimizer = kernels[(kernels["suite"] == "optimizer") & kernels["gbps"].notna()]
    ceiling = optimizer[optimizer["shape"] == "dense:ceiling"]["gbps"]
    mine = optimizer[(optimizer["provider"] == prediction.provider)
                     & optimizer["density"].round(6).isin(prediction.densities)]["gbps"]  # fmt: skip
    return (mine / ceiling.max()).to_numpy(dtype=float) if len(ceiling) else np.array([])


def measured(kernels: pd.DataFrame, comparison: pd.DataFrame, prediction: Prediction,
             block_size: int) -> tuple[float, int]:  # fmt: skip
    """(the measured value of ``prediction``, the number of points behind it); NaN where none was measured. A NaN
    point (a broken row) makes the value NaN: never dropped. ``comparison``: :func:`bench.report.kernel_comparison`
    of ``kernels``."""
    if prediction.against == "copy":
        values = _copy_fraction(kernels, prediction)
        return (float(values.mean()) if len(values) else float("nan")), len(values)
    values = _kernel_values(comparison, prediction, block_size)
    if not len(values):
        return float("nan"), 0
    return float(np.exp(np.log(values).mean())), len(values)


def verdict(prediction: Prediction, value: float) -> str:
    if np.isnan(value):
        return "not measured"
    if prediction.low <= value <= prediction.high:
        return "within"
    better = value > prediction.high if prediction.higher_is_better else value < prediction.low
    return "better than predicted" if better else "worse than predicted"


def prediction_section(kernels: pd.DataFrame | None, block_size: int) -> list[str]:
    """The predictions table of ``gpu_check.md`` (``block_size``: the first block size of the run, b = 128 on a
    GPU)."""
    lines = ["## Predicted (bench/KERNEL_NOTES.md) vs measured", ""]
    rows = []
    comparison = kernel_comparison(kernels) if kernels is not None else None
    for prediction in PREDICTIONS:
        value, points = (float("nan"), 0) if kernels is None else measured(kernels, comparison, prediction, block_size)
        densities = ", ".join(f"{d:g}" for d in prediction.densities)
        rows.append({
            "KERNEL_NOTES": prediction.entry, "provider": prediction.provider, "ops": ", ".join(prediction.ops),
            "d": densities, "ratio": "of copy" if prediction.against == "copy" else f"vs {prediction.against}",
            "predicted": f"{prediction.low:g}–{prediction.high:g}",
            "measured": "" if np.isnan(value) else f"{value:.3g}", "points": points,
            "verdict": verdict(prediction, value),
        })  # fmt: skip
    lines += [f"At b = {block_size}: geometric mean over the timed shapes and the listed ops and densities (AdamW: "
              "GB/s over the copy ceiling). Outside its range, a prediction is a miss of the model: KERNEL_NOTES "
              "explains it.", "", table(pd.DataFrame(rows)), ""]  # fmt: skip
    return lines
