"""Analytic memory model of one training step of the LLaMA model in :mod:`smet_kernels.train.model`.

Components (bytes), for ``T = batch · seq`` tokens, hidden ``h``, SwiGLU width ``i``, ``L`` layers, ``a`` heads,
vocab ``V``, element sizes ``e`` (parameters/activations), ``s`` (optimizer states):

* **weights**: dense parameters (embedding ``V h``, LM head ``h V``, norms ``(2L + 1) h``) plus the hidden
  linear layers — ``L (4h² + 3hi)`` dense, or ``Σ nnz_ℓ b²`` compact values for ``smet`` (+ per layout the
  ``int64 [nnz, 2]`` block indices, the packed ``int32`` kernel index of ``6 nnz + 2 R + 2 C + 2`` entries and an
  ``int64`` version, which live with the weights); ``masked`` keeps the same layouts (for its ``nnz``) and each mask
  expanded to ``[out, in]``;
* **gradients**: one gradient per parameter element (compact for ``smet``; dense for ``masked`` and ``galore``);
* **optimizer**: AdamW ``2 s`` per element; ``smet`` adds ``int32 block_step [nnz]``; ``galore`` keeps the
  moments of a hidden ``[m, n]`` weight in the projected space (``2 r max(m, n)``, ``r <= min(m, n)``) plus the
  projector ``r min(m, n)`` (in the parameter dtype);
* **activations** (tensors autograd saves for backward), per decoder layer
  ``T h (8 + 8 e) + 4 e T i + 4 B a S + 8 T`` — two RMSNorms (fp32 input, normed, output: ``2 (4 + 2e)``; fp32
  ``rsqrt`` per token: ``2 · 4``), SDPA's rotated q and k, v, output (``4e``; ``o_proj``'s input is a view of the
  output) and logsumexp (``4 B a S``), SwiGLU's gate, silu, up and product (``4e`` per ``i``); RoPE saves only its
  cos/sin tables, cast from fp32 once per forward and shared by every layer (``2 S (h/a) e`` in all; none in
  fp32); ``masked`` layers also save
  ``W ⊙ M`` (``4h² + 3hi`` per layer), and each ``smet`` product and ``W ⊙ M`` an ``int64`` layout-version
  snapshot. Plus the final norm ``(4 + 2e) T h + 4 T``, cross-entropy's fp32 log-softmax ``4 T V`` and the int64
  token ids and targets ``16 T``. With ``activation_checkpointing`` (``torch.utils.checkpoint`` per decoder layer) a
  layer saves only its inputs, ``T h e`` (and the shared cos/sin): its ``W ⊙ M`` and version snapshots exist
  only while it is recomputed (counted in ``rest``);
* **rest**: the largest working set of the backward pass beyond the four above, an estimate — the loss backward
  holds the fp32 log-probability gradient and the fp32 logits gradient (``8 T V``, exact in the traces of
  :mod:`profiling.memory_trace`), an RMSNorm backward three fp32 ``T × h`` tensors (``12 T h``), a SwiGLU
  backward three ``T × i`` gradients (``3 e T i``): ``max`` of the three; with activation checkpointing the
  SwiGLU term adds the activations of the one layer recomputed during its backward.

The measured split (:mod:`profiling.memory_breakdown`) keeps gradients allocated between steps
(``zero_grad(set_to_none=False)``), so the five components add up to the peak.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from smet_kernels.train.methods import BENCH_NAMES as METHODS
from smet_kernels.train.model import hidden_linear_shapes
COMPONENTS = ("weights", "gradients", "optimizer", "activations", "rest")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per component; :attr:`peak` is their sum."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    rest: int

    @property
    def peak(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.rest

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COMPONENTS} | {"peak": self.peak}


def element_size(dtype: torch.dtype | str) -> int:
    """Bytes per element of a torch dtype or its name (``"bf16"``, ``"float32"``...)."""
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or a name, got {type(dtype).__name__}")
    return torch.empty((), dtype=dtype).element_size()


_DTYPE_NAMES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def parse_dtype(name: str) -> torch.dtype:
    if name not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPE_NAMES)}, got {name!r}")
    return _DTYPE_NAMES[name]


def predict_memory(
    config,
    method: str,
    *,
    density: float = 1.0,
    block_size: int = 64,
    batch_size: int,
    seq_len: int,
    param_dtype: torch.dtype = torch.float32,
    state_dtype: torch.dtype | None = None,
    rank: int | None = None,
    distribution: str = "uniform",
    activation_checkpointing: bool = False,
) -> MemoryEstimate:
    """Predicted bytes per component of one training step of ``config`` trained with ``method``.

    ``method``: ``dense`` (AdamW), ``galore`` (low-rank projected AdamW, ``rank`` required), ``masked``
    (dense weights × block mask, dense gradients and states) or ``smet`` (compact values, gradients, states).
    ``state_dtype`` defaults to ``param_dtype`` (what ``torch.optim.AdamW`` allocates).
    ``activation_checkpointing``: each decoder layer saves only its input (recomputed in backward).
    """
    from smet_kernels.distribution import layer_densities
    from smet_kernels.layout import check_block_size, check_density, nnz_for_density

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    density = check_density(density)
    check_block_size(block_size)
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if method == "galore" and (rank is None or rank < 1):
        raise ValueError(f"rank must be a positive int for method 'galore', got {rank!r}")
    e = element_size(param_dtype)
    s = element_size(state_dtype if state_dtype is not None else param_dtype)
    h, i, L, V = config.hidden_size, config.intermediate_size, config.num_layers, config.vocab_size
    T = batch_size * seq_len

    shapes = hidden_linear_shapes(config)
    dense_other = 2 * V * h + (2 * L + 1) * h  # embedding, LM head, norms
    hidden_dense = sum(out_f * in_f for out_f, in_f in shapes.values())

    layout_bytes = 0
    if method in ("smet", "masked"):
        densities = layer_densities(shapes, density, distribution)
        nnz = {
            name: nnz_for_density((out_f // block_size) * (in_f // block_size), densities[name])
            for name, (out_f, in_f) in shapes.items()
        }
        # per layout: int64 block indices [nnz, 2], the packed int32 kernel index (block indices, CSR and CSC:
        # 6 nnz + 2 R + 2 C + 2 for R x C blocks) and the int64 version tensor
        layout_bytes = sum(
            nnz[name] * 2 * 8 + 4 * (6 * nnz[name] + 2 * (out_f + in_f) // block_size + 2) + 8
            for name, (out_f, in_f) in shapes.items()
        )
    if method == "smet":
        hidden_elements = sum(nnz.values()) * block_size * block_size
        weights = (dense_other + hidden_elements) * e + layout_bytes
        gradients = (dense_other + hidden_elements) * e
        optimizer = 2 * (dense_other + hidden_elements) * s + sum(nnz.values()) * 4
    elif method == "galore":
        weights = (dense_other + hidden_dense) * e
        gradients = weights
        projected = 0
        for out_f, in_f in shapes.values():
            r = min(rank, out_f, in_f)  # the SVD yields at most min(m, n) singular vectors
            projected += 2 * r * max(out_f, in_f) * s + r * min(out_f, in_f) * e
        optimizer = 2 * dense_other * s + projected
    else:
        mask = hidden_dense * e if method == "masked" else 0  # the expanded [out, in] mask, in the weight dtype
        weights = (dense_other + hidden_dense) * e + mask + layout_bytes
        gradients = (dense_other + hidden_dense) * e
        optimizer = 2 * (dense_other + hidden_dense) * s

    per_layer = T * h * (8 + 8 * e) + 4 * e * T * i + 4 * batch_size * config.num_heads * seq_len + 8 * T
    rope = 2 * seq_len * (h // config.num_heads) * e if e != 4 else 0  # cos/sin cast once, shared by every layer
    masked_weights = hidden_dense * e if method == "masked" else 0  # the W ⊙ M each masked linear saves
    # each block-sparse product's (each W ⊙ M's) int64 layout-version snapshot
    versions = 8 * len(shapes) if method in ("smet", "masked") else 0
    head = (4 + 2 * e) * T * h + 4 * T + 4 * T * V + 16 * T
    if activation_checkpointing:
        activations = L * T * h * e + rope + head
        recomputed = per_layer + (masked_weights + versions) // L
        rest = max(8 * T * V, 12 * T * h, 3 * e * T * i + recomputed)
    else:
        activations = L * per_layer + rope + head + masked_weights + versions
        rest = max(8 * T * V, 12 * T * h, 3 * e * T * i)
    return MemoryEstimate(int(weights), int(gradients), int(optimizer), int(activations), int(rest))
