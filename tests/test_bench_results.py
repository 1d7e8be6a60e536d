"""Resumable long-format CSVs and device slugs."""

import csv
import tempfile
import warnings
from pathlib import Path

import pandas as pd
import pytest
from conftest import usage_error
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bench.results import KERNEL_COLUMNS, KERNEL_KEY, ResultsFile, TornRowWarning, device_slug, kernels_file, slugify

#: the CPU results committed on 2026-11-23 (reports/cpu-x86-64-2cores until its rerun), in the formats of that day
OLD_RESULTS = Path(__file__).resolve().parent / "data" / "results-2026-11-23"


def _row(**overrides):
    row = {
        "suite": "kernels", "op": "forward", "provider": "triton_grouped", "shape": "tiny:qkvo", "M": 64, "K": 64, "N": 64,
        "block_size": 32, "density": 0.5, "dtype": "fp32", "backend": "triton", "ms_p50": 1.0, "status": "ok",
    }  # fmt: skip
    return row | overrides


def test_append_and_resume(tmp_path):
    results = kernels_file(tmp_path)
    assert not results.done(_row())
    results.append(_row())
    reopened = kernels_file(tmp_path)
    assert len(reopened) == 1
    assert reopened.done(_row(density="0.50", M="64.0"))  # the same key spelled differently
    assert not reopened.done(_row(density=0.25))
    text = (tmp_path / "kernels.csv").read_text().splitlines()
    assert text[0].split(",") == KERNEL_COLUMNS and len(text) == 2


def test_schema_mismatch_and_unknown_columns(tmp_path):
    (tmp_path / "kernels.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="columns"):
        kernels_file(tmp_path)
    results = ResultsFile(tmp_path / "other.csv", KERNEL_COLUMNS, KERNEL_KEY)
    with pytest.raises(ValueError, match="not in the schema"):
        results.append(_row(bogus=1))
    with pytest.raises(ValueError, match="key columns"):
        ResultsFile(tmp_path / "x.csv", ["op"], ["op", "provider"])


def test_slugs():
    assert slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert device_slug("cpu").startswith("cpu-")


def test_whole_numbers_past_six_digits_are_distinct_keys(tmp_path):
    """Keys compared numbers to 6 significant digits: a row of M=10000001 counted as done when M=10000000 was in the
    file, and was never measured. (Found by hypothesis.)"""
    results = kernels_file(tmp_path)
    results.append(_row(M=10**7))
    reopened = kernels_file(tmp_path)
    assert reopened.done(_row(M=10**7)) and reopened.done(_row(M="1e+07")) and not reopened.done(_row(M=10**7 + 1))
    assert reopened.done(_row(M=10**7, density=0.5000001))  # a float as the file holds it: 6 significant digits


def test_rows_of_another_device_do_not_count_as_done(tmp_path):
    """One --out-dir shared by a CPU and a GPU run: the GPU run must not skip the rows the CPU measured."""
    results = kernels_file(tmp_path)
    results.append(_row(gpu="cpu-x86_64-2cores"))
    reopened = kernels_file(tmp_path)
    assert reopened.done(_row(gpu="cpu-x86_64-2cores"))
    assert not reopened.done(_row(gpu="NVIDIA H100 80GB HBM3"))


def test_resume_is_per_device(tmp_path, monkeypatch, capsys):
    from bench import results
    from bench.cli import main

    args = ["run", "--quick", "--suites", "optimizer", "--no-progress", "--out-dir", str(tmp_path)]
    assert main(args) == 0
    first = len((tmp_path / "kernels.csv").read_text().splitlines())
    monkeypatch.setattr(results, "device_name", lambda device: "another-machine")
    capsys.readouterr()
    assert main(args) == 0
    assert " 0 already in " in capsys.readouterr().out
    assert len((tmp_path / "kernels.csv").read_text().splitlines()) == 2 * first - 1


def test_a_resumed_run_names_the_other_versions_that_measured_the_rows_it_keeps(tmp_path, monkeypatch, capsys):
    """The resume key is the configuration and the GPU: rows that another torch / Triton measured are kept, and the
    run says so (the report would set them beside its own), naming both stacks; rows of its own stack say nothing."""
    import torch
    import triton

    from bench import results
    from bench.cli import main

    args = ["run", "--quick", "--suites", "optimizer", "--no-progress", "--out-dir", str(tmp_path)]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 0
    assert "already in " + str(tmp_path / "kernels.csv") + ", 0 to run" in capsys.readouterr().out
    environment = results.environment
    monkeypatch.setattr(results, "environment", lambda device: environment(device) | {"torch": "9.9.9"})
    assert main(args) == 0
    assert (f"(measured with torch {torch.__version__} / Triton {triton.__version__}, not this run's torch 9.9.9 / "
            f"Triton {triton.__version__}; a fresh --out-dir measures every case") in capsys.readouterr().out


def _kernel_frame(rows):
    import pandas as pd

    base = {"suite": "kernels", "shape": "s", "M": 64, "K": 64, "N": 64, "dtype": "bf16", "ms_p20": None,
            "ms_p80": None, "tflops": 1.0, "backend": "torch", "status": "ok", "note": ""}  # fmt: skip
    return pd.DataFrame([base | row for row in rows])


def test_report_ratios_use_the_dense_time_of_the_same_gpu():
    from bench.report import kernel_comparison

    frame = _kernel_frame(
        [
            {"op": "forward", "provider": "cublas_dense", "gpu": "cpu", "ms_p50": 100.0},
            {"op": "forward", "provider": "cublas_dense", "gpu": "h100", "ms_p50": 1.0},
            {"op": "forward", "provider": "triton_grouped", "gpu": "h100", "ms_p50": 0.5, "block_size": 32, "density": 0.5,
             "nnz_blocks": 2},
        ]
    )  # fmt: skip
    sparse = kernel_comparison(frame)
    assert len(sparse) == 1
    assert sparse["vs_dense"].iloc[0] == 0.5 and sparse["vs_d_dense"].iloc[0] == 1.0


def test_report_summary_leaves_out_wrong_results(tmp_path):
    from bench.report.sections import kernel_section

    rows = [{"op": "forward", "provider": "cublas_dense", "gpu": "h100", "ms_p50": 1.0}]
    for status, ms in (("ok", 0.5), ("wrong", 0.01)):
        rows.append(
            {"op": "forward", "provider": "triton_grouped", "gpu": "h100", "ms_p50": ms, "block_size": 32, "density": 0.5,
             "nnz_blocks": 2, "status": status, "M": 64 if status == "ok" else 128}
        )  # fmt: skip
    rows.append({"op": "forward", "provider": "cublas_dense", "gpu": "h100", "ms_p50": 1.0, "M": 128})
    text = "\n".join(kernel_section(_kernel_frame(rows), tmp_path))
    summary = text.split("### All kernel measurements")[0]
    row = next(line for line in summary.splitlines() if line.startswith("| forward") and "triton_grouped" in line)
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[4:6] == ["0.5", "1"] and cells[-1] == "1"  # vs dense, vs d×dense, one case
    assert "wrong" in text  # still listed, flagged, in the detail table


def test_optimizer_percent_of_copy_uses_the_same_gpu():
    from bench.report.sections import optimizer_section

    frame = _kernel_frame(
        [
            {"suite": "optimizer", "op": "copy", "provider": "device_copy", "shape": "dense:s", "gpu": "h100",
             "ms_p50": 0.01, "N": 1000, "K": 1000},
            {"suite": "optimizer", "op": "copy", "provider": "device_copy", "shape": "dense:s", "gpu": "cpu",
             "ms_p50": 1.0, "N": 1000, "K": 1000},
            {"suite": "optimizer", "op": "adamw", "provider": "smet_adamw", "shape": "dense:s", "gpu": "h100",
             "ms_p50": 0.1, "N": 1000, "K": 1000, "gbps": 400.0, "density": 1.0, "block_size": None},
        ]
    )  # fmt: skip
    row = next(line for line in optimizer_section(frame)[4].splitlines() if "smet_adamw" in line)
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[-2:] == ["800", "50"]  # copy 8e6 B / 0.01 ms = 800 GB/s; 400 / 800 = 50 %


def test_committed_results_with_the_old_provider_names_are_read_under_the_new_ones():
    """The CPU results of 2026-11-23 were measured when the providers were smet, smet_ungrouped, ...: the report
    reads every row, each under its new name (the Triton ``smet`` rows as ``triton_grouped``)."""
    from bench.report import load_csv

    frame = load_csv(OLD_RESULTS / "kernels.csv")
    counts = frame.groupby(["suite", "provider"]).size().to_dict()
    assert counts == {
        ("kernels", "cublas_dense"): 9, ("kernels", "masked_dense"): 18, ("kernels", "torch_bsr"): 18,
        ("kernels", "triton_grouped"): 18, ("kernels", "triton_plain_order"): 12, ("kernels", "triton_persistent"): 12,
        ("kernels", "triton_tma"): 18, ("optimizer", "device_copy"): 1, ("optimizer", "smet_adamw"): 2,
        ("optimizer", "torch_adamw_foreach"): 3, ("optimizer", "torch_adamw_fused"): 3,
    }  # fmt: skip


def test_old_provider_names_map_by_suite_and_backend():
    from bench.results import current_provider

    assert current_provider("kernels", "smet", "triton") == "triton_grouped"
    assert current_provider("kernels", "smet", "reference") == "torch_reference"
    assert current_provider("kernels", "smet_ungrouped", "triton") == "triton_plain_order"
    assert current_provider("optimizer", "smet", "reference") == "smet_adamw"
    assert current_provider("kernels", "masked_dense", "torch") == "masked_dense"


def test_resume_counts_a_row_measured_under_the_old_provider_name_as_done(tmp_path):
    old = kernels_file(tmp_path)
    old.append(_row(provider="smet"))
    reopened = kernels_file(tmp_path)
    assert reopened.done(_row(provider="triton_grouped"))
    assert not reopened.done(_row(provider="triton_tma"))


def test_committed_results_with_the_old_variant_column_render_with_their_shapes(tmp_path):
    """The CPU results of 2026-11-23 were written when the shape column was called ``variant``: the reader names it
    ``shape`` and the report shows the shapes."""
    import shutil

    from bench.report import load_csv, write_report

    committed = OLD_RESULTS
    assert "variant" in (committed / "kernels.csv").read_text().splitlines()[0].split(",")
    frame = load_csv(committed / "kernels.csv")
    assert "variant" not in frame.columns and "tiny:qkvo" in set(frame["shape"])
    for name in ("kernels.csv", "training.csv"):
        shutil.copy(committed / name, tmp_path / name)
    report = write_report(tmp_path).read_text()
    assert "tiny:qkvo" in report and "tiny:gate_up" in report


def test_resume_reads_a_file_with_the_old_variant_column(tmp_path):
    path = tmp_path / "kernels.csv"
    header = ["variant" if c == "shape" else c for c in KERNEL_COLUMNS]
    row = _row()
    path.write_text(",".join(header) + "\n" + ",".join(str(row.get(c, "")) for c in KERNEL_COLUMNS) + "\n")
    reopened = kernels_file(tmp_path)
    assert reopened.done(_row()) and len(reopened) == 1


def test_a_committed_training_csv_without_the_mode_columns_resumes_and_gains_them(tmp_path):
    """The training.csv of 2026-11-23 predates the compiled and activation_checkpointing columns: its rows count as
    done in the eager, non-checkpointed mode; the first new row rewrites the file under today's header, the old rows
    marked False."""
    import csv
    import shutil

    from bench.results import TRAINING_COLUMNS, training_file

    committed = OLD_RESULTS / "training.csv"
    header = committed.read_text().splitlines()[0].split(",")
    assert "compiled" not in header and "activation_checkpointing" not in header
    shutil.copy(committed, tmp_path / "training.csv")
    with committed.open(newline="") as handle:
        old_rows = list(csv.DictReader(handle))
    smet = next(row for row in old_rows if row["method"] == "smet") | {"vocab_size": 256}
    results = training_file(tmp_path)
    assert len(results) == len(old_rows)
    assert results.done(smet | {"compiled": False, "activation_checkpointing": False})
    assert not results.done(smet | {"compiled": True, "activation_checkpointing": False})
    assert not results.done(smet | {"compiled": False, "activation_checkpointing": True})
    results.append(smet | {"compiled": True, "activation_checkpointing": False, "tokens_per_s": 1.0})
    with (tmp_path / "training.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == TRAINING_COLUMNS
        rows = list(reader)
    assert len(rows) == len(old_rows) + 1
    assert [(r["compiled"], r["activation_checkpointing"], r["vocab_size"]) for r in rows[:-1]] == [
        ("False", "False", "256")
    ] * len(old_rows)
    assert [r["tokens_per_s"] for r in rows[:-1]] == [r["tokens_per_s"] for r in old_rows]
    assert (rows[-1]["compiled"], rows[-1]["activation_checkpointing"]) == ("True", "False")
    reopened = training_file(tmp_path)
    assert len(reopened) == len(old_rows) + 1
    assert reopened.done(smet | {"compiled": True, "activation_checkpointing": False})


def test_the_report_reads_a_training_csv_without_the_mode_columns_as_eager_without_checkpointing():
    from bench.report import load_csv

    frame = load_csv(OLD_RESULTS / "training.csv")
    assert len(frame) == 8
    assert frame["compiled"].dtype == bool and not frame["compiled"].any()
    assert frame["activation_checkpointing"].dtype == bool and not frame["activation_checkpointing"].any()


def test_a_row_cut_short_by_a_stopped_run_is_measured_again_and_the_next_row_starts_on_its_own_line(tmp_path):
    """A run killed while appending leaves a last line without its line end: it counts as not done (warned about,
    naming the file), and the next append drops it rather than continuing that line (which made one line of two
    rows that the report could not parse)."""
    import csv

    from bench.results import TornRowWarning

    results = kernels_file(tmp_path)
    results.append(_row(shape="a", gpu="G"))
    results.append(_row(shape="b", gpu="G"))
    path = tmp_path / "kernels.csv"
    path.write_bytes(path.read_bytes()[:-12])  # cut inside the last row's environment columns
    with pytest.warns(TornRowWarning, match="kernels.csv"):
        reopened = kernels_file(tmp_path)
    assert reopened.done(_row(shape="a", gpu="G")) and not reopened.done(_row(shape="b", gpu="G"))
    reopened.append(_row(shape="c", gpu="G"))
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == KERNEL_COLUMNS and all(len(row) == len(KERNEL_COLUMNS) for row in rows)
    assert [row[KERNEL_COLUMNS.index("shape")] for row in rows[1:]] == ["a", "c"]


def test_the_start_up_check_of_the_results_files_leaves_the_warning_about_a_torn_row_to_the_stage(tmp_path):
    """``check_results_files`` opens the files before any stage runs: a torn row is warned about once, by the stage
    that opens the file, not twice."""
    from bench.results import check_results_files

    results = kernels_file(tmp_path)
    results.append(_row(shape="a", gpu="G"))
    path = tmp_path / "kernels.csv"
    path.write_bytes(path.read_bytes() + b"kernels,forward,triton_grouped,b")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_results_files(tmp_path)
    with pytest.warns(TornRowWarning, match="kernels.csv"):
        kernels_file(tmp_path)


def test_a_file_holding_only_a_header_cut_short_resumes_as_an_empty_one(tmp_path):
    from bench.results import TornRowWarning

    (tmp_path / "kernels.csv").write_text("suite,op,prov")
    with pytest.warns(TornRowWarning):
        results = kernels_file(tmp_path)
    assert len(results) == 0
    results.append(_row())
    assert (tmp_path / "kernels.csv").read_text().splitlines()[0].split(",") == KERNEL_COLUMNS


def test_a_row_cut_inside_a_character_of_several_bytes_is_left_out_like_any_cut_row(tmp_path):
    """A run stopped (or a full disk) while writing a row with a non-ASCII note, cut inside its ``é``: the resume and
    the report stopped with a UnicodeDecodeError traceback. (Found by hypothesis.)"""
    from bench.report import load_csv

    results = kernels_file(tmp_path)
    results.append(_row(shape="a", gpu="G"))
    results.append(_row(shape="b", gpu="G", note="é"))
    path = tmp_path / "kernels.csv"
    path.write_bytes(path.read_bytes().split("é".encode())[0] + "é".encode()[:1])
    with pytest.warns(TornRowWarning, match="kernels.csv"):
        assert load_csv(path)["shape"].tolist() == ["a"]
    with pytest.warns(TornRowWarning, match="kernels.csv"):
        reopened = kernels_file(tmp_path)
    assert reopened.done(_row(shape="a", gpu="G")) and not reopened.done(_row(shape="b", gpu="G"))


def test_a_line_holding_two_rows_is_measured_again_and_dropped_by_the_next_append(tmp_path):
    """An older release appended a row to a half-written one, making one line of both. Its first row's key cells
    were whole, so it counted as done while the report leaves the line out (the case never came back); and the next
    rewrite (an added column, a torn last row) cut the line to the header's cells, a row of mixed cells."""
    import csv

    from bench.results import TornRowWarning

    results = kernels_file(tmp_path)
    for shape in "abc":
        results.append(_row(shape=shape, gpu="G"))
    path = tmp_path / "kernels.csv"
    header, a, b, c = path.read_text().splitlines()
    path.write_text("\n".join([header, a, b[:-3] + c]) + "\n")  # b cut inside its timestamp, then c
    with pytest.warns(TornRowWarning, match="kernels.csv: line.s. 3 .*measured again"):
        reopened = kernels_file(tmp_path)
    assert [reopened.done(_row(shape=shape, gpu="G")) for shape in "abc"] == [True, False, False]
    reopened.append(_row(shape="d", gpu="G"))
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert all(len(row) == len(KERNEL_COLUMNS) for row in rows)
    assert [row[KERNEL_COLUMNS.index("shape")] for row in rows[1:]] == ["a", "d"]


def test_a_quote_a_half_written_row_left_open_does_not_take_the_rows_after_its_line(tmp_path):
    """An older release appended a row to one cut just after the opening quote of its note (``"a, b``): the quote
    made the rest of the file one record, so every later row counted as not done, the report left them all out and
    the next append deleted them (past 128 KiB, a csv.Error traceback instead). (Found by hypothesis.)"""
    import csv

    from bench.report import load_csv

    results = kernels_file(tmp_path)
    shapes = ["a", "b"] + [f"c{i}" for i in range(800)]
    for shape in shapes:
        results.append(_row(shape=shape, gpu="G", note="a, b" if shape == "a" else ""))
    path = tmp_path / "kernels.csv"
    header, a, b, *rest = path.read_text().split("\n")
    path.write_text("\n".join([header, a[: a.index('"') + 1] + b, *rest]))
    with pytest.warns(TornRowWarning, match="line.s. 2 .*left out"):
        assert load_csv(path)["shape"].tolist() == shapes[2:]
    with pytest.warns(TornRowWarning, match="line.s. 2 .*measured again"):
        reopened = kernels_file(tmp_path)
    assert [reopened.done(_row(shape=shape, gpu="G")) for shape in shapes] == [False, False] + [True] * 800
    reopened.append(_row(shape="d", gpu="G"))
    with path.open(newline="") as handle:
        assert [row[KERNEL_COLUMNS.index("shape")] for row in csv.reader(handle)][1:] == shapes[2:] + ["d"]


def test_the_default_out_dir_holding_a_csv_of_another_release_is_refused_before_any_suite(tmp_path, monkeypatch,
                                                                                          capsys):
    """Without --out-dir, ``run`` writes to reports/<device slug>: a training.csv of other columns there was found
    only after the optimizer suite had run, in a traceback."""
    from bench.cli import main
    from bench.results import TRAINING_COLUMNS

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "reports" / device_slug("cpu")
    folder.mkdir(parents=True)
    (folder / "training.csv").write_text(",".join(c for c in TRAINING_COLUMNS if c != "tokens_per_s") + "\n")
    error = usage_error(main, ["run", "--quick", "--device", "cpu", "--suites", "optimizer,training", "--no-progress"],
                        capsys)
    assert error.startswith("smet-bench: error: ") and "training.csv lacks ['tokens_per_s']" in error
    assert sorted(p.name for p in folder.iterdir()) == ["training.csv"]


# Property-based (hypothesis): a run killed while appending (or a full disk) cuts kernels.csv at any byte.
_TEXT = st.text(st.sampled_from('ab ,"\n\r;é€'), max_size=6)  # a note's quotes, commas, line ends, multi-byte


@st.composite
def _result_rows(draw):
    number = st.one_of(st.none(), st.just(float("nan")), st.floats(allow_nan=False, width=32), st.integers(-9, 10**9))
    return _row(shape=draw(st.sampled_from(["a", "b,c", 'q"d', "é"])), M=draw(st.sampled_from([64, 10**7, 10**7 + 1])),
                density=draw(st.sampled_from([0.5, 0.25])), gpu=draw(st.sampled_from(["G", "H"])),
                ms_p50=draw(number), status=draw(_TEXT), note=draw(_TEXT), timestamp="2025-01-01T00:00:00+00:00")


def _one_line_rows():
    """Rows without a line break inside a cell: a merged line's record that goes on into the next line can start the
    next record inside a cell, and a record of the header's cells can come of pieces of rows (not told apart)."""
    return _result_rows().filter(lambda row: not any(c in row[k] for k in ("status", "note") for c in "\r\n"))


def _cuts(whole: bytes, low: int, high: int):
    """Offsets from ``low`` to ``high``, often the awkward ones: inside a character, after a quote or a line end."""
    awkward = [i for i in range(low, high + 1) if i < len(whole) and whole[i] & 0xC0 == 0x80 or whole[i - 1:i] in
               (b'"', b"\r", b"\n")]  # fmt: skip
    return st.one_of(st.integers(low, high), st.sampled_from(awkward)) if awkward else st.integers(low, high)


def _key(row):
    return row["shape"], row["M"], row["density"], row["gpu"]


def _reopened(folder, opener):
    """``(results, torn)``: ``opener(folder)`` and whether it warned about a row cut short."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opened = opener(folder)
    return opened, any(issubclass(w.category, TornRowWarning) for w in caught)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(rows=st.lists(_result_rows(), min_size=1, max_size=5), more=st.lists(_result_rows(), min_size=1, max_size=2),
       data=st.data())
def test_a_results_file_cut_at_any_byte_resumes_with_exactly_its_complete_rows(rows, more, data):
    """Any rows (notes with quotes, commas, line ends, characters of several bytes; NaN and empty numbers; keys
    repeated), the file cut at any byte: reopening and the report warn exactly when something was cut; exactly the
    keys of rows written whole are done and the report holds exactly those rows (of a repeated key the later); the
    rows cut off and more appended leave the file as if written in one go (no half row, no merged line)."""
    from bench.report import load_csv

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        path, reference = folder / "kernels.csv", folder / "reference" / "kernels.csv"
        results, ends = kernels_file(folder), [len((",".join(KERNEL_COLUMNS) + "\r\n").encode())]
        for row in rows:
            results.append(row)
            ends.append(path.stat().st_size)
        whole = path.read_bytes()
        cut = data.draw(_cuts(whole, 0, len(whole)), label="cut")
        path.write_bytes(whole[:cut])
        complete = [row for row, end in zip(rows, ends[1:]) if end <= cut]
        torn = cut not in [0] + ends
        frame, warned = _reopened(path, load_csv)
        assert warned == torn
        reference.parent.mkdir()
        reference.write_bytes(whole[: max([0] + [end for end in ends if end <= cut])])
        expected = load_csv(reference)
        if expected is None or frame is None:
            assert frame is None and expected is None and not complete
        else:
            pd.testing.assert_frame_equal(frame, expected)
            later = [row for i, row in enumerate(complete) if _key(row) not in map(_key, complete[i + 1:])]
            assert frame["note"].tolist() == [row["note"] for row in later]  # a repeated key: its later row

        reopened, warned = _reopened(folder, kernels_file)
        assert warned == torn
        done = {_key(row) for row in complete}
        assert [reopened.done(row) for row in rows] == [_key(row) in done for row in rows]
        assert len(reopened) == len(done)
        again = [row for row in rows if _key(row) not in done] + more  # the cut-off rows, measured again, and more
        for row in again:
            reopened.append(row)
        fresh = kernels_file(reference.parent / "fresh")
        for row in complete + again:
            fresh.append(row)
        assert path.read_bytes() == fresh.path.read_bytes()  # no merged line, no half row, nothing lost
        with path.open(newline="") as handle:
            assert {len(cells) for cells in csv.reader(handle)} == {len(KERNEL_COLUMNS)}
        final, warned = _reopened(folder, kernels_file)
        assert not warned and all(final.done(row) for row in rows + more)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(rows=st.lists(_one_line_rows(), min_size=3, max_size=4), more=_result_rows(), data=st.data())
def test_a_row_an_older_release_appended_to_a_half_written_one_is_not_done_and_is_left_out(rows, more, data):
    """One line of a row cut anywhere and the whole row an older release appended to it: neither is done, the report
    leaves the line out (warned), every other row is done and reported, and the next append drops the line."""
    from bench.report import load_csv

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        path = folder / "kernels.csv"
        results, ends = kernels_file(folder), [len((",".join(KERNEL_COLUMNS) + "\r\n").encode())]
        for row in rows:
            results.append(row)
            ends.append(path.stat().st_size)
        whole = path.read_bytes()
        half = data.draw(st.integers(0, len(rows) - 2), label="half-written row")
        start, end = ends[half], ends[half + 1]
        # inside the row past its first cell (cut inside it, the line has the header's cells: not told apart), before
        # its line end
        cut = data.draw(_cuts(whole, start + len("kernels,"), end - 2), label="cut")
        # a quote left open can close at a quoted cell of a later row, in the same column: a record of the header's
        # cells again (not told apart)
        assume(whole[start:cut].count(b'"') % 2 == 0 or b'"' not in whole[end:])
        path.write_bytes(whole[:cut] + whole[end:])  # the next row continues its line
        whole_rows = rows[:half] + rows[half + 2:]
        fresh = kernels_file(folder / "fresh")
        for row in whole_rows:
            fresh.append(row)
        frame, warned = _reopened(path, load_csv)
        assert warned
        pd.testing.assert_frame_equal(frame, load_csv(fresh.path))
        reopened, warned = _reopened(folder, kernels_file)
        done = {_key(row) for row in whole_rows}
        assert warned and [reopened.done(row) for row in rows] == [_key(row) in done for row in rows]
        reopened.append(more)
        fresh.append(more)
        assert path.read_bytes() == fresh.path.read_bytes()
