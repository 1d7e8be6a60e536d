"""Multi-process setup of the trainer: the process group from ``torchrun``'s environment (``nccl`` on CUDA, ``gloo``
on CPU), the device of each rank, FSDP2 sharding of the model and the conversions between full (single-process)
and sharded state dicts."""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .. import backend as backend_module
from ..sharding import full, is_sharded, shard_like
from .config import ConfigError, setting
from .model import LlamaModel

T = TypeVar("T")


class TrainingFailed(RuntimeError):
    """A failure while training (a file that could not be written, another rank's failure); the CLI prints it as a
    one-line error (exit code 1)."""


@dataclass
class DistInfo:
    """This process's place among the data-parallel ranks (one rank when not under torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(value)
            value = value / self.world_size
        return value


LAUNCH = "launch the ranks with torchrun (it sets RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)"
LAUNCH_HINT = f"{LAUNCH}, or unset WORLD_SIZE"


def _environ_int(name: str, default: str | None = None) -> int:
    """The int in the environment variable ``name`` (``default`` when unset); else a one-line ConfigError."""
    value = os.environ.get(name, default)
    if value is None:
        raise ConfigError(f"the WORLD_SIZE environment variable is {os.environ['WORLD_SIZE']}, but {name} is not set: "
                          f"{LAUNCH_HINT}")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"the {name} environment variable must be an int, got {value!r}: {LAUNCH_HINT}") from None


def init_distributed(device_name: str) -> DistInfo:
    """This process's rank from torchrun's environment, the process group initialised (unless the caller did);
    an environment torchrun would not give (``WORLD_SIZE`` > 1 without ``RANK`` or ``MASTER_ADDR``) is a one-line
    :class:`ConfigError`."""
    world_size = _environ_int("WORLD_SIZE", "1")
    if world_size <= 1:
        if "WORLD_SIZE" not in os.environ and dist.is_available() and dist.is_initialized() \
                and dist.get_world_size() > 1:  # e.g. mp.spawn: every process would write the run as rank 0
            raise ConfigError(f"a process group of {dist.get_world_size()} ranks is initialised, but WORLD_SIZE is not "
                              f"set: {LAUNCH}")
        return DistInfo()
    rank, local_rank = _environ_int("RANK"), _environ_int("LOCAL_RANK", "0")
    use_cuda = torch.cuda.is_available() and not device_name.startswith("cpu")
    initialised_here = False
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        except ValueError as error:  # the env:// rendezvous without MASTER_ADDR or MASTER_PORT
            raise ConfigError(f"{error}: {LAUNCH_HINT}") from None
        initialised_here = True
    return DistInfo(rank, world_size, local_rank, initialised_here)


@contextlib.contextmanager
def group_destroyed_on_failure():
    """A process group that the block starts is destroyed when the block raises (a setting every rank refuses after
    :func:`init_distributed`): NCCL warns at exit of a group never destroyed, and an in-process caller's next run
    would find the stale group."""
    started_before = dist.is_available() and dist.is_initialized()
    try:
        yield
    except BaseException:
        if not started_before and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        raise


def on_rank0(ddp: DistInfo, work: Callable[[], T]) -> T | None:
    """``work()`` on rank 0 alone (None on the others); under torch.distributed its outcome is then broadcast (one
    collective every rank waits in), so that a failure stops every rank: rank 0 raises its error, the others a
    one-line error of the same kind (:class:`ConfigError`, else :class:`TrainingFailed`) naming it -- not a gloo
    'Connection closed by peer' traceback, or a hang until the NCCL timeout, in their next collective."""
    result, error = None, None
    if ddp.rank == 0:
        try:
            result = work()
        except Exception as caught:  # whatever it is, the other ranks must hear of it
            error = caught
    if ddp.enabled:
        outcome = [None if error is None else (isinstance(error, ConfigError), str(error) or type(error).__name__)]
        dist.broadcast_object_list(outcome, src=0)
        if ddp.rank != 0 and outcome[0] is not None:
            bad_input, message = outcome[0]
            raise (ConfigError if bad_input else TrainingFailed)(f"rank 0 failed: {message}")
    if error is not None:
        raise error
    return result


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel`` over ``model`` without a buffer broadcast at each forward (its only buffers, the
    RoPE tables, are the same on every rank). torch 2.13 renamed ``broadcast_buffers`` to ``forward_sync_buffers``
    and warns on every use of the old name."""
    renamed = "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        **{"forward_sync_buffers" if renamed else "broadcast_buffers": False},
    )


def resolve_device(name: str, ddp: DistInfo) -> torch.device:
    """The run's device (:func:`smet_kernels.backend.resolve_device`); under DDP/FSDP each rank takes the GPU of its
    local rank."""
    try:
        device = backend_module.resolve_device(name, setting("device"))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if device.type == "cuda":
        device = torch.device("cuda", ddp.local_rank if ddp.enabled else (device.index or 0))
        torch.cuda.set_device(device)
    return device


def shard_model(model: LlamaModel, device: torch.device) -> LlamaModel:
    """FSDP2: ``fully_shard`` each decoder layer, then the root (embedding, final norm, head), over all ranks of the
    default process group on ``device``'s type (explicit: FSDP2's default mesh would pick CUDA whenever it exists).
    Every parameter becomes a ``DTensor`` sharded on dim 0; the layouts stay attached to the sharded values."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def reshard(model: nn.Module) -> None:
    """Free the unsharded parameters FSDP2 keeps after a forward without backward (the root's, after eval)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_state(value, keep: bool):
    """``value`` (a state-dict tree) with every DTensor gathered to a full CPU tensor (collectives on every rank);
    the result is kept only where ``keep`` (rank 0), other ranks get None."""
    if isinstance(value, dict):
        out = {key: full_state(item, keep) for key, item in value.items()}
        return out if keep else None
    if isinstance(value, list):
        out = [full_state(item, keep) for item in value]
        return out if keep else None
    if is_sharded(value):
        gathered = full(value)
        return gathered.cpu() if keep else None
    return value


def sharded_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> dict:
    """A full (single-process format) optimizer state dict cut into this rank's shards: each state tensor of a
    sharded parameter whose dim 0 is the parameter's (moments, ``block_step``) becomes a DTensor placed like it."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved_ids = [i for group in saved["param_groups"] for i in group["params"]]
    if len(params) != len(saved_ids):
        raise ConfigError(f"checkpoint optimizer has {len(saved_ids)} parameters, this model {len(params)}")
    state = {}
    for saved_id, param in zip(saved_ids, params):
        entry = saved["state"].get(saved_id)
        if entry is None:
            continue
        state[saved_id] = {
            key: shard_like(value, param)
            if is_sharded(param) and isinstance(value, torch.Tensor) and value.dim() >= 1
            and value.shape[0] == param.shape[0] else value
            for key, value in entry.items()
        }
    return {**saved, "state": state}
