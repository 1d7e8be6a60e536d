"""Derived columns of the report: kernel ratios to the dense baseline and the roofline, timing noise, measured
peaks and memory-model errors (formulas in :mod:`bench.report`)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from profiling.memory_model import COMPONENTS

from ..results import TRAINING_KEY

NOISY_SPREAD = 1.5  # p80 / p20 above which a timing is flagged as noise
DENSE_MATCH = ["op", "M", "K", "N", "dtype", "gpu"]
ELEMENT_SIZE = {"bf16": 2, "fp16": 2, "fp32": 4}


def kernel_comparison(kernels: pd.DataFrame) -> pd.DataFrame:
    """Sparse-provider rows of the kernel suite with ``dense_ms``, ``exact_density``, ``vs_dense``, ``vs_d_dense``,
    ``noisy`` and ``dense_noisy``; ``t_dense`` is the ``cublas_dense`` row of the same op, shape, dtype and GPU (a
    folder may hold several machines' rows)."""
    measured = kernels[(kernels["suite"] == "kernels") & kernels["ms_p50"].notna()]
    # a dense time of 0 (a timer's rounding) is no baseline: its ratios would read inf
    dense = measured[(measured["provider"] == "cublas_dense") & (measured["status"] == "ok") & (measured["ms_p50"] > 0)]
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


def copy_bandwidth_gbps(kernels: pd.DataFrame) -> dict:
    """Per GPU, the best ``dst.copy_(src)`` bandwidth of the optimizer suite (fp32: 8 bytes per element)."""
    copies = kernels[(kernels["suite"] == "optimizer") & (kernels["op"] == "copy") & (kernels["ms_p50"] > 0)]
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


def geomean(values: pd.Series) -> float:
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


MODES = ("compiled", "activation_checkpointing")  # the training modes, boolean key columns of training.csv


def mode_label(row) -> str:
    """``eager`` or ``compiled``, with ``+ ckpt`` where the step checkpoints its decoder layers."""
    return ("compiled" if row["compiled"] else "eager") + (" + ckpt" if row["activation_checkpointing"] else "")


def plainest_mode(training: pd.DataFrame) -> pd.DataFrame:
    """The rows of the plainest mode present (eager without checkpointing where measured): one row per case for
    the plots."""
    rank = training["compiled"].astype(int) * 2 + training["activation_checkpointing"].astype(int)
    return training[rank == rank.min()]


def side_by_side(training: pd.DataFrame, mode: str, columns: list[str]) -> pd.DataFrame:
    """The cases measured both without and with ``mode`` (one of :data:`MODES`), joined on the rest of their key
    and machine: ``<column>_off`` and ``<column>_on`` for each of ``columns``."""
    key = [c for c in TRAINING_KEY if c != mode] + ["gpu"]
    off, on = training[~training[mode]], training[training[mode]]
    return off[key + columns].merge(on[key + columns], on=key, suffixes=("_off", "_on"))


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
                    "gpu": row["gpu"],
                    "config": row["config"],
                    "method": method_label(row) + (" + ckpt" if row["activation_checkpointing"] else ""),
                    "component": component,
                    "measured": measured,
                    "predicted": predicted,
                    "error": (predicted - measured) / measured,
                }
            )
    return pd.DataFrame(rows)
