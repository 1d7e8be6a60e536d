"""Regrow initialisation: write the values of newly grown blocks and reset their optimizer state, in one launch.

For every regrown slot ``k = slots[i]`` (SPEC §2)::

    values[k] = 0  (init="zeros")   |   values[k] = init_std * N(0, 1)  (init="normal")
    exp_avg[k] = exp_avg_sq[k] = 0,   block_step[k] = 0

One program per (regrown slot, tile of ``TILE`` elements of the ``b x b`` block, :func:`.launch_config.regrow_tile`);
the tile-0 program resets the slot's step. Normal draws are made by :func:`smet_kernels.ops.library.regrow_blocks`
before it dispatches to this kernel or to :func:`smet_kernels.reference.regrow.torch_regrow_blocks`, so both write
identical values. The state tensors are optional: pass None when the optimizer holds no state for the parameter yet.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..layout import check_generator
from .adamw import check_finite
from .launch_config import REGROW_NUM_WARPS, regrow_tile
from .rounding import downcast

INIT_MODES = ("zeros", "normal")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def regrow_blocks_kernel(
    values_ptr,
    new_values_ptr,
    exp_avg_ptr,
    exp_avg_sq_ptr,
    block_step_ptr,
    slots_ptr,
    block_numel,
    HAS_NEW_VALUES: tl.constexpr,
    HAS_EXP_AVG: tl.constexpr,
    HAS_EXP_AVG_SQ: tl.constexpr,
    HAS_BLOCK_STEP: tl.constexpr,
    TILE: tl.constexpr,
):
    index = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    slot = tl.load(slots_ptr + index)
    offs = tile * TILE + tl.arange(0, TILE)
    mask = offs < block_numel
    dst = slot * block_numel + offs
    if HAS_NEW_VALUES:
        new_values = tl.load(new_values_ptr + index * block_numel + offs, mask=mask, other=0.0)
    else:
        new_values = tl.zeros((TILE,), dtype=tl.float32)
    tl.store(values_ptr + dst, downcast(new_values, values_ptr.dtype.element_ty), mask=mask)
    if HAS_EXP_AVG:
        tl.store(exp_avg_ptr + dst, tl.zeros((TILE,), dtype=exp_avg_ptr.dtype.element_ty), mask=mask)
    if HAS_EXP_AVG_SQ:
        tl.store(exp_avg_sq_ptr + dst, tl.zeros((TILE,), dtype=exp_avg_sq_ptr.dtype.element_ty), mask=mask)
    if HAS_BLOCK_STEP:
        if tile == 0:
            tl.store(block_step_ptr + slot, 0)


def _check_state(name: str, state: torch.Tensor | None, values: torch.Tensor) -> None:
    if state is None:
        return
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(state).__name__}")
    if state.shape != values.shape:
        raise ValueError(f"{name} has shape {tuple(state.shape)} but values has {tuple(values.shape)}")
    if state.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float tensor, got {state.dtype}")
    if state.device != values.device or not state.is_contiguous():
        raise ValueError(f"{name} must be a contiguous tensor on {values.device}")


def check_inputs(values, slots, exp_avg, exp_avg_sq, block_step, init, init_std, generator) -> None:
    """Raise ``ValueError``/``TypeError`` naming the first invalid argument of a regrow."""
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
    if values.dim() != 3 or values.shape[1] != values.shape[2]:
        raise ValueError(f"values must have shape [nnz, b, b], got {tuple(values.shape)}")
    if values.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"values must be one of {_FLOAT_DTYPES}, got {values.dtype}")
    if not values.is_contiguous():
        raise ValueError("values must be contiguous")
    if not isinstance(slots, torch.Tensor):
        raise TypeError(f"slots must be a LongTensor, got {type(slots).__name__}")
    if slots.dtype not in (torch.int64, torch.int32) or slots.dim() != 1:
        raise TypeError(f"slots must be a 1-D int64/int32 tensor, got {slots.dtype} of shape {tuple(slots.shape)}")
    if slots.device != values.device:
        raise ValueError(f"slots is on {slots.device} but values is on {values.device}")
    if slots.numel():
        low, high = int(slots.min()), int(slots.max())
        if low < 0 or high >= values.shape[0]:
            raise ValueError(f"slots must lie in [0, {values.shape[0]}), got range [{low}, {high}]")
        if torch.unique(slots).numel() != slots.numel():
            raise ValueError("slots must not repeat")
    _check_state("exp_avg", exp_avg, values)
    _check_state("exp_avg_sq", exp_avg_sq, values)
    if block_step is not None:
        if not isinstance(block_step, torch.Tensor) or block_step.dtype != torch.int32:
            raise TypeError("block_step must be an int32 tensor or None")
        if block_step.shape != (values.shape[0],) or block_step.device != values.device:
            raise ValueError(f"block_step must have shape [{values.shape[0]}] on {values.device}")
        if not block_step.is_contiguous():
            raise ValueError("block_step must be contiguous")
    if init not in INIT_MODES:
        raise ValueError(f"init must be one of {INIT_MODES}, got {init!r}")
    check_finite(init_std, "init_std")
    check_generator(generator)


def triton_regrow_blocks(values, slots, new_values=None, exp_avg=None, exp_avg_sq=None, block_step=None) -> None:
    """Write ``new_values [n, b, b]`` (or zeros) into ``values[slots]`` and reset the slots' state, in one launch
    (arguments checked by :func:`check_inputs`)."""
    block_numel = values.shape[1] * values.shape[2]
    tile = regrow_tile(max(block_numel, 1))
    grid = (slots.numel(), max(1, triton.cdiv(block_numel, tile)))  # b = 0: a tile-0 program still resets the step
    with torch.cuda.device(values.device) if values.device.type == "cuda" else contextlib.nullcontext():
        regrow_blocks_kernel[grid](
            values,
            new_values if new_values is not None else values,
            exp_avg if exp_avg is not None else values,
            exp_avg_sq if exp_avg_sq is not None else values,
            block_step if block_step is not None else slots,
            slots.to(torch.int64).contiguous(),
            block_numel,
            HAS_NEW_VALUES=new_values is not None,
            HAS_EXP_AVG=exp_avg is not None,
            HAS_EXP_AVG_SQ=exp_avg_sq is not None,
            HAS_BLOCK_STEP=block_step is not None,
            TILE=tile,
            num_warps=REGROW_NUM_WARPS,
        )
