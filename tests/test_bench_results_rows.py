"""Resumable result files: every key column, a row done once appended, empty and reordered files, blank lines,
empty cells, csv's field limit, the stack note; the file formats themselves are in test_bench_results.py."""

import csv
import warnings

import pytest
from test_bench_results import _row

from bench.results import KERNEL_COLUMNS, KERNEL_KEY, TornRowWarning, kernels_file, slugify


def test_every_key_column_and_the_gpu_tell_rows_apart_in_both_files(tmp_path):
    from bench.results import TRAINING_KEY, training_file

    training = {"config": "tiny", "method": "dense", "density": 1.0, "block_size": 32, "batch_size": 2, "seq_len": 32,
                "dtype": "fp32", "backend": "reference", "compiled": False, "activation_checkpointing": False,
                "vocab_size": 256, "gpu": "G", "torch": "2.5", "triton": "3.1"}  # fmt: skip
    other = {"config": "small", "method": "smet", "density": 0.1, "block_size": 64, "batch_size": 4, "seq_len": 64,
             "dtype": "bf16", "backend": "torch", "compiled": True, "activation_checkpointing": True,
             "vocab_size": 32000, "gpu": "H", "suite": "optimizer", "op": "step", "provider": "smet_adamw",
             "shape": "b", "M": 128, "K": 128, "N": 128}  # fmt: skip
    for open_file, row, key in ((training_file, training, TRAINING_KEY), (kernels_file, _row(gpu="G"), KERNEL_KEY)):
        open_file(tmp_path).append(row)
        reopened = open_file(tmp_path)
        assert reopened.done(row) and reopened.stack(row) == (row.get("torch", ""), row.get("triton", ""))
        assert [column for column in key + ["gpu"] if reopened.done(row | {column: other[column]})] == []


def test_an_appended_row_is_done_at_once_and_its_stack_known(tmp_path):
    results = kernels_file(tmp_path)
    results.append(_row(torch="2.5", triton="3.1"))
    assert results.done(_row()) and len(results) == 1 and results.stack(_row()) == ("2.5", "3.1")


def test_an_empty_file_gains_the_header_with_its_first_row(tmp_path):
    (tmp_path / "kernels.csv").touch()
    results = kernels_file(tmp_path)
    assert len(results) == 0
    results.append(_row())
    assert (tmp_path / "kernels.csv").read_text().splitlines()[0].split(",") == KERNEL_COLUMNS


def test_a_file_with_the_columns_in_another_order_is_refused(tmp_path):
    (tmp_path / "kernels.csv").write_text(",".join(reversed(KERNEL_COLUMNS)) + "\n")
    with pytest.raises(ValueError, match="has its columns in another order"):
        kernels_file(tmp_path)


def test_blank_lines_around_the_rows_are_passed_over_without_a_warning(tmp_path):
    results = kernels_file(tmp_path)
    for shape in "ab":
        results.append(_row(shape=shape))
    path = tmp_path / "kernels.csv"
    header, a, b = path.read_text().splitlines()
    path.write_text("\n".join(["", header, a, "", b]) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reopened = kernels_file(tmp_path)
    assert len(reopened) == 2 and reopened.done(_row(shape="a")) and reopened.done(_row(shape="b"))


def test_a_missing_measurement_is_an_empty_cell_also_in_the_rows_an_old_file_gains_it_for(tmp_path):
    """NaN (a value not measured) is written as an empty cell, like None; rows of a training.csv written before the
    ``warmup_s`` column get it empty."""
    from bench.results import TRAINING_COLUMNS, training_file

    kernels = kernels_file(tmp_path)
    kernels.append(_row(ms_p20=float("nan"), ms_p80=None))
    with (tmp_path / "kernels.csv").open(newline="") as handle:
        (row,) = csv.DictReader(handle)
    assert (row["ms_p20"], row["ms_p80"], row["ms_p50"]) == ("", "", "1")
    old = [c for c in TRAINING_COLUMNS if c != "warmup_s"]
    (tmp_path / "training.csv").write_text(",".join(old) + "\n" + ",".join("1" if c == "steps" else "" for c in old)
                                           + "\n")  # fmt: skip
    training_file(tmp_path).append({"config": "tiny", "steps": 2, "warmup_s": 0.5})
    with (tmp_path / "training.csv").open(newline="") as handle:
        assert [(r["steps"], r["warmup_s"]) for r in csv.DictReader(handle)] == [("1", ""), ("2", "0.5")]


def test_rewriting_a_file_with_the_old_variant_column_keeps_its_shapes_under_the_new_name(tmp_path):
    results = kernels_file(tmp_path)
    results.append(_row(shape="a"))
    path = tmp_path / "kernels.csv"
    header, a = path.read_text().splitlines()
    path.write_text("\n".join([header.replace("shape", "variant"), a, "kernels,forward"]))  # and a torn row
    with pytest.warns(TornRowWarning):
        reopened = kernels_file(tmp_path)
    reopened.append(_row(shape="b"))
    with path.open(newline="") as handle:
        assert [row["shape"] for row in csv.DictReader(handle)] == ["a", "b"]


def test_the_stack_note_names_only_the_other_versions_and_this_runs_own():
    from bench.results import stack_note

    assert stack_note([("2.5", "3.1"), ("2.5", "3.1")], ("2.5", "3.1")) == ""
    note = stack_note([("2.5", "3.1"), ("2.4", ""), ("2.4", "")], ("2.5", "3.1"))
    assert note.startswith(" (measured with torch 2.4 / Triton ?, not this run's torch 2.5 / Triton 3.1;")


def test_the_start_up_check_refuses_a_kernels_csv_of_another_release(tmp_path):
    from bench.results import check_results_files

    (tmp_path / "kernels.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="kernels.csv"):
        check_results_files(tmp_path)
    check_results_files(tmp_path, kernels=False)


def test_slugs_have_no_dash_at_either_end():
    assert slugify(" (NVIDIA) H100 ") == "nvidia-h100"


def test_a_quote_left_open_before_more_than_csvs_field_limit_loses_only_its_own_line(tmp_path):
    """Past csv's field size limit (128 KiB) the open quote raised a csv.Error traceback instead."""
    results = kernels_file(tmp_path)
    results.append(_row(shape="a", note="a, b"))
    results.append(_row(shape="b", note="x" * 200))
    path = tmp_path / "kernels.csv"
    header, a, b = path.read_text().splitlines()
    rest = [b.replace(",b,", f",c{i},", 1) for i in range(1000)]  # some 250 kB of rows
    path.write_text("\n".join([header, a[: a.index('"') + 1] + b, *rest]) + "\n")
    with pytest.warns(TornRowWarning, match="line.s. 2 .*measured again"):
        reopened = kernels_file(tmp_path)
    assert len(reopened) == 1000 and not reopened.done(_row(shape="a")) and reopened.done(_row(shape="c999"))


def test_a_value_given_twice_measures_its_cases_once(tmp_path, capsys):
    """--densities 0.5,0.5 made every sparse case twice: two rows of one key in the CSV, which the report then warned
    about as two runs writing at once."""
    from bench.cli import main

    args = ["run", "--quick", "--suites", "optimizer", "--no-progress", "--densities", "0.5,0.50",
            "--out-dir", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    with (tmp_path / "kernels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    keys = [tuple(row[k] for k in KERNEL_KEY + ["gpu"]) for row in rows]
    assert len(rows) == 6 and len(set(keys)) == len(keys)
    assert "optimizer: 6 cases" in capsys.readouterr().out
