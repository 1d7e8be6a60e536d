"""smet-bench report and memory on odd results folders: files lacking columns, several machines in one folder."""

import warnings

import pytest
from conftest import usage_error
from test_bench_report import CPU, CUDA, _kernel_rows, _render, _section_table, _training_rows, _write

from bench.cli import main
from bench.report import write_report
from bench.results import KERNEL_COLUMNS, TRAINING_COLUMNS, RepeatedRowWarning, TornRowWarning


@pytest.mark.parametrize("name, columns, rows, lost", [
    ("kernels.csv", KERNEL_COLUMNS, _kernel_rows(CPU), "gpu"),
    ("training.csv", TRAINING_COLUMNS, _training_rows(CPU), "weights_bytes"),
])
def test_a_results_file_lacking_a_column_stops_the_report_in_one_line_naming_the_file_and_the_column(
        tmp_path, capsys, name, columns, rows, lost):
    rows = [{k: v for k, v in row.items() if k != lost} for row in rows]
    _write(tmp_path / name, [c for c in columns if c != lost], rows)
    error = usage_error(main, ["report", "--out-dir", str(tmp_path)], capsys)
    assert error.startswith(f"smet-bench: error: {tmp_path / name} lacks the columns ['{lost}']"), error
    assert not (tmp_path / "report.md").exists()


def test_a_training_file_lacking_a_column_beside_the_memory_folder_stops_the_memory_grid_in_one_line(tmp_path,
                                                                                                    capsys):
    (tmp_path / "edited").mkdir()
    rows = [{k: v for k, v in row.items() if k != "gpu"} for row in _training_rows(CPU)]
    _write(tmp_path / "edited" / "training.csv", [c for c in TRAINING_COLUMNS if c != "gpu"], rows)
    argv = ["memory", "--configs", "20m", "--methods", "dense", "--batch-shapes", "1x32", "--vocab-sizes", "256",
            "--state-dtypes", "bf16", "--activation-checkpointing", "off", "--measure-configs", "", "--no-progress",
            "--out-dir", str(tmp_path / "memory-scaling")]  # fmt: skip
    error = usage_error(main, argv, capsys)
    assert error.startswith(f"smet-bench: error: {tmp_path / 'edited' / 'training.csv'} lacks the columns ['gpu']")


def test_training_steps_of_two_machines_name_their_device_and_the_plots_show_one_machine_unaveraged(tmp_path,
                                                                                                   monkeypatch):
    """CPU rows (accounted peaks 6, 7, 7, 5 MiB) and H100 rows at batch 4 (allocator peaks 7, 8, 8, 6 MiB) in one
    training.csv: the table said neither machine nor batch (only the first row's), so a case's two rows looked
    alike, and the plots drew the mean of the two machines (6.5 MiB for dense)."""
    _write(tmp_path / "training.csv", TRAINING_COLUMNS,
           _training_rows(CPU) + [row | {"batch_size": 4} for row in _training_rows(CUDA)])  # fmt: skip
    report, figures = _render(tmp_path, monkeypatch)
    steps = _section_table(report, "## End-to-end training step")
    assert steps[0][:3] == ["device", "setting", "config"]
    assert [(row[0], row[1].split(",")[0]) for row in steps[1:]] == [(CUDA["gpu"], "batch 4 × sequence 32")] * 4 + [
        (CPU["gpu"], "batch 2 × sequence 32")] * 4  # fmt: skip
    assert f"The plots show the steps on {CUDA['gpu']} at batch 4 × sequence 32, fp32" in report  # the first
    model = _section_table(report, "## Memory model: predicted vs measured")
    per_case = model[model.index(["device", "config", "method", "component", "measured", "predicted", "error"]):]
    assert {row[0] for row in per_case[2:]} == {CPU["gpu"], CUDA["gpu"]}  # past the header and its rule
    (axis,) = figures["peak_memory_vs_model.png"].axes
    assert sorted(y for line in axis.get_lines() for y in line.get_ydata()) == [6.0, 7.0, 8.0, 8.0]


def test_a_case_written_twice_on_one_machine_is_reported_once_with_its_later_row_and_a_warning(tmp_path):
    """Two runs appending to one folder at once (or joined files) wrote a case twice: the report listed both rows
    and counted both in the geometric means, where a resumed run keeps the later."""
    rows = _kernel_rows(CPU)
    forward = next(row for row in rows if row["op"] == "forward" and row["provider"] == "triton_grouped")
    rows.append(forward | {"ms_p20": 40, "ms_p50": 40, "ms_p80": 41, "timestamp": "2026-01-02T00:00:00"})
    _write(tmp_path / "kernels.csv", KERNEL_COLUMNS, rows)
    with pytest.warns(RepeatedRowWarning, match="kernels.csv: 1 row.s. measure the same case on the same machine"):
        report = write_report(tmp_path).read_text()
    summary = _section_table(report, "## Kernels")
    header = summary[0]
    forward = [dict(zip(header, row)) for row in summary[1:]
               if row[header.index("op")] == "forward" and row[header.index("provider")] == "triton_grouped"]
    assert [(row["vs dense"], row["cases"]) for row in forward] == [("4e+03", "1")]  # 40 ms over the dense 0.01


@pytest.mark.parametrize("category", [RepeatedRowWarning, TornRowWarning])
def test_smet_bench_prints_a_warning_about_left_out_rows_in_one_line(tmp_path, capsys, monkeypatch, category):
    """Python's format took two lines, the second the source line that warned."""
    import bench.cli

    def warns(argv):
        warnings.warn(f"{tmp_path / 'kernels.csv'}: a row is left out", category)
        return 0

    monkeypatch.setattr(bench.cli, "_main", warns)
    assert main(["report", "--out-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().err == f"smet-bench: warning: {tmp_path / 'kernels.csv'}: a row is left out\n"


def test_the_kernel_plot_shows_the_library_providers_when_a_torch_baseline_row_comes_first(tmp_path, monkeypatch):
    """The plot kept the backend of the first row of the largest shape: a masked_dense row first (measured by an
    earlier run) left only the torch baselines in it."""
    rows = sorted(_kernel_rows(CPU), key=lambda row: row["provider"] != "masked_dense")
    _write(tmp_path / "kernels.csv", KERNEL_COLUMNS, rows)
    _, figures = _render(tmp_path, monkeypatch)
    forward = figures["kernel_time_vs_density.png"].axes[0]
    assert {"masked_dense", "triton_grouped"} <= set(forward.get_legend_handles_labels()[1])


def test_optimizer_steps_of_two_machines_name_their_device(tmp_path):
    """The same AdamW case on a CPU (1 ms) and a GPU (0.01 ms): two rows alike but for their times."""
    rows = []
    for machine, ms in ((CPU, 1.0), (CUDA, 0.01)):
        case = {"suite": "optimizer", "shape": "dense:tiny:gate_up", "K": 64, "N": 128, "dtype": "fp32",
                "status": "ok", "backend": "torch", "density": 1, **machine, "torch": "2.4", "triton": "3.0",
                "timestamp": "2026-01-01T00:00:00"}  # fmt: skip
        rows += [case | {"op": "copy", "provider": "device_copy", "ms_p20": ms, "ms_p50": ms, "ms_p80": ms},
                 case | {"op": "adamw", "provider": "torch_adamw_fused", "ms_p20": ms, "ms_p50": ms, "ms_p80": ms}]
    _write(tmp_path / "kernels.csv", KERNEL_COLUMNS, rows)
    steps = _section_table(write_report(tmp_path).read_text(), "## Optimizer step")
    assert steps[0][0] == "device"
    assert [(row[0], row[steps[0].index("ms")]) for row in steps[1:]] == [(CUDA["gpu"], "0.01 [0.01–0.01]"),
                                                                          (CPU["gpu"], "1 [1–1]")]  # fmt: skip


def test_the_mode_tables_and_the_cases_not_measured_of_two_machines_name_their_device(tmp_path, monkeypatch):
    from test_bench_report import _mode_rows

    gpu = {"gpu": "NVIDIA H200", "device": "cuda"}
    rows = _mode_rows() + [row | gpu for row in _mode_rows()]
    rows += [row | {"method": "masked", "density": 0.1, "status": "oom", "note": "out of memory"}
             for row in (rows[0], rows[0] | gpu)]
    _write(tmp_path / "training.csv", TRAINING_COLUMNS, rows)
    report, _ = _render(tmp_path, monkeypatch)
    for heading in ("### Compiled vs eager", "### Activation checkpointing", "Cases not measured:"):
        table = _section_table(report, heading)
        devices = {row[0] for row in table[1:] if len(row) == len(table[0])}
        assert table[0][0] == "device" and devices == {CUDA["gpu"], gpu["gpu"]}, heading


def test_a_dense_or_copy_time_of_zero_gives_no_ratio_rather_than_an_infinite_one():
    """A cublas_dense row timed at 0 ms was the baseline of its sparse rows: `vs dense` and `vs d×dense` read inf (and
    so did their geometric means); a copy at 0 ms made the roofline the d × dense line alone, and `% copy` 0."""
    import pandas as pd

    from bench.report import kernel_comparison
    from bench.report.sections import optimizer_section

    base = {"shape": "s", "M": 64, "K": 64, "N": 64, "dtype": "bf16", "ms_p20": None, "ms_p80": None, "gpu": "h100",
            "backend": "torch", "status": "ok", "note": "", "nnz_blocks": 2, "block_size": 32, "density": 0.5}
    frame = pd.DataFrame([base | row for row in (
        {"suite": "kernels", "op": "forward", "provider": "cublas_dense", "ms_p50": 0.0, "block_size": None},
        {"suite": "kernels", "op": "forward", "provider": "triton_grouped", "ms_p50": 0.5},
        {"suite": "optimizer", "op": "copy", "provider": "device_copy", "shape": "dense:s", "ms_p50": 0.0},
        {"suite": "optimizer", "op": "adamw", "provider": "smet_adamw", "shape": "dense:s", "ms_p50": 0.1, "gbps": 1.0},
    )])  # fmt: skip
    sparse = kernel_comparison(frame)
    assert sparse[["vs_dense", "vs_d_dense", "vs_roofline"]].isna().all(axis=None)
    text = optimizer_section(frame)[4]
    assert "`copy GB/s`, `% copy`" in text and " inf " not in text  # both left out: empty in every row


def test_the_kernel_detail_table_names_the_dtype_when_a_folder_holds_several(tmp_path, monkeypatch):
    """A folder measured in fp32 and (--dtype) fp16 listed each case twice in "All kernel measurements", the two rows
    alike but for their times: nothing said which time was which dtype."""
    rows = _kernel_rows(CPU)
    _write(tmp_path / "kernels.csv", KERNEL_COLUMNS, rows + [row | {"dtype": "fp16"} for row in rows])
    report, _ = _render(tmp_path, monkeypatch)
    detail = _section_table(report, "### All kernel measurements")
    assert detail[0][:2] == ["dtype", "op"]
    assert sorted(row[0] for row in detail[2:] if row[1] == "forward" and "triton_grouped" in row) == ["fp16", "fp32"]


def test_the_optimizer_table_names_the_backend_when_smet_adamw_ran_with_both(tmp_path):
    """smet_adamw rows of --backend reference and of the Triton backend in one folder were two rows alike but for
    their times: the optimizer table had no backend column."""
    import pandas as pd

    from bench.report.sections import optimizer_section

    base = {"suite": "optimizer", "op": "adamw", "provider": "smet_adamw", "shape": "compact:s", "N": 64, "K": 64,
            "block_size": 32, "density": 0.5, "dtype": "fp32", "gpu": "cpu", "ms_p20": None, "ms_p80": None,
            "gbps": 1.0, "status": "ok", "note": ""}  # fmt: skip
    frame = pd.DataFrame([base | {"backend": "reference", "ms_p50": 2.0}, base | {"backend": "triton", "ms_p50": 9.0},
                          base | {"provider": "torch_adamw_fused", "backend": "torch", "ms_p50": 1.0}])
    lines = [line for line in optimizer_section(frame)[4].splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[1:]]
    assert {(row["backend"], row["ms"]) for row in rows if row["provider"] == "smet_adamw"} == {("reference", "2"),
                                                                                               ("triton", "9")}


def test_the_optimizer_table_leaves_out_a_step_that_failed_its_check():
    """A wrong step's time is listed under "Not measured or flagged", not as a throughput beside the others."""
    import pandas as pd

    from bench.report.sections import optimizer_section, skipped_section

    base = {"suite": "optimizer", "op": "adamw", "provider": "smet_adamw", "shape": "compact:s", "N": 64, "K": 64,
            "block_size": 32, "density": 0.5, "dtype": "fp32", "gpu": "cpu", "backend": "triton", "ms_p20": None,
            "ms_p80": None, "ms_p50": 1.0, "gbps": 1.0, "status": "ok", "note": ""}  # fmt: skip
    frame = pd.DataFrame([base | {"status": "wrong", "note": "max error 1 > 1e-07"},
                          base | {"provider": "torch_adamw_fused", "backend": "torch", "ms_p50": 3.0}])
    table = optimizer_section(frame)[4]
    assert "torch_adamw_fused" in table and "smet_adamw" not in table
    assert "max error 1 > 1e-07" in "\n".join(skipped_section(frame, None))


def test_the_training_plots_show_one_smet_backend_not_the_mean_of_two(tmp_path, monkeypatch):
    """smet rows of --backend reference beside the Triton ones: seaborn drew their mean as the smet line of the
    throughput plot, a number no run measured; the plots now keep one smet backend (Triton where measured)."""
    rows = _training_rows(CPU)
    smet = next(row for row in rows if row["method"] == "smet")
    rows.append(smet | {"backend": "reference", "tokens_per_s": 64000})
    _write(tmp_path / "training.csv", TRAINING_COLUMNS, rows)
    _, figures = _render(tmp_path, monkeypatch)
    (axis,) = figures["throughput_vs_density.png"].axes
    smet_line = next(line for line in axis.get_lines() if 0.5 in list(line.get_xdata())
                     and len(line.get_xdata()) == 1)
    assert list(smet_line.get_ydata()) == [16000]


def test_the_kernel_plot_leaves_out_a_wrong_results_time_as_the_summary_does(tmp_path, monkeypatch):
    """A triton_grouped row whose result disagreed with the dense computation (status wrong, 1000× faster) was drawn
    as a point of its provider's line, where the summary table leaves it out."""
    rows = _kernel_rows(CPU)
    wrong = next(row for row in rows if row["provider"] == "triton_grouped" and row["op"] == "forward")
    rows.append(wrong | {"density": 0.25, "nnz_blocks": 1, "status": "wrong", "ms_p20": 0.001, "ms_p50": 0.00123,
                         "ms_p80": 0.002})  # fmt: skip
    _write(tmp_path / "kernels.csv", KERNEL_COLUMNS, rows)
    _, figures = _render(tmp_path, monkeypatch)
    forward = figures["kernel_time_vs_density.png"].axes[0]
    assert all(0.00123 not in list(line.get_ydata()) for line in forward.get_lines())
