"""Long-format result files: one CSV row per measurement, appended as measured, resumable.

``kernels.csv`` holds kernel and optimizer-step timings, ``training.csv`` end-to-end training steps.
A row's *key* (its configuration columns and the ``gpu`` that measured it) identifies the measurement: a
resumed run skips every key already in the file, so one folder may hold the rows of several machines. The key
holds no torch / Triton version: a resumed run names the versions of the rows it keeps where they are not its own
(:func:`stack_note`). Rows that could not be measured are written with ``status = "skipped"`` and the reason in
``note``, so they are recorded once and not retried on the same machine. Files written before a column was renamed
(:data:`RENAMED_COLUMNS`) or added (:data:`ADDED_COLUMNS`) are read and resumed under today's schema.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import math
import os
import platform
import re
import warnings
from pathlib import Path

import torch

from profiling.memory_model import COMPONENTS

ENVIRONMENT_COLUMNS = ["gpu", "device", "torch", "triton", "timestamp"]

KERNEL_KEY = ["suite", "op", "provider", "shape", "M", "K", "N", "block_size", "density", "dtype", "backend"]
KERNEL_COLUMNS = (
    KERNEL_KEY
    + [
        "nnz_blocks",
        "ms_p20",
        "ms_p50",
        "ms_p80",
        "useful_flops",
        "tflops",
        "bytes_moved",
        "gbps",
        "status",
        "note",
    ]
    + ENVIRONMENT_COLUMNS
)

#: column names of result files written before a column was renamed: old name -> name (``variant`` held the shape
#: label, which the kernel variants of the ops made ambiguous)
RENAMED_COLUMNS = {"variant": "shape"}

#: provider names of result files written before the providers were named after what they time:
#: ``(suite, old name, backend or None for any) -> name``
RENAMED_PROVIDERS = {
    ("kernels", "smet", "triton"): "triton_grouped",
    ("kernels", "smet", "reference"): "torch_reference",
    ("kernels", "smet_ungrouped", None): "triton_plain_order",
    ("kernels", "smet_persistent", None): "triton_persistent",
    ("kernels", "smet_tma", None): "triton_tma",
    ("optimizer", "smet", None): "smet_adamw",
}

TRAINING_KEY = [
    "config", "method", "density", "block_size", "batch_size", "seq_len", "dtype", "backend", "compiled",
    "activation_checkpointing", "vocab_size",
]  # fmt: skip

#: columns added to a schema after files were written without them: name -> the value every older row had (an old
#: file resumes with it and is rewritten with the full header before its first new row)
ADDED_COLUMNS = {"compiled": False, "activation_checkpointing": False, "vocab_size": 256, "warmup_s": float("nan")}
TRAINING_COLUMNS = (
    TRAINING_KEY
    + ["steps", "warmup_s", "ms_p20", "ms_p50", "ms_p80", "tokens_per_s", "peak_allocated_bytes", "nvml_peak_bytes",
       "nvml_status"]
    + [f"{c}_bytes" for c in COMPONENTS]
    + [f"pred_{c}_bytes" for c in COMPONENTS]
    + ["pred_peak_bytes", "peak_source", "status", "note"]
    + ENVIRONMENT_COLUMNS
)


def slugify(text: str) -> str:
    """Lower-case, runs of anything but letters and digits become one ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_name(device: torch.device | str) -> str:
    """The GPU's name (``NVIDIA H100 80GB HBM3``) or ``cpu-<machine>-<n>cores`` on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine() or 'unknown'}-{os.cpu_count() or 0}cores"


def device_slug(device: torch.device | str) -> str:
    """Folder name of a device's reports: ``reports/<slug>/``."""
    return slugify(device_name(device))


def environment(device: torch.device | str) -> dict:
    """The environment columns common to every row measured now on ``device``."""
    import triton

    return {
        "gpu": device_name(device),
        "device": str(torch.device(device)),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def current_provider(suite: str, provider: str, backend: str) -> str:
    """The provider's name today (:data:`RENAMED_PROVIDERS`); names that were not renamed pass through."""
    renamed = RENAMED_PROVIDERS.get((suite, provider, backend)) or RENAMED_PROVIDERS.get((suite, provider, None))
    return renamed or provider


def rename_old_providers(row: dict) -> dict:
    """``row`` with its ``provider`` renamed by :func:`current_provider` (rows without a provider unchanged)."""
    if "provider" not in row:
        return row
    return row | {"provider": current_provider(row.get("suite", ""), row["provider"], row.get("backend", ""))}


class ResultsWarning(UserWarning):
    """A results file holds rows that are left out (``smet-bench`` prints it as one line)."""


class TornRowWarning(ResultsWarning):
    """A results file holds a row cut short (a run stopped while writing it): the row is left out."""


class RepeatedRowWarning(ResultsWarning):
    """A results file measures one case on one machine twice: the earlier row is left out."""


def read_complete(path: Path) -> tuple[str, bool]:
    """``(text, torn)``: the CSV at ``path`` up to its last complete line, and whether text followed it. Each row is
    written with its line end, so text after the last one is a row that a stopped run left half-written; it is
    named in a :class:`TornRowWarning`. The cut may split a character of several bytes (a non-ASCII note): only the
    complete lines are decoded (a line end is never part of another character)."""
    data = path.read_bytes()
    kept = data[: data.rfind(b"\n") + 1]
    # the encoding ``open`` wrote it with; a character an older release cut and appended a row to is replaced (that
    # line has too many cells: left out)
    text = io.TextIOWrapper(io.BytesIO(kept), newline="", errors="replace").read()
    if kept == data:
        return text, False
    cut = data[len(kept):].decode(errors="replace")
    warnings.warn(f"{path}: its last line {cut[:60]!r} is cut short (a run stopped while writing it); "
                  "that row is left out", TornRowWarning, stacklevel=2)
    return text, True


def split_records(text: str) -> tuple[list[str], list[list[str]], list[int]]:
    """``(header, rows, bad)`` of the CSV ``text`` (:func:`read_complete`'s): the rows with the header's number of
    cells, and the numbers of the lines (1 the header's) where records of another number start, which are left out: an
    older release appended a row to a half-written one, making one line of both. Parsing goes on at the line after
    such a record's first: a quote the half-written row opened (a note with a comma) made the rest of the file one
    record, every later row lost with it (or a ``csv.Error`` past csv's field size limit). Pieces of rows can still
    make a record of the header's cells: a row cut inside its first cell and the row after it; a quote left open and
    closed by a later row's quoted cell in the same column; a line after the merged one's first that starts inside
    a cell (a note with a line break): nothing tells those apart."""
    lines = list(io.StringIO(text, newline=""))  # the lines csv reads: split at \r\n, \n and \r
    header, rows, bad, start = None, [], [], 0
    while start < len(lines):
        reader, consumed = csv.reader(lines[start:]), 0
        while True:  # a record per turn
            first = start + consumed  # the index of the record's first line
            try:
                cells = next(reader)
            except StopIteration:
                return header or [], rows, bad
            except csv.Error:  # a field past csv's size limit: a quote left open
                cells = None
            consumed = reader.line_num
            if header is None and cells is not None:
                header = cells or None  # blank lines before it are passed over
            elif cells is None or (cells and len(cells) != len(header)):
                bad.append(first + 1)
                start = first + 1
                break
            elif cells:
                rows.append(cells)
    return header or [], rows, bad


def warn_merged_lines(path: Path, lines: list[int], cells: int, outcome: str) -> None:
    """The :class:`TornRowWarning` for the ``lines`` of :func:`split_records` whose records are not ``cells`` wide,
    saying what becomes of them (``outcome``), at the caller's caller."""
    warnings.warn(f"{path}: line(s) {', '.join(map(str, lines[:10]))} do not have the header's {cells} cells (a row "
                  f"appended to a half-written one); {outcome}", TornRowWarning, stacklevel=3)


def canonical(value) -> str:
    """Key values compare as text: numbers in one spelling (``0.5`` == ``0.50``, ``64`` == ``64.0``), a float as the
    file holds it (:func:`_cell`: 6 significant digits); whole numbers in all their digits (``10000001`` is not
    ``10000000``, which 6 digits made them both)."""
    text = _cell(value)  # bools as True / False, the spelling the CSV holds
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() and abs(number) < 2**53 else f"{number:.6g}"


class ResultsFile:
    """A CSV of ``columns`` keyed by ``key`` columns; rows are appended and flushed one at a time."""

    def __init__(self, path: str | os.PathLike, columns: list[str], key: list[str]):
        missing = [k for k in key if k not in columns]
        if missing:
            raise ValueError(f"key columns {missing} are not in columns")
        self.path = Path(path)
        self.columns = list(columns)
        self.key = list(key)
        self._done: dict[tuple[str, ...], tuple[str, str]] = {}  # key -> the (torch, triton) that measured it
        self._status: dict[tuple[str, ...], str] = {}  # key -> the row's status
        self._missing: dict = {}  # added columns the file on disk lacks, with the value its rows had
        self._torn = False  # the file holds a half-written row (at its end, or merged into the next one): rewritten
        if self.path.exists() and self.path.stat().st_size > 0:
            text, self._torn = read_complete(self.path)
            if text:
                fieldnames, records, merged = split_records(text)
                header = [RENAMED_COLUMNS.get(c, c) for c in fieldnames]  # old files keep their header
                self._missing = {c: v for c, v in ADDED_COLUMNS.items() if c in self.columns and c not in header}
                expected = [c for c in self.columns if c not in self._missing]
                if header != expected:
                    missing, extra = [c for c in expected if c not in header], [c for c in header if c not in expected]
                    differs = (f"lacks {missing}" if missing else "") + (" and " if missing and extra else "") + (
                        f"has columns {extra} this release does not write" if extra else "")  # fmt: skip
                    raise ValueError(
                        f"{self.path} {differs or 'has its columns in another order'} (another release wrote it); "
                        "write to a fresh --out-dir or delete the file"
                    )
                for cells in records:  # rows measured under an old provider name count as done under the new one
                    row = self._missing | dict(zip(header, cells))
                    key = self.key_of(rename_old_providers(row))
                    self._done[key], self._status[key] = _stack(row), row.get("status", "")
                if merged:  # not done (their key cells may be whole): measured again, as the report leaves them out
                    warn_merged_lines(self.path, merged, len(header), "measured again")
                    self._torn = True  # the next append rewrites the file without them

    def key_of(self, row: dict) -> tuple[str, ...]:
        return tuple(canonical(row.get(k)) for k in self.key)

    def done(self, row: dict) -> bool:
        """True when a row with the same key is already in the file."""
        return self.key_of(row) in self._done

    def stack(self, row: dict) -> tuple[str, str] | None:
        """``(torch, triton)`` versions of the row with ``row``'s key in the file (None when it is not done)."""
        return self._done.get(self.key_of(row))

    def status(self, row: dict) -> str | None:
        """The ``status`` of the row with ``row``'s key in the file (None when it is not done)."""
        return self._status.get(self.key_of(row))

    def __len__(self) -> int:
        return len(self._done)

    def append(self, row: dict) -> None:
        unknown = sorted(set(row) - set(self.columns))
        if unknown:
            raise ValueError(f"row has columns not in the schema: {unknown}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._missing or self._torn:
            self._rewrite()
        write_header = not self.path.exists() or self.path.stat().st_size == 0
        with self.path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns)
            if write_header:
                writer.writeheader()
            writer.writerow({c: _cell(row.get(c)) for c in self.columns})
        key = self.key_of(row)
        self._done[key], self._status[key] = _stack(row), _cell(row.get("status"))

    def _rewrite(self) -> None:
        """Rewrite the file under the full header, its rows given the added columns' old values and half-written
        rows left out (atomically: a temporary file replaces it)."""
        with warnings.catch_warnings():  # warned about when the file was opened
            warnings.simplefilter("ignore", TornRowWarning)
            text, _ = read_complete(self.path)
        header, records, _ = split_records(text)
        rows = [dict(zip([RENAMED_COLUMNS.get(c, c) for c in header], cells)) for cells in records]
        temporary = self.path.with_name(self.path.name + ".tmp")
        with temporary.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows({c: row.get(c, _cell(self._missing.get(c))) for c in self.columns} for row in rows)
        os.replace(temporary, self.path)
        self._missing, self._torn = {}, False


def _stack(row: dict) -> tuple[str, str]:
    return str(row.get("torch") or ""), str(row.get("triton") or "")


def stack_note(stacks, current: tuple[str, str]) -> str:
    """What a resumed run says of the ``stacks`` (``(torch, triton)``) of the rows it keeps: empty when they are all
    ``current``, else which versions measured them (the report would set them beside this run's)."""
    other = sorted({s for s in stacks if s != current})
    if not other:
        return ""
    named = ", ".join(f"torch {t or '?'} / Triton {tr or '?'}" for t, tr in other)
    return (f" (measured with {named}, not this run's torch {current[0]} / Triton {current[1]}; a fresh --out-dir "
            "measures every case with this run's versions)")


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def kernels_file(out_dir: str | os.PathLike) -> ResultsFile:
    return ResultsFile(Path(out_dir) / "kernels.csv", KERNEL_COLUMNS, KERNEL_KEY + ["gpu"])


def training_file(out_dir: str | os.PathLike) -> ResultsFile:
    return ResultsFile(Path(out_dir) / "training.csv", TRAINING_COLUMNS, TRAINING_KEY + ["gpu"])


def check_results_files(out_dir: str | os.PathLike, kernels: bool = True, training: bool = True) -> None:
    """Raise ``ValueError`` (naming the file and the remedy) when ``out_dir`` holds a ``kernels.csv`` or
    ``training.csv`` of other columns (an older or newer release): a run would otherwise find out only when it first
    opens that file, after spending its budget on the stages before. A torn row is left to the stage that opens the
    file to warn about (once)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TornRowWarning)
        if kernels:
            kernels_file(out_dir)
        if training:
            training_file(out_dir)
