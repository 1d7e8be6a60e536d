"""smet-bench end to end on CPU: a tiny grid, CSV schema, resume, report with tables and plots."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import usage_error

from bench.cli import build_parser, main
from bench.kernels import LIBRARY_PROVIDERS, TRITON_PROVIDERS
from bench.results import KERNEL_COLUMNS, TRAINING_COLUMNS

REPO = Path(__file__).resolve().parents[1]
# --device cpu: the same rows on a machine with a GPU, except that Triton has no interpreter there, so the library
# provider of the run is torch_reference (the PyTorch reference) instead of triton_grouped and its variants
TINY = ["--quick", "--configs", "tiny", "--densities", "0.5", "--steps", "1", "--no-progress", "--device", "cpu"]
REQUIRED_KERNEL_COLUMNS = [
    "op", "provider", "M", "K", "N", "block_size", "density", "dtype",
    "ms_p20", "ms_p50", "ms_p80", "gpu", "torch", "triton", "timestamp",
]  # fmt: skip


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bench")
    assert main(["run", *TINY, "--out-dir", str(out_dir)]) == 0
    return out_dir


def test_kernel_csv_schema_and_rows(quick_run):
    path = quick_run / "kernels.csv"
    with path.open(newline="") as handle:
        header = next(csv.reader(handle))
    assert header == KERNEL_COLUMNS
    assert set(REQUIRED_KERNEL_COLUMNS) <= set(header)
    rows = _rows(path)
    ops = {row["op"] for row in rows}
    providers = {row["provider"] for row in rows}
    backend = "triton" if providers & set(TRITON_PROVIDERS) else "reference"
    library = LIBRARY_PROVIDERS[backend][0]  # triton_grouped, or torch_reference without the interpreter
    assert {"forward", "grad_input", "grad_weight", "adamw"} <= ops
    assert {
        library,
        "cublas_dense",
        "masked_dense",
        "torch_bsr",
        "torch_adamw_fused",
        "torch_adamw_foreach",
    } <= providers
    for row in rows:
        if row["status"] == "skipped":
            if row["provider"] != "torch_bsr":  # a variant without the interpreter, see TINY
                assert row["provider"] in TRITON_PROVIDERS and "needs the Triton backend" in row["note"], row
                continue
            assert "CUDA" in row["note"]
            continue
        assert row["status"] == "ok", row
        p20, p50, p80 = float(row["ms_p20"]), float(row["ms_p50"]), float(row["ms_p80"])
        assert 0 < p20 <= p50 <= p80
        assert row["gpu"].startswith("cpu-") and row["torch"] and row["triton"] and row["timestamp"]
    library_forward = [r for r in rows if r["op"] == "forward" and r["provider"] == library]
    assert library_forward and all(float(r["tflops"]) > 0 and r["density"] == "0.5" for r in library_forward)
    adamw = [r for r in rows if r["op"] == "adamw"]
    assert adamw and all(float(r["gbps"]) > 0 for r in adamw)


def test_training_csv_rows(quick_run):
    rows = _rows(quick_run / "training.csv")
    with (quick_run / "training.csv").open(newline="") as handle:
        assert next(csv.reader(handle)) == TRAINING_COLUMNS
    assert {(r["method"], r["density"]) for r in rows} == {
        ("dense", "1"),
        ("galore", "1"),
        ("masked", "0.5"),
        ("smet", "0.5"),
    }
    for row in rows:
        assert row["status"] == "ok"
        assert float(row["tokens_per_s"]) > 0 and float(row["warmup_s"]) > 0
        assert row["nvml_status"].startswith("unavailable")
        for component in ("weights", "gradients", "optimizer", "activations"):
            assert int(row[f"{component}_bytes"]) > 0 and int(row[f"pred_{component}_bytes"]) > 0
    by_method = {r["method"]: r for r in rows}
    assert int(by_method["smet"]["optimizer_bytes"]) < int(by_method["masked"]["optimizer_bytes"])


def test_resume_skips_measured_rows(quick_run, capsys):
    before = {name: len(_rows(quick_run / name)) for name in ("kernels.csv", "training.csv")}
    assert main(["run", *TINY, "--out-dir", str(quick_run)]) == 0
    out = capsys.readouterr().out
    assert f"smet-bench: device cpu, backend triton, dtype fp32, out-dir {quick_run}\n" in out  # not torch.float32
    lines = [line for line in out.splitlines() if line.endswith("to run")]
    assert len(lines) == 3 and all(line.endswith(" 0 to run") for line in lines)
    assert {name: len(_rows(quick_run / name)) for name in before} == before


def test_report_renders_tables_and_plots(quick_run):
    assert main(["report", "--out-dir", str(quick_run)]) == 0
    report = (quick_run / "report.md").read_text()
    for heading in ("## Kernels", "## Optimizer step", "## End-to-end training step", "## Memory model"):
        assert heading in report
    assert "| op " in report and "vs d×dense" in report and "median abs error" in report
    assert "smet-bench run --quick --configs tiny" in report  # the commands that made it
    for plot in ("kernel_time_vs_density.png", "peak_memory_vs_model.png", "memory_vs_density.png",
                 "throughput_vs_density.png", "memory_model.png"):
        assert f"]({plot})" in report
        assert (quick_run / plot).stat().st_size > 1000


def test_report_without_results_fails_clearly(tmp_path, capsys):
    error = usage_error(main, ["report", "--out-dir", str(tmp_path)], capsys)
    assert error.startswith("smet-bench: error: ") and "smet-bench run" in error
    (tmp_path / "a_file").write_text("")
    for out_dir in (tmp_path / "missing", tmp_path / "a_file"):
        error = usage_error(main, ["report", "--out-dir", str(out_dir)], capsys)
        assert error == f"smet-bench: error: --out-dir '{out_dir}' is not a folder"


def _subcommands(parser):
    return next(a for a in parser._actions if a.choices and "run" in a.choices).choices


def test_every_option_has_help():
    subparsers = _subcommands(build_parser())
    for name in ("run", "report", "gpu-check"):
        for action in subparsers[name]._actions:
            assert action.help, f"{name} {action.option_strings} lacks --help text"


def test_every_option_states_its_default():
    """Each option, flags included, says its default in --help (as smet-train's do); no help text points to an issue
    number."""
    from profiling.kernel_resources import build_parser as kernel_resources_parser

    bench = _subcommands(build_parser())
    stability = _subcommands(bench["stability"])
    parsers = {
        "run": bench["run"],
        "report": bench["report"],
        "gpu-check": bench["gpu-check"],
        "stability run": stability["run"],
        "stability report": stability["report"],
        "memory": bench["memory"],
        "kernel_resources": kernel_resources_parser(),
    }
    for name, parser in parsers.items():
        for action in parser._actions:
            if "-h" not in action.option_strings:
                assert "default" in action.help, f"{name} {action.option_strings}: {action.help}"
        assert "issue" not in parser.format_help().lower(), name
    assert "issue" not in build_parser().format_help().lower()


def test_the_device_help_of_run_and_gpu_check_lists_auto_which_they_accept(tmp_path):
    bench = _subcommands(build_parser())
    for name in ("run", "gpu-check"):
        device = next(a for a in bench[name]._actions if "--device" in a.option_strings)
        assert device.help.startswith("auto, cpu, cuda or cuda:N (default: auto,"), name
    assert main(["gpu-check", "--plan", "--device", "auto", "--out-dir", str(tmp_path)]) == 0


def test_a_bad_smet_backend_environment_variable_is_a_one_line_error_of_run(tmp_path, monkeypatch, capsys):
    from smet_kernels import backend

    monkeypatch.setattr(backend, "_backend", "fast")  # SMET_BACKEND=fast, read at import
    monkeypatch.setattr(backend, "_backend_source", "the SMET_BACKEND environment variable")
    error = usage_error(main, ["run", "--quick", "--suites", "optimizer", "--out-dir", str(tmp_path)], capsys)
    assert error == ("smet-bench: error: the SMET_BACKEND environment variable must be one of "
                     "('auto', 'triton', 'reference'), got 'fast'")


def test_a_gpu_named_by_index_is_made_the_current_device(monkeypatch):
    """torch's BSR product launches its Triton kernels on the current GPU: ``--device cuda:1`` makes it current (a
    stubbed pair of GPUs here); ``cuda`` and ``cpu`` leave the current device as it is."""
    import torch

    import smet_kernels.backend as backend
    from bench.cli import prepare_device

    made_current = []
    monkeypatch.setattr(backend, "resolve_device", lambda name, source: torch.device(name))
    monkeypatch.setattr(backend, "resolve_backend", lambda device, name: "reference")
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    for name in ("cuda:1", "cuda", "cpu"):
        assert prepare_device(name, "reference") == (torch.device(name), "reference")
    assert made_current == [torch.device("cuda:1")]


def test_module_entry_point_help():
    result = subprocess.run(
        [sys.executable, "-m", "bench.cli", "run", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    assert "--quick" in result.stdout and "--out-dir" in result.stdout


@pytest.mark.parametrize(
    "option, value",
    [
        ("--suites", "kernels,nope"),
        ("--providers", "cutlass"),
        ("--methods", "sgd"),
        ("--configs", "70b"),
        ("--densities", "0,0.5"),
        ("--block-sizes", "48"),
        ("--tokens", "0"),
        ("--steps", "0"),
        ("--device", "tpu"),
    ],
)
def test_bad_options_are_rejected_with_exit_code_2_and_one_line_naming_them(tmp_path, option, value, capsys):
    error = usage_error(main, ["run", option, value, "--out-dir", str(tmp_path)], capsys)
    assert error.startswith(f"smet-bench: error: {option} "), error
    assert not (tmp_path / "kernels.csv").exists()


@pytest.mark.parametrize("suites, providers, suite", [("optimizer", "torch_bsr", "optimizer"),
                                                     ("kernels,optimizer", "smet_adamw", "kernels"),
                                                     ("kernels,optimizer,training", "torch_bsr", "optimizer")])
def test_providers_that_name_none_of_a_selected_suites_providers_are_refused(tmp_path, suites, providers, suite,
                                                                             capsys):
    """That suite would run its baselines alone (the optimizer suite only its device copy), silently."""
    error = usage_error(main, ["run", "--suites", suites, "--providers", providers, "--out-dir", str(tmp_path)], capsys)
    assert error.startswith(f"smet-bench: error: --providers {providers} names no provider of the {suite} suite")
    assert not (tmp_path / "kernels.csv").exists()


@pytest.mark.parametrize("argv, option", [(["run", "--device", "tpu"], "--device"),
                                          (["run", "--batch-size", "-2"], "--batch-size"),
                                          (["gpu-check", "--plan", "--device", "tpu"], "--device")])
def test_a_bad_option_starts_its_line_with_smet_bench_error_like_the_other_subcommands(tmp_path, argv, option,
                                                                                      capsys):
    assert usage_error(main, [*argv, "--out-dir", str(tmp_path)], capsys).startswith(f"smet-bench: error: {option} ")


@pytest.mark.parametrize("command", [["run", "--quick"], ["gpu-check"], ["stability", "run", "--quick"], ["memory"]])
def test_an_out_dir_that_is_or_lies_under_a_file_is_a_one_line_error(tmp_path, command, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    for out_dir, message in ((a_file, "exists and is not a folder"), (a_file / "sub", "cannot be created")):
        argv = [*command, "--out-dir", str(out_dir)] + (["--device", "cpu"] if command[0] != "memory" else [])
        assert usage_error(main, argv, capsys).startswith(f"smet-bench: error: --out-dir '{out_dir}' {message}")
    assert a_file.read_text() == "not a folder"


@pytest.mark.parametrize("command", [["run", "--quick"], ["gpu-check"], ["stability", "run", "--quick"], ["memory"]])
def test_an_out_dir_that_cannot_be_created_is_a_one_line_error_naming_it_not_a_traceback(tmp_path, command, capsys,
                                                                                          monkeypatch):
    """No permission there (or a read-only file system): ``mkdir`` raised its ``OSError`` out of the command."""
    make_dir = Path.mkdir

    def mkdir(path, *args, **kwargs):
        if "locked" in path.parts:
            raise PermissionError(13, "Permission denied", str(path))
        return make_dir(path, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    out_dir = tmp_path / "locked" / "out"
    argv = [*command, "--out-dir", str(out_dir)] + (["--device", "cpu"] if command[0] != "memory" else [])
    error = usage_error(main, argv, capsys)
    assert error == f"smet-bench: error: --out-dir '{out_dir}' cannot be created: Permission denied"


@pytest.mark.parametrize("command, option", [(["run"], "--max-minutes"), (["gpu-check"], "--minutes"),
                                             (["stability", "run", "--quick"], "--max-minutes")])
@pytest.mark.parametrize("minutes", ["nan", "0", "-1"])
def test_a_time_budget_that_is_not_positive_is_a_one_line_error_before_anything_runs(tmp_path, command, option,
                                                                                      minutes, capsys):
    out_dir = tmp_path / "out"
    error = usage_error(main, [*command, "--device", "cpu", option, minutes, "--out-dir", str(out_dir)], capsys)
    assert error == f"smet-bench: error: {option} must be positive, got {minutes}"
    assert not out_dir.exists()


def test_training_block_size_must_divide_the_hidden_size(tmp_path, capsys):
    argv = ["run", "--quick", "--suites", "training", "--training-block-size", "128", "--out-dir", str(tmp_path)]
    error = usage_error(main, argv, capsys)
    assert error.startswith("smet-bench: error: --training-block-size 128: ") and "hidden size 64 of" in error, error
    assert not (tmp_path / "training.csv").exists()


def test_full_grid_on_cpu_warns_to_use_quick(tmp_path, capsys):
    args = ["run", "--suites", "optimizer", "--device", "cpu", "--no-progress", "--max-minutes", "1e-9",
            "--out-dir", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    assert "add --quick" in capsys.readouterr().err
    assert main([*args, "--quick"]) == 0
    assert "--quick" not in capsys.readouterr().err


def test_report_reads_pytest_benchmark_json(quick_run):
    (quick_run / "pytest-benchmark.json").write_text(
        '{"machine_info": {}, "benchmarks": [{"name": "test_dense[forward]", "group": null, '
        '"stats": {"q1": 0.001, "median": 0.002, "q3": 0.003, "rounds": 20}, "extra_info": {"tflops": 512.0}}]}'
    )
    assert main(["report", "--out-dir", str(quick_run)]) == 0
    report = (quick_run / "report.md").read_text()
    assert "## pytest-benchmark" in report and "test_dense[forward]" in report and "2 [1–3]" in report


@pytest.mark.parametrize("text, problem", [
    ("not json", "is not JSON: Expecting value: line 1 column 1 (char 0)"),
    ('{"version": 1}', 'is not pytest-benchmark output (no "benchmarks" list): write it with pytest bench '
                       "--benchmark-json=FILE")])
def test_a_benchmark_json_that_is_not_pytest_benchmark_output_is_a_one_line_error_naming_the_option_and_file(
        quick_run, tmp_path, text, problem, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text(text)
    error = usage_error(main, ["report", "--out-dir", str(quick_run), "--benchmark-json", str(broken)], capsys)
    assert error == f"smet-bench: error: --benchmark-json {broken} {problem}"


@pytest.mark.parametrize("name, reason", [("missing.json", "No such file or directory"),
                                          ("a_folder", "Is a directory")])
def test_a_benchmark_json_that_cannot_be_read_is_a_one_line_error_naming_the_file(tmp_path, name, reason, capsys):
    (tmp_path / "a_folder").mkdir()
    path = tmp_path / name
    error = usage_error(main, ["report", "--out-dir", str(tmp_path), "--benchmark-json", str(path)], capsys)
    assert error == f"smet-bench: error: --benchmark-json {path} cannot be read: {reason}"


def test_the_pytest_benchmark_suite_runs_and_the_report_renders_its_json(quick_run, tmp_path):
    """``pytest bench --benchmark-only`` at its CPU sizes (each result checked against the dense computation, then
    timed; the GPU hidden, where there is one, so that the suite does not run its full-size GPU grid here), and its
    JSON in ``smet-bench report``."""
    json_path = tmp_path / "pytest-benchmark.json"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "bench", "--benchmark-only", "-q", "-p", "no:cacheprovider",
         f"--benchmark-json={json_path}"],
        cwd=REPO,
        # not a pytest-xdist worker: pytest-benchmark, seeing its variables, turns timing off and --benchmark-only away
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")} | {"CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    names = {bench["name"] for bench in json.loads(json_path.read_text())["benchmarks"]}
    assert {"test_dense[forward-tiny:gate_up-128x64]", "test_sparse[forward-triton_grouped-0.5-tiny:gate_up-128x64]",
            "test_sparse[grad_weight-masked_dense-0.5-tiny:gate_up-128x64]"} <= names, names  # fmt: skip
    assert {"test_adamw_compact[smet_adamw-0.5]", "test_training_step[smet]", "test_training_step[galore]"} <= names
    out_dir = tmp_path / "run"
    shutil.copytree(quick_run, out_dir)
    assert main(["report", "--out-dir", str(out_dir), "--benchmark-json", str(json_path)]) == 0
    report = (out_dir / "report.md").read_text()
    assert "## pytest-benchmark" in report and "test_sparse[forward-triton_grouped-0.5-tiny:gate_up-128x64]" in report


def test_max_minutes_stops_and_resume_completes(tmp_path, capsys):
    args = ["run", "--quick", "--suites", "optimizer", "--no-progress", "--out-dir", str(tmp_path)]
    assert main([*args, "--max-minutes", "1e-9"]) == 0
    assert "rerun the same command to resume" in capsys.readouterr().out
    assert not (tmp_path / "kernels.csv").exists()
    assert not (tmp_path / "commands.txt").exists()  # it measured nothing
    assert main(args) == 0
    rows = _rows(tmp_path / "kernels.csv")
    assert {r["provider"] for r in rows} == {"device_copy", "smet_adamw", "torch_adamw_fused", "torch_adamw_foreach"}
    assert main(args) == 0  # everything measured already: no new line either
    commands = (tmp_path / "commands.txt").read_text().splitlines()
    assert len(commands) == 1 and commands[0].endswith("smet-bench " + " ".join(args))


def test_failed_operands_are_not_reused_for_the_next_case(tmp_path, monkeypatch):
    """When building a point's operands fails, its other cases must not be measured on the previous point's."""
    from bench import kernels

    real = kernels.make_operands
    failed = []

    def flaky(case, *args, **kwargs):
        if case.density == 0.25 and not failed:
            failed.append(case)
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(case, *args, **kwargs)

    monkeypatch.setattr(kernels, "make_operands", flaky)
    args = ["run", "--suites", "kernels", "--configs", "tiny", "--densities", "0.5,0.25", "--block-sizes", "32",
            "--tokens", "32", "--providers", "masked_dense", "--backend", "reference", "--no-progress"]  # fmt: skip
    assert main([*args, "--out-dir", str(tmp_path)]) == 1  # the failed case is reported
    for row in _rows(tmp_path / "kernels.csv"):
        blocks = int(row["N"]) * int(row["K"]) // 32**2
        assert int(row["nnz_blocks"]) == round(float(row["density"]) * blocks), row


@pytest.mark.parametrize("option", ["--compile", "--activation-checkpointing"])
def test_mode_options_take_off_on_or_both_and_apply_to_the_training_suite(tmp_path, option, capsys):
    with pytest.raises(SystemExit):
        main(["run", option, "yes", "--out-dir", str(tmp_path)])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"smet-bench run: error: argument {option}: invalid choice: 'yes'")
    error = usage_error(main, ["run", "--quick", "--suites", "kernels", option, "both", "--out-dir", str(tmp_path)],
                        capsys)
    assert error == f"smet-bench: error: {option} both applies to the training suite, which --suites kernels leaves out"
    assert not any(tmp_path.iterdir())


def test_compiled_and_checkpointed_training_rows_resume_and_report_side_by_side(tmp_path, monkeypatch, capsys):
    """``--compile both --activation-checkpointing both``: four rows per case, keyed by the two modes (compiled
    through aot_eager here: the same graph capture as Inductor, no C++ build on a CPU; the reference backend, as
    the interpreter would take long)."""
    import torch

    from bench import training

    real_compile, compiled = torch.compile, []

    def compile_with_aot_eager(model, **kwargs):
        compiled.append(model)
        return real_compile(model, backend="aot_eager", **kwargs)

    monkeypatch.setattr(training.torch, "compile", compile_with_aot_eager)
    args = ["run", *TINY, "--suites", "training", "--methods", "smet", "--backend", "reference",
            "--compile", "both", "--activation-checkpointing", "both", "--out-dir", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    rows = _rows(tmp_path / "training.csv")
    modes = [(r["compiled"], r["activation_checkpointing"]) for r in rows]
    assert modes == [("False", "False"), ("False", "True"), ("True", "False"), ("True", "True")]
    assert len(compiled) == 2 and all(r["status"] == "ok" and float(r["tokens_per_s"]) > 0 for r in rows)
    plain, checkpointed = rows[0], rows[1]
    assert int(checkpointed["activations_bytes"]) < int(plain["activations_bytes"]) / 2
    assert int(checkpointed["pred_activations_bytes"]) < int(plain["pred_activations_bytes"]) / 2
    for row in rows[:2]:  # the memory model predicts the eager split within 5 %
        assert abs(int(row["pred_activations_bytes"]) / int(row["activations_bytes"]) - 1) < 0.05
    capsys.readouterr()
    assert main(args) == 0
    assert "training: 4 cases, 4 already in" in capsys.readouterr().out
    assert main(["report", "--out-dir", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "### Compiled vs eager" in report and "### Activation checkpointing" in report


@pytest.mark.parametrize("argv, option, message", [
    (["run", "--quick", "--densities", "0.5,,0.2"], "--densities", "empty item in '0.5,,0.2'"),
    (["memory", "--configs", " "], "--configs", "expected a comma-separated list"),
    (["stability", "run", "--seeds", "0,1,"], "--seeds", "empty item in '0,1,'"),
])  # fmt: skip
def test_a_list_option_with_an_empty_item_is_refused_not_read_as_a_shorter_list(tmp_path, capsys, argv, option,
                                                                                 message):
    with pytest.raises(SystemExit) as raised:
        main([*argv, "--out-dir", str(tmp_path)])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert raised.value.code == 2 and f"argument {option}: {message}" in error, error


@pytest.mark.parametrize("argv", [["run", "--quick"], ["gpu-check", "--plan"]])
@pytest.mark.parametrize("seed", ["-1", "4294967296"])
def test_a_seed_smet_train_refuses_is_refused_in_one_line(tmp_path, capsys, argv, seed):
    """A negative seed (torch wrapped it) and one past 2^32 - 1 (torch's 64-bit seed overflowed in every case)."""
    with pytest.raises(SystemExit) as raised:
        main([*argv, f"--seed={seed}", "--out-dir", str(tmp_path)])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert raised.value.code == 2 and error.endswith(f"argument --seed: must be in [0, 4294967295], got {seed}"), error
    assert not any(tmp_path.iterdir())


def test_the_cli_imports_no_smet_kernels_before_it_can_turn_the_interpreter_on():
    """``bench.cli`` sets TRITON_INTERPRET for CPU runs only while smet_kernels is not imported: importing the CLI
    (its option types included) must not import it, and the seed bound it checks is smet-train's."""
    from bench.options import MAX_SEED
    from smet_kernels.train.config import MAX_SEED as TRAIN_MAX_SEED

    code = "import sys, bench.cli; print(sorted(m for m in sys.modules if m.startswith('smet_kernels')))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr
    assert MAX_SEED == TRAIN_MAX_SEED


@pytest.mark.parametrize("cuda, device, backend, imported, interpreted", [
    (False, None, "auto", False, True), (False, None, "triton", False, True), (True, "cpu", "auto", False, True),
    (True, "cpu:0", "auto", False, True), (False, "cpu", "reference", False, False), (True, None, "auto", False, False),
    (True, "cuda:0", "triton", False, False), (False, "cpu", "auto", True, False),
])  # fmt: skip
def test_a_cpu_run_turns_the_triton_interpreter_on_unless_it_runs_the_reference_ops(monkeypatch, cuda, device,
                                                                                     backend, imported, interpreted):
    """A run on a CPU (no GPU, or ``--device cpu``) of the Triton kernels turns the interpreter on, before
    smet_kernels is imported: once imported, its kernels are decorated already and it is left alone."""
    import torch

    from bench import cli

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    if not imported:
        monkeypatch.delitem(sys.modules, "smet_kernels")
    cli._prepare_interpreter(device, backend)
    assert os.environ.get("TRITON_INTERPRET") == ("1" if interpreted else None)


def _handed_cases(monkeypatch, argv: list[str]) -> tuple[dict, list[int]]:
    """The cases ``smet-bench argv`` (on the CPU reference ops) hands each suite, nothing measured, and the steps
    its first training case's measurement is called with."""
    from bench import cli, training

    suites, measured = {}, []

    def record(suite, cases, run_one, *args):
        suites[suite] = cases
        if suite == "training":
            run_one(cases[0])
        return 0

    monkeypatch.setattr(cli, "run_cases", record)
    monkeypatch.setattr(training, "run_case", lambda case, device, backend, steps, seed: measured.append(steps))
    assert main([*argv, "--device", "cpu", "--backend", "reference", "--no-progress"]) == 0
    return suites, measured


@pytest.mark.parametrize("quick, configs, densities, block_sizes, tokens, training_grid, steps", [
    ([], {"20m", "60m", "130m", "350m", "1b", "7b"}, {0.5, 0.25, 0.1, 0.05}, {32, 64, 128}, {8192, 16384},
     ({"60m", "130m", "350m", "1b"}, {0.5, 0.25, 0.1}, 64, 16, 256), 10),
    (["--quick"], {"tiny"}, {0.5, 0.25}, {32}, {64}, ({"tiny"}, {0.5, 0.25, 0.1}, 32, 2, 32), 3),
])
def test_the_run_grid_of_each_suite_defaults_to_what_its_help_states(tmp_path, monkeypatch, quick, configs, densities,
                                                                     block_sizes, tokens, training_grid, steps):
    """The cases each suite is handed, without and with ``--quick`` (nothing measured: a training case's steps are
    those its measurement is called with), in eager mode without activation checkpointing, fp32 on a CPU."""
    import torch

    suites, measured = _handed_cases(monkeypatch, ["run", *quick, "--out-dir", str(tmp_path)])
    for suite in ("kernels", "optimizer"):
        sparse = [c for c in suites[suite] if c.block_size]
        assert {c.shape.label.split(":")[0] for c in suites[suite]} == configs, suite
        assert ({c.density for c in sparse}, {c.block_size for c in sparse}) == (densities, block_sizes), suite
    assert {c.M for c in suites["kernels"]} == tokens
    assert {c.dtype for c in [*suites["kernels"], *suites["training"]]} == {torch.float32}  # on a CPU
    cases = suites["training"]
    assert {c.config for c in cases} == training_grid[0]
    assert {c.density for c in cases if c.method == "smet"} == training_grid[1]
    assert {(c.block_size, c.batch_size, c.seq_len, c.compiled, c.activation_checkpointing) for c in cases} == {
        (*training_grid[2:], False, False)}
    assert measured == [steps]


@pytest.mark.parametrize("compiled, checkpointed", [("on", "off"), ("off", "on"), ("on", "both")])
def test_each_training_case_runs_in_the_modes_on_selects_or_in_both_side_by_side(tmp_path, monkeypatch, compiled,
                                                                                  checkpointed):
    argv = ["run", "--quick", "--suites", "training", "--methods", "dense", "--compile", compiled,
            "--activation-checkpointing", checkpointed, "--out-dir", str(tmp_path)]  # fmt: skip
    modes = {"on": [True], "off": [False], "both": [False, True]}
    suites, _ = _handed_cases(monkeypatch, argv)
    assert [(c.compiled, c.activation_checkpointing) for c in suites["training"]] == [
        (a, b) for a in modes[compiled] for b in modes[checkpointed]]
