"""Running the sweep: train every unfinished run of a :class:`~bench.stability.spec.StudySpec` (resumable; each run
in a fresh process), refuse finished runs trained with other settings, compress metrics."""

from __future__ import annotations

import gzip
import json
import multiprocessing
import shutil
import time
import traceback
from pathlib import Path

from .spec import StudySpec, RunSpec, enumerate_runs

GZIP_ABOVE_BYTES = 16 * 1024
# Fields of the saved TrainConfig that may differ between a finished run and a new request without changing it.
_NON_DEFINING_FIELDS = ("out_dir", "progress", "resume", "checkpoint_every", "device", "backend")
# Fields newer than a finished run's summary, at the value its release trained with (the controller's defaults).
OLDER_RELEASES = {"min_prune_fraction": 0.005, "update_end_step": None, "regrow_init": "zeros",
                   "regrow_init_std": 0.02}


def is_done(run_dir: Path) -> bool:
    """A run is finished once the trainer wrote ``summary.json`` (its last action)."""
    return (Path(run_dir) / "summary.json").is_file()


def _defining(config: dict) -> dict:
    values = {k: v for k, v in config.items() if k not in _NON_DEFINING_FIELDS}
    values["betas"] = list(values.get("betas", ()))
    return values


def check_finished_run(run: RunSpec, spec: StudySpec, out_dir: Path) -> None:
    """Raise ValueError when the finished run in ``run``'s folder was trained with other settings."""
    path = run.directory(out_dir) / "summary.json"
    try:
        saved = json.loads(path.read_text())["config"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a trainer's summary ({error!r}); delete that run folder to train the run "
                         "again") from None
    _refuse_other_settings(run, spec, out_dir, saved, f"finished run {run.directory(out_dir)}")


def _refuse_other_settings(run: RunSpec, spec: StudySpec, out_dir: Path, saved: dict, what: str) -> None:
    """Raise ValueError when ``saved`` (the TrainConfig of ``what``) differs from ``run``'s in a defining setting."""
    from smet_kernels.train.config import setting

    saved = _defining(OLDER_RELEASES | saved)
    wanted = _defining(run.train_config(spec, out_dir).to_dict())
    differing = sorted(k for k in wanted if saved.get(k) != wanted[k])
    if differing:
        details = ", ".join(f"{setting(k)}: saved {saved.get(k)!r} != requested {wanted[k]!r}" for k in differing)
        raise ValueError(f"{what} was trained with other settings ({details}); use another --out-dir or delete that "
                         "folder")


def compress_metrics(run_dir: Path, above_bytes: int = GZIP_ABOVE_BYTES) -> None:
    """Gzip ``metrics.jsonl`` into ``metrics.jsonl.gz`` when it is larger than ``above_bytes``."""
    path = Path(run_dir) / "metrics.jsonl"
    if path.is_file() and path.stat().st_size > above_bytes:
        with path.open("rb") as source, gzip.open(path.with_suffix(".jsonl.gz"), "wb", compresslevel=9) as target:
            shutil.copyfileobj(source, target)
        path.unlink()


def _train_in_this_process(config_dict: dict) -> None:
    from smet_kernels.train.trainer import TrainConfig, train

    train(TrainConfig.from_dict(config_dict))


def _train_in_fresh_process(config_dict: dict) -> None:
    """Run one training in a spawned process (own peak RSS / CUDA allocator statistics, no state leaks)."""
    process = multiprocessing.get_context("spawn").Process(target=_train_in_this_process, args=(config_dict,))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"training process exited with code {process.exitcode}")


def _latest_checkpoint(run_dir: Path) -> str | None:
    """The newest complete checkpoint of an interrupted run (verified against its manifest; a corrupt newer one is
    named in a warning), or None (the run then starts from scratch)."""
    from smet_kernels.train.trainer import ConfigError, find_checkpoint

    try:
        return str(find_checkpoint(run_dir))
    except ConfigError:
        return None


def check_runnable(spec: StudySpec, out_dir) -> None:
    """Raise ValueError (one line, naming the setting) for what every run of ``spec`` would reject: the trainer's
    :meth:`TrainConfig.validate`, a device or backend that is not available, unreadable or too short data, and a
    finished run in ``out_dir``, or the checkpoint an interrupted one would resume from (a resume keeps only the
    trainer's fixed settings, so the run would mix two), trained with other settings (before a command is recorded in
    the folder)."""
    from smet_kernels import backend as backend_module
    from smet_kernels.train.config import check_output_folder, setting
    from smet_kernels.train.build import prepare_data

    spec.validate()
    check_output_folder(out_dir, "--out-dir")
    configs = [run.train_config(spec, out_dir) for run in enumerate_runs(spec)]
    for config in configs:
        config.validate()
    for run in enumerate_runs(spec):
        if is_done(run.directory(out_dir)):
            check_finished_run(run, spec, out_dir)
        elif (checkpoint := _latest_checkpoint(run.directory(out_dir))) is not None:  # resumed with its settings
            saved = json.loads((Path(checkpoint) / "config.json").read_text())
            _refuse_other_settings(run, spec, out_dir, saved,
                                   f"interrupted run {run.directory(out_dir)} (checkpoint {Path(checkpoint).name})")
    device = backend_module.resolve_device(spec.device, setting("device"))
    prepare_data(configs[0], device)  # the runs differ in model, method, density and seed, not in data or backend


def run_sweep(spec: StudySpec, out_dir, isolate: bool = True, max_minutes: float | None = None,
              keep_checkpoints: bool = False, log=print) -> dict:
    """Train every run of ``spec`` that is not finished yet into ``out_dir``; returns counts
    ``{"total", "skipped", "trained", "failed", "not_started"}``. Failed runs are reported and retried next time;
    an interrupted run resumes from its latest checkpoint when it has one (``spec.checkpoint_every``)."""
    out_dir = Path(out_dir)
    check_runnable(spec, out_dir)  # a bad setting fails here, not once per run hours later
    runs = enumerate_runs(spec)
    todo = []
    for run in runs:
        if is_done(run.directory(out_dir)):
            compress_metrics(run.directory(out_dir))
        else:
            todo.append(run)
    counts = {"total": len(runs), "skipped": len(runs) - len(todo), "trained": 0, "failed": 0, "not_started": 0}
    log(f"stability: {len(runs)} runs, {counts['skipped']} finished already, {len(todo)} to train, "
        f"{spec.tokens_per_run:,} tokens each, out-dir {out_dir}")
    deadline = None if max_minutes is None else time.monotonic() + 60.0 * max_minutes
    train_one = _train_in_fresh_process if isolate else _train_in_this_process
    for index, run in enumerate(todo):
        if deadline is not None and time.monotonic() >= deadline:
            counts["not_started"] = len(todo) - index
            log(f"stability: --max-minutes reached, {counts['not_started']} runs not started; rerun to resume")
            break
        run_dir = run.directory(out_dir)
        config = run.train_config(spec, out_dir)
        config.resume = _latest_checkpoint(run_dir)
        started = time.monotonic()
        try:
            train_one(config.to_dict())
        except Exception:  # one broken run must not stop a sweep of hours; it is retried on the next invocation
            counts["failed"] += 1
            log(f"stability: {run.config}/{run.name} failed:\n{traceback.format_exc()}")
            continue
        if not is_done(run_dir):
            counts["failed"] += 1
            log(f"stability: {run.config}/{run.name} ended without summary.json")
            continue
        compress_metrics(run_dir)
        if not keep_checkpoints:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        summary = json.loads((run_dir / "summary.json").read_text())
        counts["trained"] += 1
        log(f"stability: [{counts['skipped'] + index + 1}/{len(runs)}] {run.config}/{run.name}: "
            f"{time.monotonic() - started:.0f}s, final val loss {summary['final_val_loss']:.4f}")
    return counts
