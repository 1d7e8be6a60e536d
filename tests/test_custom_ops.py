"""The block-sparse products as ``torch.ops.smet`` custom ops: opcheck, ``torch.compile(fullgraph=True)`` of a
sparsified LLaMA, recompiles across topology updates, double backward, errors under compile, the Triton path."""

import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

from conftest import DEVICE
from smet_kernels import BlockLayout, BlockSparseLinear, block_sparse_linear, sparsify, to_dense
from smet_kernels.backend import triton_can_run
from smet_kernels.ops import library
from smet_kernels.topology import SMET
from smet_kernels.train.model import LlamaModel, lm_loss, model_config

pytestmark = pytest.mark.usefixtures("one_matmul_config")  # on a GPU: one config, not 18 autotuned per shape
B = 16
ROOT = Path(__file__).resolve().parents[1]


def _layout(seed=0, out_blocks=3, in_blocks=2):
    g = torch.Generator().manual_seed(seed)
    return BlockLayout.random(out_blocks * B, in_blocks * B, B, 0.5, generator=g)


def _operands(layout, m=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, k = layout.shape
    x = torch.randn(m, k, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    values = (torch.randn(layout.nnz, B, B, generator=g, dtype=torch.float64) / k**0.5).to(DEVICE, dtype)
    dy = torch.randn(m, n, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    bias = torch.randn(n, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    return x, values, dy, bias


def _backends():
    return ["reference"] + (["triton"] if triton_can_run(torch.device(DEVICE)) else [])


@pytest.mark.parametrize("backend", _backends())
def test_opcheck_passes_for_each_op(backend):
    layout = _layout()
    x, values, dy, bias = _operands(layout)
    index, version = layout.kernel_index(x.device), layout.version_tensor
    n, k = layout.shape
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    # the Triton backward is once-differentiable: its grad ops are checked without gradients of their own
    grads = backend == "reference"
    x2, values2, dy2 = (t.clone().requires_grad_(grads) for t in (x, values, dy))
    cases = [
        (library.bsmm_forward, (x.requires_grad_(), values.requires_grad_(), bias, index, version, version.clone(), n)),
        (library.layout_version, (version,)),
        (library.check_layout_version, (version, version.clone())),
        (library.bsmm_grad_input, (dy2, values2, index, version, version.clone(), k)),
        (library.bsmm_grad_weight, (dy2, x2, index, version, version.clone(), layout.nnz, B)),
    ]
    for op, args in cases:
        extra = () if op in (library.layout_version, library.check_layout_version) else (backend, "grouped")
        torch.library.opcheck(op, (*args, *extra), test_utils=tests)


def _sparse_llama(seed=0):
    torch.manual_seed(seed)
    model = LlamaModel(model_config("tiny", vocab_size=64, max_seq_len=32))
    return sparsify(model, density=0.5, block_size=B, generator=torch.Generator().manual_seed(seed), backend="reference")


def _loss_and_grads(model, tokens, forward=None):
    model.zero_grad(set_to_none=True)
    loss = lm_loss((model if forward is None else forward)(tokens[:, :-1]), tokens[:, 1:])
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _assert_matches_eager(backend):
    eager = _sparse_llama()
    compiled_model = _sparse_llama()
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    loss, grads = _loss_and_grads(eager, tokens)
    compiled_loss, compiled_grads = _loss_and_grads(compiled_model, tokens, compiled)
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-6)
    assert compiled_grads.keys() == grads.keys() and any(".values" in name for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_sparse_llama_matches_eager_with_aot_eager():
    _assert_matches_eager("aot_eager")


def test_compiled_sparse_llama_matches_eager_with_inductor():
    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except Exception:  # noqa: BLE001 - any failure to find a compiler means Inductor cannot build CPU kernels
        pytest.skip("no C++ compiler for Inductor's CPU kernels")
    _assert_matches_eager("inductor")


def test_topology_updates_between_compiled_steps_recompile_at_most_once():
    torch._dynamo.reset()
    model = _sparse_llama()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    smet = SMET(model, opt, update_interval=1, prune_fraction=0.3, regrow="random", seed=0)
    layout = next(m.layout for m in model.modules() if hasattr(m, "layout"))
    tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    blocks_before = layout.block_indices.clone()
    for _ in range(4):
        opt.zero_grad()
        lm_loss(compiled(tokens[:, :-1]), tokens[:, 1:]).backward()
        opt.step()
        smet.step()
    assert layout.version >= 3 and not torch.equal(layout.block_indices, blocks_before)
    assert counter.frame_count <= 2  # the first compile and at most one recompile
    # the compiled model still computes the eager function of the current topology
    torch.testing.assert_close(compiled(tokens), model(tokens), rtol=1e-5, atol=1e-6)


def test_the_traced_reference_weight_grad_recompiles_per_power_of_two_tokens_not_per_token_count():
    """Off the interpreter the reference products are ``triton_op`` bodies that a compiled backward traces: with a
    dynamic token count, the weight grad's gather chunk guarded M's exact value, so training on sequences of changing
    length recompiled at every length and failed ``fullgraph=True`` at Dynamo's recompile limit."""
    from smet_kernels.reference.matmul import torch_bsmm_grad_weight

    torch._dynamo.reset()
    layout = _layout()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(torch_bsmm_grad_weight, fullgraph=True, dynamic=True, backend=counter)
    for m in range(17, 33):  # one power-of-two range
        x, _, dy, _ = _operands(layout, m=m)
        torch.testing.assert_close(compiled(dy, x, layout.block_indices, B),
                                   torch_bsmm_grad_weight(dy, x, layout.block_indices, B))  # fmt: skip
    assert counter.frame_count == 1


def test_a_first_token_count_equal_to_a_layout_size_does_not_specialise_a_dynamic_compile():
    """Under ``dynamic=True`` the layout's tensors had symbolic sizes, duck-sized with an equal token count ``M``:
    the check of values against ``layout.nnz`` (or the split of the packed index) then fixed ``M``, and the next
    token count recompiled."""
    layout = _layout()
    layer = BlockSparseLinear(layout.shape[1], layout.shape[0], layout=layout, backend="reference").to(DEVICE)
    for first in (layout.nnz, layout.kernel_index(DEVICE).numel()):
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend=counter)
        with torch.no_grad():
            for m in (first, first + 1):
                x = _operands(layout, m=m)[0]
                torch.testing.assert_close(compiled(x), layer(x))
        assert counter.frame_count == 1, first


def test_a_token_count_known_only_at_run_time_compiles_with_fullgraph_and_gives_the_eager_gradients():
    """Tokens routed by a mask (``x[mask]``, as a mixture of experts does) have a data-dependent count: the backward
    tested ``dy.numel()`` and the reference weight grad compared it with a power of two while tracing, which Dynamo
    refuses for such a count (the dense layer compiles). The Triton launchers on a GPU are not covered here."""
    torch._dynamo.reset()
    layout = _layout()
    x, values, _, bias = _operands(layout, m=6)

    def loss(a, v, b, mask):
        return block_sparse_linear(a[mask], v, layout, b, backend="reference").square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    for mask in (torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool), torch.zeros(6, dtype=torch.bool)):
        grads = []
        for function in (loss, compiled):
            leaves = [t.clone().requires_grad_() for t in (x, values, bias)]
            with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
                function(*leaves, mask.to(DEVICE)).backward()
            grads.append([leaf.grad for leaf in leaves])
        for got, want in zip(*grads):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("wrt", ["x", "values"])
def test_double_backward_through_the_reference_matches_the_dense_layer(wrt):
    """A gradient penalty ``|dL/dx|²`` (plus ``y``), or ``|dL/dvalues|²`` (the backward of ``bsmm_grad_weight``:
    ``d dy = x Gᵀ``, ``dx = dy G``), differentiated again, against the same through ``F.linear`` of the dense W."""
    layout = _layout()
    x, values, dy, bias = (t.double() for t in _operands(layout))
    results = []
    for sparse in (True, False):
        leaves = [t.clone().requires_grad_() for t in (x, values, bias)]
        if sparse:
            y = block_sparse_linear(*leaves[:2], layout, leaves[2], backend="reference")
        else:
            y = F.linear(leaves[0], to_dense(leaves[1], layout), leaves[2])
        (grad,) = torch.autograd.grad((y * dy).square().sum(), leaves[0 if wrt == "x" else 1], create_graph=True)
        results.append(torch.autograd.grad(grad.square().sum() + (y.sum() if wrt == "x" else 0), leaves))
    for sparse_grad, dense_grad in zip(*results):
        torch.testing.assert_close(sparse_grad, dense_grad)


@pytest.mark.parametrize("fullgraph", [False, True], ids=["graph_break_allowed", "fullgraph"])
def test_bad_input_raises_naming_the_argument_under_compile(fullgraph):
    """The checks run while tracing: with graph breaks allowed the ValueError / TypeError itself reaches the caller;
    with ``fullgraph=True`` Dynamo reports it inside its own error, whose message still names the argument (torch
    2.11 lists the pieces of a formatted message instead of joining them, so the pattern spans the gap)."""
    torch._dynamo.reset()
    layout = _layout()
    x, values, _, _ = _operands(layout)
    compiled = torch.compile(lambda a, v: block_sparse_linear(a, v, layout, backend="reference"), fullgraph=fullgraph)
    value_error = torch._dynamo.exc.Unsupported if fullgraph else ValueError
    type_error = torch._dynamo.exc.Unsupported if fullgraph else TypeError
    with pytest.raises(value_error, match=r"x must have shape \[\.\.\., 32\]"):
        compiled(x[:, :-1], values)
    with pytest.raises(value_error, match=r"values[\s\S]* must have shape"):
        compiled(x, values[1:])
    with pytest.raises(type_error, match="values has dtype torch.float64 but x has dtype torch.float32"):
        compiled(x, values.double())


def test_layout_change_between_compiled_forward_and_backward_is_an_error():
    layout = _layout()
    x, values, dy, _ = _operands(layout)
    values.requires_grad_()
    compiled = torch.compile(lambda a, v: block_sparse_linear(a, v, layout, backend="reference"), backend="aot_eager")
    y = compiled(x, values)
    layout.replace_blocks(torch.tensor([0]), (~layout.mask).nonzero()[:1])
    with pytest.raises(RuntimeError, match="layout"):
        y.backward(dy)


_TRITON_OP_REGISTRATION = """
import torch
from torch._inductor import cpp_builder
from torch.library import triton_op
from smet_kernels import BlockLayout, block_sparse_linear
from smet_kernels.ops import library

assert library._register is triton_op
layout = BlockLayout.random(48, 32, 16, 0.5, generator=torch.Generator().manual_seed(0))
x, dy = torch.randn(5, 32), torch.randn(5, 48)
values = torch.randn(layout.nnz, 16, 16)
index, version = layout.kernel_index(x.device), layout.version_tensor
tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
for op, args in [
    (library.bsmm_forward, (x.requires_grad_(), values.requires_grad_(), None, index, version, version.clone(), 48)),
    (library.bsmm_grad_input, (dy, values, index, version, version.clone(), 32)),
    (library.bsmm_grad_weight, (dy, x, index, version, version.clone(), layout.nnz, 16)),
]:
    torch.library.opcheck(op, (*args, "reference", "grouped"), test_utils=tests)
try:
    cpp_builder.get_cpp_compiler()
    backends = ["aot_eager", "inductor"]
except Exception:  # noqa: BLE001 - no C++ compiler: Inductor cannot build CPU kernels
    backends = ["aot_eager"]
for backend in backends:
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, v: block_sparse_linear(a, v, layout, backend="reference"), backend=backend)
    y = compiled(x.detach(), values)
    layout.replace_blocks(torch.tensor([0]), (~layout.mask).nonzero()[:1])
    try:
        y.backward(dy)
    except RuntimeError as error:
        assert "layout" in str(error), error
    else:
        raise AssertionError(f"{backend}: a layout change between forward and backward went unnoticed")
# activation checkpointing: the forward's snapshots are saved (not recomputed), no recompile per topology update
from torch._dynamo.testing import CompileCounterWithBackend
from smet_kernels import sparsify
from smet_kernels.topology import SMET
from smet_kernels.train.model import LlamaModel, lm_loss, model_config

torch._dynamo.reset()
torch.manual_seed(0)
model = sparsify(LlamaModel(model_config("tiny", vocab_size=64, max_seq_len=32)), density=0.5, block_size=16,
                 backend="reference")
model.activation_checkpointing = True
counter = CompileCounterWithBackend("aot_eager")
compiled = torch.compile(model, fullgraph=True, backend=counter)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
smet = SMET(model, opt, update_interval=1, prune_fraction=0.3, regrow="random", seed=0)
tokens = torch.randint(0, 64, (2, 17))
for _ in range(3):
    lm_loss(compiled(tokens[:, :-1]), tokens[:, 1:]).backward()
    opt.step()
    smet.step()
assert counter.frame_count <= 2, counter.frame_count
loss = lm_loss(compiled(tokens[:, :-1]), tokens[:, 1:])
layout = model.layers[0].attn.q_proj.layout
layout.replace_blocks(torch.tensor([0]), (~layout.mask).nonzero()[:1])
try:
    loss.backward()
except RuntimeError as error:
    assert "layout" in str(error), error
else:
    raise AssertionError("checkpointed: a layout change between forward and backward went unnoticed")
print("checked", *backends, "checkpointed")
"""


def _run_without_interpreter(code: str) -> str:
    """stdout of ``code`` in a fresh Python without ``TRITON_INTERPRET`` (conftest sets it for this process)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(SMET_BACKEND="reference", TORCHINDUCTOR_FORCE_DISABLE_CACHES="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                            cwd=ROOT)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_layout_change_under_compile_is_an_error_with_the_triton_op_registration():
    """Without ``TRITON_INTERPRET`` the products are ``triton_op``s, whose bodies AOTAutograd traces: the version
    check must still run on the live version tensor, also with activation checkpointing."""
    assert "checkpointed" in _run_without_interpreter(_TRITON_OP_REGISTRATION)


_TRACED_TMA = """
import dataclasses
import warnings
import torch
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch.fx.experimental.proxy_tensor import make_fx
from smet_kernels import BlockLayout
from smet_kernels.layout import BlockIndex
from smet_kernels.ops import block_sparse_matmul as bsmm

layout = BlockLayout.random(48, 32, 16, 0.5, generator=torch.Generator().manual_seed(0))
index = layout.row_index("cpu")
forward = lambda x, v, *index: bsmm.triton_bsmm_forward(x, v, BlockIndex(*index), 48, variant="tma")
grad_weight = lambda dy, x, indices: bsmm.triton_bsmm_grad_weight(dy, x, indices, 16, variant="tma")
x, dy, values = torch.randn(5, 32), torch.randn(5, 48), torch.randn(layout.nnz, 16, 16)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    graphs = [make_fx(forward, tracing_mode="fake")(x, values, *dataclasses.astuple(index)),
              make_fx(grad_weight, tracing_mode="fake")(dy, x, layout.block_indices_on("cpu"))]
kernels = [kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).base_fn.__name__ for g in graphs
           for node in g.graph.nodes if node.target is torch.ops.higher_order.triton_kernel_wrapper_mutation]
assert kernels == ["bsmm_dense_sparse_kernel", "bsmm_grad_weight_kernel"], kernels
assert sum("runs as 'grouped' under torch.compile" in str(w.message) for w in caught) == 1, caught
print("grouped")
"""


def test_the_tma_variant_traces_as_grouped_with_one_warning():
    """Traced (fake tensors, ``wrap_triton``), ``tma`` needs data pointers and an autotune ``pre_hook``, neither
    traceable: the launchers trace the grouped kernels instead and warn once."""
    assert "grouped" in _run_without_interpreter(_TRACED_TMA)


def test_a_meta_model_runs_through_the_ops():
    model = sparsify(LlamaModel(model_config("tiny", vocab_size=64), device="meta"), density=0.5, block_size=B)
    logits = model(torch.zeros(2, 8, dtype=torch.long, device="meta"))
    assert logits.shape == (2, 8, 64) and logits.device.type == "meta"


# ---------------------------------------------------------------- the Triton path: it runs, and is as exact as PyTorch
needs_triton = pytest.mark.skipif(not triton_can_run(torch.device(DEVICE)), reason="Triton cannot run here")


def _error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return (approx.double() - exact).abs().max().item()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_triton_products_are_as_accurate_as_pytorch_in_the_same_dtype(dtype):
    """err(kernel vs fp64) <= 2 err(F.linear / matmul in ``dtype`` vs fp64) + tiny: a bf16 accumulator or a
    truncating store would exceed it."""
    layout = _layout(out_blocks=4, in_blocks=6)
    x, values, dy, bias = _operands(layout, m=33, dtype=dtype)
    x.requires_grad_()
    values.requires_grad_()
    w = to_dense(values.detach(), layout)
    with mock.patch.object(library, "triton_bsmm_forward", wraps=library.triton_bsmm_forward) as forward, \
         mock.patch.object(library, "triton_bsmm_grad_input", wraps=library.triton_bsmm_grad_input) as grad_input, \
         mock.patch.object(library, "triton_bsmm_grad_weight", wraps=library.triton_bsmm_grad_weight) as grad_weight:  # fmt: skip
        y = block_sparse_linear(x, values, layout, bias, backend="triton")
        dx, dvalues = torch.autograd.grad(y, (x, values), dy)
    assert forward.call_count == grad_input.call_count == grad_weight.call_count == 1
    x64, w64, dy64, bias64 = x.detach().double(), w.double(), dy.double(), bias.double()
    tiny = 1e-6
    y_exact = F.linear(x64, w64, bias64)
    assert _error(y, y_exact) <= 2 * _error(F.linear(x.detach(), w, bias), y_exact) + tiny
    dx_exact = dy64 @ w64
    assert _error(dx, dx_exact) <= 2 * _error(dy @ w, dx_exact) + tiny
    dw_exact = dy64.t() @ x64
    dw_torch = dy.t() @ x.detach()
    idx = layout.block_indices
    blocks = lambda dw: dw.reshape(4, B, 6, B).permute(0, 2, 1, 3)[idx[:, 0], idx[:, 1]]  # noqa: E731
    assert _error(dvalues, blocks(dw_exact)) <= 2 * _error(blocks(dw_torch), blocks(dw_exact)) + tiny


@needs_triton
def test_eager_launches_skip_wrap_triton_and_only_traced_ones_use_it():
    """An eager call of a launcher outside the ``triton_op`` (kernel tests, benchmarks, gpu-check) launches the kernel
    itself: through ``wrap_triton`` each launch would be a higher-order-op dispatch (torch 2.11: slow, and it refuses
    the TMA configs' ``pre_hook`` and interpreted kernels)."""
    from smet_kernels.ops import block_sparse_matmul as bsmm
    from smet_kernels.ops import variant

    layout = _layout()
    x, values, dy, _ = _operands(layout)
    # as on a GPU: interpreted kernels are never wrapped, so pretend they are compiled ones
    with mock.patch.object(bsmm, "wrap_triton", wraps=bsmm.wrap_triton) as wrap, \
         mock.patch.object(bsmm, "INTERPRET", False):  # fmt: skip
        library.bsmm_forward(x, values, None, layout.kernel_index(x.device), layout.version_tensor,
                             layout.version_tensor.clone(), layout.shape[0], "triton", "grouped")  # fmt: skip
        bsmm.triton_bsmm_grad_weight(dy, x, layout.block_indices_on(x.device), B, split_k=2, variant="grouped")
        assert wrap.call_count == 0
        bsmm._launchable(bsmm.bsmm_grad_weight_kernel, traced=True)
        assert wrap.call_count == 1
    assert not variant.tracing(x, values)


def test_only_graph_recording_dispatch_modes_count_as_tracing():
    """Fake tensors and AOTAutograd's / ``make_fx``'s modes record a graph; a dispatch mode that runs the call on
    real tensors does not — selective activation checkpointing (``smet_kernels.recompute``), a user's pass-through
    mode — so ``tma`` is not silently replaced by ``grouped`` there."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils._python_dispatch import TorchDispatchMode

    from smet_kernels.ops import variant
    from smet_kernels.recompute import checkpoint

    class PassThrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append((variant.tracing(x), variant.traceable_variant("tma", x)))
            return x.sin()

    seen: list = []
    x = torch.randn(3, 4, requires_grad=True)
    checkpoint(Probe(), x).sum().backward()  # the forward, then its recompute
    with PassThrough():
        Probe()(x)
    assert seen == [(False, "tma")] * 3
    with FakeTensorMode() as fake:
        assert variant.tracing(fake.from_tensor(x))
    make_fx(lambda t: seen.append(variant.tracing(t)) or t.sin())(torch.randn(3))  # real tensors, a proxy mode
    assert seen[-1] is True


def test_a_fake_tensor_or_a_fake_mode_alone_counts_as_tracing_and_only_tma_is_replaced():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from smet_kernels.ops import variant

    with FakeTensorMode() as fake:
        assert variant.tracing() and variant.tracing(torch.randn(2))  # the mode, without a fake operand
        x = fake.from_tensor(torch.randn(2))
    assert variant.tracing(x) and not variant.tracing(torch.randn(2))  # a fake operand, outside the mode
    variant._warn_tma_traced.cache_clear()  # warned once per process
    with pytest.warns(UserWarning, match="runs as 'grouped' under torch.compile"):
        assert variant.traceable_variant("tma", x) == "grouped"
    assert [variant.traceable_variant(name, x) for name in ("grouped", "persistent")] == ["grouped", "persistent"]


@needs_triton
def test_compiled_layer_runs_the_triton_kernels():
    layout = _layout()
    x, values, dy, _ = _operands(layout)
    values.requires_grad_()
    compiled = torch.compile(lambda a, v: block_sparse_linear(a, v, layout, backend="triton").relu(),
                             fullgraph=True, backend="aot_eager")  # fmt: skip
    with mock.patch.object(library, "triton_bsmm_forward", wraps=library.triton_bsmm_forward) as forward:
        y = compiled(x, values)
    # called once by the opaque op under the interpreter; on a GPU AOTAutograd traces the triton_op's body (fake
    # tensors, more than once) into the graph, whose wrapped kernel then runs without calling the launcher again
    assert forward.called
    y.backward(dy)
    expected = torch.relu(x @ to_dense(values.detach(), layout).t())
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_fake_implementations_give_the_shapes_and_dtypes_of_the_real_ops(dtype):
    """What ``torch.compile`` traces with: meta tensors of a non-square layout (N=48, K=32, M=5) in ``dtype``."""
    layout = _layout()
    n, k = layout.shape
    x, values, dy = (torch.empty(*shape, dtype=dtype, device="meta") for shape in ((5, k), (layout.nnz, B, B), (5, n)))
    bias = torch.empty(n, dtype=dtype, device="meta")
    index, version = layout.kernel_index("meta"), layout.version_tensor
    y = library.bsmm_forward(x, values, bias, index, version, version.clone(), n, "reference", "grouped")
    dx = library.bsmm_grad_input(dy, values, index, version, version.clone(), k, "reference", "grouped")
    dvalues = library.bsmm_grad_weight(dy, x, index, version, version.clone(), layout.nnz, B, "reference", "grouped")
    assert [(tuple(t.shape), t.dtype, t.device.type) for t in (y, dx, dvalues)] == [
        ((5, n), dtype, "meta"), ((5, k), dtype, "meta"), ((layout.nnz, B, B), dtype, "meta")]


@needs_triton
def test_each_op_launches_the_variant_it_is_given_not_the_default(monkeypatch):
    """The caller resolves the variant (a graph constant): the ops pass it on rather than read the default again."""
    monkeypatch.delenv("SMET_MATMUL_VARIANT", raising=False)
    layout = _layout()
    x, values, dy, bias = _operands(layout)
    index, version = layout.kernel_index(x.device), layout.version_tensor
    n, k = layout.shape
    launchers = ("triton_bsmm_forward", "triton_bsmm_grad_input", "triton_bsmm_grad_weight")
    spies = [mock.patch.object(library, name, wraps=getattr(library, name)) for name in launchers]
    with spies[0] as forward, spies[1] as grad_input, spies[2] as grad_weight:
        library.bsmm_forward(x, values, bias, index, version, version.clone(), n, "triton", "persistent")
        library.bsmm_grad_input(dy, values, index, version, version.clone(), k, "triton", "persistent")
        library.bsmm_grad_weight(dy, x, index, version, version.clone(), layout.nnz, B, "triton", "persistent")
    assert [op.call_args.kwargs["variant"] for op in (forward, grad_input, grad_weight)] == ["persistent"] * 3


def test_a_functionalization_mode_alone_counts_as_tracing():
    """AOTAutograd's functional mode records a graph too, before any fake or proxy mode is seen."""
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    from smet_kernels.ops import variant

    assert not variant.tracing()
    with FunctionalTensorMode():
        assert variant.tracing()


_RUN_TIME_COUNT_TRACE = r"""
import sys, torch
from unittest import mock
from torch._functorch.aot_autograd import aot_module_simplified
from smet_kernels.layout import BlockLayout
from smet_kernels.ops import launch_config, library
layout = BlockLayout.random(64, 64, 16, 0.5, generator=torch.Generator().manual_seed(0))
index, version = layout.kernel_index("cpu"), layout.version_tensor
class Traced(Exception):
    pass
launches = []
def partition(joint, *args, **kwargs):  # the joint forward + backward graph, traced through the triton_op bodies
    launches.append(sum("triton_kernel_wrapper" in str(node.target) for node in joint.graph.nodes))
    raise Traced()
def backend(gm, inputs):
    return aot_module_simplified(gm, inputs, fw_compiler=None, partition_fn=partition)
def loss(a, v, b, mask):
    y = torch.ops.smet.bsmm_forward(a[mask], v, b, index, version, library.layout_version(version), 64, "triton",
                                    sys.argv[1])
    return y.square().sum()
leaves = [torch.randn(6, 64, requires_grad=True), torch.randn(layout.nnz, 16, 16, requires_grad=True),
          torch.randn(64, requires_grad=True)]
torch._dynamo.config.capture_dynamic_output_shape_ops = True
real = launch_config.default_split_k
# the weight grad's split-K as on an H100 / H200 (132 SMs), which a CPU-only machine cannot report
with mock.patch.object(launch_config, "sm_count", lambda index: 132), mock.patch(
        "smet_kernels.ops.block_sparse_matmul.default_split_k",
        lambda m, nnz, device: real(m, nnz, torch.device("cuda", 0))):
    try:
        torch.compile(loss, fullgraph=True, backend=backend)(*leaves, torch.tensor([1, 0, 1, 1, 0, 1]).bool())
    except Exception as error:
        if "Traced" not in repr(error):
            raise
print(launches)
"""


@pytest.mark.parametrize("variant", ["grouped", "persistent"])
def test_a_token_count_known_only_at_run_time_traces_through_the_triton_launchers(variant):
    """Off the interpreter (a GPU) AOTAutograd traces the ``triton_op`` bodies, so the launchers see the run-time
    token count of ``x[mask]`` too: they tested ``m == 0``, the weight grad's split-K and the persistent grid
    compared it (a GuardOnDataDependentSymNode under ``fullgraph``). Traced here in a child process without the
    interpreter, on CPU tensors (nothing launches): the joint graph holds the three kernels."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", _RUN_TIME_COUNT_TRACE, variant], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == "[3]", result.stdout
