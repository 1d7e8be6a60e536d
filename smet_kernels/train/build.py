"""Model, optimizer and topology-controller factories of the trainer, one per :class:`TrainConfig`."""

from __future__ import annotations

import torch
from torch import nn

from ..optim.galore import GALORE_DEFAULT_RANK, GaLoreAdamW, galore_param_groups
from ..topology import SMET
from .config import SMET_ADAMW_ARMS, SPARSE_OPTIMIZERS, TrainConfig
from .model import HIDDEN_LINEAR_NAMES, LlamaModel, model_config

HIDDEN_LINEAR_PATTERN = r"\.(" + "|".join(HIDDEN_LINEAR_NAMES) + r")$"


def build_model(config: TrainConfig, vocab_size: int, device: torch.device) -> nn.Module:
    """The LLaMA model of ``config`` on ``device``; hidden linears made sparse in the sparse modes; decoder layers
    recomputed in backward with ``activation_checkpointing``."""
    block_size = config.resolved_block_size()
    sparse = config.optimizer in SPARSE_OPTIMIZERS
    shape = model_config(config.model, vocab_size, block_size if sparse else None, max_seq_len=config.seq_len)
    dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
    torch.manual_seed(config.seed)
    model = LlamaModel(shape, device=device, dtype=dtype)
    model.activation_checkpointing = config.activation_checkpointing
    generator = torch.Generator().manual_seed(config.seed + 1)
    backend = None if config.backend == "auto" else config.backend
    if config.optimizer in SMET_ADAMW_ARMS:
        from ..modules import sparsify

        sparsify(model, config.density, block_size=block_size, distribution=config.distribution,
                 include=HIDDEN_LINEAR_PATTERN, generator=generator, backend=backend)
    elif config.optimizer == "masked-dst":
        from ..masked import masked_sparsify

        masked_sparsify(model, config.density, block_size=block_size, distribution=config.distribution,
                        include=HIDDEN_LINEAR_PATTERN, generator=generator)
    if config.supar:
        from ..supar import supar_init_

        supar_init_(model, base_std=shape.init_std, width=shape.hidden_size, base_width=config.supar_base_width,
                    generator=generator)
    return model



def build_optimizer(config: TrainConfig, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    common = dict(lr=config.lr, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay)
    params: list | list[dict] = [p for p in model.parameters() if p.requires_grad]
    if config.supar:
        from ..supar import supar_param_groups

        params = supar_param_groups(model, config.lr, width=model.config.hidden_size,
                                    base_width=config.supar_base_width)
    if config.optimizer in ("adamw", "masked-dst"):
        return torch.optim.AdamW(params, fused=device.type == "cuda", **common)
    if config.optimizer == "galore":
        rank = config.galore_rank or GALORE_DEFAULT_RANK[config.model]
        return GaLoreAdamW(
            galore_param_groups(model, rank, config.galore_update_gap, config.galore_scale), **common
        )
    from ..optim.smet_adamw import SMETAdamW

    backend = None if config.backend == "auto" else config.backend
    return SMETAdamW(params, **smet_adamw_options(config), backend=backend, **common)


def smet_adamw_options(config: TrainConfig) -> dict:
    """The :class:`SMETAdamW` options of the config's arm (issue 16): warm-up, bias correction, α, warm-up scope."""
    warmup, bias_correction, _, _ = SMET_ADAMW_ARMS[config.optimizer]
    return dict(
        warmup=config.warmup_mode if warmup == "config" else warmup,
        warmup_steps=config.optimizer_warmup_steps,
        warmup_scope=config.warmup_scope,
        density_lr_exponent=config.resolved_density_lr_exponent(),
        bias_correction=bias_correction,
    )


def build_controller(config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer):
    if config.optimizer not in SPARSE_OPTIMIZERS:
        return None
    return SMET(
        model,
        optimizer,
        update_interval=config.update_interval,
        prune_fraction=config.prune_fraction,
        total_steps=config.max_steps,
        regrow=config.regrow,
        seed=config.seed,
    )

