"""smet_kernels: block-sparse Triton kernels and a reference trainer for dynamic sparse training of LLMs."""

from .backend import get_backend, set_backend
from .distribution import layer_densities
from .functional import block_sparse_linear, from_dense, to_dense
from .layout import BlockLayout
from .modules import BlockSparseLinear, sparsify

__all__ = [
    "BlockLayout",
    "BlockSparseLinear",
    "block_sparse_linear",
    "from_dense",
    "get_backend",
    "layer_densities",
    "set_backend",
    "sparsify",
    "to_dense",
]
__version__ = "0.1.0"
