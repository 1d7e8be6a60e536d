"""Launch-configuration policy of the Triton kernels: autotune spaces, the rules that prune them, shared-memory
limits, program counts and the element tiles of the AdamW and regrow kernels.

One module so that the kernels (:mod:`.block_sparse_matmul`, :mod:`.adamw`, :mod:`.regrow`) and the static
resource report (``profiling/kernel_resources.py``, which compiles every config ahead of time and shows each rule
at work in ``reports/static-sm90``) read the same numbers.
"""

from __future__ import annotations

import functools

import torch
import triton
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
from triton.tools.tensor_descriptor import TensorDescriptor

from ..backend import INTERPRET

# ---------------------------------------------------------------- block-sparse matmuls
DENSE_SPARSE_BLOCK_MS = (64, 128, 256)  # token tiles of the forward / input-grad kernels
GRAD_WEIGHT_BLOCK_MS = (32, 64, 128)  # token tiles reduced per step by the weight-grad kernels
GROUP_M = 8  # token tiles per L2 group of the forward / input-grad program order
HOPPER_SHARED_MEMORY = 232448  # opt-in shared memory per block of an H100, used when the device is not a GPU
#: opt-in shared memory per block (bytes, ``cudaDevAttrMaxSharedMemoryPerBlockOptin``) per compute capability
#: (CUDA programming guide; profiling.kernel_resources prunes an --arch by it, an H100's where it is missing)
SHARED_MEMORY_LIMITS = {70: 98304, 75: 65536, 80: 166912, 86: 101376, 87: 166912, 89: 101376,
                        90: HOPPER_SHARED_MEMORY, 100: HOPPER_SHARED_MEMORY, 120: 101376}
PERSISTENT_SHARED_MEMORY = 228 * 1024  # shared memory of an H100 SM, shared by the persistent programs on it
MAX_PERSISTENT_PROGRAMS_PER_SM = 4
MAX_SPLIT_K = 16


def matmul_configs(block_ms: tuple[int, ...], interpret: bool = INTERPRET) -> list[triton.Config]:
    """GPU autotune space: every ``BLOCK_M`` of ``block_ms`` × 4 or 8 warps × 2 to 4 pipeline stages; one small
    config under the interpreter (autotuning there costs minutes)."""
    if interpret:
        return [triton.Config({"BLOCK_M": 32}, num_warps=1, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
        for bm in block_ms
        for w in (4, 8)
        for s in (2, 3, 4)
    ]


def with_pre_hook(configs: list[triton.Config], pre_hook) -> list[triton.Config]:
    """The same configs, each running ``pre_hook`` before its launch (the TMA kernels set their descriptors' token
    box to the config's ``BLOCK_M``)."""
    return [
        triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=pre_hook) for c in configs
    ]


def prune_configs(
    configs,
    named_args,
    shared_memory_limit: int | None = None,
    weight_grad: bool = False,
    accumulator_registers: int = 128,
    **kwargs,
):
    """Keep the configs that can compile to a fast loop (``reports/static-sm90`` shows each rule at work):

    * shared memory: ``num_stages`` buffered tiles ``(BLOCK_M·b + b·b)·elem`` within the device's limit — an upper
      bound of what Triton's pipeliner allocates, so every kept config fits;
    * registers: the fp32 accumulator (``BLOCK_M × b``; ``b × b`` for the weight grad) at most
      ``accumulator_registers`` per thread — past 128 ``BLOCK_M = 256`` with 4 warps spills at b = 128; the
      persistent kernel, which carries its tile loop's state as well, spills past 64;
    * pipelining: at least 16 bytes of the ``BLOCK_M × b`` token tile per thread (one ``cp.async``) — below it
      (b = 16 or 32 with 8 warps on a small tile) Triton emits synchronous loads.
    """
    b = kwargs.get("BLOCK_SIZE", named_args.get("BLOCK_SIZE"))
    operand = next(
        arg.base if isinstance(arg, TensorDescriptor) else arg
        for arg in named_args.values()
        if isinstance(arg, (torch.Tensor, TensorDescriptor))
    )
    if shared_memory_limit is None:
        shared_memory_limit = shared_memory_limit_of(operand.device)
    elem = operand.element_size()

    def fits(config: triton.Config) -> bool:
        block_m, threads = config.kwargs["BLOCK_M"], 32 * config.num_warps
        shared = (block_m * b + b * b) * elem * config.num_stages
        accumulator = b * b if weight_grad else block_m * b
        return (
            shared <= shared_memory_limit
            and accumulator <= accumulator_registers * threads
            and block_m * b * elem >= 16 * threads
        )

    return [c for c in configs if fits(c)] or configs[:1]


prune_persistent_configs = functools.partial(prune_configs, accumulator_registers=64)
prune_grad_weight_configs = functools.partial(prune_configs, weight_grad=True)


def shared_memory_limit_of(device: torch.device) -> int:
    """Opt-in shared memory per block of ``device``; an H100's when it is not a GPU (the interpreter)."""
    if device.type != "cuda":
        return HOPPER_SHARED_MEMORY
    return _device_shared_memory(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _device_shared_memory(device_index: int) -> int:
    properties = torch.cuda.get_device_properties(device_index)
    return getattr(properties, "shared_memory_per_block_optin", properties.shared_memory_per_block)


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def precision_flags(dtype: torch.dtype, interpret: bool = INTERPRET) -> dict:
    """Constexprs of the matmul kernels for operands of ``dtype``: under the interpreter bf16 is upcast before
    ``tl.dot`` (the interpreter's bf16 dot is wrong, SPEC §8); fp32 uses IEEE precision (no TF32) to match
    PyTorch."""
    return {
        "UPCAST": interpret and dtype == torch.bfloat16,
        "INPUT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
    }


def _run_time_count(m) -> bool:
    """``m`` is a data-dependent (unbacked) symbolic size: no value while tracing, no comparison."""
    return isinstance(m, torch.SymInt) and bool(free_unbacked_symbols(m))


def default_split_k(m: int, nnz: int, device: torch.device) -> int:
    """Splits of the token axis of the weight grad so that ``nnz * split_k`` programs fill the GPU about twice
    over (at most one split per 128 tokens, at most ``MAX_SPLIT_K``; a layout without blocks counts as one); 1 off
    the GPU."""
    if device.type != "cuda":
        return 1
    programs_wanted = 2 * sm_count(_device_index(device))
    # a token count known only at run time (x[mask] under torch.compile) cannot be compared while tracing: the
    # splits the GPU wants (a split past the last token tile adds zeros)
    max_split = MAX_SPLIT_K if _run_time_count(m) else max(1, triton.cdiv(m, 128))
    return max(1, min(max_split, triton.cdiv(programs_wanted, max(nnz, 1)), MAX_SPLIT_K))


def persistent_programs_per_sm(block_m: int, block_size: int, element_size: int) -> int:
    """Programs of the persistent kernel per SM: how many double-buffered ``(BLOCK_M·b + b·b)`` tiles fit in an
    H100 SM's 228 KiB of shared memory (at most ``MAX_PERSISTENT_PROGRAMS_PER_SM``)."""
    tile_bytes = (block_m * block_size + block_size * block_size) * element_size
    return max(1, min(MAX_PERSISTENT_PROGRAMS_PER_SM, PERSISTENT_SHARED_MEMORY // (2 * tile_bytes)))


def persistent_programs(tiles: int, block_m: int, block_size: int, operand: torch.Tensor) -> int:
    """Grid of the persistent kernel: about as many programs as fit on the GPU at once (never more than tiles);
    under the interpreter a few programs, each striding over several tiles."""
    if operand.device.type != "cuda":
        return torch.sym_min(tiles, 3)  # sym_min: tiles may be a run-time token count's (no comparison)
    sms = sm_count(_device_index(operand.device))
    return torch.sym_min(tiles, sms * persistent_programs_per_sm(block_m, block_size, operand.element_size()))


# ---------------------------------------------------------------- AdamW step and regrow (memory-bound, no autotune)
#: elements per tile of the AdamW loop on a GPU: 1024 with 4 warps = 8 fp32 per thread, two 16-byte vector loads
ADAMW_GPU_TILE = 1024
#: the tile actually used: larger under the interpreter, where each tile costs a Python-level loop iteration
ADAMW_TILE = 4096 if INTERPRET else ADAMW_GPU_TILE
ADAMW_NUM_WARPS = 4
#: elements owned by one AdamW program (whole slots; a dense tensor is cut into pseudo-slots of this size)
ADAMW_ELEMENTS_PER_PROGRAM = 16384
#: a regrow program writes at most this many elements of its ``b × b`` block (b = 64); larger blocks take more tiles
REGROW_MAX_TILE = 4096
REGROW_NUM_WARPS = 4


def regrow_tile(block_numel: int) -> int:
    """Elements per regrow program: the whole ``b × b`` block rounded up to a power of two, capped at
    ``REGROW_MAX_TILE``."""
    return min(triton.next_power_of_2(block_numel), REGROW_MAX_TILE)
