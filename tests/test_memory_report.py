"""`smet-bench memory`: a small traced grid, the report, GPU rows joining it, one-line errors."""

from pathlib import Path

import pandas as pd
import pytest
from conftest import usage_error

from bench.cli import main
from bench.results import TRAINING_COLUMNS

GRID = ["memory", "--configs", "20m", "--methods", "dense,smet", "--densities", "0.5", "--batch-shapes", "1x32",
        "--vocab-sizes", "256", "--state-dtypes", "bf16", "--activation-checkpointing", "off", "--measure-configs", "",
        "--no-progress"]  # fmt: skip


def _fake_gpu_csv(reports):
    """A GPU training.csv row of the same case as the grid's dense row (allocator peak 1 % above any trace)."""
    row = {c: "" for c in TRAINING_COLUMNS} | {
        "config": "20m", "method": "dense", "density": 1.0, "block_size": 64, "batch_size": 1, "seq_len": 32,
        "dtype": "bf16", "backend": "torch", "peak_allocated_bytes": 123456789, "nvml_peak_bytes": 223456789,
        "status": "ok", "gpu": "NVIDIA H200", "nvml_status": "ok",
    }  # fmt: skip
    (reports / "nvidia-h200").mkdir()
    pd.DataFrame([row], columns=TRAINING_COLUMNS).to_csv(reports / "nvidia-h200" / "training.csv", index=False)


def test_memory_command_traces_models_and_reports_with_gpu_rows(tmp_path, capsys):
    reports = tmp_path / "reports"
    reports.mkdir()
    _fake_gpu_csv(reports)
    out = reports / "memory-scaling"
    assert main(GRID + ["--out-dir", str(out)]) == 0
    frame = pd.read_csv(out / "memory.csv")
    assert set(frame["source"]) == {"traced", "model"}
    assert len(frame) == 2 * 2  # dense and smet d=0.5, traced and modelled
    text = (out / "memory.md").read_text()
    assert "Largest LLaMA that fits" in text and "20m (" in text
    assert "NVIDIA H200" in text and "117.74 MiB" in text  # the fake allocator peak, beside its traced case
    for plot in ("peak_vs_model_size.png", "fraction_of_dense.png"):
        assert (out / plot).stat().st_size > 0
    assert "smet-bench memory" in (out / "commands.txt").read_text()
    assert main(GRID + ["--out-dir", str(out)]) == 0  # resumed: nothing new to trace
    assert len(pd.read_csv(out / "memory.csv")) == 4


def test_a_grid_of_small_sizes_says_the_largest_that_fits_is_among_those_traced_and_where_gpu_rows_were_sought(
        tmp_path, capsys):
    """Traced at 20m only, the report said "20m to 7b", "not even 20m fits" of its own list and that 20m was the
    largest LLaMA fitting a 141 GB GPU, and that it looked for GPU rows under `reports/` wherever --out-dir was."""
    out = tmp_path / "runs" / "memory"
    assert main(GRID + ["--methods", "dense", "--out-dir", str(out)]) == 0
    text = (out / "memory.md").read_text()
    assert text.startswith("# Memory scaling: one training step, 20m\n")
    assert "Largest of the traced configurations (20m; a larger one, not traced, may fit too) whose" in text
    assert f"No GPU `training.csv` in the folders of `{tmp_path / 'runs'}` yet" in text


def test_a_grid_without_dense_reports_without_the_fraction_of_dense_plot_instead_of_a_key_error(tmp_path, capsys):
    out = tmp_path / "memory"
    assert main(GRID + ["--methods", "smet", "--out-dir", str(out)]) == 0
    assert "No plot of the sparse methods as a fraction of dense: `--methods` left out dense." in (
        out / "memory.md").read_text()
    assert not (out / "fraction_of_dense.png").exists()


def test_a_grid_traced_only_with_activation_checkpointing_tables_its_checkpointed_peaks_instead_of_an_index_error(
        tmp_path, capsys):
    out = tmp_path / "memory"
    argv = [*GRID, "--methods", "dense", "--activation-checkpointing", "on", "--out-dir", str(out)]
    assert main(argv) == 0
    text = (out / "memory.md").read_text()
    assert "## Traced peak per method and size (batch 1×32, vocab 256, bf16 weights, bf16 states (GaLore: bf16), " \
           "activation checkpointing)" in text


def test_a_grid_of_galore_with_fp32_states_only_is_refused_in_one_line_not_sent_to_run_the_command_it_ran(
        tmp_path, capsys):
    """GaLore has bf16 states only: the grid was empty and the error said "no memory.csv ...: run `smet-bench memory`
    first"."""
    argv = ["memory", "--configs", "20m", "--methods", "galore", "--state-dtypes", "fp32", "--out-dir", str(tmp_path)]
    error = usage_error(main, argv, capsys)
    assert error == ("smet-bench: error: --methods galore with --state-dtypes fp32 gives no case to trace: GaLore "
                     "keeps bf16 states only")


def test_memory_command_rejects_an_unknown_config_in_one_line(tmp_path, capsys):
    error = usage_error(main, ["memory", "--configs", "20m,3b", "--out-dir", str(tmp_path)], capsys)
    assert error == "smet-bench: error: --configs must be from 20m,60m,130m,350m,1b,7b, got 3b"  # the bad one only


def test_report_only_without_a_traced_memory_csv_says_to_run_the_memory_command_first(tmp_path, capsys):
    error = usage_error(main, ["memory", "--report-only", "--out-dir", str(tmp_path)], capsys)
    assert error == f"smet-bench: error: no memory.csv in {tmp_path}: run `smet-bench memory` first"
    assert not (tmp_path / "memory.md").exists()


def test_report_only_on_a_memory_csv_with_no_traced_row_says_to_trace_instead_of_a_nan_error(tmp_path, capsys):
    """A run stopped after its first modelled row left memory.csv without a traced one: --report-only said "cannot
    convert float NaN to integer"."""
    (tmp_path / "memory.csv").write_text(_traced([{"config": "20m", "source": "model"}]).to_csv(index=False))
    error = usage_error(main, ["memory", "--report-only", "--out-dir", str(tmp_path)], capsys)
    assert error == (f"smet-bench: error: no traced row in {tmp_path / 'memory.csv'}: run `smet-bench memory` to "
                     "trace the grid")


def test_memory_command_rejects_a_bad_batch_shape(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["memory", "--batch-shapes", "8by256", "--out-dir", str(tmp_path)])
    assert "--batch-shapes" in capsys.readouterr().err


@pytest.mark.parametrize("option, value, expected", [
    ("--batch-shapes", "8", "argument --batch-shapes: cannot read '8': expected BATCHxSEQ with positive integers"),
    ("--checkpointing", "maybe", "argument --activation-checkpointing/--checkpointing: cannot read 'maybe': expected "
                                 "off or on"),
])  # fmt: skip
def test_a_list_item_that_cannot_be_read_is_named_once_with_the_form_expected(tmp_path, capsys, option, value,
                                                                                expected):
    with pytest.raises(SystemExit):
        main(["memory", option, value, "--out-dir", str(tmp_path)])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert expected in error and error.count(option) == 1, error


def test_a_density_out_of_range_is_a_one_line_error_naming_densities(tmp_path, capsys):
    error = usage_error(main, ["memory", "--densities", "2", "--out-dir", str(tmp_path)], capsys)
    assert error == "smet-bench: error: --densities must be in (0, 1], got 2.0"


@pytest.mark.parametrize("options, expected", [
    (["--measure-configs", "1b", "--configs", "20m"],
     "--measure-configs 1b not in --configs 20m: only traced sizes are measured"),
    (["--measure-configs", "20m", "--configs", "20m", "--batch-shapes", "32x256"],
     "--measure-configs measures at batch 8x256 and vocab 256: add 8x256 to --batch-shapes"),
    (["--measure-configs", "20m", "--configs", "20m", "--vocab-sizes", "32000"],
     "--measure-configs measures at batch 8x256 and vocab 256: add 256 to --vocab-sizes"),
    (["--measure-configs", "20m", "--configs", "20m", "--batch-shapes", "32x256", "--vocab-sizes", "32000"],
     "--measure-configs measures at batch 8x256 and vocab 256: add 8x256 to --batch-shapes and 256 to --vocab-sizes"),
], ids=["config", "batch", "vocab", "both"])  # fmt: skip
def test_measure_configs_that_would_measure_nothing_are_refused_in_one_line(tmp_path, capsys, options, expected):
    error = usage_error(main, ["memory", *options, "--out-dir", str(tmp_path)], capsys)
    assert error == f"smet-bench: error: {expected}"
    assert not (tmp_path / "memory.csv").exists()


def test_gpu_peaks_are_plotted_at_their_own_vocabulary_and_activation_checkpointing(tmp_path, monkeypatch):
    """gpu-check's training rows use vocab 32000: they were placed at the parameter count of vocab 256 and labelled
    so, 130 M parameters left of their 1b traced line."""
    from bench import memory_report

    figures = []
    monkeypatch.setattr(memory_report, "save", lambda fig, path: figures.append(fig) or path.name)
    traced = pd.DataFrame([{"config": "1b", "method": "dense", "density": 1.0, "vocab_size": 32000, "batch_size": 8,
                            "seq_len": 256, "dtype": "bf16", "state_dtype": "bf16", "peak_bytes": 3e10,
                            "activation_checkpointing": ckpt} for ckpt in (False, True)])  # fmt: skip
    gpu = pd.DataFrame([{"config": "1b", "vocab_size": 32000, "peak_allocated_bytes": peak, "nvml_peak_bytes": nvml,
                         "activation_checkpointing": ckpt, "nvml_status": "ok"}
                        for ckpt, peak, nvml in ((False, 4e10, float("nan")), (True, 2e10, 2.5e10))])  # fmt: skip
    memory_report.plot_peak_vs_size(traced, gpu, tmp_path / "peak.png")
    plain, checkpointed = figures[0].axes
    (points,) = plain.collections[-1:]
    assert points.get_label() == "GPU allocator peak (its own batch and vocab)"
    assert points.get_offsets()[0][0] == memory_report.dense_parameters("1b", 32000)
    # gpu-check also measures steps with activation checkpointing: each row in the panel of its own (they were all
    # drawn in the panel without, far below its traced line)
    assert [list(points.get_offsets()[:, 1]) for points in plain.collections if "GPU" in points.get_label()] == [[40.0]]
    assert [list(points.get_offsets()[:, 1]) for points in checkpointed.collections
            if "GPU" in points.get_label()] == [[20.0], [25.0]]  # fmt: skip


def _traced(rows):
    """Traced memory-grid rows (bf16 weights, 8×256, vocab 256 unless given) from ``(config, method, ...)`` dicts."""
    base = {"source": "traced", "method": "dense", "density": 1.0, "dtype": "bf16", "state_dtype": "fp32",
            "block_size": 64, "distribution": "uniform", "batch_size": 8, "seq_len": 256, "vocab_size": 256,
            "activation_checkpointing": False}  # fmt: skip
    return pd.DataFrame([base | row for row in rows])


def test_the_headline_names_the_largest_config_whose_traced_peak_fits_in_decimal_gigabytes_per_state_dtype():
    """A peak of exactly 24e9 bytes fits the 24 GB card and 25e9 does not (it would in GiB); fp32 and bf16 states are
    rows of their own."""
    from bench.memory_report import headline_table

    traced = _traced([{"config": c, "state_dtype": s, "peak_bytes": p} for c, s, p in (
        ("20m", "fp32", 1e9), ("60m", "fp32", 24e9), ("1b", "fp32", 25e9),
        ("20m", "bf16", 0.5e9), ("60m", "bf16", 12e9), ("1b", "bf16", 24e9))])  # fmt: skip
    table = headline_table(traced, checkpointing=False).set_index("states")
    assert table.loc["fp32", "24 GB, 8×256"] == "60m (24.0 GB)"
    assert table.loc["fp32", "80 GB, 8×256"] == "1b (25.0 GB)"
    assert table.loc["bf16", "24 GB, 8×256"] == "1b (24.0 GB)"
    assert list(table["method"]) == ["dense", "dense"]


def test_the_headline_says_none_where_not_even_the_smallest_config_fits():
    from bench.memory_report import headline_table

    traced = _traced([{"config": "20m", "peak_bytes": 30e9},
                      {"config": "20m", "method": "smet", "density": 0.5, "peak_bytes": 10e9}])  # fmt: skip
    table = headline_table(traced, checkpointing=False)
    assert table["method"].tolist() == ["dense", "smet d=0.5"]
    assert table["24 GB, 8×256"].tolist() == ["none", "20m (10.0 GB)"]
    assert table["80 GB, 8×256"].tolist() == ["20m (30.0 GB)", "20m (10.0 GB)"]


def test_the_headline_has_a_column_of_none_for_a_batch_shape_where_nothing_fits_a_capacity():
    """Nothing fitting 24 GB at 32×256 left that column out of the table instead of saying `none`."""
    from bench.memory_report import headline_table

    table = headline_table(_traced([{"config": "7b", "batch_size": b, "peak_bytes": p}
                                    for b, p in ((8, 20e9), (32, 60e9))]), checkpointing=False)  # fmt: skip
    assert table["24 GB, 32×256"].tolist() == ["none"]
    assert table.columns[2:5].tolist() == ["24 GB, 8×256", "24 GB, 32×256", "80 GB, 8×256"]


def test_the_headline_keeps_a_gpu_case_of_fp32_weights_out_of_the_bf16_grid_row_of_its_method():
    """A GPU run's fp32-weight case, traced beside the grid at the same batch, shared the grid's row: 20m at 10 GB
    (bf16 weights) in one column, 20m at 30 GB (fp32 weights) in the next, under "bf16 weights"."""
    from bench.memory_report import headline_table

    table = headline_table(_traced([{"config": "20m", "peak_bytes": 10e9},
                                    {"config": "20m", "dtype": "fp32", "peak_bytes": 30e9}]), checkpointing=False)
    assert table.iloc[0, 2:].tolist() == ["20m (10.0 GB)"] * 3


def test_the_plotted_settings_are_the_largest_vocab_fp32_states_and_the_smallest_batch():
    from bench.memory_report import _settings, headline_settings

    traced = _traced([{"config": "20m", "state_dtype": s, "batch_size": b, "vocab_size": v, "peak_bytes": 1e9}
                      for s in ("bf16", "fp32") for b in (8, 32) for v in (256, 32000)])  # fmt: skip
    assert headline_settings(traced) == {"vocab_size": 32000, "state_dtype": "fp32", "batch_size": 8}
    assert headline_settings(traced[traced["state_dtype"] == "bf16"])["state_dtype"] == "bf16"
    galore = _traced([{"config": "20m", "method": "galore", "state_dtype": "bf16", "peak_bytes": 1e9},
                      {"config": "20m", "method": "dense", "state_dtype": "bf16", "peak_bytes": 1e9}])  # fmt: skip
    assert _settings(galore, state_dtype="fp32")["method"].tolist() == ["galore"]  # GaLore has no fp32 states


def test_the_plots_describe_the_state_dtype_of_every_method_but_galore():
    from bench.memory_report import _describe

    rows = _traced([{"config": "20m", "method": "galore", "state_dtype": "bf16", "peak_bytes": 1e9},
                    {"config": "20m", "method": "dense", "state_dtype": "fp32", "peak_bytes": 1e9}])  # fmt: skip
    assert _describe(rows) == "batch 8×256, vocab 256, bf16 weights, fp32 states (GaLore: bf16)"


def test_agreement_errors_are_relative_to_the_traced_bytes_and_summarised_by_median_and_max():
    from bench.memory_report import COMPONENTS, agreement, agreement_summary

    bytes_ = {f"{c}_bytes": 100.0 for c in COMPONENTS} | {"peak_bytes": 500.0}
    traced = _traced([{"config": c, "peak_bytes": 500.0} | bytes_ for c in ("20m", "60m", "130m")])
    model = traced.assign(source="model", weights_bytes=[101.0, 102.0, 109.0])
    errors = agreement(pd.concat([traced, model]), "model")
    weights = errors[errors["component"] == "weights"]
    assert weights["error"].round(6).tolist() == [0.01, 0.02, 0.09]
    summary = agreement_summary(errors).set_index("component")
    assert summary.loc["weights", "median abs error"] == "2.000 %"
    assert summary.loc["weights", "max abs error"] == "9.000 %"
    assert summary.loc["weights", "max abs difference"] == "9 B"
    assert summary.loc["gradients", "max abs error"] == "0.000 %"


def test_gpu_rows_keep_the_eager_measured_rows_of_gpus_with_their_dtype_as_state_dtype(tmp_path):
    from bench.memory_report import gpu_rows

    rows = [{c: "" for c in TRAINING_COLUMNS} | {
        "config": "20m", "method": "dense", "density": 1.0, "block_size": 64, "batch_size": 1,
        "dtype": "bf16", "backend": "torch", "vocab_size": 256, "compiled": compiled, "activation_checkpointing": False,
        "peak_allocated_bytes": peak, "status": status, "gpu": gpu, "seq_len": 32 if status == "ok" else 64,
    } for gpu, status, compiled, peak in (("NVIDIA H200", "ok", False, 1), ("NVIDIA H200", "skipped", False, 2),
                                          ("NVIDIA H200", "ok", True, 3), ("cpu-x86_64-2cores", "ok", False, 4))]
    (tmp_path / "nvidia-h200").mkdir()
    pd.DataFrame(rows, columns=TRAINING_COLUMNS).to_csv(tmp_path / "nvidia-h200" / "training.csv", index=False)
    frame = gpu_rows(tmp_path)
    assert frame["peak_allocated_bytes"].tolist() == [1]
    assert frame["state_dtype"].tolist() == ["bf16"]


def test_the_gpu_section_sets_each_peak_in_its_own_column_and_the_allocator_error_in_percent():
    from bench.memory_report import _gpu_section, gpu_comparison

    traced = _traced([{"config": "20m", "peak_bytes": 100 * 2**20}])
    gpus = traced.drop(columns=["source", "peak_bytes"]).assign(
        gpu="NVIDIA H200", peak_allocated_bytes=110 * 2**20, nvml_peak_bytes=120 * 2**20, nvml_status="ok")
    assert gpu_comparison(traced, gpus)["allocator_vs_traced"].tolist() == [pytest.approx(0.1)]
    header, _, row = _gpu_section(traced, gpus, Path("reports"))[2].splitlines()
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")]))
    assert (cells["traced peak"], cells["allocator peak"], cells["NVML peak"]) == ("100.00 MiB", "110.00 MiB",
                                                                                   "120.00 MiB")
    assert cells["allocator vs traced"] == "+10.0 %"


def test_an_nvml_peak_whose_sampler_failed_mid_run_is_marked_a_lower_bound_and_not_plotted(tmp_path, monkeypatch):
    from bench import memory_report

    traced = _traced([{"config": "20m", "peak_bytes": 100 * 2**20}])
    gpus = traced.drop(columns=["source", "peak_bytes"]).assign(
        gpu="NVIDIA H200", peak_allocated_bytes=110 * 2**20, nvml_peak_bytes=90 * 2**20,
        nvml_status="failed: NVMLError: GPU is lost")  # fmt: skip
    assert "| ≥ 90.00 MiB (failed: NVMLError: GPU is lost) |" in memory_report._gpu_section(traced, gpus, tmp_path)[2]
    figures = []
    monkeypatch.setattr(memory_report, "save", lambda fig, path: figures.append(fig) or path.name)
    memory_report.plot_peak_vs_size(traced, gpus, tmp_path / "peak.png")
    assert [p.get_label() for p in figures[0].axes[0].collections if "GPU" in p.get_label()] == [
        "GPU allocator peak (its own batch and vocab)"]


def test_the_peak_table_shows_the_steps_without_activation_checkpointing():
    from bench.memory_report import _peak_table

    rows = _traced([{"config": "20m", "activation_checkpointing": True, "peak_bytes": 2**30},
                    {"config": "20m", "activation_checkpointing": False, "peak_bytes": 2 * 2**30}])  # fmt: skip
    assert "| dense    | 2.00 GiB |" in "\n".join(_peak_table(rows))


def _grid_csv(out, rows):
    """``out/memory.csv`` of traced rows (every component 1 MB, the peak as given)."""
    from bench.memory_report import COMPONENTS

    out.mkdir(parents=True)
    _traced([{f"{c}_bytes": 1e6 for c in COMPONENTS} | row for row in rows]).to_csv(out / "memory.csv", index=False)


def test_a_grid_of_two_sequence_lengths_at_one_batch_plots_and_tables_the_shorter_instead_of_failing(tmp_path,
                                                                                                    capsys):
    """--batch-shapes 1x32,1x64 traced fine, then the report stopped on "The truth value of a Series is ambiguous":
    the plots took every sequence length of the smallest batch, two dense peaks per size."""
    _grid_csv(tmp_path / "memory", [{"config": "20m", "method": m, "density": d, "seq_len": s, "peak_bytes": p * s}
                                    for m, d, p in (("dense", 1.0, 2**20), ("smet", 0.5, 2**19))
                                    for s in (256, 512)])  # fmt: skip
    assert main(["memory", "--report-only", "--out-dir", str(tmp_path / "memory")]) == 0
    text = (tmp_path / "memory" / "memory.md").read_text()
    assert "## Traced peak per method and size (batch 8×256," in text
    assert "| dense      | 256.00 MiB |" in text and "| smet d=0.5 | 128.00 MiB |" in text


def test_a_gpu_case_at_a_smaller_batch_and_another_block_size_does_not_replace_the_grid_in_the_plots(tmp_path,
                                                                                                       capsys):
    """A quick GPU run (2×32, b = 32) traced beside the grid set the plotted batch to 2×32, where only that case
    was: the plots and the peak table showed its dense peak alone, not the grid's dense and smet."""
    _grid_csv(tmp_path / "memory", [{"config": "20m", "peak_bytes": 2**30},
                                    {"config": "20m", "method": "smet", "density": 0.5, "peak_bytes": 2**29},
                                    {"config": "20m", "batch_size": 2, "seq_len": 32, "block_size": 32,
                                     "peak_bytes": 2**28}])  # fmt: skip
    assert main(["memory", "--report-only", "--out-dir", str(tmp_path / "memory")]) == 0
    text = (tmp_path / "memory" / "memory.md").read_text()
    assert "## Traced peak per method and size (batch 8×256," in text
    assert "| dense      | 1.00 GiB   |" in text and "| smet d=0.5 | 512.00 MiB |" in text


def test_a_size_traced_without_dense_is_left_out_of_the_fraction_of_dense_instead_of_a_key_error(tmp_path, capsys):
    """`--configs 20m` and then `--configs 60m --methods smet` into one folder: the report stopped on a KeyError
    ('60m', False) traceback, the fraction of dense of a size with no dense peak."""
    _grid_csv(tmp_path / "memory", [{"config": c, "method": m, "density": d, "peak_bytes": p}
                                    for c, m, d, p in (("20m", "dense", 1.0, 2e9), ("20m", "smet", 0.5, 1e9),
                                                       ("60m", "smet", 0.5, 3e9))])  # fmt: skip
    assert main(["memory", "--report-only", "--out-dir", str(tmp_path / "memory")]) == 0
    assert "![fraction of dense](fraction_of_dense.png)" in (tmp_path / "memory" / "memory.md").read_text()


def test_dense_parameters_count_every_parameter_of_the_model():
    from bench.memory_report import dense_parameters
    from smet_kernels.train.model import LlamaModel, model_config

    model = LlamaModel(model_config("20m", vocab_size=300, block_size=64), device="meta")
    assert dense_parameters("20m", 300) == sum(p.numel() for p in model.parameters()) > 0


def test_the_notes_on_the_model_follow_the_comparison_with_the_model():
    from bench.memory_report import COMPONENTS, _agreement_section

    bytes_ = {f"{c}_bytes": 100.0 for c in COMPONENTS} | {"peak_bytes": 500.0}
    traced = _traced([{"config": "20m"} | bytes_])
    text = "\n".join(_agreement_section(pd.concat([traced, traced.assign(source="model", rest_bytes=110.0)])))
    assert "No measured rows." in text
    assert text.index("**traced vs model**") < text.index("Where the model and the trace differ")
    assert "10.00 %" in text  # the largest rest error, per setting


def test_the_component_bars_show_the_steps_without_activation_checkpointing(monkeypatch):
    from bench import memory_report

    figures = []
    monkeypatch.setattr(memory_report, "save", lambda fig, path: figures.append(fig) or path.name)
    traced = _traced([{"config": "1b", "activation_checkpointing": ckpt, "peak_bytes": 5 * size}
                      | {f"{c}_bytes": size for c in memory_report.COMPONENTS}
                      for ckpt, size in ((True, 1e9), (False, 2e9))])  # fmt: skip
    memory_report.plot_components(traced, ["1b"], Path("components.png"))
    (axis,) = figures[0].axes
    assert [bar.get_height() for bar in axis.patches] == [2.0] * len(memory_report.COMPONENTS)


def test_a_grid_traced_only_with_activation_checkpointing_draws_its_components_and_fraction_of_dense(monkeypatch):
    """Both plots kept the steps without checkpointing only: empty panels, titled "no checkpointing"."""
    from bench import memory_report

    figures = []
    monkeypatch.setattr(memory_report, "save", lambda fig, path: figures.append(fig) or path.name)
    traced = _traced([{"config": "1b", "method": m, "density": d, "activation_checkpointing": True, "peak_bytes": p}
                      | {f"{c}_bytes": p / 5 for c in memory_report.COMPONENTS}
                      for m, d, p in (("dense", 1.0, 4e9), ("smet", 0.5, 2e9))])  # fmt: skip
    memory_report.plot_components(traced, ["1b"], Path("components.png"))
    memory_report.plot_fraction_of_dense(traced, Path("fraction.png"))
    components, fraction = figures
    assert len(components.axes[0].patches) == 2 * len(memory_report.COMPONENTS)
    assert "activation checkpointing" in components._suptitle.get_text()
    smet = fraction.axes[1]
    assert [list(line.get_ydata()) for line in smet.lines if len(line.get_ydata()) == 1] == [[0.5]]


def test_a_checkpointing_mode_not_traced_is_said_so_instead_of_a_table_of_its_header_only(tmp_path, capsys):
    _grid_csv(tmp_path / "memory", [{"config": "20m", "activation_checkpointing": True, "peak_bytes": 1e9}])
    assert main(["memory", "--report-only", "--out-dir", str(tmp_path / "memory")]) == 0
    text = (tmp_path / "memory" / "memory.md").read_text()
    assert "**Without activation checkpointing**: not traced (`--activation-checkpointing off`).\n" in text
    assert "**With activation checkpointing**\n\n| method   | states   | 24 GB, 8×256 " in text


def test_a_mode_only_a_gpu_case_of_other_weights_traced_is_said_not_traced_by_the_grid(tmp_path, capsys):
    """An fp32 GPU case traced with checkpointing beside a grid traced without it: the headline, which takes the grid's
    dtype and block size only, had a 'With activation checkpointing' table of its header alone."""
    _grid_csv(tmp_path / "memory", [{"config": "20m", "peak_bytes": 2**30},
                                    {"config": "20m", "dtype": "fp32", "activation_checkpointing": True,
                                     "peak_bytes": 2**29}])  # fmt: skip
    assert main(["memory", "--report-only", "--out-dir", str(tmp_path / "memory")]) == 0
    text = (tmp_path / "memory" / "memory.md").read_text()
    assert "**With activation checkpointing**: not traced (`--activation-checkpointing on`).\n" in text


def test_the_headline_text_names_the_vocab_and_sizes_of_the_grid_its_tables_show_not_a_gpu_cases(tmp_path, capsys):
    """A GPU case of fp32 weights at vocab 32000 and 60m traced beside a vocab-256 grid of 20m: the tables show the
    grid, the sentence above them said vocab 32000 and sizes 20m, 60m."""
    _grid_csv(tmp_path / "memory", [{"config": "20m", "peak_bytes": 2**30},
                                    {"config": "60m", "dtype": "fp32", "vocab_size": 32000, "peak_bytes": 2**29}])
    assert main(["memory", "--report-only", "--out-dir", str(tmp_path / "memory")]) == 0
    text = (tmp_path / "memory" / "memory.md").read_text()
    assert "Largest of the traced configurations (20m; a larger one" in text
    assert "is at most the GPU's memory, vocab 256, bf16 weights" in text
