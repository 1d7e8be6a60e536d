"""smet-bench gpu-check, the sections of gpu_check.md on hand-made rows: kernel bars, variants, predictions,
compact AdamW, training bars, and a section that cannot render."""

import pandas as pd
import pytest

from bench.gpu_check.plan import CPU
from bench.results import KERNEL_COLUMNS, TRAINING_COLUMNS


def test_a_section_that_cannot_render_says_so_and_the_others_still_render(tmp_path, monkeypatch):
    from bench.gpu_check import summary

    def broken(*args):
        raise KeyError("tflops")

    monkeypatch.setattr(summary, "variant_section", broken)
    path = summary.write(tmp_path, CPU, {"device": "cpu-test"}, [{"stage": "env", "status": "done"}], ([], []), None,
                         "smet-bench gpu-check")  # fmt: skip
    text = path.read_text()
    assert "## Kernel variants\n\nCould not render this section: KeyError: 'tflops'" in text
    assert "## Kernel bars" in text and "## Training steps" in text


@pytest.mark.parametrize("status, says", [("not selected", "Not selected."),
                                           ("stopped by SIGTERM after 5 s", "No check has finished yet")])
def test_a_correctness_stage_without_rows_says_whether_it_was_selected_or_stopped(tmp_path, status, says):
    from bench.gpu_check import summary

    path = summary.write(tmp_path, CPU, {"device": "cpu-test"}, [{"stage": "correctness", "status": status}],
                         ([], []), None, "smet-bench gpu-check")  # fmt: skip
    assert path.read_text().split("## Correctness\n\n", 1)[1].startswith(says)


def test_checks_the_budget_stopped_before_any_finished_are_counted_and_listed_as_not_run():
    """With no row but checks not run, the section read "No check has finished yet" (a dropped guard): the checks
    the budget cut would be neither counted nor named."""
    from bench.gpu_check.summary import correctness_section

    text = "\n".join(correctness_section([], ["matmul grouped fp16 b=32 forward"], selected=True))
    assert "0 of 0 checks pass, 0 fail, 1 not run." in text
    assert "Not run (budget): matmul grouped fp16 b=32 forward" in text


def test_the_matmul_bound_of_each_dtype_is_stated_as_its_lowest_to_highest_value():
    """The bound is measured per dtype and op (2 × PyTorch's own error): the summary must say which was applied."""
    from bench.gpu_check.summary import correctness_section

    rows = [{"check": "matmul", "dtype": dtype, "block_size": 16, "error": bound / 2, "bound": bound, "status": "pass"}
            for dtype, bound in (("fp16", 2e-3), ("fp16", 5e-4), ("fp32", 1e-6))]  # fmt: skip
    rows.append({"check": "adamw", "dtype": "bf16", "error": 0.5, "bound": 1e-2, "status": "fail"})
    text = "\n".join(correctness_section(rows, []))
    assert "Matmul bound per dtype: ‖out − ref‖ / ‖ref‖ against float64 ≤ max(2 × PyTorch's own error" in text
    assert "1e-6): fp16 0.0005–0.002, fp32 1e-06–1e-06. Each check ran twice on NaN-poisoned outputs" in text


def _kernel_frame(rows: list[dict]) -> pd.DataFrame:
    """Hand-made rows of kernels.csv: every column of it, None where a row gives no value."""
    return pd.DataFrame([dict.fromkeys(KERNEL_COLUMNS) | row for row in rows], columns=KERNEL_COLUMNS)


def test_the_variant_table_ranks_the_selectable_variants_by_geometric_mean_time_against_grouped():
    """persistent does not change the weight grad (it runs grouped there: ratio 1); plain_order is the benchmark's
    baseline order, shown per op but not something ``SMET_MATMUL_VARIANT`` can select."""
    from bench.gpu_check.summary import variant_section

    def row(op, provider, density, ms):
        nnz = None if provider == "cublas_dense" else int(density * 4)
        return dict(
            suite="kernels", op=op, provider=provider, shape="s", M=256, K=256, N=256, dtype="bf16", gpu="g",
            block_size=None if nnz is None else 128, density=density, nnz_blocks=nnz, ms_p20=ms, ms_p50=ms,
            ms_p80=ms, status="ok")

    times = {  # (op, density): ms per provider
        ("forward", 0.5): {"triton_grouped": 1.0, "triton_persistent": 0.5, "triton_tma": 2.0,
                           "triton_plain_order": 0.1},
        ("forward", 0.25): {"triton_grouped": 2.0, "triton_persistent": 2.0, "triton_tma": 1.0,
                            "triton_plain_order": 0.2},
        ("grad_input", 0.5): {"triton_grouped": 1.0, "triton_persistent": 0.5, "triton_tma": 2.0},
        ("grad_input", 0.25): {"triton_grouped": 2.0, "triton_persistent": 2.0, "triton_tma": 1.0},
        ("grad_weight", 0.5): {"triton_grouped": 1.0, "triton_tma": 4.0},
        ("grad_weight", 0.25): {"triton_grouped": 1.0, "triton_tma": 1.0},
    }  # fmt: skip
    rows = [row(op, "cublas_dense", 1.0, 4.0) for op in ("forward", "grad_input", "grad_weight")]
    rows += [row(op, p, d, ms) for (op, d), by in times.items() for p, ms in by.items()]
    lines = variant_section(_kernel_frame(rows))
    assert "over every op and block size, `persistent` is the fastest (0.794× grouped)" in "\n".join(lines)
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
             for line in lines[4].splitlines()[2:]}  # fmt: skip
    header = [c.strip() for c in lines[4].splitlines()[0].strip("|").split("|")]
    assert header == ["op", "b", "points", "grouped", "persistent", "plain_order", "tma", "fastest (points)"]
    assert cells["forward"] == ["forward", "128", "2", "1.000", "0.707", "0.100", "1.000", "plain_order 2"]
    assert cells["grad_weight"][:7] == ["grad_weight", "128", "2", "1.000", "", "", "2.000"]
    assert cells["all"][:7] == ["all", "", "6", "1.000", "0.794", "", "1.260"]  # 0.5^(2/6), 4^(1/6)
    assert sorted(cells["all"][7].split(", ")) == ["grouped 2", "persistent 2", "tma 2"]
    # a point at another token count is a point of its own, not averaged into the first one's times
    more = rows + [row("forward", p, 0.5, ms) | {"M": 512} for p, ms in (("triton_grouped", 10.0),
                                                                         ("triton_persistent", 10.0))]  # fmt: skip
    forward = next(line for line in variant_section(_kernel_frame(more))[4].splitlines() if line.startswith("| forw"))
    assert [c.strip() for c in forward.strip("|").split("|")][2:5] == ["3", "1.000", "0.794"]  # 0.5^(1/3)


def test_each_kernel_notes_prediction_is_set_beside_its_measured_geometric_mean_and_judged():
    from bench.gpu_check.predictions import PREDICTIONS, prediction_section

    def row(op, provider, density, ms, shape="s", block_size=128):
        nnz = None if provider == "cublas_dense" else int(density * 4)
        return dict(
            suite="kernels", op=op, provider=provider, shape=shape, M=256, K=256, N=256, dtype="bf16", gpu="g",
            block_size=None if nnz is None else block_size, density=density, nnz_blocks=nnz, ms_p20=ms, ms_p50=ms,
            ms_p80=ms, status="ok")

    rows = [row(op, "cublas_dense", 1.0, 4.0, shape) for op in ("forward", "grad_input") for shape in ("s", "t")]
    # grouped forward at d = 0.5 (exact: 2 of 4 blocks): 2.4 ms and 2.6 ms = 1.2x and 1.3x d×dense, geomean 1.249
    rows += [row("forward", "triton_grouped", 0.5, 2.4), row("forward", "triton_grouped", 0.5, 2.6, "t")]
    rows += [row("forward", "triton_tma", 0.5, 2.4 * 0.5), row("forward", "triton_tma", 0.5, 2.6 * 0.5, "t")]
    rows += [row("forward", "triton_persistent", 0.5, 2.4 * 1.2, "s", block_size=64)]  # another block size
    rows += [row("forward", "triton_plain_order", 0.5, 2.4 * 1.3), row("forward", "triton_plain_order", 0.5, 9.9,
                                                                        "u")]  # no grouped row on u: unpaired
    rows += [dict(suite="optimizer", op="copy", provider="device_copy", shape="dense:ceiling", gbps=4000.0),
             dict(suite="optimizer", op="adamw", provider="smet_adamw", shape="1b:hidden", density=0.25, gbps=3960.0)]
    lines = prediction_section(_kernel_frame(rows), 128)
    assert lines[0] == "## Predicted (bench/KERNEL_NOTES.md) vs measured"
    body = lines[4].splitlines()[2:]
    assert len(body) == len(PREDICTIONS)
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in body]
    by = {(c[1], c[2].split(",")[0], c[3]): c for c in cells}
    assert by[("triton_grouped", "forward", "0.5, 0.25")][5:] == ["1.1–1.3", "1.25", "2", "within"]
    assert by[("triton_tma", "forward", "0.5, 0.25")][5:] == ["0.9–1", "0.5", "2", "better than predicted"]
    assert by[("triton_plain_order", "forward", "0.5, 0.25")][5:] == ["1.2–1.4", "1.3", "1", "within"]
    assert by[("triton_persistent", "forward", "0.5, 0.25")][5:] == ["0.95–1.05", "", "0", "not measured"]
    assert by[("smet_adamw", "adamw", "0.25")][4:] == ["of copy", "0.88–0.98", "0.99", "1", "better than predicted"]
    assert by[("triton_grouped", "forward", "0.1")][-1] == by[("triton_grouped", "grad_weight", "0.5, 0.25")][-1] \
        == "not measured"
    slower = prediction_section(_kernel_frame(rows[:4] + [row("forward", "triton_grouped", 0.5, 4.0)]), 128)
    assert "| worse than predicted |" in slower[4].splitlines()[2]


def test_a_prediction_is_judged_on_the_geometric_mean_of_its_ok_points_and_a_nan_point_leaves_it_not_measured():
    """grouped forward at d = 0.5: 1.0× and 1.65× d×dense, geometric mean 1.28 (within 1.1–1.3) where the arithmetic
    mean, 1.33, is worse; a timed case whose result was wrong (0.1×) must not count, and a point without a dense row
    (NaN) must not be dropped: the value would stand on fewer points than the table says."""
    from bench.gpu_check.predictions import prediction_section

    def row(shape, provider, ms, status="ok", m=256):
        sparse = provider != "cublas_dense"
        return dict(suite="kernels", op="forward", provider=provider, shape=shape, M=m, K=256, N=256, dtype="bf16",
                    gpu="g", block_size=128 if sparse else None, density=0.5 if sparse else 1.0,
                    nnz_blocks=2 if sparse else None, ms_p50=ms, status=status)  # fmt: skip

    rows = [row(shape, "cublas_dense", 4.0) for shape in ("s", "t", "w")]
    rows += [row("s", "triton_grouped", 2.0), row("t", "triton_grouped", 3.3), row("w", "triton_grouped", 0.2, "wrong")]

    def grouped_cells(frame_rows):
        body = prediction_section(_kernel_frame(frame_rows), 128)[4].splitlines()[2:]
        return next([c.strip() for c in line.strip("|").split("|")][5:] for line in body
                    if "| v2 grouped order " in line)  # fmt: skip

    assert grouped_cells(rows) == ["1.1–1.3", "1.28", "2", "within"]
    assert grouped_cells(rows + [row("u", "triton_grouped", 2.0, m=512)])[-2:] == ["3", "not measured"]


def test_a_variant_is_paired_with_grouped_at_its_own_density_and_adamw_is_the_mean_fraction_of_the_best_ceiling():
    from bench.gpu_check.predictions import prediction_section

    def kernel(provider, density, ms):
        sparse = provider != "cublas_dense"
        return dict(suite="kernels", op="forward", provider=provider, shape="s", M=256, K=256, N=256, dtype="bf16",
                    gpu="g", block_size=128 if sparse else None, density=density,
                    nnz_blocks=int(density * 4) if sparse else None, ms_p50=ms, status="ok")  # fmt: skip

    def optimizer(provider, shape, gbps, density=1.0):
        return dict(suite="optimizer", op="copy" if provider == "device_copy" else "adamw", provider=provider,
                    shape=shape, density=density, gbps=gbps)  # fmt: skip

    def cells(frame_rows):
        body = prediction_section(_kernel_frame(frame_rows), 128)[4].splitlines()[2:]
        rows = [[c.strip() for c in line.strip("|").split("|")] for line in body]
        return {(c[1], c[3]): c[5:] for c in rows}

    # triton_tma at 0.95x grouped at each density: 2 points (pairs across densities would make 4)
    rows = [kernel("cublas_dense", 1.0, 4.0), kernel("triton_grouped", 0.5, 2.0), kernel("triton_grouped", 0.25, 1.0),
            kernel("triton_tma", 0.5, 1.9), kernel("triton_tma", 0.25, 0.95)]  # fmt: skip
    # two copy ceilings (two runs into the folder): the best counts; compact AdamW at 0.8 and 1.0 of it: mean 0.9
    rows += [optimizer("device_copy", "dense:ceiling", 4000.0), optimizer("device_copy", "dense:ceiling", 2000.0),
             optimizer("smet_adamw", "1b:hidden", 3200.0, 0.25), optimizer("smet_adamw", "350m:hidden", 4000.0, 0.25),
             optimizer("smet_adamw", "1b:hidden", 400.0, 0.5)]  # another density: not this prediction's point
    measured = cells(rows)
    assert measured[("triton_tma", "0.5, 0.25")] == ["0.9–1", "0.95", "2", "within"]
    # the same points in fp16 too (another run into the folder): each variant row pairs with grouped of its dtype
    fp16 = [row | {"dtype": "fp16", "ms_p50": row["ms_p50"] * 3} for row in rows[:5]]
    assert cells(rows + fp16)[("triton_tma", "0.5, 0.25")] == ["0.9–1", "0.95", "4", "within"]
    assert measured[("smet_adamw", "0.25")] == ["0.88–0.98", "0.9", "2", "within"]
    at_the_edge = [optimizer("device_copy", "dense:ceiling", 4000.0),
                   optimizer("smet_adamw", "1b:hidden", 3920.0, 0.25)]  # 0.98: the top of the range
    assert cells(at_the_edge)[("smet_adamw", "0.25")] == ["0.88–0.98", "0.98", "1", "within"]


def test_the_variant_table_says_not_measured_without_a_second_variant():
    from bench.gpu_check.summary import variant_section

    assert "Not measured" in variant_section(None)[2]


def _bar_rows() -> pd.DataFrame:
    """grad_input of W [128, 2048] (one block row: the op reads M × 128 of dy whatever the layout) in bf16 at 6.5536
    GB/s of device copy, so an op's memory term is (2176 M + 16384 nnz) · 2 bytes / 6.5536 GB/s:

    * ``p1`` b=128 d=0.5 (8 of 16 blocks) M=512: memory 0.38 ms < compute 0.5 × 1.0 ms; t = 0.625 = 1.25 × d×dense,
      torch BSR 1.5 × slower;
    * ``p2`` b=128 d=0.1 drawn as 2 of 16 blocks (exact d = 0.125) M=256: memory 0.18 ms ≤ 0.125 × 1.6 ms, compute-
      bound (but > 0.1 × 1.6 ms); t = 1.55 × 0.125 × 1.6 ms;
    * ``p3`` b=128 d=0.25 (4 blocks) M=768: memory 0.53 ms > 1.25 × 0.25 × 1.0 ms; t = 1.22 × 0.53 ms;
    * ``p4`` b=128 d=0.5 M=1024: memory 0.72 ms; t = the dense time, 1.0 ms;
    * ``p5`` b=64 d=0.5 (32 of 64 blocks) M=512: t = 0.3 ms, no kernel bar (not the first block size);
    * ``p6`` b=128 d=0.1 (2 blocks) M=384: memory 0.265 ms > 0.125 × 1.6 ms, memory-bound (though ≤ 1.6 × that);
      t = 1.15 × 0.265 ms."""
    base = {"suite": "kernels", "op": "grad_input", "K": 2048, "N": 128, "dtype": "bf16", "gpu": "g", "status": "ok"}
    rows = [base | {"suite": "optimizer", "op": "copy", "provider": "device_copy", "shape": "dense:s", "N": 1024,
                    "K": 1024, "ms_p50": 1.28}]  # fmt: skip: 1024² × 8 bytes in 1.28 ms = 6.5536 GB/s
    rows += [base | {"provider": "cublas_dense", "shape": "dense", "M": m, "density": 1.0, "ms_p50": ms}
             for m, ms in ((256, 1.6), (384, 1.6), (512, 1.0), (768, 1.0), (1024, 1.0))]  # fmt: skip
    points = (("p1", 512, 128, 0.5, 8, 0.625), ("p2", 256, 128, 0.1, 2, 1.55 * 0.125 * 1.6),
              ("p3", 768, 128, 0.25, 4, 1.22 * 0.53), ("p4", 1024, 128, 0.5, 8, 1.0), ("p5", 512, 64, 0.5, 32, 0.3),
              ("p6", 384, 128, 0.1, 2, 1.15 * 0.265))
    for shape, m, b, d, nnz, ms in points:
        rows.append(base | {"provider": "triton_grouped", "shape": shape, "M": m, "block_size": b, "density": d,
                            "nnz_blocks": nnz, "ms_p50": ms})  # fmt: skip
    rows.append(rows[-6] | {"provider": "torch_bsr", "ms_p50": 1.5 * 0.625})
    return _kernel_frame(rows)


def _markdown_rows(lines: list[str]) -> dict[str, dict[str, str]]:
    """The cells of the first table of ``lines`` by column, per row keyed by its first cell."""
    text = next(line for line in lines if line.startswith("| "))
    table = [line for line in text.splitlines() if line.startswith("|")]  # not the note below it
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    rows = [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in table[2:]]
    return {row[header[0]]: row for row in rows}


def test_each_kernel_bar_is_judged_against_d_dense_where_the_op_is_compute_bound_at_its_exact_density():
    from bench.gpu_check.plan import GPU
    from bench.gpu_check.summary import kernel_section

    lines = kernel_section(_bar_rows(), GPU)
    rows = _markdown_rows(lines)
    kernel = {shape: (row["kernel bar"], row["kernel"]) for shape, row in rows.items()}
    assert kernel == {"p1": ("≤ 1.25 × d×dense", "pass"), "p2": ("≤ 1.6 × d×dense", "pass"),
                      "p3": ("≤ 1.2 × roofline", "miss"), "p4": ("≤ 1.2 × roofline", "miss"), "p5": ("", ""),
                      "p6": ("≤ 1.2 × roofline", "pass")}
    assert (rows["p1"]["vs d×dense"], rows["p2"]["vs d×dense"], rows["p3"]["vs roofline"]) == ("1.25", "1.55", "1.22")
    assert rows["p6"]["vs roofline"] == "1.15"
    assert [rows[p]["roofline term"] for p in ("p1", "p2", "p3", "p6")] == ["compute", "compute", "memory", "memory"]
    assert (rows["p1"]["vs BSR"], rows["p1"]["BSR ≥ 1.5×"], rows["p2"]["BSR ≥ 1.5×"]) == ("1.5", "pass",
                                                                                           "not measured")
    assert {shape: row["≤ dense"] for shape, row in rows.items()} == dict.fromkeys(rows, "pass")  # p4: t = t_dense
    assert "* kernel: 3 pass, 2 miss, 0 not measured" in lines


def test_a_kernel_point_is_compared_with_the_other_providers_at_its_own_token_count_and_dtype():
    """A DIR that also holds rows of another M or dtype (``smet-bench run`` into it): the last such row of a provider
    was taken as this point's time."""
    from bench.gpu_check.plan import GPU
    from bench.gpu_check.summary import kernel_section

    frame = _bar_rows()
    bsr = frame[(frame["shape"] == "p1") & (frame["provider"] == "torch_bsr")].iloc[0].to_dict()
    others = pd.DataFrame([bsr | {"M": 2048, "ms_p50": 0.1}, bsr | {"dtype": "fp16", "ms_p50": 0.1}])
    rows = _markdown_rows(kernel_section(pd.concat([frame, others], ignore_index=True), GPU))
    assert (rows["p1"]["vs BSR"], rows["p1"]["BSR ≥ 1.5×"]) == ("1.5", "pass")


def test_a_kernel_bar_without_a_copy_ceiling_is_reported_not_measured_rather_than_left_out():
    """Without a device-copy row (stage env and adamw not run) no op has a roofline, so whether the d×dense bar
    applies is unknown: each b = 128 point is 'not measured', and counted so."""
    from bench.gpu_check.plan import GPU
    from bench.gpu_check.summary import kernel_section

    frame = _bar_rows()
    lines = kernel_section(frame[frame["suite"] == "kernels"], GPU)
    assert {shape: row["kernel"] for shape, row in _markdown_rows(lines).items()} == {
        "p1": "not measured", "p2": "not measured", "p3": "not measured", "p4": "not measured", "p5": "",
        "p6": "not measured"}
    assert "* kernel: 0 pass, 0 miss, 5 not measured" in lines


def test_a_kernel_point_whose_timed_result_was_wrong_is_not_judged_and_is_named():
    """The kernels stage times a case whose result failed its check (status ``wrong``): its time must not pass a
    bar, and the point must not silently vanish from the counts (they read all pass with the wrong point gone)."""
    from bench.gpu_check.plan import GPU
    from bench.gpu_check.summary import kernel_section

    frame = _bar_rows()
    wrong = (frame["shape"] == "p1") & (frame["provider"] == "triton_grouped")
    frame.loc[wrong, ["status", "note"]] = ["wrong", "max relative error 0.5 > 0.02"]
    lines = kernel_section(frame, GPU)
    assert "p1" not in _markdown_rows(lines)
    assert ("* not judged: p1 b=128 d=0.5 grad_input triton_grouped: wrong (max relative error 0.5 > 0.02)"
            in lines), lines
    assert "* kernel: 2 pass, 2 miss, 0 not measured" in lines


def test_without_a_correct_dense_time_no_kernel_bar_is_judged():
    """cuBLAS rows whose result failed their check (status wrong) are no reference: the d×dense, roofline and
    ≤ dense bars are not measured, neither judged against a wrong dense time nor read as a miss of a NaN."""
    from bench.gpu_check.plan import GPU
    from bench.gpu_check.summary import kernel_section

    frame = _bar_rows()
    frame.loc[frame["provider"] == "cublas_dense", "status"] = "wrong"
    rows = _markdown_rows(kernel_section(frame, GPU))
    assert {shape: (row["kernel"], row["≤ dense"]) for shape, row in rows.items()} == {
        "p1": ("not measured", "not measured"), "p2": ("not measured", "not measured"),
        "p3": ("not measured", "not measured"), "p4": ("not measured", "not measured"), "p5": ("", "not measured"),
        "p6": ("not measured", "not measured")}


def _optimizer_rows(smet_gbps: float) -> pd.DataFrame:
    base = {"suite": "optimizer", "dtype": "fp32", "gpu": "g", "status": "ok"}
    return _kernel_frame([base | {"op": "copy", "provider": "device_copy", "shape": "dense:ceiling", "density": 1.0,
                                  "ms_p50": 1.0, "gbps": 1000.0},
                          base | {"op": "adamw", "provider": "smet_adamw", "shape": "compact:1b:hidden",
                                  "density": 0.25, "block_size": 128, "ms_p50": 1.0, "gbps": smet_gbps}])  # fmt: skip


@pytest.mark.parametrize("gbps, verdict", [(900.0, "90.0% of the copy ceiling (1000 GB/s, bytes read + written) — "
                                                    "**pass**"),
                                           (850.0, "85.0% of the copy ceiling (1000 GB/s, bytes read + written) — "
                                                    "**miss**")], ids=["90%", "85%"])  # fmt: skip
def test_compact_adamw_passes_at_90_percent_of_the_copy_ceiling_and_no_lower(gbps, verdict):
    from bench.gpu_check.summary import adamw_section

    assert f"Bar: compact AdamW at {verdict} (≥ 90%)." in adamw_section(_optimizer_rows(gbps))


def test_compact_adamw_is_judged_by_its_slowest_row_against_the_best_copy_ceiling():
    """A folder that also holds a ``smet-bench run`` (more copy and compact rows): not whichever row comes first."""
    from bench.gpu_check.summary import adamw_section

    rows = _optimizer_rows(950.0)
    more = rows.assign(gbps=[800.0, 1000.0], shape=["dense:ceiling", "compact:350m:hidden"])
    lines = adamw_section(pd.concat([more, rows], ignore_index=True))
    assert "Bar: compact AdamW at 95.0% of the copy ceiling (1000 GB/s, bytes read + written) — **pass**" in lines[-2]
    lines = adamw_section(pd.concat([rows, more.assign(gbps=[800.0, 850.0])], ignore_index=True))
    assert "Bar: compact AdamW at 85.0% of the copy ceiling (1000 GB/s" in lines[-2] and "**miss**" in lines[-2]


def _training_rows(smet: dict | None = None) -> pd.DataFrame:
    """dense 1000 tokens/s, 10 GiB; SMET (d = 0.25) 1200 tokens/s, 6 GiB (``smet`` replaces values); GaLore 500
    tokens/s, 5 GiB; SMET with activation checkpointing 900 tokens/s, 4 GiB; all at 1b."""
    gib = 2**30
    base = dict.fromkeys(TRAINING_COLUMNS) | {"config": "1b", "density": 1.0, "block_size": 128, "batch_size": 32,
                                              "seq_len": 256, "dtype": "bf16", "compiled": False,
                                              "activation_checkpointing": False, "vocab_size": 32000, "gpu": "g",
                                              "status": "ok", "nvml_status": "ok",
                                              "pred_peak_bytes": 8 * gib}  # fmt: skip
    rows = [base | {"method": "dense", "tokens_per_s": 1000.0, "peak_allocated_bytes": 10 * gib},
            base | {"method": "smet", "density": 0.25, "tokens_per_s": 1200.0, "peak_allocated_bytes": 6 * gib}
            | (smet or {}),
            base | {"method": "galore", "tokens_per_s": 500.0, "peak_allocated_bytes": 5 * gib},
            base | {"method": "smet", "density": 0.25, "activation_checkpointing": True, "tokens_per_s": 900.0,
                    "peak_allocated_bytes": 4 * gib}]  # fmt: skip
    return pd.DataFrame(rows, columns=TRAINING_COLUMNS)


def test_the_training_bars_compare_the_eager_unchecked_smet_step_with_dense_and_galore():
    """SMET: 1.2 × the dense tokens/s, 0.6 × its peak, 1.2 × GaLore's peak; its checkpointed row (less memory, fewer
    tokens/s) must not stand in for it."""
    from bench.gpu_check.plan import GPU
    from bench.gpu_check.summary import training_section

    text = "\n".join(training_section(_training_rows(), GPU, None))
    assert "* SMET tokens/s vs dense at 1b: 1.200× — **pass** (more is the bar)" in text
    assert "* SMET peak memory vs dense at 1b: 0.600× — **pass** (less is the bar)" in text
    assert "* SMET peak memory vs galore at 1b: 1.200× — **miss** (less is the bar)" in text


@pytest.mark.parametrize("column, value", [("batch_size", 8), ("seq_len", 512), ("dtype", "fp32"),
                                           ("block_size", 64), ("vocab_size", 256), ("density", 0.5)])
def test_training_rows_of_other_sizes_than_the_plan_s_are_left_out_of_the_table_and_the_bars(column, value):
    """Another run into the same folder adds rows of other sizes: its SMET row, read last, stood in for this run's."""
    from bench.gpu_check.plan import GPU
    from bench.gpu_check.summary import training_section

    rows = _training_rows()
    other = rows[rows["method"] == "smet"].head(1).assign(tokens_per_s=5000.0, **{column: value})
    text = "\n".join(training_section(pd.concat([rows, other], ignore_index=True), GPU, None))
    assert "* SMET tokens/s vs dense at 1b: 1.200× — **pass**" in text
    assert "5000" not in text and "1 row(s) of training.csv at other sizes than this plan's" in text


def test_a_smet_step_only_as_fast_or_as_large_as_dense_misses_the_training_bars():
    """More tokens/s and less peak memory are the bars: ``>=`` / ``<=`` would pass a tie, SMET no better than
    dense."""
    from bench.gpu_check.plan import GPU
    from bench.gpu_check.summary import training_section

    tie = _training_rows({"tokens_per_s": 1000.0, "peak_allocated_bytes": 10 * 2**30})
    text = "\n".join(training_section(tie, GPU, None))
    assert "* SMET tokens/s vs dense at 1b: 1.000× — **miss** (more is the bar)" in text
    assert "* SMET peak memory vs dense at 1b: 1.000× — **miss** (less is the bar)" in text


def test_a_training_bar_with_a_nan_measurement_is_not_measured_rather_than_judged():
    """A NaN tokens/s compared as a number reads as a miss (NaN > x is False); it must read not measured."""
    from bench.gpu_check.plan import GPU
    from bench.gpu_check.summary import training_section

    text = "\n".join(training_section(_training_rows({"tokens_per_s": float("nan")}), GPU, None))
    assert "* SMET tokens/s vs dense at 1b: not measured (no tokens_per_s on this device)" in text
    assert "* SMET peak memory vs dense at 1b: 0.600× — **pass**" in text


def test_a_zero_peak_or_tokens_per_s_leaves_the_checkpointing_ratio_empty_and_the_training_bars_judged():
    """``peak_on / peak_off`` of Python numbers raised ZeroDivisionError for a zero measurement: the whole training
    section, its bars with it, rendered as "could not render"."""
    from bench.gpu_check.plan import GPU
    from bench.gpu_check.summary import checkpointing_lines, training_section

    rows = _training_rows({"peak_allocated_bytes": 0.0, "tokens_per_s": 0.0})
    lines = checkpointing_lines(rows[rows["method"] == "smet"], "1b")
    assert len(lines) == 1 and "GiB (×; predicted" in lines[0] and "tokens/s × (peak:" in lines[0], lines
    text = "\n".join(training_section(rows, GPU, None))
    assert "* SMET tokens/s vs dense at 1b: 0.000× — **miss** (more is the bar)" in text


def test_a_smet_training_row_that_ran_out_of_memory_judges_no_training_bar():
    """An OOM row holds no steady measurement: judged, its numbers would pass bars it never reached."""
    from bench.gpu_check.plan import GPU
    from bench.gpu_check.summary import training_section

    text = "\n".join(training_section(_training_rows({"status": "oom"}), GPU, None))
    assert "* SMET tokens/s vs dense at 1b: not measured" in text
    assert "* SMET peak memory vs dense at 1b: not measured" in text and "**pass**" not in text


def test_the_nvml_peak_of_a_sampler_that_failed_mid_run_reads_as_a_lower_bound_with_its_reason():
    """The peak up to the failure is no step's NVML peak: the row says so, as report.md and memory.md do."""
    from bench.gpu_check.plan import GPU
    from bench.gpu_check.summary import training_section

    rows = _training_rows({"nvml_peak_bytes": 3 * 2**30, "nvml_status": "failed: GPU is lost"})
    rows.loc[rows["method"] == "dense", "nvml_peak_bytes"] = 11 * 2**30
    text = "\n".join(training_section(rows, GPU, None))
    cells = {line.split("|")[2].strip(): line.split("|")[7].strip() for line in text.splitlines()
             if line.startswith("| 1b ") and "| no " in line}  # NVML peak GiB by method, unchecked steps
    assert cells == {"dense": "11", "smet": "≥ 3 (failed: GPU is lost)", "galore": "ok"}


def test_a_compact_adamw_step_that_fails_its_check_misses_the_bar_however_fast():
    from bench.gpu_check.summary import adamw_section

    rows = _optimizer_rows(990.0)
    rows.loc[rows["provider"] == "smet_adamw", ["status", "note"]] = ["wrong", "max error 1 > 1e-07"]
    lines = adamw_section(rows)
    assert "wrong (max error 1 > 1e-07)" in "\n".join(lines)
    assert lines[-2] == "Bar: compact AdamW — **miss**: a step does not match its reference (status wrong above)."


def _plan_rows(sizes, gpu: str) -> list[dict]:
    """A kernels.csv row for each case of ``sizes``' plan, timed at 1 ms."""
    from bench.gpu_check import measure

    cases = [*measure.ceiling_cases(sizes), *measure.optimizer_cases(sizes)]
    for block_size in sizes.kernel_block_sizes:
        cases += [case for group in measure.kernel_cases(sizes, block_size) for case in group]
    rows = {case: case.key_row("triton") | {"ms_p50": 1.0, "tflops": 1.0, "gbps": 1.0, "status": "ok", "gpu": gpu,
                                            "nnz_blocks": None if case.block_size is None else max(1, round(
                                                case.density * case.shape.K * case.shape.N / case.block_size**2))}
            for case in cases}  # a dense case is in the cases of every block size
    return list(rows.values())


@pytest.mark.parametrize("column, change", [
    ("M", lambda m: 4096), ("dtype", lambda d: "bf16"), ("block_size", lambda b: 4 * b), ("density", lambda d: d / 5),
    ("shape", lambda shape: shape.replace("tiny", "20m")),
], ids=["tokens", "dtype", "block-size", "density", "shape"])  # fmt: skip
def test_kernel_rows_of_other_cases_than_the_plan_s_are_left_out_of_every_kernel_section(tmp_path, column, change):
    """``smet-bench run`` or a run at other sizes into the same folder: its rows (a faster ceiling, 1000 × faster
    kernels at another token count) set the ceilings, bars, variants and predictions of this run's summary."""
    from bench.gpu_check import summary
    from bench.results import kernels_file

    rows = _plan_rows(CPU, "cpu-test")
    ceiling = next(r for r in rows if r["shape"] == "ceiling") | {"K": 999, "tflops": 777.0}
    other = [r | {column: change(r[column])} | ({"ms_p50": 1e-3} if r["provider"] == "triton_grouped" else {})
             for r in rows if r["suite"] == "kernels" and r["shape"] != "ceiling"
             and (r["density"] < 1 or column not in ("block_size", "density"))]  # a dense row has neither
    file = kernels_file(tmp_path)
    for row in rows + other + [ceiling]:
        file.append(row)
    assert len(summary.kernels_of_this_plan(pd.read_csv(tmp_path / "kernels.csv"), CPU)) == len(rows)
    text = summary.write(tmp_path, CPU, {"device": "cpu-test"}, [], ([], []), None, "gpu-check").read_text()
    assert f"{len(other) + 1} row(s) of kernels.csv measure other cases than this plan's" in text
    assert "777" not in text and "0.001" not in text and "1000" not in text and "Could not render" not in text
