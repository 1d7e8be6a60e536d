"""smet-bench gpu-check, stage correctness: each check fails where it must. A check that passes a wrong kernel (a
bound too loose, the wrong kernel or split run, a reference that is the kernel under test, an error swallowed) would
waste the one GPU run, so each way of going blind has a test here."""

import dataclasses

import torch

from bench.gpu_check import correctness, kernel_ops, parallel
from bench.gpu_check.plan import CPU
from smet_kernels.ops.variant import VARIANTS
from test_gpu_check_correctness import after_each_triton_step


class Spent:
    def expired(self) -> bool:
        return True


class Never:
    def expired(self) -> bool:
        return False


def test_a_matmul_result_just_above_its_bound_fails_and_one_just_below_passes():
    expected = torch.linspace(1.0, 2.0, 64)
    above = correctness.check_call(lambda: expected * (1 + 1.5e-3), expected, bound=1e-3)
    below = correctness.check_call(lambda: expected * (1 + 0.5e-3), expected, bound=1e-3)
    assert above["status"] == "fail" and "error 0.0015 > bound 0.001" in above["note"]
    assert below["status"] == "pass"


def test_the_check_layout_stores_its_blocks_shuffled_not_in_row_major_order():
    """After topology updates the slots are in no order: a kernel that assumed sorted slots must be caught."""
    layout = correctness.check_layout((3, 17), 16, torch.Generator().manual_seed(0))
    keys = (layout.block_indices[:, 0] * 17 + layout.block_indices[:, 1]).tolist()
    assert keys != sorted(keys)


def test_every_variant_with_a_weight_grad_kernel_of_its_own_checks_it_split_k_on_and_off():
    points = correctness.matmul_points(VARIANTS, 4)
    for variant in ("grouped", "tma"):
        assert [(op, k) for v, op, k in points if v == variant] == [("forward", None), ("grad_input", None),
                                                                      ("grad_weight", 1), ("grad_weight", 4)]
    assert correctness.variants_for(torch.device("cpu")) == VARIANTS  # the interpreter runs the TMA kernels too


def _recording_ops(calls):
    """``kernel_ops.matmul_ops`` that record ``(variant, op, split_k)`` and compute the exact float64 results."""
    from smet_kernels.functional import from_dense, to_dense

    def ops(variant):
        def forward(x, values, layout):
            calls.append((variant, "forward", None))
            return (x.double() @ to_dense(values, layout).double().t()).to(x.dtype)

        def grad_input(dy, values, layout):
            calls.append((variant, "grad_input", None))
            return (dy.double() @ to_dense(values, layout).double()).to(dy.dtype)

        def grad_weight(dy, x, layout, split_k):
            calls.append((variant, "grad_weight", split_k))
            return from_dense(dy.double().t() @ x.double(), layout).to(x.dtype)

        return {"forward": forward, "grad_input": grad_input, "grad_weight": grad_weight}

    return ops


def test_each_matmul_check_runs_its_own_variant_and_split_and_is_judged_on_its_own_op_s_bound(monkeypatch):
    calls = []
    monkeypatch.setattr(kernel_ops, "matmul_ops", _recording_ops(calls))
    sizes = dataclasses.replace(CPU, check_block_sizes=(16,), check_dtypes=("fp16",))
    rows, not_run = correctness.matmul_checks(sizes, torch.device("cpu"), 0, Never())
    assert not_run == [] and all(row["status"] == "pass" for row in rows), rows
    points = correctness.matmul_points(correctness.variants_for(torch.device("cpu")), sizes.split_k)
    assert calls == [point for point in points for _ in range(3)]  # a warm-up call, then two checked calls
    operands = correctness._MatmulOperands(sizes, 16, torch.float16, torch.device("cpu"), 0)
    assert len(set(operands.bound.values())) == 3  # the ops' bounds differ: a row on another op's bound shows
    assert [row["bound"] for row in rows] == [operands.bound[op] for _, op, _ in points]


def test_a_matmul_check_that_raises_is_a_failed_row_with_the_error():
    def raising(variant):
        def fail(*args):
            raise RuntimeError(f"{variant} launch failed")

        return dict.fromkeys(("forward", "grad_input", "grad_weight"), fail)

    sizes = dataclasses.replace(CPU, check_block_sizes=(16,), check_dtypes=("fp32",))
    original, kernel_ops.matmul_ops = kernel_ops.matmul_ops, raising
    try:
        rows, _ = correctness.matmul_checks(sizes, torch.device("cpu"), 0, Never())
    finally:
        kernel_ops.matmul_ops = original
    assert rows and all(row["status"] == "fail" and row["note"] == f"raised RuntimeError: {row['variant']} launch "
                        "failed" for row in rows), rows  # fmt: skip


def test_a_worker_task_runs_the_checks_of_its_own_group_only():
    sizes = dataclasses.replace(CPU, check_block_sizes=(16, 32), check_dtypes=("fp32", "fp16"))
    rows, not_run = parallel.matmul_group(sizes, "cpu", 0, 32, "fp16", Spent())
    cpu = torch.device("cpu")
    assert rows == [] and not_run == [correctness.not_run_label(row) for row, _ in
                                      correctness.group_checks(sizes, cpu, 32, "fp16")]  # fmt: skip


def _adamw_rows(monkeypatch, after_triton_step):
    """The AdamW checks at CPU sizes with ``after_triton_step(param, block_step)`` run after each fused step; the
    parameter dtypes the fused step saw."""
    adamw_step, dtypes = kernel_ops.adamw_step, []

    def step(param, grad, exp_avg, exp_avg_sq, block_step, *, backend, **kwargs):
        adamw_step(param, grad, exp_avg, exp_avg_sq, block_step, backend=backend, **kwargs)
        if backend == "triton":
            dtypes.append(param.dtype)
            after_triton_step(param, block_step)

    monkeypatch.setattr(kernel_ops, "adamw_step", step)
    rows, _ = correctness.adamw_checks(CPU, torch.device("cpu"), 0, Never())
    return [row for row in rows if row["check"] == "adamw"], set(dtypes)


def test_a_fused_adamw_step_off_the_reference_fails_its_check_for_bf16_and_fp32_parameters(monkeypatch):
    """Against the reference on its own copies: the reference run with the fused kernel, or compared with the fused
    state itself, would pass this."""

    def off(param, block_step):
        param.view(-1)[3] += 0.5

    adamw, dtypes = _adamw_rows(monkeypatch, off)
    assert dtypes == {torch.bfloat16, torch.float32}
    assert adamw and all(row["status"] == "fail" and row["note"].startswith("step 1: param differs by 0.")
                         for row in adamw), adamw  # fmt: skip


def test_the_adamw_error_reported_is_the_largest_difference_over_the_steps(monkeypatch):
    def off_at_the_last_step(param, block_step):
        if int(block_step.max()) == CPU.adamw_steps and param.dtype == torch.float32:
            param.view(-1)[0] += 5e-7  # within the fp32 tolerance, 1e-6 abs + rel

    adamw, _ = _adamw_rows(monkeypatch, off_at_the_last_step)
    fp32 = [row for row in adamw if row["dtype"] == "fp32"]
    assert fp32 and all(row["status"] == "pass" and 4e-7 < row["error"] < 6e-7 for row in fp32), fp32


def test_an_adamw_run_that_raises_fails_its_adamw_and_regrow_rows(monkeypatch):
    def raising(*args, **kwargs):
        raise RuntimeError("kernel fault")

    monkeypatch.setattr(kernel_ops, "adamw_step", raising)
    rows, _ = correctness.adamw_checks(CPU, torch.device("cpu"), 0, Never())
    assert rows and all(row["status"] == "fail" for row in rows)
    assert {row["note"] for row in rows} == {"raised RuntimeError: kernel fault", "not reached: the AdamW run raised"}


def test_a_regrow_that_changes_a_slot_it_was_not_given_fails_the_regrow_check(monkeypatch):
    regrow = kernel_ops.regrow

    def spills(values, slots, *args):
        regrow(values, slots, *args)
        if args[-1] == "triton":
            kept = torch.ones(len(values), dtype=torch.bool)
            kept[slots.cpu()] = False
            values[int(kept.nonzero()[0])] += 1.0

    monkeypatch.setattr(kernel_ops, "regrow", spills)
    rows, _ = correctness.adamw_checks(CPU, torch.device("cpu"), 0, Never())
    regrows = [row for row in rows if row["check"] == "regrow"]
    assert regrows and all(row["status"] == "fail" and row["note"] == f"step {CPU.regrow_every}: regrow changed "
                           "param outside the regrown slots" for row in regrows), regrows  # fmt: skip


def test_an_adamw_mismatch_in_the_second_moment_or_beyond_the_relative_tolerance_fails():
    state = {"param": torch.ones(2, 2, 2), "exp_avg": torch.zeros(2, 2, 2), "exp_avg_sq": torch.zeros(2, 2, 2),
             "block_step": torch.ones(2, dtype=torch.int32)}  # fmt: skip
    reference = {name: tensor.clone() for name, tensor in state.items()}
    state["exp_avg_sq"][1, 0, 0] = 1e-3
    assert correctness._adamw_mismatch(state, reference, torch.float32).startswith("exp_avg_sq differs by 0.001")
    state["exp_avg_sq"][1, 0, 0] = 0.0
    state["param"][0, 1, 1] = 1.5  # reference 1.0: 0.5 off, far beyond 1e-6 + 1e-6 × 1.0
    assert correctness._adamw_mismatch(state, reference, torch.float32).startswith("param differs by 0.5")
    for dtype, off in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):  # 10 x, 5 x the unit tests' tolerance
        state["param"][0, 1, 1] = 1.0 + off
        assert correctness._adamw_mismatch(state, reference, dtype).startswith("param differs by")


def test_a_training_step_whose_triton_gradients_alone_differ_fails_even_within_the_bf16_parameter_tolerance(
        monkeypatch, device):  # fmt: skip
    """Same loss, gradients negated in the Triton model. One AdamW step moves each parameter by about ``lr``, ~1 % of
    a weight, within the bf16 parameter tolerance (2 %) of the GPU run: the gradients themselves must be compared."""
    import bench.training

    build = bench.training.build

    def build_negating_triton_grads(case, device, backend, seed):
        model, optimizer = build(case, device, backend, seed)
        if backend == "triton":
            for parameter in model.parameters():
                parameter.register_hook(lambda grad: -grad)
        return model, optimizer

    monkeypatch.setattr(bench.training, "build", build_negating_triton_grads)
    monkeypatch.setattr(correctness, "STEP_TOLERANCE", dict.fromkeys(correctness.STEP_TOLERANCE, 2e-2))
    row = correctness.training_step_check(CPU, torch.device(device), 0)
    assert row["status"] == "fail" and "gradients by 2 (relative" in row["note"], row


def test_the_matmul_operands_are_fresh_random_values_never_constant():
    """Constant inputs (ones, zeros) make every row of an output alike: a kernel that reads the wrong tile passes."""
    operands = correctness._MatmulOperands(CPU, 16, torch.float32, torch.device("cpu"), 0)
    for tensor in (operands.x, operands.dy, operands.values):
        assert tensor.std() > 0 and len(tensor.unique()) > tensor.numel() // 2
    other = correctness._MatmulOperands(CPU, 16, torch.float32, torch.device("cpu"), 1)
    assert not torch.equal(operands.x, other.x)  # drawn from the seed


def test_a_training_step_whose_triton_step_scales_a_weight_fails_and_names_it(monkeypatch, device):
    """A finite wrong parameter (not only a NaN one) fails the check."""
    after_each_triton_step(monkeypatch, lambda model: model.get_submodule("layers.0.mlp.down_proj").values.mul_(1.5))
    row = correctness.training_step_check(CPU, torch.device(device), 0)
    assert row["status"] == "fail" and "(relative; most: layers.0.mlp.down_proj.values)" in row["note"], row
    assert 0.4 < row["error"] < 0.6, row  # 1.5 x the weight: 0.5 off
