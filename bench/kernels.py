"""Kernel benchmarks: forward, grad_input and grad_weight of a block-sparse linear layer.

For tokens ``x [M, K]``, a weight ``W [N, K]`` with a random block layout of density ``d`` and block size ``b``,
and ``dy [M, N]``:

* ``forward``      ``y = x Wᵀ``
* ``grad_input``   ``dx = dy W``
* ``grad_weight``  ``dW = dyᵀ x`` (at the active blocks only, for the sparse providers)

Providers, named after what they time: this library's launchers ``triton_bsmm_<op>`` with the Triton backend —
``triton_grouped`` (the default grouped program order), ``triton_plain_order`` (the grouped kernel with one L2 group
spanning every token tile: the plain token-tile-fastest order; forward and input grad), ``triton_persistent``
(forward and input grad) and ``triton_tma`` (TMA descriptor loads, Hopper; all three ops) — the A/B of those choices,
measured in the same run; its PyTorch reference ``torch_bsmm_<op>`` as ``torch_reference`` (the library provider
with ``backend="reference"``); ``cublas_dense`` (``F.linear`` / ``torch.mm`` on the dense weight; once per shape,
density 1), ``masked_dense`` (``W ⊙ mask`` then the dense matmul — what mask-based DST does) and ``torch_bsr``
(PyTorch's BSR Triton ops ``bsr_dense_mm`` and ``sampled_addmm``, CUDA only; recorded as skipped elsewhere).
A run times the library providers of its backend (:func:`default_providers`). Result files written before the
providers had these names are read through :data:`bench.results.RENAMED_PROVIDERS`.

Every provider's result is checked against the fp32 dense computation once, before timing (a mismatch is
recorded as ``status = "wrong"``). Useful FLOPs are ``2 M K N`` dense and ``2 M K N d`` sparse (``d`` the
layout's exact density); effective TFLOP/s = useful FLOPs / median time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from smet_kernels.train.model import LinearShape, linear_shapes

from .timing import Timing, measure

OPS = ("forward", "grad_input", "grad_weight")
VARIANT_OPS = {  # the Triton providers other than triton_grouped and the ops each one changes
    "triton_plain_order": ("forward", "grad_input"),
    "triton_persistent": ("forward", "grad_input"),
    "triton_tma": ("forward", "grad_input", "grad_weight"),
}
TRITON_PROVIDERS = ("triton_grouped", *VARIANT_OPS)
LIBRARY_PROVIDERS = {"triton": TRITON_PROVIDERS, "reference": ("torch_reference",)}  # per backend
SPARSE_PROVIDERS = (*TRITON_PROVIDERS, "torch_reference", "masked_dense", "torch_bsr")
PROVIDERS = ("cublas_dense",) + SPARSE_PROVIDERS
FULL_CONFIGS = ("20m", "60m", "130m", "350m", "1b", "7b")
FULL_DENSITIES = (0.5, 0.25, 0.1, 0.05)
FULL_BLOCK_SIZES = (32, 64, 128)
FULL_TOKENS = (8192, 16384)
QUICK_CONFIGS = ("tiny",)
QUICK_DENSITIES = (0.5, 0.25)
QUICK_BLOCK_SIZES = (32,)
QUICK_TOKENS = (64,)


@dataclass(frozen=True)
class KernelCase:
    """One measurement: ``op`` by ``provider`` at ``M`` tokens of ``shape`` (``block_size``/``density`` for sparse)."""

    op: str
    provider: str
    shape: LinearShape
    M: int
    block_size: int | None
    density: float
    dtype: torch.dtype

    def key_row(self, backend: str) -> dict:
        return {
            "suite": "kernels",
            "op": self.op,
            "provider": self.provider,
            "shape": self.shape.label,
            "M": self.M,
            "K": self.shape.K,
            "N": self.shape.N,
            "block_size": self.block_size,
            "density": self.density,
            "dtype": dtype_name(self.dtype),
            "backend": backend if self.provider in TRITON_PROVIDERS else
            "reference" if self.provider == "torch_reference" else "torch",
        }


def default_providers(backend: str) -> tuple[str, ...]:
    """Every provider but the library providers of the other backend."""
    other = {p for name, providers in LIBRARY_PROVIDERS.items() if name != backend for p in providers}
    return tuple(p for p in PROVIDERS if p not in other)


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


def kernel_cases(
    config_names, densities, block_sizes, tokens, dtype: torch.dtype, providers=None, ops=OPS, backend="triton"
) -> Iterator[KernelCase]:
    """Every case of the grid; dense cases once per shape, sparse ones per block size and density.
    Block sizes that do not divide a shape are left out. ``providers`` default: :func:`default_providers`."""
    if providers is None:
        providers = default_providers(backend)
    for provider in providers:
        if provider not in PROVIDERS:
            raise ValueError(f"providers must be in {PROVIDERS}, got {provider!r}")
    for op in ops:
        if op not in OPS:
            raise ValueError(f"ops must be in {OPS}, got {op!r}")
    for shape in linear_shapes(config_names):
        for m in tokens:
            if "cublas_dense" in providers:
                for op in ops:
                    yield KernelCase(op, "cublas_dense", shape, m, None, 1.0, dtype)
            for b in block_sizes:
                if shape.N % b or shape.K % b:
                    continue
                for d in densities:
                    for op in ops:
                        for provider in providers:
                            if provider == "cublas_dense" or op not in VARIANT_OPS.get(provider, OPS):
                                continue
                            yield KernelCase(op, provider, shape, m, b, d, dtype)


class _Operands:
    """Inputs of one (shape, M, block size, density) point, shared by its providers and ops.

    Tokens ``x`` and ``dy`` are drawn on the device (fast at full size) and reused from ``previous`` when only the
    block size or density changed; the layout is drawn on the CPU so it is the same on every machine."""

    def __init__(self, case: KernelCase, device: torch.device, seed: int, previous: "_Operands | None" = None):
        from smet_kernels.functional import to_dense
        from smet_kernels.layout import BlockLayout

        n, k, m = case.shape.N, case.shape.K, case.M
        self.expected: dict[tuple[str, bool], torch.Tensor] = {}  # fp32 ground truths, filled by _expected()
        self.tokens_key = (case.shape, m, case.dtype, str(device), seed)

        def randn(stream: int, *size):
            """Each operand from its own seeded stream: the same values whether or not x and dy were reused from
            the previous case (a resumed run starts elsewhere in the grid)."""
            generator = torch.Generator(device=device).manual_seed(seed * 4 + stream)
            values = torch.randn(*size, generator=generator, device=device, dtype=torch.float32)
            return (0.02 * values).to(case.dtype)

        if previous is not None and previous.tokens_key == self.tokens_key:
            self.x, self.dy = previous.x, previous.dy
        else:
            self.x, self.dy = randn(0, m, k), randn(1, m, n)
        if case.block_size is None:
            self.weight = randn(2, n, k)
            self.layout = None
            return
        b = case.block_size
        layout_generator = torch.Generator().manual_seed(seed)
        self.layout = BlockLayout.random(n, k, b, case.density, generator=layout_generator).to(device)
        self.values = randn(3, self.layout.nnz, b, b)
        self.weight = to_dense(self.values, self.layout)
        self.mask = self.layout.mask.repeat_interleave(b, 0).repeat_interleave(b, 1).to(case.dtype)


class KernelUnavailable(Exception):
    """A provider that cannot run here (the reason is recorded as a skipped row)."""


def _library_fns(ops: _Operands, backend: str, provider: str) -> dict[str, Callable[[], torch.Tensor]]:
    """The launchers of this library on the layout's index tensors: ``triton_bsmm_<op>`` (``triton_*`` providers,
    Triton backend only) or ``torch_bsmm_<op>`` (``torch_reference``).

    ``triton_plain_order``: forward and input grad with one L2 group spanning every token tile (the plain order);
    ``triton_persistent``: the persistent longest-rows-first schedule; ``triton_tma``: TMA descriptor loads (sm_90+,
    or the interpreter)."""
    layout, device = ops.layout, ops.x.device
    if provider == "torch_reference":
        from smet_kernels.reference import matmul as reference

        indices = layout.block_indices
        return {
            "forward": lambda: reference.torch_bsmm_forward(ops.x, ops.values, indices, layout.shape[0]),
            "grad_input": lambda: reference.torch_bsmm_grad_input(ops.dy, ops.values, indices, layout.shape[1]),
            "grad_weight": lambda: reference.torch_bsmm_grad_weight(ops.dy, ops.x, indices, layout.block_size),
        }
    if backend != "triton":
        raise KernelUnavailable(f"{provider} times the Triton kernels: it needs the Triton backend")
    if provider == "triton_tma" and ops.x.is_cuda and torch.cuda.get_device_capability(ops.x.device) < (9, 0):
        raise KernelUnavailable("triton_tma needs the Tensor Memory Accelerator of an sm_90+ GPU")
    from smet_kernels.ops import block_sparse_matmul as bsmm

    options = {
        "triton_grouped": {"variant": "grouped"},
        "triton_plain_order": {"variant": "grouped", "group_m": ops.x.shape[0]},  # >= the token tiles at any BLOCK_M
        "triton_persistent": {"variant": "persistent"},
        "triton_tma": {"variant": "tma"},
    }[provider]
    rows, cols, indices = layout.row_index(device), layout.col_index(device), layout.block_indices_on(device)
    n, k, b = layout.shape[0], layout.shape[1], layout.block_size
    return {
        "forward": lambda: bsmm.triton_bsmm_forward(ops.x, ops.values, rows, n, **options),
        "grad_input": lambda: bsmm.triton_bsmm_grad_input(ops.dy, ops.values, cols, k, **options),
        "grad_weight": lambda: bsmm.triton_bsmm_grad_weight(ops.dy, ops.x, indices, b, variant=options["variant"]),
    }


def bsr_from_layout(values: torch.Tensor, layout, transpose: bool = False) -> torch.Tensor:
    """``W`` (or ``Wᵀ``) as a torch BSR tensor holding exactly the layout's blocks.

    torch's BSR wants its blocks in row-major order; a layout's slots need not be (after a topology update a slot
    may hold any block), so the slots are sorted by their block position. Built from the layout rather than with
    ``W.to_sparse_bsr``, which would drop active blocks that happen to be all zeros (e.g. zero-initialised regrowth).
    """
    b = layout.block_size
    rows, cols = layout.block_indices.to(device=values.device, dtype=torch.int64).unbind(1)
    n_rows, n_cols = layout.shape[0] // b, layout.shape[1] // b
    blocks = values
    if transpose:
        rows, cols, n_rows, n_cols = cols, rows, n_cols, n_rows
        blocks = values.transpose(1, 2)
    order = torch.argsort(rows * n_cols + cols)
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=values.device)
    crow[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
    size = (n_rows * b, n_cols * b)
    return torch.sparse_bsr_tensor(
        crow, cols[order].contiguous(), blocks[order].contiguous(), size=size, check_invariants=True
    )


def torch_bsr_params(device_name: str) -> str:
    """The launch parameters of torch's BSR kernels on ``device_name``: torch ships tuned ones for a few GPUs
    (``torch.sparse._triton_ops_meta``); on any other, ``bsr_dense_mm`` runs its defaults, an untuned baseline."""
    try:
        from torch.sparse import _triton_ops_meta as meta

        data = meta._operation_device_version_data
    except (ImportError, AttributeError) as error:  # a private module: say so rather than fail the environment
        return f"unknown: {type(error).__name__}"
    for (op, device, version), table in data.items():
        if table and meta.get_meta(op, next(iter(table)), device_name=device_name, version=version) is not None:
            return f"tuned (torch's table for {device})"
    return "defaults (torch ships tuned ones only for " + ", ".join(sorted({d for _, d, _ in data})) + ")"


def _torch_bsr_fns(ops: _Operands) -> dict[str, Callable[[], torch.Tensor]]:
    """``y = (W xᵀ)ᵀ``, ``dx = (Wᵀ dyᵀ)ᵀ`` with ``bsr_dense_mm``; ``dW = dyᵀ x`` at W's blocks with ``sampled_addmm``.
    The BSR tensors and transposed operands are built outside the timed region; the results stay in torch's
    form (``yᵀ``, ``dxᵀ``, a BSR ``dW``), which :func:`check_result` understands. ``sampled_addmm`` copies its
    BSR input into its output on every call (``d·N·K`` elements, small next to the product)."""
    if ops.x.device.type != "cuda":
        raise KernelUnavailable("torch.sparse._triton_ops needs CUDA")
    from torch.sparse import _triton_ops

    if _triton_ops.bsr_dense_mm is None:
        raise KernelUnavailable("torch.sparse._triton_ops.bsr_dense_mm is unavailable (torch built without triton)")
    w_bsr = bsr_from_layout(ops.values, ops.layout)
    wt_bsr = bsr_from_layout(ops.values, ops.layout, transpose=True)
    x_t = ops.x.t().contiguous()
    dy_t = ops.dy.t().contiguous()
    return {
        "forward": lambda: _triton_ops.bsr_dense_mm(w_bsr, x_t),
        "grad_input": lambda: _triton_ops.bsr_dense_mm(wt_bsr, dy_t),
        "grad_weight": lambda: _triton_ops.sampled_addmm(w_bsr, dy_t, ops.x, beta=0.0),
    }


def case_function(case: KernelCase, ops: _Operands, backend: str) -> Callable[[], torch.Tensor]:
    """The timed callable of ``case`` (raises :class:`KernelUnavailable` for providers that cannot run here)."""
    if case.provider == "cublas_dense":
        return {
            "forward": lambda: F.linear(ops.x, ops.weight),
            "grad_input": lambda: ops.dy @ ops.weight,
            "grad_weight": lambda: ops.dy.t() @ ops.x,
        }[case.op]
    if case.provider == "masked_dense":
        return {
            "forward": lambda: F.linear(ops.x, ops.weight * ops.mask),
            "grad_input": lambda: ops.dy @ (ops.weight * ops.mask),
            "grad_weight": lambda: (ops.dy.t() @ ops.x) * ops.mask,
        }[case.op]
    if case.provider in (*TRITON_PROVIDERS, "torch_reference"):
        return _library_fns(ops, backend, case.provider)[case.op]
    return _torch_bsr_fns(ops)[case.op]


def _expected(case: KernelCase, ops: _Operands) -> torch.Tensor:
    """fp32 dense ground truth of ``case.op`` on ``ops`` (compact ``[nnz, b, b]`` for a sparse weight gradient),
    computed once per operands and op."""
    from smet_kernels.functional import from_dense

    sparse_weight_grad = case.op == "grad_weight" and ops.layout is not None
    key = (case.op, sparse_weight_grad)
    if key not in ops.expected:
        x, dy, w = ops.x.float(), ops.dy.float(), ops.weight.float()
        if case.op == "forward":
            ops.expected[key] = x @ w.t()
        elif case.op == "grad_input":
            ops.expected[key] = dy @ w
        else:
            dense = dy.t() @ x
            ops.expected[key] = from_dense(dense, ops.layout) if sparse_weight_grad else dense
    return ops.expected[key]


def _as_reference_form(case: KernelCase, ops: _Operands, result: torch.Tensor) -> torch.Tensor:
    """``result`` of ``case.provider`` in the form of :func:`_expected`: ``torch_bsr`` computes ``yᵀ`` and ``dxᵀ``
    and returns the weight gradient as a BSR tensor; the dense-weight providers return ``[N, K]`` gradients."""
    from smet_kernels.functional import from_dense

    if case.provider == "torch_bsr" and case.op != "grad_weight":
        return result.t()
    if case.op == "grad_weight" and case.provider in ("torch_bsr", "masked_dense"):
        dense = result.to_dense() if result.layout == torch.sparse_bsr else result
        return from_dense(dense, ops.layout)
    return result


def check_result(case: KernelCase, ops: _Operands, result: torch.Tensor) -> str:
    """Empty when ``result`` (of any provider) matches the fp32 dense computation, else a note with the error."""
    expected = _expected(case, ops)
    result = _as_reference_form(case, ops, result)
    if result.shape != expected.shape:
        return f"shape {tuple(result.shape)} != expected {tuple(expected.shape)}"
    scale = expected.abs().max().item() + 1e-12
    error = (result.float() - expected).abs().max().item() / scale
    tolerance = 2e-2 if case.dtype in (torch.float16, torch.bfloat16) else 1e-3
    return "" if error <= tolerance else f"max relative error {error:.3g} > {tolerance}"


def useful_flops(case: KernelCase, ops: _Operands) -> int:
    flops = 2 * case.M * case.shape.K * case.shape.N
    if ops.layout is None:
        return flops
    return int(flops * ops.layout.density)


def run_case(case: KernelCase, ops: _Operands, backend: str, device: torch.device, timing_kwargs: dict) -> dict:
    """Measure ``case``; returns the result columns (``status`` ok | skipped | wrong, ``note``)."""
    result = {"nnz_blocks": ops.layout.nnz if ops.layout is not None else None, "status": "ok", "note": ""}
    try:
        fn = case_function(case, ops, backend)
    except KernelUnavailable as reason:
        return result | {"status": "skipped", "note": str(reason)}
    note = check_result(case, ops, fn())  # also compiles / autotunes before the clock starts
    if note:
        result |= {"status": "wrong", "note": note}
    timing: Timing = measure(fn, device, **timing_kwargs)
    flops = useful_flops(case, ops)
    return result | {
        "ms_p20": timing.ms_p20,
        "ms_p50": timing.ms_p50,
        "ms_p80": timing.ms_p80,
        "useful_flops": flops,
        "tflops": flops / (timing.ms_p50 * 1e-3) / 1e12,
    }


def operands_key(case: KernelCase) -> tuple:
    return (case.shape, case.M, case.block_size, case.density, case.dtype)


def make_operands(
    case: KernelCase, device: torch.device, seed: int = 0, previous: _Operands | None = None
) -> _Operands:
    """Operands of ``case``; ``previous`` operands of the same shape and token count lend their ``x`` and ``dy``."""
    return _Operands(case, device, seed, previous)
