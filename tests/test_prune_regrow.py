"""The rules of a topology update: the cosine prune fraction, how many blocks move, which blocks are chosen."""

import math

import pytest
import torch

from smet_kernels.layout import BlockLayout
from smet_kernels.prune_regrow import block_l1, blocks_to_move, choose_blocks, cosine_prune_fraction

B = 16  # block size


def test_cosine_schedule_values():
    assert cosine_prune_fraction(0, 100, 0.2, 0.005) == pytest.approx(0.2)
    assert cosine_prune_fraction(50, 100, 0.2, 0.005) == pytest.approx((0.2 + 0.005) / 2)
    assert cosine_prune_fraction(100, 100, 0.2, 0.005) == pytest.approx(0.005)
    assert cosine_prune_fraction(25, 100, 0.2, 0.005) == pytest.approx(0.005 + 0.195 * (1 + math.cos(math.pi / 4)) / 2)
    assert cosine_prune_fraction(500, 100, 0.2, 0.005) == pytest.approx(0.005)  # clamped past T_end
    assert cosine_prune_fraction(10, None, 0.2, 0.005) == 0.2  # no T_end: constant ζ0


def test_cosine_schedule_is_clamped_before_step_zero_and_past_the_end():
    """Unclamped, step 150 of 100 would read cos(1.5π) = 0 (half way back up) and step -50 cos(-π/2)."""
    assert cosine_prune_fraction(150, 100, 0.2, 0.005) == pytest.approx(0.005)
    assert cosine_prune_fraction(-50, 100, 0.2, 0.005) == pytest.approx(0.2)


def test_choose_blocks_with_nothing_to_move_returns_no_blocks_and_draws_nothing():
    """A layer that moves no block leaves the generator as it was, so the next layers' draws do not shift."""
    layout = BlockLayout.from_mask(torch.tensor([[True, True, False], [True, False, False]]), B)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    for n in (0, -1):
        slots, blocks = choose_blocks(layout, torch.tensor([3.0, 1.0, 2.0]), n, generator=generator)
        assert slots.shape == (0,) and blocks.shape == (0, 2)
    assert torch.equal(generator.get_state(), state)


def test_choose_blocks_prunes_smallest_and_grows_inactive():
    layout = BlockLayout.from_mask(torch.tensor([[True, True, False], [True, False, False]]), B)
    scores = torch.tensor([3.0, 1.0, 2.0])  # slot 1 (block (0,1)) is the smallest
    slots, blocks = choose_blocks(layout, scores, 1, regrow_scores=torch.tensor([[9.0, 9.0, 1.0], [9.0, 5.0, 4.0]]))
    assert slots.tolist() == [1]
    assert blocks.tolist() == [[1, 1]]  # largest inactive score; active blocks' 9.0 ignored
    # ties: lower slot pruned first, lower row-major block grown first
    slots, blocks = choose_blocks(layout, torch.ones(3), 2, regrow_scores=torch.zeros(2, 3))
    assert slots.tolist() == [0, 1] and blocks.tolist() == [[0, 2], [1, 1]]
    # n capped at the number of inactive blocks
    slots, blocks = choose_blocks(layout, scores, 10, generator=torch.Generator().manual_seed(0))
    assert slots.numel() == 3 and sorted(map(tuple, blocks.tolist())) == [(0, 2), (1, 1), (1, 2)]


def test_choose_blocks_returns_slots_and_new_blocks_ascending_not_in_score_order():
    """``replace_blocks`` gives the k-th slot the k-th block, so both lists come back ascending (slot number, row-major
    block) as documented; in score order (a dropped sort) which slot holds which block would follow the scores."""
    layout = BlockLayout.from_mask(torch.tensor([[True, True, True, False], [False, False, True, False]]), B)
    prune_scores = torch.tensor([5.0, 1.0, 9.0, 0.5])  # smallest: slot 3, then slot 1
    regrow_scores = torch.tensor([[0.0, 0.0, 0.0, 2.0], [1.0, 0.0, 0.0, 3.0]])  # largest inactive: (1, 3), then (0, 3)
    slots, blocks = choose_blocks(layout, prune_scores, 2, regrow_scores)
    assert slots.tolist() == [1, 3] and blocks.tolist() == [[0, 3], [1, 3]]
    _, blocks = choose_blocks(layout, prune_scores, 3, generator=torch.Generator().manual_seed(1))
    assert blocks.tolist() == sorted(blocks.tolist())


def test_choose_blocks_breaks_ties_to_the_lower_slot_and_block_however_many_scores_tie():
    """Ties go to the lowest slots and the first inactive blocks in row-major order, as documented: torch's CPU sort
    keeps equal scores in order only when asked to be stable (past ~100 of them), e.g. all-zero blocks or gradients."""
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[::2] = True  # 128 slots, 128 inactive blocks
    layout = BlockLayout.from_mask(mask, B)
    slots, blocks = choose_blocks(layout, torch.zeros(layout.nnz), 40, regrow_scores=torch.zeros(16, 16))
    assert slots.tolist() == list(range(40))
    assert blocks.tolist() == [[row, col] for row in range(1, 16, 2) for col in range(16)][:40]


def test_choose_blocks_rejects_bad_scores():
    layout = BlockLayout.from_mask(torch.tensor([[True, False]]), B)
    with pytest.raises(ValueError, match="prune_scores"):
        choose_blocks(layout, torch.ones(2), 1)
    with pytest.raises(ValueError, match="regrow_scores"):
        choose_blocks(layout, torch.ones(1), 1, regrow_scores=torch.ones(2, 2))


def test_blocks_to_move_is_exact_for_decimal_fractions():
    assert blocks_to_move(0.35, 180) == 63
    assert 250 * (1 - 0.068) < 233  # binary floating point: floor would keep 232
    assert blocks_to_move(0.068, 250) == 17
    assert blocks_to_move(0.5, 0) == 0


@pytest.mark.parametrize(
    "nnz, zeta, moved",
    [(1, 0.2, 0), (1, 0.005, 0), (2, 0.2, 1), (2, 0.005, 1), (18, 0.2, 4), (18, 0.005, 1)],
)
def test_blocks_to_move_keeps_one_block_and_moves_at_least_one(nnz, zeta, moved):
    """Released rule n = nnz − max(1, floor(nnz·(1−ζ))): small layers keep changing late in training."""
    assert blocks_to_move(zeta, nnz) == moved


@pytest.mark.parametrize("zeta", [1e-28, 1e-300, 5e-324])
def test_blocks_to_move_moves_a_block_for_a_prune_fraction_however_small_above_zero(zeta):
    assert blocks_to_move(zeta, 2) == 1
    assert blocks_to_move(zeta, 180) == 1


def test_blocks_to_move_matches_the_released_rule_in_integers():
    for z in range(1, 1000, 7):  # ζ = z / 1000, so floor(nnz (1 − ζ)) = nnz (1000 − z) // 1000 exactly
        for nnz in range(1, 400, 13):
            assert blocks_to_move(z / 1000, nnz) == nnz - max(1, nnz * (1000 - z) // 1000)


def test_block_l1_of_a_bf16_weight_is_summed_in_fp32():
    """Block scores are fp32 sums as documented: summed in bf16 (8 significant bits) and cast afterwards, two blocks
    that differ by less than about 1/256 of their norm would tie, and the slot number would pick the one pruned."""
    weight = torch.ones(2 * B, B, dtype=torch.bfloat16)
    weight[B, 0] = 1.0078125  # the next bf16 after 1: block (1, 0) is larger by 2^-7
    scores = block_l1(weight, B)
    assert scores.dtype == torch.float32 and scores.flatten().tolist() == [256.0, 256.0078125]


@pytest.mark.parametrize("regrow_scores", [None, torch.zeros(2, 3)], ids=["random", "gradient"])
def test_choose_blocks_moves_no_more_blocks_than_the_layer_has_inactive_blocks_or_active_slots(regrow_scores):
    """A dense-ish layer (5 active, 1 inactive) has one block to grow into; a sparse one (1 active) one slot to free:
    either way as many slots as blocks come back, never n of one and fewer of the other."""
    almost_dense = BlockLayout.from_mask(torch.tensor([[True, True, True], [True, False, True]]), B)
    slots, blocks = choose_blocks(almost_dense, torch.arange(5.0), 3, regrow_scores, torch.Generator().manual_seed(0))
    assert slots.tolist() == [0] and blocks.tolist() == [[1, 1]]
    almost_empty = BlockLayout.from_mask(torch.tensor([[False, False, False], [False, True, False]]), B)
    slots, blocks = choose_blocks(almost_empty, torch.ones(1), 3, regrow_scores, torch.Generator().manual_seed(0))
    assert slots.tolist() == [0] and blocks.shape == (1, 2) and blocks.tolist() != [[1, 1]]


def test_block_l1_sums_the_absolute_values_so_negative_weights_count_as_large():
    weight = torch.ones(B, 2 * B)
    weight[:, B:] = -2.0  # block (0, 1) is the larger in L1 norm although its plain sum is negative
    assert block_l1(weight, B).tolist() == [[256.0, 512.0]]


@pytest.mark.parametrize("rigl", [False, True])
def test_choose_blocks_draws_on_the_cpu_whatever_the_default_device(rigl):
    """Under ``torch.set_default_device("cuda")`` the random regrow's ``randperm`` refused the CPU generator (an SMET
    update crashed at step ΔT); under a meta default device it indexed with a meta permutation: garbage blocks."""
    layout = BlockLayout.random(64, 64, B, 0.5, generator=torch.Generator().manual_seed(0))
    scores = torch.arange(layout.nnz, dtype=torch.float32)
    regrow_scores = torch.rand(4, 4, generator=torch.Generator().manual_seed(1)) if rigl else None
    expected = choose_blocks(layout, scores, 3, regrow_scores, torch.Generator().manual_seed(2))
    with torch.device("meta"):
        got = choose_blocks(layout, scores, 3, regrow_scores, torch.Generator().manual_seed(2))
        nothing = choose_blocks(layout, scores, 0, regrow_scores, torch.Generator().manual_seed(2))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert all(t.device.type == "cpu" and t.numel() == 0 for t in nothing)
