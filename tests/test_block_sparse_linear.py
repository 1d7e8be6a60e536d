"""``block_sparse_linear``, the autograd function over the block-sparse products (tests/test_bsmm.py checks the
kernels): triton vs reference outputs and gradients for any leading shape, with or without bias, only the gradients
asked for, its default variant, checks that name the bad argument, strided operands, autocast, fp64, double backward
and ``torch.compile``; and the dense conversions ``to_dense`` / ``from_dense``."""

import pytest
import torch

from bsmm_cases import HAS_TMA, _close, _inputs, _mask_layout
from conftest import DEVICE, torch_forward, torch_grad_weight
from smet_kernels import block_sparse_linear, from_dense, to_dense

pytestmark = pytest.mark.usefixtures("one_matmul_config")  # on a GPU: one config, not 18 autotuned per shape


@pytest.mark.skipif(not HAS_TMA, reason="needs sm_90+: an older GPU runs a default tma as grouped")
def test_block_sparse_linear_runs_the_default_variant_in_forward_and_backward(monkeypatch):
    """With :data:`DEFAULT_VARIANT` set to ``tma`` (as the measured winner would be), a layer runs the TMA kernels
    for its three products and matches the reference in outputs and gradients."""
    from smet_kernels.ops import block_sparse_matmul as bsmm
    from smet_kernels.ops import variant

    launched = []
    for name in ("bsmm_dense_sparse_tma_kernel", "bsmm_grad_weight_tma_kernel"):
        kernel = getattr(bsmm, name)
        monkeypatch.setattr(bsmm, name, _Recording(kernel, name, launched))
    monkeypatch.setattr(variant, "DEFAULT_VARIANT", "tma")
    monkeypatch.delenv("SMET_MATMUL_VARIANT", raising=False)
    layout = _mask_layout("empty_rows_cols", 3, 2, 16)
    x, values, dy, bias = _inputs(layout, 21, torch.float32)
    grads = {}
    for backend in ("triton", "reference"):
        leaves = [t.clone().requires_grad_() for t in (x, values, bias)]
        block_sparse_linear(*leaves[:2], layout, leaves[2], backend=backend).backward(dy)
        grads[backend] = [leaf.grad for leaf in leaves]
    for got, want in zip(grads["triton"], grads["reference"]):
        _close(got, want, torch.float32)
    assert launched == ["bsmm_dense_sparse_tma_kernel"] * 2 + ["bsmm_grad_weight_tma_kernel"]


class _Recording:
    """A kernel whose launches (``kernel[grid](...)``) are recorded by name."""

    def __init__(self, kernel, name, launched):
        self.kernel, self.name, self.launched = kernel, name, launched

    def __getitem__(self, grid):
        self.launched.append(self.name)
        return self.kernel[grid]


@pytest.mark.parametrize("lead_shape", [(7,), (2, 3), (1, 5, 3), (1,)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_block_sparse_linear_autograd_triton_vs_reference(lead_shape, with_bias):
    dtype = torch.float32
    layout = _mask_layout("random", 2, 3, 16)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(*lead_shape, layout.shape[1], generator=g).to(DEVICE, dtype)
    values = torch.randn(layout.nnz, 16, 16, generator=g).to(DEVICE, dtype)
    bias = torch.randn(layout.shape[0], generator=g).to(DEVICE, dtype) if with_bias else None
    dy = torch.randn(*lead_shape, layout.shape[0], generator=g).to(DEVICE, dtype)
    results = {}
    for backend in ("triton", "reference"):
        leaves = [t.clone().requires_grad_() for t in (x, values) + ((bias,) if with_bias else ())]
        y = block_sparse_linear(leaves[0], leaves[1], layout, leaves[2] if with_bias else None, backend=backend)
        y.backward(dy)
        results[backend] = [y] + [leaf.grad for leaf in leaves]
    assert results["triton"][0].shape == (*lead_shape, layout.shape[0])
    for got, want in zip(results["triton"], results["reference"]):
        _close(got, want, dtype)


def test_torch_bsmm_matches_dense_linear_and_gradcheck():
    layout = _mask_layout("empty_rows_cols", 3, 2, 16)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, layout.shape[1], dtype=torch.float64, generator=g, requires_grad=True)
    values = torch.randn(layout.nnz, 16, 16, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(layout.shape[0], dtype=torch.float64, generator=g, requires_grad=True)
    y = block_sparse_linear(x, values, layout, bias, backend="reference")
    torch.testing.assert_close(y, torch.nn.functional.linear(x, to_dense(values, layout), bias))
    assert torch.autograd.gradcheck(
        lambda a, v, c: block_sparse_linear(a, v, layout, c, backend="reference"), (x, values, bias)
    )


@pytest.mark.parametrize("lead_shape", [(), (3,), (2, 3)], ids=str)
def test_any_leading_shape_gives_the_dense_layer_output_and_a_bias_gradient_summed_over_tokens(lead_shape):
    """A 1-D ``x [K]`` gives ``y [N]`` like ``F.linear``; ``dbias`` is ``dy`` summed over every leading dim."""
    layout = _mask_layout("random", 2, 3, 16)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*lead_shape, layout.shape[1], generator=g, dtype=torch.float64).to(DEVICE)
    values = torch.randn(layout.nnz, 16, 16, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    bias = torch.randn(layout.shape[0], generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    dy = torch.randn(*lead_shape, layout.shape[0], generator=g, dtype=torch.float64).to(DEVICE)
    y = block_sparse_linear(x, values, layout, bias, backend="reference")
    expected = torch.nn.functional.linear(x, to_dense(values.detach(), layout), bias.detach())
    assert y.shape == expected.shape == (*lead_shape, layout.shape[0])
    torch.testing.assert_close(y, expected)
    y.backward(dy)
    torch.testing.assert_close(bias.grad, dy.reshape(-1, layout.shape[0]).sum(0))


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True)])
def test_only_the_requested_gradients(needs):
    layout = _mask_layout("random", 2, 3, 16)
    x, values, dy, bias = _inputs(layout, 6, torch.float32)
    grads = {}
    for backend in ("triton", "reference"):
        leaves = [t.clone().requires_grad_(need) for t, need in zip((x, values, bias), needs)]
        block_sparse_linear(leaves[0], leaves[1], layout, leaves[2], backend=backend).backward(dy)
        assert [leaf.grad is not None for leaf in leaves] == list(needs)
        grads[backend] = next(leaf.grad for leaf in leaves if leaf.grad is not None)
    _close(grads["triton"], grads["reference"], torch.float32)


def test_to_dense_from_dense_round_trip():
    layout = _mask_layout("random", 3, 5, 16)
    values = torch.randn(layout.nnz, 16, 16)
    dense = to_dense(values, layout)
    assert torch.equal(from_dense(dense, layout), values)
    blocks = dense.reshape(3, 16, 5, 16).abs().sum((1, 3)) > 0
    assert torch.equal(blocks, layout.mask)


def test_from_dense_refuses_a_weight_of_another_shape_than_the_layout():
    layout = _mask_layout("random", 3, 5, 16)
    with pytest.raises(ValueError, match=r"^weight must have the layout's shape \(48, 80\), got \(80, 48\)"):
        from_dense(torch.ones(80, 48), layout)


def test_to_dense_and_from_dense_refuse_a_layout_or_a_weight_of_another_type_naming_it():
    layout = _mask_layout("random", 3, 5, 16)
    values, weight = torch.ones(layout.nnz, 16, 16), torch.ones(layout.shape)
    for convert, operand in ((to_dense, values), (from_dense, weight)):
        with pytest.raises(TypeError, match="^layout must be a BlockLayout, got str$"):
            convert(operand, "dense")
    with pytest.raises(TypeError, match="^weight must be a torch.Tensor, got list$"):
        from_dense(weight.tolist(), layout)


def test_a_2d_input_gets_the_output_of_the_op_itself_not_a_view():
    layout = _mask_layout("random", 2, 2, 16)
    x, values, _, _ = _inputs(layout, 4, torch.float32)
    assert not block_sparse_linear(x, values, layout, backend="reference")._is_view()
    assert block_sparse_linear(x[None], values, layout, backend="reference").shape == (1, 4, 32)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_from_dense_refuses_a_weight_that_is_not_floating_point_as_to_dense_does(dtype):
    layout = _mask_layout("random", 3, 5, 16)
    with pytest.raises(TypeError, match="^weight must be a floating tensor"):
        from_dense(torch.ones(layout.shape, dtype=dtype), layout)
    with pytest.raises(TypeError, match="^values must be a floating tensor"):
        to_dense(torch.ones(layout.nnz, 16, 16, dtype=dtype), layout)


def test_non_contiguous_input_is_accepted():
    layout = _mask_layout("random", 2, 2, 16)
    x, values, _, _ = _inputs(layout, 8, torch.float32)
    x_t = x.t().contiguous().t()  # same values, column-major strides
    assert not x_t.is_contiguous()
    _close(block_sparse_linear(x_t, values, layout), torch_forward(x, values, layout), torch.float32)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_non_contiguous_values_are_read_by_their_strides(backend):
    layout = _mask_layout("random", 2, 3, 16)
    x, values, _, _ = _inputs(layout, 5, torch.float32)
    values_t = values.transpose(1, 2).contiguous().transpose(1, 2)  # same values, each block column-major
    assert not values_t.is_contiguous()
    _close(block_sparse_linear(x, values_t, layout, backend=backend), torch_forward(x, values, layout), torch.float32)


def test_non_contiguous_bias_is_read_by_its_strides():
    layout = _mask_layout("random", 2, 3, 16)
    x, values, _, _ = _inputs(layout, 5, torch.float32)
    strided_bias = torch.randn(2 * layout.shape[0], generator=torch.Generator().manual_seed(1)).to(DEVICE)[::2]
    assert not strided_bias.is_contiguous()
    _close(
        block_sparse_linear(x, values, layout, strided_bias, backend="triton"),
        torch_forward(x, values, layout, strided_bias.contiguous()),
        torch.float32,
    )


@pytest.mark.parametrize(
    "mutate, exc, word",
    [
        (lambda a: {**a, "x": a["x"][:, :-1]}, ValueError, "x must have shape"),
        (lambda a: {**a, "x": a["x"].tolist()}, TypeError, "x must be a torch.Tensor"),
        (lambda a: {**a, "x": a["x"].to(torch.int32)}, TypeError, "x must be a floating"),
        (lambda a: {**a, "values": a["values"][:-1]}, ValueError, "values must have shape"),
        (lambda a: {**a, "values": a["values"].half()}, TypeError, "values has dtype"),
        (lambda a: {**a, "values": a["values"].to(torch.int64)}, TypeError, "values must be a floating"),
        (lambda a: {**a, "bias": a["values"].new_zeros(3)}, ValueError, "bias must have shape"),
        (lambda a: {**a, "bias": a["bias"].double()}, TypeError, "bias has dtype"),
        (lambda a: {**a, "layout": "dense"}, TypeError, "layout must be a BlockLayout"),
        (lambda a: {**a, "backend": "cuda"}, ValueError, "backend must be one of"),
        (lambda a: {**a, "x": a["x"].double(), "values": a["values"].double(), "bias": None, "backend": "triton"},
         TypeError, "not supported by the triton backend"),
        (lambda a: {**a, "x": a["x"][0, 0]}, ValueError, "x must have shape"),
        (lambda a: {**a, "bias": a["bias"].tolist()}, TypeError, "bias must be a torch.Tensor or None"),
        (lambda a: {**a, "values": a["values"].to("meta")}, ValueError, "values is on meta but x is on"),
        (lambda a: {**a, "bias": a["bias"].to("meta")}, ValueError, "bias is on meta but x is on"),
    ],
)
def test_bad_input_raises_naming_the_argument(mutate, exc, word):
    layout = _mask_layout("random", 2, 2, 16)
    x, values, _, bias = _inputs(layout, 4, torch.float32)
    args = mutate({"x": x, "values": values, "layout": layout, "bias": bias, "backend": None})
    with pytest.raises(exc, match=word):
        block_sparse_linear(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device type: CUDA")
@pytest.mark.gpu
def test_device_mismatch_raises():
    layout = _mask_layout("random", 2, 2, 16)
    x, values, _, _ = _inputs(layout, 4, torch.float32)
    with pytest.raises(ValueError, match="values is on"):
        block_sparse_linear(x, values.cpu(), layout)


def test_layout_change_between_forward_and_backward_is_an_error():
    layout = _mask_layout("random", 2, 2, 16)
    x, values, dy, _ = _inputs(layout, 4, torch.float32)
    values.requires_grad_()
    y = block_sparse_linear(x, values, layout, backend="reference")
    layout.replace_blocks(torch.tensor([0]), (~layout.mask).nonzero()[:1])
    with pytest.raises(RuntimeError, match="layout"):
        y.backward(dy)


@pytest.mark.parametrize("wrt", ["x", "values"])
def test_double_backward_through_the_triton_kernels_raises(wrt):
    """Differentiating the Triton input or weight gradient again raises: the penalty term must not be silently
    dropped."""
    layout = _mask_layout("random", 2, 2, 16)
    x, values, _, _ = _inputs(layout, 4, torch.float32)
    x.requires_grad_()
    values.requires_grad_()
    y = block_sparse_linear(x, values, layout, backend="triton")
    (grad,) = torch.autograd.grad(y.square().sum(), x if wrt == "x" else values, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        (grad.square().sum() + (y.sum() if wrt == "x" else 0)).backward()


def test_autocast_bf16_gives_bf16_output_and_fp32_gradients():
    layout = _mask_layout("random", 2, 2, 16)
    x, values, dy, bias = _inputs(layout, 4, torch.float32)
    leaves = [t.requires_grad_() for t in (x, values, bias)]
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        y = block_sparse_linear(x, values, layout, bias)
    assert y.dtype == torch.bfloat16
    y.backward(dy.to(torch.bfloat16))
    assert all(leaf.grad.dtype == torch.float32 for leaf in leaves)
    _close(values.grad, torch_grad_weight(dy, x.detach(), layout), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_under_autocast_the_op_computes_in_the_autocast_dtype(dtype):
    """fp32 operands under ``autocast(dtype)`` give the op on the operands cast to ``dtype`` (output in ``dtype``)."""
    layout = _mask_layout("random", 2, 2, 16)
    x, values, _, bias = _inputs(layout, 4, torch.float32)
    with torch.autocast(torch.device(DEVICE).type, dtype=dtype):
        y = block_sparse_linear(x, values, layout, bias, backend="reference")
    assert y.dtype == dtype
    _close(y, block_sparse_linear(x.to(dtype), values.to(dtype), layout, bias.to(dtype), backend="reference"), dtype)


def test_under_autocast_fp64_operands_stay_fp64_as_for_a_dense_linear():
    """Autocast leaves fp64 tensors alone (``F.linear``, so a dense or masked layer, gives fp64); the op cast them to
    bf16 and gave a bf16 output rounded to 3 digits."""
    layout = _mask_layout("random", 2, 2, 16)
    x, values, _, bias = _inputs(layout, 4, torch.float64)
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        y = block_sparse_linear(x, values, layout, bias, backend="reference")
        expected = torch.nn.functional.linear(x, to_dense(values, layout), bias)
    assert y.dtype == expected.dtype == torch.float64
    torch.testing.assert_close(y, expected)


def test_under_autocast_the_reference_rounds_a_bf16_output_with_bias_once_as_without_autocast():
    """The op's body ran inside the caller's autocast: its fp32 product was rounded to bf16, the bias added, and the
    sum rounded again, off by one bf16 step in a quarter of the outputs (eager only: a compiled graph was right)."""
    layout = _mask_layout("dense", 4, 8, 16)
    x, values, _, bias = _inputs(layout, 16, torch.float32)
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        y = block_sparse_linear(x, values, layout, bias, backend="reference")
    bf16 = [t.to(torch.bfloat16) for t in (x, values, bias)]
    assert torch.equal(y, block_sparse_linear(*bf16[:2], layout, bf16[2], backend="reference"))


def test_fp64_under_the_auto_backend_falls_back_to_the_reference():
    """Triton has no fp64 kernels: ``auto`` (the default) runs fp64 through the reference instead of refusing it."""
    layout = _mask_layout("random", 2, 2, 16)
    x, values, _, bias = _inputs(layout, 4, torch.float64)
    y = block_sparse_linear(x, values, layout, bias, backend="auto")
    torch.testing.assert_close(y, torch.nn.functional.linear(x, to_dense(values, layout), bias))


def test_fp64_under_a_global_triton_backend_is_refused_as_under_backend_triton(monkeypatch):
    """``set_backend("triton")`` (or ``SMET_BACKEND=triton``) asks for the kernels as ``backend="triton"`` does: fp64
    is refused by name, not run through the reference in silence."""
    from smet_kernels import backend

    monkeypatch.setattr(backend, "_backend", "triton")
    layout = _mask_layout("random", 2, 2, 16)
    x, values, _, _ = _inputs(layout, 4, torch.float64)
    with pytest.raises(TypeError, match="not supported by the triton backend"):
        block_sparse_linear(x, values, layout)


def test_torch_compile_traces_the_layer():
    layout = _mask_layout("random", 2, 2, 16)
    x, values, dy, _ = _inputs(layout, 4, torch.float32)
    values.requires_grad_()

    def layer(a, v):
        return torch.relu(block_sparse_linear(a, v, layout, backend="triton"))

    compiled = torch.compile(layer, backend="eager")
    y = compiled(x, values)
    y.backward(dy)
    expected = torch.relu(torch_forward(x, values.detach(), layout))
    _close(y, expected, torch.float32)
    _close(values.grad, torch_grad_weight(dy * (expected > 0), x, layout), torch.float32)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_a_layer_step_reads_nothing_back_and_rebuilds_no_index(backend, readbacks, monkeypatch):
    """Forward and backward of a ``BlockSparseLinear`` read no tensor back to the host (on CUDA a GPU sync each)
    but the CPU version counters that the backward compares, and neither rebuild nor re-check the layout's indices
    (built once per layout version; a topology update rewrites them)."""
    from smet_kernels import layout as layout_module
    from smet_kernels.modules import BlockSparseLinear

    layer = BlockSparseLinear(64, 96, density=0.5, block_size=16, bias=True, device=DEVICE, backend=backend)
    rebuilt = []
    for owner, name in ((layout_module, "_compressed_index"), (layout_module.BlockLayout, "_check_indices")):
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _real=real, _name=name: rebuilt.append(_name) or _real(*a))
    x = torch.randn(2, 5, 64, device=DEVICE, requires_grad=True)
    for _ in range(2):
        readbacks.counting = True
        layer(x).square().sum().backward()
        readbacks.counting = False
        assert readbacks.take() == [] and rebuilt == []
    assert layer.layout.version_tensor.device.type == "cpu"  # what check_layout_version reads back


def test_a_frozen_layer_saves_no_input_and_a_constant_input_saves_no_values():
    """dx needs only the values and dvalues only x: what no gradient needs is not kept for the backward."""
    layout = _mask_layout("random", 2, 3, 16)
    x, values, _, _ = _inputs(layout, 6, torch.float32)
    for needs_x in (True, False):
        leaves = [x.clone().requires_grad_(needs_x), values.clone().requires_grad_(not needs_x)]
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.untyped_storage().data_ptr()) or t,
                                                      lambda t: t):  # fmt: skip
            block_sparse_linear(*leaves, layout, backend="reference")
        kept, unneeded = (leaves[1], leaves[0]) if needs_x else (leaves[0], leaves[1])
        assert kept.untyped_storage().data_ptr() in saved
        assert unneeded.untyped_storage().data_ptr() not in saved


@pytest.mark.parametrize("wrt", ["x", "values"])
def test_a_layout_change_before_the_double_backward_is_an_error(wrt):
    """dx and dvalues are products over the layout too: differentiating them after a topology update raises."""
    layout = _mask_layout("random", 2, 2, 16)
    x, values, dy, _ = _inputs(layout, 4, torch.float32)
    x.requires_grad_()
    values.requires_grad_()
    y = block_sparse_linear(x, values, layout, backend="reference")
    (grad,) = torch.autograd.grad(y, x if wrt == "x" else values, dy, create_graph=True)
    layout.replace_blocks(torch.tensor([0]), (~layout.mask).nonzero()[:1])
    with pytest.raises(RuntimeError, match="layout"):
        grad.square().sum().backward()


@pytest.mark.parametrize("made_under_inference", [True, False])
def test_a_layout_made_or_first_used_under_inference_mode_trains_afterwards(made_under_inference):
    """A layout made under ``torch.inference_mode`` (or whose index for another device was first built there, by an
    evaluation before training) kept inference tensors: the next training backward refused to save them."""
    from smet_kernels import BlockLayout

    device = "cpu" if made_under_inference else "meta"  # meta: an index copied to a device other than the layout's
    with torch.inference_mode(made_under_inference):
        layout = BlockLayout.random(32, 48, 16, 0.5, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        block_sparse_linear(torch.randn(2, 48, device=device), torch.randn(layout.nnz, 16, 16, device=device), layout,
                            backend="reference")  # fmt: skip
    x = torch.randn(2, 48, device=device, requires_grad=True)
    values = torch.randn(layout.nnz, 16, 16, device=device, requires_grad=True)
    block_sparse_linear(x, values, layout, backend="reference").sum().backward()
    assert values.grad.shape == values.shape and x.grad.shape == x.shape
    layout.replace_blocks(torch.tensor([0]), (~layout.mask).nonzero()[:1])  # a topology update rewrites it in place
    assert layout.version == 1
