"""smet_kernels: block-sparse Triton kernels and a reference trainer for dynamic sparse training of LLMs."""

from .backend import get_backend, set_backend
from .layout import BlockLayout

__all__ = ["BlockLayout", "get_backend", "set_backend"]
__version__ = "0.1.0"
