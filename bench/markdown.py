"""Markdown tables and cell formats shared by every report of the harness (benchmarks, memory scaling, stability
study, GPU check): one table format, GitHub markdown through ``tabulate``."""

from __future__ import annotations

import math

import pandas as pd


def table(frame: pd.DataFrame) -> str:
    """A GitHub markdown table; columns empty in every row are left out and named once below it."""
    from tabulate import tabulate

    empty = [c for c in frame.columns if len(frame) and frame[c].map(lambda v: pd.isna(v) or v == "").all()]
    kept = frame.drop(columns=empty).apply(lambda column: column.map(_one_line))
    text = tabulate(kept, headers="keys", tablefmt="github", showindex=False, disable_numparse=True)
    if empty:
        text += "\n\nEmpty in every row, so left out: " + ", ".join(f"`{c}`" for c in empty) + "."
    return text


def _one_line(value):
    """A text cell on one line, its ``|`` escaped: a newline (a compile error's message) ended the row, a ``|`` the
    cell."""
    return " ".join(value.splitlines()).replace("|", "\\|") if isinstance(value, str) else value


def fmt_bytes(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    value = float(value)
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} B"


def fmt_nvml_peak(value, status, fmt=fmt_bytes) -> str:
    """NVML's peak as ``fmt`` writes it ("" where there is none); one from a sampler that failed mid-run (status
    ``failed: ...``) is the peak up to the failure, a lower bound, and says so."""
    text = fmt(value)
    return text if not text or status == "ok" else f"≥ {text} ({status})"


def fmt_num(value, spec: str = ".3g") -> str:
    return "" if value is None or pd.isna(value) else format(value, spec)
