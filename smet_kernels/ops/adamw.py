"""Fused SMET AdamW step: one Triton launch updates every tensor of a parameter group (multi-tensor apply).

Per element of value slot ``k`` (SPEC §2; local step ``t_k`` incremented first, ``s`` = ``t_k`` or the global step)::

    m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2,   m_hat = m / (1 - b1^s),   v_hat = v / (1 - b2^s)
    w = min(t_k / W, 1) (linear) | m <- m min(t_k / W, 1) stored (momentum_ramp) | 1 (none)
    theta = theta - lr_l (w m_hat / (sqrt(v_hat) + eps) + weight_decay theta)

Scheme. The launcher groups the tensors of one call by (device, parameter dtype, state dtype) and builds, per
group, three device tables: ``pointers [T, 5]`` (int64 addresses of param, grad, exp_avg, exp_avg_sq, block_step;
0 = dense tensor without slots), ``sizes [T, 2]`` (numel, elements per slot) and ``work [P, 3]`` (tensor, first
slot, end slot): each program owns whole slots, so it alone reads and bumps their ``block_step``. The kernel casts
the addresses to typed pointers (this works under the Triton interpreter too). The ``sizes`` and ``work`` tables
are cached while the tensors' shapes stay the same, the pointer table while their addresses do (gradients freed by
``zero_grad(set_to_none=True)`` may come back elsewhere: one small table then, not a loop over every tensor's
slots); a small ``scalars [T, 3]`` table (effective lr, global step for the
bias correction, 0 = local; warm-up factor of a dense tensor, ``min(step / W, 1)`` or 1) is rebuilt every call
(pinned, asynchronous copy on CUDA; the host-built tables rule out CUDA-graph capture). A dense tensor is cut into
pseudo-slots of ``ADAMW_ELEMENTS_PER_PROGRAM`` elements and takes the AdamW update with its global step (warmed up by
that step when ``dense_warmups[i]``: the whole tensor shares one count, so the host computes its factor). When every
slot of a launch is whole tiles (``STEP_PER_TILE``: b a multiple of 32 on a GPU) a tile reads one local step, else
each element gathers its slot's (an integer division per element).

No autotuning: the kernel updates memory in place through addresses held in tables, which autotune's benchmark
runs could not restore; one config (``ADAMW_TILE`` elements per tile, ``ADAMW_NUM_WARPS`` warps,
:mod:`.launch_config`) suits this memory-bound loop. The backend choice (this kernel or
:func:`smet_kernels.reference.adamw.torch_adamw_step`) is made by :func:`smet_kernels.ops.library.adamw_step`.
"""

from __future__ import annotations

import contextlib
import math
import numbers

import torch
import triton
import triton.language as tl

from ..reference.adamw import WARMUP_MODES
from .launch_config import ADAMW_ELEMENTS_PER_PROGRAM, ADAMW_NUM_WARPS, ADAMW_TILE
from .rounding import downcast

ALIGN_ELEMENTS = 16  # tensors whose numel and address allow 16-element (>= 16-byte) vector accesses
PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
WARMUP_CODES = {"none": 0, "linear": 1, "momentum_ramp": 2}  # the kernel's WARMUP constexpr per warm-up mode


@triton.jit
def adamw_step_kernel(
    pointers_ptr,
    sizes_ptr,
    scalars_ptr,
    work_ptr,
    beta1,
    beta2,
    one_minus_beta1,
    one_minus_beta2,
    log2_beta1,
    log2_beta2,
    eps,
    weight_decay,
    warmup_steps,
    PARAM_DTYPE: tl.constexpr,
    STATE_DTYPE: tl.constexpr,
    WARMUP: tl.constexpr,
    ALIGNED: tl.constexpr,
    STEP_PER_TILE: tl.constexpr,
    TILE: tl.constexpr,
):
    pid = tl.program_id(0)
    tensor = tl.load(work_ptr + pid * 3).to(tl.int64)
    slot_begin = tl.load(work_ptr + pid * 3 + 1).to(tl.int64)
    slot_end = tl.load(work_ptr + pid * 3 + 2).to(tl.int64)
    param_ptr = tl.load(pointers_ptr + tensor * 5).to(tl.pointer_type(PARAM_DTYPE))
    grad_ptr = tl.load(pointers_ptr + tensor * 5 + 1).to(tl.pointer_type(PARAM_DTYPE))
    exp_avg_ptr = tl.load(pointers_ptr + tensor * 5 + 2).to(tl.pointer_type(STATE_DTYPE))
    exp_avg_sq_ptr = tl.load(pointers_ptr + tensor * 5 + 3).to(tl.pointer_type(STATE_DTYPE))
    block_step_address = tl.load(pointers_ptr + tensor * 5 + 4)
    block_step_ptr = block_step_address.to(tl.pointer_type(tl.int32))
    has_slots = block_step_address != 0
    numel = tl.load(sizes_ptr + tensor * 2)
    slot_numel = tl.load(sizes_ptr + tensor * 2 + 1)
    lr = tl.load(scalars_ptr + tensor * 3)
    global_step = tl.load(scalars_ptr + tensor * 3 + 1)
    dense_ramp = tl.load(scalars_ptr + tensor * 3 + 2)

    begin = slot_begin * slot_numel
    end = tl.minimum(slot_end * slot_numel, numel)
    if ALIGNED:  # host-checked: 16-byte aligned tensors of 16k elements whose programs start at 16k elements
        param_ptr = tl.multiple_of(param_ptr, 16)
        grad_ptr = tl.multiple_of(grad_ptr, 16)
        exp_avg_ptr = tl.multiple_of(exp_avg_ptr, 16)
        exp_avg_sq_ptr = tl.multiple_of(exp_avg_sq_ptr, 16)
        begin = tl.multiple_of(begin, 16)
        end = tl.multiple_of(end, 16)
    # bounds of the block_step accesses: empty for a dense tensor (single comparisons make the masks)
    step_end = tl.where(has_slots, end, begin)
    step_slot_end = tl.where(has_slots, slot_end, slot_begin)
    for start in range(begin, end, TILE):
        offs = start + tl.arange(0, TILE)
        mask = offs < end
        if STEP_PER_TILE:  # host-checked: every slot is whole tiles, so one step per tile (no division per element)
            local_step = tl.load(block_step_ptr + start // slot_numel, mask=start < step_end, other=0)
        else:
            local_step = tl.load(block_step_ptr + offs // slot_numel, mask=offs < step_end, other=0)
        local_step = local_step.to(tl.float32) + 1.0
        ramp = tl.where(has_slots, tl.minimum(local_step / warmup_steps, 1.0), dense_ramp)
        corrected_step = tl.where(global_step > 0, global_step, local_step)

        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        theta = tl.load(param_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = beta1 * m + one_minus_beta1 * g
        v = beta2 * v + one_minus_beta2 * g * g
        if WARMUP == 2:
            m = m * ramp
        m_hat = m / (1.0 - tl.exp2(corrected_step * log2_beta1))
        v_hat = v / (1.0 - tl.exp2(corrected_step * log2_beta2))
        update = m_hat / (tl.sqrt(v_hat) + eps)
        if WARMUP == 1:
            update = update * ramp
        theta = theta - lr * (update + weight_decay * theta)
        tl.store(param_ptr + offs, downcast(theta, PARAM_DTYPE), mask=mask)
        tl.store(exp_avg_ptr + offs, downcast(m, STATE_DTYPE), mask=mask)
        tl.store(exp_avg_sq_ptr + offs, downcast(v, STATE_DTYPE), mask=mask)

    # every lane has read its slots' old steps before any is bumped
    tl.debug_barrier()
    for start in range(slot_begin, slot_end, TILE):
        slots = start + tl.arange(0, TILE)
        slot_mask = slots < step_slot_end
        step = tl.load(block_step_ptr + slots, mask=slot_mask, other=0)
        tl.store(block_step_ptr + slots, step + 1, mask=slot_mask)


def _vector_aligned(tensor: torch.Tensor) -> bool:
    return tensor.data_ptr() % 16 == 0 and tensor.numel() % ALIGN_ELEMENTS == 0


def _slots(entry: tuple) -> tuple[int, int]:
    """``(slots, elements per slot)`` of ``(param, grad, m, v, block_step)``: a dense tensor is cut in slots of
    ``ADAMW_ELEMENTS_PER_PROGRAM`` elements; values ``[nnz, b, b]`` in its ``nnz`` slots (nnz or b may be 0)."""
    param, block_step = entry[0], entry[4]
    if block_step is None:
        return -(-param.numel() // ADAMW_ELEMENTS_PER_PROGRAM), ADAMW_ELEMENTS_PER_PROGRAM
    return param.shape[0], param.numel() // param.shape[0] if param.shape[0] else 0


def _slots_per_program(slot_numel: int) -> int:
    return max(1, ADAMW_ELEMENTS_PER_PROGRAM // max(slot_numel, 1))


def _programs_start_aligned(entry: tuple) -> bool:
    """Every program's first element is a multiple of ``ALIGN_ELEMENTS`` into the tensor (values of ``b × b`` slots,
    ``b`` odd or 2 mod 4, start programs elsewhere: the kernel's 16-element hint on ``begin`` would not hold)."""
    _, slot_numel = _slots(entry)
    return _slots_per_program(slot_numel) * slot_numel % ALIGN_ELEMENTS == 0


def _slot_is_whole_tiles(entry: tuple) -> bool:
    """A values tensor whose ``b × b`` slots are whole tiles (b a multiple of 32 on a GPU), or a dense tensor (slots of
    ``ADAMW_ELEMENTS_PER_PROGRAM`` elements, read without a step): each tile then has one local step."""
    return entry[4] is None or _slots(entry)[1] % ADAMW_TILE == 0


def _log2(beta: float) -> float:
    return -math.inf if beta == 0.0 else math.log2(beta)


def _to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host table -> device without a stream sync (pinned, asynchronous copy on CUDA)."""
    if device.type != "cuda":
        return table.to(device)
    return table.pin_memory().to(device, non_blocking=True)


def _addresses(tensors: list[tuple]) -> tuple[tuple[int, ...], ...]:
    """The rows of the pointer table: addresses of ``(param, grad, m, v, block_step)``, 0 for no ``block_step``."""
    return tuple(tuple(0 if t is None else t.data_ptr() for t in entry) for entry in tensors)


def _shapes(tensors: list[tuple]) -> tuple:
    """What ``sizes`` and ``work`` depend on: each parameter's shape and whether it has slots (a ``block_step``)."""
    return tuple((tuple(entry[0].shape), entry[4] is None) for entry in tensors)


def _pointer_table(addresses: tuple[tuple[int, ...], ...], device: torch.device) -> torch.Tensor:
    """``pointers [T, 5]`` of :func:`_addresses`."""
    return _to_device(torch.tensor(addresses, dtype=torch.int64), device)


def _work_tables(tensors: list[tuple], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``sizes [T, 2]``, ``work [P, 3]`` for tensors ``(param, grad, m, v, block_step)``."""
    sizes, work = [], []
    for index, entry in enumerate(tensors):
        num_slots, slot_numel = _slots(entry)
        sizes.append([entry[0].numel(), slot_numel])
        slots_per_program = _slots_per_program(slot_numel)
        firsts = torch.arange(0, num_slots, slots_per_program, dtype=torch.int64)
        work.append(
            torch.stack(
                [torch.full_like(firsts, index), firsts, torch.clamp(firsts + slots_per_program, max=num_slots)], 1
            )
        )
    sizes_table = _to_device(torch.tensor(sizes, dtype=torch.int64), device)
    return sizes_table, _to_device(torch.cat(work).to(torch.int32), device)


@torch.compiler.disable  # host tables of raw addresses: a compiled optimizer step launches it as it is
def triton_adamw_step(
    tensors: list[tuple],
    lrs: list[float],
    global_steps: list[int | None],
    dense_warmups: list[bool],
    *,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    warmup: str,
    warmup_steps: int,
    cache: dict | None,
    cache_key,
) -> None:
    """One fused launch over ``tensors`` ``(param, grad, exp_avg, exp_avg_sq, block_step)`` of one device,
    parameter dtype and state dtype, checked by :func:`check_tensors`; ``cache[cache_key]`` keeps the device
    tables: ``sizes`` and ``work`` while the tensors' shapes stay the same, ``pointers`` while their addresses do."""
    param = tensors[0][0]
    device = param.device
    shapes, addresses = _shapes(tensors), _addresses(tensors)
    cached = cache.get(cache_key) if cache is not None else None
    if cached is not None and cached[0] == shapes:
        sizes, work = cached[1]
    else:
        sizes, work = _work_tables(tensors, device)
    if cached is not None and cached[0] == shapes and cached[2] == addresses:
        pointers = cached[3]
    else:
        pointers = _pointer_table(addresses, device)
    if cache is not None:
        cache[cache_key] = (shapes, (sizes, work), addresses, pointers)
    if work.shape[0] == 0:  # only empty tensors
        return
    rows = [
        [lr, 0.0 if step is None else float(step),
         min(step / warmup_steps, 1.0) if warm and entry[4] is None else 1.0]
        for lr, step, warm, entry in zip(lrs, global_steps, dense_warmups, tensors)
    ]  # fmt: skip
    scalars = _to_device(torch.tensor(rows, dtype=torch.float32), device)
    beta1, beta2 = betas
    grid = (work.shape[0],)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        adamw_step_kernel[grid](
            pointers,
            sizes,
            scalars,
            work,
            beta1,
            beta2,
            1.0 - beta1,
            1.0 - beta2,
            _log2(beta1),
            _log2(beta2),
            eps,
            weight_decay,
            float(warmup_steps),
            PARAM_DTYPE=TL_DTYPES[param.dtype],
            STATE_DTYPE=TL_DTYPES[tensors[0][2].dtype],
            WARMUP=WARMUP_CODES[warmup],
            ALIGNED=all(_vector_aligned(t) for entry in tensors for t in entry[:4])
            and all(_programs_start_aligned(entry) for entry in tensors),
            STEP_PER_TILE=all(_slot_is_whole_tiles(entry) for entry in tensors),
            TILE=ADAMW_TILE,
            num_warps=ADAMW_NUM_WARPS,
        )


def check_tensors(params, grads, exp_avgs, exp_avg_sqs, block_steps, lrs, global_steps, dense_warmups) -> None:
    """Raise ``ValueError``/``TypeError`` naming the first invalid tensor list entry of an AdamW step."""
    lists = {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "block_steps": block_steps,
             "lrs": lrs, "global_steps": global_steps, "dense_warmups": dense_warmups}  # fmt: skip
    for name, values in lists.items():
        if len(values) != len(params):
            raise ValueError(f"{name} has {len(values)} entries but params has {len(params)}")
    for i, (p, g, m, v, s) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, block_steps)):
        for name, t in (("params", p), ("grads", g), ("exp_avgs", m), ("exp_avg_sqs", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
            if t.device != p.device:
                raise ValueError(f"{name}[{i}] is on {t.device} but params[{i}] is on {p.device}")
            if not t.is_contiguous():
                raise ValueError(f"{name}[{i}] must be contiguous")
            if t.shape != p.shape:
                raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)} but params[{i}] has {tuple(p.shape)}")
        if p.dtype not in PARAM_DTYPES:
            raise TypeError(f"params[{i}] must be one of {PARAM_DTYPES}, got {p.dtype}")
        if g.dtype != p.dtype:
            raise TypeError(f"grads[{i}] has dtype {g.dtype} but params[{i}] has {p.dtype}")
        if m.dtype not in PARAM_DTYPES or v.dtype != m.dtype:
            raise TypeError(f"exp_avgs[{i}]/exp_avg_sqs[{i}] must share a float dtype, got {m.dtype}/{v.dtype}")
        if s is None:
            if global_steps[i] is None:
                raise ValueError(f"global_steps[{i}] is required for a dense tensor (block_steps[{i}] is None)")
        else:
            if p.dim() != 3 or p.shape[1] != p.shape[2]:
                raise ValueError(f"params[{i}] with a block_step must be values [nnz, b, b], got {tuple(p.shape)}")
            if not isinstance(s, torch.Tensor) or s.dtype != torch.int32:
                raise TypeError(f"block_steps[{i}] must be an int32 tensor")
            if s.shape != (p.shape[0],) or s.device != p.device or not s.is_contiguous():
                raise ValueError(f"block_steps[{i}] must be a contiguous [{p.shape[0]}] tensor on {p.device}")
        if not lrs[i] >= 0.0:
            raise ValueError(f"lrs[{i}] must be >= 0, got {lrs[i]}")
        if global_steps[i] is not None and global_steps[i] < 1:
            raise ValueError(f"global_steps[{i}] must be >= 1 (count including this step), got {global_steps[i]}")


def check_finite(value, name: str, positive: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a finite real number ``>= 0`` (``> 0`` when
    ``positive``; numpy scalars too): an infinite lr, eps or weight decay would silently turn the weights into inf/NaN
    or freeze them."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or not (value > 0.0 if positive else value >= 0.0)
    ):
        raise ValueError(f"{name} must be a finite float {'>' if positive else '>='} 0, got {value!r}")


def check_betas(betas) -> None:
    """``TypeError`` unless ``betas`` is a pair, ``ValueError`` naming the first beta outside ``[0, 1)``."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0.0 <= beta < 1.0:
            raise ValueError(f"betas[{i}] must be a float in [0, 1), got {beta!r}")


def check_hyperparameters(betas, eps: float, weight_decay: float, warmup: str, warmup_steps: int) -> None:
    """Raise ``ValueError``/``TypeError`` naming the first invalid AdamW hyper-parameter (numpy scalars are numbers)."""
    check_betas(betas)
    check_finite(eps, "eps", positive=True)
    check_finite(weight_decay, "weight_decay")
    if warmup not in WARMUP_MODES:
        raise ValueError(f"warmup must be one of {WARMUP_MODES}, got {warmup!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, numbers.Integral):
        raise TypeError(f"warmup_steps must be an int, got {type(warmup_steps).__name__}")
    if warmup_steps < 1:
        raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps}")
