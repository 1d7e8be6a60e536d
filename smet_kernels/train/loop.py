"""Reference SMET trainer: ``train(TrainConfig(...)) -> summary dict`` (the ``smet-train`` CLI wraps it).

One optimizer step (global batch ``batch_size`` sequences, split over ``grad_accum`` micro-steps and the
data-parallel ranks) is ``forward/backward per micro-batch -> clip -> lr schedule -> optimizer.step() ->
topology controller.step()``. Optimizer modes:

* ``adamw``: dense model, ``torch.optim.AdamW``;
* ``galore``: dense model, :class:`~smet_kernels.optim.galore.GaLoreAdamW` on the hidden linears;
* ``smet``: hidden linears -> ``BlockSparseLinear``, :class:`SMETAdamW` (local bias correction, warm-up,
  density-aware LR) and the :class:`~smet_kernels.topology.SMET` controller;
* ``naive-dst``: the paper's naive DST: compact storage and plain Adam, ``warmup="none"``,
  ``bias_correction="global"`` (cold start), α = 0 unless given;
* ``warmup-only`` / ``density-lr-only``: the ablation arms between them (SMET with α = 0; naive DST with α = 1
  unless given) — see :data:`~smet_kernels.train.methods.METHODS`;
* ``masked-dst``: hidden linears -> masked dense layers, ``torch.optim.AdamW``, same controller.

LR: linear warm-up over ``lr_warmup_steps``, then cosine decay to ``0.1 * lr`` at ``max_steps``.

Outputs in ``out_dir`` (rank 0): ``metrics.jsonl`` (strict JSON; one object per logged step: ``type="train"``,
``step``, ``loss``, ``lr``, ``grad_norm`` (before clipping), ``tokens_per_s``, ``peak_mem_bytes`` —
``torch.cuda.max_memory_allocated`` on CUDA, the process peak resident set size (``ru_maxrss``) on CPU — plus
``val_loss``/``val_ppl``/``val_bpb`` (bits per byte, comparable between tokenizers) on eval steps; one
``type="topology_update"`` object per update and one ``type="loss_spike"`` object per measured spike, written
at the step its window closes, ``update_step`` naming the update; one ``type="nonfinite"`` object per step with a
non-finite loss or gradient norm, ``step`` being the step it was for; otherwise ``step`` is the step of writing),
``summary.json`` and ``checkpoints/step_XXXXXXX/`` (written to a temporary folder, then renamed). The summary's
``tokens_per_s`` is all tokens over all step time (kernel compilation and autotuning of the first steps
included); ``steady_tokens_per_s`` is one step's tokens over the median step time of this process, its first
step left out. A resume from the final checkpoint of a run stopped before its ``summary.json`` takes no step: it
evaluates (when the run does) and writes the summary.

Multi-process: under ``torchrun`` (``WORLD_SIZE > 1``) the process group is initialised from the environment
(``nccl`` on CUDA, ``gloo`` on CPU); every rank takes its own slice of each global batch, so the training matches
one process. Rank 0's own work at setup (opening ``out_dir``), at each checkpoint write and at the summary ends in a
broadcast of its outcome: a failure there stops every rank with a one-line error; a failed write of ``metrics.jsonl``
stops every rank at the start of the next step (one all-reduce of a flag per step). ``parallel="ddp"`` (default)
wraps the model in
``DistributedDataParallel`` (on the compact parameters). ``parallel="fsdp"`` applies FSDP2 (``fully_shard`` to each
decoder layer, then the root) before the optimizer is built: every parameter, compact values included, becomes a
``DTensor`` sharded on dim 0 (whole slots per rank), and so do the optimizer states (``block_step`` included);
:class:`SMETAdamW` and the SMET controller work on the local shards (prune scores gathered over ranks, each rank
regrows the slots it owns). Checkpoints of an fsdp run are sharded (every rank writes its shards with
``torch.distributed.checkpoint``; they resume on any number of ranks), or with ``checkpoint_format="full"`` gathered
to full tensors and written by rank 0 in the single-process format (on resume every rank loads them and keeps its
shard). GaLore is rejected under fsdp (its projection needs whole gradient matrices).
"""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .. import backend as backend_module
from ..sharding import full, local
from .build import build_controller, build_model, build_optimizer, prepare_data
from .checkpoint import (
    CheckpointWarning,
    check_checkpoint_folder,
    check_fresh_out_dir,
    clear_leftovers,
    find_checkpoint,
    fixed_values,
    refuse_fixed_changes,
    rng_state,
    set_aside_later_checkpoints,
    sharded_state,
    write_checkpoint,
    write_sharded_checkpoint,
)
from .clipping import clip_grad_norm
from .config import SPARSE_OPTIMIZERS, ConfigError, TrainConfig, last_update_step, setting
from .data import PackedBatches, window_batch
from .distributed import (
    TrainingFailed,
    full_state,
    group_destroyed_on_failure,
    init_distributed,
    on_rank0,
    reshard,
    resolve_device,
    shard_model,
    wrap_ddp,
)
from .metrics import MetricsLog, peak_memory_bytes, perplexity, write_summary
from .model import lm_loss
from .probe import UpdateProbe
from .resume import continues_in_place, restore
from .spikes import SpikeTracker

MIN_LR_RATIO = 0.1


def lr_factor(step: int, warmup_steps: int, max_steps: int) -> float:
    """Multiplier of the base LR at optimizer step ``step`` (1-based): ``step / warmup`` during warm-up, then
    ``0.1 + 0.9 · (1 + cos(π · progress)) / 2`` with progress from 0 (end of warm-up) to 1 (``max_steps``)."""
    if warmup_steps > 0 and step <= warmup_steps:
        return step / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return MIN_LR_RATIO + (1.0 - MIN_LR_RATIO) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class TrainingDiverged(TrainingFailed):
    """The run met a non-finite loss or gradient norm it may not skip (the CLI prints it as a one-line error)."""


def update_probe_runs(config: TrainConfig, world_size: int) -> bool:
    """The update probe runs when asked for, on plain tensors only: not under FSDP2 (``parallel="fsdp"`` on
    several ranks)."""
    return config.update_probe and not (world_size > 1 and config.parallel == "fsdp")


class Run:
    """State of one training run (rank-local); :func:`train` drives it."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.in_place = bool(config.out_dir) and continues_in_place(config)  # in its run's folder: metrics kept
        if config.out_dir and not self.in_place:  # before anything, in out_dir or elsewhere, is touched
            check_fresh_out_dir(config.out_dir)
        if config.out_dir and config.checkpoint_every:
            check_checkpoint_folder(config.out_dir)
        if config.resume:  # a changed fixed setting: refused before the checkpoint is verified (hashed)
            refuse_fixed_changes(config.resume, fixed_values(config))
        self.ddp = init_distributed(config.device)
        self.device = resolve_device(config.device, self.ddp)
        self.is_main = self.ddp.rank == 0
        corpus, self.batches, self.val_indices = prepare_data(config, self.device, self.ddp.world_size)
        self.model = build_model(config, corpus.vocab_size, self.device)
        self.fsdp = self.ddp.enabled and config.parallel == "fsdp"
        if self.fsdp:  # before the optimizer and controller: they hold the sharded parameters
            shard_model(self.model, self.device)
        self.optimizer = build_optimizer(config, self.model, self.device)
        self.controller = build_controller(config, self.model, self.optimizer)
        self.corpus = corpus
        self.val_tokens = corpus.val
        self.vocab_size = corpus.vocab_size
        self.val_bytes_per_token = None  # of the evaluated targets, for bits per byte
        if self.val_indices is not None and corpus.token_bytes is not None:
            targets = window_batch(corpus.val, self.val_indices, config.seq_len)[1].numpy()
            self.val_bytes_per_token = corpus.bytes_of(targets) / targets.size
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]  # the schedule's peak per group
        self.spikes = SpikeTracker(config.spike_window)
        # --- update probe (issue 16): prune damage / cold start / first-step sizes; plain tensors only (not fsdp)
        self.probe = UpdateProbe(self.model, self.probe_loss, config.spike_window) if (
            update_probe_runs(config, self.ddp.world_size) and self.val_indices is not None) else None
        self.step = 0
        self.tokens_seen = 0
        self.train_time = 0.0
        self.initial_val_loss: float | None = None
        self.nonfinite_skips = 0  # steps dropped for a non-finite loss or gradient norm, over the whole run
        self.last_loss = float("nan")  # training loss of the last step taken
        self.consecutive_skips = 0
        self.out_dir = Path(config.out_dir) if config.out_dir else None
        self.log_error: str | None = None  # rank 0's failed write of metrics.jsonl, until every rank has stopped
        if config.resume:
            restore(self, find_checkpoint(config.resume))
            # a run stopped between its final checkpoint and summary.json is finished by _train_loop (no steps left)
            unfinished = self.out_dir is not None and not (self.out_dir / "summary.json").exists()
            if self.step > config.max_steps or (self.step == config.max_steps and not unfinished):
                raise ConfigError(  # before anything in out_dir is touched
                    f"the run in {config.resume!r} already reached step {self.step} ({setting('max_steps')} "
                    f"{config.max_steps}): pass a larger {setting('max_steps')} to continue it"
                )
        self.wrapped = self.model  # fully_shard works in place: the model is its own wrapper under fsdp
        if self.ddp.enabled and not self.fsdp:
            self.wrapped = wrap_ddp(self.model, self.device)
        if config.compile:  # one graph per model: the block-sparse products are custom ops (torch.ops.smet)
            if self.controller is not None and self.controller.regrow == "gradient":
                # Dynamo does not guard on module hooks: code compiled before for this model class without RigL's
                # dense-gradient hooks (an earlier run in this process) would be reused and never record
                torch._dynamo.reset()
            self.wrapped = torch.compile(self.wrapped, fullgraph=not self.ddp.enabled)
        # before the first checkpoint write; rank 0 writes or coordinates them
        self.metrics = on_rank0(self.ddp, self._open_out_dir) if self.out_dir else None

    def _open_out_dir(self) -> MetricsLog:
        """Rank 0: remove what stopped checkpoint writes left in ``out_dir``, then open its ``metrics.jsonl``: a resume
        in its run's own folder keeps the records up to its checkpoint; a fresh run, or a resume into another folder,
        starts the file anew (records there are another run's, whose steps would mix with this run's)."""
        try:
            clear_leftovers(self.out_dir)
            set_aside = set_aside_later_checkpoints(self.out_dir, self.step) if self.in_place else None
            if set_aside is not None:
                aside, moved = set_aside
                warnings.warn(f"resumed at step {self.step}: {', '.join(moved)} (past it: the course it leaves, or "
                              f"unusable) moved to {str(aside)!r}, so that a later --resume continues this course",
                              CheckpointWarning, stacklevel=2)
            return MetricsLog(self.out_dir, self.step if self.in_place else None)
        except OSError as error:
            raise TrainingFailed(f"could not prepare {setting('out_dir')} {str(self.out_dir)!r}: {error}") from None

    # ---------------------------------------------------------------- io
    def log(self, record: dict) -> None:
        """Append ``record`` to ``metrics.jsonl`` (rank 0). A failed write stops one process at once
        (:class:`TrainingFailed`); under torch.distributed rank 0 keeps the error and writes no further record, and
        every rank stops at the next :meth:`stop_if_log_failed` (each step, each checkpoint, the summary)."""
        if self.metrics is None or self.log_error is not None:
            return
        try:
            self.metrics.log(record)
        except OSError as error:
            self.log_error = f"could not write {str(self.metrics.path)!r}: {error}"
            with contextlib.suppress(OSError):  # the record stays in the file's buffer: each flush fails again
                self.metrics.close()  # closed even so (train's close then does nothing, not an OSError traceback)
            if not self.ddp.enabled:
                raise TrainingFailed(self.log_error) from None

    def stop_if_log_failed(self) -> None:
        """Under torch.distributed, once rank 0 failed to write a record: stop every rank with its error (one
        all-reduce of a flag, then :func:`on_rank0`'s broadcast of the message)."""
        if not (self.ddp.enabled and self.out_dir):
            return
        failed = torch.tensor(float(self.log_error is not None), device=self.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item():
            on_rank0(self.ddp, self._raise_log_error)

    def _raise_log_error(self) -> None:
        raise TrainingFailed(self.log_error)

    def parameters_finite(self) -> bool:
        """Whether every parameter value is finite, on every rank."""
        finite = torch.ones((), device=self.device)
        for p in self.model.parameters():
            finite = finite * torch.isfinite(local(p.detach())).all()
        if self.ddp.enabled:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite)

    def save_checkpoint(self) -> Path | None:
        """Write the run's state as ``checkpoints/step_XXXXXXX`` (rank 0; every rank takes part under fsdp); refuses
        (:class:`TrainingDiverged`) a model with non-finite values."""
        if not self.out_dir:
            return None
        self.stop_if_log_failed()  # a checkpoint past a record missing from metrics.jsonl would resume without it
        if not self.parameters_finite():
            raise TrainingDiverged(f"non-finite parameters at step {self.step}: checkpoint not written")
        if self.fsdp and self.config.checkpoint_format == "sharded":  # every rank writes its shards
            tensors, optimizer_rest = sharded_state(self.model, self.optimizer)
            state = self._state(None, optimizer_rest) if self.is_main else {}
            final = write_sharded_checkpoint(self.out_dir, self.step, tensors, state, self.config, self.ddp)
            return final if self.is_main else None
        model_state, optimizer_state = None, None
        if self.fsdp:  # gather the shards (every rank takes part); rank 0 keeps full CPU tensors
            model_state = full_state(self.model.state_dict(), self.is_main)
            optimizer_state = full_state(self.optimizer.state_dict(), self.is_main)

        def write() -> Path:
            state = self._state(model_state if self.fsdp else self.model.state_dict(),
                                optimizer_state if self.fsdp else self.optimizer.state_dict())
            return write_checkpoint(self.out_dir, self.step, state, self.config)

        return on_rank0(self.ddp, write)  # a failed write stops every rank

    def _state(self, model_state: dict | None, optimizer_state: dict) -> dict:
        return {
            "step": self.step,
            "model": model_state,
            "optimizer": optimizer_state,
            "controller": self.controller.state_dict() if self.controller is not None else None,
            "data": {**self.batches.state_dict(), "corpus_sha256": self.corpus.sha256},
            "rng": rng_state(self.device),
            "spikes": self.spikes.state_dict(),
            "probe": ({**self.probe.state_dict(), "windows": self.probe_windows().tolist()}  # update probe (issue 16)
                      if self.probe is not None else None),
            "progress": {"tokens_seen": self.tokens_seen, "train_time": self.train_time,
                         "initial_val_loss": self.initial_val_loss, "nonfinite_skips": self.nonfinite_skips,
                         "last_loss": self.last_loss},
        }

    # ---------------------------------------------------------------- compute
    def _autocast(self):
        if self.config.precision == "bf16-autocast":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def val_record(self, val_loss: float) -> dict:
        """``val_loss`` (nats per token), ``val_ppl`` and ``val_bpb`` = ``val_loss · tokens / (ln 2 · bytes)`` over
        the evaluated targets (None for a token file, whose bytes are unknown)."""
        bpb = None if self.val_bytes_per_token is None else val_loss / (math.log(2) * self.val_bytes_per_token)
        return {"val_loss": val_loss, "val_ppl": perplexity(val_loss), "val_bpb": bpb}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over the fixed validation windows (sharded over ranks, in the training micro-batch
        size so that evaluation fits wherever training does)."""
        self.model.eval()
        config = self.config
        micro = config.batch_size // (self.ddp.world_size * config.grad_accum)
        shards = self.val_indices.view(-1, self.ddp.world_size, micro)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch in shards[:, self.ddp.rank]:
            x, y = window_batch(self.val_tokens, batch, config.seq_len)
            with self._autocast():
                logits = self.model(x.to(self.device))
            total += lm_loss(logits, y.to(self.device)).double()
        self.model.train()
        if self.fsdp:
            reshard(self.model)
        return float(self.ddp.mean(total / shards.shape[0]))

    @torch.no_grad()
    def probe_loss(self) -> float:
        """Loss of the update probe's held-out batch (:meth:`probe_windows`); under DDP each rank takes its slice and
        the loss is their mean: the same batch on any number of ranks, as in one process."""
        micro = self.config.batch_size // (self.ddp.world_size * self.config.grad_accum)
        windows = self.probe_windows().view(self.ddp.world_size, micro)[self.ddp.rank]
        x, y = window_batch(self.val_tokens, windows, self.config.seq_len)
        self.model.eval()
        with self._autocast():
            loss = lm_loss(self.model(x.to(self.device)), y.to(self.device))
        self.model.train()
        return float(self.ddp.mean(loss.double()))

    def probe_windows(self) -> torch.Tensor:
        """The update probe's held-out batch: the first ``batch_size / grad_accum`` validation windows."""
        return self.val_indices[:self.config.batch_size // self.config.grad_accum]

    def is_probe_step(self, step: int) -> bool:
        """Update steps of the controller; for a dense run the steps it would update at (the control), up to
        ``update_end_step`` as the controller's."""
        if self.controller is not None:
            return self.controller.is_update_step(step)
        end = last_update_step(self.config.update_end_step, self.config.max_steps)
        return step % self.config.update_interval == 0 and step <= end

    def train_step(self) -> tuple[float, float]:
        """One optimizer step on the next global batch; returns (mean training loss over the global batch, global
        gradient norm before clipping). A non-finite loss or norm leaves the model, the optimizer and ``step`` as
        they were (the gradients are dropped; the batch is consumed)."""
        config = self.config
        indices = self.batches.next_global()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for micro in range(config.grad_accum):
            shard = PackedBatches.shard(indices, micro, config.grad_accum, self.ddp.rank, self.ddp.world_size)
            x, y = self.batches.batch(shard)
            last = micro == config.grad_accum - 1
            # DDP: all-reduce on the last micro-step only; FSDP2 reduce-scatters every micro-step (sharded grads)
            sync = contextlib.nullcontext() if (last or not self.ddp.enabled or self.fsdp) else self.wrapped.no_sync()
            with sync:
                with self._autocast():
                    logits = self.wrapped(x.to(self.device, non_blocking=True))
                loss = lm_loss(logits, y.to(self.device, non_blocking=True))
                (loss / config.grad_accum).backward()
            loss_sum += loss.detach().double()
        loss = self.ddp.mean(loss_sum / config.grad_accum)
        # max_norm inf measures without clipping (the gradients are scaled by min(1, inf) = 1)
        max_norm = config.grad_clip if config.grad_clip > 0 else math.inf
        norm = full(clip_grad_norm(self.model.parameters(), max_norm))  # a replicated DTensor under fsdp
        # loss and norm read back together: one wait for the GPU per step (the finite check needs both before the
        # optimizer step), not one after the backward and another after the norm's few kernels
        loss, grad_norm = torch.stack([loss, norm.to(loss)]).tolist()
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            if self.controller is not None:
                self.controller.discard_dense_grad()
            return loss, grad_norm
        factor = lr_factor(self.step + 1, config.lr_warmup_steps, config.max_steps)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * factor
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss, grad_norm

    def params_checksum(self) -> torch.Tensor:
        """Sum and sum of squares of every parameter and layout index (fp64), to compare ranks. Under fsdp the
        parameters are gathered first (one copy of the values: the comparison checks the replicated layouts and
        that every rank gathers the same model)."""
        parts = []
        for p in self.model.parameters():
            data = full(p.detach()).double()
            parts += [data.sum(), (data * data).sum()]
            layout = getattr(p, "smet_layout", None) or getattr(p, "smet_mask_layout", None)
            if layout is not None:
                slots = torch.arange(1, layout.nnz + 1, dtype=torch.float64, device=layout.device)
                parts.append((layout.block_indices.double() * slots[:, None]).sum().to(data.device))
        return torch.stack(parts)

    def ranks_in_sync(self) -> bool:
        if not self.ddp.enabled:
            return True
        checksum = self.params_checksum().cpu() if self.device.type == "cpu" else self.params_checksum()
        gathered = [torch.empty_like(checksum) for _ in range(self.ddp.world_size)]
        dist.all_gather(gathered, checksum)
        return all(torch.equal(gathered[0], other) for other in gathered[1:])


def train(config: TrainConfig, on_ready: Callable[[], None] | None = None) -> dict:
    """Train per ``config``; returns the summary (also written to ``out_dir/summary.json`` on rank 0). ``on_ready``
    is called once the run is set up (data, model, a resume's checkpoint), before its first step."""
    config.validate()
    previous_backend = backend_module.get_backend()
    backend_module.set_backend(config.backend)
    run = None
    try:
        with group_destroyed_on_failure():
            run = Run(config)
        if on_ready is not None:
            on_ready()
        return _train_loop(run)
    finally:
        backend_module.set_backend(previous_backend)
        if run is not None and run.metrics is not None:
            run.metrics.close()
        if run is not None and run.ddp.initialised_here:
            # Free the DDP wrapper while the process group is still alive: if its Reducer held the group's last
            # reference, the group would be destroyed from C++ with the GIL held, joining a gloo worker thread
            # that may need the GIL to free a finished collective's tensors -- an intermittent deadlock at exit.
            run.wrapped = None
            gc.collect()
            dist.destroy_process_group()


def _handle_nonfinite(run: Run, loss: float, grad_norm: float) -> None:
    """A step with a non-finite loss or gradient norm was dropped: log it, then raise :class:`TrainingDiverged`
    under ``on_nonfinite="stop"`` or when ``max_consecutive_skips`` steps in a row were already skipped, else count
    the skip."""
    config = run.config
    what = "loss" if not math.isfinite(loss) else "grad norm"
    attempt = run.step + 1
    stop = config.on_nonfinite == "stop" or run.consecutive_skips >= config.max_consecutive_skips
    if not stop:
        run.nonfinite_skips += 1
        run.consecutive_skips += 1
    # ``step`` is the step the batch was for: a resume from an earlier checkpoint drops the record and meets the batch
    # again, one from a later checkpoint keeps it
    run.log({"type": "nonfinite", "step": attempt, "loss": loss, "grad_norm": grad_norm,
             "action": "stop" if stop else "skip", "consecutive_skips": run.consecutive_skips})
    if not stop:
        return
    reason = (f"{run.consecutive_skips} step(s) in a row already skipped ({setting('max_consecutive_skips')} "
              f"{config.max_consecutive_skips})" if config.on_nonfinite == "skip"
              else f"lower {setting('lr')}, enable {setting('grad_clip')}, or pass {setting('on_nonfinite')} 'skip'")
    raise TrainingDiverged(
        f"non-finite {what} at step {attempt} (loss={loss}, grad_norm={grad_norm}): {reason}; no checkpoint of "
        f"this state was written" + (f", metrics in {run.out_dir / 'metrics.jsonl'}" if run.out_dir else "")
    )


def _train_loop(run: Run) -> dict:
    config = run.config
    tokens_per_step = config.batch_size * config.seq_len
    last_val_loss = None
    evaluating = run.val_indices is not None and config.eval_every > 0
    if evaluating and run.step == 0:
        run.initial_val_loss = last_val_loss = run.evaluate()
        run.log({"type": "eval", "step": 0, **run.val_record(last_val_loss)})
    elif evaluating and run.step == config.max_steps:  # resumed after the final checkpoint: no step left to take
        last_val_loss = run.evaluate()  # the final evaluation for the summary (metrics.jsonl kept its record)
    bar = tqdm(total=config.max_steps, initial=run.step, disable=not (config.progress and run.is_main),
               desc="smet-train", dynamic_ncols=True)
    window_tokens, window_time = 0, 0.0
    step_times: list[float] = []  # this process's step times, for the steady-state throughput
    while run.step < config.max_steps:
        run.stop_if_log_failed()
        run._synchronize()
        started = time.perf_counter()
        loss, grad_norm = run.train_step()
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            _handle_nonfinite(run, loss, grad_norm)
            continue
        run.consecutive_skips = 0
        probe_records, probe_time = [], 0.0  # --- update probe (issue 16), its time left out of the step time
        if run.probe is not None:
            # the optimizer step's kernels finish on the step's clock: the probe's first readback would wait for
            # them and leave their time out of the step (on every probed step: an inflated tokens_per_s)
            run._synchronize()
            probe_started = time.perf_counter()
            probe_records += run.probe.after_step()
            if run.is_probe_step(run.step):
                run.probe.before_update()
            probe_time += time.perf_counter() - probe_started
        update = run.controller.step() if run.controller is not None else None
        if run.probe is not None and run.is_probe_step(run.step):
            probe_started = time.perf_counter()
            probe_records += run.probe.after_update(run.step)
            probe_time += time.perf_counter() - probe_started
        run._synchronize()
        elapsed = time.perf_counter() - started - probe_time
        step = run.step
        run.train_time += elapsed
        step_times.append(elapsed)
        run.tokens_seen += tokens_per_step
        window_tokens += tokens_per_step
        window_time += elapsed
        run.last_loss = loss
        spikes = run.spikes.add_loss(step, loss)
        if update is not None:
            run.spikes.add_update(step)
        final = step == config.max_steps
        val_loss = None
        if run.val_indices is not None and config.eval_every > 0 and (step % config.eval_every == 0 or final):
            val_loss = last_val_loss = run.evaluate()
        if step % config.log_every == 0 or final:
            record = {
                "type": "train",
                "step": step,
                "loss": loss,
                "lr": run.optimizer.param_groups[0]["lr"],
                "tokens_per_s": window_tokens / window_time if window_time > 0 else None,
                "peak_mem_bytes": peak_memory_bytes(run.device)[0],
                "tokens": run.tokens_seen,
                "grad_norm": grad_norm,
            }
            window_tokens, window_time = 0, 0.0
            if val_loss is not None:
                record.update(run.val_record(val_loss))
            run.log(record)
        elif val_loss is not None:
            run.log({"type": "eval", "step": step, **run.val_record(val_loss)})
        if update is not None:
            layers = update.get("layers", {})
            run.log({
                "type": "topology_update",
                **{k: v for k, v in update.items() if k != "layers"},
                "pruned": sum(layer["pruned"] for layer in layers.values()),
                "regrown": sum(layer["regrown"] for layer in layers.values()),
                "layers": layers,
            })
        for spike in spikes:
            run.log({"type": "loss_spike", **spike, "step": step})
        for record in probe_records:
            run.log({**record, "step": step})
        if config.checkpoint_every and (step % config.checkpoint_every == 0 or final):
            run.save_checkpoint()
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
    bar.close()
    for spike in run.spikes.finish():
        run.log({"type": "loss_spike", **spike, "step": run.step})
    for record in run.probe.finish() if run.probe is not None else []:
        run.log({**record, "step": run.step})
    peak, peak_kind = peak_memory_bytes(run.device)
    summary = {
        "steps": run.step,
        "final_train_loss": run.last_loss,
        "initial_val_loss": run.initial_val_loss,
        "final_val_loss": last_val_loss,
        "final_val_ppl": perplexity(last_val_loss) if last_val_loss is not None else None,
        "final_val_bpb": run.val_record(last_val_loss)["val_bpb"] if last_val_loss is not None else None,
        "vocab_size": run.vocab_size,
        "tokens": run.tokens_seen,
        "train_time_s": run.train_time,
        "tokens_per_s": run.tokens_seen / run.train_time if run.train_time > 0 else None,
        "steady_tokens_per_s": tokens_per_step / statistics.median(step_times[1:]) if len(step_times) > 1 else None,
        "peak_mem_bytes": peak,
        "peak_mem_kind": peak_kind,
        "num_parameters": sum(p.numel() for p in run.model.parameters()),
        "topology_updates": len(run.controller.history) if run.controller is not None else 0,
        "nonfinite_skips": run.nonfinite_skips,
        "loss_spikes": run.spikes.summary(),
        "world_size": run.ddp.world_size,
        "rank": run.ddp.rank,
        "ranks_in_sync": run.ranks_in_sync(),
        "device": str(run.device),
        "block_size": config.resolved_block_size() if config.optimizer in SPARSE_OPTIMIZERS else None,
        "config": config.to_dict(),
    }
    if run.out_dir:
        run.stop_if_log_failed()
        on_rank0(run.ddp, lambda: _write_summary(run.out_dir, summary))  # a failed write stops every rank
    return summary


def _write_summary(out_dir: Path, summary: dict) -> None:
    try:
        write_summary(out_dir, summary)
    except OSError as error:
        raise TrainingFailed(f"could not write {str(out_dir / 'summary.json')!r}: {error}") from None
