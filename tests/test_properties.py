"""Property-based tests (hypothesis): invariants over arbitrary block masks, token counts and topology updates.

The example-based suites pin the awkward cases by hand; here hypothesis searches the space — any mask (a single
block, full, empty block rows and columns), any token count, any sequence of prune/regrow updates, any per-slot step
counts — and shrinks a failure to its smallest form. ``derandomize`` keeps CI reproducible.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import (
    DEVICE,
    torch_forward,
    torch_grad_input,
    torch_grad_weight,
    triton_forward,
    triton_grad_input,
    triton_grad_weight,
)
from smet_kernels import BlockLayout
from smet_kernels.ops.library import adamw_step, regrow_blocks
from smet_kernels.reference.adamw import torch_adamw_step
from smet_kernels.prune_regrow import choose_blocks

pytestmark = pytest.mark.usefixtures("one_matmul_config")  # on a GPU: one config, not 18 autotuned per shape
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


@st.composite
def masks(draw, max_rows: int = 5, max_cols: int = 5) -> torch.Tensor:
    rows = draw(st.integers(1, max_rows))
    cols = draw(st.integers(1, max_cols))
    bits = draw(st.lists(st.booleans(), min_size=rows * cols, max_size=rows * cols))
    bits[draw(st.integers(0, rows * cols - 1))] = True  # a layout holds at least one block
    return torch.tensor(bits, dtype=torch.bool).reshape(rows, cols)


def _indices_of(index, n_major: int) -> list[tuple[int, int, int]]:
    """``(major, minor, slot)`` for every position of a CSR/CSC index."""
    ptr, minor, slots = (t.cpu().tolist() for t in (index.ptr, index.minor, index.slots))
    assert len(ptr) == n_major + 1 and ptr[0] == 0 and ptr == sorted(ptr)
    return [(major, minor[p], slots[p]) for major in range(n_major) for p in range(ptr[major], ptr[major + 1])]


@SETTINGS
@given(mask=masks(), block_size=st.sampled_from([16, 32]))
def test_layout_index_structures_describe_the_mask(mask, block_size):
    layout = BlockLayout.from_mask(mask, block_size)
    assert torch.equal(layout.mask.cpu(), mask)
    assert layout.nnz == int(mask.sum())
    blocks = {tuple(b) for b in layout.block_indices.tolist()}
    n_rows, n_cols = mask.shape
    csr = _indices_of(layout.row_index(), n_rows)
    csc = _indices_of(layout.col_index(), n_cols)
    for entries in (csr, csc):
        assert sorted(slot for _, _, slot in entries) == list(range(layout.nnz))  # each slot exactly once
        assert [(a, b) for a, b, _ in entries] == sorted((a, b) for a, b, _ in entries)  # minor ascending
    assert {(r, c) for r, c, _ in csr} == blocks
    assert {(r, c) for c, r, _ in csc} == blocks
    for row, col, slot in csr:
        assert tuple(layout.block_indices[slot].tolist()) == (row, col)


@st.composite
def update_sequences(draw):
    mask = draw(masks(max_rows=4, max_cols=4))
    steps = draw(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 2**31 - 1)), min_size=1, max_size=4))
    return mask, steps


@SETTINGS
@given(case=update_sequences(), gradient=st.booleans())
def test_prune_regrow_updates_keep_the_layout_invariants(case, gradient):
    mask, steps = case
    layout = BlockLayout.from_mask(mask, 16)
    nnz = layout.nnz
    for n, seed in steps:
        generator = torch.Generator().manual_seed(seed)
        before = layout.mask.clone()
        old_blocks = layout.block_indices.clone()
        prune_scores = torch.rand(nnz, generator=generator)
        regrow_scores = torch.rand(layout.block_shape, generator=generator) if gradient else None
        version = layout.version
        slots, new_blocks = choose_blocks(layout, prune_scores, n, regrow_scores, generator)
        assert slots.numel() == new_blocks.shape[0] == min(n, int((~before).sum()), nnz)
        if slots.numel():  # the pruned slots hold the smallest scores
            kept = torch.ones(nnz, dtype=torch.bool)
            kept[slots] = False
            assert kept.sum() == 0 or prune_scores[slots].max() <= prune_scores[kept].min()
        for row, col in new_blocks.tolist():  # grown blocks were inactive (so no just-pruned block returns)
            assert not before[row, col]
        layout.replace_blocks(slots, new_blocks)
        assert layout.nnz == nnz and int(layout.mask.sum()) == nnz  # no duplicates, nnz constant
        assert (layout.version > version) == (slots.numel() > 0)
        unchanged = torch.ones(nnz, dtype=torch.bool)
        unchanged[slots] = False
        assert torch.equal(layout.block_indices[unchanged], old_blocks[unchanged])
        rebuilt = BlockLayout(layout.block_indices.clone(), layout.shape, layout.block_size)
        for name in ("row_index", "col_index"):
            fresh, cached = getattr(rebuilt, name)(), getattr(layout, name)()
            assert all(torch.equal(getattr(fresh, f), getattr(cached, f)) for f in ("ptr", "slots", "minor"))


@SETTINGS
@given(mask=masks(max_rows=4, max_cols=4), m=st.integers(1, 80), split_k=st.integers(1, 3), seed=st.integers(0, 99))
def test_bsmm_triton_matches_torch_on_any_mask_and_token_count(mask, m, split_k, seed):
    layout = BlockLayout.from_mask(mask, 16).to(DEVICE)
    n, k = layout.shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(DEVICE)
    dy = torch.randn(m, n, generator=g).to(DEVICE)
    values = torch.randn(layout.nnz, 16, 16, generator=g).to(DEVICE)
    bias = torch.randn(n, generator=g).to(DEVICE)
    close = dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(triton_forward(x, values, layout, bias), torch_forward(x, values, layout, bias), **close)
    torch.testing.assert_close(triton_grad_input(dy, values, layout), torch_grad_input(dy, values, layout), **close)
    torch.testing.assert_close(triton_grad_weight(dy, x, layout, split_k=split_k), torch_grad_weight(dy, x, layout),
                               **close)


@SETTINGS
@given(
    steps=st.lists(st.integers(0, 12), min_size=1, max_size=6),
    warmup=st.sampled_from(["none", "linear", "momentum_ramp"]),
    warmup_steps=st.integers(1, 8),
    global_step=st.one_of(st.none(), st.integers(1, 50)),
    seed=st.integers(0, 99),
)
def test_adamw_step_triton_matches_torch_for_any_block_steps(steps, warmup, warmup_steps, global_step, seed):
    g = torch.Generator().manual_seed(seed)
    nnz = len(steps)
    tensors = [torch.randn(nnz, 16, 16, generator=g) for _ in range(2)] + [
        torch.randn(nnz, 16, 16, generator=g) * 0.1, torch.rand(nnz, 16, 16, generator=g) * 0.01]
    block_step = torch.tensor(steps, dtype=torch.int32)
    kernel = [t.clone().to(DEVICE) for t in tensors] + [block_step.clone().to(DEVICE)]
    reference = [t.clone() for t in tensors] + [block_step.clone()]
    hyper = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, warmup=warmup, warmup_steps=warmup_steps)
    param, grad, exp_avg, exp_avg_sq, slot_steps = kernel
    adamw_step([param], [grad], [exp_avg], [exp_avg_sq], [slot_steps], [1e-3], [global_step], **hyper)
    r_param, r_grad, r_exp_avg, r_exp_avg_sq, r_steps = reference
    torch_adamw_step(r_param, r_grad, r_exp_avg, r_exp_avg_sq, r_steps, lr=1e-3, global_step=global_step, **hyper)
    for actual, expected in ((param, r_param), (exp_avg, r_exp_avg), (exp_avg_sq, r_exp_avg_sq)):
        torch.testing.assert_close(actual.cpu(), expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(slot_steps.cpu(), r_steps) and torch.equal(r_steps, block_step + 1)


@pytest.mark.parametrize("backend", ["triton", "reference"])  # the reference is the kernel's oracle: pinned on its own
@SETTINGS
@given(nnz=st.integers(1, 8), data=st.data())
def test_regrow_blocks_resets_exactly_the_given_slots(nnz, data, backend):
    slots = data.draw(st.lists(st.integers(0, nnz - 1), unique=True, max_size=nnz))
    g = torch.Generator().manual_seed(nnz)
    values, exp_avg, exp_avg_sq = (torch.randn(nnz, 16, 16, generator=g).to(DEVICE) for _ in range(3))
    block_step = torch.arange(1, nnz + 1, dtype=torch.int32, device=DEVICE)
    before = [t.clone() for t in (values, exp_avg, exp_avg_sq, block_step)]
    regrow_blocks(values, torch.tensor(slots, dtype=torch.int64, device=DEVICE), exp_avg, exp_avg_sq, block_step,
                  backend=backend)
    touched = torch.zeros(nnz, dtype=torch.bool, device=DEVICE)
    touched[slots] = True
    for after, old in zip((values, exp_avg, exp_avg_sq, block_step), before):
        assert torch.equal(after[~touched], old[~touched])
        assert not after[touched].any()
