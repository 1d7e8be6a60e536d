"""smet-bench report and memory on odd results folders: files lacking columns, several machines in one folder."""

import pytest
from conftest import usage_error
from test_bench_report import CPU, _kernel_rows, _training_rows, _write

from bench.cli import main
from bench.results import KERNEL_COLUMNS, TRAINING_COLUMNS


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
