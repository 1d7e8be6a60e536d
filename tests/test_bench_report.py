"""smet-bench report on hand-made CSVs: what it says about CPU rows, the dense baseline, empty columns, noise, plots."""

import csv
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from bench.report import write_report
from bench.results import KERNEL_COLUMNS, TRAINING_COLUMNS

CPU = {"gpu": "cpu-x86_64-2cores", "device": "cpu"}
CUDA = {"gpu": "NVIDIA H100 80GB HBM3", "device": "cuda"}
MiB = 2**20


def _write(path: Path, columns: list[str], rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def _kernel_rows(machine: dict) -> list[dict]:
    """The dense baseline, triton_grouped and masked_dense per op; no triton_grouped for grad_weight; its forward
    time is noisy."""
    rows = []
    for op in ("forward", "grad_input", "grad_weight"):
        shape = {"suite": "kernels", "op": op, "shape": "tiny:qkvo", "M": 64, "K": 64, "N": 64, "dtype": "fp32",
                 "status": "ok", **machine, "torch": "2.4", "triton": "3.0", "timestamp": "2026-01-01T00:00:00"}  # fmt: skip
        rows.append(shape | {"provider": "cublas_dense", "density": 1, "backend": "torch", "ms_p20": 0.01,
                             "ms_p50": 0.01, "ms_p80": 0.011})  # fmt: skip
        sparse = [("masked_dense", "torch", (0.02, 0.02, 0.021))]
        if op != "grad_weight":
            sparse.insert(0, ("triton_grouped", "triton", (10, 20, 30) if op == "forward" else (20, 20, 21)))
        for provider, backend, (p20, p50, p80) in sparse:
            rows.append(shape | {"provider": provider, "backend": backend, "block_size": 32, "density": 0.5,
                                 "nnz_blocks": 2, "ms_p20": p20, "ms_p50": p50, "ms_p80": p80, "tflops": 0.01})  # fmt: skip
    return rows


def _training_rows(machine: dict) -> list[dict]:
    """dense, two masked densities with equal peaks, and smet; CUDA rows also carry the allocator and NVML peaks."""
    rows = []
    for method, density, backend, weights in (
        ("dense", 1, "torch", 2),
        ("masked", 0.5, "torch", 3),
        ("masked", 0.25, "torch", 3),
        ("smet", 0.5, "triton", 1),
    ):
        components = {"weights": weights * MiB, "gradients": MiB, "optimizer": 2 * MiB, "activations": MiB}
        row = {"config": "tiny", "method": method, "density": density, "block_size": 32, "batch_size": 2,
               "seq_len": 32, "dtype": "fp32", "backend": backend, "steps": 3, "ms_p20": 4, "ms_p50": 4,
               "ms_p80": 4.2, "tokens_per_s": 16000, "status": "ok", **machine, "torch": "2.4", "triton": "3.0",
               "timestamp": "2026-01-01T00:00:10"}  # fmt: skip
        row |= {f"{c}_bytes": v for c, v in components.items()} | {f"pred_{c}_bytes": v for c, v in components.items()}
        if machine["device"] == "cuda":
            peak = sum(components.values()) + MiB
            row |= {"peak_allocated_bytes": peak, "nvml_peak_bytes": peak + MiB, "rest_bytes": MiB,
                    "pred_peak_bytes": peak, "nvml_status": "ok"}  # fmt: skip
        else:
            row["nvml_status"] = "unavailable: device is cpu"
        rows.append(row)
    return rows


def _report(out_dir: Path, machine: dict, monkeypatch) -> tuple[str, dict]:
    """The report's text and its figures by file name."""
    _write(out_dir / "kernels.csv", KERNEL_COLUMNS, _kernel_rows(machine))
    _write(out_dir / "training.csv", TRAINING_COLUMNS, _training_rows(machine))
    return _render(out_dir, monkeypatch)


def _render(out_dir: Path, monkeypatch) -> tuple[str, dict]:
    """The report of ``out_dir`` and its figures by file name."""
    figures = {}
    savefig = Figure.savefig

    def keep(figure, path, *args, **kwargs):
        figures[Path(path).name] = figure
        return savefig(figure, path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Figure, "savefig", keep)
        return write_report(out_dir).read_text(), figures


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory):
    with pytest.MonkeyPatch.context() as monkeypatch:
        return _report(tmp_path_factory.mktemp("cpu"), CPU, monkeypatch)


@pytest.fixture(scope="module")
def cuda_report(tmp_path_factory):
    with pytest.MonkeyPatch.context() as monkeypatch:
        return _report(tmp_path_factory.mktemp("cuda"), CUDA, monkeypatch)


def _table_header(report: str, first_column: str) -> list[str]:
    line = next(line for line in report.splitlines() if line.startswith(f"| {first_column} "))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_cpu_rows_say_the_triton_times_are_interpreted(cpu_report, cuda_report):
    report, _ = cpu_report
    kernels = report.split("## Kernels")[1].split("### All kernel")[0]
    assert "Triton CPU interpreter" in kernels and "not representative of GPU speed" in kernels
    assert "backend `triton` (triton_grouped)" in kernels
    assert "backend `triton` (smet d=0.5)" in report.split("## End-to-end")[1]
    assert "interpreter" not in cuda_report[0]


def test_dense_baseline_is_named_by_what_ran(cpu_report, cuda_report):
    report, figures = cpu_report
    assert "dense torch (CPU)" in report and "cuBLAS" not in report
    legend = [t.get_text() for t in figures["kernel_time_vs_density.png"].axes[0].get_legend().get_texts()]
    assert "dense torch (CPU)" in legend and "cublas_dense" not in legend
    assert "cuBLAS dense" in cuda_report[0] and "dense torch (CPU)" not in cuda_report[0]


def test_environment_column_is_device(cpu_report):
    assert _table_header(cpu_report[0], "device") == ["device", "torch", "triton"]
    assert "| gpu " not in cpu_report[0]


def test_columns_empty_in_every_row_are_left_out(cpu_report, cuda_report):
    header = _table_header(cpu_report[0], "config")
    assert "nvml peak" not in header and "rest" not in header and "weights" in header
    assert "Empty in every row, so left out: `nvml peak`, `rest`." in cpu_report[0]
    assert {"nvml peak", "rest"} <= set(_table_header(cuda_report[0], "config"))


def test_an_nvml_peak_whose_sampler_failed_mid_run_reads_as_a_lower_bound_with_its_reason(tmp_path, monkeypatch):
    """NVML failing mid-step keeps the peak up to the failure: the table showed it as the step's NVML peak."""
    rows = _training_rows(CUDA)
    rows[0]["nvml_status"] = "failed: NVMLError: GPU is lost"
    _write(tmp_path / "training.csv", TRAINING_COLUMNS, rows)
    report, _ = _render(tmp_path, monkeypatch)
    steps = _section_table(report, "## End-to-end training step")
    nvml = {row[1]: row[steps[0].index("nvml peak")] for row in steps[1:]}
    assert nvml == {"dense": "≥ 8.00 MiB (failed: NVMLError: GPU is lost)", "masked d=0.5": "9.00 MiB",
                    "masked d=0.25": "9.00 MiB", "smet d=0.5": "7.00 MiB"}


def test_noisy_timings_are_marked_with_a_footnote(cpu_report):
    report = cpu_report[0]
    assert "| 20† [10–30] " in report  # p80 / p20 = 3
    assert "| 20 [20–21] " in report and "0.02 [0.02–0.021]" in report  # quiet rows stay unmarked
    assert report.count("† noisy: p80 / p20 > 1.5") == 1
    assert "† noisy" not in report.split("## End-to-end training step")[1]  # the step times are quiet
    forward_triton = next(line for line in report.splitlines() if line.startswith("| forward     | triton_grouped "))
    assert forward_triton.split("|")[-2].strip() == "1 (1†)"  # the summary's cases column


def test_kernel_plot_has_one_palette_and_a_log_axis(cpu_report):
    axes = cpu_report[1]["kernel_time_vs_density.png"].axes
    colours = {}
    for axis in axes:
        assert axis.get_yscale() == "log"
        legend = axis.get_legend()
        for text, handle in zip(legend.get_texts(), legend.legend_handles):
            colours.setdefault(text.get_text(), set()).add(tuple(handle.get_color()))
    assert set(colours) >= {"triton_grouped", "masked_dense"}
    assert all(len(c) == 1 for c in colours.values()), colours  # masked_dense is alone in the grad_weight panel
    assert colours["triton_grouped"] != colours["masked_dense"]


def test_peak_plot_keeps_methods_with_equal_peaks_apart(cpu_report):
    (axis,) = cpu_report[1]["peak_memory_vs_model.png"].axes
    points = [(x, y) for line in axis.get_lines() for x, y in zip(line.get_xdata(), line.get_ydata())]
    assert len(points) == 4 and len({x for x, _ in points}) == 4  # masked d=0.5 and d=0.25 share a peak
    assert len({line.get_marker() for line in axis.get_lines() if len(line.get_xdata())}) == 4


def test_vs_roofline_uses_the_copy_bandwidth_of_the_same_run():
    """A memory-bound sparse op: its roofline is the compulsory bytes at the run's device-copy bandwidth."""
    import pandas as pd

    from bench.report import kernel_comparison
    from profiling.roofline import compulsory_bytes, expected_used_lines

    shape = {"suite": "kernels", "shape": "x:qkvo", "M": 8192, "K": 1024, "N": 1024, "dtype": "bf16",
             "status": "ok", **CUDA, "ms_p20": 1.0, "ms_p80": 1.0}  # fmt: skip
    rows = [
        shape | {"op": "forward", "provider": "cublas_dense", "density": 1.0, "ms_p50": 0.030},
        shape | {"op": "forward", "provider": "triton_grouped", "density": 0.1, "block_size": 128, "nnz_blocks": 6,
                 "ms_p50": 0.020},  # fmt: skip
        {"suite": "optimizer", "op": "copy", "provider": "device_copy", "shape": "dense:1b", "N": 2048,
         "K": 2048, "ms_p50": 0.0112, **CUDA},  # fmt: skip: 2048² × 8 bytes in 11.2 µs = 3.0 TB/s
    ]
    row = kernel_comparison(pd.DataFrame(rows)).iloc[0]
    used = expected_used_lines(8, 8, 6)
    memory_ms = compulsory_bytes("forward", 8192, 1024, 1024, 128, 6, 2, used, used) / 2048**2 / 8 * 0.0112
    assert row["roofline_ms"] == pytest.approx(max(memory_ms, 6 / 64 * 0.030))
    assert row["roofline_ms"] == pytest.approx(memory_ms)  # the output write dominates at d = 0.1
    assert row["vs_roofline"] == pytest.approx(0.020 / memory_ms)
    without_copy = kernel_comparison(pd.DataFrame(rows[:2])).iloc[0]
    assert pd.isna(without_copy["vs_roofline"])
    without_dense = kernel_comparison(pd.DataFrame(rows[1:])).iloc[0]  # no compute ceiling: no roofline either
    assert pd.isna(without_dense["vs_roofline"])


def test_summary_keeps_backends_and_dtypes_apart(tmp_path):
    """A folder that holds triton and reference rows (or two dtypes) must not average them into one line."""
    rows = _kernel_rows(CPU)
    rows += [row | {"backend": "reference", "ms_p20": 0.04, "ms_p50": 0.04, "ms_p80": 0.041}
             for row in rows if row["provider"] == "triton_grouped"]  # fmt: skip
    _write(tmp_path / "kernels.csv", KERNEL_COLUMNS, rows)
    report = write_report(tmp_path).read_text()
    header = _table_header(report, "op")
    assert "backend" in header
    forward = [line for line in report.splitlines() if line.startswith("| forward ") and "| triton_grouped " in line]
    assert {line.split("|")[header.index("backend") + 1].strip() for line in forward[:2]} == {"triton", "reference"}


def test_without_mode_rows_there_are_no_mode_tables(cpu_report, cuda_report):
    for report, _ in (cpu_report, cuda_report):
        assert "### Compiled vs eager" not in report and "### Activation checkpointing" not in report
        assert "mode" not in _table_header(report, "config")


def _mode_rows() -> list[dict]:
    """The CUDA rows of dense and smet d=0.5, then each compiled (twice the tokens/s) and checkpointed (activations
    and peak down by 3/4 MiB, predicted by the same, 3/4 the tokens/s)."""
    rows = []
    for row in _training_rows(CUDA):
        if row["method"] == "masked":
            continue
        rows.append(row | {"compiled": False, "activation_checkpointing": False})
        rows.append(row | {"compiled": True, "activation_checkpointing": False, "tokens_per_s": 32000})
        saved = 3 * MiB // 4
        rows.append(row | {"compiled": False, "activation_checkpointing": True, "tokens_per_s": 12000,
                           "activations_bytes": MiB - saved, "pred_activations_bytes": MiB - saved,
                           "peak_allocated_bytes": row["peak_allocated_bytes"] - saved,
                           "pred_peak_bytes": row["pred_peak_bytes"] - saved})  # fmt: skip
    return rows


def _section_table(report: str, heading: str) -> list[list[str]]:
    section = report.split(heading)[1].split("\n#")[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_compiled_and_checkpointed_rows_compare_side_by_side(tmp_path, monkeypatch):
    _write(tmp_path / "training.csv", TRAINING_COLUMNS, _mode_rows())
    report, figures = _render(tmp_path, monkeypatch)
    steps = _section_table(report, "## End-to-end training step")
    assert steps[0][:3] == ["config", "method", "mode"]
    assert [row[2] for row in steps[1:4]] == ["eager", "eager + ckpt", "compiled"]
    compiled = _section_table(report, "### Compiled vs eager")
    assert compiled[0] == ["config", "method", "backend", "eager tokens/s", "compiled tokens/s", "compiled / eager"]
    assert [row[1] for row in compiled[1:]] == ["dense", "smet d=0.5"]
    assert all(row[-3:] == ["1.6e+04", "3.2e+04", "2"] for row in compiled[1:])
    checkpointed = _section_table(report, "### Activation checkpointing")
    header = checkpointed[0]
    assert header[:5] == ["config", "method", "peak", "peak ckpt", "ckpt / not"]
    dense = dict(zip(header, checkpointed[1]))
    assert (dense["peak"], dense["peak ckpt"], dense["ckpt / not"]) == ("7.00 MiB", "6.25 MiB", "0.893")
    assert (dense["predicted peak"], dense["predicted ckpt"]) == ("7.00 MiB", "6.25 MiB")
    assert (dense["activations"], dense["activations ckpt"], dense["tokens/s ckpt / not"]) == ("1.00 MiB",
                                                                                              "256.00 KiB", "0.75")
    model = report.split("## Memory model")[1]
    assert "Eager steps only" in model and "| dense + ckpt " in model
    (axis,) = figures["peak_memory_vs_model.png"].axes  # one point per method: the eager rows
    assert sum(len(line.get_xdata()) for line in axis.get_lines()) == 2


def _comparison(rows: list[dict]):
    import pandas as pd

    from bench.report import kernel_comparison

    timed = {"ms_p20": 1.0, "ms_p80": 1.0}  # no noise
    return kernel_comparison(pd.DataFrame([timed | row for row in rows])).set_index("op")


def test_vs_d_dense_and_the_compute_roofline_use_the_exact_density_of_the_layout():
    """Asked for d = 0.1, drawn as 8 of 64 blocks (d = 0.125); the copy is so fast that compute sets the roofline."""
    shape = {"suite": "kernels", "shape": "x:qkvo", "M": 8192, "K": 1024, "N": 1024, "dtype": "bf16", "status": "ok",
             **CUDA}  # fmt: skip
    row = _comparison([
        shape | {"op": "forward", "provider": "cublas_dense", "density": 1.0, "ms_p50": 0.040},
        shape | {"op": "forward", "provider": "triton_grouped", "density": 0.1, "block_size": 128, "nnz_blocks": 8,
                 "ms_p50": 0.010},
        {"suite": "optimizer", "op": "copy", "provider": "device_copy", "shape": "dense:1b", "N": 2048, "K": 2048,
         "ms_p50": 1e-6, **CUDA},
    ]).loc["forward"]  # fmt: skip
    assert row["exact_density"] == 0.125
    assert row["vs_d_dense"] == pytest.approx(0.010 / (0.125 * 0.040))  # 2.0
    assert row["roofline_ms"] == pytest.approx(0.125 * 0.040)


def test_the_memory_roofline_reads_the_block_rows_or_columns_of_its_op_at_the_best_copy_of_the_run():
    """W [256, 1024] in 128-blocks: 2 block rows of 8, 9 active blocks, so both block rows hold one (9 > 16 − 8) and
    8 · (1 − C(14, 9) / C(16, 9)) = 8 · (1 − 2002 / 11440) = 6.6 block columns are expected to. bf16, M = 1024;
    grad_input reads dy of the used rows, writes dx, reads the values: (1024·2·128 + 1024·1024 + 9·128²) · 2 bytes;
    forward reads x of the used columns, writes y: (1024·6.6·128 + 1024·256 + 9·128²) · 2 bytes. The faster of two
    copies moves 1024² · 8 bytes in 8.388608 µs: 1 TB/s."""
    shape = {"suite": "kernels", "shape": "x:o", "M": 1024, "K": 1024, "N": 256, "dtype": "bf16", "status": "ok",
             **CUDA}  # fmt: skip
    copy = {"suite": "optimizer", "op": "copy", "provider": "device_copy", "shape": "dense:1b", "N": 1024, "K": 1024,
            **CUDA}  # fmt: skip
    rows = [copy | {"ms_p50": 0.008388608}, copy | {"ms_p50": 2 * 0.008388608}]
    for op in ("forward", "grad_input"):
        rows += [shape | {"op": op, "provider": "cublas_dense", "density": 1.0, "ms_p50": 0.001},
                 shape | {"op": op, "provider": "triton_grouped", "density": 0.5, "block_size": 128, "nnz_blocks": 9,
                          "ms_p50": 0.004}]  # fmt: skip
    frame = _comparison(rows)
    assert frame.loc["grad_input", "roofline_ms"] == pytest.approx((1024 * 2 * 128 + 1024 * 1024 + 9 * 128**2) * 2e-9)
    assert frame.loc["forward", "roofline_ms"] == pytest.approx((1024 * 6.6 * 128 + 1024 * 256 + 9 * 128**2) * 2e-9)


def test_vs_dense_uses_the_dense_time_of_the_same_dtype():
    shape = {"suite": "kernels", "shape": "x:qkvo", "op": "forward", "M": 64, "K": 64, "N": 64, "status": "ok", **CUDA}
    row = _comparison([
        shape | {"dtype": "fp32", "provider": "cublas_dense", "density": 1.0, "ms_p50": 4.0},
        shape | {"dtype": "bf16", "provider": "cublas_dense", "density": 1.0, "ms_p50": 2.0},
        shape | {"dtype": "bf16", "provider": "triton_grouped", "density": 0.5, "block_size": 32, "nnz_blocks": 2,
                 "ms_p50": 0.5},
    ]).loc["forward"]  # fmt: skip
    assert (row["dense_ms"], row["vs_dense"]) == (2.0, 0.25)  # the sparse time over the dense one


def test_a_timing_is_noisy_only_when_its_p80_exceeds_1_5_times_its_p20():
    import pandas as pd

    from bench.report.derive import noisy_flags

    frame = pd.DataFrame({"ms_p20": [2.0, 2.0, 0.0, None], "ms_p80": [3.0, 3.2, 1.0, 1.0]})
    assert noisy_flags(frame).tolist() == [False, True, False, False]  # 1.5: not above; 1.6; no p20


def test_the_geometric_mean_leaves_out_missing_and_non_positive_ratios():
    import pandas as pd

    from bench.report.derive import geomean

    assert geomean(pd.Series([1.0, 4.0, None, 0.0, -2.0])) == pytest.approx(2.0)
    assert geomean(pd.Series([0.25, 4.0, 8.0])) == pytest.approx(2.0)


def test_memory_model_errors_are_relative_to_the_measurement_and_summarised_by_their_median(tmp_path,
                                                                                           monkeypatch):
    """Weights predicted 0, +25, +50 and +100 % off the measured 2, 3, 3 and 1 MiB: median |error| 37.5 %
    (not the mean, 43.75 %), max 100 %."""
    rows = _training_rows(CPU)
    for row, factor in zip(rows, (1.0, 1.25, 1.5, 2.0)):
        row["pred_weights_bytes"] = int(row["weights_bytes"] * factor)
    _write(tmp_path / "training.csv", TRAINING_COLUMNS, rows)
    report, _ = _render(tmp_path, monkeypatch)
    model = _section_table(report, "## Memory model: predicted vs measured")
    summary = {row[0]: row for row in model if row[0] in ("weights", "gradients")}
    assert summary["weights"][1:] == ["37.5 %", "100.0 %", "4"]
    assert summary["gradients"][1:] == ["0.0 %", "0.0 %", "4"]
    detail = [row for row in model if len(row) == 6 and row[2] == "weights"]
    assert [row[-1] for row in detail] == ["+0.0 %", "+25.0 %", "+50.0 %", "+100.0 %"]


def test_the_report_leaves_out_a_row_cut_short_by_a_stopped_run_and_names_the_file(tmp_path):
    """A half-written last row was read with the numbers it has (a time cut to its first digits) and NaN for the
    rest; a line holding two rows (an older release appended to a half-written one) stopped the report, or as the
    first row shifted every column (pandas took its extra cells as an index)."""
    from bench.report import load_csv
    from bench.results import TornRowWarning

    rows = [{**row, "ms_p50": 1.2345} for row in _kernel_rows(CUDA)[:3]]
    path = tmp_path / "kernels.csv"
    _write(path, KERNEL_COLUMNS, rows)
    whole = path.read_text().splitlines()
    path.write_text(path.read_text().rstrip("\n")[: -len("1T00:00:00")])  # cut inside the last row
    with pytest.warns(TornRowWarning, match="kernels.csv"):
        frame = load_csv(path)
    assert len(frame) == 2 and (frame["ms_p50"] == 1.2345).all()
    for merged in ([whole[0], whole[1][:-20] + whole[2], whole[3]], [whole[0], whole[1], whole[2][:-20] + whole[3]]):
        path.write_text("\n".join(merged) + "\n")
        with pytest.warns(TornRowWarning, match="kernels.csv.*left out"):
            frame = load_csv(path)
        assert len(frame) == 1 and list(frame.columns) == KERNEL_COLUMNS and frame["ms_p50"].tolist() == [1.2345]


def test_a_note_or_status_that_reads_like_a_missing_value_is_kept_as_text(tmp_path):
    """pandas reads "NA", "None", "null", "n/a" as missing by default: a note saying "n/a" came back empty. Only an
    empty cell is missing (how a NaN is written), and numbers still parse."""
    from bench.report import load_csv

    notes = ["NA", "None", "null", "n/a"]
    rows = [{**row, "note": note, "ms_p50": 1.5} for row, note in zip(_kernel_rows(CUDA), notes)]
    rows[0]["ms_p50"] = None  # written as an empty cell
    path = tmp_path / "kernels.csv"
    _write(path, KERNEL_COLUMNS, rows)
    frame = load_csv(path)
    assert frame["note"].tolist() == notes
    assert frame["ms_p50"].isna().tolist() == [True, False, False, False] and frame["ms_p50"].dtype == float


def test_a_table_cell_of_several_lines_or_with_a_pipe_stays_in_its_row_and_cell():
    """A gpu-check note holds a raised error's message: a Triton compile error's lines ended the markdown row."""
    import pandas as pd

    from bench.markdown import table

    text = table(pd.DataFrame({"status": ["fail", "pass"], "note": ["raised X: line one\nline two | more", ""]}))
    lines = text.splitlines()
    assert len(lines) == 4 and lines[2].count(" | ") == 1 and "line one line two \\| more" in lines[2], text


def test_a_sparse_row_without_a_dense_baseline_has_no_dense_time_and_no_noisy_baseline():
    import pandas as pd

    shape = {"suite": "kernels", "shape": "x:qkvo", "op": "forward", "M": 64, "K": 64, "N": 64, "status": "ok", **CUDA}
    row = _comparison([
        shape | {"dtype": "fp32", "provider": "cublas_dense", "density": 1.0, "ms_p50": 4.0},
        shape | {"dtype": "bf16", "provider": "triton_grouped", "density": 0.5, "block_size": 32, "nnz_blocks": 2,
                 "ms_p50": 0.5},
    ]).loc["forward"]  # fmt: skip
    assert pd.isna(row["dense_ms"]) and pd.isna(row["vs_dense"])
    assert not row["dense_noisy"]


def test_the_plots_show_the_plainest_mode_measured_eager_before_checkpointed_before_compiled():
    import pandas as pd

    from bench.report.derive import plainest_mode

    modes = pd.DataFrame({"compiled": [True, False, True, False],
                          "activation_checkpointing": [True, True, False, False]})  # fmt: skip
    assert plainest_mode(modes).index.tolist() == [3]
    assert plainest_mode(modes.iloc[:3]).index.tolist() == [1]  # eager + ckpt is plainer than compiled
    assert plainest_mode(modes.iloc[[0, 2]]).index.tolist() == [2]


def test_the_kernel_summary_of_two_machines_names_the_device_and_counts_the_noisy_dense_baseline(tmp_path):
    """CPU and CUDA rows in one file; on CUDA the dense forward is noisy (p80 / p20 = 2) and masked_dense also ran
    at d = 0.25: each machine's rows stay apart, the densities in descending order."""
    cuda = _kernel_rows(CUDA)
    dense_forward = next(row for row in cuda if row["op"] == "forward" and row["provider"] == "cublas_dense")
    dense_forward["ms_p80"] = 0.02
    masked_forward = next(row for row in cuda if row["op"] == "forward" and row["provider"] == "masked_dense")
    cuda.append(masked_forward | {"density": 0.25, "nnz_blocks": 1})
    _write(tmp_path / "kernels.csv", KERNEL_COLUMNS, _kernel_rows(CPU) + cuda)
    summary = _section_table(write_report(tmp_path).read_text(), "## Kernels")
    header = summary[0]
    assert header[0] == "device"
    cells = [{name: row[header.index(name)] for name in ("device", "op", "provider", "d", "cases")}
             for row in summary[1:]]  # fmt: skip
    assert [cell["device"] for cell in cells] == [CUDA["gpu"]] * 6 + [CPU["gpu"]] * 5
    forward = [(cell["provider"], cell["d"], cell["cases"]) for cell in cells[:3]]
    assert forward == [("masked_dense", "0.5", "1 (1†)"), ("triton_grouped", "0.5", "1 (2†)"),
                       ("masked_dense", "0.25", "1 (1†)")]  # fmt: skip
    assert [cell["cases"] for cell in cells[6:]] == ["1", "1 (1†)", "1", "1", "1"]  # quiet CPU baselines


def test_memory_errors_leave_out_a_component_not_measured_not_predicted_or_measured_as_zero():
    import pandas as pd

    from bench.report.derive import memory_errors

    row = {"gpu": "cpu", "config": "tiny", "method": "dense", "density": 1.0, "activation_checkpointing": False,
           "weights_bytes": 4.0, "pred_weights_bytes": 5.0, "gradients_bytes": 4.0, "pred_gradients_bytes": None,
           "optimizer_bytes": None, "pred_optimizer_bytes": 8.0, "activations_bytes": 0.0,
           "pred_activations_bytes": 1.0, "peak_allocated_bytes": None, "pred_peak_bytes": 9.0}  # fmt: skip
    errors = memory_errors(pd.DataFrame([row]))
    assert errors[["component", "measured", "predicted", "error"]].values.tolist() == [["weights", 4.0, 5.0, 0.25]]


def test_a_peak_from_one_gib_on_is_plotted_in_gib_and_smaller_ones_in_mib(cpu_report, tmp_path, monkeypatch):
    (axis,) = cpu_report[1]["peak_memory_vs_model.png"].axes
    assert axis.get_ylabel() == "MiB"  # on CPU the accounted 6, 7, 7 and 5 MiB
    assert sorted(y for line in axis.get_lines() for y in line.get_ydata()) == [5.0, 6.0, 7.0, 7.0]
    rows = _training_rows(CUDA)
    rows[0]["peak_allocated_bytes"] = 2**30
    _write(tmp_path / "training.csv", TRAINING_COLUMNS, rows)
    (axis,) = _render(tmp_path, monkeypatch)[1]["peak_memory_vs_model.png"].axes
    assert axis.get_ylabel() == "GiB" and max(y for line in axis.get_lines() for y in line.get_ydata()) == 1.0


def test_training_cases_not_measured_are_listed_apart_and_a_file_of_only_those_says_so(tmp_path, monkeypatch):
    """Only dense measured (one case: the report describes it), the masked and smet cases ran out of memory."""
    rows = [row | ({"status": "oom", "note": "out of memory"} if row["method"] != "dense" else {})
            for row in _training_rows(CPU)]  # fmt: skip
    _write(tmp_path / "training.csv", TRAINING_COLUMNS, rows)
    report = _render(tmp_path, monkeypatch)[0]
    steps = report.split("## End-to-end training step")[1].split("Cases not measured:")[0]
    assert [line.split("|")[2].strip() for line in steps.splitlines() if line.startswith("| tiny ")] == ["dense"]
    not_measured = _section_table(report, "Cases not measured:")
    assert [row[1:] for row in not_measured[1:]] == [
        ["masked", "0.5", "oom", "out of memory"], ["masked", "0.25", "oom", "out of memory"],
        ["smet", "0.5", "oom", "out of memory"]]  # fmt: skip
    flagged = _section_table(report, "## Not measured or flagged")
    assert flagged[1:] == [["masked", "oom", "out of memory", "2"], ["smet", "oom", "out of memory", "1"]]
    _write(tmp_path / "training.csv", TRAINING_COLUMNS, [row | {"status": "oom"} for row in rows])
    steps = _render(tmp_path, monkeypatch)[0].split("## End-to-end training step")[1]
    assert "No training measurements." in steps and "Cases not measured:" not in steps


def test_a_missing_median_is_an_empty_cell_and_a_missing_spread_leaves_the_median_alone():
    from bench.report.tables import fmt_ms

    assert fmt_ms(None) == "" and fmt_ms(float("nan"), 1.0, 3.0) == ""
    assert fmt_ms(2.0, None, None, "†") == "2†" and fmt_ms(2.0, float("nan"), float("nan")) == "2"
    assert fmt_ms(2.0, 1.0, 3.0, "†") == "2† [1–3]"


def test_a_mode_table_says_yes_or_no_for_the_other_mode_where_both_of_its_values_were_measured(tmp_path, monkeypatch):
    """Each case also compiled with checkpointing (twice the checkpointed eager tokens/s)."""
    rows = _mode_rows()
    rows += [row | {"compiled": True, "tokens_per_s": 24000} for row in rows if row["activation_checkpointing"]]
    _write(tmp_path / "training.csv", TRAINING_COLUMNS, rows)
    report, _ = _render(tmp_path, monkeypatch)
    compiled = _section_table(report, "### Compiled vs eager")
    assert compiled[0][:3] == ["config", "method", "act. ckpt"]
    assert [(row[1], row[2], row[-1]) for row in compiled[1:]] == [
        ("dense", "no", "2"), ("dense", "yes", "2"), ("smet d=0.5", "no", "2"), ("smet d=0.5", "yes", "2")]
    checkpointed = _section_table(report, "### Activation checkpointing")
    assert checkpointed[0][2] == "compiled" and [row[2] for row in checkpointed[1:]] == ["no", "yes"] * 2


def test_the_peak_is_the_allocator_peak_where_measured_and_the_four_accounted_components_elsewhere():
    import pandas as pd

    from bench.report.derive import peak_column

    frame = pd.DataFrame({"weights_bytes": [1.0, 1.0], "gradients_bytes": [2.0, 2.0], "optimizer_bytes": [4.0, 4.0],
                          "activations_bytes": [8.0, 8.0], "peak_allocated_bytes": [100.0, None]})  # fmt: skip
    peak, label = peak_column(frame)
    assert peak.tolist() == [100.0, 15.0] and label == "peak allocated where measured, else accounted"
    peak, label = peak_column(frame.assign(peak_allocated_bytes=None))
    assert peak.tolist() == [15.0, 15.0] and label.startswith("accounted: ")
    assert peak_column(frame.assign(peak_allocated_bytes=50.0))[0].tolist() == [50.0, 50.0]


def test_training_steps_list_the_smaller_config_first_and_compiled_steps_alone_have_no_memory_model_comparison(
    tmp_path, monkeypatch
):
    rows = [row | {"config": config, "compiled": True} for config in ("20m", "tiny") for row in _training_rows(CPU)]
    _write(tmp_path / "training.csv", TRAINING_COLUMNS, rows)
    report, _ = _render(tmp_path, monkeypatch)
    steps = _section_table(report, "## End-to-end training step")
    assert [row[0] for row in steps[1:]] == ["tiny"] * 4 + ["20m"] * 4
    model = report.split("## Memory model: predicted vs measured")[1]
    assert "Eager steps only" in model and "No measurements to compare." in model


def test_pytest_benchmark_files_give_a_row_per_benchmark_in_ms_and_other_json_files_are_passed_over(tmp_path):
    import json

    from bench.report.load import load_benchmark_json

    timed = {"name": "test_forward", "group": "fwd", "stats": {"q1": 0.001, "median": 0.002, "q3": 0.004, "rounds": 7},
             "extra_info": {"density": 0.25, "b": 32}}  # fmt: skip
    (tmp_path / "bench.json").write_text(json.dumps({"benchmarks": [timed, {"name": "test_bare", "extra_info": None}]}))
    (tmp_path / "other.json").write_text(json.dumps({"version": 1}))
    (tmp_path / "list.json").write_text("[1, 2]")
    frame = load_benchmark_json([tmp_path / name for name in ("other.json", "bench.json", "list.json")])
    assert frame["file"].tolist() == ["bench.json"] * 2
    forward, bare = frame.to_dict("records")
    assert (forward["name"], forward["group"], forward["rounds"], forward["extra"]) == ("test_forward", "fwd", 7,
                                                                                       "b=32, density=0.25")
    assert [forward[f"ms_{q}"] for q in ("q1", "median", "q3")] == pytest.approx([1.0, 2.0, 4.0])
    assert (bare["name"], bare["group"], bare["rounds"], bare["extra"]) == ("test_bare", "", 0, "")
    assert load_benchmark_json([tmp_path / "other.json"]) is None


def test_the_optimizer_table_splits_the_tensor_from_a_shape_label_holding_a_colon_and_compares_with_its_copy():
    """Shapes ``<tensor>:<config>:<projections>``; the copy of tiny:qkvo moves 8e6 bytes in 0.01 ms (800 GB/s)."""
    import pandas as pd

    from bench.report.sections import optimizer_section

    base = {"suite": "optimizer", "op": "adamw", "gpu": CUDA["gpu"], "backend": "torch", "N": 1000, "K": 1000,
            "ms_p20": 1.0, "ms_p50": 1.0, "ms_p80": 1.0, "status": "ok"}  # fmt: skip
    frame = pd.DataFrame([
        base | {"op": "copy", "provider": "device_copy", "shape": "dense:tiny:qkvo", "ms_p50": 0.01},
        base | {"provider": "torch_adamw", "shape": "dense:tiny:qkvo", "density": 1.0, "gbps": 400.0},
        base | {"provider": "smet_adamw", "shape": "compact:tiny:qkvo", "density": 0.5, "block_size": 32,
                "gbps": 200.0},
        base | {"provider": "smet_adamw", "shape": "compact:tiny:o", "density": 0.5, "block_size": 32, "gbps": 100.0},
    ])  # fmt: skip
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in optimizer_section(frame)[4].splitlines()]
    assert rows[0] == ["shape", "N×K", "tensor", "b", "d", "provider", "ms", "GB/s", "copy GB/s", "% copy"]
    assert [row[:5] + row[-2:] for row in rows[2:]] == [
        ["tiny:o", "1000×1000", "compact", "32", "0.5", "", ""],
        ["tiny:qkvo", "1000×1000", "compact", "32", "0.5", "800", "25"],
        ["tiny:qkvo", "1000×1000", "dense", "", "1", "800", "50"],
    ]
