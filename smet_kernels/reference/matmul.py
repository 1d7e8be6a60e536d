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

_GATHER_ELEMENTS = 1 << 24  # bound on the temporary of the chunked grad_weight gather


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_dense_reference(values: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Dense ``[out, in]`` weight with the blocks of ``values`` placed by ``layout.block_indices``."""
    b = layout.block_size
    rows_b, cols_b = layout.block_shape
    idx = layout.block_indices.to(values.device)
    blocks = values.new_zeros(rows_b, cols_b, b, b).index_put((idx[:, 0], idx[:, 1]), values)
    return blocks.permute(0, 2, 1, 3).reshape(layout.shape)


def from_dense_reference(weight: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Compact ``[nnz, b, b]`` values: the active blocks of a dense ``[out, in]`` weight."""
    b = layout.block_size
    rows_b, cols_b = layout.block_shape
    idx = layout.block_indices.to(weight.device)
    blocks = weight.reshape(rows_b, b, cols_b, b).permute(0, 2, 1, 3)
    return blocks[idx[:, 0], idx[:, 1]].contiguous()


def bsmm_forward_reference(
    x: torch.Tensor, values: torch.Tensor, layout: BlockLayout, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``y = x Wᵀ (+ bias)`` for ``x [M, K]``; returns ``[M, N]`` in ``x.dtype``."""
    ct = _compute_dtype(x.dtype)
    y = x.to(ct) @ to_dense_reference(values.to(ct), layout).t()
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(x.dtype)


def bsmm_grad_input_reference(dy: torch.Tensor, values: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """``dx = dy W`` for ``dy [M, N]``; returns ``[M, K]`` in ``dy.dtype``."""
    ct = _compute_dtype(dy.dtype)
    return (dy.to(ct) @ to_dense_reference(values.to(ct), layout)).to(dy.dtype)


def bsmm_grad_weight_reference(dy: torch.Tensor, x: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """``dvalues[k] = dy[:, rows(k)]ᵀ x[:, cols(k)]`` for every active slot; returns ``[nnz, b, b]``."""
    ct = _compute_dtype(x.dtype)
    b = layout.block_size
    m = x.shape[0]
    n, k = layout.shape
    dy_blocks = dy.to(ct).reshape(m, n // b, b)  # [M, N/b, b] (explicit sizes: M may be 0)
    x_blocks = x.to(ct).reshape(m, k // b, b)  # [M, K/b, b]
    idx = layout.block_indices.to(x.device)
    out = torch.empty(layout.nnz, b, b, dtype=ct, device=x.device)
    chunk = max(1, _GATHER_ELEMENTS // max(1, m * b))
    for start in range(0, layout.nnz, chunk):
        rows = idx[start : start + chunk, 0]
        cols = idx[start : start + chunk, 1]
        out[start : start + chunk] = torch.bmm(
            dy_blocks[:, rows].permute(1, 2, 0), x_blocks[:, cols].permute(1, 0, 2)
        )
    return out.to(x.dtype)
