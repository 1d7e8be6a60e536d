"""The timed stages of ``smet-bench gpu-check``, written through the ``smet-bench run`` machinery into
``kernels.csv`` / ``training.csv`` (so ``smet-bench report`` renders them):

* ``env``: versions, driver, and the two ceilings measured in the same run — a cuBLAS ``n × n × n`` matmul
  (``cublas_dense`` forward row of shape ``ceiling``) and a device-to-device copy (``device_copy`` row; bytes read +
  written);
* ``kernels``: every op of every provider and variant on the headline shapes (autotuned on the headline shape only);
* ``adamw``: the compact SMET AdamW step, ``torch.optim.AdamW(fused=True)`` on the dense tensor, and a copy of it;
* ``training``: dense / GaLore / masked / SMET steps (tokens/s, peak memory, the memory model beside), and SMET and
  dense with activation checkpointing at the config of the bars;
* ``compile``: a SMET training step under ``torch.compile`` against eager (``failed: <reason>`` when it cannot).
"""

from __future__ import annotations

import platform

import numpy as np
import torch

from bench import kernels, optimizer, training
from bench.kernels import KernelCase, LinearShape
from bench.optimizer import OptimizerCase
from bench.results import canonical, kernels_file, training_file
from bench.runner import run_cases
from profiling.memory_model import parse_dtype
from smet_kernels.ops.variant import default_variant

from . import kernel_ops
from .plan import TIMING_CONFIGS, Sizes


class Context:
    """What every timed stage needs: device, backend, sizes, out-dir, budget, command log, seed, progress flag."""

    def __init__(self, device, backend, sizes: Sizes, out_dir, budget, commands, seed: int, no_progress: bool):
        self.device, self.backend, self.sizes, self.out_dir = device, backend, sizes, out_dir
        self.budget, self.commands, self.seed, self.no_progress = budget, commands, seed, no_progress
        cuda = device.type == "cuda"
        self.timing = {"gpu_warmup_ms": 10, "gpu_rep_ms": 40} if cuda else {
            "warmup": 0, "min_repeats": 2, "max_repeats": 3, "budget_s": 0.0}  # fmt: skip
        self.picks: dict[int, dict] = {}  # block size -> the configs the headline autotuning picked per kernel
        self.after_row = None  # called after each measured row (gpu-check rewrites its summary, throttled)
        self.wrong: list[str] = []  # the cases this run timed whose result failed its check (status wrong)

    def configs_for(self, block_size: int) -> dict | None:
        """What the matmul autotuners may try in a model at ``block_size`` on a GPU: the headline autotuning's picks
        (``kernels`` stage), else the pinned configs; None (every config) elsewhere. Without it each new shape of a
        training step would compile and benchmark the whole autotune space (18 configs; ``SPLIT_K`` is a constexpr,
        so every split value compiles them all again)."""
        return self.picks.get(block_size) or kernel_ops.pinned_configs(block_size, self.device)

    def run(self, suite: str, cases: list, run_one, file) -> tuple[int, list[str]]:
        """Run ``cases`` not yet in ``file``; (failed cases, labels of the cases the budget did not reach). A case
        whose result is wrong is still timed and recorded, named in :attr:`wrong` and printed at once; so is a case
        an earlier run into the folder recorded as wrong (it is not timed again)."""
        from bench.results import device_name

        machine = {"gpu": device_name(self.device)}
        for case in dict.fromkeys(cases):
            if file.status(case.key_row(self.backend) | machine) == "wrong":
                self.wrong.append(f"{_label(case)} (recorded by an earlier run)")
                print(f"gpu-check: WRONG {_label(case)}: recorded so by an earlier run into {file.path.parent} (a "
                      "fresh --out-dir measures it again)", flush=True)  # fmt: skip
        def checked(case):
            result = run_one(case)
            if result.get("status") == "wrong":
                self.wrong.append(_label(case))
                print(f"gpu-check: WRONG {_label(case)}: {result.get('note', '')}", flush=True)
            return result

        failures = run_cases(suite, cases, checked, file, self.backend, self.device, self.no_progress, self.budget,
                             self.commands, self.after_row)  # fmt: skip
        missing = [case for case in cases if not file.done(case.key_row(self.backend) | machine)]
        return failures, ([_label(case) for case in missing] if self.budget.expired() else [])


def _label(case) -> str:
    if isinstance(case, KernelCase):
        return f"{case.op} {case.provider} {case.shape.label} b={case.block_size} d={case.density:g}"
    if isinstance(case, OptimizerCase):
        return f"{case.op} {case.provider} {case.variant}:{case.shape.label}"
    return f"training {case.config} {case.method} d={case.density:g}" + (
        " + ckpt" if case.activation_checkpointing else "")


def environment(device: torch.device) -> dict:
    """GPU name, driver, CUDA, torch, Triton, Python, the matmul variant of the models (``SMET_MATMUL_VARIANT``),
    SM count, memory, L2 size (``unavailable: ...`` where not known)."""
    import triton

    from bench.results import device_name

    info = {"device": device_name(device), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "cuda": torch.version.cuda or "none",
            "matmul_variant": default_variant(device)}  # fmt: skip
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info |= {"sms": properties.multi_processor_count, "memory_gib": round(properties.total_memory / 2**30, 1),
                 "l2_mib": round(getattr(properties, "L2_cache_size", 0) / 2**20, 1) or "unavailable",
                 "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
                 "torch_bsr_params": kernels.torch_bsr_params(torch.cuda.get_device_name(device))}  # fmt: skip
    try:
        import pynvml

        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        info["driver"] = driver.decode() if isinstance(driver, bytes) else driver
    except Exception as error:  # no package, no driver, no GPU: the row says why
        info["driver"] = f"unavailable: {type(error).__name__}"
    return info


def ceiling_cases(sizes: Sizes) -> tuple[KernelCase, OptimizerCase]:
    n, side = sizes.ceiling_matmul, sizes.ceiling_copy_side
    matmul = KernelCase("forward", "cublas_dense", LinearShape("ceiling", n, n), n, None, 1.0, parse_dtype(sizes.dtype))
    copy = OptimizerCase("copy", "device_copy", "dense", LinearShape("ceiling", side, side), None, 1.0)
    return matmul, copy


def run_env(ctx: Context) -> tuple[int, list[str]]:
    matmul, copy = ceiling_cases(ctx.sizes)
    file = kernels_file(ctx.out_dir)
    operands = {}

    def run_matmul(case):
        operands["ops"] = kernels.make_operands(case, ctx.device, ctx.seed)
        return kernels.run_case(case, operands["ops"], ctx.backend, ctx.device, ctx.timing)

    failed, not_run = ctx.run("ceiling matmul", [matmul], run_matmul, file)
    operands.clear()
    more_failed, more_not_run = ctx.run(
        "ceiling copy", [copy], lambda case: optimizer.run_case(case, ctx.device, ctx.timing, ctx.seed), file
    )
    return failed + more_failed, not_run + more_not_run


def kernel_cases(sizes: Sizes, block_size: int) -> tuple[list[KernelCase], list[KernelCase], list[KernelCase]]:
    """``(headline, bars, variants)`` at ``block_size``: the cases of the headline shape (dense, and sparse at the
    middle density: they autotune); the other cases of the providers the bars compare (cuBLAS, ``triton_grouped``,
    torch BSR, masked dense); the other cases of the Triton variants, which only choose the default variant."""
    dtype = parse_dtype(sizes.dtype)
    providers = kernels.default_providers("triton")
    cases = list(kernels.kernel_cases(sizes.kernel_configs, sizes.kernel_densities, [block_size],
                                      [sizes.kernel_tokens], dtype, providers=providers))  # fmt: skip
    headline_density = sizes.kernel_densities[len(sizes.kernel_densities) // 2]

    def is_headline(case: KernelCase) -> bool:
        return case.shape.label == sizes.headline_shape and case.density in (1.0, headline_density)

    rest = [c for c in cases if not is_headline(c)]
    return ([c for c in cases if is_headline(c)], [c for c in rest if c.provider not in kernels.VARIANT_OPS],
            [c for c in rest if c.provider in kernels.VARIANT_OPS])  # fmt: skip


def run_kernels(ctx: Context) -> tuple[int, list[str]]:
    """Per block size: autotune over ``TIMING_CONFIGS`` on the headline shape, then time the bars' cases with every
    kernel pinned to its pick; the variants' other cases last (the bars of every block size before them), from the
    bars' tuning caches."""
    file = kernels_file(ctx.out_dir)
    failures, not_run = 0, []
    cuda = ctx.device.type == "cuda"
    state = {"key": None, "operands": None}

    def run_one(case):
        key = kernels.operands_key(case)
        if key != state["key"]:
            state["operands"] = kernels.make_operands(case, ctx.device, ctx.seed, previous=state["operands"])
            state["key"] = key
        return kernels.run_case(case, state["operands"], ctx.backend, ctx.device, ctx.timing)

    variants, caches = {}, {}
    for block_size in ctx.sizes.kernel_block_sizes:
        headline, bars, variants[block_size] = kernel_cases(ctx.sizes, block_size)
        with kernel_ops.restrict_configs(kernel_ops.per_kernel(TIMING_CONFIGS) if cuda else None):
            failed, missing = ctx.run(f"kernels b={block_size} headline", headline, run_one, file)
            # the picks, and the timing configs for a kernel whose headline cases did not run (raised, resumed)
            pinned = kernel_ops.per_kernel(TIMING_CONFIGS) | kernel_ops.chosen_configs() if cuda else None
        if pinned:
            ctx.picks[block_size] = pinned
        with kernel_ops.restrict_configs(pinned):
            more_failed, more_missing = ctx.run(f"kernels b={block_size}", bars, run_one, file)
            # triton_grouped's picks per shape: triton_plain_order runs the same kernel (the group size is not in
            # the autotune key), so the A/B of the two orders times the same config, and nothing is tuned twice
            caches[block_size] = kernel_ops.tuning_caches()
        failures += failed + more_failed
        not_run += missing + more_missing
    for block_size, cases in variants.items():
        with kernel_ops.restrict_configs(ctx.picks.get(block_size), caches[block_size]):
            failed, missing = ctx.run(f"kernels b={block_size} variants", cases, run_one, file)
        failures += failed
        not_run += missing
    return failures, not_run


def optimizer_cases(sizes: Sizes) -> list[OptimizerCase]:
    """Copy, torch AdamW (fused) and the compact SMET step over every hidden weight of ``optimizer_config``."""
    shape = optimizer.model_shape(sizes.optimizer_config, sizes.optimizer_block_size)
    return [
        OptimizerCase("copy", "device_copy", "dense", shape, None, 1.0),
        OptimizerCase("adamw", "torch_adamw_fused", "dense", shape, None, 1.0),
        OptimizerCase("adamw", "smet_adamw", "compact", shape, sizes.optimizer_block_size, 0.25),
    ]


def plan_keys(sizes: Sizes) -> set[tuple[str, ...]]:
    """The keys (:data:`~bench.results.KERNEL_KEY` but ``backend``, canonical cells) of every kernels.csv row the
    plan of ``sizes`` measures: its ceilings, kernel timings and optimizer steps."""
    cases = [*ceiling_cases(sizes), *optimizer_cases(sizes)]
    for block_size in sizes.kernel_block_sizes:
        cases += [case for group in kernel_cases(sizes, block_size) for case in group]
    return {tuple(canonical(v) for k, v in case.key_row("").items() if k != "backend") for case in cases}


def run_adamw(ctx: Context) -> tuple[int, list[str]]:
    return ctx.run(
        "adamw",
        optimizer_cases(ctx.sizes),
        lambda case: optimizer.run_case(case, ctx.device, ctx.timing, ctx.seed, ctx.backend),
        kernels_file(ctx.out_dir),
    )


CHECKPOINTED_METHODS = ("smet", "dense")  # also run with activation checkpointing, at the config of the bars
TRAINING_DENSITY = 0.25  # of every training step and the compiled step
#: priority of (method, activation checkpointing) within a config: the training bars compare the first three
TRAINING_ORDER = (("dense", False), ("smet", False), ("galore", False), ("smet", True), ("dense", True),
                  ("masked", False))  # fmt: skip


def training_cases(sizes: Sizes) -> list:
    """Every method at d = 0.25, and :data:`CHECKPOINTED_METHODS` with activation checkpointing at the config of
    the bars (the last); that config first, in :data:`TRAINING_ORDER` (its bar rows first)."""
    bar_config = sizes.training_configs[-1]
    shared = (sizes.training_block_size, sizes.training_batch, sizes.training_seq, parse_dtype(sizes.dtype))
    cases = list(training.training_cases(sizes.training_configs, training.METHODS, [TRAINING_DENSITY], *shared,
                                         vocab_size=sizes.training_vocab))  # fmt: skip
    cases += training.training_cases([bar_config], CHECKPOINTED_METHODS, [TRAINING_DENSITY], *shared,
                                     vocab_size=sizes.training_vocab, activation_checkpointing=(True,))  # fmt: skip
    return sorted(cases, key=lambda c: (c.config != bar_config,
                                        TRAINING_ORDER.index((c.method, c.activation_checkpointing))))  # fmt: skip


def run_training(ctx: Context) -> tuple[int, list[str]]:
    with kernel_ops.restrict_configs(ctx.configs_for(ctx.sizes.training_block_size)):
        return ctx.run(
            "training",
            training_cases(ctx.sizes),
            # unchecked here: stage correctness compares a SMET step with the reference backend
            lambda case: training.run_case(case, ctx.device, ctx.backend, ctx.sizes.training_steps, ctx.seed,
                                           check=False),
            training_file(ctx.out_dir),
        )


def _step_times_ms(model, optimizer_, tokens, device, steps: int) -> list[float]:
    from smet_kernels.train.model import lm_loss

    def step():
        lm_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
        optimizer_.step()
        optimizer_.zero_grad(set_to_none=False)

    for _ in range(2):  # warm-up: compile, autotune, optimizer state
        step()
    return training.time_steps(step, device, steps)


def run_compile(ctx: Context) -> dict:
    """Median tokens/s of a SMET step, eager and with ``torch.compile(model)``; ``failed: <reason>`` if compile
    fails."""
    sizes = ctx.sizes
    case = training.TrainingCase(sizes.compile_config, "smet", TRAINING_DENSITY, sizes.training_block_size,
                                 sizes.training_batch, sizes.training_seq, parse_dtype(sizes.dtype),
                                 sizes.training_vocab)  # fmt: skip
    generator = torch.Generator().manual_seed(ctx.seed + 1)
    tokens = torch.randint(0, sizes.training_vocab, (case.batch_size, case.seq_len + 1), generator=generator)
    tokens = tokens.to(ctx.device)
    row = {"config": case.config, "block_size": case.block_size, "batch_size": case.batch_size,
           "seq_len": case.seq_len, "dtype": sizes.dtype}  # fmt: skip

    def tokens_per_s(times_ms: list[float]) -> float:
        return case.batch_size * case.seq_len / (float(np.median(times_ms)) * 1e-3)

    with kernel_ops.restrict_configs(ctx.configs_for(case.block_size)):
        model, optimizer_ = training.build(case, ctx.device, ctx.backend, ctx.seed)
        eager_ms = _step_times_ms(model, optimizer_, tokens, ctx.device, sizes.training_steps)
        row["eager_tokens_per_s"] = tokens_per_s(eager_ms)
        try:
            compiled = torch.compile(model)
            times = _step_times_ms(compiled, optimizer_, tokens, ctx.device, sizes.training_steps)
        except Exception as error:  # inductor missing a compiler, a graph the ops cannot trace, ...
            first_line = (str(error).strip().splitlines() or [""])[0]
            return row | {"status": f"failed: {type(error).__name__}: {first_line}"[:300]}
    return row | {"compiled_tokens_per_s": tokens_per_s(times), "status": "ok"}
