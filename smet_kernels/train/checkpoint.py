"""Checkpoint I/O of the trainer: ``checkpoints/step_XXXXXXX/`` folders holding ``state.pt`` (model, optimizer,
controller, data position, RNG states, progress), ``config.json`` and ``manifest.json`` (size and sha256 of every
other file), written to a temporary folder and renamed (atomic: a crash leaves the previous checkpoints as they
were), found again and read back for ``--resume``.

Under ``--parallel fsdp`` (``checkpoint_format="sharded"``, the default there) the model parameters and optimizer
state tensors are not gathered: every rank writes its shards with ``torch.distributed.checkpoint`` (DCP) into
``sharded/``, and ``state.pt`` (rank 0) holds the rest (``"format": "sharded"``). DCP reshards on load, so such a
checkpoint resumes on any number of ranks, one process included; a full (single-process format) checkpoint resumes
under fsdp too, each rank keeping its shard.

:func:`find_checkpoint` verifies a checkpoint against its manifest before using it; in a run folder an unreadable or
corrupt newest checkpoint is named in a :class:`CheckpointWarning` and the newest good one is used instead. A run
stopped while writing one leaves ``.tmp-step_*``/``.old-step_*`` folders, which resumes never read and the next run
removes when it starts (:func:`clear_leftovers`), after putting back a checkpoint that only they hold;
:func:`find_checkpoint` puts it back too, unless its writer (the PID in the name) is still alive: a live run may be
between its renames.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shutil
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..optim.galore import GALORE_DEFAULT_RANK
from ..sharding import is_sharded, shard_like
from .config import FIXED_ON_RESUME, ConfigError, TrainConfig, setting
from .distributed import DistInfo, TrainingFailed, on_rank0
from .methods import METHODS
from .tokenizer import TokenizerError, parse_tokenizer

SHARDED_DIR = "sharded"
CHECKPOINTS_DIR = "checkpoints"  # of a run folder: CHECKPOINTS_DIR/step_XXXXXXX


MANIFEST = "manifest.json"


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped because it is unreadable or fails verification against its manifest."""


#: sha256 of the files hashed in this process, keyed by path and (inode, size, mtime): a resume verifies its
#: checkpoint when the CLI reads its config and again when the run loads it, and hashes it once
_DIGESTS: dict[tuple, str] = {}


def _sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def verify_checkpoint(checkpoint: Path) -> str | None:
    """``None`` when every file listed in ``checkpoint/manifest.json`` is there with its size and sha256, else a
    short description of the first problem. A checkpoint of an earlier release (no manifest, always one
    ``state.pt`` and ``config.json``) is checked by the CRC of every member of ``state.pt`` (a zip archive) and
    by parsing ``config.json``; sharded checkpoints always had a manifest, so one without is unusable."""
    if not (checkpoint / MANIFEST).exists() and (checkpoint / "state.pt").is_file() \
            and not (checkpoint / SHARDED_DIR).exists():
        return _verify_without_manifest(checkpoint)
    try:
        files = json.loads((checkpoint / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{MANIFEST} missing or unreadable ({type(error).__name__})"
    if not isinstance(files, dict) or not all(isinstance(entry, dict) and isinstance(entry.get("bytes"), int)
                                              and isinstance(entry.get("sha256"), str) for entry in files.values()):
        return f"{MANIFEST} is malformed (each file needs its bytes and sha256)"
    if "config.json" not in files:
        return f"{MANIFEST} lists no config.json"
    for name, expected in files.items():
        path = checkpoint / name
        try:  # a file can go between the checks (under DDP, rank 0 sets an old checkpoint aside while others read)
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != expected["bytes"]:
                return f"{name} has {path.stat().st_size} bytes, the manifest says {expected['bytes']}"
            if _sha256(path) != expected["sha256"]:
                return f"the sha256 of {name} does not match the manifest"
        except OSError as error:
            return f"{name} unreadable ({type(error).__name__})"
    return None


def _verify_without_manifest(checkpoint: Path) -> str | None:
    try:
        json.loads((checkpoint / "config.json").read_text())
    except (OSError, ValueError) as error:
        return f"{MANIFEST} missing and config.json unreadable ({type(error).__name__})"
    try:
        with zipfile.ZipFile(checkpoint / "state.pt") as archive:
            broken = archive.testzip()
    except (OSError, zipfile.BadZipFile) as error:
        return f"{MANIFEST} missing and state.pt unreadable ({type(error).__name__})"
    return None if broken is None else f"{MANIFEST} missing and {broken} in state.pt fails its CRC"


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The verified checkpoint folder for ``path``: a ``step_*`` folder itself, or the newest good one in
    ``path/checkpoints`` (``path`` itself when it is that folder: :func:`run_folder`; newer bad ones are named in a
    :class:`CheckpointWarning`); :class:`ConfigError` when there is none."""
    path = Path(path)
    if (path / MANIFEST).exists() or (path / "state.pt").exists():
        problem = verify_checkpoint(path)
        if problem is not None:
            raise ConfigError(f"checkpoint {str(path)!r} is unusable: {problem}")
        return path
    root = run_folder(path) / CHECKPOINTS_DIR
    if root.is_dir():
        _restore_interrupted_rewrites(root, skip_live_writers=True)
    candidates = _newest_first(root)
    if not candidates:
        raise ConfigError(f"no checkpoint found in {str(path)!r} (expected a checkpoint or checkpoints/step_*/)")
    for index, candidate in enumerate(candidates):
        problem = verify_checkpoint(candidate)
        if problem is None:
            return candidate
        following = candidates[index + 1].name if index + 1 < len(candidates) else None
        warnings.warn(f"checkpoint {str(candidate)!r} is unusable ({problem})"
                      + (f"; trying {following}" if following else ""), CheckpointWarning, stacklevel=2)
    raise ConfigError(f"no usable checkpoint in {str(root)!r}: all {len(candidates)} fail verification")


def run_folder(path: Path) -> Path:
    """``path``, or the run folder of the ``checkpoints`` folder ``path`` (``--resume RUN/checkpoints``: the
    folder that holds a run's ``step_*`` checkpoints, not a run folder itself)."""
    if path.name == CHECKPOINTS_DIR and not (path / CHECKPOINTS_DIR).is_dir() and _newest_first(path):
        return path.parent
    return path


def _newest_first(root: Path) -> list[Path]:
    """The ``step_*`` folders of ``root`` (none when it is not a folder), newest first: by step number
    (``step_10000000`` is newer than ``step_9999999``, which a sort by name puts first), then by name."""

    folders = [c for c in root.glob("step_*") if c.is_dir()] if root.is_dir() else []
    return sorted(folders, key=lambda folder: (_step_number(folder), folder.name), reverse=True)


def _step_number(folder: Path) -> int:
    """The step of a ``step_*`` checkpoint folder (-1 for a name without one)."""
    match = re.match(r"step_(\d+)", folder.name)
    return int(match.group(1)) if match else -1


def check_fresh_out_dir(out_dir: str | os.PathLike) -> None:
    """Raise :class:`ConfigError` (one line) when a fresh run would write into ``out_dir`` while it holds a checkpoint
    that ``--resume`` uses (:func:`find_checkpoint`): the two runs' checkpoints and metrics would mix, and a later
    resume could continue either. Checkpoints that all fail verification leave the folder usable."""
    if not (Path(out_dir) / CHECKPOINTS_DIR).is_dir():
        return
    with warnings.catch_warnings():  # corrupt ones are no reason to refuse, nor to warn about
        warnings.simplefilter("ignore", CheckpointWarning)
        try:
            checkpoint = find_checkpoint(Path(out_dir))
        except ConfigError:
            return
    step = checkpoint.name.removeprefix("step_")
    raise ConfigError(
        f"{setting('out_dir')} {str(out_dir)!r} holds the checkpoints of another run (latest: step "
        f"{int(step) if step.isdigit() else checkpoint.name}): pass "
        f"{setting('resume')} {out_dir} to continue that run, or an empty or other {setting('out_dir')} to start a new "
        "one"
    )


def check_checkpoint_folder(out_dir: str | os.PathLike) -> None:
    """Raise :class:`ConfigError` (one line) when ``out_dir/checkpoints`` exists and is not a folder: the first
    checkpoint write would fail there with a raw ``OSError`` (under DDP on rank 0 only, the other ranks then failing
    in a collective)."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{setting('out_dir')} {str(out_dir)!r} holds a file {CHECKPOINTS_DIR!r} where checkpoints "
                          f"are written: move it away or pass another {setting('out_dir')}")


def load_checkpoint_config(path: str | os.PathLike) -> TrainConfig:
    """The :class:`TrainConfig` saved in the checkpoint at ``path`` (with ``resume`` pointing to it). ``out_dir`` is the
    run folder that holds the checkpoint (``out_dir/checkpoints/step_*``), not the one saved: a copied or moved run
    continues where it is, never in the folder it was copied from."""
    checkpoint = find_checkpoint(path)
    values = json.loads((checkpoint / "config.json").read_text())
    values["resume"] = str(checkpoint)
    if checkpoint.parent.name == CHECKPOINTS_DIR:
        values["out_dir"] = str(checkpoint.parent.parent)
    values.setdefault("warmup_scope", "regrown")  # saved before warm-up scopes existed: sparse values warmed up only
    return TrainConfig.from_dict(values)


def _restore_interrupted_rewrites(root: Path, skip_live_writers: bool) -> None:
    """Put back the checkpoints that a run stopped between the two renames of :func:`_atomic_replace_dir` (rewriting a
    step it had written before, e.g. after resuming from an earlier one) left without their ``step_*`` name: the new,
    sealed copy (``.tmp-step_*``, when it verifies against its manifest: it matches the run's metrics.jsonl), else
    the previous one (``.old-step_*-PID``). Renames only; a rank of the same run doing it at once does no harm.
    With ``skip_live_writers`` (a reader), a step whose writer PID is another live process on this machine is left
    alone: that run may be between its renames, and moving its ``.tmp-step_*`` would fail its own rename."""
    for old in sorted(root.glob(".old-step_*")):
        match = re.fullmatch(r"\.old-(step_\d+)-(\d+)", old.name)
        final = root / match.group(1) if match else None
        if final is None or final.exists():
            continue
        if skip_live_writers and _alive_elsewhere(int(match.group(2))):
            warnings.warn(f"checkpoint {str(final)!r} is being rewritten by process {match.group(2)}, which is "
                          "alive: it is passed over", CheckpointWarning, stacklevel=3)
            continue
        sealed = [tmp for tmp in sorted(root.glob(f".tmp-{final.name}*"))  # a manifest: not an unsealed write
                  if re.fullmatch(rf"\.tmp-{final.name}(-\d+)?", tmp.name) and (tmp / MANIFEST).is_file()
                  and verify_checkpoint(tmp) is None]
        for source in (*sealed, old):
            try:
                os.rename(source, final)
            except OSError:  # moved or removed by another rank, or it put one there first
                pass
            if final.exists():
                break


def _alive_elsewhere(pid: int) -> bool:
    """Whether ``pid`` is a live process on this machine other than this one (which is not writing while it reads)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)  # signal 0: an existence check
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process
        pass
    return True


def clear_leftovers(out_dir: Path) -> None:
    """Remove what runs stopped while writing a checkpoint left in ``out_dir/checkpoints``: ``.tmp-step_*`` (partial,
    or complete but never renamed) and ``.old-step_*`` folders, after putting back a checkpoint that only such a
    folder holds (:func:`_restore_interrupted_rewrites`). Call it once a run starts, on the rank that writes
    checkpoints (rank 0; it also coordinates sharded writes), before its first one: a run is its folder's only
    writer, and :func:`find_checkpoint` reads ``step_*`` folders only."""
    root = out_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return
    _restore_interrupted_rewrites(root, skip_live_writers=False)
    for leftover in (*root.glob(".tmp-step_*"), *root.glob(".old-step_*")):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


def set_aside_later_checkpoints(out_dir: Path, step: int) -> tuple[Path, list[str]] | None:
    """Move the ``step_*`` folders of ``out_dir/checkpoints`` past ``step`` (a run resumed in its own folder from an
    earlier checkpoint: the course it abandons, or unusable ones a resume passed over) into
    ``checkpoints/superseded-<step>-<n>/``, with that course's ``summary.json``: kept, not deleted, and a later
    ``--resume`` of the folder continues the new course. Returns that folder and the names moved; None when none."""
    root = out_dir / CHECKPOINTS_DIR
    later = [folder for folder in _newest_first(root) if _step_number(folder) > step]
    if not later:
        return None
    aside = next(root / f"superseded-{step:07d}-{n}" for n in range(1, 1 << 30)
                 if not (root / f"superseded-{step:07d}-{n}").exists())  # fmt: skip
    aside.mkdir()
    moved = [folder.name for folder in reversed(later)]
    for folder in later:
        os.replace(folder, aside / folder.name)
    if (out_dir / "summary.json").is_file():  # the abandoned course's result
        os.replace(out_dir / "summary.json", aside / "summary.json")
        moved.append("summary.json")
    _fsync_dir(root)
    return aside, moved


def _atomic_replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete folder ``tmp`` to ``final`` with a rename; an older ``final`` is renamed away first and removed
    afterwards (a run stopped in between leaves them to :func:`clear_leftovers` and :func:`find_checkpoint`)."""
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)  # the renames themselves on disk: a crash after this returns keeps ``final``
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _make_root(root: Path) -> None:
    """``out_dir/checkpoints``, its new entry in ``out_dir`` on disk too: a checkpoint sealed in a folder whose own
    name a crash loses is lost with it."""
    if not root.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        _fsync_dir(root.parent)


def _fsync_dir(path: Path) -> None:
    """Put ``path``'s entries (the names of the files in it, a rename into it) on disk: POSIX keeps them with the
    folder, not with the files, so an fsync of each file alone does not make them durable. A file system that
    cannot fsync a folder (some network and FUSE mounts refuse it) offers nothing more to do."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(descriptor)


def rng_state(device: torch.device) -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


@contextlib.contextmanager
def _writing(final: Path, tmp: Path):
    """Turn an ``OSError`` while writing checkpoint ``final`` through the folder ``tmp`` (a full disk, no
    permission) into a one-line :class:`TrainingFailed`; also the ``RuntimeError`` that ``torch.save`` raises for a
    failed write of its zip writer (a full disk there is not an ``OSError``). ``tmp`` is removed then: on a full disk
    its partial files would hold space the run's next steps may need (the previous copy of ``final``, if any, is
    kept)."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TrainingFailed(f"could not write checkpoint {final.name}: {error}") from error


def write_checkpoint(out_dir: Path, step: int, state: dict, config: TrainConfig) -> Path:
    """Write ``state`` and ``config`` as ``out_dir/checkpoints/step_{step:07d}`` (on disk before it becomes
    visible); returns the folder."""
    root = out_dir / CHECKPOINTS_DIR
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    with _writing(final, tmp):
        _make_root(root)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _write_state(tmp, state, config)
        return _seal(tmp, final)


def _write_state(tmp: Path, state: dict, config: TrainConfig) -> None:
    """A checkpoint folder's ``state.pt`` (``state``) and ``config.json`` (``config``), before it is sealed."""
    torch.save(state, tmp / "state.pt")
    (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=1))


def sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """``(tensors, rest)``: a flat DCP state dict (``model.<key>``, ``optimizer.<index>.<name>`` -- DTensors stay
    sharded) and the optimizer state dict without its tensors (param groups, non-tensor entries)."""
    tensors = {f"model.{key}": value for key, value in model.state_dict().items()}
    saved = optimizer.state_dict()
    rest: dict = {}
    for index, entry in saved["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value
            else:
                rest.setdefault(index, {})[name] = value
    return tensors, {"param_groups": saved["param_groups"], "state": rest}


def write_sharded_checkpoint(out_dir: Path, step: int, tensors: dict, state: dict, config: TrainConfig,
                             ddp: DistInfo) -> Path:
    """Collective: every rank writes its shards of ``tensors`` with DCP, rank 0 ``state`` and ``config``; the
    checkpoint becomes visible (renamed) once all are on disk. A failed write of rank 0 stops every rank
    (:func:`on_rank0`), and so does a failed shard write of any rank (DCP reports it on every rank), each with a
    one-line :class:`TrainingFailed`."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    root = out_dir / CHECKPOINTS_DIR
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-{final.name}"  # the same folder on every rank

    def prepare() -> None:
        with _writing(final, tmp):
            _make_root(root)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()

    def seal() -> None:
        with _writing(final, tmp):
            _write_state(tmp, {**state, "format": "sharded"}, config)
            _seal(tmp, final)

    on_rank0(ddp, prepare)
    try:
        dcp.save(tensors, checkpoint_id=tmp / SHARDED_DIR)
    except CheckpointException as error:  # a BaseException whose text holds every failed rank's traceback
        if ddp.rank == 0:  # every rank is done with the folder: DCP reports a failure after gathering every rank's
            shutil.rmtree(tmp, ignore_errors=True)
        rank = min(error.failures)
        cause = error.failures[rank][0]
        raise TrainingFailed(f"could not write checkpoint {final.name}: rank {rank}: {cause}") from error
    dist.barrier()
    on_rank0(ddp, seal)
    return final


def load_sharded(checkpoint: Path, state: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Fill ``state["model"]`` and ``state["optimizer"]`` from the DCP shards of ``checkpoint``, resharded for this
    process (DTensors placed like the current parameters; plain tensors in one process)."""
    import torch.distributed.checkpoint as dcp

    folder = checkpoint / SHARDED_DIR
    metadata = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    params = [p for group in optimizer.param_groups for p in group["params"]]
    rest = state["optimizer"]
    saved_ids = [i for group in rest["param_groups"] for i in group["params"]]
    if len(params) != len(saved_ids):
        raise ConfigError(f"checkpoint optimizer has {len(saved_ids)} parameters, this model {len(params)}")
    param_of = dict(zip(saved_ids, params))
    template = {f"model.{key}": value for key, value in model.state_dict().items()}
    for key, meta in metadata.items():
        if not key.startswith("optimizer."):
            continue
        index, name = key[len("optimizer."):].split(".", 1)
        param = param_of[int(index) if index.isdigit() else index]
        value = torch.zeros(tuple(meta.size), dtype=meta.properties.dtype)
        if is_sharded(param) and value.dim() >= 1 and value.shape[0] == param.shape[0]:
            value = shard_like(value.to(param.device), param)
        template[key] = value
    with warnings.catch_warnings():  # one process, as documented: torch warns that it "assumes" so
        warnings.filterwarnings("ignore", "torch.distributed is disabled, unavailable or uninitialized")
        dcp.load(template, checkpoint_id=folder)
    state["model"] = {key[len("model."):]: value for key, value in template.items() if key.startswith("model.")}
    entries: dict = {index: dict(values) for index, values in rest["state"].items()}
    for key, value in template.items():
        if key.startswith("optimizer."):
            index, name = key[len("optimizer."):].split(".", 1)
            entries.setdefault(int(index) if index.isdigit() else index, {})[name] = value
    state["optimizer"] = {"param_groups": rest["param_groups"], "state": entries}


def _seal(tmp: Path, final: Path) -> Path:
    """Write the manifest of every file in ``tmp`` (size, sha256), put it all on disk, then rename ``tmp`` to
    ``final``: a checkpoint is visible only once complete."""
    files, paths = {}, sorted(tmp.rglob("*"))
    for path in (p for p in paths if p.is_file()):
        with open(path, "rb+") as handle:  # on disk before the rename makes the checkpoint visible
            os.fsync(handle.fileno())
        files[path.relative_to(tmp).as_posix()] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
    with open(tmp / MANIFEST, "rb+") as handle:
        os.fsync(handle.fileno())
    for folder in reversed([p for p in paths if p.is_dir()]):  # the files' names, deepest first
        _fsync_dir(folder)
    _fsync_dir(tmp)
    _atomic_replace_dir(tmp, final)
    return final


def read_checkpoint(checkpoint: Path, config: TrainConfig) -> dict:
    """The state saved in ``checkpoint`` (CPU tensors), after checking that ``config`` keeps the settings a resumed
    run must share with it (:data:`FIXED_ON_RESUME`; ``data`` may name another path when the state holds the digest
    of its tokens, which the run compares: a relative path from another folder, or moved files). Every other
    setting is checked before the state is read."""
    saved, changed = _fixed_changes(json.loads((checkpoint / "config.json").read_text()), fixed_values(config))
    _refuse_changes(checkpoint, saved, [name for name in changed if name != "data"])
    # read to CPU: RNG states must stay CPU ByteTensors; the load_state_dict calls move the rest to the device
    state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=False)
    if "corpus_sha256" not in state["data"]:  # an older checkpoint: its data is known by name only
        _refuse_changes(checkpoint, saved, [name for name in changed if name == "data"])
    return state


def refuse_fixed_changes(path: str | os.PathLike, values: dict) -> None:
    """Refuse (:class:`ConfigError`, as :func:`read_checkpoint` would) a resume from ``path`` whose ``values`` change
    a setting of :data:`FIXED_ON_RESUME` (``data`` aside), read from the ``config.json`` of the checkpoint ``path`` or
    of those in ``path/checkpoints`` without verifying them: a wrong option is then refused at once, not after
    :func:`find_checkpoint` has hashed every file of a large checkpoint. Refused only when no checkpoint there would
    take ``values`` (naming the newest): a folder may also hold the corrupt checkpoints of another run, which
    :func:`find_checkpoint` passes over."""
    path = Path(path)
    folders = [path] if (path / "config.json").is_file() else _newest_first(run_folder(path) / CHECKPOINTS_DIR)
    refusal = None
    for folder in folders:
        try:
            saved_config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            continue  # left to find_checkpoint's verdict
        if isinstance(saved_config, dict):
            saved, changed = _fixed_changes(saved_config, values)
            changed = [name for name in changed if name != "data"]
            if not changed:
                return  # read_checkpoint decides on the checkpoint find_checkpoint picks
            refusal = refusal or (folder, saved, changed)
    if refusal is not None:
        _refuse_changes(*refusal)


def fixed_values(config: TrainConfig) -> dict:
    """The :data:`FIXED_ON_RESUME` settings of ``config``, a sparse method's ``block_size`` resolved (by default it
    follows ``prune_fraction``, which a resume may change)."""
    values = {name: getattr(config, name) for name in FIXED_ON_RESUME}
    if config.optimizer in METHODS and METHODS[config.optimizer].sparse:
        values["block_size"] = config.resolved_block_size()
    values["galore_rank"] = saved_galore_rank(config.to_dict())
    return values


def saved_defaults(saved_config: dict) -> dict:
    """The settings that a run of the checkpoint ``config.json`` ``saved_config`` resolved from their defaults (its
    block size and GaLore rank), as it trained with them."""
    return {"block_size": saved_block_size(saved_config), "galore_rank": saved_galore_rank(saved_config)}


def saved_galore_rank(saved_config: dict) -> int | None:
    """The projection rank a GaLore run of the checkpoint ``config.json`` ``saved_config`` trained with: its
    ``galore_rank``, else its model's default (a run given that rank explicitly trains the same); for another method
    ``galore_rank`` as saved."""
    rank = saved_config.get("galore_rank")
    method = METHODS.get(saved_config.get("optimizer", TrainConfig().optimizer))
    if rank is not None or method is None or method.optimizer != "galore":
        return rank
    return GALORE_DEFAULT_RANK.get(saved_config.get("model", TrainConfig().model))


def saved_block_size(saved_config: dict) -> int | None:
    """The block size a sparse run of the checkpoint ``config.json`` ``saved_config`` trained with: its
    ``block_size``, else the default it resolved to (None for a dense method, or a config that cannot tell)."""
    defaults = TrainConfig()
    method = METHODS.get(saved_config.get("optimizer", defaults.optimizer))
    if saved_config.get("block_size") is not None or method is None or not method.sparse:
        return saved_config.get("block_size")
    try:
        return TrainConfig(**{name: saved_config.get(name, getattr(defaults, name))
                              for name in ("model", "density", "prune_fraction")}).resolved_block_size()
    except (KeyError, TypeError, ValueError):  # an unknown model preset: left to the checks of the run
        return None


def _fixed_changes(saved_config: dict, values: dict) -> tuple[dict, list[str]]:
    """``(saved, changed)``: the :data:`FIXED_ON_RESUME` settings of a checkpoint's ``config.json`` (a setting newer
    than the checkpoint at its default; a default ``block_size`` as resolved), and the names among ``values`` that
    change one, but for options without effect in the saved method (e.g. ``density`` for ``adamw``), which the CLI
    names as such, as in a fresh run."""
    defaults = TrainConfig()
    saved = {name: saved_config.get(name, getattr(defaults, name)) for name in FIXED_ON_RESUME}
    saved.update(saved_defaults(saved_config))
    method = METHODS.get(saved["optimizer"])
    inert = set(method.ignored_options) if method else set()
    changed = [name for name in FIXED_ON_RESUME
               if name in values and not _same_setting(name, saved[name], values[name]) and name not in inert]
    return saved, changed


def _same_setting(name: str, saved, given) -> bool:
    """Whether ``given`` keeps the saved setting ``name``: equal, or (``tokenizer``) naming the same tokenizer, as
    ``bpe`` and ``bpe:32000`` do (one cache entry, the same tokens)."""
    if name == "tokenizer":
        try:
            return parse_tokenizer(saved) == parse_tokenizer(given)
        except TokenizerError:
            pass
    return saved == given


def _refuse_changes(checkpoint: Path, saved: dict, changed: list[str]) -> None:
    if changed:
        raise ConfigError(
            f"cannot change {', '.join(map(setting, changed))} when resuming {str(checkpoint)!r} (saved: "
            + ", ".join(f"{setting(name)} {saved[name]!r}" for name in changed)
            + "): the model, its topology, the data position and the optimizer state depend on them"
        )
