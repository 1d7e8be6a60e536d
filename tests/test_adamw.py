"""The AdamW step (``adamw_step``): the fused ``triton_adamw_step`` against ``torch_adamw_step``."""

import pytest
import torch

from smet_kernels.ops.adamw import _slot_is_whole_tiles, _vector_aligned
from smet_kernels.ops.library import adamw_step
from smet_kernels.reference.adamw import torch_adamw_step

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
HYPER = dict(betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1, warmup_steps=4)


def make_tensors(spec, dtype, device, generator, state_dtype=torch.float32):
    """spec: list of (nnz, b) for sparse values or a shape tuple prefixed by 'dense'."""
    tensors = []
    for entry in spec:
        dense = entry[0] == "dense"
        shape = entry[1] if dense else (entry[0], entry[1], entry[1])
        param = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
        grad = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
        exp_avg = (0.1 * torch.randn(shape, generator=generator)).to(device=device, dtype=state_dtype)
        exp_avg_sq = (0.01 * torch.rand(shape, generator=generator)).to(device=device, dtype=state_dtype)
        block_step = None
        if not dense:
            # local steps across warm-up, including 0 (a block regrown just before this step)
            block_step = torch.randint(0, 7, (entry[0],), generator=generator, dtype=torch.int32).to(device)
            block_step[:1] = 0
        tensors.append([param, grad, exp_avg, exp_avg_sq, block_step])
    return tensors


def clone_all(tensors):
    return [[None if t is None else t.clone() for t in entry] for entry in tensors]


def run(tensors, lrs, global_steps, backend, **kwargs):
    columns = [[entry[i] for entry in tensors] for i in range(5)]
    adamw_step(*columns, lrs, global_steps, backend=backend, **{**HYPER, **kwargs})


def assert_close(tensors, expected, dtype):
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    for got_entry, want_entry in zip(tensors, expected):
        param, _, exp_avg, exp_avg_sq, block_step = got_entry
        torch.testing.assert_close(param.float(), want_entry[0].float(), rtol=tol, atol=tol)
        torch.testing.assert_close(exp_avg.float(), want_entry[2].float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(exp_avg_sq.float(), want_entry[3].float(), rtol=1e-5, atol=1e-7)
        if block_step is not None:
            assert torch.equal(block_step, want_entry[4])


@pytest.mark.parametrize("warmup", ["linear", "momentum_ramp", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_adamw_step_triton_matches_torch_multi_tensor(warmup, dtype, device):
    generator = torch.Generator().manual_seed(0)
    spec = [(5, 16), (3, 32), (70, 16), ("dense", (37, 29)), (2, 64)]
    tensors = make_tensors(spec, dtype, device, generator)
    expected = clone_all(tensors)
    lrs = [0.1, 0.2, 0.05, 0.01, 0.3]
    global_steps = [None, 7, None, 3, None]
    run(tensors, lrs, global_steps, "triton", warmup=warmup)
    run(expected, lrs, global_steps, "reference", warmup=warmup)
    assert_close(tensors, expected, dtype)


@pytest.mark.parametrize("warmup", ["linear", "momentum_ramp", "none"])
def test_adamw_step_with_slots_of_whole_tiles_matches_torch(warmup, device):
    """Slots of whole tiles (b = 64 and 128 under the interpreter's 4096-element tiles; b >= 32 on a GPU) read one
    local step per tile; here several slots share a program and a slot spans several tiles."""
    generator = torch.Generator().manual_seed(6)
    tensors = make_tensors([(6, 64), (3, 128), ("dense", (37, 29))], torch.float32, device, generator)
    assert all(_slot_is_whole_tiles(entry) for entry in tensors)
    assert not _slot_is_whole_tiles(make_tensors([(2, 16)], torch.float32, device, generator)[0])
    tensors[0][4].copy_(torch.tensor([0, 6, 1, 5, 2, 4], dtype=torch.int32))  # a different step in every slot
    expected = clone_all(tensors)
    lrs, global_steps = [0.1, 0.2, 0.05], [None, None, 3]
    run(tensors, lrs, global_steps, "triton", warmup=warmup)
    run(expected, lrs, global_steps, "reference", warmup=warmup)
    assert_close(tensors, expected, torch.float32)


@pytest.mark.parametrize("aligned", [True, False])
def test_adamw_step_vector_aligned_and_unaligned_launches_match_torch(aligned, device):
    """16-element sizes at 16-byte addresses take the vectorised path; one odd tensor sends the group to the other."""
    generator = torch.Generator().manual_seed(1)
    spec = [(5, 16), (3, 32), ("dense", (64, 48))] + ([] if aligned else [("dense", (37,))])
    tensors = make_tensors(spec, torch.float32, device, generator)
    assert all(_vector_aligned(t) for entry in tensors for t in entry[:4]) == aligned
    expected = clone_all(tensors)
    lrs, global_steps = [0.1] * len(spec), [None, 4, 2, 9][: len(spec)]
    run(tensors, lrs, global_steps, "triton")
    run(expected, lrs, global_steps, "reference")
    assert_close(tensors, expected, torch.float32)


def test_adamw_step_vector_alignment_needs_address_and_size():
    base = torch.zeros(64)
    assert _vector_aligned(base[4:20])  # 16 bytes in, 16 elements
    assert not _vector_aligned(base[1:17])  # 4-byte address
    assert not _vector_aligned(base[2:18])  # 8-byte address
    assert not _vector_aligned(base[:20])  # 20 elements


@pytest.mark.parametrize("misaligned", [None, 0, 1, 2, 3], ids=["none", "param", "grad", "exp_avg", "exp_avg_sq"])
def test_adamw_step_takes_the_vector_path_only_when_all_four_tensors_are_aligned(misaligned, monkeypatch, device):
    """On a GPU a vector access at a 4-byte address faults: the interpreter alone cannot tell the paths apart."""
    from smet_kernels.ops import adamw as module

    launches = []

    class Launcher:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(kwargs["ALIGNED"])

    monkeypatch.setattr(module, "adamw_step_kernel", Launcher())
    tensors = make_tensors([(2, 16)], torch.float32, device, torch.Generator().manual_seed(1))
    if misaligned is not None:
        original = tensors[0][misaligned]
        tensors[0][misaligned] = torch.zeros(original.numel() + 1, device=device)[1:].view_as(original)
    run(tensors, [0.1], [None], "triton")
    assert launches == [misaligned is None]


@pytest.mark.parametrize("block_size, aligned", [(6, False), (10, False), (7, False), (12, True), (16, True)])
def test_adamw_step_takes_the_vector_path_only_when_every_program_starts_at_a_multiple_of_16_elements(
    block_size, aligned, monkeypatch, device
):
    """Slots of 6 × 6 put the second program's first element at 455 · 36 = 16380: the kernel was told it was a
    multiple of 16 (a misaligned vector access on a GPU) because the tensors' addresses and sizes were."""
    from smet_kernels.ops import adamw as module

    launches = []

    class Launcher:
        def __getitem__(self, grid):
            return lambda pointers, sizes, scalars, work, *args, **kwargs: launches.append((sizes, work, kwargs))

    monkeypatch.setattr(module, "adamw_step_kernel", Launcher())
    nnz = 16 * (module.ADAMW_ELEMENTS_PER_PROGRAM // block_size**2 + 2)  # at least two programs, 16k elements
    tensors = make_tensors([(nnz, block_size)], torch.float32, device, torch.Generator().manual_seed(1))
    assert all(_vector_aligned(t) for t in tensors[0][:4])
    run(tensors, [0.1], [None], "triton")
    ((sizes, work, kwargs),) = launches
    starts = work[:, 1].long().cpu() * sizes[work[:, 0].long(), 1].cpu()
    assert len(starts) >= 2 and bool((starts % 16 == 0).all()) == aligned and kwargs["ALIGNED"] == aligned


@pytest.mark.parametrize("betas", [(0.0, 0.99), (0.9, 0.0)])
def test_adamw_step_with_a_zero_beta_matches_torch(betas, device):
    """beta = 0 is allowed: its bias correction 1 - 0^t is 1 (log2(0) = -inf in the kernel), not a division by 0."""
    tensors = make_tensors([(3, 16), ("dense", (40,))], torch.float32, device, torch.Generator().manual_seed(4))
    expected = clone_all(tensors)
    run(tensors, [0.1, 0.1], [None, 3], "triton", betas=betas)
    run(expected, [0.1, 0.1], [None, 3], "reference", betas=betas)
    assert_close(tensors, expected, torch.float32)


def test_adamw_step_triton_mixed_dtypes_and_state_dtype(device):
    """Tensors of different parameter/state dtypes in one call are grouped into separate launches."""
    generator = torch.Generator().manual_seed(1)
    tensors = make_tensors([(4, 16)], torch.float32, device, generator)
    tensors += make_tensors([(3, 16), ("dense", ())], torch.float16, device, generator)
    tensors += make_tensors([(2, 32)], torch.float32, device, generator, state_dtype=torch.float16)
    expected = clone_all(tensors)
    lrs, steps = [0.1] * 4, [None, None, 2, None]
    run(tensors, lrs, steps, "triton")
    run(expected, lrs, steps, "reference")
    assert_close(tensors[:1], expected[:1], torch.float32)
    assert_close(tensors[1:3], expected[1:3], torch.float16)
    assert_close(tensors[3:], expected[3:], torch.float16)


def test_adamw_step_bfloat16_weights_fp32_state(device):
    generator = torch.Generator().manual_seed(2)
    tensors = make_tensors([(3, 16), ("dense", (33,))], torch.bfloat16, device, generator)
    expected = clone_all(tensors)
    run(tensors, [0.05, 0.05], [None, 4], "triton")
    run(expected, [0.05, 0.05], [None, 4], "reference")
    assert_close(tensors, expected, torch.bfloat16)


def test_adamw_step_bfloat16_weights_round_to_nearest_and_do_not_drift(device):
    """Updates far below one bf16 unit leave the weights unchanged, as in PyTorch: the kernel rounds its fp32
    result to nearest even (the interpreter alone would truncate it, shrinking every weight towards zero)."""
    generator = torch.Generator().manual_seed(3)
    tensors = make_tensors([(4, 16), ("dense", (64,))], torch.bfloat16, device, generator)
    initial = [entry[0].clone() for entry in tensors]
    expected = clone_all(tensors)
    for _ in range(5):
        run(tensors, [1e-7, 1e-7], [None, 4], "triton", weight_decay=0.0)
        run(expected, [1e-7, 1e-7], [None, 4], "reference", weight_decay=0.0)
    for entry, want, start in zip(tensors, expected, initial):
        assert torch.equal(entry[0], want[0])
        assert torch.equal(entry[0], start)


def test_adamw_step_table_cache_reused_and_rebuilt(device):
    generator = torch.Generator().manual_seed(3)
    tensors = make_tensors([(3, 16), (2, 32)], torch.float32, device, generator)
    expected = clone_all(tensors)
    cache = {}
    for step in range(3):
        if step == 2:  # a new grad tensor (new address) must rebuild the tables
            for entries in (tensors, expected):
                entries[0][1] = entries[0][1] * 2
        run(tensors, [0.1, 0.1], [None, None], "triton", cache=cache)
        run(expected, [0.1, 0.1], [None, None], "reference")
        assert len(cache) == 1
    assert_close(tensors, expected, torch.float32)
    assert torch.equal(tensors[0][4], expected[0][4])


def test_adamw_step_table_cache_rebuilt_when_a_tensor_changes_shape(device):
    cache = {}
    for seed, nnz in enumerate((3, 5)):  # the same cache entry, then a values tensor of more slots
        tensors = make_tensors([(nnz, 16)], torch.float32, device, torch.Generator().manual_seed(seed))
        expected = clone_all(tensors)
        run(tensors, [0.1], [None], "triton", cache=cache)
        run(expected, [0.1], [None], "reference")
        assert_close(tensors, expected, torch.float32)


def test_adamw_step_first_update_of_regrown_block_is_warmed_up(device):
    """t = 0 -> first update with t = 1: |m_hat / sqrt(v_hat)| = 1, so the step is lr * 1/W (linear warm-up)."""
    values = torch.zeros(2, 16, 16, device=device)
    grad = torch.randn(2, 16, 16, device=device)
    exp_avg, exp_avg_sq = torch.zeros_like(values), torch.zeros_like(values)
    block_step = torch.zeros(2, dtype=torch.int32, device=device)
    adamw_step(
        [values], [grad], [exp_avg], [exp_avg_sq], [block_step], [0.1], [None],
        betas=(0.9, 0.999), eps=1e-12, warmup="linear", warmup_steps=10, backend="triton",
    )  # fmt: skip
    torch.testing.assert_close(values, -0.01 * torch.sign(grad), rtol=1e-5, atol=1e-7)
    assert block_step.tolist() == [1, 1]


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_adamw_step_does_not_warm_up_a_dense_tensor_unless_asked(backend, device):
    """Without ``dense_warmups`` a dense tensor takes torch's AdamW update at its global step (no 1/W factor)."""
    weight = torch.randn(7, 5, generator=torch.Generator().manual_seed(0)).to(device)
    grad = torch.randn(7, 5, generator=torch.Generator().manual_seed(1)).to(device)
    expected = weight.clone().requires_grad_()
    expected.grad = grad.clone()
    torch.optim.AdamW([expected], lr=0.1, **{k: v for k, v in HYPER.items() if k != "warmup_steps"}).step()
    exp_avg, exp_avg_sq = torch.zeros_like(weight), torch.zeros_like(weight)
    adamw_step([weight], [grad], [exp_avg], [exp_avg_sq], [None], [0.1], [1], backend=backend, **HYPER)
    torch.testing.assert_close(weight, expected.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("small_blocks", [16, 32], ids=["step_per_element", "step_per_tile"])
def test_adamw_step_triton_matches_torch_gpu_large(dtype, small_blocks):
    generator = torch.Generator().manual_seed(4)
    spec = [(300, 64), (40, 128), (1000, small_blocks), ("dense", (1000, 333))]
    tensors = make_tensors(spec, dtype, "cuda", generator)
    expected = clone_all(tensors)
    lrs, steps = [0.01] * 4, [None, None, 12, 5]
    run(tensors, lrs, steps, "triton")
    run(expected, lrs, steps, "reference")
    assert_close(tensors, expected, dtype)


def _valid(device):
    generator = torch.Generator().manual_seed(5)
    return make_tensors([(2, 16)], torch.float32, device, generator)[0]


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda t: t.__setitem__(1, t[1].half()), TypeError, r"grads\[0\] has dtype"),
        (lambda t: t.__setitem__(1, t[1][:1].clone()), ValueError, r"grads\[0\] has shape"),
        (lambda t: t.__setitem__(4, t[4].long()), TypeError, r"block_steps\[0\] must be an int32"),
        (lambda t: t.__setitem__(4, t[4][:1].clone()), ValueError, r"block_steps\[0\] must be a contiguous"),
        (lambda t: t.__setitem__(4, t[4].repeat(2)[::2]), ValueError, r"block_steps\[0\] must be a contiguous"),
        (lambda t: t.__setitem__(1, t[1].to("meta")), ValueError, r"grads\[0\] is on meta"),
        (lambda t: t.__setitem__(2, t[2].int()) or t.__setitem__(3, t[3].int()), TypeError,
         r"exp_avgs\[0\]/exp_avg_sqs\[0\] must share a float dtype"),
        (lambda t: t.__setitem__(2, t[2].transpose(1, 2)), ValueError, r"exp_avgs\[0\] must be contiguous"),
        (lambda t: t.__setitem__(3, t[3].half()), TypeError, r"exp_avgs\[0\]/exp_avg_sqs\[0\]"),
        (lambda t: t.__setitem__(4, None), ValueError, r"global_steps\[0\] is required"),
        (lambda t: t.__setitem__(1, t[1].tolist()), TypeError, r"^grads\[0\] must be a torch.Tensor, got list$"),
        (lambda t: t.__setitem__(0, t[0].double()), TypeError,
         r"^params\[0\] must be one of \(torch.float32, torch.float16, torch.bfloat16\), got torch.float64$"),
        (lambda t: t.__setitem__(slice(0, 4), [x.reshape(2, 256) for x in t[:4]]), ValueError,
         r"^params\[0\] with a block_step must be values \[nnz, b, b\], got \(2, 256\)$"),
    ],
)
def test_adamw_step_bad_tensors_raise(mutate, error, match, device):
    tensors = _valid(device)
    mutate(tensors)
    with pytest.raises(error, match=match):
        adamw_step(*[[t] for t in tensors], [0.1], [None], backend="triton")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(betas=(1.0, 0.9)), ValueError, r"betas\[0\]"),
        (dict(betas=(0.9, -0.1)), ValueError, r"betas\[1\]"),
        (dict(eps=0.0), ValueError, "eps"),
        (dict(eps=True), ValueError, "eps"),
        (dict(betas=(0.9, 0.99, 0.5)), TypeError, "betas must be a pair"),
        (dict(weight_decay=-1.0), ValueError, "weight_decay"),
        (dict(warmup="cosine"), ValueError, "warmup"),
        (dict(warmup_steps=0), ValueError, "warmup_steps"),
        (dict(warmup_steps=2.5), TypeError, "warmup_steps"),
    ],
)
def test_adamw_step_bad_hyperparameters_raise(kwargs, error, match, device):
    tensors = _valid(device)
    with pytest.raises(error, match=match):
        adamw_step(*[[t] for t in tensors], [0.1], [None], backend="triton", **kwargs)


def test_adamw_step_bad_lr_and_lengths_raise(device):
    tensors = _valid(device)
    with pytest.raises(ValueError, match=r"lrs\[0\] must be >= 0"):
        adamw_step(*[[t] for t in tensors], [-0.1], [None])
    with pytest.raises(ValueError, match=r"lrs\[0\] must be >= 0, got nan"):
        adamw_step(*[[t] for t in tensors], [float("nan")], [None])
    with pytest.raises(ValueError, match=r"global_steps\[0\] must be >= 1"):
        adamw_step(*[[t] for t in tensors], [0.1], [0])
    with pytest.raises(ValueError, match="global_steps has 2 entries"):
        adamw_step(*[[t] for t in tensors], [0.1], [None, None])


def test_torch_adamw_step_refuses_an_unknown_warmup_and_a_dense_tensor_without_a_global_step(device):
    """adamw_step checks these before it dispatches; a direct caller of torch_adamw_step gets the same errors, with
    the tensors left as they were."""
    tensors = _valid(device)
    before = clone_all([tensors])
    with pytest.raises(ValueError, match=r"^warmup must be one of \('linear', 'momentum_ramp', 'none'\), "
                                         r"got 'cosine'$"):
        torch_adamw_step(*tensors, lr=0.1, warmup="cosine")
    with pytest.raises(ValueError, match=r"^global_step is required for a dense tensor \(block_step=None\)$"):
        torch_adamw_step(*tensors[:4], None, lr=0.1)
    for tensor, original in zip(tensors, before[0]):
        assert torch.equal(tensor, original)


@pytest.mark.parametrize("spec", [[(0, 64)], [(0, 16), (2, 64), ("dense", (5,))], [(3, 0)]],
                         ids=["nnz0", "nnz0_mixed", "b0"])
def test_adamw_step_triton_empty_values_match_torch(spec, device):
    """Values with no slots (nnz = 0) or empty slots (b = 0) pass check_tensors: the fused step must not divide by
    zero building its tables, and matches the reference (steps of b = 0 slots bumped too)."""
    generator = torch.Generator().manual_seed(8)
    tensors = make_tensors(spec, torch.float32, device, generator)
    expected = clone_all(tensors)
    lrs, global_steps = [0.1] * len(spec), [None if entry[0] != "dense" else 2 for entry in spec]
    run(tensors, lrs, global_steps, "triton")
    run(expected, lrs, global_steps, "reference")
    assert_close(tensors, expected, torch.float32)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_adamw_step_decays_a_bf16_weight_in_fp32_and_rounds_once(backend):
    """θ = 1 + 2^-7 with lr·λ = 0.75 and no gradient: θ − 0.75 θ = 0.25 + 2^-9, a bf16 number. With 0.75 θ rounded to
    bf16 first (a tie, to 0.75 + 2^-7) the step would land on 0.25."""
    param = torch.full((1, 16, 16), 1.0078125, dtype=torch.bfloat16)
    state = [torch.zeros(1, 16, 16), torch.zeros(1, 16, 16), torch.zeros(1, dtype=torch.int32)]
    adamw_step([param], [torch.zeros_like(param)], *([s] for s in state), [1.0], [None], backend=backend,
               betas=(0.9, 0.99), eps=1e-8, weight_decay=0.75, warmup="none")
    assert param.unique().tolist() == [0.251953125]


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_adamw_step_takes_numpy_scalar_hyperparameters_as_the_same_python_numbers(backend, device):
    """``np.float32(1e-8)`` was refused as "eps must be a finite float > 0"; numbers of a sweep's numpy arrays."""
    np = pytest.importorskip("numpy")
    generator = torch.Generator().manual_seed(9)
    tensors = make_tensors([(3, 16), ("dense", (7,))], torch.float32, device, generator)
    expected = clone_all(tensors)
    run(expected, [0.1, 0.01], [None, 3], backend)
    run(tensors, [np.float32(0.1), np.float64(0.01)], [None, np.int64(3)], backend, betas=(np.float32(0.9), 0.99),
        eps=np.float32(1e-6), weight_decay=np.float64(0.1), warmup_steps=np.int64(4))
    assert_close(tensors, expected, torch.float32)
