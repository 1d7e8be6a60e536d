"""The parts of a training run, one per :class:`TrainConfig`: its data (the setup's checks first), then model,
optimizer and topology controller (the method factories of :mod:`.methods` given the config's settings)."""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import nn

from .. import backend as backend_module
from ..optim.galore import GALORE_DEFAULT_RANK
from . import methods
from .config import ConfigError, TrainConfig, setting
from .data import Corpus, DataError, DataWarning, PackedBatches, eval_windows, load_corpus, num_windows
from .methods import HIDDEN_LINEAR_PATTERN
from .model import model_config

__all__ = ["HIDDEN_LINEAR_PATTERN", "RunData", "build_controller", "build_model", "build_optimizer", "prepare_data",
           "smet_adamw_options"]


class RunData(NamedTuple):
    corpus: Corpus
    batches: PackedBatches
    val_indices: torch.Tensor | None  # the evaluation windows' starts; None without evaluation


def prepare_data(config: TrainConfig, device: torch.device, world_size: int = 1) -> RunData:
    """The checks of a run's setup before its model is built, each refusal a one-line :class:`ConfigError` naming
    the setting: the backend available on ``device``, ``batch_size`` divisible by ``grad_accum`` x ``world_size``
    (before the data is read), the data readable, enough training tokens for a batch and validation tokens for the
    evaluation windows (none read, and no windows, for a run with neither evaluation nor update probe)."""
    if config.backend == "triton":
        try:
            backend_module.resolve_backend(device, "triton")
        except ValueError as error:
            raise ConfigError(f"{setting('backend')}: {error}") from None
    # before the data: reading it may train a BPE tokenizer or download a dataset (minutes)
    if config.batch_size % (config.grad_accum * world_size) != 0:
        raise ConfigError(f"{setting('batch_size')} ({config.batch_size}) must be divisible by {setting('grad_accum')} "
                          f"x world size ({config.grad_accum} x {world_size})")
    try:
        corpus = load_corpus(config.data, tokenizer=config.tokenizer)
    except DataError as error:
        raise ConfigError(f"{setting('data')}: {error}") from None
    try:
        batches = PackedBatches(corpus.train, config.seq_len, config.batch_size, config.seed)
    except DataError as error:
        raise ConfigError(f"{setting('data')} {config.data!r}: {error}: lower {setting('seq_len')} or "
                          f"{setting('batch_size')}, or give more data") from None
    try:
        # the validation windows feed the evaluation and the update probe: a run with neither reads no validation
        val_count = config.eval_batches * config.batch_size if config.eval_every or config.update_probe else 0
        available = num_windows(corpus.val, config.seq_len)
        if val_count > available > 0:  # spread evenly, some windows then count twice in the mean (none: refused)
            most = available // config.batch_size
            warnings.warn(f"{setting('eval_batches')} {config.eval_batches} x {setting('batch_size')} "
                          f"{config.batch_size} = {val_count} evaluation windows, but the validation split holds "
                          f"{available}: some are evaluated more than once ("
                          + (f"{setting('eval_batches')} {most} or fewer sees each once)" if most else
                             "even one batch repeats some)"), DataWarning, stacklevel=2)  # fmt: skip
        return RunData(corpus, batches, eval_windows(corpus.val, config.seq_len, val_count) if val_count else None)
    except DataError as error:
        raise ConfigError(f"{setting('data')} {config.data!r}: {error}: lower {setting('seq_len')}, or give more "
                          "data") from None


def build_model(config: TrainConfig, vocab_size: int, device: torch.device) -> nn.Module:
    """The LLaMA model of ``config`` on ``device``; hidden linears made sparse in the sparse modes; decoder layers
    recomputed in backward with ``activation_checkpointing``."""
    block_size = config.resolved_block_size()
    sparse = methods.METHODS[config.optimizer].sparse
    shape = model_config(config.model, vocab_size, block_size if sparse else None, max_seq_len=config.seq_len)
    generator = torch.Generator().manual_seed(config.seed + 1)
    model = methods.build_model(
        shape, config.optimizer, density=config.density, block_size=block_size,
        dtype=torch.bfloat16 if config.precision == "bf16" else torch.float32, device=device,
        backend=None if config.backend == "auto" else config.backend, distribution=config.distribution,
        seed=config.seed, generator=generator,
    )  # fmt: skip
    model.activation_checkpointing = config.activation_checkpointing
    if config.supar:
        from ..supar import supar_init_

        supar_init_(model, base_std=shape.init_std, width=shape.hidden_size, base_width=config.supar_base_width,
                    generator=generator)
    return model


def build_optimizer(config: TrainConfig, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    params = None
    if config.supar:
        from ..supar import supar_param_groups

        params = supar_param_groups(model, config.lr, width=model.config.hidden_size,
                                    base_width=config.supar_base_width)
    arm = methods.METHODS[config.optimizer].arm
    galore = dict(rank=config.galore_rank or GALORE_DEFAULT_RANK[config.model],
                  update_proj_gap=config.galore_update_gap, scale=config.galore_scale)
    return methods.build_optimizer(
        config.optimizer, model, params, fused=device.type == "cuda",
        backend=None if config.backend == "auto" else config.backend, galore=galore,
        smet_adamw=smet_adamw_options(config) if arm else None,
        lr=config.lr, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay,
    )  # fmt: skip


def smet_adamw_options(config: TrainConfig) -> dict:
    """The :class:`SMETAdamW` options of the config's arm (issue 16): warm-up, bias correction, α, warm-up scope."""
    arm = methods.METHODS[config.optimizer].arm
    return dict(
        warmup=config.warmup_mode if arm.warmup == "config" else arm.warmup,
        warmup_steps=config.optimizer_warmup_steps,
        warmup_scope=config.warmup_scope,
        density_lr_exponent=config.resolved_density_lr_exponent(),
        bias_correction=arm.bias_correction,
    )


def build_controller(config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer):
    return methods.build_controller(
        config.optimizer, model, optimizer, update_interval=config.update_interval,
        prune_fraction=config.prune_fraction, min_prune_fraction=config.min_prune_fraction,
        end_step=config.update_end_step, total_steps=config.max_steps, regrow=config.regrow,
        regrow_init=config.regrow_init, init_std=config.regrow_init_std, seed=config.seed,
    )  # fmt: skip
