"""Regrow initialisation kernel (smet_kernels.ops.regrow) against the PyTorch reference."""

import pytest
import torch

from smet_kernels.ops.library import regrow_blocks

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_state(nnz, b, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(nnz, b, b, generator=generator).to(device=device, dtype=dtype)
    exp_avg = torch.randn(nnz, b, b, generator=generator).to(device)
    exp_avg_sq = torch.rand(nnz, b, b, generator=generator).to(device)
    block_step = torch.randint(1, 50, (nnz,), generator=generator, dtype=torch.int32).to(device)
    return values, exp_avg, exp_avg_sq, block_step


def regrow_both_backends(nnz, b, dtype, device, slots, init, with_state=True):
    results = []
    for backend in ("triton", "reference"):
        values, exp_avg, exp_avg_sq, block_step = make_state(nnz, b, dtype, device)
        if not with_state:
            exp_avg = exp_avg_sq = block_step = None
        generator = torch.Generator().manual_seed(7)
        regrow_blocks(
            values, slots.to(device), exp_avg, exp_avg_sq, block_step,
            init=init, init_std=0.05, generator=generator, backend=backend,
        )  # fmt: skip
        results.append((values, exp_avg, exp_avg_sq, block_step))
    return results


@pytest.mark.parametrize("init", ["zeros", "normal"])
@pytest.mark.parametrize("b", [16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_regrow_blocks_triton_matches_torch(init, b, dtype, device):
    """Bit for bit, bf16 included: the fp32 draws round to nearest even on both backends."""
    slots = torch.tensor([5, 0, 3])
    (values, exp_avg, exp_avg_sq, block_step), expected = regrow_both_backends(6, b, dtype, device, slots, init)
    assert torch.equal(values, expected[0])
    assert torch.equal(exp_avg, expected[1])
    assert torch.equal(exp_avg_sq, expected[2])
    assert torch.equal(block_step, expected[3])
    untouched = torch.tensor([1, 2, 4])
    original = make_state(6, b, dtype, device)
    assert torch.equal(values[untouched], original[0][untouched])
    assert torch.equal(exp_avg[untouched], original[1][untouched])
    assert block_step[slots].tolist() == [0, 0, 0]
    assert torch.equal(block_step[untouched], original[3][untouched])
    assert not exp_avg[slots].any() and not exp_avg_sq[slots].any()
    if init == "zeros":
        assert not values[slots].any()


def test_regrow_blocks_normal_init_statistics_and_determinism(device):
    values, *_ = make_state(8, 32, torch.float32, device)
    slots = torch.arange(8, device=device)
    regrow_blocks(values, slots, init="normal", init_std=0.02, generator=torch.Generator().manual_seed(11))
    assert abs(values.std().item() - 0.02) < 0.001 and abs(values.mean().item()) < 0.001
    again = torch.empty_like(values)
    regrow_blocks(again, slots, init="normal", init_std=0.02, generator=torch.Generator().manual_seed(11))
    assert torch.equal(values, again)


def test_regrow_blocks_without_optimizer_state(device):
    slots = torch.tensor([2, 1])
    (values, *_), expected = regrow_both_backends(4, 16, torch.float32, device, slots, "normal", with_state=False)
    assert torch.equal(values, expected[0])


def test_regrow_blocks_triton_strided_slots_match_torch(device):
    slots = torch.tensor([5, 1, 0, 2, 3])[::2]  # a non-contiguous view: the kernel reads a contiguous copy
    (values, exp_avg, exp_avg_sq, block_step), expected = regrow_both_backends(6, 16, torch.float32, device, slots,
                                                                              "normal")  # fmt: skip
    assert torch.equal(values, expected[0]) and torch.equal(block_step, expected[3])
    assert torch.equal(exp_avg, expected[1]) and torch.equal(exp_avg_sq, expected[2])


@pytest.mark.parametrize("kept", ["exp_avg", "exp_avg_sq"])
def test_regrow_blocks_triton_with_one_moment_matches_torch(kept, device):
    """Each moment is reset when given and left alone (the values not written in its place) when None."""
    results = []
    for backend in ("triton", "reference"):
        values, exp_avg, exp_avg_sq, block_step = make_state(4, 16, torch.float32, device)
        moments = {"exp_avg": exp_avg if kept == "exp_avg" else None,
                   "exp_avg_sq": exp_avg_sq if kept == "exp_avg_sq" else None}  # fmt: skip
        regrow_blocks(values, torch.tensor([3, 1], device=device), **moments, block_step=block_step, init="normal",
                      generator=torch.Generator().manual_seed(7), backend=backend)  # fmt: skip
        results.append((values, exp_avg, exp_avg_sq))
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_regrow_blocks_empty_slots_is_a_no_op(device):
    values, exp_avg, exp_avg_sq, block_step = make_state(3, 16, torch.float32, device)
    before = values.clone()
    regrow_blocks(values, torch.empty(0, dtype=torch.int64, device=device), exp_avg, exp_avg_sq, block_step)
    assert torch.equal(values, before)


@pytest.mark.parametrize("init", ["zeros", "normal"])
def test_regrow_blocks_triton_empty_blocks_match_torch(init, device):
    """Values of empty slots (b = 0) pass check_inputs: the kernel's grid must not divide by zero, and the regrown
    slots' steps are reset as by the reference."""
    slots = torch.tensor([2, 0])
    (values, exp_avg, exp_avg_sq, block_step), expected = regrow_both_backends(3, 0, torch.float32, device, slots, init)
    assert values.shape == (3, 0, 0) and exp_avg.shape == exp_avg_sq.shape == values.shape
    assert torch.equal(block_step, expected[3]) and block_step[slots].tolist() == [0, 0]
    assert block_step[1] == make_state(3, 0, torch.float32, device)[3][1]


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_regrow_blocks_triton_matches_torch_gpu(dtype):
    slots = torch.randperm(300)[:40]
    (values, exp_avg, exp_avg_sq, block_step), expected = regrow_both_backends(300, 128, dtype, "cuda", slots, "normal")
    assert torch.equal(values, expected[0]) and torch.equal(block_step, expected[3])
    assert torch.equal(exp_avg, expected[1]) and torch.equal(exp_avg_sq, expected[2])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_regrow_blocks_triton_on_a_device_other_than_the_current_one():
    slots = torch.tensor([4, 1])
    with torch.cuda.device(0):
        (values, exp_avg, exp_avg_sq, block_step), expected = regrow_both_backends(
            6, 32, torch.float32, "cuda:1", slots, "normal"
        )
    assert torch.equal(values, expected[0]) and torch.equal(block_step, expected[3])
    assert torch.equal(exp_avg, expected[1]) and torch.equal(exp_avg_sq, expected[2])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(slots=torch.tensor([0, 4])), ValueError, "slots must lie in"),
        (dict(slots=torch.tensor([-1, 2])), ValueError, "slots must lie in"),
        (dict(slots=torch.tensor([0, 2], device="meta")), ValueError, "slots is on meta"),
        (dict(slots=torch.tensor([1, 1])), ValueError, "slots must not repeat"),
        (dict(slots=torch.tensor([0.0])), TypeError, "slots must be a 1-D"),
        (dict(slots=[0, 1]), TypeError, "slots must be a LongTensor"),
        (dict(values=torch.zeros(4, 16, 8)), ValueError, "values must have shape"),
        (dict(values=torch.zeros(4, 16, 16, dtype=torch.int32)), TypeError, "values must be one of"),
        (dict(exp_avg=torch.zeros(4, 16, 32)), ValueError, "exp_avg has shape"),
        (dict(exp_avg=torch.zeros(4, 16, 16).transpose(1, 2)), ValueError, "exp_avg must be a contiguous"),
        (dict(exp_avg_sq=torch.zeros(4, 16, 16, dtype=torch.int64)), TypeError, "exp_avg_sq must be a float"),
        (dict(block_step=torch.zeros(4, dtype=torch.int64)), TypeError, "block_step must be an int32"),
        (dict(block_step=torch.zeros(3, dtype=torch.int32)), ValueError, "block_step must have shape"),
        (dict(block_step=torch.zeros(8, dtype=torch.int32)[::2]), ValueError, "block_step must be contiguous"),
        (dict(init="uniform"), ValueError, "init must be one of"),
        (dict(init_std=-1.0), ValueError, "init_std"),
        (dict(init_std=float("inf")), ValueError, "init_std"),
        (dict(generator=3), TypeError, "generator"),
        (dict(values=[[[0.0]]]), TypeError, "^values must be a torch.Tensor, got list$"),
        (dict(values=torch.zeros(16, 16, 4).permute(2, 0, 1)), ValueError, "^values must be contiguous$"),
        (dict(exp_avg=torch.zeros(4, 16, 16).tolist()), TypeError,
         "^exp_avg must be a torch.Tensor or None, got list$"),
    ],
)
def test_regrow_blocks_bad_arguments_raise(kwargs, error, match):
    arguments = dict(values=torch.zeros(4, 16, 16), slots=torch.tensor([0, 2]), init="normal")
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        regrow_blocks(**arguments, backend="triton")


def test_regrow_blocks_without_a_backend_follows_the_global_one(reference_backend, monkeypatch):
    from smet_kernels.ops import library

    ran = []
    monkeypatch.setattr(library, "torch_regrow_blocks", lambda *args: ran.append("reference"))
    monkeypatch.setattr(library, "triton_regrow_blocks", lambda *args: ran.append("triton"))
    regrow_blocks(torch.ones(3, 16, 16), torch.tensor([1]))
    assert ran == ["reference"]
