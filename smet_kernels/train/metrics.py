"""The trainer's records: ``metrics.jsonl`` (one JSON object a line; see :mod:`smet_kernels.train.loop` for the
record types), ``summary.json`` (both strict JSON: a non-finite number is written as ``null``), perplexity and the
peak-memory measurement."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import warnings
from pathlib import Path

import torch

from .config import ConfigError


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    """``(bytes, kind)``: CUDA max allocated, or the process peak RSS (``ru_maxrss``) on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "cpu_peak_rss"


def perplexity(loss: float) -> float:
    """``exp(loss)``, capped below float overflow (``exp`` overflows past ~709)."""
    return math.exp(min(loss, 700.0))


def finite_or_none(value):
    """``value`` (a JSON-like tree) with every non-finite float replaced by ``None``: strict JSON has no NaN/Inf."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def strict_json(value, **options) -> str:
    """``json.dumps`` of ``value`` with non-finite floats as ``null`` (``allow_nan=False`` guards the rest)."""
    return json.dumps(finite_or_none(value), allow_nan=False, **options)


class MetricsWarning(UserWarning):
    """On resume, the last line of ``metrics.jsonl`` was left out: a run stopped while writing it cut it short."""


class MetricsLog:
    """``out_dir/metrics.jsonl``, flushed after every record. On a resume (``resumed_step`` not None) the records
    past the checkpoint (an interrupted run's tail) and the end-of-run measurements of unfinished spike windows are
    dropped: the resumed run measures those updates again, with their full window. The kept records replace the file
    atomically (a run stopped meanwhile leaves it whole), a last line cut short is left out (:class:`MetricsWarning`).
    A ``summary.json`` already in ``out_dir`` (an earlier run's, or the one this run resumes) is removed: it is
    written again when this run finishes, and until then it would describe another run as this folder's result."""

    def __init__(self, out_dir: Path, resumed_step: int | None = None):
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "summary.json").unlink(missing_ok=True)
        path = self.path = out_dir / "metrics.jsonl"
        if resumed_step is not None and path.exists():
            records = read_records(path)
            kept = [strict_json(r) for r in records if r["step"] <= resumed_step and r.get("complete", True)]
            temporary = path.with_name(path.name + ".tmp")
            temporary.write_text("".join(line + "\n" for line in kept))
            os.replace(temporary, path)
            self.file = path.open("a")
        else:
            self.file = path.open("w")

    def log(self, record: dict) -> None:
        self.file.write(strict_json(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_records(path: Path) -> list[dict]:
    """The records of ``metrics.jsonl``; its last line is left out (warned) when a stopped run cut it short, another
    line that is not JSON, or a line that is not a record (an object with an integer ``step``), is a
    :class:`ConfigError`."""
    lines = [(number, line) for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if line]
    records = []
    for index, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            if index == len(lines) - 1:
                warnings.warn(f"{path}: its last line {line[:60]!r} is cut short (a run stopped while writing it); "
                              "left out", MetricsWarning, stacklevel=3)
                break
            raise ConfigError(f"{path}: line {number} {line[:60]!r} is not JSON (the file is corrupt): repair or "
                              "remove that line") from None
        step = record.get("step") if isinstance(record, dict) else None
        if not (isinstance(step, int) and not isinstance(step, bool)):  # JSON true is a Python int too
            raise ConfigError(f"{path}: line {number} {line[:60]!r} is not a metrics record (an object with an "
                              "integer step; the file is corrupt): repair or remove that line")
        records.append(record)
    return records


def write_summary(out_dir: Path, summary: dict) -> None:
    """Write ``out_dir/summary.json`` atomically: its presence marks a finished run (the stability sweep skips the
    folder and reads it), so a run stopped while writing it must not leave half of one."""
    temporary = out_dir / "summary.json.tmp"
    temporary.write_text(strict_json(summary, indent=1))
    os.replace(temporary, out_dir / "summary.json")
