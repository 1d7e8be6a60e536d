"""Reading the benchmark results: the CSVs (old provider names and the old ``variant`` shape column mapped to
today's, columns added since filled with the value older rows had) and pytest-benchmark JSON files."""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from pathlib import Path

import pandas as pd

from ..results import (
    ADDED_COLUMNS,
    KERNEL_COLUMNS,
    KERNEL_KEY,
    RENAMED_COLUMNS,
    TRAINING_COLUMNS,
    TRAINING_KEY,
    RepeatedRowWarning,
    current_provider,
    read_complete,
    split_records,
    warn_merged_lines,
)


def load_csv(path: Path) -> pd.DataFrame | None:
    """The rows of the results file at ``path`` (None when there is none; ``ValueError`` naming the file when a
    ``kernels.csv`` or ``training.csv`` lacks a column of its schema that no older release lacked: the report and
    the memory grid's GPU rows stopped with a ``KeyError``). A half-written last row, and a row with another number
    of cells than the header (an older release appended a row to a half-written one, making one line of both), are
    left out with a :class:`~bench.results.TornRowWarning` naming the file: pandas would read the first
    with the numbers it has (a time cut to its first digits), and stop at the second or, as the first row, shift every
    column by taking its extra cells as an index."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    text, _ = read_complete(path)
    header, records, bad = split_records(text)
    if not header:  # only a half-written header
        return None
    schema = {"kernels.csv": KERNEL_COLUMNS, "training.csv": TRAINING_COLUMNS}.get(path.name, [])
    named = {RENAMED_COLUMNS.get(c, c) for c in header}
    if missing := [c for c in schema if c not in named and c not in ADDED_COLUMNS]:
        raise ValueError(f"{path} lacks the columns {missing} that smet-bench writes (edited, or not a smet-bench "
                         "results file): restore them or move the file out of the folder")
    if bad:
        warn_merged_lines(path, bad, len(header), "left out")
    buffer = io.StringIO(newline="")
    csv.writer(buffer).writerows([header] + records)
    buffer.seek(0)
    frame = pd.read_csv(buffer, keep_default_na=False, na_values=[""])  # only an empty cell is missing (a NaN):
    # pandas' default words ("NA", "None", "null", "n/a", ...) are text a note or a status may hold
    frame = frame.rename(columns=RENAMED_COLUMNS)
    for column in ("status", "note", "nvml_status", "peak_source", "shape"):
        if column in frame:
            frame[column] = frame[column].astype(object).fillna("")
    if set(TRAINING_KEY) - set(ADDED_COLUMNS) <= set(frame.columns):  # training.csv, also one older than the modes
        for column, old_value in ADDED_COLUMNS.items():
            values = frame[column] if column in frame else pd.Series(old_value, index=frame.index)
            values = values.astype(object).fillna(old_value)
            frame[column] = values.map(lambda v: str(v) == "True") if isinstance(old_value, bool) else values.astype(
                type(old_value)
            )
    if {"suite", "provider", "backend"} <= set(frame.columns):  # files written under the old provider names
        frame["provider"] = [
            current_provider(suite, provider, backend)
            for suite, provider, backend in zip(frame["suite"], frame["provider"], frame["backend"])
        ]
    key = {"kernels.csv": KERNEL_KEY, "training.csv": TRAINING_KEY}.get(path.name)
    if key and (repeated := frame.duplicated(key + ["gpu"], keep="last")).any():
        warnings.warn(f"{path}: {int(repeated.sum())} row(s) measure the same case on the same machine as a later "
                      "row (two runs wrote to the folder at once, or files were joined); only the later is reported",
                      RepeatedRowWarning, stacklevel=2)
        frame = frame[~repeated].reset_index(drop=True)
    return frame


def load_benchmark_json(paths, option: str | None = None) -> pd.DataFrame | None:
    """Rows (name, params, stats in ms, extra_info) of pytest-benchmark JSON files. Files found in a folder
    (``option`` None) that are not pytest-benchmark output are passed over; files named by ``option`` are refused
    (``ValueError`` naming it), as is any file that cannot be read or is not JSON."""
    rows = []
    name = option or "benchmark JSON"
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except OSError as error:
            raise ValueError(f"{name} {path} cannot be read: {error.strerror}") from None
        except ValueError as error:  # not JSON, or not text (UnicodeDecodeError)
            raise ValueError(f"{name} {path} is not JSON: {error}") from None
        if not isinstance(data, dict) or "benchmarks" not in data:
            if option:
                raise ValueError(f"{name} {path} is not pytest-benchmark output (no \"benchmarks\" list): write it "
                                 "with pytest bench --benchmark-json=FILE")
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
