"""Checkpoint I/O of the trainer: ``checkpoints/step_XXXXXXX/`` folders holding ``state.pt`` (model, optimizer,
controller, data position, RNG states, progress) and ``config.json``, written to a temporary folder and renamed
(atomic: a crash leaves the previous checkpoints as they were), found again and read back for ``--resume``."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from .config import FIXED_ON_RESUME, ConfigError, TrainConfig


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint folder for ``path``: a ``step_*`` folder itself, or the latest one in ``path/checkpoints``."""
    path = Path(path)
    if (path / "state.pt").is_file():
        return path
    candidates = sorted((path / "checkpoints").glob("step_*")) if path.is_dir() else []
    candidates = [c for c in candidates if (c / "state.pt").is_file()]
    if not candidates:
        raise ConfigError(f"no checkpoint found in {str(path)!r} (expected state.pt or checkpoints/step_*/)")
    return candidates[-1]


def load_checkpoint_config(path: str | os.PathLike) -> TrainConfig:
    """The :class:`TrainConfig` saved in the checkpoint at ``path`` (with ``resume`` pointing to it)."""
    checkpoint = find_checkpoint(path)
    values = json.loads((checkpoint / "config.json").read_text())
    values["resume"] = str(checkpoint)
    return TrainConfig.from_dict(values)


def _atomic_replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete folder ``tmp`` to ``final`` with a rename; an older ``final`` is removed afterwards."""
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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



def write_checkpoint(out_dir: Path, step: int, state: dict, config: TrainConfig) -> Path:
    """Write ``state`` and ``config`` as ``out_dir/checkpoints/step_{step:07d}`` (on disk before it becomes
    visible); returns the folder."""
    root = out_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / "state.pt")
    (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
    for name in ("state.pt", "config.json"):  # on disk before the rename makes the checkpoint visible
        with open(tmp / name, "rb+") as handle:
            os.fsync(handle.fileno())
    _atomic_replace_dir(tmp, final)
    return final


def read_checkpoint(checkpoint: Path, config: TrainConfig) -> dict:
    """The state saved in ``checkpoint`` (CPU tensors), after checking that ``config`` keeps the settings a resumed
    run must share with it (:data:`FIXED_ON_RESUME`)."""
    saved = json.loads((checkpoint / "config.json").read_text())
    changed = [name for name in FIXED_ON_RESUME if saved.get(name) != getattr(config, name)]
    if changed:
        raise ConfigError(
            f"cannot change {', '.join(changed)} when resuming {str(checkpoint)!r} (saved: "
            + ", ".join(f"{name}={saved.get(name)!r}" for name in changed)
            + "): the model, its topology and the data position depend on them"
        )
    # read to CPU: RNG states must stay CPU ByteTensors; the load_state_dict calls move the rest to the device
    return torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=False)
