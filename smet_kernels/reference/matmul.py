"""Pure-PyTorch references of the three block-sparse matmuls of a linear layer.

With ``W = to_dense(values, layout)`` (``[N, K]``), ``x [M, K]`` and ``dy [M, N]``:

* forward      ``y = x Wᵀ``
* grad_input   ``dx = dy W``
* grad_weight  ``dvalues[k] = dy[:, rows(k)]ᵀ · x[:, cols(k)]`` — only at active blocks, no dense ``dW``.

They accumulate in fp32 (like the kernels) and return the input dtype. They are the ground truth of the
tests and the CPU fallback of :func:`smet_kernels.block_sparse_linear`.
"""

from __future__ import annotations

import torch

from ..layout import BlockLayout

try:
    from torch.fx.experimental.symbolic_shapes import guard_or_false
except ImportError:  # torch < 2.8 (pyproject: >= 2.6): a run-time token count then fails to trace, as it did
    def guard_or_false(condition) -> bool:
        return bool(condition)

_GATHER_ELEMENTS = 1 << 24  # bound on the temporary of the chunked grad_weight gather


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dense(values: torch.Tensor, block_indices: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    b = values.shape[-1]
    idx = block_indices.to(values.device).long()
    blocks = values.new_zeros(shape[0] // b, shape[1] // b, b, b).index_put((idx[:, 0], idx[:, 1]), values)
    return blocks.permute(0, 2, 1, 3).reshape(shape)


def to_dense_reference(values: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Dense ``[out, in]`` weight with the blocks of ``values`` placed by ``layout.block_indices``."""
    return _dense(values, layout.block_indices, layout.shape)


def from_dense_reference(weight: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Compact ``[nnz, b, b]`` values: the active blocks of a dense ``[out, in]`` weight."""
    b = layout.block_size
    rows_b, cols_b = layout.block_shape
    idx = layout.block_indices.to(weight.device)
    blocks = weight.reshape(rows_b, b, cols_b, b).permute(0, 2, 1, 3)
    return blocks[idx[:, 0], idx[:, 1]].contiguous()


def torch_bsmm_forward(
    x: torch.Tensor, values: torch.Tensor, block_indices: torch.Tensor, out_features: int, bias=None
) -> torch.Tensor:
    """``y = x Wᵀ (+ bias)`` for ``x [M, K]``, slot ``k`` of ``values`` at block ``block_indices[k]``; ``x.dtype``."""
    ct = _compute_dtype(x.dtype)
    y = x.to(ct) @ _dense(values.to(ct), block_indices, (out_features, x.shape[1])).t()
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(x.dtype)


def torch_bsmm_grad_input(
    dy: torch.Tensor, values: torch.Tensor, block_indices: torch.Tensor, in_features: int
) -> torch.Tensor:
    """``dx = dy W`` for ``dy [M, N]``; returns ``[M, K]`` in ``dy.dtype``."""
    ct = _compute_dtype(dy.dtype)
    return (dy.to(ct) @ _dense(values.to(ct), block_indices, (dy.shape[1], in_features))).to(dy.dtype)


def torch_bsmm_grad_weight(
    dy: torch.Tensor, x: torch.Tensor, block_indices: torch.Tensor, block_size: int
) -> torch.Tensor:
    """``dvalues[k] = dy[:, rows(k)]ᵀ x[:, cols(k)]`` for every active slot; returns ``[nnz, b, b]``."""
    ct = _compute_dtype(x.dtype)
    b = block_size
    m, k = x.shape
    n = dy.shape[1]
    nnz = block_indices.shape[0]
    dy_blocks = dy.to(ct).reshape(m, n // b, b)  # [M, N/b, b] (explicit sizes: M may be 0)
    x_blocks = x.to(ct).reshape(m, k // b, b)  # [M, K/b, b]
    idx = block_indices.to(x.device).long()
    # from the power of two at or above M: traced with a dynamic token count, the chunk guards M's range (a recompile
    # per power of two), not its value (a recompile per token count, failing fullgraph at Dynamo's recompile limit);
    # a token count known only at run time (x[mask] under torch.compile) cannot be compared: the largest chunk
    tokens = 1
    while guard_or_false(tokens < m):
        tokens *= 2
    chunk = max(1, _GATHER_ELEMENTS // (tokens * b))
    # chunks bound the gathered temporaries; torch.cat (not writes into a buffer) keeps it differentiable
    out = [
        torch.bmm(dy_blocks[:, idx[s : s + chunk, 0]].permute(1, 2, 0),
                  x_blocks[:, idx[s : s + chunk, 1]].permute(1, 0, 2))
        for s in range(0, nnz, chunk)
    ]
    if not out:  # no active block (nnz = 0): as the kernel, an empty gradient, not torch.cat of no tensor
        return x.new_zeros(0, b, b)
    return (out[0] if len(out) == 1 else torch.cat(out)).to(x.dtype)
