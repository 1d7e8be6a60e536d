"""Roofline bounds of the block-sparse kernels (profiling.roofline): hand-checked arithmetic and the CLI."""

import csv
import re
from pathlib import Path

import pytest
import torch
from conftest import usage_error

from profiling import roofline
from smet_kernels.layout import BlockLayout


def test_full_layout_bound_equals_the_dense_bound():
    layout = BlockLayout.from_mask(torch.ones(4, 8, dtype=torch.bool), 16)  # W [64, 128]
    dense = roofline.dense_roofline(256, 64, 128, 2, 100.0, 1.0)
    sparse = roofline.sparse_roofline("forward", 256, layout, 2, 100.0, 1.0)
    assert sparse.flops == dense.flops == 2 * 256 * 64 * 128
    assert sparse.bytes == dense.bytes == (256 * 128 + 64 * 128 + 256 * 64) * 2


def test_sparse_bytes_count_only_the_columns_that_meet_an_active_block():
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, 1] = mask[0, 3] = True  # block row 1 and block columns 0, 2 are empty
    layout = BlockLayout.from_mask(mask, 16)  # W [32, 64], 2 blocks
    m, e, values = 10, 4, 2 * 16 * 16 * 4
    assert roofline.sparse_roofline("forward", m, layout, e, 1.0, 1.0).bytes == (m * 32 + m * 32) * e + values
    assert roofline.sparse_roofline("grad_input", m, layout, e, 1.0, 1.0).bytes == (m * 16 + m * 64) * e + values
    assert roofline.sparse_roofline("grad_weight", m, layout, e, 1.0, 1.0).bytes == (m * 16 + m * 32) * e + values
    with pytest.raises(ValueError, match="op must be one of"):
        roofline.sparse_roofline("backward", m, layout, e, 1.0, 1.0)


def test_low_density_forward_is_memory_bound_by_its_output():
    """8192 x 4096 x 4096 at d = 0.1, b = 128, bf16, H100 anchors (730 TFLOP/s, 3.0 TB/s): y (64 MiB) and x (64 MiB)
    must move. With the H200's 4.3 TB/s the same op is compute-bound (bandwidth per FLOP up by 1.34x)."""
    layout = BlockLayout.random(4096, 4096, 128, 0.1, generator=torch.Generator().manual_seed(0))
    line = roofline.sparse_roofline("forward", 8192, layout, 2, 730.0, 3.0)
    assert line.limited_by == "memory"
    assert line.bytes >= 2 * 8192 * 4096 * 2 * 0.95
    dense = roofline.dense_roofline(8192, 4096, 4096, 2, 730.0, 3.0)
    assert dense.limited_by == "compute"
    assert 1.1 < line.bound_s / (layout.density * dense.bound_s) < 1.3
    h200 = roofline.sparse_roofline("forward", 8192, layout, 2, roofline.H200_TFLOPS, roofline.H200_TBPS)
    assert h200.limited_by == "compute"


def test_cli_writes_csv_and_report(tmp_path):
    assert roofline.main(["--configs", "350m", "--densities", "0.25,0.1", "--tokens", "8192",
                          "--out-dir", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "roofline.csv")))
    assert len(rows) == 3 * 2 * 3  # shapes x densities x ops
    qkvo = [r for r in rows if r["shape"] == "350m:qkvo" and r["density"] == "0.1" and r["op"] == "forward"][0]
    assert qkvo["limited_by"] == "memory" and float(qkvo["max_dense_efficiency"]) < 1.0
    text = (tmp_path / "roofline.md").read_text()
    assert "Bars beyond the roofline" in text and "python -m profiling.roofline --configs 350m" in text


def test_a_bound_just_above_the_bar_is_listed_beyond_the_roofline_though_its_efficiency_rounds_to_one(tmp_path):
    """350m qkvo weight grad at d = 0.25 is memory-bound (1.2622 × d × dense at 4.3 TB/s); at 4.335 TB/s its bound
    is 1.2622 × 4.3 / 4.335 = 1.252 × d × dense > 1.25, and 1.25 / 1.252 = 0.9984 rounds to 1.0 at two digits. The
    forward and input grad (1.3507 × 4.3 / 4.335 = 1.340) are beyond too: 3 of the 9 cases (d = 0.05 has no bar)."""
    rows = roofline.bar_rows(["350m"], [0.25, 0.05], [8192], 128, 2, 780.0, 4.335)
    grad_weight = next(r for r in rows if r["shape"] == "350m:qkvo" and r["op"] == "grad_weight")
    assert (grad_weight["bound_vs_d_dense"], grad_weight["max_dense_efficiency"]) == (1.25, 0.99)
    text = roofline.write_report(rows, tmp_path, "test", 780.0, 4.335).read_text()
    assert "(`bound_vs_d_dense` > bar): 3 of 9 cases with a bar." in text


@pytest.mark.parametrize("option", ["--tflops", "--tbps"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_ceiling_that_is_not_a_finite_positive_number_is_refused(tmp_path, option, value, capsys):
    """``nan <= 0`` is False: a NaN ceiling passed, every bound was NaN and ``min(1.0, bar / NaN)`` is 1.0, so the
    report said no bar is beyond the roofline."""
    error = usage_error(roofline.main, ["--configs", "350m", option, value, "--out-dir", str(tmp_path)], capsys)
    assert error.startswith("python -m profiling.roofline: error: --tflops and --tbps must be finite and > 0")
    assert not (tmp_path / "roofline.md").exists()


@pytest.mark.parametrize("option, value, message", [
    ("--tflops", "0", "--tflops and --tbps must be finite and > 0, got 0 and 4.3"),
    ("--configs", "70b", "--configs must be from tiny,20m,60m,130m,350m,1b,7b, got 70b"),
    ("--densities", "0.5,2", "--densities must be in (0, 1], got 2.0"),
    ("--tokens", "8192,0", "--tokens must be positive, got 0"),
    ("--configs", "350m,tiny", "--block-size 128 does not divide the hidden size 64 of --configs tiny"),
    ("--out-dir", "{tmp}/a_file", "--out-dir '{tmp}/a_file' exists and is not a folder"),
])
def test_a_bad_option_exits_2_with_one_line_naming_it(tmp_path, option, value, message, capsys):
    (tmp_path / "a_file").write_text("")
    argv = ["--out-dir", str(tmp_path / "out"), option, value.format(tmp=tmp_path)]
    error = usage_error(roofline.main, argv, capsys)
    assert error == f"python -m profiling.roofline: error: {message.format(tmp=tmp_path)}"
    assert not (tmp_path / "out").exists()


def test_expected_used_lines_matches_random_layouts():
    for lines, per_line, density in ((32, 32, 0.1), (8, 86, 0.05), (4, 4, 0.5)):
        nnz = round(density * lines * per_line)
        counts = [
            int(BlockLayout.random(per_line * 16, lines * 16, 16, nnz / (lines * per_line),
                                   generator=torch.Generator().manual_seed(seed)).mask.any(0).sum())
            for seed in range(200)
        ]
        assert abs(sum(counts) / len(counts) - roofline.expected_used_lines(lines, per_line, nnz)) < 0.15
    assert roofline.expected_used_lines(4, 4, 16) == 4.0


def test_expected_used_lines_counts_a_line_emptied_only_when_every_other_slot_is_taken():
    """2 lines of 2: one block leaves one line empty; two blocks leave one empty in 1 of the C(4, 2) = 6 placements
    (2 · 5/6 = 5/3 used); three always use both."""
    assert roofline.expected_used_lines(2, 2, 1) == pytest.approx(1.0)
    assert roofline.expected_used_lines(2, 2, 2) == pytest.approx(5 / 3)
    assert roofline.expected_used_lines(2, 2, 3) == 2.0


def test_with_unlimited_bandwidth_every_bound_is_exactly_d_times_dense_at_the_drawn_density():
    """Compute-bound everywhere: the sparse bound is the exact density of the drawn layout (6 of the 64 blocks of
    the 350m attention weights at d = 0.1, not 0.1) times the dense bound, so every bar is within reach."""
    rows = roofline.bar_rows(["350m"], [0.1, 0.25], [8192], 128, 2, 730.0, 1e9)
    assert {row["bound_vs_d_dense"] for row in rows} == {1.0}
    assert {row["max_dense_efficiency"] for row in rows} == {1.0}


def test_each_row_bounds_a_layout_of_the_weight_as_it_is_stored_n_by_k():
    """The MLP weights are not square: a layout drawn as ``[K, N]`` would count the other side's block lines (which
    set the bound: memory-bound at 1 TB/s)."""
    rows = roofline.bar_rows(["350m"], [0.1], [8192], 128, 2, 780.0, 1.0)
    for row in rows:
        layout = BlockLayout.random(row["N"], row["K"], 128, 0.1, generator=torch.Generator().manual_seed(0))
        bound = roofline.sparse_roofline(row["op"], 8192, layout, 2, 780.0, 1.0).bound_s
        assert row["sparse_bound_us"] == round(bound * 1e6, 1), row


def test_the_roofline_table_of_the_kernel_notes_matches_the_reports():
    """``bench/KERNEL_NOTES.md``: per config and density, the lowest and highest ``bound_vs_d_dense`` of
    ``reports/roofline-h200-anchors`` (the H100's of ``reports/roofline-h100-anchors`` in brackets; none: the same)."""
    root = Path(__file__).resolve().parents[1]

    def ranges(report: str) -> dict[tuple[str, float], tuple[float, float]]:
        found: dict[tuple[str, float], list[float]] = {}
        with open(root / "reports" / report / "roofline.csv") as handle:
            for row in csv.DictReader(handle):
                key = (row["shape"].split(":")[0], float(row["density"]))
                found.setdefault(key, []).append(float(row["bound_vs_d_dense"]))
        return {key: (min(values), max(values)) for key, values in found.items()}

    def cell(text: str) -> tuple[float, float]:
        low, _, high = text.partition("–")
        return float(low), float(high or low)

    h200, h100 = ranges("roofline-h200-anchors"), ranges("roofline-h100-anchors")
    notes = (root / "bench" / "KERNEL_NOTES.md").read_text().splitlines()
    header = next(i for i, line in enumerate(notes) if line.startswith("| shapes | d = 0.5 |"))
    densities = [float(re.search(r"d = ([0-9.]+)", c).group(1)) for c in notes[header].strip("|").split("|")[1:]]
    rows = [line for line in notes[header + 2:] if line.startswith("| ")][:3]
    assert {row.split("|")[1].split()[0] for row in rows} == {"7b", "1b", "350m"}
    for row in rows:
        config, *cells = [c.strip() for c in row.strip("|").split("|")]
        for density, text in zip(densities, cells):
            main, _, bracket = text.partition(" (")
            key = (config.split()[0], density)
            assert cell(main) == pytest.approx(h200[key], abs=0.006), (key, text)
            assert cell(bracket.rstrip(")") or main) == pytest.approx(h100[key], abs=0.006), (key, text)


def test_the_help_says_that_out_dir_is_required_with_no_default(capsys):
    with pytest.raises(SystemExit):
        roofline.main(["--help"])
    assert "roofline.md (required; no default)" in " ".join(capsys.readouterr().out.split())


def test_a_trailing_comma_in_a_list_option_is_ignored(tmp_path):
    assert roofline.main(["--configs", "350m,", "--densities", "0.25,", "--tokens", "8192,", "--out-dir",
                          str(tmp_path)]) == 0
    assert len(list(csv.DictReader(open(tmp_path / "roofline.csv")))) == 3 * 3


@pytest.mark.parametrize("option", ["--configs", "--densities", "--tokens"])
def test_a_list_option_given_no_value_exits_2_naming_it_rather_than_an_index_error(tmp_path, option, capsys):
    error = usage_error(roofline.main, ["--out-dir", str(tmp_path / "out"), option, ","], capsys)
    assert error == f"python -m profiling.roofline: error: {option} names no value: give at least one"
    assert not (tmp_path / "out").exists()
