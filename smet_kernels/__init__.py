"""smet_kernels: block-sparse Triton kernels and a reference trainer for dynamic sparse training of LLMs."""

from .backend import get_backend, set_backend
from .distribution import layer_densities
from .functional import block_sparse_linear, from_dense, to_dense
from .layout import BlockLayout
from .masked import MaskedLinear, masked_sparsify
from .modules import BlockSparseLinear, densify, sparsify
from .ops.library import regrow_blocks
from .optim.smet_adamw import SMETAdamW
from .supar import supar_init_, supar_init_std, supar_lr, supar_param_groups
from .topology import SMET

__all__ = [
    "BlockLayout",
    "BlockSparseLinear",
    "MaskedLinear",
    "SMET",
    "SMETAdamW",
    "block_sparse_linear",
    "densify",
    "from_dense",
    "get_backend",
    "layer_densities",
    "masked_sparsify",
    "regrow_blocks",
    "set_backend",
    "sparsify",
    "supar_init_",
    "supar_init_std",
    "supar_lr",
    "supar_param_groups",
    "to_dense",
]
__version__ = "0.1.0"
