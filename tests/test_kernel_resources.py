"""`python -m profiling.kernel_resources`: its selection, summary and resource counts (compiled ahead of time; no GPU
needed)."""


def test_kernel_resources_report_names_the_selection(tmp_path, monkeypatch):
    """The "Regenerate with" line reproduces the options given, so rerunning it compiles the same variants."""
    import shlex

    from profiling import kernel_resources as kr

    row = dict.fromkeys(kr.FIELDS, 0) | {
        "kernel": "bsmm_forward", "dtype": "bf16", "block_size": 64, "BLOCK_M": 128, "num_warps": 8, "num_stages": 3,
        "kept_by_pruner": True, "arch": "sm_90", "fits_shared": True, "wgmma": 1, "cp_async": 1, "triton": "t",
        "ptxas": "p",
    }  # fmt: skip
    selections = []
    monkeypatch.setattr(kr, "collect", lambda *selection: selections.append(selection) or [row])
    out_dir = tmp_path / "a report"  # a space: quoted in the command
    argv = ["--dtypes", "bf16", "--block-sizes", "64", "--kernels", "bsmm_forward", "--configs", "128:8:3", "--out-dir",
            str(out_dir)]  # fmt: skip
    assert kr.main(argv) == 0
    command = (out_dir / "kernel_resources.md").read_text().split("Regenerate with `")[1].split("`")[0]
    assert command.startswith("python -m profiling.kernel_resources --arch 90 --dtypes bf16 --block-sizes 64 ")
    assert kr.main(shlex.split(command)[3:]) == 0
    assert selections[0] == selections[1] == (90, ["bf16"], [64], ["bsmm_forward"], [(128, 8, 3)])


def test_kernel_resources_summary_counts_kept_configs_spills_and_pipelining_and_keeps_the_optimizer_kernels():
    """A kept config with a stack frame spills; one with TMA copies but no ``cp.async`` is pipelined; a pruned config
    fits shared memory only where that is known (``fits_shared`` None: an arch without a limit); the optimizer
    kernels (no pruner: ``kept_by_pruner`` None) count as kept."""
    from profiling import kernel_resources as kr

    base = dict.fromkeys(kr.FIELDS, 0) | {"dtype": "bf16", "arch": "sm_90", "block_size": 64, "wgmma": 1}
    rows = [base | {"kernel": kernel, "kept_by_pruner": kept, "fits_shared": fits, "stack_bytes": stack,
                    "cp_async": cp_async, "tma": tma}
            for kernel, kept, fits, stack, cp_async, tma in (
                ("bsmm_forward", True, True, 0, 1, 0), ("bsmm_forward", True, True, 8, 0, 1),
                ("bsmm_forward", False, True, 0, 0, 0),
                ("bsmm_grad_input", True, None, 0, 1, 0), ("bsmm_grad_input", False, None, 0, 1, 0))]
    rows.append(base | {"kernel": "adamw_step[none]", "block_size": None, "kept_by_pruner": None, "fits_shared": True,
                        "wgmma": 0, "vector_loads": 4})
    forward, grad_input, adamw = kr._summary(rows)
    assert (forward["configs kept"], forward["kept spilling"], forward["kept not pipelined"]) == ("2/3", 1, 0)
    assert forward["pruned, fitting shared memory"] == 1 and forward["tensor cores"] == "wgmma"
    assert grad_input["pruned, fitting shared memory"] == 0
    assert (adamw["kernel"], adamw["configs kept"], adamw["vector loads"]) == ("adamw_step[none]", "1/1", 4)


def test_kernel_resources_stack_bytes_add_the_local_memory_that_cuobjdump_reports(tmp_path):
    from profiling import kernel_resources as kr

    cuobjdump = tmp_path / "cuobjdump"
    cuobjdump.write_text("#!/bin/sh\necho 'Resource usage:'\necho ' REG:40 STACK:8 SHARED:0 LOCAL:16 TEXTURE:0'\n")
    cuobjdump.chmod(0o755)
    assert kr._resource_usage(str(cuobjdump), b"") == {"registers": 40, "stack_bytes": 24}


def test_kernel_resources_selects_every_warm_up_variant_of_a_kernel_named_without_one(monkeypatch):
    """``--kernels adamw_step`` names the AdamW kernel of every warm-up mode (cases ``adamw_step[<warm-up>]``)."""
    from profiling import kernel_resources as kr

    monkeypatch.setattr(kr, "_toolchain", lambda arch: ("cuobjdump", "12.8"))
    monkeypatch.setattr(kr, "compile_case", lambda case, arch, cuobjdump: {"kernel": case.kernel})
    monkeypatch.setattr(kr.triton.knobs.runtime, "interpret", False)
    rows = kr.collect(90, ["bf16"], [64], ["adamw_step"], None, progress=False)
    assert [row["kernel"] for row in rows] == ["adamw_step[none]", "adamw_step[linear]", "adamw_step[momentum_ramp]"]
