"""The results of the gpu-check stages that write no CSV (``correctness``, ``compile``), kept in
``DIR/gpu_check_results.json`` so that a later run into ``DIR`` that does not run them (``--stages kernels``: a
second run on the worst bar) still shows them in ``gpu_check.md``, named as an earlier run's.

One entry per stage: ``{"device", "command", "written", "value"}``; only the entries of this machine's device are
read back. The file is replaced atomically, so a run stopped while writing it leaves the previous one whole.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

FILE = "gpu_check_results.json"


def _read(out_dir: Path) -> dict:
    path = out_dir / FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as error:  # not written by this module: say so, keep the run going
        print(f"gpu-check: {path} is unreadable ({error}); its earlier results are not shown", flush=True)
        return {}
    return data if isinstance(data, dict) else {}


def save(out_dir: Path, stage: str, value, device: str, command: str) -> None:
    """Keep ``value`` (JSON: rows, a dict) as ``stage``'s result of this run."""
    data = _read(out_dir)
    written = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    data[stage] = {"device": device, "command": command, "written": written, "value": value}
    temporary = out_dir / (FILE + ".tmp")
    temporary.write_text(json.dumps(data, indent=1, default=str))
    os.replace(temporary, out_dir / FILE)


def load(out_dir: Path, device: str) -> dict[str, dict]:
    """``stage -> entry`` of the results kept in ``out_dir`` for ``device``."""
    return {stage: entry for stage, entry in _read(out_dir).items()
            if isinstance(entry, dict) and entry.get("device") == device and "value" in entry}  # fmt: skip


def origin(entry: dict) -> str:
    """How ``gpu_check.md`` names an earlier run's result."""
    return f"from an earlier run into this folder (`{entry.get('command', '?')}`, {entry.get('written', '?')})"
