"""Cell formats and notes of the report's tables: timings with their spread and noise mark, the CPU note."""

from __future__ import annotations

import pandas as pd

from .derive import NOISY_SPREAD, noisy_flags, on_cpu

NOISY_MARK = "†"
CPU_BACKENDS = {  # what each backend column value means for rows measured on a CPU
    "triton": "the Triton CPU interpreter (`TRITON_INTERPRET=1`), which runs each kernel program in Python: "
    "these times measure the interpreter and are not representative of GPU speed",
    "reference": "the pure-PyTorch reference ops, not the Triton kernels",
    "torch": "PyTorch's own CPU ops",
}


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
