"""smet-bench gpu-check: option checks, the plan, the budget's "not run" rows, the correctness machinery (poisoned
outputs, races, every kernel variant) and a CPU run whose CSVs `smet-bench report` renders."""

import csv
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from bench.cli import main
from bench.gpu_check import correctness, kernel_ops
from bench.gpu_check.plan import CPU, PINNED_CONFIGS, STAGES
from bench.results import KERNEL_COLUMNS, TRAINING_COLUMNS

ROOT = Path(__file__).resolve().parents[1]


class CountdownBudget:
    """Expires after ``calls`` questions: a budget that runs out in the middle of a stage."""

    def __init__(self, calls: int):
        self.calls = calls

    def expired(self) -> bool:
        self.calls -= 1
        return self.calls < 0


def test_plan_prints_every_stage_with_an_estimate_and_writes_nothing(tmp_path, capsys):
    out_dir = tmp_path / "check"
    assert main(["gpu-check", "--out-dir", str(out_dir), "--plan", "--stages", "env,kernels"]) == 0
    printed = capsys.readouterr().out
    for stage in STAGES:
        assert stage in printed
    assert "~" in printed and "not selected" in printed
    assert not out_dir.exists()


@pytest.mark.parametrize(
    "option, value, message",
    [("--stages", "env,warp", "--stages must be"), ("--minutes", "0", "--minutes must be positive")],
)
def test_bad_options_fail_with_one_line_before_anything_runs(tmp_path, option, value, message):
    with pytest.raises(SystemExit) as raised:
        main(["gpu-check", "--out-dir", str(tmp_path / "check"), option, value])
    assert str(raised.value).startswith(f"smet-bench: error: {message}") and "\n" not in str(raised.value)
    assert not (tmp_path / "check").exists()


def test_an_out_dir_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("")
    with pytest.raises(SystemExit, match="smet-bench: error: --out-dir .* exists and is not a folder"):
        main(["gpu-check", "--out-dir", str(target)])


def test_a_spent_budget_lists_every_stage_as_not_run(tmp_path):
    assert main(["gpu-check", "--out-dir", str(tmp_path), "--device", "cpu", "--minutes", "1e-9"]) == 0
    summary = (tmp_path / "gpu_check.md").read_text()
    for stage in STAGES:
        assert f"| {stage} " in summary
    assert summary.count("not run (budget)") == len(STAGES)


def test_the_summary_is_written_after_every_stage_so_a_stopped_run_leaves_one(tmp_path, monkeypatch):
    from bench.gpu_check import measure

    def stopped(ctx):
        summary = (tmp_path / "gpu_check.md").read_text()  # written after env, before this stage
        assert "| env " in summary and "not reached when this summary was written" in summary
        raise KeyboardInterrupt  # the command's time limit

    monkeypatch.setattr(measure, "run_adamw", stopped)
    with pytest.raises(KeyboardInterrupt):
        main(["gpu-check", "--out-dir", str(tmp_path), "--device", "cpu", "--stages", "env,adamw", "--no-progress"])
    summary = (tmp_path / "gpu_check.md").read_text()
    assert "Ceilings measured in this run: matmul" in summary and "| adamw " in summary
    assert not list(tmp_path.glob("*.partial"))


def test_inside_a_timed_stage_the_summary_is_rewritten_after_measured_rows(tmp_path, monkeypatch):
    import bench.gpu_check as gpu_check
    from bench.gpu_check import measure

    run_adamw, seen = measure.run_adamw, []

    def stopped_after_its_rows(ctx):
        run_adamw(ctx)
        seen.append((tmp_path / "gpu_check.md").read_text())
        raise KeyboardInterrupt  # the command's time limit, before the stage ends

    monkeypatch.setattr(gpu_check, "SNAPSHOT_EVERY_S", 0.0)
    monkeypatch.setattr(measure, "run_adamw", stopped_after_its_rows)
    with pytest.raises(KeyboardInterrupt):
        main(["gpu-check", "--out-dir", str(tmp_path), "--device", "cpu", "--stages", "env,adamw", "--no-progress"])
    assert "| adamw " in seen[0] and "running when this summary was written" in seen[0]
    assert "smet_adamw" in seen[0], seen[0]  # the stage's rows are in the summary although the stage never ended


def test_a_slow_timed_stage_stops_at_its_share_of_the_budget_so_the_later_stages_still_run(tmp_path, monkeypatch):
    from bench.gpu_check import plan

    estimates = CPU.estimates_s | {"kernels": 1e-9, "adamw": 1e9}  # kernels' share of what is left: about nothing
    monkeypatch.setattr(plan, "CPU", dataclasses.replace(CPU, estimates_s=estimates))
    assert main(["gpu-check", "--out-dir", str(tmp_path), "--device", "cpu", "--stages", "kernels,adamw",
                 "--no-progress"]) == 0  # fmt: skip
    stage_rows = {line.split("|")[1].strip(): line for line in (tmp_path / "gpu_check.md").read_text().splitlines()
                  if line.startswith("| kernels ") or line.startswith("| adamw ")}  # fmt: skip
    assert "stopped at its share of the budget (0 s)" in stage_rows["kernels"]
    assert "forward cublas_dense" in stage_rows["kernels"]  # the first case, named as not run
    assert "| done " in stage_rows["adamw"]
    adamw_rows = [r for r in csv.DictReader(open(tmp_path / "kernels.csv")) if r["suite"] == "optimizer"]
    assert {r["provider"] for r in adamw_rows} == {"device_copy", "torch_adamw_fused", "smet_adamw"}


def test_a_stage_shares_the_time_left_with_the_selected_stages_after_it_by_their_estimates(monkeypatch):
    from bench import runner
    from bench.gpu_check import _share

    clock = [100.0]
    monkeypatch.setattr(runner.time, "monotonic", lambda: clock[0])
    budget = runner.Deadline(1.0)  # ends at 160
    clock[0] = 120.0
    assert budget.share(0.25).end == 130.0 and budget.share(1.0).end == 160.0
    assert runner.Deadline(None).share(0.5).left_s() == float("inf")

    sizes = dataclasses.replace(CPU, estimates_s={"env": 1, "correctness": 2, "kernels": 30, "adamw": 10,
                                                  "training": 50, "compile": 10})  # fmt: skip
    assert _share("kernels", list(STAGES), sizes, 1000.0) == 30 / 100
    assert _share("kernels", ["kernels", "compile"], sizes, 1000.0) == 30 / 40
    assert _share("training", list(STAGES), sizes, 1000.0) == 50 / 60
    assert _share("training", list(STAGES), sizes, 60.0) == 50 / 60  # compile's share: 10 s, its estimate


def test_no_time_is_kept_for_an_atomic_stage_whose_share_would_not_reach_its_estimate():
    from bench.gpu_check import ATOMIC_STAGES, _share

    assert ATOMIC_STAGES == ("compile",)
    sizes = dataclasses.replace(CPU, estimates_s={"env": 1, "correctness": 2, "kernels": 30, "adamw": 10,
                                                  "training": 50, "compile": 10})  # fmt: skip
    # 59 s left: compile's share would be 9.8 s < its 10 s, so it would not start and training would stop at 49 s
    assert _share("training", list(STAGES), sizes, 59.0) == 1.0
    assert _share("kernels", list(STAGES), sizes, 99.0) == 30 / 90
    assert _share("kernels", list(STAGES), sizes, 100.0) == 30 / 100


def test_a_section_that_cannot_render_says_so_and_the_others_still_render(tmp_path, monkeypatch):
    from bench.gpu_check import summary

    def broken(*args):
        raise KeyError("tflops")

    monkeypatch.setattr(summary, "variant_section", broken)
    path = summary.write(tmp_path, CPU, {"device": "cpu-test"}, [{"stage": "env", "status": "done"}], ([], []), None,
                         "smet-bench gpu-check")  # fmt: skip
    text = path.read_text()
    assert "## Kernel variants\n\nCould not render this section: KeyError: 'tflops'" in text
    assert "## Kernel bars" in text and "## Training steps" in text


def test_a_long_indivisible_stage_does_not_start_when_its_estimate_does_not_fit(tmp_path):
    assert main(["gpu-check", "--out-dir", str(tmp_path), "--device", "cpu", "--stages", "compile",
                 "--minutes", str(CPU.estimates_s["compile"] / 2 / 60)]) == 0  # fmt: skip
    summary = (tmp_path / "gpu_check.md").read_text()
    assert "not run (budget: ~" in summary and "SMET step" not in summary


def test_a_budget_spent_inside_the_matmul_checks_names_the_checks_not_run(device):
    rows, not_run = correctness.matmul_checks(CPU, torch.device(device), 0, CountdownBudget(0))
    assert rows == [] and len(not_run) > 0
    assert all(line.startswith("matmul ") for line in not_run)


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


def test_a_parameter_made_nan_by_the_triton_step_fails_the_training_step_check_and_is_named(monkeypatch, device):
    """The loss comes before the step, so only the parameters can show a NaN update: it must not pass."""
    import bench.training

    build = bench.training.build

    def build_with_a_nan_step(case, device, backend, seed):
        model, optimizer = build(case, device, backend, seed)
        if backend == "triton":
            step = optimizer.step

            def nan_step(*args, **kwargs):
                step(*args, **kwargs)
                with torch.no_grad():
                    model.get_submodule("layers.0.mlp.down_proj").values.view(-1)[0] = float("nan")

            optimizer.step = nan_step
        return model, optimizer

    monkeypatch.setattr(bench.training, "build", build_with_a_nan_step)
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


def test_restricting_configs_clears_and_then_restores_the_autotuners():
    tuners = list(kernel_ops.autotuners())
    saved = [(tuner.configs, dict(tuner.cache)) for _, _, tuner in tuners]
    every = {name: {kernel_ops.config_key(c) for c in tuner.configs} for name, _, tuner in tuners}
    with kernel_ops.restrict_configs(every):
        assert all(tuner.cache == {} for _, _, tuner in tuners)
    assert [(tuner.configs, dict(tuner.cache)) for _, _, tuner in tuners] == saved


def _rows(path):
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _kernel_frame(rows: list[dict]) -> pd.DataFrame:
    """Hand-made rows of kernels.csv: every column of it, None where a row gives no value."""
    return pd.DataFrame([dict.fromkeys(KERNEL_COLUMNS) | row for row in rows], columns=KERNEL_COLUMNS)


def test_the_whole_cpu_run_writes_the_summary_and_csvs_that_report_renders(tmp_path):
    """The command of the GPU run, every stage, at CPU sizes: it cannot rot unseen. In a fresh process, which turns
    the Triton interpreter on for ``--device cpu`` (this one compiles the kernels where a GPU is present)."""
    args = ["gpu-check", "--out-dir", str(tmp_path), "--device", "cpu", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs it: the CLI sets it
    result = subprocess.run([sys.executable, "-m", "bench.cli", *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=1200)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (tmp_path / "gpu_check.md").read_text()
    assert summary.index("## Correctness") < summary.index("## Kernel bars") < summary.index("## Compact AdamW")
    assert "checks pass, 0 fail, 0 not run." in summary and "not reached" not in summary
    stages = summary[summary.index("## Stages"):summary.index("## Correctness")]
    for stage in STAGES:
        assert f"| {stage} " in stages
    assert "| compile " in stages and "| ok " in stages.split("| compile ")[1].splitlines()[0]
    assert "fail" not in stages.replace("0 fail", "") and "raised" not in stages
    assert "Ceilings measured in this run: matmul" in summary
    assert "Bar: compact AdamW at" in summary and "SMET tokens/s vs dense" in summary
    assert "## Kernel variants" in summary and "over every op and block size, `" in summary
    predicted = summary[summary.index("## Predicted (bench/KERNEL_NOTES.md) vs measured"):]
    assert "| KERNEL_NOTES " in predicted and "| v2 grouped order " in predicted
    with (tmp_path / "kernels.csv").open(newline="") as handle:
        assert next(csv.reader(handle)) == KERNEL_COLUMNS
    kernels = _rows(tmp_path / "kernels.csv")
    assert {(r["provider"], r["shape"]) for r in kernels} >= {("cublas_dense", "ceiling"),
                                                                 ("device_copy", "dense:ceiling")}  # fmt: skip
    headline = {r["provider"] for r in kernels if r["shape"] == CPU.headline_shape and r["status"] == "ok"}
    assert headline >= {"triton_grouped", "triton_persistent", "triton_tma", "triton_plain_order", "cublas_dense"}
    assert {r["shape"] for r in kernels if r["provider"] == "smet_adamw"} == {f"compact:{CPU.optimizer_config}:hidden"}
    assert {r["provider"] for r in kernels if r["suite"] == "optimizer"} >= {"smet_adamw", "torch_adamw_fused"}
    with (tmp_path / "training.csv").open(newline="") as handle:
        assert next(csv.reader(handle)) == TRAINING_COLUMNS
    training = _rows(tmp_path / "training.csv")
    assert {r["method"] for r in training} == {"dense", "galore", "masked", "smet"}
    assert {r["method"] for r in training if r["activation_checkpointing"] == "True"} == {"dense", "smet"}
    for method in ("dense", "smet"):
        assert f"* activation checkpointing at tiny, {method}: peak " in summary
    assert "gpu-check --out-dir" in (tmp_path / "commands.txt").read_text()
    assert main(["report", "--out-dir", str(tmp_path)]) == 0
    assert "## End-to-end training step" in (tmp_path / "report.md").read_text()


def test_the_variant_table_ranks_the_selectable_variants_by_geometric_mean_time_against_grouped():
    """persistent does not change the weight grad (it runs grouped there: ratio 1); plain_order is the benchmark's
    baseline order, shown per op but not something ``SMET_MATMUL_VARIANT`` can select."""
    from bench.gpu_check.summary import variant_section

    def row(op, provider, density, ms):
        nnz = None if provider == "cublas_dense" else int(density * 4)
        return dict(
            suite="kernels", op=op, provider=provider, shape="s", M=256, K=256, N=256, dtype="bf16", gpu="g",
            block_size=None if nnz is None else 128, density=density, nnz_blocks=nnz, ms_p20=ms, ms_p50=ms,
            ms_p80=ms, status="ok")

    times = {  # (op, density): ms per provider
        ("forward", 0.5): {"triton_grouped": 1.0, "triton_persistent": 0.5, "triton_tma": 2.0,
                           "triton_plain_order": 0.1},
        ("forward", 0.25): {"triton_grouped": 2.0, "triton_persistent": 2.0, "triton_tma": 1.0,
                            "triton_plain_order": 0.2},
        ("grad_input", 0.5): {"triton_grouped": 1.0, "triton_persistent": 0.5, "triton_tma": 2.0},
        ("grad_input", 0.25): {"triton_grouped": 2.0, "triton_persistent": 2.0, "triton_tma": 1.0},
        ("grad_weight", 0.5): {"triton_grouped": 1.0, "triton_tma": 4.0},
        ("grad_weight", 0.25): {"triton_grouped": 1.0, "triton_tma": 1.0},
    }  # fmt: skip
    rows = [row(op, "cublas_dense", 1.0, 4.0) for op in ("forward", "grad_input", "grad_weight")]
    rows += [row(op, p, d, ms) for (op, d), by in times.items() for p, ms in by.items()]
    lines = variant_section(_kernel_frame(rows))
    assert "over every op and block size, `persistent` is the fastest (0.794× grouped)" in "\n".join(lines)
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
             for line in lines[4].splitlines()[2:]}  # fmt: skip
    header = [c.strip() for c in lines[4].splitlines()[0].strip("|").split("|")]
    assert header == ["op", "b", "points", "grouped", "persistent", "plain_order", "tma", "fastest (points)"]
    assert cells["forward"] == ["forward", "128", "2", "1.000", "0.707", "0.100", "1.000", "plain_order 2"]
    assert cells["grad_weight"][:7] == ["grad_weight", "128", "2", "1.000", "", "", "2.000"]
    assert cells["all"][:7] == ["all", "", "6", "1.000", "0.794", "", "1.260"]  # 0.5^(2/6), 4^(1/6)
    assert sorted(cells["all"][7].split(", ")) == ["grouped 2", "persistent 2", "tma 2"]


def test_each_kernel_notes_prediction_is_set_beside_its_measured_geometric_mean_and_judged():
    from bench.gpu_check.predictions import PREDICTIONS, prediction_section

    def row(op, provider, density, ms, shape="s", block_size=128):
        nnz = None if provider == "cublas_dense" else int(density * 4)
        return dict(
            suite="kernels", op=op, provider=provider, shape=shape, M=256, K=256, N=256, dtype="bf16", gpu="g",
            block_size=None if nnz is None else block_size, density=density, nnz_blocks=nnz, ms_p20=ms, ms_p50=ms,
            ms_p80=ms, status="ok")

    rows = [row(op, "cublas_dense", 1.0, 4.0, shape) for op in ("forward", "grad_input") for shape in ("s", "t")]
    # grouped forward at d = 0.5 (exact: 2 of 4 blocks): 2.4 ms and 2.6 ms = 1.2x and 1.3x d×dense, geomean 1.249
    rows += [row("forward", "triton_grouped", 0.5, 2.4), row("forward", "triton_grouped", 0.5, 2.6, "t")]
    rows += [row("forward", "triton_tma", 0.5, 2.4 * 0.5), row("forward", "triton_tma", 0.5, 2.6 * 0.5, "t")]
    rows += [row("forward", "triton_persistent", 0.5, 2.4 * 1.2, "s", block_size=64)]  # another block size
    rows += [row("forward", "triton_plain_order", 0.5, 2.4 * 1.3), row("forward", "triton_plain_order", 0.5, 9.9,
                                                                        "u")]  # no grouped row on u: unpaired
    rows += [dict(suite="optimizer", op="copy", provider="device_copy", shape="dense:ceiling", gbps=4000.0),
             dict(suite="optimizer", op="adamw", provider="smet_adamw", shape="1b:hidden", density=0.25, gbps=3960.0)]
    lines = prediction_section(_kernel_frame(rows), 128)
    assert lines[0] == "## Predicted (bench/KERNEL_NOTES.md) vs measured"
    body = lines[4].splitlines()[2:]
    assert len(body) == len(PREDICTIONS)
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in body]
    by = {(c[1], c[2].split(",")[0], c[3]): c for c in cells}
    assert by[("triton_grouped", "forward", "0.5, 0.25")][5:] == ["1.1–1.3", "1.25", "2", "within"]
    assert by[("triton_tma", "forward", "0.5, 0.25")][5:] == ["0.9–1", "0.5", "2", "better than predicted"]
    assert by[("triton_plain_order", "forward", "0.5, 0.25")][5:] == ["1.2–1.4", "1.3", "1", "within"]
    assert by[("triton_persistent", "forward", "0.5, 0.25")][5:] == ["0.95–1.05", "", "0", "not measured"]
    assert by[("smet_adamw", "adamw", "0.25")][4:] == ["of copy", "0.88–0.98", "0.99", "1", "better than predicted"]
    assert by[("triton_grouped", "forward", "0.1")][-1] == by[("triton_grouped", "grad_weight", "0.5, 0.25")][-1] \
        == "not measured"
    slower = prediction_section(_kernel_frame(rows[:4] + [row("forward", "triton_grouped", 0.5, 4.0)]), 128)
    assert "| worse than predicted |" in slower[4].splitlines()[2]


def test_the_variant_table_says_not_measured_without_a_second_variant():
    from bench.gpu_check.summary import variant_section

    assert "Not measured" in variant_section(None)[2]


def test_the_training_stage_runs_the_bar_rows_first_then_the_checkpointed_rows_of_the_bar_config():
    from bench.gpu_check.measure import training_cases
    from bench.gpu_check.plan import GPU

    order = [(c.config, c.method, c.activation_checkpointing) for c in training_cases(GPU)]
    assert order == [("1b", "dense", False), ("1b", "smet", False), ("1b", "galore", False), ("1b", "smet", True),
                     ("1b", "dense", True), ("1b", "masked", False), ("350m", "dense", False),
                     ("350m", "smet", False), ("350m", "galore", False), ("350m", "masked", False)]  # fmt: skip
    assert sum(GPU.estimates_s.values()) <= 8 * 60  # every stage fits the default budget of --minutes 8


def test_the_headline_cases_hold_every_provider_of_the_headline_shape_and_the_bars_come_before_the_variants():
    from bench.gpu_check.measure import kernel_cases
    from bench.kernels import default_providers

    headline, bars, variants = kernel_cases(CPU, 32)
    assert {case.shape.label for case in headline} == {CPU.headline_shape}
    assert {case.provider for case in headline} == set(default_providers("triton"))
    assert {case.density for case in headline} == {1.0, CPU.kernel_densities[len(CPU.kernel_densities) // 2]}
    assert {case.provider for case in bars} == {"cublas_dense", "triton_grouped", "torch_bsr", "masked_dense"}
    assert {case.provider for case in variants} == {"triton_plain_order", "triton_persistent", "triton_tma"}
    assert bars and variants and not set(headline) & set(bars) and not set(headline + bars) & set(variants)


def test_the_configs_a_kernel_ran_are_the_ones_later_shapes_choose_from(device):
    from smet_kernels.layout import BlockLayout

    layout = BlockLayout.random(64, 64, 32, 0.5, generator=torch.Generator().manual_seed(0)).to(device)
    values = torch.randn(layout.nnz, 32, 32, device=device)
    # the first two configs of each kernel (the interpreter has one): a GPU autotunes between them, not all 18
    allowed = {name: {kernel_ops.config_key(c) for c in tuner.configs[:2]}
               for name, _, tuner in kernel_ops.autotuners()}  # fmt: skip
    with kernel_ops.restrict_configs(allowed):
        kernel_ops.matmul_ops("grouped")["forward"](torch.randn(40, 64, device=device), values, layout)
        chosen = kernel_ops.chosen_configs()
    assert chosen["bsmm_dense_sparse_kernel"] <= allowed["bsmm_dense_sparse_kernel"]
    assert len(chosen["bsmm_dense_sparse_kernel"]) == 1


def test_a_later_block_starts_from_the_picks_an_earlier_block_saved():
    name, allowed = "bsmm_dense_sparse_kernel", {name: {kernel_ops.config_key(c) for c in tuner.configs[:2]}
                                                 for name, _, tuner in kernel_ops.autotuners()}  # fmt: skip
    tuner = dict((n, t) for n, _, t in kernel_ops.autotuners())[name]
    before = dict(tuner.cache)
    with kernel_ops.restrict_configs(allowed):
        tuner.cache[("shape",)] = pick = tuner.configs[0]  # what a GPU's autotuning leaves
        caches = kernel_ops.tuning_caches()
    assert tuner.cache == before
    foreign = caches[name] | {("other",): object()}  # a config not among the allowed ones is not carried
    with kernel_ops.restrict_configs(allowed, {name: foreign}):
        assert tuner.cache == {("shape",): pick}
    with kernel_ops.restrict_configs(allowed):
        assert tuner.cache == {}


def test_the_variants_of_a_block_size_reuse_the_picks_its_bars_made(tmp_path, monkeypatch):
    """triton_plain_order runs triton_grouped's kernel: at each shape it must time the config grouped's autotuning
    picked there (the A/B of the two orders), not tune again after the bars of the other block sizes."""
    import contextlib

    from bench.gpu_check import measure
    from bench.runner import CommandLog, Deadline

    calls, inside = [], []

    @contextlib.contextmanager
    def restrict_configs(allowed, caches=None):
        inside.append((caches, []))
        calls.append(inside[-1])
        yield
        inside.pop()

    made = iter(range(100))
    monkeypatch.setattr(kernel_ops, "restrict_configs", restrict_configs)
    monkeypatch.setattr(kernel_ops, "tuning_caches", lambda: {"made": next(made)})
    monkeypatch.setattr(measure.Context, "run", lambda self, suite, *rest: inside[-1][1].append(suite) or (0, []))
    ctx = measure.Context(torch.device("cpu"), "triton", CPU, tmp_path, Deadline(None), CommandLog(tmp_path, None), 0,
                          True)  # fmt: skip
    assert measure.run_kernels(ctx) == (0, [])
    started_from = {suite: caches for caches, suites in calls for suite in suites}
    assert len(CPU.kernel_block_sizes) > 1 and started_from[f"kernels b={CPU.kernel_block_sizes[0]}"] is None
    for saved_by_its_bars, block_size in enumerate(CPU.kernel_block_sizes):  # saved in this order, one per block
        assert started_from[f"kernels b={block_size} variants"] == {"made": saved_by_its_bars}


def _bar_rows() -> pd.DataFrame:
    """grad_input of W [128, 2048] (one block row: the op reads M × 128 of dy whatever the layout) in bf16 at 6.5536
    GB/s of device copy, so an op's memory term is (2176 M + 16384 nnz) · 2 bytes / 6.5536 GB/s:

    * ``p1`` b=128 d=0.5 (8 of 16 blocks) M=512: memory 0.38 ms < compute 0.5 × 1.0 ms; t = 0.625 = 1.25 × d×dense,
      torch BSR 1.5 × slower;
    * ``p2`` b=128 d=0.1 drawn as 2 of 16 blocks (exact d = 0.125) M=256: memory 0.18 ms ≤ 1.6 × 0.125 × 1.12 ms
      (but > 1.6 × 0.1 × 1.12 ms); t = 1.55 × 0.125 × 1.12 ms;
    * ``p3`` b=128 d=0.25 (4 blocks) M=768: memory 0.53 ms > 1.25 × 0.25 × 1.0 ms; t = 1.22 × 0.53 ms;
    * ``p4`` b=128 d=0.5 M=1024: memory 0.72 ms; t = the dense time, 1.0 ms;
    * ``p5`` b=64 d=0.5 (32 of 64 blocks) M=512: t = 0.3 ms, no kernel bar (not the first block size)."""
    base = {"suite": "kernels", "op": "grad_input", "K": 2048, "N": 128, "dtype": "bf16", "gpu": "g", "status": "ok"}
    rows = [base | {"suite": "optimizer", "op": "copy", "provider": "device_copy", "shape": "dense:s", "N": 1024,
                    "K": 1024, "ms_p50": 1.28}]  # fmt: skip: 1024² × 8 bytes in 1.28 ms = 6.5536 GB/s
    rows += [base | {"provider": "cublas_dense", "shape": "dense", "M": m, "density": 1.0, "ms_p50": ms}
             for m, ms in ((256, 1.12), (512, 1.0), (768, 1.0), (1024, 1.0))]  # fmt: skip
    points = (("p1", 512, 128, 0.5, 8, 0.625), ("p2", 256, 128, 0.1, 2, 1.55 * 0.125 * 1.12),
              ("p3", 768, 128, 0.25, 4, 1.22 * 0.53), ("p4", 1024, 128, 0.5, 8, 1.0), ("p5", 512, 64, 0.5, 32, 0.3))
    for shape, m, b, d, nnz, ms in points:
        rows.append(base | {"provider": "triton_grouped", "shape": shape, "M": m, "block_size": b, "density": d,
                            "nnz_blocks": nnz, "ms_p50": ms})  # fmt: skip
    rows.append(rows[-5] | {"provider": "torch_bsr", "ms_p50": 1.5 * 0.625})
    return _kernel_frame(rows)


def _markdown_rows(lines: list[str]) -> dict[str, dict[str, str]]:
    """The cells of the first table of ``lines`` by column, per row keyed by its first cell."""
    text = next(line for line in lines if line.startswith("| "))
    table = [line for line in text.splitlines() if line.startswith("|")]  # not the note below it
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    rows = [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in table[2:]]
    return {row[header[0]]: row for row in rows}


def test_each_kernel_bar_is_judged_against_the_ceiling_the_roofline_allows_at_the_exact_density():
    from bench.gpu_check.plan import GPU
    from bench.gpu_check.summary import kernel_section

    lines = kernel_section(_bar_rows(), GPU)
    rows = _markdown_rows(lines)
    kernel = {shape: (row["kernel bar"], row["kernel"]) for shape, row in rows.items()}
    assert kernel == {"p1": ("≤ 1.25 × d×dense", "pass"), "p2": ("≤ 1.6 × d×dense", "pass"),
                      "p3": ("≤ 1.2 × roofline", "miss"), "p4": ("≤ 1.2 × roofline", "miss"), "p5": ("", "")}
    assert (rows["p1"]["vs d×dense"], rows["p2"]["vs d×dense"], rows["p3"]["vs roofline"]) == ("1.25", "1.55", "1.22")
    assert [rows[p]["roofline term"] for p in ("p1", "p2", "p3")] == ["compute", "memory", "memory"]
    assert (rows["p1"]["vs BSR"], rows["p1"]["BSR ≥ 1.5×"], rows["p2"]["BSR ≥ 1.5×"]) == ("1.5", "pass",
                                                                                           "not measured")
    assert {shape: row["≤ dense"] for shape, row in rows.items()} == dict.fromkeys(rows, "pass")  # p4: t = t_dense
    assert "* kernel: 2 pass, 2 miss, 0 not measured" in lines


def _optimizer_rows(smet_gbps: float) -> pd.DataFrame:
    base = {"suite": "optimizer", "dtype": "fp32", "gpu": "g", "status": "ok"}
    return _kernel_frame([base | {"op": "copy", "provider": "device_copy", "shape": "dense:ceiling", "density": 1.0,
                                  "ms_p50": 1.0, "gbps": 1000.0},
                          base | {"op": "adamw", "provider": "smet_adamw", "shape": "compact:1b:hidden",
                                  "density": 0.25, "block_size": 128, "ms_p50": 1.0, "gbps": smet_gbps}])  # fmt: skip


@pytest.mark.parametrize("gbps, verdict", [(900.0, "90.0% of the copy ceiling (1000 GB/s, bytes read + written) — "
                                                    "**pass**"),
                                           (850.0, "85.0% of the copy ceiling (1000 GB/s, bytes read + written) — "
                                                    "**miss**")], ids=["90%", "85%"])  # fmt: skip
def test_compact_adamw_passes_at_90_percent_of_the_copy_ceiling_and_no_lower(gbps, verdict):
    from bench.gpu_check.plan import GPU
    from bench.gpu_check.summary import adamw_section

    assert f"Bar: compact AdamW at {verdict} (≥ 90%)." in adamw_section(_optimizer_rows(gbps), GPU)


def test_the_training_bars_compare_the_eager_unchecked_smet_step_with_dense_and_galore():
    """SMET: 1.2 × the dense tokens/s, 0.6 × its peak, 1.2 × GaLore's peak; its checkpointed row (less memory, fewer
    tokens/s) must not stand in for it."""
    from bench.gpu_check.plan import GPU
    from bench.gpu_check.summary import training_section

    gib = 2**30
    base = dict.fromkeys(TRAINING_COLUMNS) | {"config": "1b", "density": 1.0, "block_size": 128, "batch_size": 32,
                                              "seq_len": 256, "dtype": "bf16", "compiled": False,
                                              "activation_checkpointing": False, "vocab_size": 32000, "gpu": "g",
                                              "status": "ok", "nvml_status": "ok",
                                              "pred_peak_bytes": 8 * gib}  # fmt: skip
    rows = [base | {"method": "dense", "tokens_per_s": 1000.0, "peak_allocated_bytes": 10 * gib},
            base | {"method": "smet", "density": 0.25, "tokens_per_s": 1200.0, "peak_allocated_bytes": 6 * gib},
            base | {"method": "galore", "tokens_per_s": 500.0, "peak_allocated_bytes": 5 * gib},
            base | {"method": "smet", "density": 0.25, "activation_checkpointing": True, "tokens_per_s": 900.0,
                    "peak_allocated_bytes": 4 * gib}]  # fmt: skip
    text = "\n".join(training_section(pd.DataFrame(rows, columns=TRAINING_COLUMNS), GPU, None))
    assert "* SMET tokens/s vs dense at 1b: 1.200× — **pass** (more is the bar)" in text
    assert "* SMET peak memory vs dense at 1b: 0.600× — **pass** (less is the bar)" in text
    assert "* SMET peak memory vs galore at 1b: 1.200× — **miss** (less is the bar)" in text


def test_the_warm_up_call_runs_unpoisoned_and_the_two_checked_calls_poisoned():
    """Compile and autotune outside the NaN-filling mode, then two calls inside it."""
    poisoned = []

    def fn():
        poisoned.append(torch.are_deterministic_algorithms_enabled())
        return torch.ones(4)

    assert correctness.check_call(fn, torch.ones(4), bound=1e-6)["status"] == "pass"
    assert poisoned == [False, True, True]


def test_the_matmul_bound_is_twice_pytorchs_own_error_with_a_floor_of_1e_6():
    from smet_kernels.functional import to_dense

    fp16 = correctness._MatmulOperands(CPU, 16, torch.float16, torch.device("cpu"), 0)
    weight = to_dense(fp16.values, fp16.layout)
    exact = fp16.x.double() @ weight.double().t()
    torch_error = float((torch.nn.functional.linear(fp16.x, weight).double() - exact).norm() / exact.norm())
    assert torch_error > 1e-5  # fp16: well above the floor
    assert fp16.bound["forward"] == pytest.approx(2 * torch_error)
    fp32 = correctness._MatmulOperands(CPU, 16, torch.float32, torch.device("cpu"), 0)
    assert fp32.bound == dict.fromkeys(("forward", "grad_input", "grad_weight"), 1e-6)  # fp32 errors are below it
