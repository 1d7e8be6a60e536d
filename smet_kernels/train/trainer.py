"""Reference SMET trainer: ``train(TrainConfig(...)) -> summary dict`` (the ``smet-train`` CLI wraps it).

The public entry points, gathered from the modules that hold them (one job each):

* :mod:`.config` -- :class:`TrainConfig`, :class:`ConfigError`, the option vocabularies;
* :mod:`.distributed` -- process group, devices, FSDP2 sharding;
* :mod:`.checkpoint` -- atomic checkpoint folders, :func:`find_checkpoint`, :func:`load_checkpoint_config`;
* :mod:`.methods` -- the training methods (:data:`~.methods.METHODS`) and their model/optimizer factories;
* :mod:`.build` -- the trainer's model, optimizer and topology controller of one config;
* :mod:`.loop` -- one optimizer step, evaluation, :func:`train` (the run's outputs are described there);
* :mod:`.metrics` -- ``metrics.jsonl``, ``summary.json``, peak memory.
"""

from .build import HIDDEN_LINEAR_PATTERN, build_controller, build_model, build_optimizer, smet_adamw_options
from .checkpoint import find_checkpoint, load_checkpoint_config
from .config import (
    CHECKPOINT_FORMATS,
    FIXED_ON_RESUME,
    NONFINITE_ACTIONS,
    OPTIMIZERS,
    PARALLEL_MODES,
    PRECISIONS,
    SPARSE_OPTIMIZERS,
    WARMUP_SCOPES,
    ConfigError,
    TrainConfig,
)
from .distributed import TrainingFailed, shard_model
from .loop import MIN_LR_RATIO, Run, TrainingDiverged, lr_factor, train
from .metrics import peak_memory_bytes

__all__ = [
    "CHECKPOINT_FORMATS", "FIXED_ON_RESUME", "HIDDEN_LINEAR_PATTERN", "MIN_LR_RATIO", "NONFINITE_ACTIONS",
    "OPTIMIZERS", "PARALLEL_MODES", "PRECISIONS", "SPARSE_OPTIMIZERS", "WARMUP_SCOPES",
    "ConfigError", "Run", "TrainConfig", "TrainingDiverged", "TrainingFailed", "build_controller", "build_model",
    "build_optimizer", "find_checkpoint", "load_checkpoint_config", "lr_factor", "peak_memory_bytes", "shard_model",
    "smet_adamw_options", "train",
]
