"""The memory-scaling grid (bench/memory_scaling.py): its cases, the rows planned for each, each case's optimizer."""

import csv

import pytest
import torch

from bench.memory_scaling import MemoryCase, build, memory_cases, memory_file, plan, run_plan
from smet_kernels.optim.smet_adamw import SMETAdamW


def test_the_grid_gives_galore_bf16_states_only_and_masked_and_smet_every_density():
    cases = memory_cases(configs=("20m",), batch_shapes=((8, 256),), vocab_sizes=(256,), checkpointing=(False,))
    expected = [("dense", 1.0, "fp32"), ("dense", 1.0, "bf16"), ("galore", 1.0, "bf16")]
    expected += [(m, d, s) for m in ("masked", "smet") for d in (0.5, 0.25, 0.1) for s in ("fp32", "bf16")]
    assert sorted((c.method, c.density, c.state_dtype) for c in cases) == sorted(expected)


def test_every_case_is_modelled_and_traced_and_measured_only_at_the_measured_size_batch_and_vocab():
    cases = list(memory_cases(configs=("20m", "130m"), methods=("dense",), batch_shapes=((8, 256), (32, 256)),
                              vocab_sizes=(256, 32000), state_dtypes=("bf16",), checkpointing=(False,)))  # fmt: skip
    pairs = plan(cases)
    assert pairs[: 2 * len(cases)] == [(case, source) for case in cases for source in ("model", "traced")]
    measured = [(c.config, c.batch_size, c.seq_len, c.vocab_size) for c, source in pairs[2 * len(cases) :]]
    assert measured == [("20m", 8, 256, 256)]


def test_each_row_names_the_device_it_was_made_on_and_a_rerun_writes_none_again(tmp_path):
    """Traced and modelled rows are made on ``meta``, measured ones on the CPU."""
    case = MemoryCase("tiny", "dense", 1.0, "bf16", 1, 16, 256, False, block_size=32)
    pairs = [(case, source) for source in ("model", "traced", "measured")]
    assert run_plan(pairs, memory_file(tmp_path), progress=False) == 3
    with (tmp_path / "memory.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["source"]: row["device"] for row in rows} == {"model": "meta", "traced": "meta", "measured": "cpu"}
    assert run_plan(pairs, memory_file(tmp_path), progress=False) == 0


def test_a_case_planned_twice_is_written_once(tmp_path):
    """Two GPU folders that measured the same case (an H100's and an H200's suite) each added it to the grid: the
    case was traced and modelled twice, and memory.csv and the GPU table of memory.md held every row twice."""
    case = MemoryCase("tiny", "dense", 1.0, "bf16", 1, 16, 256, False, block_size=32)
    twin = MemoryCase("tiny", "dense", 1.0, "bf16", 1, 16, 256, False, block_size=32)
    assert run_plan(plan([case, twin], measured_configs=()), memory_file(tmp_path), progress=False) == 2
    with (tmp_path / "memory.csv").open(newline="") as handle:
        assert sorted(row["source"] for row in csv.DictReader(handle)) == ["model", "traced"]


@pytest.mark.parametrize("method, states, optimizer, fused", [
    ("dense", "bf16", "AdamW", True), ("dense", "fp32", "SMETAdamW", None), ("masked", "fp32", "SMETAdamW", None),
    ("galore", "bf16", "GaLoreAdamW", None), ("smet", "bf16", "SMETAdamW", None),
])  # fmt: skip
@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_each_case_steps_the_optimizer_keeping_its_states_fused_where_a_fused_kernel_exists(method, states, optimizer,
                                                                                          fused, device):
    """bf16 weights: torch's AdamW keeps bf16 states (fused, but single-tensor on ``meta``: no fused nor foreach
    kernel there); fp32 states take SMETAdamW's dense path, which keeps them in fp32."""
    case = MemoryCase("tiny", method, 0.5 if method in ("masked", "smet") else 1.0, states, 1, 16, 256, False,
                      block_size=32)  # fmt: skip
    _, built, _ = build(case, device)
    assert type(built).__name__ == optimizer
    if isinstance(built, SMETAdamW):
        assert built.defaults["state_dtype"] == getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[states])
    if fused:
        on_meta = device == "meta"
        assert (built.defaults["fused"], built.defaults["foreach"]) == ((False, False) if on_meta else (True, None))


@pytest.mark.parametrize("vocab_sizes, refused", [("2,256", False), ("1,256", True)])
def test_a_vocabulary_of_two_tokens_is_the_smallest_the_memory_command_takes(tmp_path, vocab_sizes, refused):
    from bench.cli import build_parser
    from bench.memory_scaling import _validate

    args = build_parser().parse_args(["memory", "--vocab-sizes", vocab_sizes, "--out-dir", str(tmp_path / "out")])
    if refused:
        with pytest.raises(ValueError, match=r"^--vocab-sizes must be ints >= 2, got \[1, 256\]$"):
            _validate(args)
    else:
        _validate(args)


def test_measuring_a_size_whose_predicted_step_exceeds_the_machines_memory_is_refused_before_any_row(tmp_path,
                                                                                                       capsys):
    """``--measure-configs 7b`` was taken: after tracing it would have built 7b on real CPU tensors (some 90 GB)."""
    from bench.memory_scaling import _check_measurable

    cases = list(memory_cases(configs=("20m", "7b"), methods=("dense",), batch_shapes=((8, 256),),
                              vocab_sizes=(256,), state_dtypes=("fp32",), checkpointing=(False,)))  # fmt: skip
    refusal = (r"^--measure-configs 7b: a measured step needs more than this machine's 24 GB of memory \(7b about "
               r"\d+ GB, predicted\); trace it without measuring$")
    with pytest.raises(ValueError, match=refusal):
        _check_measurable(cases, memory_bytes=24 * 10**9)
    _check_measurable(cases[:1], memory_bytes=24 * 10**9)  # 20m fits
    from bench.cli import main

    argv = ["memory", "--configs", "20m,7b", "--methods", "dense", "--vocab-sizes", "256", "--measure-configs", "7b",
            "--out-dir", str(tmp_path / "reports" / "memory"), "--no-progress"]  # its parent: no other reports
    with pytest.raises(SystemExit) as exit_info:  # this machine: far below the 7b step's memory
        main(argv)
    assert exit_info.value.code == 2 and "--measure-configs 7b: a measured step needs" in capsys.readouterr().err
    assert not (tmp_path / "reports" / "memory" / "memory.csv").exists()
