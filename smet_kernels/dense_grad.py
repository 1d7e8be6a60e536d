"""The dense-gradient probe of RigL (:class:`smet_kernels.topology.SMET` with ``regrow="gradient"``): a layer's
output passed through :class:`RecordDenseGrad` leaves ``y`` unchanged and accumulates ``probe.grad += dyᵀx``, the
dense weight gradient, into a zero probe that costs one element (:func:`zero_probe`)."""

from __future__ import annotations

import torch


def zero_probe(shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """A zero fp32 leaf of ``shape`` that requires grad, stored as one element (zero strides): its ``grad`` is a
    dense ``[out, in]`` tensor, the probe itself costs no memory."""
    return torch.zeros(1, device=device).expand(shape).detach().requires_grad_()


class RecordDenseGrad(torch.autograd.Function):
    """``y`` unchanged (bitwise, ``-0.0`` and non-finite ``x`` too) in forward; in backward ``dy`` passes on and the
    probe's gradient is ``dyᵀx`` (fp32). ``x`` is saved in its own dtype: the layer saves it anyway, so recording
    keeps no fp32 copy of each layer's input (``y + x.float()·probeᵀ`` did, doubling a bf16 model's activations)."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, x: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return output.clone()  # a view of the input would refuse in-place ops on the layer's output

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (x,) = ctx.saved_tensors
        with torch.autocast(dy.device.type, enabled=False):  # fp32 dyᵀx even where backward runs under autocast
            grad = dy.detach().reshape(-1, dy.shape[-1]).float().t() @ x.reshape(-1, x.shape[-1]).float()
        return dy, None, grad
