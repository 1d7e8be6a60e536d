import pytest
import torch

from smet_kernels import BlockLayout
from smet_kernels.distribution import layer_densities


def test_from_mask_row_major_slots():
    mask = torch.tensor([[False, True, True], [True, False, False]])
    layout = BlockLayout.from_mask(mask, 16)
    assert layout.shape == (32, 48)
    assert layout.block_size == 16
    assert layout.nnz == 3
    assert layout.density == pytest.approx(0.5)
    assert layout.block_indices.tolist() == [[0, 1], [0, 2], [1, 0]]
    assert torch.equal(layout.mask, mask)


@pytest.mark.parametrize("density", [0.01, 0.25, 0.5, 1.0])
def test_random_exact_nnz_and_seeded(density):
    layout = BlockLayout.random(128, 256, 16, density, generator=torch.Generator().manual_seed(3))
    blocks = (128 // 16) * (256 // 16)
    assert layout.nnz == max(1, round(density * blocks))
    again = BlockLayout.random(128, 256, 16, density, generator=torch.Generator().manual_seed(3))
    assert layout == again
    flat = layout.block_indices[:, 0] * 16 + layout.block_indices[:, 1]
    assert torch.equal(flat, flat.sort().values)  # row-major slots


def test_row_and_col_index_cover_every_slot():
    layout = BlockLayout.random(96, 160, 32, 0.4, generator=torch.Generator().manual_seed(0))
    rows, cols = layout.block_shape
    row = layout.row_index()
    col = layout.col_index()
    assert row.ptr.tolist()[-1] == layout.nnz and col.ptr.tolist()[-1] == layout.nnz
    assert sorted(row.slots.tolist()) == list(range(layout.nnz))
    assert sorted(col.slots.tolist()) == list(range(layout.nnz))
    for r in range(rows):
        for p in range(row.ptr[r], row.ptr[r + 1]):
            slot = row.slots[p].item()
            assert layout.block_indices[slot].tolist() == [r, row.minor[p].item()]
    for c in range(cols):
        for p in range(col.ptr[c], col.ptr[c + 1]):
            slot = col.slots[p].item()
            assert layout.block_indices[slot].tolist() == [col.minor[p].item(), c]


def test_by_count_lists_major_indices_longest_first():
    mask = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 0, 0], [1, 0, 1]], dtype=torch.bool)
    layout = BlockLayout.from_mask(mask, 16)
    assert layout.row_index().by_count.tolist() == [1, 3, 0, 2]  # counts 1, 3, 0, 2; ties by index
    assert layout.col_index().by_count.tolist() == [0, 1, 2]  # counts 2, 2, 2
    assert layout.row_index().by_count.dtype == torch.int32


def test_index_cached_until_layout_changes():
    layout = BlockLayout.random(64, 64, 16, 0.5, generator=torch.Generator().manual_seed(1))
    first = layout.row_index()
    assert layout.row_index() is first
    inactive = (~layout.mask).nonzero()[:2]
    layout.replace_blocks(torch.tensor([0, 3]), inactive)
    assert layout.version == 1
    rebuilt = layout.row_index()
    assert rebuilt is not first
    assert layout.block_indices[[0, 3]].tolist() == inactive.tolist()
    assert layout.mask[inactive[:, 0], inactive[:, 1]].all()


def test_replace_blocks_rejects_duplicates_and_bad_slots():
    layout = BlockLayout.random(64, 64, 16, 0.5, generator=torch.Generator().manual_seed(1))
    taken = layout.block_indices[1:2]
    with pytest.raises(ValueError, match="duplicate"):
        layout.replace_blocks(torch.tensor([0]), taken)
    with pytest.raises(ValueError, match="slots"):
        layout.replace_blocks(torch.tensor([layout.nnz]), (~layout.mask).nonzero()[:1])
    with pytest.raises(ValueError, match="differ in length"):
        layout.replace_blocks(torch.tensor([0, 1]), (~layout.mask).nonzero()[:1])
    assert layout.version == 0


def test_state_dict_round_trip():
    layout = BlockLayout.random(64, 128, 32, 0.5, generator=torch.Generator().manual_seed(2))
    assert BlockLayout.from_state_dict(layout.state_dict()) == layout


@pytest.mark.parametrize("state, exc, word", [
    ({"block_indices": torch.tensor([[0, 0]])}, ValueError, r"lacks \['shape', 'block_size'\]"),  # a layer's
    ("layout", ValueError, "lacks"),
    ({"block_indices": torch.tensor([[0, 0]]), "shape": 32, "block_size": 16}, ValueError, "shape"),
    ({"block_indices": torch.tensor([[0, 0]]), "shape": (32, 32), "block_size": 16.7}, TypeError, "block_size"),
])
def test_from_state_dict_refuses_what_is_no_layout_state_by_name(state, exc, word):
    """A layer's state dict (``block_indices`` only) raised ``KeyError: 'shape'``, a shape that is no pair a
    ``TypeError`` of ``tuple()``, and a block size of 16.7 was read as 16."""
    with pytest.raises(exc, match=word):
        BlockLayout.from_state_dict(state)


@pytest.mark.parametrize(
    "call, exc, word",
    [
        (lambda: BlockLayout.random(64, 64, 24, 0.5), ValueError, "block_size"),
        (lambda: BlockLayout.random(64, 64, 16.0, 0.5), TypeError, "block_size"),
        (lambda: BlockLayout.random(60, 64, 16, 0.5), ValueError, "out_features"),
        (lambda: BlockLayout.random(64, 72, 16, 0.5), ValueError, "in_features"),
        (lambda: BlockLayout.random(64, 64, 16, 0.0), ValueError, "density"),
        (lambda: BlockLayout.random(64, 64, 16, 1.5), ValueError, "density"),
        (lambda: BlockLayout.random(64, 64, 16, "0.5"), TypeError, "density"),
        (lambda: BlockLayout.from_mask(torch.zeros(2, 2, dtype=torch.bool), 16), ValueError, "mask"),
        (lambda: BlockLayout.from_mask(torch.ones(2, 2), 16), TypeError, "mask"),
        (lambda: BlockLayout.from_mask(torch.ones(2, dtype=torch.bool), 16), ValueError, "mask"),
        (lambda: BlockLayout(torch.tensor([[0, 5]]), (32, 32), 16), ValueError, "block_indices"),
        (lambda: BlockLayout(torch.tensor([[0, 0], [0, 0]]), (32, 32), 16), ValueError, "duplicate"),
        (lambda: BlockLayout(torch.zeros(0, 2, dtype=torch.long), (32, 32), 16), ValueError, "nnz"),
        (lambda: BlockLayout(torch.tensor([[0.0, 0.0]]), (32, 32), 16), TypeError, "block_indices"),
        (lambda: BlockLayout.from_mask(torch.ones(2, 2, dtype=torch.bool, device="meta"), 16), ValueError, "^mask"),
        (lambda: BlockLayout(torch.zeros(1, 2, dtype=torch.long, device="meta"), (32, 32), 16), ValueError,
         "^block_indices is a meta"),
        (lambda: BlockLayout.random(64, 64, True, 0.5), TypeError, "^block_size must be an int"),
        (lambda: BlockLayout.random(0, 64, 16, 0.5), ValueError, "^out_features must be positive"),
        (lambda: BlockLayout(torch.tensor([[0, 0, 0]]), (32, 32), 16), ValueError, "^block_indices must have shape"),
        (lambda: BlockLayout(torch.tensor([[0, 0]]), (32, 32, 32), 16), ValueError, "^shape must be"),
        (lambda: BlockLayout(torch.tensor([[2, 0]]), (32, 32), 16), ValueError, "^block_indices out of range"),
        (lambda: BlockLayout(torch.tensor([[0, -1]]), (32, 32), 16), ValueError, "^block_indices out of range"),
        (lambda: BlockLayout(torch.tensor([[-1, 0]]), (32, 32), 16), ValueError, "^block_indices out of range"),
        (lambda: BlockLayout.random(True, 64, 16, 0.5), TypeError, "^out_features must be an int"),
        (lambda: BlockLayout([[0, 0]], (32, 32), 16), TypeError, "^block_indices must be a torch.Tensor, got list$"),
        (lambda: BlockLayout.from_mask([[True]], 16), TypeError, "^mask must be a torch.Tensor, got list$"),
    ],
)
def test_bad_input_names_the_argument(call, exc, word):
    with pytest.raises(exc, match=word):
        call()


def test_erk_densities_hit_the_global_budget():
    shapes = {"small": (64, 64), "wide": (64, 1024), "big": (1024, 1024)}
    dens = layer_densities(shapes, 0.3, "erk")
    total = sum(o * i for o, i in shapes.values())
    active = sum(dens[n] * o * i for n, (o, i) in shapes.items())
    assert active == pytest.approx(0.3 * total, rel=1e-9)
    assert dens["small"] >= dens["wide"] > dens["big"]  # ERK favours small layers
    assert dens["big"] < 0.3
    assert all(0 < d <= 1 for d in dens.values())


def test_erk_caps_layers_at_dense():
    shapes = {"tiny": (16, 16), "big": (2048, 2048)}
    dens = layer_densities(shapes, 0.5, "erk")
    assert dens["tiny"] == 1.0
    active = sum(dens[n] * o * i for n, (o, i) in shapes.items())
    assert active == pytest.approx(0.5 * (16 * 16 + 2048 * 2048))


def test_erk_re_solves_until_no_layer_exceeds_dense():
    """(16, 16) exceeds 1 at once; (64, 64) only after the re-solve without it (first ε·r = 0.975, then 1.011):
    both dense, and the last layer takes what remains of the budget."""
    shapes = {"tiny": (16, 16), "small": (64, 64), "big": (256, 256)}
    dens = layer_densities(shapes, 0.3, "erk")
    assert dens["tiny"] == 1.0 and dens["small"] == 1.0
    budget = 0.3 * (16 * 16 + 64 * 64 + 256 * 256)
    assert dens["big"] == pytest.approx((budget - 16 * 16 - 64 * 64) / (256 * 256), rel=1e-9)


def test_layer_densities_bad_distribution():
    with pytest.raises(ValueError, match="distribution"):
        layer_densities({"a": (16, 16)}, 0.5, "gaussian")


@pytest.mark.parametrize(
    "shapes, exc",
    [
        ({"a": (0, 16)}, ValueError),
        ({"a": (16,)}, ValueError),
        ({"a": (16.0, 16)}, ValueError),
        ({"a": (True, 16)}, ValueError),  # a bool is no size
        ([("a", (16, 16))], TypeError),
    ],
)
def test_layer_densities_bad_shapes(shapes, exc):
    with pytest.raises(exc, match="shapes"):
        layer_densities(shapes, 0.5, "erk")


def test_erk_degenerate_cases():
    assert layer_densities({"only": (64, 256)}, 0.3, "erk")["only"] == pytest.approx(0.3)
    assert set(layer_densities({"a": (16, 16), "b": (64, 32)}, 1.0, "erk").values()) == {1.0}
    assert layer_densities({}, 0.5, "erk") == {}
    same = layer_densities({"a": (64, 64), "b": (64, 64)}, 0.25, "erk")
    assert same["a"] == pytest.approx(0.25) and same["b"] == pytest.approx(0.25)


def test_layout_device_moves_keep_caches_per_device():
    layout = BlockLayout.random(64, 64, 16, 0.5, generator=torch.Generator().manual_seed(0))
    assert layout.to("cpu") is layout
    meta = layout.row_index("meta")
    assert meta.ptr.device.type == "meta" and layout.row_index().ptr.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_random_layout_from_a_cuda_generator():
    layout = BlockLayout.random(64, 64, 16, 0.5, generator=torch.Generator("cuda").manual_seed(0), device="cuda")
    again = BlockLayout.random(64, 64, 16, 0.5, generator=torch.Generator("cuda").manual_seed(0), device="cuda")
    assert layout == again and layout.nnz == 8 and layout.device.type == "cuda"


def test_fractional_sizes_and_float_indices_are_refused_numpy_numbers_accepted():
    import numpy as np

    with pytest.raises(TypeError, match="out_features must be an int"):
        BlockLayout(torch.tensor([[0, 0]]), (64.5, 32), 16)
    layout = BlockLayout.random(np.int64(64), 32, 16, np.float32(0.5), generator=torch.Generator().manual_seed(0))
    assert layout.shape == (64, 32) and layout.density == 0.5
    with pytest.raises(TypeError, match="block_indices must be an integer tensor"):
        layout.set_block_indices(layout.block_indices.float() + 0.9)


def test_replace_blocks_refuses_a_repeated_slot():
    """Slot 0 moved twice would silently keep only one of its two new blocks."""
    layout = BlockLayout.from_mask(torch.tensor([[True, False], [False, True]]), 16)
    with pytest.raises(ValueError, match="slots must not repeat"):
        layout.replace_blocks(torch.tensor([0, 0]), torch.tensor([[0, 1], [1, 0]]))
    assert layout.version == 0 and layout.block_indices.tolist() == [[0, 0], [1, 1]]


def test_a_layout_does_not_share_the_tensor_it_was_built_from():
    given = torch.tensor([[0, 0], [1, 1]])
    layout = BlockLayout(given, (32, 32), 16)
    restored = BlockLayout.from_state_dict(state := layout.state_dict())
    layout.replace_blocks(torch.tensor([0]), torch.tensor([[0, 1]]))
    restored.replace_blocks(torch.tensor([1]), torch.tensor([[1, 0]]))
    assert given.tolist() == [[0, 0], [1, 1]] and state["block_indices"].tolist() == [[0, 0], [1, 1]]
    assert layout.block_indices.tolist() == [[0, 1], [1, 1]] and restored.block_indices.tolist() == [[0, 0], [1, 0]]


def test_the_layout_state_dict_is_a_snapshot_a_later_update_leaves_alone():
    layout = BlockLayout.from_mask(torch.tensor([[True, False], [False, True]]), 16)
    state = layout.state_dict()
    layout.replace_blocks(torch.tensor([1]), torch.tensor([[1, 0]]))
    assert state == {"block_indices": state["block_indices"], "shape": (32, 32), "block_size": 16}
    assert state["block_indices"].tolist() == [[0, 0], [1, 1]] and state["block_indices"].dtype == torch.int64
    assert layout.block_indices.tolist() == [[0, 0], [1, 0]]


def _unpacked(layout, index):
    from smet_kernels.layout import unpack_kernel_index

    blocks, csr, csc = unpack_kernel_index(index, layout.nnz, layout.block_shape)
    return blocks.tolist(), [t.tolist() for t in (csr.ptr, csr.slots, csr.minor, csr.by_count)], \
        [t.tolist() for t in (csc.ptr, csc.slots, csc.minor, csc.by_count)]


def test_the_kernel_index_is_one_tensor_per_device_rewritten_in_place_by_a_topology_update():
    """Blocks (0,1), (0,2), (1,0) by hand: CSR ptr [0,2,3], slots [0,1,2], columns [1,2,0], rows by count [0,1];
    CSC ptr [0,1,2,3], slots [2,0,1], rows [1,0,0]. Slot 2 moved to (1,1): CSC ptr [0,0,2,3], slots [0,2,1],
    rows [0,1,0], columns by count [1,2,0]; the same tensor object holds it (a compiled graph keeps its input)."""
    layout = BlockLayout.from_mask(torch.tensor([[False, True, True], [True, False, False]]), 16)
    index = layout.kernel_index("cpu")
    assert index.dtype == torch.int32 and layout.kernel_index(torch.device("cpu")) is index
    assert _unpacked(layout, index) == (
        [[0, 1], [0, 2], [1, 0]], [[0, 2, 3], [0, 1, 2], [1, 2, 0], [0, 1]], [[0, 1, 2, 3], [2, 0, 1], [1, 0, 0], [0, 1, 2]])
    layout.replace_blocks(torch.tensor([2]), torch.tensor([[1, 1]]))
    assert layout.kernel_index("cpu") is index and int(layout.version_tensor) == layout.version == 1
    assert _unpacked(layout, index) == (
        [[0, 1], [0, 2], [1, 1]], [[0, 2, 3], [0, 1, 2], [1, 2, 1], [0, 1]], [[0, 0, 2, 3], [0, 2, 1], [0, 1, 0], [1, 2, 0]])
    layout.set_block_indices(torch.tensor([[1, 2], [0, 0], [1, 0]]))
    assert layout.kernel_index("cpu") is index and int(layout.version_tensor) == 2
    assert _unpacked(layout, index)[1] == [[0, 1, 3], [1, 2, 0], [0, 0, 2], [1, 0]]


def test_replace_blocks_and_set_block_indices_refuse_a_negative_slot_and_a_bool_index_map():
    """Slot -1 would silently move the last slot; a bool map would be read as block (0, 0) and (0, 1)."""
    layout = BlockLayout.from_mask(torch.tensor([[True, False], [False, True]]), 16)
    with pytest.raises(ValueError, match="slots must lie in"):
        layout.replace_blocks(torch.tensor([-1]), torch.tensor([[0, 1]]))
    with pytest.raises(TypeError, match="new_blocks must be an integer tensor"):
        layout.replace_blocks(torch.tensor([0]), torch.tensor([[False, True]]))
    with pytest.raises(TypeError, match="block_indices must be an integer tensor"):
        layout.set_block_indices(torch.tensor([[False, False], [False, True]]))
    assert layout.version == 0 and layout.block_indices.tolist() == [[0, 0], [1, 1]]


def test_replace_blocks_with_no_slots_changes_nothing():
    layout = BlockLayout.from_mask(torch.tensor([[True, False], [False, True]]), 16)
    layout.replace_blocks(torch.empty(0, dtype=torch.long), torch.empty(0, 2, dtype=torch.long))
    assert layout.version == 0 and layout.block_indices.tolist() == [[0, 0], [1, 1]]


def test_layouts_of_different_block_sizes_are_not_equal():
    assert BlockLayout(torch.tensor([[0, 0]]), (64, 64), 16) != BlockLayout(torch.tensor([[0, 0]]), (64, 64), 32)


def test_a_topology_update_frees_the_index_structures_of_the_old_layout():
    """Thousands of updates in a run must not keep every version's mask and orderings alive."""
    import gc
    import weakref

    layout = BlockLayout.from_mask(torch.tensor([[True, False], [False, True]]), 16)
    old = weakref.ref(layout.row_index())
    layout.replace_blocks(torch.tensor([0]), torch.tensor([[0, 1]]))
    gc.collect()
    assert old() is None


def test_replace_blocks_refuses_fractional_slots_and_blocks_and_a_flattened_block_list():
    """A cast would truncate slot 0.7 to 0 and block (0.9, 1.6) to (0, 1); [1, 4] would be read as two blocks."""
    layout = BlockLayout.from_mask(torch.tensor([[True, False, False], [False, True, False]]), 16)
    with pytest.raises(TypeError, match="^slots must be an integer tensor"):
        layout.replace_blocks(torch.tensor([0.7]), torch.tensor([[0, 1]]))
    with pytest.raises(TypeError, match="^new_blocks must be an integer tensor"):
        layout.replace_blocks(torch.tensor([0]), torch.tensor([[0.9, 1.6]]))
    with pytest.raises(ValueError, match=r"^new_blocks must have shape \[n, 2\]"):
        layout.replace_blocks(torch.tensor([0, 1]), torch.tensor([[0, 1, 1, 2]]))
    layout.replace_blocks([], [])
    assert layout.version == 0 and layout.block_indices.tolist() == [[0, 0], [1, 1]]
    layout.replace_blocks([1], [[1, 2]])
    assert layout.block_indices.tolist() == [[0, 0], [1, 2]]


def test_replace_blocks_refuses_new_blocks_of_more_than_two_dimensions():
    layout = BlockLayout.from_mask(torch.tensor([[True, False], [False, True]]), 16)
    with pytest.raises(ValueError, match=r"^new_blocks must have shape \[n, 2\]"):
        layout.replace_blocks(torch.tensor([0]), torch.tensor([[[0, 1]]]))
    assert layout.version == 0 and layout.block_indices.tolist() == [[0, 0], [1, 1]]


def test_set_block_indices_refuses_a_map_of_another_block_count_rather_than_broadcasting_it():
    """A single block copied into every slot would leave a layout of duplicate blocks."""
    layout = BlockLayout.from_mask(torch.tensor([[True, False], [False, True]]), 16)
    with pytest.raises(ValueError, match=r"^block_indices must have shape \(2, 2\)"):
        layout.set_block_indices(torch.tensor([[0, 1]]))
    assert layout.version == 0 and layout.block_indices.tolist() == [[0, 0], [1, 1]]


def test_layouts_of_different_shapes_are_not_equal():
    assert BlockLayout(torch.tensor([[0, 0]]), (32, 32), 16) != BlockLayout(torch.tensor([[0, 0]]), (32, 64), 16)


@pytest.mark.parametrize("transpose", [False, True], ids=["wide", "tall"])
def test_row_and_col_index_list_each_major_index_own_blocks_minor_ascending(transpose):
    """In a 2x5 grid, block (0, 4) sorts after (1, 0): a sort key scaled by the major count would mix the rows."""
    mask = torch.tensor([[True, False, True, False, True], [True, True, False, True, False]])
    layout = BlockLayout.from_mask(mask.t() if transpose else mask, 16)
    for index, major in ((layout.row_index(), 0), (layout.col_index(), 1)):
        for i in range(layout.block_shape[major]):
            start, stop = index.ptr[i].item(), index.ptr[i + 1].item()
            blocks = layout.block_indices[index.slots[start:stop].long()]
            assert (blocks[:, major] == i).all()
            minor = blocks[:, 1 - major].tolist()
            assert minor == index.minor[start:stop].tolist() == sorted(minor)
