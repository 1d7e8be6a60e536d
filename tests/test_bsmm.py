"""The block-sparse products ``bsmm_forward`` / ``bsmm_grad_input`` / ``bsmm_grad_weight``: ``triton_<op>`` vs
``torch_<op>`` (output and every gradient, on awkward layouts and shapes) in every variant (grouped, persistent, TMA)
and split-K, the variant's default and checks, the edge cases (no tokens, no active block, row offsets past int32, a
topology update, operands on another device), and the launch configs the pruners keep."""

import numpy as np
import pytest
import torch

from bsmm_cases import HAS_TMA, ON_GPU, _close, _inputs, _mask_layout
from conftest import (
    DEVICE,
    GPU_TEST_CONFIG,
    TOKEN_TILE,
    torch_forward,
    torch_grad_input,
    torch_grad_weight,
    triton_forward,
    triton_grad_input,
    triton_grad_weight,
)
from smet_kernels import BlockLayout, block_sparse_linear, from_dense
from smet_kernels.ops.launch_config import (
    DENSE_SPARSE_BLOCK_MS,
    GRAD_WEIGHT_BLOCK_MS,
    GROUP_M,
    HOPPER_SHARED_MEMORY,
    matmul_configs,
    prune_configs,
    prune_grad_weight_configs,
    prune_persistent_configs,
)

pytestmark = pytest.mark.usefixtures("one_matmul_config")  # on a GPU: one config, not 18 autotuned per shape
# On CPU the bf16 kernels upcast before tl.dot (the interpreter's bf16 dot is wrong, SPEC §8): bf16 loads, casts and
# stores are still checked there; the bf16 tensor-core path itself runs on the GPU.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCK_SIZES = [16, 32, 64, 128] if ON_GPU else [16, 32]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("kind", ["random", "empty_rows_cols", "single", "dense"])
def test_bsmm_triton_matches_torch_on_awkward_layouts(kind, block_size, dtype):
    layout = _mask_layout(kind, 3, 4, block_size)
    x, values, dy, bias = _inputs(layout, 37, dtype)
    _close(triton_forward(x, values, layout, bias), torch_forward(x, values, layout, bias), dtype)
    _close(triton_grad_input(dy, values, layout), torch_grad_input(dy, values, layout), dtype)
    _close(triton_grad_weight(dy, x, layout), torch_grad_weight(dy, x, layout), dtype)


@pytest.mark.parametrize("m_tiles", [GROUP_M, GROUP_M + 3, 2 * GROUP_M + 1])
def test_bsmm_program_groups_cover_every_output_tile_once(m_tiles):
    """Token tiles are scheduled in groups of GROUP_M (L2 reuse): full groups, a partial last group, odd M."""
    layout = _mask_layout("empty_rows_cols", 5, 3, 16)
    block_m = TOKEN_TILE  # the token tile the kernels run at here (one config, see conftest)
    x, values, dy, bias = _inputs(layout, m_tiles * block_m - 5, torch.float32)
    _close(triton_forward(x, values, layout, bias), torch_forward(x, values, layout, bias), torch.float32)
    _close(triton_grad_input(dy, values, layout), torch_grad_input(dy, values, layout), torch.float32)


def test_bsmm_group_m_is_validated_and_any_grouping_gives_the_same_result():
    layout = _mask_layout("random", 4, 3, 16)
    x, values, dy, _ = _inputs(layout, 200, torch.float32)
    expected = torch_forward(x, values, layout)
    for group_m in (1, 3, 1000):
        _close(triton_forward(x, values, layout, group_m=group_m), expected, torch.float32)
    _close(triton_grad_input(dy, values, layout, group_m=2), torch_grad_input(dy, values, layout), torch.float32)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="group_m"):
            triton_forward(x, values, layout, group_m=bad)


KERNEL_VARIANTS = ["persistent", pytest.param("tma", marks=pytest.mark.skipif(not HAS_TMA, reason="needs sm_90+"))]


@pytest.mark.parametrize("variant", KERNEL_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["random", "empty_rows_cols", "single", "dense"])
@pytest.mark.parametrize("m_tiles", [1, GROUP_M + 3])
def test_bsmm_variants_match_torch(kind, m_tiles, dtype, variant):
    """Persistent programs striding over the tiles longest block rows first, and TMA descriptor tiles (zero-filled
    and clipped at the token tail): every tile once, on any layout."""
    layout = _mask_layout(kind, 5, 3, 16)
    block_m = TOKEN_TILE
    x, values, dy, bias = _inputs(layout, m_tiles * block_m - 3, dtype)
    y = triton_forward(x, values, layout, bias, variant=variant)
    _close(y, torch_forward(x, values, layout, bias), dtype)
    dx = triton_grad_input(dy, values, layout, variant=variant)
    _close(dx, torch_grad_input(dy, values, layout), dtype)


@pytest.mark.skipif(not HAS_TMA, reason="needs sm_90+")
def test_bsmm_tma_variant_copies_operands_its_descriptors_cannot_read(monkeypatch):
    """A TMA descriptor needs a 16-byte aligned base and rows: a misaligned ``x`` / ``dy`` or values that are not
    contiguous are copied first (every descriptor built sees an aligned tensor), and the products stay exact."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    bases = []
    from_tensor = TensorDescriptor.from_tensor

    def recording(tensor, block_shape):
        bases.append(tensor.data_ptr() % 16 == 0 and tensor.stride(0) * tensor.element_size() % 16 == 0)
        return from_tensor(tensor, block_shape)

    monkeypatch.setattr(TensorDescriptor, "from_tensor", staticmethod(recording))
    layout = _mask_layout("random", 2, 2, 16)
    x, values, dy, _ = _inputs(layout, 9, torch.float16)
    misaligned = torch.empty(8 * 32 + 1, dtype=x.dtype, device=x.device)[1:].view(8, 32)
    misaligned.copy_(x[:8])
    assert misaligned.data_ptr() % 16
    _close(triton_forward(misaligned, values, layout, variant="tma"), torch_forward(x[:8], values, layout),
           torch.float16)  # fmt: skip
    transposed = values.transpose(1, 2).contiguous().transpose(1, 2)  # the same blocks, not contiguous
    _close(triton_forward(x, transposed, layout, variant="tma"), torch_forward(x, values, layout), torch.float16)
    _close(triton_grad_weight(dy[:8], misaligned, layout, variant="tma"), torch_grad_weight(dy[:8], x[:8], layout),
           torch.float16)  # fmt: skip
    assert len(bases) == 3 + 3 + 3 and all(bases)


def test_bsmm_default_variant_comes_from_the_environment(monkeypatch):
    layout = _mask_layout("empty_rows_cols", 3, 2, 16)
    x, values, _, bias = _inputs(layout, 40, torch.float32)
    expected = torch_forward(x, values, layout, bias)
    monkeypatch.setenv("SMET_MATMUL_VARIANT", "persistent")
    _close(triton_forward(x, values, layout, bias), expected, torch.float32)
    monkeypatch.setenv("SMET_MATMUL_VARIANT", "stream-k")
    with pytest.raises(ValueError, match="SMET_MATMUL_VARIANT environment variable must be one of"):
        triton_forward(x, values, layout, bias)


def test_an_empty_smet_matmul_variant_is_refused_not_read_as_the_default(monkeypatch):
    from smet_kernels.ops.variant import default_variant

    monkeypatch.setenv("SMET_MATMUL_VARIANT", "")
    with pytest.raises(ValueError, match="SMET_MATMUL_VARIANT environment variable must be one of .*, got ''"):
        default_variant()


def test_a_default_tma_variant_runs_as_grouped_on_a_gpu_without_tma_and_warns_only_when_asked(monkeypatch):
    """:data:`DEFAULT_VARIANT` (or ``SMET_MATMUL_VARIANT``) ``tma`` must not break a model on an sm_80 GPU: the default
    resolves to ``grouped`` there, silently when it is the built-in default, with one warning when the environment
    asked for ``tma`` (also under ``torch.compile``); sm_90 and the CPU interpreter keep ``tma``. An explicit
    ``variant='tma'`` is refused there."""
    import warnings

    from smet_kernels.ops import block_sparse_matmul as bsmm
    from smet_kernels.ops import variant

    capability = {0: (8, 0), 1: (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability[torch.device(device).index])
    monkeypatch.setattr(variant, "DEFAULT_VARIANT", "tma")
    monkeypatch.delenv("SMET_MATMUL_VARIANT", raising=False)
    variant._warn_tma_unsupported.cache_clear()
    sm80, sm90 = torch.device("cuda", 0), torch.device("cuda", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        defaults = [variant.default_variant(d) for d in (sm80, sm90, torch.device("cpu"), None)]
        assert defaults == ["grouped"] + ["tma"] * 3
    monkeypatch.setenv("SMET_MATMUL_VARIANT", "tma")
    with pytest.warns(UserWarning, match="SMET_MATMUL_VARIANT=tma runs as 'grouped' on cuda:0") as caught:
        assert variant.default_variant(sm80) == variant.default_variant(sm80) == "grouped"
    assert len(caught) == 1
    variant._warn_tma_unsupported.cache_clear()  # traced by torch.compile (fullgraph): the warning is not a graph break
    compiled = torch.compile(lambda t: t + len(variant.default_variant(sm80)), fullgraph=True, backend="eager")
    with pytest.warns(UserWarning, match="runs as 'grouped' on cuda:0"):
        assert compiled(torch.zeros(1)).item() == len("grouped")
    monkeypatch.setenv("SMET_MATMUL_VARIANT", "persistent")
    assert variant.default_variant(sm80) == "persistent"
    with pytest.raises(ValueError, match="needs a GPU with the Tensor Memory Accelerator"):
        bsmm._check_tma_device(sm80)


def test_bsmm_variant_is_validated():
    layout = _mask_layout("random", 2, 2, 16)
    x, values, dy, _ = _inputs(layout, 8, torch.float32)
    with pytest.raises(ValueError, match="variant"):
        triton_forward(x, values, layout, variant="stream-k")
    with pytest.raises(ValueError, match="variant"):
        triton_grad_input(dy, values, layout, variant="TMA")


@pytest.mark.skipif(not HAS_TMA, reason="needs sm_90+")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["random", "empty_rows_cols", "single", "dense"])
@pytest.mark.parametrize("split_k", [1, 3])
def test_bsmm_grad_weight_tma_matches_torch(kind, split_k, dtype):
    """TMA token tiles (zero-filled past the last token) and b × b result boxes, with and without split-K."""
    layout = _mask_layout(kind, 3, 4, 16)
    x, _, dy, _ = _inputs(layout, 101, dtype)
    _close(triton_grad_weight(dy, x, layout, split_k=split_k, variant="tma"), torch_grad_weight(dy, x, layout),
           dtype)


@pytest.mark.parametrize("split_k", [2, 3])
def test_bsmm_grad_weight_split_k_matches_torch(split_k):
    layout = _mask_layout("random", 2, 3, 16)
    x, _, dy, _ = _inputs(layout, 100, torch.float32)
    _close(triton_grad_weight(dy, x, layout, split_k=split_k), torch_grad_weight(dy, x, layout), torch.float32)


@pytest.mark.parametrize("variant", ["grouped", pytest.param("tma", marks=pytest.mark.skipif(not HAS_TMA,
                                                                                         reason="needs sm_90+"))])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_bsmm_grad_weight_split_k_sums_fp32_partials_of_half_inputs(dtype, variant):
    """Split-K is a schedule, not a precision choice: partial sums stay fp32 until the one rounding of the result.
    Token tile 0 sums to 1024 + 0.25 and tile 1 to -1024; partials rounded to fp16/bf16 would lose the 0.25."""
    layout = BlockLayout.from_mask(torch.ones(1, 1, dtype=torch.bool), 16)
    m = 2 * TOKEN_TILE  # one token tile per split
    x = torch.zeros(m, 16, dtype=torch.float64)
    dy = torch.zeros(m, 16, dtype=torch.float64)
    dy[[0, 1, TOKEN_TILE], 0] = 1.0
    x[[0, 1, TOKEN_TILE], 0] = torch.tensor([1024.0, 0.25, -1024.0], dtype=torch.float64)
    expected = (dy.t() @ x).reshape(1, 16, 16)  # dW[0, 0] = 0.25, exact in half precision
    x, dy = x.to(DEVICE, dtype), dy.to(DEVICE, dtype)
    for split_k in (1, 2):
        got = triton_grad_weight(dy, x, layout, split_k=split_k, variant=variant)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double().cpu(), expected, atol=0.0, rtol=0.0)


def test_bsmm_grad_weight_validates_a_given_split_k_and_takes_an_int_like_default(monkeypatch):
    """The default may be int-like but not an ``int`` (a SymInt under dynamic shapes): only a given one is checked."""
    from smet_kernels.ops import block_sparse_matmul

    layout = _mask_layout("random", 2, 3, 16)
    x, _, dy, _ = _inputs(layout, 100, torch.float32)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="split_k must be a positive int"):
            triton_grad_weight(dy, x, layout, split_k=bad)
    monkeypatch.setattr(block_sparse_matmul, "default_split_k", lambda m, nnz, device: np.int64(2))
    _close(triton_grad_weight(dy, x, layout), torch_grad_weight(dy, x, layout), torch.float32)


def test_bsmm_empty_block_row_gives_bias_only_and_zero_grad_column():
    layout = _mask_layout("empty_rows_cols", 3, 4, 16)
    x, values, dy, bias = _inputs(layout, 5, torch.float32)
    y = triton_forward(x, values, layout, bias)
    torch.testing.assert_close(y[:, :16], bias[:16].expand(5, 16))
    dx = triton_grad_input(dy, values, layout)
    assert torch.count_nonzero(dx[:, 16:32]) == 0


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("lead_shape", [(0,), (2, 0)])
def test_bsmm_zero_tokens_give_empty_outputs_and_zero_weight_gradients(lead_shape, backend):
    """A batch without tokens, as nn.Linear allows, including the stride-0 gradient of y.sum()."""
    layout = _mask_layout("random", 4, 2, 16)
    x = torch.randn(*lead_shape, layout.shape[1], device=DEVICE, requires_grad=True)
    values = torch.randn(layout.nnz, 16, 16, device=DEVICE, requires_grad=True)
    bias = torch.randn(layout.shape[0], device=DEVICE, requires_grad=True)
    y = block_sparse_linear(x, values, layout, bias, backend=backend)
    y.sum().backward()
    assert y.shape == (*lead_shape, layout.shape[0]) and x.grad.shape == x.shape
    assert not values.grad.any() and not bias.grad.any()
    for variant in ("persistent", "tma") if backend == "triton" and HAS_TMA else ():
        x2d = x.detach().reshape(0, layout.shape[1])
        dy2d = x2d.new_zeros(0, layout.shape[0])
        assert triton_forward(x2d, values.detach(), layout, variant=variant).shape == (0, layout.shape[0])
        assert triton_grad_input(dy2d, values.detach(), layout, variant=variant).shape == x2d.shape
        for split_k in (1, 3):  # also the fp32 partial sums of split_k > 1
            dvalues = triton_grad_weight(dy2d, x2d, layout, split_k=split_k, variant=variant)
            assert dvalues.shape == values.shape and dvalues.dtype == values.dtype and not dvalues.any()


def test_bsmm_without_active_blocks_gives_zero_outputs_and_an_empty_weight_gradient():
    """Block indices ``[0, 2]`` (no active block): the references agree with the kernels of every variant (grad_weight
    of the reference joined no chunk with torch.cat; ``tma`` built descriptors of 0 rows, which Triton refuses)."""
    from smet_kernels.layout import BlockIndex
    from smet_kernels.ops.block_sparse_matmul import triton_bsmm_forward, triton_bsmm_grad_weight
    from smet_kernels.reference.matmul import torch_bsmm_forward, torch_bsmm_grad_input, torch_bsmm_grad_weight

    def empty(*shape):
        return torch.zeros(*shape, dtype=torch.int32, device=DEVICE)

    indices = empty(0, 2)
    csr = BlockIndex(empty(5), empty(0), empty(0), torch.arange(4, dtype=torch.int32, device=DEVICE))  # 4 x 2 blocks
    dy, x = torch.randn(5, 64, device=DEVICE), torch.randn(5, 32, device=DEVICE)
    values, bias = torch.zeros(0, 16, 16, device=DEVICE), torch.randn(64, device=DEVICE)
    assert torch.equal(torch_bsmm_forward(x, values, indices, 64, bias), bias.expand(5, 64))
    assert not torch_bsmm_grad_input(dy, values, indices, 32).any()
    dvalues = torch_bsmm_grad_weight(dy, x, indices, 16)
    assert dvalues.shape == (0, 16, 16) and dvalues.dtype == x.dtype
    for variant in ("grouped", "persistent", "tma") if HAS_TMA else ("grouped", "persistent"):
        assert torch.equal(triton_bsmm_forward(x, values, csr, 64, bias, variant=variant), bias.expand(5, 64))
        assert triton_bsmm_grad_weight(dy, x, indices, 16, variant=variant).shape == (0, 16, 16)


def test_bsmm_grad_weight_is_the_dense_gradient_at_active_blocks():
    layout = _mask_layout("random", 3, 3, 16)
    x, values, dy, _ = _inputs(layout, 9, torch.float32)
    dense_grad = dy.t() @ x
    _close(triton_grad_weight(dy, x, layout), from_dense(dense_grad, layout), torch.float32)


def test_bsmm_row_offsets_past_int32():
    """Row ``m`` of a ``[M, K]`` operand starts at ``m * stride``: past 2**31 elements for long token batches."""
    layout = BlockLayout.from_mask(torch.ones(1, 1, dtype=torch.bool), 16)
    stride = 2**30 + 16  # row 2 starts at element 2**31 + 32
    try:  # 4 GiB of fp16, of which only the three rows are touched
        storage = torch.empty(2 * stride + 16, dtype=torch.float16, device=DEVICE)
    except (RuntimeError, MemoryError):
        pytest.skip("cannot reserve 4 GiB of address space here")
    g = torch.Generator().manual_seed(0)
    strided = storage.as_strided((3, 16), (stride, 1))  # x, and dy of the 16 x 16 layer
    strided.copy_(torch.randn(3, 16, generator=g))
    rows = strided.contiguous()
    values = torch.randn(1, 16, 16, generator=g).to(DEVICE, torch.float16)
    _close(triton_forward(strided, values, layout), torch_forward(rows, values, layout), torch.float16)
    _close(triton_grad_input(strided, values, layout), torch_grad_input(rows, values, layout), torch.float16)
    _close(triton_grad_weight(strided, strided, layout), torch_grad_weight(rows, rows, layout), torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_bsmm_after_topology_update(dtype):
    """After ``replace_blocks`` the slots are no longer in row-major order; the kernels go through the indices."""
    layout = _mask_layout("random", 3, 4, 16)
    inactive = (~layout.mask).nonzero()
    layout.replace_blocks(torch.tensor([0, layout.nnz - 1]), inactive[[-1, 0]])
    flat = layout.block_indices[:, 0] * 4 + layout.block_indices[:, 1]
    assert not torch.equal(flat, flat.sort().values)
    x, values, dy, bias = _inputs(layout, 19, dtype)
    _close(triton_forward(x, values, layout, bias), torch_forward(x, values, layout, bias), dtype)
    _close(triton_grad_input(dy, values, layout), torch_grad_input(dy, values, layout), dtype)
    _close(triton_grad_weight(dy, x, layout), torch_grad_weight(dy, x, layout), dtype)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.gpu
def test_bsmm_launches_on_the_operands_device():
    layout = _mask_layout("random", 2, 3, 16)
    x, values, dy, bias = (t.to("cuda:1") for t in _inputs(layout, 9, torch.float32))
    with torch.cuda.device(0):
        _close(triton_forward(x, values, layout, bias), torch_forward(x, values, layout, bias), torch.float32)
        _close(triton_grad_input(dy, values, layout), torch_grad_input(dy, values, layout), torch.float32)
        _close(triton_grad_weight(dy, x, layout), torch_grad_weight(dy, x, layout), torch.float32)


def _kept(block_size, weight_grad=False, limit=HOPPER_SHARED_MEMORY, dtype=torch.bfloat16):
    configs = matmul_configs(GRAD_WEIGHT_BLOCK_MS if weight_grad else DENSE_SPARSE_BLOCK_MS, interpret=False)
    return _ids(prune_configs(configs, {"a": torch.empty(0, dtype=dtype)}, limit, weight_grad, BLOCK_SIZE=block_size))


def _ids(configs):
    return {(c.kwargs["BLOCK_M"], c.num_warps, c.num_stages) for c in configs}


def test_prune_configs_rules():
    """Shared memory, accumulator registers and cp.async width (reports/static-sm90 shows each on sm_90)."""
    forward_128 = _kept(128)
    assert (256, 8, 2) in forward_128 and (256, 4, 2) not in forward_128  # 256 fp32 accumulator regs per thread
    assert (128, 8, 4) not in forward_128 and (128, 8, 3) in forward_128  # 4 x 64 KiB of tiles > 227 KiB
    assert _kept(128, dtype=torch.float32) < forward_128
    forward_16 = _kept(16)
    assert (64, 4, 3) in forward_16 and (64, 8, 3) not in forward_16  # 64 x 16 bf16 tile: 8 bytes per thread
    grad_weight_128 = _kept(128, weight_grad=True)
    assert (32, 4, 3) in grad_weight_128 and (128, 8, 4) not in grad_weight_128
    assert 0 < len(_kept(128, limit=64 * 1024)) < len(forward_128)
    assert len(_kept(128, limit=1024)) == 1  # nothing fits: the first config is kept so that the launch can report


@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_the_gpu_test_config_is_kept_by_every_pruner(block_size, dtype):
    """The kernel tests run every matmul at GPU_TEST_CONFIG alone on a GPU (a lone config skips the pruner): it must
    be a config the pruners keep at every block size and dtype, so those tests run a config training would run."""
    for block_ms, prune in ((DENSE_SPARSE_BLOCK_MS, prune_configs), (DENSE_SPARSE_BLOCK_MS, prune_persistent_configs),
                            (GRAD_WEIGHT_BLOCK_MS, prune_grad_weight_configs)):
        kept = prune(matmul_configs(block_ms, interpret=False), {"a": torch.empty(0, dtype=dtype)},
                     HOPPER_SHARED_MEMORY, BLOCK_SIZE=block_size)
        assert GPU_TEST_CONFIG in _ids(kept), prune


def test_the_pruners_keep_a_config_at_their_exact_limits():
    """Shared memory, accumulator and cp.async bounds are inclusive; the persistent pruner allows 64 accumulator
    registers per thread, the weight-grad rule counts the ``b x b`` accumulator (not ``BLOCK_M x b``)."""
    exact = (64 * 16 + 16 * 16) * 2 * 3  # (64, 4, 3) at b = 16 in bf16
    assert (64, 4, 3) in _kept(16, limit=exact) and (64, 4, 3) not in _kept(16, limit=exact - 1)
    bf16 = {"a": torch.empty(0, dtype=torch.bfloat16)}
    persistent = prune_persistent_configs(matmul_configs(DENSE_SPARSE_BLOCK_MS, interpret=False), bf16, BLOCK_SIZE=128)
    assert (256, 8, 2) in _kept(128) and (256, 8, 2) not in _ids(persistent)
    grad_weight = prune_configs(matmul_configs(GRAD_WEIGHT_BLOCK_MS, interpret=False), bf16, weight_grad=True,
                                accumulator_registers=64, BLOCK_SIZE=128)  # fmt: skip
    assert {c.num_warps for c in grad_weight} == {8}  # 128 x 128 fp32 over 128 threads: 128 registers each


def test_launch_sizes_of_the_persistent_grid_split_k_and_regrow_tile(monkeypatch):
    """On a GPU of 132 SMs: split-K fills 2 x 132 programs, one split per 128 tokens, at most 16; persistent programs
    per SM from double-buffered tiles in 228 KiB, at most 4, and never more programs than tiles."""
    from types import SimpleNamespace

    from smet_kernels.ops import launch_config as lc

    monkeypatch.setattr(lc, "sm_count", lambda index: 132)
    gpu = torch.device("cuda", 0)
    assert [lc.default_split_k(m, nnz, gpu) for m, nnz in ((4096, 10), (256, 10), (4096, 66), (100, 1000))] == [
        16, 2, 4, 1]
    assert lc.default_split_k(4096, 10, torch.device("cpu")) == 1
    assert [lc.persistent_programs_per_sm(*args) for args in ((256, 64, 2), (128, 128, 2), (64, 16, 4))] == [2, 1, 4]
    operand = SimpleNamespace(device=gpu, element_size=lambda: 2)
    assert lc.persistent_programs(5, 128, 128, operand) == 5 and lc.persistent_programs(10**6, 256, 64, operand) == 264
    assert [lc.regrow_tile(b * b) for b in (16, 64, 128)] == [256, 4096, 4096]


def test_precision_flags_upcast_bf16_only_in_the_interpreter_and_keep_fp32_ieee():
    from smet_kernels.ops.launch_config import precision_flags

    assert precision_flags(torch.bfloat16, interpret=True) == {"UPCAST": True, "INPUT_PRECISION": "tf32"}
    assert precision_flags(torch.bfloat16, interpret=False)["UPCAST"] is False
    assert precision_flags(torch.float32, interpret=True) == {"UPCAST": False, "INPUT_PRECISION": "ieee"}


@pytest.mark.parametrize("op", ["forward", "grad_input", "grad_weight"])
def test_an_explicit_tma_variant_is_refused_on_a_device_without_tma(op, monkeypatch):
    """Only a default ``tma`` falls back to ``grouped`` there (:func:`default_variant`); one asked for is an error."""
    from smet_kernels.ops import block_sparse_matmul as bsmm

    monkeypatch.setattr(bsmm, "tma_supported", lambda device: False)
    layout = _mask_layout("random", 2, 2, 16)
    x, values, dy, _ = _inputs(layout, 8, torch.float32)
    calls = {
        "forward": lambda: triton_forward(x, values, layout, variant="tma"),
        "grad_input": lambda: triton_grad_input(dy, values, layout, variant="tma"),
        "grad_weight": lambda: triton_grad_weight(dy, x, layout, variant="tma"),
    }
    with pytest.raises(ValueError, match="needs a GPU with the Tensor Memory Accelerator"):
        calls[op]()


def test_the_weight_grad_refuses_an_unknown_variant_given_or_from_the_environment(monkeypatch):
    layout = _mask_layout("random", 2, 2, 16)
    x, _, dy, _ = _inputs(layout, 8, torch.float32)
    with pytest.raises(ValueError, match="variant must be one of"):
        triton_grad_weight(dy, x, layout, variant="stream-k")
    monkeypatch.setenv("SMET_MATMUL_VARIANT", "stream-k")
    with pytest.raises(ValueError, match="SMET_MATMUL_VARIANT environment variable must be one of"):
        triton_grad_weight(dy, x, layout)


def test_the_weight_grad_launches_the_default_split_k_of_its_token_and_block_counts(monkeypatch):
    from smet_kernels.ops import block_sparse_matmul as bsmm

    layout = _mask_layout("random", 2, 3, 16)
    x, _, dy, _ = _inputs(layout, 100, torch.float32)
    asked, grids = [], []

    def default_split_k(m, nnz, device):
        asked.append((m, nnz, device))
        return 3

    class Recording:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    kernel = bsmm.bsmm_grad_weight_kernel
    monkeypatch.setattr(bsmm, "default_split_k", default_split_k)
    monkeypatch.setattr(bsmm, "bsmm_grad_weight_kernel", Recording())
    _close(triton_grad_weight(dy, x, layout, variant="grouped"), torch_grad_weight(dy, x, layout), torch.float32)
    assert asked == [(100, layout.nnz, x.device)] and grids == [(layout.nnz, 3)]


def test_split_k_and_persistent_program_counts_round_up_and_stay_at_least_one(monkeypatch):
    """On a GPU of 132 SMs: 200 tokens make two splits of at most 128 tokens, 264 programs over 100 blocks three
    splits; a tile too large for two buffers in an SM still gets one persistent program per SM; under the
    interpreter the persistent grid is at most 3 programs, never more than tiles."""
    from smet_kernels.ops import launch_config as lc

    monkeypatch.setattr(lc, "sm_count", lambda index: 132)
    gpu = torch.device("cuda", 0)
    assert lc.default_split_k(200, 10, gpu) == 2 and lc.default_split_k(4096, 100, gpu) == 3
    assert lc.persistent_programs_per_sm(256, 128, 4) == 1
    cpu = torch.empty(0)
    assert [lc.persistent_programs(tiles, 32, 16, cpu) for tiles in (1, 2, 3, 10)] == [1, 2, 3, 3]


def test_the_pruners_read_the_element_size_of_a_tma_descriptors_tensor():
    """The TMA kernels' first operand is a ``TensorDescriptor``: its tensor's dtype sizes the tiles, as a tensor's."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    configs = matmul_configs(DENSE_SPARSE_BLOCK_MS, interpret=False)
    for dtype in (torch.bfloat16, torch.float32):
        desc = TensorDescriptor.from_tensor(torch.empty(64, 128, dtype=dtype), [128, 128])
        kept = prune_configs(configs, {"a_desc": desc}, HOPPER_SHARED_MEMORY, BLOCK_SIZE=128)
        assert _ids(kept) == _kept(128, dtype=dtype)


@pytest.mark.skipif(not HAS_TMA, reason="needs sm_90+")
def test_the_tma_variant_copies_padded_rows_and_values_strided_along_their_last_dimension(monkeypatch):
    """An aligned base is not enough: rows of 66 bytes (``x`` padded to 33 features) and values with a stride of 2
    along their last dimension are copied too before a descriptor reads them."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    readable = []
    from_tensor = TensorDescriptor.from_tensor

    def recording(tensor, block_shape):
        readable.append(tensor.stride(-1) == 1 and tensor.stride(0) * tensor.element_size() % 16 == 0)
        return from_tensor(tensor, block_shape)

    monkeypatch.setattr(TensorDescriptor, "from_tensor", staticmethod(recording))
    layout = _mask_layout("random", 2, 2, 16)
    x, values, dy, _ = _inputs(layout, 9, torch.float16)
    padded = torch.zeros(9, 33, dtype=x.dtype, device=x.device)[:, :32].copy_(x)
    spread = torch.zeros(layout.nnz, 16, 32, dtype=x.dtype, device=x.device)[..., ::2].copy_(values)
    _close(triton_forward(padded, spread, layout, variant="tma"), torch_forward(x, values, layout), torch.float16)
    _close(triton_grad_weight(dy, padded, layout, variant="tma"), torch_grad_weight(dy, x, layout), torch.float16)
    assert len(readable) == 3 + 3 and all(readable)


def test_the_reference_forward_adds_the_bias_before_rounding_a_bf16_output_once():
    """x Wᵀ = 1 + 2^-8 and bias 2^-8 sum to 1 + 2^-7, a bf16 number; rounded to bf16 before the bias is added, the
    product would tie to 1 and so would the sum."""
    from smet_kernels.reference.matmul import torch_bsmm_forward

    x = torch.zeros(1, 16, dtype=torch.bfloat16)
    x[0, :2] = torch.tensor([1.0, 2.0**-8])
    values = torch.zeros(1, 16, 16, dtype=torch.bfloat16)
    values[0, 0, :2] = 1.0
    bias = torch.zeros(16, dtype=torch.bfloat16)
    bias[0] = 2.0**-8
    y = torch_bsmm_forward(x, values, torch.tensor([[0, 0]]), 16, bias)
    assert y.dtype == torch.bfloat16 and y[0, 0].item() == 1.0078125


@pytest.mark.parametrize("active", [True, False], ids=["active_blocks", "no_active_block"])
def test_the_reference_gradients_of_bf16_operands_are_bf16_also_without_active_blocks(active):
    from smet_kernels.reference.matmul import torch_bsmm_grad_input, torch_bsmm_grad_weight

    layout = _mask_layout("random", 2, 2, 16)
    x, values, dy, _ = _inputs(layout, 3, torch.bfloat16)
    indices = layout.block_indices if active else layout.block_indices[:0]
    values = values if active else values[:0]
    assert torch_bsmm_grad_input(dy, values, indices, 32).dtype == torch.bfloat16
    assert torch_bsmm_grad_weight(dy, x, indices, 16).dtype == torch.bfloat16


def test_the_reference_grad_weight_gathered_in_chunks_is_the_dense_gradient_at_every_active_block(monkeypatch):
    """A small gather bound cuts the slots into chunks of one: every chunk's blocks are kept, in slot order."""
    from smet_kernels.reference import matmul

    layout = _mask_layout("random", 3, 3, 16)
    x, values, dy, _ = _inputs(layout, 5, torch.float32)
    monkeypatch.setattr(matmul, "_GATHER_ELEMENTS", 1)
    assert layout.nnz > 1
    torch.testing.assert_close(matmul.torch_bsmm_grad_weight(dy, x, layout.block_indices, 16),
                               matmul.from_dense_reference(dy.t() @ x, layout))


def test_a_layout_without_blocks_gets_a_split_count_on_a_gpu_not_a_division_by_zero(monkeypatch):
    """The weight grad of an empty layout returns zeros without a launch, but asks for its split count first."""
    from smet_kernels.ops import launch_config as lc

    monkeypatch.setattr(lc, "sm_count", lambda index: 132)
    assert 1 <= lc.default_split_k(4096, 0, torch.device("cuda", 0)) <= lc.MAX_SPLIT_K
