"""Resuming a run: whether ``--resume`` continues a run in its own ``out_dir`` (:func:`continues_in_place`), and
restoring a :class:`~smet_kernels.train.loop.Run` from a checkpoint (:func:`restore`)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from ..sharding import shard_like
from .checkpoint import CHECKPOINTS_DIR, CheckpointWarning, load_sharded, read_checkpoint, run_folder, set_rng_state
from .config import ConfigError, TrainConfig, setting
from .distributed import sharded_optimizer_state
from .metrics import MetricsWarning, read_records

if TYPE_CHECKING:
    from .loop import Run


def continues_in_place(config: TrainConfig) -> bool:
    """Whether the run resumes from a checkpoint of its own ``out_dir`` (``--resume`` names that folder or one of its
    ``checkpoints/step_*``), or from a checkpoint outside any run folder into the ``out_dir`` saved in it (where its
    run went on); a fresh run, or a resume into another folder, must find that folder free of another run's
    checkpoints."""
    if not config.resume:
        return False
    resume = run_folder(Path(config.resume))
    if resume.parent.name == CHECKPOINTS_DIR:
        resume = resume.parent.parent
    elif not (resume / CHECKPOINTS_DIR).is_dir():  # a checkpoint outside any run folder
        try:
            saved = json.loads((resume / "config.json").read_text()).get("out_dir")
        except (OSError, ValueError, AttributeError):
            return False
        if not saved:
            return False
        resume = Path(saved)
    return resume.resolve() == Path(config.out_dir).resolve()


def logged_loss(checkpoint: Path, step: int) -> float:
    """The training loss that the ``metrics.jsonl`` of ``checkpoint``'s run folder records for ``step`` (a checkpoint
    of an older release lacks ``last_loss``; the final step is always logged), else NaN."""
    path = checkpoint.parent.parent / "metrics.jsonl"
    if checkpoint.parent.name != CHECKPOINTS_DIR or not path.is_file():
        return float("nan")
    with warnings.catch_warnings():  # a last line cut short: MetricsLog warns about it when the run opens the log
        warnings.simplefilter("ignore", MetricsWarning)
        losses = [r.get("loss") for r in read_records(path) if r.get("type") == "train" and r.get("step") == step]
    return float(losses[-1]) if losses and losses[-1] is not None else float("nan")


def restore(run: Run, checkpoint: Path) -> None:
    """Load ``checkpoint`` into ``run`` (model, optimizer, controller, data position, RNG states, spike tracker,
    update probe, progress); a full checkpoint under fsdp is cut into this rank's shards, a sharded one resharded
    for this world size. Refuses (:class:`ConfigError`) data whose tokens changed since the checkpoint."""
    state = read_checkpoint(checkpoint, run.config)
    saved_data = state["data"].get("corpus_sha256")  # None: a checkpoint of an older release
    if saved_data is not None and saved_data != run.corpus.sha256:
        raise ConfigError(
            f"{setting('data')} {run.config.data!r} is not the data that {str(checkpoint)!r} was trained on (its "
            "tokens changed): resume with that data to see the batches the run would have seen"
        )
    if state.get("format") == "sharded":  # DCP shards, resharded for this world size
        load_sharded(checkpoint, state, run.model, run.optimizer)
    elif run.fsdp:  # full tensors (the single-process format) -> this rank's shards
        current = run.model.state_dict()
        state["model"] = {key: shard_like(value, current[key]) if key in current else value
                          for key, value in state["model"].items()}
        state["optimizer"] = sharded_optimizer_state(run.optimizer, state["optimizer"])
    # the saved groups keep their parameters and take this config's hyperparameters (weight decay, betas, eps,
    # warm-up, backend...), still in the freshly built groups: options given with --resume act as config.json
    # records them
    for saved, group in zip(state["optimizer"]["param_groups"], run.optimizer.param_groups):
        saved.update({key: value for key, value in group.items() if key != "params"})
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.controller is not None:
        run.controller.load_state_dict(state["controller"])
    run.batches.load_state_dict(state["data"])
    set_rng_state(state["rng"], run.device)
    run.spikes.load_state_dict(state["spikes"])
    probe = state.get("probe")
    if run.probe is not None and probe is not None:  # update probe (issue 16)
        windows = run.probe_windows().tolist()
        if probe["open"] is not None and probe.get("windows", windows) != windows:  # its losses would mix two batches
            warnings.warn(f"the update probe's window of the update at step {probe['open']['update_step']} is left "
                          f"out (no update_probe record): {setting('grad_accum')} or {setting('eval_batches')} changed "
                          "its held-out batch since the checkpoint", CheckpointWarning, stacklevel=2)
        else:
            run.probe.load_state_dict(probe)
    run.step = int(state["step"])
    run.tokens_seen = int(state["progress"]["tokens_seen"])
    run.train_time = float(state["progress"]["train_time"])
    run.initial_val_loss = state["progress"]["initial_val_loss"]
    run.nonfinite_skips = int(state["progress"].get("nonfinite_skips", 0))
    last_loss = state["progress"].get("last_loss")  # saved since summaries need it; older ones logged it only
    run.last_loss = float(last_loss) if last_loss is not None else logged_loss(checkpoint, run.step)
