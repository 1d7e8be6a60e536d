"""The full-size benchmark grid (enumerated, not run), timing quantiles and the result check of every provider."""

import pytest
import torch

from conftest import DEVICE

from bench import kernels, optimizer, training
from bench.results import KERNEL_KEY, TRAINING_KEY, canonical
from bench.timing import measure


def _key(row, columns):
    return tuple(canonical(row.get(c)) for c in columns)


def test_full_kernel_grid():
    shapes = kernels.linear_shapes(kernels.FULL_CONFIGS)
    assert len(shapes) == 18
    assert {(s.N, s.K) for s in shapes} >= {(11008, 4096), (4096, 11008), (5504, 2048), (2816, 1024), (1408, 512)}
    assert all(s.N % 128 == 0 and s.K % 128 == 0 for s in shapes)
    cases = list(
        kernels.kernel_cases(
            kernels.FULL_CONFIGS,
            kernels.FULL_DENSITIES,
            kernels.FULL_BLOCK_SIZES,
            kernels.FULL_TOKENS,
            torch.bfloat16,
        )
    )
    # triton_grouped, masked, bsr: 3 ops each; the other Triton providers: the ops each one changes
    sparse_cases = 3 * len(kernels.OPS) + sum(len(ops) for ops in kernels.VARIANT_OPS.values())
    per_point = len(kernels.OPS) + len(kernels.FULL_BLOCK_SIZES) * len(kernels.FULL_DENSITIES) * sparse_cases
    assert len(cases) == len(shapes) * len(kernels.FULL_TOKENS) * per_point
    keys = {_key(c.key_row("triton"), KERNEL_KEY) for c in cases}
    assert len(keys) == len(cases)  # resume relies on distinct keys


def test_full_optimizer_and_training_grids():
    opt_cases = list(optimizer.optimizer_cases(kernels.FULL_CONFIGS, kernels.FULL_DENSITIES, kernels.FULL_BLOCK_SIZES))
    assert len({_key(c.key_row("triton"), KERNEL_KEY) for c in opt_cases}) == len(opt_cases)
    assert {c.provider for c in opt_cases} == {"device_copy", "smet_adamw", "torch_adamw_fused", "torch_adamw_foreach"}
    train_cases = list(
        training.training_cases(
            training.FULL_CONFIGS, training.METHODS, training.FULL_DENSITIES, 64, 16, 256, torch.bfloat16
        )
    )
    assert len(train_cases) == len(training.FULL_CONFIGS) * (2 + 2 * len(training.FULL_DENSITIES))
    assert len({_key(c.key_row("triton"), TRAINING_KEY) for c in train_cases}) == len(train_cases)


@pytest.mark.parametrize("config, block_size", [("tiny", 16), ("1b", 128), ("7b", 128)])
def test_the_model_shape_holds_every_hidden_weight_of_the_config(config, block_size):
    from smet_kernels.train.model import hidden_linear_shapes, model_config

    shape = optimizer.model_shape(config, block_size)
    cfg = model_config(config, block_size=block_size)
    total = sum(n * k for n, k in hidden_linear_shapes(cfg).values())
    assert shape.label == f"{config}:hidden" and shape.K == cfg.hidden_size
    assert shape.N % block_size == 0 and total <= shape.N * shape.K < total + block_size * shape.K
    if config == "1b":
        assert 1.2e9 < shape.N * shape.K < 1.25e9  # 24 layers of 4 h² + 3 h i, i = 5504


def test_training_modes_multiply_the_grid_with_the_modes_of_a_case_adjacent():
    plain = list(training.training_cases(["tiny"], training.METHODS, [0.5, 0.25], 32, 2, 32, torch.float32))
    both = (False, True)
    cases = list(training.training_cases(["tiny"], training.METHODS, [0.5, 0.25], 32, 2, 32, torch.float32,
                                         compiled=both, activation_checkpointing=both))  # fmt: skip
    assert len(cases) == 4 * len(plain)
    assert len({_key(c.key_row("triton"), TRAINING_KEY) for c in cases}) == len(cases)
    for index, case in enumerate(plain):
        group = cases[4 * index : 4 * index + 4]
        assert {(c.method, c.density) for c in group} == {(case.method, case.density)}
        assert [(c.compiled, c.activation_checkpointing) for c in group] == [(a, b) for a in both for b in both]
    assert not any(c.compiled or c.activation_checkpointing for c in plain)


def test_a_training_rows_key_names_the_smet_kernels_backend_for_smet_only_and_an_eager_step_by_default():
    """The torch methods run no smet_kernels op: their rows say ``torch`` whatever the backend; a case built without
    its modes is an eager step of the 256-token vocabulary saving its activations."""
    case = training.TrainingCase("tiny", "smet", 0.5, 32, 2, 32, torch.bfloat16)
    assert case.key_row("triton") == {
        "config": "tiny", "method": "smet", "density": 0.5, "block_size": 32, "batch_size": 2, "seq_len": 32,
        "dtype": "bf16", "backend": "triton", "compiled": False, "activation_checkpointing": False, "vocab_size": 256,
    }  # fmt: skip
    rows = [training.TrainingCase("tiny", m, 1.0, 32, 2, 32, torch.float32).key_row("triton")
            for m in ("dense", "galore", "masked")]  # fmt: skip
    assert {row["backend"] for row in rows} == {"torch"}


def test_unknown_grid_entries_raise():
    with pytest.raises(ValueError, match="configs"):
        kernels.linear_shapes(["70b"])
    with pytest.raises(ValueError, match="providers"):
        list(kernels.kernel_cases(["tiny"], [0.5], [32], [64], torch.float32, providers=["cutlass"]))
    with pytest.raises(ValueError, match="methods"):
        list(training.training_cases(["tiny"], ["sgd"], [0.5], 32, 2, 32, torch.float32))


def test_an_unknown_kernel_op_or_optimizer_provider_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match=r"^ops must be in \('forward', 'grad_input', 'grad_weight'\), "
                                         r"got 'backward'$"):
        list(kernels.kernel_cases(["tiny"], [0.5], [32], [64], torch.float32, ops=["forward", "backward"]))
    with pytest.raises(ValueError, match=r"^providers must be in \('smet_adamw', 'torch_adamw_fused', "
                                         r"'torch_adamw_foreach'\), got 'sgd'$"):
        list(optimizer.optimizer_cases(["tiny"], [0.5], [32], providers=["smet_adamw", "sgd"]))


def test_a_block_size_that_does_not_divide_a_shape_is_left_out_of_its_cases_only():
    """128 divides none of tiny's weights (hidden size 64) but all of 20m's: its sparse cases are 20m's alone."""
    cases = kernels.kernel_cases(["tiny", "20m"], [0.5], [64, 128], [64], torch.float32,
                                 providers=["cublas_dense", "torch_reference"], ops=["forward"])
    labels = [shape.label for shape in kernels.linear_shapes(["tiny", "20m"])]
    assert sorted((c.shape.label, c.block_size or 0) for c in cases) == sorted(
        [(label, b) for label in labels for b in (0, 64)] + [(label, 128) for label in labels if label[:3] == "20m"])
    steps = optimizer.optimizer_cases(["tiny", "20m"], [0.5], [64, 128], providers=["smet_adamw"])
    assert sorted((c.shape.label, c.block_size) for c in steps if c.block_size) == [
        ("20m:gate_up", 64), ("20m:gate_up", 128), ("tiny:gate_up", 64)]


def test_cpu_timing_quantiles():
    calls = []
    timing = measure(lambda: calls.append(1), "cpu", warmup=2, min_repeats=5, max_repeats=5, budget_s=0.0)
    assert len(calls) == 7
    assert 0 <= timing.ms_p20 <= timing.ms_p50 <= timing.ms_p80
    with pytest.raises(ValueError, match="min_repeats"):
        measure(lambda: None, "cpu", min_repeats=0)


def test_library_result_check_flags_wrong_results():
    shape = kernels.LinearShape("tiny:gate_up", 128, 64)
    case = kernels.KernelCase("forward", "torch_reference", shape, 64, 32, 0.5, torch.float32)
    operands = kernels.make_operands(case, torch.device("cpu"))
    right = kernels.case_function(case, operands, "reference")()
    assert kernels.check_result(case, operands, right) == ""
    assert "relative error" in kernels.check_result(case, operands, right + 1.0)


def _shuffled_layout_operands(case):
    """Operands whose layout numbers its slots out of row-major order (as after a topology update)."""
    from smet_kernels.functional import to_dense

    operands = kernels.make_operands(case, torch.device("cpu"))
    layout = operands.layout
    order = torch.randperm(layout.nnz, generator=torch.Generator().manual_seed(1))
    layout.set_block_indices(layout.block_indices[order])
    operands.values = operands.values[order].contiguous()
    assert torch.equal(to_dense(operands.values, layout), operands.weight)
    return operands


@pytest.mark.parametrize("op", kernels.OPS)
@pytest.mark.parametrize("provider", ["cublas_dense", "masked_dense", "torch_reference"])
def test_every_provider_is_checked_against_dense(provider, op):
    shape = kernels.LinearShape("tiny:gate_up", 128, 64)
    block_size = None if provider == "cublas_dense" else 32
    case = kernels.KernelCase(op, provider, shape, 64, block_size, 0.5, torch.float32)
    operands = kernels.make_operands(case, torch.device("cpu"))
    result = kernels.case_function(case, operands, "reference")()
    assert kernels.check_result(case, operands, result) == ""
    assert "relative error" in kernels.check_result(case, operands, 2 * result)
    row = kernels.run_case(case, operands, "reference", torch.device("cpu"), {"max_repeats": 3, "budget_s": 0.0})
    assert row["status"] == "ok"


@pytest.mark.usefixtures("one_matmul_config")  # on a GPU: one config, not 18 autotuned per variant
@pytest.mark.parametrize("provider, op", [(p, op) for p, ops in kernels.VARIANT_OPS.items() for op in ops])
def test_kernel_variants_give_the_same_result(op, provider):
    shape = kernels.LinearShape("tiny:gate_up", 128, 64)
    case = kernels.KernelCase(op, provider, shape, 300, 32, 0.5, torch.float32)
    operands = kernels.make_operands(case, torch.device(DEVICE))  # the interpreter on CPU, compiled on a GPU
    result = kernels.case_function(case, operands, "triton")()
    assert kernels.check_result(case, operands, result) == ""
    assert case.key_row("triton")["backend"] == "triton"
    with pytest.raises(kernels.KernelUnavailable, match="Triton backend"):
        kernels.case_function(case, operands, "reference")
    timed_ops = {c.op for c in kernels.kernel_cases(["tiny"], [0.5], [32], [64], torch.float32) if c.provider == provider}
    assert timed_ops == set(kernels.VARIANT_OPS[provider])


@pytest.mark.filterwarnings("ignore:Sparse BSR tensor support is in beta")
@pytest.mark.parametrize("op", kernels.OPS)
def test_torch_bsr_results_are_checked_in_their_own_form(op):
    """bsr_dense_mm returns yᵀ and dxᵀ, sampled_addmm a BSR [N, K]; the check compares them with dense."""
    shape = kernels.LinearShape("tiny:gate_up", 128, 64)
    case = kernels.KernelCase(op, "torch_bsr", shape, 64, 32, 0.5, torch.float32)
    operands = _shuffled_layout_operands(case)
    x, dy, w = operands.x, operands.dy, operands.weight
    w_bsr = w.to_sparse_bsr((32, 32))
    if op == "forward":
        result, wrong = w @ x.t(), x @ w.t()  # yᵀ [N, M]; y itself has the wrong shape
    elif op == "grad_input":
        result, wrong = w.t() @ dy.t(), 2 * (w.t() @ dy.t())
    else:
        dense = (dy.t() @ x) * operands.mask
        result = dense.to_sparse_bsr((32, 32))
        wrong = (dense * operands.mask.flip(0)).to_sparse_bsr((32, 32))  # right values at the wrong blocks
    assert w_bsr.values().shape[0] == operands.layout.nnz
    assert kernels.check_result(case, operands, result) == ""
    assert kernels.check_result(case, operands, wrong) != ""


@pytest.mark.filterwarnings("ignore:Sparse BSR tensor support is in beta")
def test_bsr_from_layout_keeps_every_block_in_any_slot_order():
    from smet_kernels.functional import to_dense

    shape = kernels.LinearShape("tiny:gate_up", 128, 64)
    case = kernels.KernelCase("forward", "torch_bsr", shape, 64, 32, 0.5, torch.float32)
    operands = _shuffled_layout_operands(case)
    operands.values[0].zero_()  # an active block that is all zeros (a zero-initialised regrown block)
    weight = to_dense(operands.values, operands.layout)
    w_bsr = kernels.bsr_from_layout(operands.values, operands.layout)
    wt_bsr = kernels.bsr_from_layout(operands.values, operands.layout, transpose=True)
    assert w_bsr.values().shape[0] == wt_bsr.values().shape[0] == operands.layout.nnz
    assert torch.equal(w_bsr.to_dense(), weight) and torch.equal(wt_bsr.to_dense(), weight.t())
    assert torch.allclose(w_bsr @ operands.x.t(), weight @ operands.x.t())  # what bsr_dense_mm computes


def test_cpu_timing_reports_the_quantiles_of_the_timed_calls_only(monkeypatch):
    """A fake clock: the warm-up call takes 100 ms, the timed ones 1, 2, 3, 4 and 10 ms: p20 1.8, median 3 (the mean
    would be 4), p80 5.2 (numpy's linear interpolation)."""
    import bench.timing

    clock = [0.0]
    durations = iter([0.100, 0.001, 0.002, 0.003, 0.004, 0.010])
    monkeypatch.setattr(bench.timing.time, "perf_counter", lambda: clock[0])

    def call():
        clock[0] += next(durations)

    timing = measure(call, "cpu", warmup=1, min_repeats=5, max_repeats=5, budget_s=0.0)
    assert (timing.ms_p20, timing.ms_p50, timing.ms_p80) == pytest.approx((1.8, 3.0, 5.2))


def test_gpu_timing_runs_do_bench_with_the_measured_device_current(monkeypatch):
    """``do_bench`` records its events, flushes L2 and synchronises on the current device: timing ``cuda:1`` while
    ``cuda:0`` is current timed an idle stream (and never waited for the work). A stubbed current device here."""
    import triton.testing

    current, seen = [0], []

    def exchange(index):
        previous, current[0] = current[0], index
        return previous

    monkeypatch.setattr(torch.cuda, "_exchange_device", exchange)
    monkeypatch.setattr(torch.cuda, "_maybe_exchange_device", exchange)
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kwargs: seen.append(current[0]) or [1.0, 2.0, 4.0])
    timing = measure(lambda: None, "cuda:1")
    assert seen == [1] and current == [0]
    assert (timing.ms_p20, timing.ms_p50, timing.ms_p80) == (1.0, 2.0, 4.0)


@pytest.fixture
def fixed_timing(monkeypatch):
    """Every benchmark measures p20 1 ms, median 2 ms, p80 4 ms."""
    from bench.timing import Timing

    for module in (kernels, optimizer):
        monkeypatch.setattr(module, "measure", lambda fn, device, **kwargs: Timing(1.0, 2.0, 4.0))


def test_optimizer_gb_per_s_is_the_compulsory_bytes_over_the_median_time(fixed_timing):
    """W [64, 96]: a copy reads and writes 4 bytes per element, AdamW reads and writes 7 fp32 values per element;
    the SMET step over 3 of the 6 blocks of 32 also reads and writes one int32 step per block."""
    from smet_kernels.train.model import LinearShape

    shape, cpu = LinearShape("s:x", 64, 96), torch.device("cpu")
    cases = {"copy": optimizer.OptimizerCase("copy", "device_copy", "dense", shape, None, 1.0),
             "adamw": optimizer.OptimizerCase("adamw", "torch_adamw_foreach", "dense", shape, None, 1.0),
             "smet": optimizer.OptimizerCase("adamw", "smet_adamw", "compact", shape, 32, 0.5)}  # fmt: skip
    moved = {name: optimizer.run_case(case, cpu, {}, backend="reference")["bytes_moved"]
             for name, case in cases.items()}  # fmt: skip
    assert moved == {"copy": 8 * 6144, "adamw": 28 * 6144, "smet": 28 * 3072 + 8 * 3}
    row = optimizer.run_case(cases["smet"], cpu, {}, backend="reference")
    assert row["gbps"] == pytest.approx((28 * 3072 + 8 * 3) / 2e-3 / 1e9)
    assert (row["ms_p20"], row["ms_p50"], row["ms_p80"]) == (1.0, 2.0, 4.0)


@pytest.mark.parametrize("provider", optimizer.PROVIDERS)
def test_an_optimizer_step_is_timed_with_its_state_allocated_even_without_a_warm_up_call(monkeypatch, provider):
    """gpu-check times CPU cases with no warm-up call: the first step, which allocates the moments (several times a
    later step), was one of the two timed samples."""
    from smet_kernels.train.model import LinearShape

    from bench.timing import Timing

    def timed(fn, device, **kwargs):
        assert len(fn.__self__.state) == 1, "a step timed before the optimizer state exists"
        return Timing(1.0, 2.0, 4.0)

    monkeypatch.setattr(optimizer, "measure", timed)
    case = optimizer.OptimizerCase("adamw", provider, "compact", LinearShape("s:x", 64, 64), 32, 0.5)
    assert optimizer.run_case(case, torch.device("cpu"), {"warmup": 0}, backend="reference")["ms_p50"] == 2.0


@pytest.mark.parametrize("provider", optimizer.PROVIDERS)
def test_an_optimizer_step_that_computes_something_else_is_timed_but_recorded_as_wrong(monkeypatch, fixed_timing,
                                                                                       provider):
    """``smet-bench run --suites optimizer`` wrote ``status = ok`` for any step: a step is checked once against
    its reference first, as kernels are."""
    from smet_kernels.train.model import LinearShape

    real_step = optimizer._step

    def broken(case, device, seed, backend, reference=False):
        step, numel, moved, param = real_step(case, device, seed, backend, reference)
        return (step if reference else lambda: (step(), param.data.add_(1.0))), numel, moved, param

    case = optimizer.OptimizerCase("adamw", provider, "compact", LinearShape("s:x", 64, 64), 32, 0.5)
    cpu = torch.device("cpu")
    assert optimizer.run_case(case, cpu, {}, backend="reference")["status"] == "ok"
    monkeypatch.setattr(optimizer, "_step", broken)
    row = optimizer.run_case(case, cpu, {}, backend="reference")
    assert (row["status"], row["ms_p50"]) == ("wrong", 2.0) and row["note"].startswith("max error 1 > ")


def test_kernel_tflops_count_the_useful_flops_of_the_drawn_layout_over_the_median_time(fixed_timing):
    """W [96, 96] in blocks of 32 at d = 0.5: 4 of the 9 blocks (exact d = 4/9); 16 tokens: 2 · 16 · 96² · 4/9 =
    131072 useful FLOPs."""
    from smet_kernels.train.model import LinearShape

    case = kernels.KernelCase("forward", "torch_reference", LinearShape("s:x", 96, 96), 16, 32, 0.5, torch.float32)
    ops = kernels.make_operands(case, torch.device("cpu"))
    row = kernels.run_case(case, ops, "reference", torch.device("cpu"), {})
    assert (row["status"], row["nnz_blocks"], row["useful_flops"]) == ("ok", 4, 131072)
    assert row["tflops"] == pytest.approx(131072 / 2e-3 / 1e12)


def _measured_steps(monkeypatch, times_ms) -> training.TrainingCase:
    """A tiny dense case whose measurement (not run) gives the step times ``times_ms`` and components 1, 2, 3, 4."""
    from types import SimpleNamespace

    from profiling.memory_breakdown import MeasuredMemory

    memory = MeasuredMemory(1, 2, 3, 4, None, None, "unavailable on cpu")
    sampler = SimpleNamespace(peak_used_bytes=None, status="unavailable: device is cpu")
    monkeypatch.setattr(training, "_measure", lambda *args: (memory, sampler, times_ms, 0.5, ""))
    return training.TrainingCase("tiny", "dense", 1.0, 32, 2, 32, torch.float32)


def test_training_tokens_per_s_is_the_tokens_of_a_step_over_the_median_step_time(monkeypatch):
    """Steps of 10, 20, 30, 40 and 50 ms (median 30, not the p20 18) of 2 × 32 tokens: 64 / 0.030 tokens/s."""
    case = _measured_steps(monkeypatch, [10.0, 20.0, 30.0, 40.0, 50.0])
    row = training.run_case(case, torch.device("cpu"), None, steps=5)
    assert (row["ms_p20"], row["ms_p50"], row["ms_p80"]) == pytest.approx((18.0, 30.0, 42.0))
    assert row["tokens_per_s"] == pytest.approx(64 / 0.030)
    assert [row[f"{c}_bytes"] for c in ("weights", "gradients", "optimizer", "activations")] == [1, 2, 3, 4]


def test_a_training_case_times_at_least_one_step(monkeypatch):
    case = _measured_steps(monkeypatch, [10.0])
    assert training.run_case(case, torch.device("cpu"), None, steps=1)["ms_p50"] == 10.0
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        training.run_case(case, torch.device("cpu"), None, steps=0)


def test_a_training_step_that_fails_its_dense_reference_check_is_measured_but_recorded_as_wrong(monkeypatch):
    """``smet-bench run --suites training`` wrote ``status = ok`` for any step; each case now first runs
    :func:`bench.training.check_step` (a loss off the dense copy's: wrong), and is measured after it all the same.
    The dense copy is made wrong here (every weight + 0.5), standing for a sparse step that computes something else."""
    from smet_kernels import modules

    case, cpu = training.TrainingCase("tiny", "smet", 0.5, 32, 2, 16, torch.float32), torch.device("cpu")
    row = training.run_case(case, cpu, "reference", steps=1)
    assert (row["status"], row["note"]) == ("ok", "")
    densify = modules.densify

    def shifted(model):
        dense = densify(model)
        with torch.no_grad():
            for parameter in dense.parameters():
                parameter.add_(0.5)
        return dense

    monkeypatch.setattr(modules, "densify", shifted)
    row = training.run_case(case, cpu, "reference", steps=1)
    assert row["status"] == "wrong" and row["note"].startswith("loss ") and row["ms_p50"] > 0


def test_training_step_times_are_in_milliseconds_one_per_step_the_gpu_synchronised_around_each(monkeypatch):
    """A clock that reads a quarter second later at each call: every step is timed between two reads, 250 ms; on a
    GPU (its synchronisation stubbed here) the device is synchronised before and after each step."""
    import itertools

    readings = itertools.count()
    monkeypatch.setattr(training.time, "perf_counter", lambda: next(readings) / 4)
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: events.append("sync"))
    for device, each in (("cpu", ["step"]), ("cuda", ["sync", "step", "sync"])):
        events.clear()
        assert training.time_steps(lambda: events.append("step"), torch.device(device), 3) == [250.0] * 3
        assert events == each * 3, device


def test_torch_bsr_params_say_when_torch_bsr_runs_untuned_defaults():
    """torch ships tuned BSR launch parameters for the A100 only: on the H200 the BSR bar is against defaults, and
    gpu-check's environment says so."""
    assert kernels.torch_bsr_params("NVIDIA A100-SXM4-40GB").startswith("tuned (torch's table for NVIDIA A100")
    untuned = kernels.torch_bsr_params("NVIDIA H200")
    assert untuned.startswith("defaults (torch ships tuned ones only for ") and "A100" in untuned


def _tiny_step(method: str, density: float):
    """``(model, optimizer, inputs, targets)`` of one fp32 step of the tiny config on the CPU reference ops."""
    case = training.TrainingCase("tiny", method, density, 32, 2, 32, torch.float32)
    model, optimizer_ = training.build(case, torch.device("cpu"), "reference")
    tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(1))
    return model, optimizer_, tokens[:, :-1], tokens[:, 1:]


@pytest.mark.parametrize("method, density", [("dense", 1.0), ("smet", 0.5)])
def test_the_training_step_check_passes_a_step_that_matches_the_dense_reference(method, density):
    model, optimizer_, inputs, targets = _tiny_step(method, density)
    assert training.check_step(model, optimizer_, inputs, targets) == ""
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())  # zeroed, kept for the next step


@pytest.mark.parametrize("relative, passes", [(5e-5, True), (3e-4, False)])
def test_the_training_step_check_allows_the_dtypes_tolerance_relative_to_the_reference_loss(monkeypatch, relative,
                                                                                           passes):
    """fp32 allows a loss off the reference by 1e-4 of the reference loss (about 5.5 for 256 tokens: 5e-5 of it is
    well above 1e-4 / 5.5, an absolute tolerance divided by the loss): 5e-5 of it passes, 3e-4 is noted."""
    from smet_kernels.train import model as model_module

    exact = model_module.lm_loss

    def loss(logits, targets):  # the reference loss is the one computed without autograd
        return exact(logits, targets) * (1 if torch.is_grad_enabled() else 1 + relative)

    monkeypatch.setattr(model_module, "lm_loss", loss)
    note = training.check_step(*_tiny_step("dense", 1.0))
    assert (note == "") if passes else (note.startswith("loss ") and " != dense reference " in note), note


@pytest.mark.parametrize("step, note", [
    (lambda p: p.data.fill_(float("nan")), "a parameter is not finite after the step"),
    (lambda p: None, "the step changed no parameter"),
])
def test_the_training_step_check_notes_a_step_that_breaks_or_keeps_the_weights(step, note):
    model, optimizer_, inputs, targets = _tiny_step("dense", 1.0)
    optimizer_.step = lambda: step(next(model.parameters()))
    assert training.check_step(model, optimizer_, inputs, targets) == note


@pytest.mark.parametrize("suites, shapes", [
    ("kernels,optimizer", "tiny:qkvo 64x64, tiny:gate_up 128x64, tiny:down 64x128"),
    ("optimizer", "tiny:gate_up 128x64"),
])
def test_a_block_size_that_divides_no_shape_of_the_configs_is_refused_rather_than_leaving_only_dense_rows(
        tmp_path, capsys, suites, shapes):
    """--quick --block-sizes 128 (tiny's weights are 64 and 128 wide) ran only the dense cases, exit 0."""
    from conftest import usage_error

    from bench.cli import main

    argv = ["run", "--quick", "--suites", suites, "--block-sizes", "32,128", "--out-dir", str(tmp_path / "out")]
    error = usage_error(main, argv, capsys)
    assert error == (f"smet-bench: error: --block-sizes 128 divides no weight shape of --configs tiny ({shapes}): "
                     "no sparse case would run")
    assert not (tmp_path / "out").exists()
