"""smet-bench gpu-check, the command: option checks, the plan, the stage budget and its shares, the summary
rewritten as the run goes, the kernel stage's order, and a CPU run whose CSVs `smet-bench report` renders. The
correctness machinery is in test_gpu_check_correctness.py, the Triton configs in test_gpu_check_configs.py, the
summary's sections in test_gpu_check_summary.py."""

import csv
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import usage_error

from bench.cli import main
from bench.gpu_check.plan import CPU, STAGES
from bench.results import KERNEL_COLUMNS, TRAINING_COLUMNS

ROOT = Path(__file__).resolve().parents[1]


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
    [("--stages", "env,warp", "--stages must be"), ("--stages", ",", "--stages must be"),
     ("--stages", "env,,kernels", "--stages must be"), ("--stages", "env,", "--stages must be"),
     ("--minutes", "0", "--minutes must be positive")],
)
def test_bad_options_fail_with_one_line_and_exit_code_2_before_anything_runs(tmp_path, option, value, message, capsys):
    error = usage_error(main, ["gpu-check", "--out-dir", str(tmp_path / "check"), option, value], capsys)
    assert error.startswith(f"smet-bench: error: {message}")
    assert not (tmp_path / "check").exists()


def test_an_out_dir_that_is_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("")
    error = usage_error(main, ["gpu-check", "--out-dir", str(target)], capsys)
    assert error == f"smet-bench: error: --out-dir '{target}' exists and is not a folder"


def test_a_spent_budget_lists_every_stage_as_not_run(tmp_path):
    assert main(["gpu-check", "--out-dir", str(tmp_path), "--device", "cpu", "--minutes", "1e-9"]) == 0
    summary = (tmp_path / "gpu_check.md").read_text()
    for stage in STAGES:
        assert f"| {stage} " in summary
    assert summary.count("not run (budget)") == len(STAGES)
    assert " · matmul_variant grouped · " in summary and summary.split("\n\n")[2].endswith(" · backend triton")


def test_the_summary_is_written_after_every_stage_so_a_stopped_run_leaves_one(tmp_path, monkeypatch):
    from bench.gpu_check import measure

    def stopped(ctx):
        summary = (tmp_path / "gpu_check.md").read_text()  # written after env, before this stage
        table = summary[summary.index("## Stages"):summary.index("## Correctness")]
        rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
        assert [stage for stage in rows if stage in STAGES] == list(STAGES)  # each stage once, in order
        assert "| done " in rows["env"]
        assert all("not reached when this summary was written" in rows[stage] for stage in STAGES[1:])
        raise KeyboardInterrupt  # the command's time limit

    monkeypatch.setattr(measure, "run_adamw", stopped)
    with pytest.raises(KeyboardInterrupt):
        main(["gpu-check", "--out-dir", str(tmp_path), "--device", "cpu", "--stages", "env,adamw", "--no-progress"])
    summary = (tmp_path / "gpu_check.md").read_text()
    assert "Ceilings (stage env; this GPU's best in kernels.csv): matmul" in summary
    assert "| adamw " in summary
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


def test_a_timed_stage_rewrites_the_summary_at_most_once_per_snapshot_interval(tmp_path, monkeypatch):
    import bench.gpu_check as gpu_check
    from bench.gpu_check import measure, summary

    write, run_adamw, writes, during = summary.write, measure.run_adamw, [], []

    def counted_adamw(ctx):
        before = len(writes)
        result = run_adamw(ctx)
        during.append(len(writes) - before)
        return result

    monkeypatch.setattr(gpu_check, "SNAPSHOT_EVERY_S", 1e9)
    monkeypatch.setattr(summary, "write", lambda *args: writes.append(args) or write(*args))
    monkeypatch.setattr(measure, "run_adamw", counted_adamw)
    assert main(["gpu-check", "--out-dir", str(tmp_path), "--device", "cpu", "--stages", "env,adamw",
                 "--no-progress"]) == 0  # fmt: skip
    assert during == [0]  # written after env: the adamw rows come within the interval, then the stage's write


def test_a_stage_that_is_not_selected_takes_no_share_of_the_budget(tmp_path, monkeypatch):
    from bench.gpu_check import plan

    monkeypatch.setattr(plan, "CPU", dataclasses.replace(CPU, estimates_s=CPU.estimates_s | {"training": 1e9}))
    assert main(["gpu-check", "--out-dir", str(tmp_path), "--device", "cpu", "--stages", "adamw",
                 "--no-progress"]) == 0  # fmt: skip
    adamw = next(line for line in (tmp_path / "gpu_check.md").read_text().splitlines() if line.startswith("| adamw "))
    assert "| done " in adamw and "stopped" not in adamw


@pytest.mark.parametrize("stage_result, status", [
    (RuntimeError("a broken stage"), "failed: RuntimeError: a broken stage"),
    ((2, []), "2 case(s) raised (see stderr)")])
def test_a_stage_that_raises_or_whose_cases_raise_fails_the_command(tmp_path, monkeypatch, stage_result, status):
    from bench.gpu_check import measure

    def run_adamw(ctx):
        if isinstance(stage_result, Exception):
            raise stage_result
        return stage_result

    monkeypatch.setattr(measure, "run_adamw", run_adamw)
    assert main(["gpu-check", "--out-dir", str(tmp_path), "--device", "cpu", "--stages", "adamw",
                 "--no-progress"]) == 1  # fmt: skip
    assert f"| {status} " in (tmp_path / "gpu_check.md").read_text()


def test_a_timed_case_whose_result_is_wrong_fails_the_command_and_is_named_in_its_stage_while_the_rest_is_timed(
        tmp_path, monkeypatch):  # fmt: skip
    """On the real shapes a wrong result is a correctness failure; it was only "not judged", with exit status 0."""
    from bench import optimizer

    real = optimizer.run_case

    def run_case(case, *args, **kwargs):
        result = real(case, *args, **kwargs)
        return result | ({"status": "wrong", "note": "off"} if case.provider == "smet_adamw" else {})

    monkeypatch.setattr(optimizer, "run_case", run_case)
    assert main(["gpu-check", "--out-dir", str(tmp_path), "--device", "cpu", "--stages", "adamw",
                 "--no-progress"]) == 1  # fmt: skip
    adamw = next(line for line in (tmp_path / "gpu_check.md").read_text().splitlines() if line.startswith("| adamw "))
    assert "| done; 1 wrong: adamw smet_adamw compact:" in adamw
    with (tmp_path / "kernels.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 3  # every case still timed
    # a rerun into the folder times nothing again, and still fails on the recorded wrong result (it exited 0)
    monkeypatch.setattr(optimizer, "run_case", real)
    assert main(["gpu-check", "--out-dir", str(tmp_path), "--device", "cpu", "--stages", "adamw",
                 "--no-progress"]) == 1  # fmt: skip
    adamw = next(line for line in (tmp_path / "gpu_check.md").read_text().splitlines() if line.startswith("| adamw "))
    assert "| done; 1 wrong: adamw smet_adamw compact:tiny:hidden (recorded by an earlier run)" in adamw


def test_a_step_that_torch_compile_cannot_compile_fails_the_command(tmp_path, monkeypatch):
    """SPEC: torch.compile traces a sparsified model; a compile stage ending ``failed: ...`` exited 0."""
    from bench.gpu_check import measure

    monkeypatch.setattr(measure, "run_compile", lambda ctx: {"config": "tiny", "status": "failed: Unsupported: x"})
    assert main(["gpu-check", "--out-dir", str(tmp_path), "--device", "cpu", "--stages", "compile",
                 "--no-progress"]) == 1  # fmt: skip
    assert "| failed: Unsupported: x " in (tmp_path / "gpu_check.md").read_text()


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


def test_a_long_indivisible_stage_after_a_shared_one_is_judged_on_the_whole_budget_left(tmp_path, monkeypatch):
    """adamw's share of 8 min is ~27 s, less than compile's 50 s estimate: compile must still start."""
    from bench.gpu_check import measure

    monkeypatch.setattr(measure, "run_adamw", lambda ctx: (0, []))
    monkeypatch.setattr(measure, "run_compile", lambda ctx: {"config": "tiny", "status": "ok"})
    assert main(["gpu-check", "--out-dir", str(tmp_path), "--device", "cpu", "--stages", "adamw,compile",
                 "--no-progress"]) == 0  # fmt: skip
    compile_row = next(line for line in (tmp_path / "gpu_check.md").read_text().splitlines()
                       if line.startswith("| compile "))  # fmt: skip
    assert "| ok " in compile_row


def test_a_long_indivisible_stage_does_not_start_when_its_estimate_does_not_fit(tmp_path):
    assert main(["gpu-check", "--out-dir", str(tmp_path), "--device", "cpu", "--stages", "compile",
                 "--minutes", str(CPU.estimates_s["compile"] / 2 / 60)]) == 0  # fmt: skip
    summary = (tmp_path / "gpu_check.md").read_text()
    assert "not run (budget: ~" in summary and "SMET step" not in summary


def test_the_kernel_stage_makes_the_operands_once_for_consecutive_cases_that_share_them(tmp_path, monkeypatch):
    """At 8192 tokens a layout and its values are costly to make: the cases of one point reuse them."""
    from bench import kernels
    from bench.gpu_check import measure

    ran, made = [], []
    monkeypatch.setattr(measure.Context, "run", lambda self, suite, cases, run_one, file: ran.extend(
        (case, run_one(case)) for case in cases) or (0, []))  # fmt: skip
    monkeypatch.setattr(kernels, "make_operands", lambda case, *args, **kwargs: made.append(case) or case)
    monkeypatch.setattr(kernels, "run_case", lambda case, operands, *args: operands)  # the operands it was given
    measure.run_kernels(cpu_context(tmp_path))
    keys = [kernels.operands_key(case) for case, _ in ran]
    assert len(made) == 1 + sum(key != previous for previous, key in zip(keys, keys[1:])) < len(ran)
    assert all(kernels.operands_key(operands) == key for (_, operands), key in zip(ran, keys))


def test_a_timed_stage_lists_as_not_run_only_the_cases_the_budget_stopped_before(tmp_path):
    """A case that raised is retried by the next run, not "not run"; one measured before the budget ran out is done."""
    from bench.gpu_check import measure
    from bench.results import kernels_file

    first, _ = measure.ceiling_cases(CPU)
    second = dataclasses.replace(first, M=first.M // 2)
    ctx = cpu_context(tmp_path)

    def raises(case):
        raise RuntimeError("a broken case")

    assert ctx.run("broken", [first], raises, kernels_file(tmp_path)) == (1, [])

    def measured_then_out_of_time(case):
        ctx.budget.hit = True  # the budget ends while the first case runs
        return {"ms_p50": 1.0, "status": "ok"}

    failed, not_run = ctx.run("timed", [first, second], measured_then_out_of_time, kernels_file(tmp_path))
    assert (failed, not_run) == (0, [measure._label(second)])


def _rows(path):
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


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
    assert "Ceilings (stage env; this GPU's best in kernels.csv): matmul" in summary
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


def test_the_environment_of_a_cuda_device_names_its_properties_and_the_torch_bsr_parameters(monkeypatch):
    """The GPU branch of ``environment`` (never run on this CPU machine) with an H200's properties stubbed."""
    from types import SimpleNamespace

    from bench.gpu_check import measure

    properties = SimpleNamespace(multi_processor_count=132, total_memory=143 * 2**30, L2_cache_size=60 * 2**20)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: properties)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    info = measure.environment(torch.device("cuda"))
    assert (info["device"], info["sms"], info["memory_gib"], info["l2_mib"], info["capability"]) == (
        "NVIDIA H200", 132, 143.0, 60.0, "9.0")
    assert info["torch_bsr_params"].startswith("defaults")


def test_the_environment_names_the_matmul_variant_that_the_training_and_compile_stages_run(monkeypatch):
    """``SMET_MATMUL_VARIANT`` changes every SMET training row and the compiled step: the summary says which ran."""
    from bench.gpu_check import measure

    assert measure.environment(torch.device("cpu"))["matmul_variant"] == "grouped"
    monkeypatch.setenv("SMET_MATMUL_VARIANT", "persistent")
    assert measure.environment(torch.device("cpu"))["matmul_variant"] == "persistent"


def cpu_context(tmp_path):
    from bench.gpu_check import measure
    from bench.runner import CommandLog, Deadline

    return measure.Context(torch.device("cpu"), "triton", CPU, tmp_path, Deadline(None), CommandLog(tmp_path, None),
                           0, True)  # fmt: skip


def test_a_gpu_context_times_by_milliseconds_of_the_gpu_and_a_cpu_one_by_repeats(tmp_path):
    from bench.gpu_check import measure
    from bench.runner import CommandLog, Deadline

    gpu = measure.Context(torch.device("cuda"), "triton", CPU, tmp_path, Deadline(None), CommandLog(tmp_path, None),
                          0, True)  # fmt: skip
    assert set(gpu.timing) == {"gpu_warmup_ms", "gpu_rep_ms"}
    assert "max_repeats" in cpu_context(tmp_path).timing


def test_the_env_and_kernels_stages_add_up_the_failures_and_the_cases_not_run_of_every_suite(tmp_path, monkeypatch):
    from bench.gpu_check import measure

    suites = []
    monkeypatch.setattr(measure.Context, "run", lambda self, suite, *rest: suites.append(suite) or (1, [suite]))
    ctx = cpu_context(tmp_path)
    assert measure.run_env(ctx) == (2, ["ceiling matmul", "ceiling copy"])
    suites.clear()
    failures, not_run = measure.run_kernels(ctx)
    assert failures == len(suites) == 3 * len(CPU.kernel_block_sizes) and not_run == suites


def test_the_compile_stage_times_the_compiled_model_and_turns_the_median_step_ms_into_tokens_per_s(tmp_path,
                                                                                                  monkeypatch):
    from bench.gpu_check import measure

    timed = []

    def step_times_ms(model, optimizer_, tokens, device, steps):
        timed.append(model)
        assert tokens.shape == (CPU.training_batch, CPU.training_seq + 1)  # inputs and their next-token targets
        return [10.0, 40.0, 20.0] if model == "model" else [5.0, 50.0, 10.0]

    monkeypatch.setattr(measure.training, "build", lambda case, device, backend, seed: ("model", "optimizer"))
    monkeypatch.setattr(torch, "compile", lambda model: ("compiled", model))
    monkeypatch.setattr(measure, "_step_times_ms", step_times_ms)
    row = measure.run_compile(cpu_context(tmp_path))
    tokens = CPU.training_batch * CPU.training_seq
    assert timed == ["model", ("compiled", "model")] and row["status"] == "ok"
    assert row["eager_tokens_per_s"] == pytest.approx(tokens / 0.020)  # medians: 20 ms and 10 ms
    assert row["compiled_tokens_per_s"] == pytest.approx(tokens / 0.010)


def test_the_compile_stage_times_a_step_only_after_two_warm_up_steps(monkeypatch):
    """The first steps compile, autotune and create the optimizer state: timed, they would swamp the median."""
    from bench.gpu_check import measure

    model, forwards, before_timing = torch.nn.Embedding(8, 8), [], []
    model.register_forward_hook(lambda *args: forwards.append(1))
    optimizer_ = torch.optim.SGD(model.parameters(), lr=0.1)
    monkeypatch.setattr(measure.training, "time_steps",
                        lambda step, device, steps: before_timing.append(len(forwards)) or [1.0] * steps)
    tokens = torch.randint(0, 8, (2, 5), generator=torch.Generator().manual_seed(0))
    assert measure._step_times_ms(model, optimizer_, tokens, torch.device("cpu"), 3) == [1.0] * 3
    assert before_timing == [2]


def test_an_out_dir_holding_a_csv_of_another_release_is_refused_with_one_line_before_any_stage_runs(tmp_path, capsys):
    """A DIR resumed after the kernels.csv columns changed: every timed stage failed on the file, and the summary
    could not be written at all (KeyError 'gbps'), so the run left no gpu_check.md, its correctness results lost."""
    old_columns = [c for c in KERNEL_COLUMNS if c != "gbps"]
    (tmp_path / "kernels.csv").write_text(",".join(old_columns) + "\n" + ",".join("1" for _ in old_columns) + "\n")
    for command in (["gpu-check", "--device", "cpu", "--stages", "env"],
                    ["run", "--quick", "--device", "cpu", "--suites", "kernels", "--providers", "cublas_dense"]):
        error = usage_error(main, [*command, "--out-dir", str(tmp_path)], capsys)
        assert error.startswith("smet-bench: error: ") and "kernels.csv lacks ['gbps']" in error
        assert "fresh --out-dir" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kernels.csv"]


def test_an_unknown_smet_matmul_variant_in_the_environment_is_refused_with_one_line_before_anything_runs(
        tmp_path, monkeypatch, capsys):  # fmt: skip
    """A typo (``TMA``) ran the whole budget: every training case and the training-step check raised on it."""
    monkeypatch.setenv("SMET_MATMUL_VARIANT", "TMA")
    for command in (["gpu-check", "--device", "cpu", "--stages", "env"],
                    ["run", "--quick", "--device", "cpu", "--suites", "kernels", "--providers", "cublas_dense"]):
        error = usage_error(main, [*command, "--out-dir", str(tmp_path / "out")], capsys)
        assert error.startswith("smet-bench: error: the SMET_MATMUL_VARIANT environment variable must be one of")
    assert not (tmp_path / "out").exists()


def test_a_later_run_without_correctness_and_compile_still_shows_their_earlier_results(tmp_path, monkeypatch):
    """A second run into the same folder (``--stages env``: a rerun of one bar) rewrites gpu_check.md: the checks and
    the compile result of the first run stay in it, named as an earlier run's; another device's are not shown."""
    from bench.gpu_check import correctness, measure, saved

    check = {"check": "matmul", "variant": "grouped", "dtype": "fp32", "block_size": 16, "op": "forward",
             "error": 1e-7, "bound": 1e-6, "status": "pass", "note": "a check of the first run"}  # fmt: skip
    compiled = {"config": "tiny", "status": "ok", "eager_tokens_per_s": 100.0, "compiled_tokens_per_s": 150.0}
    monkeypatch.setattr(correctness, "run", lambda *args: ([check], []))
    monkeypatch.setattr(measure, "run_compile", lambda ctx: compiled)
    common = ["--out-dir", str(tmp_path), "--device", "cpu", "--no-progress"]
    assert main(["gpu-check", "--stages", "correctness,compile", *common]) == 0
    first = (tmp_path / "gpu_check.md").read_text()
    assert "a check of the first run" in first and "150" in first and "earlier run" not in first
    assert "gpu-check --stages correctness,compile" in (tmp_path / "commands.txt").read_text()
    assert main(["gpu-check", "--stages", "correctness,compile", *common]) == 0
    assert "earlier run" not in (tmp_path / "gpu_check.md").read_text()  # run again: this run's results
    assert main(["gpu-check", "--stages", "env", *common]) == 0
    second = (tmp_path / "gpu_check.md").read_text()
    assert "a check of the first run" in second and "compiled 150 tokens/s (1.50×)" in second
    origin = "from an earlier run into this folder (`smet-bench gpu-check --stages correctness,compile"
    assert second.count(origin) == 2  # the checks and the compile result
    saved.save(tmp_path, "correctness", ([check | {"note": "another GPU's"}], []), "another GPU", "elsewhere")
    # the checks kept now are another device's: not shown here; the compile result still is
    assert main(["gpu-check", "--stages", "env", *common]) == 0
    third = (tmp_path / "gpu_check.md").read_text()
    assert "another GPU's" not in third and "a check of the first run" not in third and "1.50×" in third


def test_a_failed_check_is_counted_listed_before_the_passes_printed_and_fails_the_command(tmp_path, monkeypatch,
                                                                                         capsys):
    """A failed training-step check (not a matmul one) and a check the budget cut: the command must exit 1, print the
    failure, count it, list it above the passing rows and name the cut check; else a failure reads as a pass."""
    from bench.gpu_check import correctness

    rows = [{"check": "matmul", "variant": "grouped", "dtype": "fp32", "block_size": 16, "op": "forward",
             "error": 1e-7, "bound": 1e-6, "status": "pass", "note": "the passing check"},
            {"check": "training step", "variant": "tiny smet d=0.25", "dtype": "fp32", "block_size": 32,
             "op": "step", "error": 0.5, "bound": 1e-5, "status": "fail", "note": "loss differs by 0.5"}]  # fmt: skip
    monkeypatch.setattr(correctness, "run", lambda *args: (rows, ["matmul grouped fp16 b=16 grad_input"]))
    assert main(["gpu-check", "--out-dir", str(tmp_path), "--device", "cpu", "--stages", "correctness",
                 "--no-progress"]) == 1  # fmt: skip
    printed = capsys.readouterr().out
    assert "gpu-check: FAIL training step tiny smet d=0.25 fp32 32 step: loss differs by 0.5" in printed
    assert "FAIL matmul" not in printed  # the passing check
    summary = (tmp_path / "gpu_check.md").read_text()
    assert "1 of 2 checks pass, 1 fail, 1 not run." in summary and "| 1 pass, 1 fail " in summary
    assert summary.index("loss differs by 0.5") < summary.index("the passing check")
    assert "Not run (budget): matmul grouped fp16 b=16 grad_input" in summary
    assert "| 1: matmul grouped fp16 b=16 grad_input |" in summary  # the stage row's "not run" column


def test_the_gpu_sizes_measure_every_point_the_bars_name():
    """The bars: kernels at b = 128 and d = 0.5 / 0.25 / 0.1 (the 7b and 1b shapes), never slower than dense at
    b = 64 too; compact AdamW at d = 0.25 (the summary reads that row); SMET at 1b, d = 0.25. A size that drifts
    from them leaves a bar not measured (or judged on another point) on the one GPU run."""
    from bench.gpu_check.measure import TRAINING_DENSITY, ceiling_cases, optimizer_cases, training_cases
    from bench.gpu_check.plan import GPU
    from profiling.roofline import BARS

    assert GPU.kernel_block_sizes[0] == 128 and 64 in GPU.kernel_block_sizes
    # correctness: bf16 and fp16 at b = 32, 64 and 128, the weight grads with split-K on (off is split_k = 1)
    assert set(GPU.check_dtypes) == {"bf16", "fp16"} and set(GPU.check_block_sizes) == {32, 64, 128}
    assert GPU.split_k > 1 and CPU.split_k > 1
    for sizes in (GPU, CPU):  # an n x n x n matmul; a side x side copy
        matmul, copy = ceiling_cases(sizes)
        assert (matmul.M, matmul.shape.N, matmul.shape.K) == (sizes.ceiling_matmul,) * 3
        assert (copy.shape.N, copy.shape.K) == (sizes.ceiling_copy_side,) * 2
    assert set(BARS) <= set(GPU.kernel_densities) and {"7b", "1b"} <= set(GPU.kernel_configs)
    assert [case.density for case in optimizer_cases(GPU) if case.provider == "smet_adamw"] == [0.25]
    assert GPU.training_configs[-1] == "1b" and TRAINING_DENSITY == 0.25
    assert {(case.method, case.density) for case in training_cases(GPU) if case.config == "1b"} >= {
        ("smet", 0.25), ("dense", 1.0), ("galore", 1.0)}


def test_the_plan_marks_the_stages_past_the_budget():
    from bench.gpu_check.plan import GPU, format_plan

    lines = format_plan(GPU, list(STAGES), 1.0).splitlines()[1:]  # 60 s: env (20 s) fits, correctness (+85 s) not
    assert "past the budget" not in lines[0] and all("past the budget" in line for line in lines[1:])
    exactly = dataclasses.replace(GPU, estimates_s=GPU.estimates_s | {"env": 60})
    assert "past the budget" not in format_plan(exactly, ["env"], 1.0)  # a total of exactly the budget fits


def test_a_sigterm_inside_a_stage_writes_the_summary_with_that_stage_stopped_and_exits(tmp_path, monkeypatch):
    """A command time limit sends SIGTERM: the summary is written at once (not up to 15 s stale), naming the stage
    that was stopped, and the process exits with 128 + 15."""
    import signal

    from bench.gpu_check import measure

    monkeypatch.setattr(measure, "run_adamw", lambda ctx: os.kill(os.getpid(), signal.SIGTERM) or time.sleep(5))
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as raised:
        main(["gpu-check", "--out-dir", str(tmp_path), "--device", "cpu", "--stages", "env,adamw", "--no-progress"])
    assert raised.value.code == 143 and signal.getsignal(signal.SIGTERM) is handler
    stage_rows = [line for line in (tmp_path / "gpu_check.md").read_text().splitlines() if line.startswith("| ")]
    assert any(row.startswith("| adamw ") and "stopped by SIGTERM" in row for row in stage_rows), stage_rows
    assert any(row.startswith("| env ") and "| done " in row for row in stage_rows), stage_rows
