"""Running a suite's cases into a resumable results file, under a time budget, with the command log."""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path
from typing import NoReturn

COMMANDS_FILE = "commands.txt"


class CommandLog:
    """``record()`` appends ``<UTC time> smet-bench <args>`` to ``<out-dir>/commands.txt`` once per run (the report
    lists the commands that made its rows); called on the first measured row, so a rerun that measures nothing
    leaves no line."""

    def __init__(self, out_dir: Path, argv: list[str] | None):
        self.path = out_dir / COMMANDS_FILE
        self.argv = argv
        self.done = argv is None

    def record(self) -> None:
        if self.done:
            return
        import datetime as dt
        import shlex

        stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        with self.path.open("a") as handle:
            handle.write(f"{stamp} smet-bench {shlex.join(self.argv)}\n")
        self.done = True


def usage_error(message, prog: str = "smet-bench") -> NoReturn:
    """End the command on a bad option or input: one line ``<prog>: error: <message>`` on stderr and exit code 2,
    argparse's own (exit code 1 is left to a run whose cases failed)."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def make_out_dir(path, prog: str = "smet-bench") -> Path:
    """The folder ``path``, created with its parents; a folder that cannot be created (no permission, a read-only
    file system) ends the command with one line naming ``--out-dir`` (:func:`usage_error`), not a traceback."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        usage_error(f"--out-dir {str(path)!r} cannot be created: {error.strerror or error}", prog)
    return path


def check_minutes(minutes: float | None, option: str) -> None:
    """Raise ``ValueError`` naming ``option`` unless ``minutes`` is None (no limit) or positive: a NaN budget would
    silently never expire, a negative one start nothing."""
    if minutes is not None and not minutes > 0:
        raise ValueError(f"{option} must be positive, got {minutes:g}")


class Deadline:
    """``expired()`` once ``minutes`` have passed since construction (never when ``minutes`` is None)."""

    def __init__(self, minutes: float | None):
        self.end = None if minutes is None else time.monotonic() + 60.0 * minutes
        self.hit = False

    def expired(self) -> bool:
        if self.end is not None and time.monotonic() >= self.end:
            self.hit = True
        return self.hit

    def left_s(self) -> float:
        """Seconds until the deadline (infinite without one, never below 0)."""
        return float("inf") if self.end is None else max(0.0, self.end - time.monotonic())

    def share(self, fraction: float) -> "Deadline":
        """A deadline ``fraction`` of the time now left (no limit where this one has none)."""
        part = Deadline(None)
        if self.end is not None:
            part.end = time.monotonic() + fraction * self.left_s()
        return part


def progress(items, description: str, disable: bool):
    from tqdm import tqdm

    return tqdm(items, desc=description, unit="case", disable=disable, dynamic_ncols=True)


def run_cases(suite, cases, run_one, file, backend, device, no_progress, deadline, commands, after_row=None) -> int:
    """Run the cases not yet in ``file``, appending one row each (then calling ``after_row()``, if given); returns the
    number of failed cases."""
    from .results import environment, stack_note

    env = environment(device)
    unique = {}  # a value given twice (--densities 0.5,0.5) makes one case, not two rows of one key
    for case in cases:
        unique.setdefault(file.key_of(case.key_row(backend) | {"gpu": env["gpu"]}), case)
    cases = list(unique.values())
    rows = [case.key_row(backend) | {"gpu": env["gpu"]} for case in cases]
    todo = [case for case, row in zip(cases, rows) if not file.done(row)]
    kept = stack_note([file.stack(row) for row in rows if file.done(row)], (env["torch"], env["triton"]))
    print(f"{suite}: {len(cases)} cases, {len(cases) - len(todo)} already in {file.path}{kept}, {len(todo)} to run")
    failures = 0
    for case in progress(todo, suite, no_progress):
        if deadline.expired():
            break
        try:
            result = run_one(case)
        except Exception:  # a broken case must not stop a long run; it is reported and retried next time
            failures += 1
            print(f"\n{suite}: {case} failed:\n{traceback.format_exc()}", file=sys.stderr)
            continue
        commands.record()
        file.append(case.key_row(backend) | result | environment(device))
        if after_row is not None:
            after_row()
    return failures
