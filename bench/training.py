"""End-to-end training-step benchmarks: tokens/s and peak memory per method, with the memory split.

Methods (SPEC §4): ``dense`` (``nn.Linear`` + ``torch.optim.AdamW(fused=True)``), ``galore`` (GaLore-style
AdamW with the paper's rank), ``masked`` (dense weights × block mask, dense gradients and AdamW states) and
``smet`` (``BlockSparseLinear`` + ``SMETAdamW``: compact values, gradients and states). All methods train the
same model shape (the SwiGLU width rounded for the block size, SPEC §5) on random tokens, with parameters, gradients
and optimizer states in the benchmark dtype for every method (``SMETAdamW(state_dtype=dtype)``, like torch AdamW),
so that the methods differ only in what they store, not in precision.

Per case: two warm-up steps (kernels compiled/autotuned, optimizer states allocated), one measured-memory
step (:func:`profiling.memory_breakdown.measure_step_memory`, with NVML sampling device memory in a background
thread), then ``steps`` timed steps (device synchronised around each). tokens/s = batch · seq / median step
time. GaLore's SVD runs on the first warm-up step and then every 200 steps: outside the timed steps for
``steps`` < 197 (the default is 10); a longer run times one refresh per 200 steps, which the median hides.
The SMET topology update (every 100 steps) is not part of a step either.

Modes (key columns of ``training.csv``): ``compiled`` steps run through ``torch.compile(model)`` (the block-sparse
products are ``torch.ops.smet`` custom ops, so the model is one graph; the two warm-up steps compile it), and
``activation_checkpointing`` recomputes each decoder layer in backward (it saves only its input; the memory model
predicts that split). The memory model predicts eager steps: Inductor may save other tensors than eager autograd.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from smet_kernels.train.methods import BENCH_NAMES as METHODS
from smet_kernels.train.methods import SPARSE_BENCH_NAMES as SPARSE_METHODS

from .kernels import dtype_name
from .timing import QUANTILES

FULL_CONFIGS = ("60m", "130m", "350m", "1b")
FULL_DENSITIES = (0.5, 0.25, 0.1)
QUICK_CONFIGS = ("tiny",)
QUICK_DENSITIES = (0.5, 0.25, 0.1)


@dataclass(frozen=True)
class TrainingCase:
    config: str
    method: str
    density: float
    block_size: int
    batch_size: int
    seq_len: int
    dtype: torch.dtype
    vocab_size: int = 256
    activation_checkpointing: bool = False
    compiled: bool = False  # steps through torch.compile(model)

    def key_row(self, backend: str) -> dict:
        return {
            "config": self.config,
            "method": self.method,
            "density": self.density,
            "block_size": self.block_size,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "dtype": dtype_name(self.dtype),
            "backend": backend if self.method == "smet" else "torch",
            "compiled": self.compiled,
            "activation_checkpointing": self.activation_checkpointing,
            "vocab_size": self.vocab_size,
        }


def training_cases(
    config_names,
    methods,
    densities,
    block_size: int,
    batch_size: int,
    seq_len: int,
    dtype: torch.dtype,
    vocab_size: int = 256,
    compiled: Sequence[bool] = (False,),
    activation_checkpointing: Sequence[bool] = (False,),
) -> Iterator[TrainingCase]:
    """Dense and GaLore once per configuration, masked and SMET at every density; each in every mode of
    ``compiled`` × ``activation_checkpointing`` (adjacent rows, so the modes compare side by side)."""
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"methods must be in {METHODS}, got {method!r}")
    for config in config_names:
        for method in methods:
            for density in densities if method in SPARSE_METHODS else (1.0,):
                for compile_mode in compiled:
                    for checkpointing in activation_checkpointing:
                        yield TrainingCase(config, method, density, block_size, batch_size, seq_len, dtype,
                                           vocab_size, checkpointing, compile_mode)  # fmt: skip


def model_config_for(case: TrainingCase):
    from smet_kernels.train.model import model_config

    return model_config(case.config, vocab_size=case.vocab_size, block_size=case.block_size, max_seq_len=case.seq_len)


LR = 1e-4


def build(case: TrainingCase, device: torch.device, backend: str | None, seed: int = 0):
    """``(model, optimizer)`` of ``case`` on ``device``, by the method registry's factories: torch's default
    hyperparameters but ``lr`` = :data:`LR`, fused AdamW, GaLore at the paper's rank, SMETAdamW's states in the
    case's dtype."""
    from smet_kernels.optim.galore import GALORE_DEFAULT_RANK
    from smet_kernels.train import methods

    model = methods.build_model(model_config_for(case), case.method, density=case.density,
                                block_size=case.block_size, dtype=case.dtype, device=device, backend=backend,
                                seed=seed)  # fmt: skip
    model.activation_checkpointing = case.activation_checkpointing
    optimizer = methods.build_optimizer(
        case.method, model, fused=True, backend=backend, galore=dict(rank=GALORE_DEFAULT_RANK[case.config]),
        smet_adamw=dict(state_dtype=case.dtype), lr=LR,
    )  # fmt: skip
    return model, optimizer


def check_step(model, optimizer, inputs, targets) -> str:
    """Empty when one training step of ``model`` computes what the dense reference computes, else a note: the loss
    matches the loss of a dense copy of the model (:func:`~smet_kernels.modules.densify`: the same weights as
    ``nn.Linear``, zeros at inactive blocks; the model itself for the dense methods) within the dtype's tolerance,
    and the step leaves every parameter finite and changes the weights."""
    import copy

    from smet_kernels.modules import BlockLayoutLinear, densify
    from smet_kernels.train.model import lm_loss

    sparse = any(isinstance(module, BlockLayoutLinear) for module in model.modules())
    reference = densify(copy.deepcopy(model)) if sparse else model
    with torch.no_grad():
        expected = lm_loss(reference(inputs), targets).float().item()
    before = [p.detach().clone() for p in model.parameters()]
    loss = lm_loss(model(inputs), targets)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    dtype = next(model.parameters()).dtype
    tolerance = 2e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4
    if not abs(loss.item() - expected) <= tolerance * abs(expected):
        return f"loss {loss.item():.6g} != dense reference {expected:.6g}"
    after = list(model.parameters())
    if not all(torch.isfinite(p).all() for p in after):
        return "a parameter is not finite after the step"
    if all(torch.equal(a, b) for a, b in zip(after, before)):
        return "the step changed no parameter"
    return ""


def predicted_memory(case: TrainingCase):
    from profiling.memory_model import predict_memory
    from smet_kernels.optim.galore import GALORE_DEFAULT_RANK

    return predict_memory(
        model_config_for(case),
        case.method,
        density=case.density,
        block_size=case.block_size,
        batch_size=case.batch_size,
        seq_len=case.seq_len,
        param_dtype=case.dtype,
        rank=GALORE_DEFAULT_RANK.get(case.config) if case.method == "galore" else None,
        activation_checkpointing=case.activation_checkpointing,
    )


class _NoSampler:
    """Stands in for the NVML sampler on CPU runs."""

    status = "unavailable: device is cpu"
    peak_used_bytes = None

    def __enter__(self) -> "_NoSampler":
        return self

    def __exit__(self, *exc) -> None:
        return None


def memory_sampler(device: torch.device):
    """The NVML sampler of the GPU torch calls ``device`` (NVML index resolved through ``CUDA_VISIBLE_DEVICES``),
    or a stand-in reporting ``unavailable`` on CPU."""
    if device.type != "cuda":
        return _NoSampler()
    from profiling.nvml import NvmlMemorySampler

    return NvmlMemorySampler.for_device(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(case: TrainingCase, device: torch.device, backend: str | None, steps: int, seed: int, check: bool):
    """Build ``case`` (compiled: its steps run ``torch.compile(model)``), ``check``: one eager step against the dense
    reference (:func:`check_step`, its note returned), warm up (two steps, their seconds returned too), measure one
    step's memory, then time ``steps`` steps."""
    from profiling.memory_breakdown import measure_step_memory
    from smet_kernels.train.model import lm_loss

    if device.type == "cuda":  # NVML counts reserved memory: hand back what earlier cases or stages left cached
        gc.collect()
        torch.cuda.empty_cache()
    model, optimizer = build(case, device, backend, seed)
    stepped = torch.compile(model) if case.compiled else model
    generator = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, model.config.vocab_size, (case.batch_size, case.seq_len + 1), generator=generator)
    tokens = tokens.to(device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    note = check_step(model, optimizer, inputs, targets) if check else ""
    if check and device.type == "cuda":  # the check's dense copy and activations: cached, NVML would count them
        gc.collect()
        torch.cuda.empty_cache()

    def forward() -> torch.Tensor:
        return lm_loss(stepped(inputs), targets)

    def step() -> None:
        forward().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    started = time.perf_counter()
    for _ in range(2):  # compile, autotune, optimizer states, GaLore's first projection (an SVD per matrix)
        step()
    _sync(device)
    warmup_s = time.perf_counter() - started
    sampler = memory_sampler(device)
    with sampler:
        memory = measure_step_memory(model, optimizer, forward, device)
        times_ms = time_steps(step, device, steps)
    return memory, sampler, times_ms, warmup_s, note


def time_steps(step, device: torch.device, steps: int) -> list[float]:
    """Wall times (ms) of ``steps`` calls of ``step()``, the device synchronised before and after each."""
    times_ms = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times_ms.append((time.perf_counter() - t0) * 1e3)
    return times_ms


def run_case(
    case: TrainingCase, device: torch.device, backend: str | None, steps: int, seed: int = 0, check: bool = True
) -> dict:
    """Measure ``case``: timing quantiles, tokens/s, measured and predicted memory components; ``check``: a step that
    fails :func:`check_step` is still measured, recorded as ``status = "wrong"`` with the reason as the note."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    try:
        memory, sampler, times_ms, warmup_s, note = _measure(case, device, backend, steps, seed, check)
    except torch.cuda.OutOfMemoryError as error:
        return {"status": "oom", "note": str(error).splitlines()[0][:200]}
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    p20, p50, p80 = (float(q) for q in np.quantile(np.asarray(times_ms), QUANTILES))
    predicted = predicted_memory(case)
    row = {
        "steps": steps,
        "warmup_s": warmup_s,
        "ms_p20": p20,
        "ms_p50": p50,
        "ms_p80": p80,
        "tokens_per_s": case.batch_size * case.seq_len / (p50 * 1e-3),
        "peak_allocated_bytes": memory.peak,
        "nvml_peak_bytes": sampler.peak_used_bytes,
        "nvml_status": sampler.status,
        "peak_source": memory.peak_source,
        "pred_peak_bytes": predicted.peak,
        "status": "wrong" if note else "ok",
        "note": note,
    }
    for component, value in memory.as_dict().items():
        if component != "peak":
            row[f"{component}_bytes"] = value
    for component, value in predicted.as_dict().items():
        if component != "peak":
            row[f"pred_{component}_bytes"] = value
    return row
