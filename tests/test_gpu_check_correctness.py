"""smet-bench gpu-check, stage correctness: poisoned outputs, races, where a wrong result is wrong, every kernel
variant, the AdamW and training-step checks, and the worker pool that runs the matmul checks and warms the timings."""

import dataclasses
import os

import pytest
import torch

from bench.gpu_check import correctness, kernel_ops
from bench.gpu_check.plan import CPU, PINNED_CONFIGS


class CountdownBudget:
    """Expires after ``calls`` questions: a budget that runs out in the middle of a stage."""

    def __init__(self, calls: int):
        self.calls = calls

    def expired(self) -> bool:
        self.calls -= 1
        return self.calls < 0


def test_a_budget_spent_inside_the_matmul_checks_names_the_checks_not_run(device):
    rows, not_run = correctness.matmul_checks(CPU, torch.device(device), 0, CountdownBudget(0))
    every = [correctness.not_run_label(row) for group in correctness.matmul_groups(CPU)
             for row, _ in correctness.group_checks(CPU, torch.device(device), *group)]  # fmt: skip
    assert rows == [] and not_run == every  # each check named: none left uncounted (a break after the first)


def test_a_spent_budget_starts_no_adamw_check_and_names_each_as_not_run():
    rows, not_run = correctness.adamw_checks(CPU, torch.device("cpu"), 0, CountdownBudget(0))
    assert rows == [] and len(not_run) == 2 * 2 * len(kernel_ops.warmup_modes())  # adamw and regrow, bf16 and fp32
    assert all(line.startswith(("adamw ", "regrow ")) for line in not_run)


def test_a_worker_group_that_raised_died_or_timed_out_is_failed_or_not_run_never_dropped(monkeypatch):
    """The matmul groups come back from worker processes: a group that raised or died must be failed rows, and so
    must one still running at 3 × the stage's estimate ("timed out": a hanging kernel, not a budget shortfall); one
    still running when the budget ran out first is not-run checks (dropped, the summary would read every check
    passed), and the checks a returned group did not reach stay named. The workers' deadline is the budget or 3 × the
    stage's estimate, whichever is sooner; a training step that raises is a failed row, and a spent budget starts no
    training step."""
    from bench.gpu_check import parallel
    from bench.runner import Deadline

    sizes = dataclasses.replace(CPU, check_block_sizes=(16, 32), check_dtypes=("fp32", "fp16"))
    outcomes = {(16, "fp32"): ("raised", "ValueError: x"), (16, "fp16"): ("timeout", "still running"),
                (32, "fp32"): ("died", "died"),
                (32, "fp16"): ("ok", ([{"check": "matmul", "status": "pass"}], ["cut"]))}
    deadlines = []

    class FakePool:
        def __init__(self, workers, device, deadline):
            deadlines.append(deadline)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def submit(self, fn, sizes, device_name, seed, block_size, dtype_name, budget):
            return block_size, dtype_name

        def result(self, group):
            return outcomes[group]

    monkeypatch.setattr(parallel, "Pool", FakePool)
    monkeypatch.setattr(parallel, "run_alone", lambda tasks, device, deadline: [("died", "died alone")] * len(tasks))
    monkeypatch.setattr(correctness, "adamw_checks", lambda *args: ([], []))

    def raising_step(*args):
        raise RuntimeError("step fault")

    monkeypatch.setattr(correctness, "training_step_check", raising_step)
    cpu = torch.device("cpu")
    rows, not_run = correctness.run(sizes, cpu, 0, Deadline(100), workers=1)
    checks = {group: [row for row, _ in correctness.group_checks(sizes, cpu, *group)] for group in outcomes}
    failed = [row for row in rows if row["status"] == "fail"]
    assert len(failed) == len(checks[16, "fp32"]) + len(checks[16, "fp16"]) + len(checks[32, "fp32"]) + 1
    timed_out = (f"timed out after {3 * sizes.estimates_s['correctness'] + parallel.GRACE_S:.0f} s: still running at "
                 f"3 × the stage's estimate + {parallel.GRACE_S:.0f} s (a hanging kernel or compile?)")  # fmt: skip
    assert {row["note"] for row in failed} == {"not returned: ValueError: x", "not returned: died alone", timed_out,
                                               "raised RuntimeError: step fault"}  # fmt: skip
    assert not_run == ["cut"]
    assert [row["check"] for row in rows].count("training step") == 1
    assert deadlines[0].left_s() <= 3 * sizes.estimates_s["correctness"]

    short = Deadline(sizes.estimates_s["correctness"] / 60)  # the budget ends before 3 × the estimate
    rows, not_run = correctness.run(sizes, cpu, 0, short, workers=1)
    assert not any(row.get("note", "").startswith("timed out") for row in rows)
    assert not_run == [correctness.not_run_label(row) for row in checks[16, "fp16"]] + ["cut"]

    class Spent:
        def expired(self):
            return True

        def left_s(self):
            return 0.0

    rows, not_run = correctness.run(sizes, cpu, 0, Spent(), workers=1)
    assert "training step" not in [row["check"] for row in rows]
    assert not_run[-1] == "training step vs reference backend"


def test_the_matmul_groups_run_in_worker_processes_beside_the_other_checks(device):
    from bench.runner import Deadline

    # b = 32: on a GPU the workers compile only its pinned configs (a block size without them autotunes every config
    # in one worker, past the stage's deadline); the default workers: one on a CPU, a compiling pool on a GPU
    block_size = min(PINNED_CONFIGS)
    sizes = dataclasses.replace(CPU, check_block_sizes=(block_size,), check_dtypes=("fp32",), adamw_steps=3,
                                regrow_every=3)
    rows, not_run = correctness.run(sizes, torch.device(device), 0, Deadline(10))
    assert not_run == []
    assert [r["check"] for r in rows][:2] == ["poison", "matmul"]
    assert {r["check"] for r in rows} == {"poison", "matmul", "adamw", "regrow", "training step"}
    matmul = [r for r in rows if r["check"] == "matmul"]
    assert len(matmul) == len(correctness.group_checks(sizes, torch.device(device), block_size, "fp32"))
    assert all(r["status"] == "pass" for r in rows), [r for r in rows if r["status"] != "pass"]
    assert {r["dtype"] for r in rows if "dtype" in r} <= {"fp32", "fp16", "bf16"}  # one spelling in the table


def test_a_worker_that_raises_dies_or_overruns_becomes_a_reported_result():
    import time

    from bench.gpu_check import parallel
    from bench.runner import Deadline

    with parallel.Pool(1, torch.device("cpu"), Deadline(1)) as pool:
        assert pool.result(pool.submit(int, "x"))[0] == "raised"
        status, message = pool.result(pool.submit(os._exit, 3))
    assert status == "died" and "died" in message
    with parallel.Pool(1, torch.device("cpu"), Deadline(0), grace_s=0.5) as pool:
        started = time.monotonic()
        assert pool.result(pool.submit(time.sleep, 600))[0] == "timeout"
    assert time.monotonic() - started < 60  # the sleeping worker was stopped, not awaited


def test_a_task_that_kills_its_worker_fails_alone_when_run_alone():
    from bench.gpu_check import parallel
    from bench.runner import Deadline

    results = parallel.run_alone([(os._exit, 3), (int, "7")], torch.device("cpu"), Deadline(1))
    assert [status for status, _ in results] == ["died", "ok"] and results[1][1] == 7


def test_the_waits_of_a_pool_end_at_one_absolute_time(monkeypatch):
    """After the deadline every wait gets what is left of one grace period, not a fresh one each."""
    import concurrent.futures

    from bench.gpu_check import parallel

    clock = [100.0]
    monkeypatch.setattr(parallel.time, "monotonic", lambda: clock[0])

    class Spent:
        def left_s(self):
            return 0.0

    class Stuck:
        def __init__(self):
            self.timeouts = []

        def result(self, timeout):
            self.timeouts.append(timeout)
            raise concurrent.futures.TimeoutError

    pool = parallel.Pool(1, torch.device("cpu"), Spent(), grace_s=5.0)
    stuck = Stuck()
    clock[0] = 103.0
    assert pool.result(stuck)[0] == "timeout"
    clock[0] = 110.0
    assert pool.result(stuck)[0] == "timeout"
    assert stuck.timeouts == [2.0, 0.0]
    pool.close()


def test_the_warm_up_configs_cover_every_timing_config_the_pruner_keeps_once_per_kernel(monkeypatch):
    from bench.gpu_check import parallel
    from bench.gpu_check.plan import TIMING_CONFIGS
    from smet_kernels.ops import launch_config

    for name, _, tuner in kernel_ops.autotuners():  # the GPU autotune space, as on an H200
        block_ms = launch_config.GRAD_WEIGHT_BLOCK_MS if "grad_weight" in name else launch_config.DENSE_SPARSE_BLOCK_MS
        monkeypatch.setattr(tuner, "configs", launch_config.matmul_configs(block_ms, interpret=False))
    choices = parallel.config_choices(128, torch.empty(0, dtype=torch.bfloat16))
    for name, family, tuner in kernel_ops.autotuners():
        assert all(len(choice[name]) == 1 for choice in choices)
        candidates = [c for c in tuner.configs if kernel_ops.config_key(c) in TIMING_CONFIGS[family]]
        kept = tuner.early_config_prune(candidates, {"x": torch.empty(0, dtype=torch.bfloat16)}, BLOCK_SIZE=128)
        assert set().union(*(choice[name] for choice in choices)) == {kernel_ops.config_key(c) for c in kept}
    # 4 stages of a 128-token tile at b = 128 in bf16 need 256 KiB of shared memory: pruned, never warmed
    assert (128, 8, 4) not in set().union(*(choice["bsmm_dense_sparse_kernel"] for choice in choices))


def test_warming_the_kernel_timings_launches_each_op_of_a_provider_once_per_config_choice(device):
    from bench.gpu_check import parallel
    from bench.runner import Deadline

    block_size = CPU.kernel_block_sizes[0]
    launches = parallel.warm_kernel_timings(CPU, device, 0, block_size, "triton_tma", Deadline(10))
    choices = parallel.config_choices(block_size, torch.empty(0, dtype=torch.float32, device=device))
    assert (len(choices) == 1) if device == "cpu" else (len(choices) > 1)  # interpreter: one config; GPU: timing ones
    assert launches == 3 * len(choices)  # forward, grad_input, grad_weight


def test_the_warm_up_compiles_every_weight_grad_split_of_the_timed_shapes_on_an_h200(monkeypatch):
    """``SPLIT_K`` is a constexpr: each split value the timed shapes reach is a binary of its own, which the workers
    compile for both weight-grad kernels (the headline's value by the provider's full warm-up)."""
    from types import SimpleNamespace

    from bench.gpu_check import parallel
    from bench.gpu_check.measure import TRAINING_DENSITY, kernel_cases
    from bench.gpu_check.plan import GPU
    from smet_kernels.layout import BlockLayout
    from smet_kernels.ops import launch_config
    from smet_kernels.train.model import model_config

    monkeypatch.setattr(launch_config, "sm_count", lambda index: 132)
    monkeypatch.setattr(launch_config, "_device_index", lambda device: 0)
    cuda = torch.device("cuda")
    tasks = parallel.warm_tasks(GPU, cuda)
    assert len(tasks) == len(set(tasks))
    for b in GPU.kernel_block_sizes:
        headline, bars, variants = kernel_cases(GPU, b)
        splits = {}

        def split(case) -> int:
            nnz = BlockLayout.random(case.shape.N, case.shape.K, b, case.density).nnz
            return launch_config.default_split_k(case.M, nnz, cuda)

        for case in headline + bars + variants:
            if case.op == "grad_weight" and case.provider in parallel.WEIGHT_GRAD_VARIANTS:
                splits.setdefault(case.provider, set()).add(split(case))
        if b == GPU.training_block_size:  # every layer of the SMET training steps (the default variant's kernel)
            for config in (*GPU.training_configs, GPU.compile_config):
                dims = model_config(config, block_size=b)
                for n, k in ((dims.hidden_size, dims.hidden_size), (dims.intermediate_size, dims.hidden_size),
                             (dims.hidden_size, dims.intermediate_size)):  # fmt: skip
                    layer = SimpleNamespace(shape=SimpleNamespace(N=n, K=k), density=TRAINING_DENSITY,
                                            M=GPU.training_batch * GPU.training_seq)  # fmt: skip
                    splits["triton_grouped"].add(split(layer))
        first = split(next(c for c in headline if c.op == "grad_weight" and c.provider == "triton_grouped"))
        assert set(splits) == set(parallel.WEIGHT_GRAD_VARIANTS) and len(set().union(*splits.values())) > 1
        for provider, values in splits.items():
            assert (b, provider, None) in tasks
            assert values - {first} <= {s for size, name, s in tasks if (size, name) == (b, provider) and s}


def test_a_split_warm_up_task_launches_only_the_weight_grad_at_its_split(device, monkeypatch):
    from bench.gpu_check import parallel
    from bench.runner import Deadline
    from smet_kernels.ops import block_sparse_matmul as bsmm

    splits, launch = [], bsmm.triton_bsmm_grad_weight
    monkeypatch.setattr(bsmm, "triton_bsmm_grad_weight", lambda *a, **k: splits.append(k["split_k"]) or launch(*a, **k))
    block_size = CPU.kernel_block_sizes[0]
    launches = parallel.warm_kernel_timings(CPU, device, 0, block_size, "triton_grouped", Deadline(10), split_k=3)
    choices = parallel.config_choices(block_size, torch.empty(0, dtype=torch.float32, device=device))
    assert launches == len(choices) and splits == [3] * len(choices)


def test_poisoned_outputs_are_nan_and_the_mode_is_restored(device):
    before = torch.are_deterministic_algorithms_enabled()
    assert correctness.poison_check(torch.device(device))["status"] == "pass"
    assert torch.are_deterministic_algorithms_enabled() == before


def test_an_output_left_half_unwritten_fails():
    def half_written():
        out = torch.empty(8)
        out[:4] = 1.0
        return out

    row = correctness.check_call(half_written, torch.ones(8), bound=1e-3)
    assert row["status"] == "fail" and "4 elements NaN/unwritten" in row["note"]


def test_a_wrong_matmul_result_says_which_token_rows_block_columns_and_blocks_are_off():
    from smet_kernels.layout import BlockLayout

    mask = torch.zeros(2, 3, dtype=torch.bool)
    mask[0, 0] = mask[0, 2] = mask[1, 1] = True
    layout = BlockLayout.from_mask(mask, 16)  # W [32, 48]; slots (0, 0), (0, 2), (1, 1)
    generator = torch.Generator().manual_seed(0)
    expected = torch.randn(40, 32, generator=generator)
    wrong = expected.clone()
    wrong[32:, 16:] += 1.0  # the ragged last token tile of block column 1
    wrong[35, 20] = float("nan")
    row = correctness.check_call(lambda: wrong.clone(), expected, 1e-3,
                                 lambda result: correctness.where_wrong(result, expected, 1e-3, layout))  # fmt: skip
    assert row["status"] == "fail"
    assert "128 elements off: token rows 32–39 (8 of 40), block columns [1]; worst at [35, 20] (block column 1): " \
           "got nan" in row["note"], row["note"]
    grad = torch.randn(3, 16, 16, generator=generator)
    wrong_grad = grad.clone()
    wrong_grad[1, 2, 3] = 100.0
    note = correctness.where_wrong(wrong_grad, grad, 1e-3, layout)
    assert note.startswith("1 elements off: 1 of 3 blocks, e.g. [(0, 2)]; worst at block (0, 2) element [2, 3]: "
                           "got 100"), note  # fmt: skip
    assert correctness.where_wrong(grad, grad, 1e-3, layout).startswith("no element off")


def after_each_triton_step(monkeypatch, edit) -> None:
    """``bench.training.build`` whose Triton-backend optimizer calls ``edit(model)`` (no grad) after each step."""
    import bench.training

    build = bench.training.build

    def build_with_an_edited_step(case, device, backend, seed):
        model, optimizer = build(case, device, backend, seed)
        if backend == "triton":
            step = optimizer.step

            def edited_step(*args, **kwargs):
                step(*args, **kwargs)
                with torch.no_grad():
                    edit(model)

            optimizer.step = edited_step
        return model, optimizer

    monkeypatch.setattr(bench.training, "build", build_with_an_edited_step)


def test_a_parameter_made_nan_by_the_triton_step_fails_the_training_step_check_and_is_named(monkeypatch, device):
    """The loss comes before the step, so only the parameters can show a NaN update: it must not pass."""
    def make_a_value_nan(model):
        model.get_submodule("layers.0.mlp.down_proj").values.view(-1)[0] = float("nan")

    after_each_triton_step(monkeypatch, make_a_value_nan)
    row = correctness.training_step_check(CPU, torch.device(device), 0)
    assert row["status"] == "fail" and "most: layers.0.mlp.down_proj.values" in row["note"], row


def test_an_adamw_mismatch_names_the_slots_and_their_local_step():
    state = {"param": torch.zeros(4, 2, 2), "exp_avg": torch.zeros(4, 2, 2), "exp_avg_sq": torch.zeros(4, 2, 2),
             "block_step": torch.tensor([3, 3, 1, 3], dtype=torch.int32)}  # fmt: skip
    reference = {name: tensor.clone() for name, tensor in state.items()}
    reference["block_step"][2] = 2
    assert correctness._adamw_mismatch(state, reference, torch.float32) == (
        "block_step differs at 1 of 4 slots, e.g. slot 2: 1, reference 2 (a race on the read-then-bump?)")
    reference["block_step"][2] = 1
    state["param"][1, 0, 1] = 0.5
    assert correctness._adamw_mismatch(state, reference, torch.float32) == (
        "param differs by 0.5 (tolerance 1e-06 abs + rel) at 1 of 4 slots, e.g. slot 1 (block_step 3)")
    state["param"][1, 0, 1] = 0.0
    state["exp_avg"][3, 1, 1] = float("nan")
    assert correctness._adamw_mismatch(state, reference, torch.float32) == (
        "exp_avg differs by nan (tolerance 1e-05 abs + rel) at 1 of 4 slots, e.g. slot 3 (block_step 3)")
    assert correctness._adamw_mismatch(reference, reference, torch.float32) == ""


def test_an_adamw_check_failed_by_a_nan_parameter_reports_a_nan_error(monkeypatch):
    """``max(worst, NaN)`` is ``worst``: the failing row said error 0 within its bound."""
    adamw_step = kernel_ops.adamw_step

    def nan_at_step_two(param, *args, backend, **kwargs):
        adamw_step(param, *args, backend="reference", **kwargs)
        if backend == "triton" and int(args[3].max()) == 2:  # block_step after the second step
            param.view(-1)[0] = float("nan")

    monkeypatch.setattr(kernel_ops, "adamw_step", nan_at_step_two)
    rows, _ = correctness.adamw_checks(CPU, torch.device("cpu"), 0, CountdownBudget(100))
    adamw = [row for row in rows if row["check"] == "adamw"]
    assert adamw and all(row["status"] == "fail" and row["note"].startswith("step 2: param differs by nan")
                         and row["error"] != row["error"] for row in adamw), adamw  # fmt: skip


def test_a_result_that_moves_by_one_ulp_between_identical_runs_is_a_race():
    """Two identical runs must agree bitwise: a tolerance (allclose) would pass a race that moves one element by an
    ulp."""
    calls = []

    def fn():
        calls.append(1)
        out = torch.ones(64)
        if len(calls) == 3:  # the second checked call
            out[5] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))
        return out

    row = correctness.check_call(fn, torch.ones(64), bound=1e-2)
    assert row["status"] == "fail" and "moved between identical runs" in row["note"] and not row["repeatable"]


def test_a_poisoning_that_leaves_an_element_not_nan_fails_the_poison_check(monkeypatch):
    """An element the poisoning missed could hide an unwritten output: the check must fail, not pass on any NaN."""
    probe = torch.full((1024,), float("nan"))
    probe[7] = 0.0
    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: probe.clone())
    row = correctness.poison_check(torch.device("cpu"))
    assert row["status"] == "fail" and "not NaN-filled" in row["note"]


def test_a_regrow_that_differs_from_the_reference_fails_the_regrow_check(monkeypatch):
    regrow = kernel_ops.regrow

    def off_by_one(values, slots, *args):
        regrow(values, slots, *args)
        if args[-1] == "triton":
            values[slots] += 1.0

    monkeypatch.setattr(kernel_ops, "regrow", off_by_one)
    rows, _ = correctness.adamw_checks(CPU, torch.device("cpu"), 0, CountdownBudget(100))
    regrows = [row for row in rows if row["check"] == "regrow"]
    assert regrows and all(row["status"] == "fail" and row["note"] == f"step {CPU.regrow_every}: regrown param "
                           "differs from the reference" for row in regrows), regrows  # fmt: skip


def test_a_training_step_whose_loss_alone_differs_by_twice_its_tolerance_fails(monkeypatch, device):
    """The loss is the step's forward check: Adam's first update is nearly the sign of the gradient, so a wrong
    forward can leave the parameters within tolerance. A loss 2 × the dtype's tolerance off (same gradients) must
    fail: 2e-5 in fp32 on a CPU, 4 % in bf16 on a GPU."""
    import smet_kernels.train.model as model

    lm_loss, calls = model.lm_loss, []
    shift = 4e-2 if torch.device(device).type == "cuda" else 2e-5  # the bf16 check on a GPU, fp32 on a CPU

    def shifted_for_triton(*args):
        loss = lm_loss(*args)
        calls.append(1)
        return loss + shift * loss.detach() if len(calls) == 1 else loss  # the triton backend runs first

    monkeypatch.setattr(model, "lm_loss", shifted_for_triton)
    row = correctness.training_step_check(CPU, torch.device(device), 0)
    assert row["status"] == "fail" and row["note"].startswith("loss differs by "), row
    assert 1.5 * row["bound"] < row["error"] < 2.5 * row["bound"], row


def test_a_result_that_moves_between_identical_runs_is_a_race():
    generator = torch.Generator().manual_seed(0)
    expected = torch.ones(64)
    row = correctness.check_call(lambda: expected + 1e-4 * torch.rand(64, generator=generator), expected, bound=1e-2)
    assert row["status"] == "fail" and "moved between identical runs" in row["note"] and not row["repeatable"]


def test_every_kernel_variant_and_op_passes_on_a_small_layout(device):
    sizes = dataclasses.replace(CPU, check_block_sizes=(32,), check_dtypes=("fp16",), check_grid=(3, 17))
    rows, not_run = correctness.matmul_checks(sizes, torch.device(device), 0, CountdownBudget(10**6))
    assert not_run == []
    failed = [row for row in rows if row["status"] != "pass"]
    assert not failed, failed
    checked = {(row["variant"], row["op"]) for row in rows}
    ops = {"forward", "grad_input", "grad_weight split_k=1", f"grad_weight split_k={sizes.split_k}"}
    assert {op for variant, op in checked if variant == "grouped"} == ops
    assert {op for variant, op in checked if variant == "persistent"} == {"forward", "grad_input"}
    assert all(0 < row["error"] <= row["bound"] for row in rows)


def test_the_check_layout_has_a_long_row_an_empty_row_and_an_empty_column():
    layout = correctness.check_layout((3, 17), 16, torch.Generator().manual_seed(0))
    mask = layout.mask
    assert int(mask[0].sum()) >= 16 and not mask[1].any() and not mask[:, 1].any()


def test_the_warm_up_call_runs_unpoisoned_and_the_two_checked_calls_poisoned():
    """Compile and autotune outside the NaN-filling mode, then two calls inside it."""
    poisoned = []

    def fn():
        poisoned.append(torch.are_deterministic_algorithms_enabled())
        return torch.ones(4)

    assert correctness.check_call(fn, torch.ones(4), bound=1e-6)["status"] == "pass"
    assert poisoned == [False, True, True]


def test_the_matmul_bound_is_twice_pytorchs_own_error_with_a_floor_of_1e_6():
    """Of each op: a grad bound from float64 matmuls would be the floor, failing every correct bf16 grad on the
    GPU; one from a lower precision would pass wrong grads."""
    from smet_kernels.functional import from_dense, to_dense

    fp16 = correctness._MatmulOperands(CPU, 16, torch.float16, torch.device("cpu"), 0)
    weight = to_dense(fp16.values, fp16.layout)
    exact = fp16.x.double() @ weight.double().t()
    torch_error = float((torch.nn.functional.linear(fp16.x, weight).double() - exact).norm() / exact.norm())
    assert torch_error > 1e-5  # fp16: well above the floor
    assert fp16.bound["forward"] == pytest.approx(2 * torch_error)
    grad_input = (fp16.dy @ weight).double()
    grad_weight = fp16.dy.t() @ fp16.x
    grad_weight_error = correctness.relative_error(from_dense(grad_weight, fp16.layout), fp16.expected["grad_weight"])
    assert fp16.bound["grad_input"] == pytest.approx(2 * correctness.relative_error(grad_input,
                                                                                    fp16.expected["grad_input"]))
    assert fp16.bound["grad_weight"] == pytest.approx(2 * grad_weight_error) and grad_weight_error > 1e-5
    fp32 = correctness._MatmulOperands(CPU, 16, torch.float32, torch.device("cpu"), 0)
    assert fp32.bound == dict.fromkeys(("forward", "grad_input", "grad_weight"), 1e-6)  # fp32 errors are below it


def test_each_variant_s_matmul_ops_launch_that_variant_at_the_layout_s_sizes_and_the_given_split(monkeypatch):
    """A launcher that dropped ``variant`` would check the grouped kernel under every variant's name (the TMA and
    persistent kernels never checked on the GPU run); one that dropped ``split_k`` would check split-K off twice."""
    from smet_kernels.layout import BlockLayout
    from smet_kernels.ops import block_sparse_matmul as bsmm
    from smet_kernels.ops.variant import VARIANTS

    calls = []
    for name in ("triton_bsmm_forward", "triton_bsmm_grad_input", "triton_bsmm_grad_weight"):
        monkeypatch.setattr(bsmm, name, lambda *args, name=name, **kwargs: calls.append((name, args[3:], kwargs)))
    layout = BlockLayout.random(32, 64, 16, 0.5, generator=torch.Generator().manual_seed(0))
    x, dy, expected = torch.zeros(5, 64), torch.zeros(5, 32), []
    for variant in VARIANTS:
        ops = kernel_ops.matmul_ops(variant)
        ops["forward"](x, None, layout)
        ops["grad_input"](dy, None, layout)
        ops["grad_weight"](dy, x, layout, 3)
        expected += [("triton_bsmm_forward", (32,), {"variant": variant}),
                     ("triton_bsmm_grad_input", (64,), {"variant": variant}),
                     ("triton_bsmm_grad_weight", (16,), {"split_k": 3, "variant": variant})]  # fmt: skip
    assert calls == expected


def test_the_adamw_check_runs_the_fused_kernel_for_triton_and_the_reference_for_reference(monkeypatch, device):
    """Swapped, the check would compare the reference with itself and never run the fused kernel."""
    from smet_kernels.reference import adamw as reference

    ran, torch_adamw_step = [], reference.torch_adamw_step
    monkeypatch.setattr(reference, "torch_adamw_step", lambda *args, **kwargs: ran.append("reference")
                        or torch_adamw_step(*args, **kwargs))  # fmt: skip
    hyper = dict(betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, warmup="none", warmup_steps=1)
    param, grad = torch.zeros(2, 16, 16, device=device), torch.ones(2, 16, 16, device=device)
    state = [torch.zeros_like(param), torch.zeros_like(param), torch.zeros(2, dtype=torch.int32, device=device)]
    kernel_ops.adamw_step(param, grad, *state, lr=0.1, backend="triton", **hyper)
    assert ran == [] and torch.allclose(param, torch.full_like(param, -0.1))
    kernel_ops.adamw_step(param, grad, *state, lr=0.1, backend="reference", **hyper)
    assert ran == ["reference"]


def test_the_regrow_check_draws_normal_blocks_with_the_fused_kernel_and_resets_their_state(monkeypatch, device):
    """Zero blocks (``init="zeros"``) or the reference in place of the kernel would pass the check, unseen."""
    from smet_kernels.ops import library

    reference_runs = []
    monkeypatch.setattr(library, "torch_regrow_blocks", lambda *args: reference_runs.append(args))
    values = torch.zeros(4, 32, 32, device=device)
    exp_avg, exp_avg_sq = torch.ones_like(values), torch.ones_like(values)
    block_step = torch.full((4,), 5, dtype=torch.int32, device=device)
    kernel_ops.regrow(values, torch.tensor([0, 2], device=device), exp_avg, exp_avg_sq, block_step,
                      torch.Generator().manual_seed(0), "triton")  # fmt: skip
    assert 0.018 < values[[0, 2]].std().item() < 0.022 and not values[[1, 3]].any()
    assert not exp_avg[[0, 2]].any() and not exp_avg_sq[[0, 2]].any() and block_step.tolist() == [0, 5, 0, 5]
    assert reference_runs == []
