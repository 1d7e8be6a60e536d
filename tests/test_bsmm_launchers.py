"""The launchers of the block-sparse products (``triton_bsmm_forward`` / ``_grad_input`` / ``_grad_weight``) and the
operands they take: row-major matrices only, strided values, bias and block indices read as the reference reads
them, one dtype for both operands, and block-index pointers whose alignment no binary depends on."""

import pytest
import torch

from bsmm_cases import _close, _inputs, _mask_layout
from conftest import (torch_forward, torch_grad_input, torch_grad_weight, triton_forward, triton_grad_input,
                      triton_grad_weight)
from smet_kernels import BlockLayout

pytestmark = pytest.mark.usefixtures("one_matmul_config")  # on a GPU: one config, not 18 autotuned per shape


def test_each_launcher_refuses_an_operand_that_is_not_a_row_major_matrix():
    """The kernels step rows by ``stride(0)`` and assume unit stride along the features: a 3-D or a column-major
    operand is refused, naming it, not read wrongly."""
    layout = _mask_layout("random", 2, 2, 16)
    x, values, dy, _ = _inputs(layout, 8, torch.float32)

    def column_major(t):
        return t.t().contiguous().t()

    for bad in (lambda t: t.unsqueeze(-1), column_major):
        calls = (("x", lambda: triton_forward(bad(x), values, layout)),
                 ("dy", lambda: triton_grad_input(bad(dy), values, layout)),
                 ("dy", lambda: triton_grad_weight(bad(dy), x, layout)),
                 ("x", lambda: triton_grad_weight(dy, bad(x), layout)))  # fmt: skip
        for name, call in calls:
            with pytest.raises(ValueError, match=f"^{name} must be a 2-D tensor with unit stride"):
                call()


def test_each_launcher_reads_strided_values_bias_and_block_indices_as_the_reference_does():
    """The pointer kernels read values, bias and block indices by offsets: through ``torch.ops.smet.bsmm_forward``
    a transposed values tensor gave a wrong product with the Triton backend (the reference and TMA read it right)."""
    from smet_kernels.ops.block_sparse_matmul import triton_bsmm_grad_weight

    layout = _mask_layout("random", 2, 2, 16)
    x, values, dy, bias = _inputs(layout, 8, torch.float32)
    strided = values.transpose(1, 2).contiguous().transpose(1, 2)
    strided_bias = torch.stack([bias, bias], 1)[:, 0]
    indices = layout.block_indices_on(x.device).t().contiguous().t()
    assert not any(t.is_contiguous() for t in (strided, strided_bias, indices))
    _close(triton_forward(x, strided, layout, strided_bias), torch_forward(x, values, layout, bias), torch.float32)
    _close(triton_grad_input(dy, strided, layout), torch_grad_input(dy, values, layout), torch.float32)
    _close(triton_bsmm_grad_weight(dy, x, indices, 16), torch_grad_weight(dy, x, layout), torch.float32)


def test_each_launcher_refuses_operands_of_two_dtypes_by_name_rather_than_failing_to_compile():
    layout = _mask_layout("random", 2, 2, 16)
    x, values, dy, _ = _inputs(layout, 8, torch.float32)
    calls = (("values has dtype torch.float16 but x", lambda: triton_forward(x, values.half(), layout)),
             ("values has dtype torch.float16 but dy", lambda: triton_grad_input(dy, values.half(), layout)),
             ("dy has dtype torch.float16 but x", lambda: triton_grad_weight(dy.half(), x, layout)))  # fmt: skip
    for message, call in calls:
        with pytest.raises(TypeError, match=f"^{message} has dtype torch.float32"):
            call()


def _not_specialised_on_alignment(kernel) -> set[str]:
    """Parameters of an autotuned kernel whose binary does not depend on their 16-byte alignment (a compiled
    ``JITFunction``'s params, or what the interpreter's function was declared with)."""
    fn = kernel.fn
    if hasattr(fn, "params"):
        return {p.name for p in fn.params if p.do_not_specialize_on_alignment}
    return set(fn.kwargs["do_not_specialize_on_alignment"] or ()) & set(fn.arg_names)


def test_the_index_pointers_of_a_layer_need_no_alignment_so_every_layer_reuses_the_compiled_binaries():
    """A layer's CSR / CSC index is a view at an int32 offset of its packed kernel index: 16-byte aligned or not by
    the parity of ``nnz`` and the block counts. A binary specialised on that alignment compiled again per layer shape
    on a GPU (the training steps and the compiled step, after the kernel timings compiled the aligned ones)."""
    from smet_kernels.layout import unpack_kernel_index
    from smet_kernels.ops import block_sparse_matmul as bsmm

    layout = BlockLayout(torch.tensor([[0, 0]]), (64, 32), 32)  # nnz = 1: the CSR index starts 8 bytes in
    _, rows, cols = unpack_kernel_index(layout.kernel_index("cpu"), layout.nnz, layout.block_shape)
    assert {rows.slots.data_ptr() % 16, cols.ptr.data_ptr() % 16} - {0}
    for kernel in (bsmm.bsmm_dense_sparse_kernel, bsmm.bsmm_dense_sparse_persistent_kernel,
                   bsmm.bsmm_dense_sparse_tma_kernel):  # fmt: skip
        index_pointers = {name for name in kernel.fn.arg_names if name in bsmm.INDEX_POINTERS}
        assert index_pointers and index_pointers <= _not_specialised_on_alignment(kernel)
