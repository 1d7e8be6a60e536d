"""Ahead-of-time compilation of every Triton kernel for Hopper (sm_90) and Ampere (sm_80), on a CPU-only machine.

The interpreter proves the kernels compute the right numbers; these tests prove the compiled GPU kernels exist and
have the shape of fast code: tensor-core instructions, a software-pipelined main loop, no register spills, shared
memory within the device limit. They need Triton's NVIDIA toolchain (ptxas, cuobjdump — shipped in the wheel) and
compile in a child process, since this one runs the interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from profiling import kernel_resources as kr

try:
    kr._toolchain(90)
except kr.ToolchainMissing as error:  # pragma: no cover - depends on the Triton wheel
    pytest.skip(str(error), allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
# (arch, dtypes, block sizes, kernels, configs): the config each matmul most likely runs at the benchmark shapes
# (M = 8192), a small-tile one at b = 16, the largest tiles the shared-memory pruner keeps at b = 128 in bf16
# (forward 256:8:2, grad weight 128:8:3), fp32, the optimizer kernels, and Ampere
SELECTIONS = [
    (90, ["bf16"], [16], None, [(64, 4, 3)]),
    (90, ["bf16"], [128], ["bsmm_forward", "bsmm_grad_input", "bsmm_forward_persistent", "bsmm_grad_input_persistent",
                           "bsmm_forward_tma", "bsmm_grad_input_tma", "bsmm_grad_weight", "bsmm_grad_weight_split_k",
                           "bsmm_grad_weight_tma"],
     [(128, 8, 3), (256, 8, 2)]),
    (90, ["fp32"], [64], ["bsmm_forward", "bsmm_grad_weight"], [(64, 4, 3)]),
    (80, ["bf16"], [128], ["bsmm_forward", "bsmm_grad_weight"], [(128, 8, 3)]),
]
_CHILD = """
import json, sys
from profiling import kernel_resources as kr
rows = []
for arch, dtypes, block_sizes, kernels, configs in json.loads(sys.argv[1]):
    configs = [tuple(c) for c in configs]
    rows += kr.collect(arch, dtypes, block_sizes, kernels, configs, progress=False)
print(json.dumps(rows))
"""


@pytest.fixture(scope="module")
def compiled():
    """Report rows of the selected kernels, compiled in a child process without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(SELECTIONS)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def _row(rows, kernel, dtype, b, config=(128, 8, 3), arch="sm_90"):
    for row in rows:
        if (row["arch"], row["kernel"], row["dtype"], row["block_size"],
                (row["BLOCK_M"], row["num_warps"], row["num_stages"])) == (arch, kernel, dtype, b, config):
            return row
    raise AssertionError(f"no row for {arch} {kernel} {dtype} b={b} {config}")


@pytest.mark.parametrize(
    "kernel",
    ["bsmm_forward", "bsmm_grad_input", "bsmm_forward_persistent", "bsmm_grad_input_persistent", "bsmm_forward_tma",
     "bsmm_grad_input_tma", "bsmm_grad_weight", "bsmm_grad_weight_split_k", "bsmm_grad_weight_tma"],
)
@pytest.mark.parametrize("b,config", [(16, (64, 4, 3)), (128, (128, 8, 3))])
def test_bf16_matmul_is_a_pipelined_tensor_core_loop_on_hopper(compiled, kernel, b, config):
    row = _row(compiled, kernel, "bf16", b, config)
    if kernel.startswith("bsmm_grad_weight") and b < 64:
        assert row["mma_sync"] > 0, row  # a b x b output tile is below wgmma's 64-row minimum
    else:
        assert row["wgmma"] > 0, row
    assert row["cp_async"] + row["tma"] > 0, f"main loop not software-pipelined: {row}"
    assert row["stack_bytes"] == 0, f"register spills: {row}"
    assert row["fits_shared"], row


@pytest.mark.parametrize("kernel", ["bsmm_forward_tma", "bsmm_grad_input_tma", "bsmm_grad_weight_tma"])
def test_tma_variant_moves_every_tile_with_the_copy_engine(compiled, kernel):
    """No pointer-based copies left in the TMA variant, and fewer registers than the pointer kernel."""
    row = _row(compiled, kernel, "bf16", 128)
    pointer_kernel = _row(compiled, kernel.removesuffix("_tma"), "bf16", 128)
    assert row["tma"] > 0 and row["cp_async"] == 0, row
    assert row["registers"] < pointer_kernel["registers"], (row, pointer_kernel)


@pytest.mark.parametrize("kernel", ["bsmm_forward", "bsmm_grad_weight"])
def test_fp32_matmul_compiles_pipelined_without_spills(compiled, kernel):
    row = _row(compiled, kernel, "fp32", 64, (64, 4, 3))
    # ptxas 12.8 (Triton 3.6's for sm_90, on the H100 box) spills 12 bytes in the fp32 forward at 128 registers;
    # ptxas 13 does not
    allowed_stack = 0 if int(str(row["ptxas"]).split(".")[0]) >= 13 else 16
    assert row["stack_bytes"] <= allowed_stack and row["fits_shared"], row
    assert row["cp_async"] + row["tma"] > 0, row


def test_every_config_the_pruner_keeps_fits_hopper_shared_memory(compiled):
    kept = [r for r in compiled if r["kept_by_pruner"] and r["arch"] == "sm_90"]
    largest = {(r["kernel"], r["BLOCK_M"], r["num_stages"]) for r in kept if r["block_size"] == 128}
    assert {("bsmm_forward", 256, 2), ("bsmm_grad_weight", 128, 3)} <= largest
    assert all(r["fits_shared"] for r in kept), [r for r in kept if not r["fits_shared"]]


def test_no_config_the_pruner_keeps_spills(compiled):
    """Register rule of the pruner (bf16): 128 accumulator registers per thread, 64 for the persistent kernel (whose
    BLOCK_M = 256, 8 warps config spills at b = 128 and is pruned)."""
    kept = [r for r in compiled if r["kept_by_pruner"] and r["dtype"] == "bf16"]
    assert all(r["stack_bytes"] == 0 for r in kept), [r for r in kept if r["stack_bytes"]]
    assert not _row(compiled, "bsmm_forward_persistent", "bf16", 128, (256, 8, 2))["kept_by_pruner"]
    assert _row(compiled, "bsmm_forward", "bf16", 128, (256, 8, 2))["kept_by_pruner"]


def test_optimizer_kernels_compile_vectorised_without_spills(compiled):
    """The aligned AdamW launch (the normal case) must use 16-byte vector loads: the stream is memory-bound."""
    rows = [r for r in compiled if r["block_size"] is None]
    assert {r["kernel"] for r in rows} == {
        "adamw_step[none]", "adamw_step[linear]", "adamw_step[momentum_ramp]", "regrow_blocks"
    }
    for row in rows:
        assert row["stack_bytes"] == 0 and row["fits_shared"], row
        assert row["vector_loads"] >= 4, row


@pytest.mark.parametrize("kernel", ["bsmm_forward", "bsmm_grad_weight"])
def test_matmul_compiles_for_ampere(compiled, kernel):
    row = _row(compiled, kernel, "bf16", 128, arch="sm_80")
    assert row["mma_sync"] > 0 and row["wgmma"] == 0, row
    assert row["cp_async"] > 0 and row["stack_bytes"] == 0 and row["fits_shared"], row


def test_report_files(compiled, tmp_path):
    path = kr.write_report(compiled, tmp_path, 90)
    assert "Summary per kernel" in path.read_text()
    header = (tmp_path / "kernel_resources.csv").read_text().splitlines()[0]
    assert header == ",".join(kr.FIELDS)


def test_the_config_table_of_a_report_without_bf16_lists_the_configs_of_its_dtype(tmp_path):
    """A report of --dtypes fp16 (or fp32) had an empty "Matmul autotune configs (bf16)" table."""
    row = {"kernel": "bsmm_forward", "dtype": "fp16", "block_size": 32, "BLOCK_M": 64, "num_warps": 4,
           "num_stages": 3, "kept_by_pruner": True, "arch": "sm_90", "shared_bytes": 1024, "fits_shared": True,
           "registers": 90, "stack_bytes": 0, "wgmma": 2, "mma_sync": 0, "cp_async": 3, "tma": 0, "vector_loads": 0,
           "triton": "3.9.0", "ptxas": "13.4"}  # fmt: skip
    text = kr.write_report([row], tmp_path, 90).read_text()
    configs = text.split("## Matmul autotune configs (fp16)")[1]
    assert "| bsmm_forward |" in configs.replace("  ", ""), text


def test_a_config_outside_the_autotune_space_exits_2_naming_it_instead_of_writing_an_empty_report(tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        kr.main(["--out-dir", str(tmp_path / "out"), "--kernels", "bsmm_forward", "--configs", "64:4:3", "999:8:3"])
    err = capsys.readouterr().err.splitlines()
    assert raised.value.code == 2 and err[-1].startswith(
        "python -m profiling.kernel_resources: error: --configs 999:8:3 not in the autotune space of the selected "
        "matmul kernels (64:4:2,"), err
    assert not (tmp_path / "out").exists()


def test_the_pruner_verdicts_of_a_turing_report_are_those_of_its_64_kib_of_shared_memory():
    """--arch 75 marked configs kept by the H100's 227 KiB: 128x128 tiles in three bf16 stages among them."""
    from smet_kernels.ops import launch_config

    kept = {(c.kernel, c.block_m, c.num_warps, c.num_stages) for c in kr.matmul_cases(["bf16"], [128], 75)
            if c.kept_by_pruner}  # fmt: skip
    configs = launch_config.matmul_configs(launch_config.DENSE_SPARSE_BLOCK_MS, interpret=False)
    probe = {"a": torch.empty(0, dtype=torch.bfloat16)}
    expected = launch_config.prune_configs(configs, probe, 65536, BLOCK_SIZE=128)
    assert {k[1:] for k in kept if k[0] == "bsmm_forward"} == {
        (c.kwargs["BLOCK_M"], c.num_warps, c.num_stages) for c in expected}
    assert ("bsmm_forward", 128, 8, 3) not in kept and ("bsmm_forward", 64, 4, 2) in kept


def test_stale_signature_is_reported():
    case = kr.matmul_cases(["bf16"], [32])[0]
    signature = dict(case.signature)
    signature.pop("M")
    with pytest.raises(ValueError, match="missing \\['M'\\]"):
        kr.KernelCase(case.kernel, case.fn, signature, case.constexprs, 4, 3, "bf16")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="only a TRITON_INTERPRET=1 process refuses")
def test_refuses_to_compile_under_the_interpreter():
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kr.collect(90, ["bf16"], [32], kernels=["bsmm_forward"], configs=[(64, 4, 3)], progress=False)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="only a TRITON_INTERPRET=1 process refuses")
def test_the_command_under_the_interpreter_says_so_in_one_line_instead_of_a_traceback(tmp_path, capsys):
    from conftest import usage_error

    error = usage_error(kr.main, ["--kernels", "regrow_blocks", "--out-dir", str(tmp_path)], capsys)
    assert error == ("python -m profiling.kernel_resources: error: kernels cannot be compiled with TRITON_INTERPRET=1 "
                     "set: run in a process without it")


def test_bad_config_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as raised:
        kr.main(["--out-dir", "unused", "--configs", "128x8"])
    err = capsys.readouterr().err.splitlines()
    assert raised.value.code == 2 and err[-1].startswith(f"{kr.build_parser().prog}: error: argument --configs")
    assert "BLOCK_M:WARPS:STAGES" in err[-1]


@pytest.mark.parametrize("argv, message", [
    (["--block-sizes", "48"], "argument --block-sizes: invalid choice: 48"),
    (["--out-dir", "{tmp}/a_file"], "--out-dir '{tmp}/a_file' exists and is not a folder"),
    (["--arch", "30"], "--arch 30: ptxas has no sm_30 target (it has "),  # was a PTXASError traceback
    (["--arch", "-5"], "--arch -5: ptxas has no sm_-5 target (it has "),
])
def test_a_bad_option_exits_2_with_one_error_line_before_anything_compiles(tmp_path, capsys, argv, message):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as raised:
        kr.main(["--out-dir", str(tmp_path / "out"), *(arg.format(tmp=tmp_path) for arg in argv)])
    err = capsys.readouterr().err.splitlines()
    assert raised.value.code == 2 and [line for line in err if "error:" in line] == err[-1:], err
    assert err[-1].startswith(f"python -m profiling.kernel_resources: error: {message.format(tmp=tmp_path)}"), err
    assert not (tmp_path / "out").exists()


_SPECIALIZATION = """
import json, torch
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.runtime.jit import create_function_from_signature
from smet_kernels.ops import block_sparse_matmul as bsmm
backend = CUDABackend(GPUTarget("cuda", 90, 32))
keys = {}
for name in ("bsmm_grad_weight_kernel", "bsmm_grad_weight_tma_kernel"):
    fn = getattr(bsmm, name).fn
    bind = create_function_from_signature(fn.signature, fn.params, backend)
    operand = torch.empty(64, dtype=torch.bfloat16)
    ints = {"M": 8192, "N": 4096, "K": 11008, "stride_dym": 4096, "stride_xm": 11008}
    constexprs = dict(BLOCK_SIZE=128, SPLIT_K=1, UPCAST=False, INPUT_PRECISION="tf32", BLOCK_M=64)
    def key(nnz):
        args = [torch.empty(64, dtype=torch.int32) if n == "block_indices_ptr" else nnz if n == "nnz" else
                ints.get(n, operand) for n in fn.arg_names if n not in constexprs]
        return repr(bind(*args, **constexprs)[1])
    keys[name] = [key(nnz) for nnz in (688, 69, 1)]
print(json.dumps(keys))
"""


def test_one_weight_grad_binary_serves_every_block_count():
    """Triton specialises an int argument on its divisibility by 16 and on 1: ``nnz`` only counts whole b × b blocks,
    so it is not specialised, and layers of 688, 69 and 1 blocks launch the same binary (each timed shape of
    gpu-check would otherwise compile the weight grad again)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _SPECIALIZATION], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for name, keys in json.loads(result.stdout.splitlines()[-1]).items():
        assert len(set(keys)) == 1, (name, keys)
