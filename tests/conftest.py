"""Test set-up: run Triton kernels through the CPU interpreter when no GPU is present.

TRITON_INTERPRET is read when kernels are decorated, so it must be set before smet_kernels is imported.
"""

import atexit
import os
import shutil
import sys
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# caches that would land in the home directory (matplotlib's fonts) or the working tree (hypothesis' database)
_scratch = tempfile.mkdtemp(prefix="smet-tests-")
atexit.register(shutil.rmtree, _scratch, ignore_errors=True)
os.environ.setdefault("MPLCONFIGDIR", os.path.join(_scratch, "matplotlib"))
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(_scratch, "hypothesis"))

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: whether the Triton kernels run in the CPU interpreter (one autotune config each) or compile for a GPU
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
#: the one ``(BLOCK_M, num_warps, num_stages)`` the matmul kernels run at under :func:`one_matmul_config` on a GPU:
#: kept by the pruner at every block size (16 to 128) and dtype (fp32 included)
GPU_TEST_CONFIG = (64, 4, 2)
#: the token tile of the matmul kernels in the kernel tests: the interpreter's single config, or GPU_TEST_CONFIG
TOKEN_TILE = 32 if INTERPRET else GPU_TEST_CONFIG[0]


def usage_error(main, argv: list[str], capsys) -> str:
    """The stderr of ``main(argv)`` refusing bad usage after parsing, checked to be exit code 2 and one line
    ``<prog>: error: ...`` (no traceback, no usage); returned without its newline."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as raised:
        main(argv)
    err = capsys.readouterr().err
    assert raised.value.code == 2 and err.count("\n") == 1 and ": error: " in err.split("\n")[0], (raised.value, err)
    return err.rstrip("\n")


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture
def reference_backend():
    """The PyTorch reference ops for the whole test (model-level CPU runs would take minutes in the interpreter)."""
    import smet_kernels

    previous = smet_kernels.get_backend()
    smet_kernels.set_backend("reference")
    yield
    smet_kernels.set_backend(previous)


@pytest.fixture(scope="module")
def one_matmul_config():
    """On a GPU every matmul kernel runs at :data:`GPU_TEST_CONFIG` alone for the module, instead of autotuning its
    18 configs at every new shape (hundreds of compiles for the kernel tests; the autotuned configs themselves are
    checked by ``smet-bench gpu-check`` and tests/test_kernel_compile.py). Under the interpreter (one config) it
    changes nothing."""
    from bench.gpu_check import kernel_ops

    pinned = {family: {GPU_TEST_CONFIG} for family in ("dense_sparse", "dense_sparse_persistent", "grad_weight")}
    with kernel_ops.restrict_configs(None if INTERPRET else kernel_ops.per_kernel(pinned)):
        yield


# ---------------------------------------------------------------- the block-sparse products of a BlockLayout
# The launchers take the layout's index tensors (as the custom ops do); these unpack a layout for the kernel tests.
def triton_forward(x, values, layout, bias=None, **options):
    """``triton_bsmm_forward`` over ``layout``'s CSR index (``options``: ``group_m``, ``variant``)."""
    from smet_kernels.ops.block_sparse_matmul import triton_bsmm_forward

    return triton_bsmm_forward(x, values, layout.row_index(x.device), layout.shape[0], bias, **options)


def triton_grad_input(dy, values, layout, **options):
    """``triton_bsmm_grad_input`` over ``layout``'s CSC index."""
    from smet_kernels.ops.block_sparse_matmul import triton_bsmm_grad_input

    return triton_bsmm_grad_input(dy, values, layout.col_index(dy.device), layout.shape[1], **options)


def triton_grad_weight(dy, x, layout, **options):
    """``triton_bsmm_grad_weight`` at ``layout``'s blocks (``options``: ``split_k``, ``variant``)."""
    from smet_kernels.ops.block_sparse_matmul import triton_bsmm_grad_weight

    return triton_bsmm_grad_weight(dy, x, layout.block_indices_on(x.device), layout.block_size, **options)


def torch_forward(x, values, layout, bias=None):
    from smet_kernels.reference.matmul import torch_bsmm_forward

    return torch_bsmm_forward(x, values, layout.block_indices, layout.shape[0], bias)


def torch_grad_input(dy, values, layout):
    from smet_kernels.reference.matmul import torch_bsmm_grad_input

    return torch_bsmm_grad_input(dy, values, layout.block_indices, layout.shape[1])


def torch_grad_weight(dy, x, layout):
    from smet_kernels.reference.matmul import torch_bsmm_grad_weight

    return torch_bsmm_grad_weight(dy, x, layout.block_indices, layout.block_size)


# ---------------------------------------------------------------- host readbacks (a GPU sync each on CUDA)
#: functions whose readbacks are of tensors that are CPU tensors on every device: the layouts' version counters
#: (compared in each backward) and a batch's window indices
CPU_BY_DESIGN = ("check_layout_version", "window_batch")
READBACKS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")


class Readbacks:
    """Records ``"<method> in <calling function>"`` for every readback of a tensor's values to the host (``item``,
    ``tolist``, ``float``/``int``/``bool``/index conversions) made while :attr:`counting`, except in the functions of
    :data:`CPU_BY_DESIGN`: on the CPU it finds the calls that would wait for the GPU on CUDA."""

    def __init__(self, monkeypatch):
        self.seen: list[str] = []
        self.counting = False
        for name in READBACKS:
            monkeypatch.setattr(torch.Tensor, name, self._counted(name, getattr(torch.Tensor, name)))

    def _counted(self, name, real):
        def readback(tensor, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_name
            if self.counting and caller not in CPU_BY_DESIGN:
                self.seen.append(f"{name} in {caller}")
            return real(tensor, *args, **kwargs)

        return readback

    def take(self) -> list[str]:
        """The readbacks recorded so far, forgotten."""
        seen, self.seen = self.seen, []
        return seen


@pytest.fixture
def readbacks(monkeypatch) -> Readbacks:
    return Readbacks(monkeypatch)
