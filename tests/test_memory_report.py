"""`smet-bench memory`: a small traced grid, the report, GPU rows joining it, one-line errors."""

import pandas as pd
import pytest
from conftest import usage_error

from bench.cli import main
from bench.results import TRAINING_COLUMNS

GRID = ["memory", "--configs", "20m", "--methods", "dense,smet", "--densities", "0.5", "--batch-shapes", "1x32",
        "--vocab-sizes", "256", "--state-dtypes", "bf16", "--checkpointing", "off", "--measure-configs", "",
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


def test_memory_command_rejects_an_unknown_config_in_one_line(tmp_path, capsys):
    error = usage_error(main, ["memory", "--configs", "3b", "--out-dir", str(tmp_path)], capsys)
    assert error == "smet-bench: error: --configs must be from 20m,60m,130m,350m,1b,7b, got 3b"


def test_memory_command_rejects_a_bad_batch_shape(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["memory", "--batch-shapes", "8by256", "--out-dir", str(tmp_path)])
    assert "--batch-shapes" in capsys.readouterr().err


@pytest.mark.parametrize("option, value, expected", [
    ("--batch-shapes", "8", "argument --batch-shapes: cannot read '8': expected BATCHxSEQ with positive integers"),
    ("--checkpointing", "maybe", "argument --checkpointing: cannot read 'maybe': expected off or on"),
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
                         "activation_checkpointing": ckpt}
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
