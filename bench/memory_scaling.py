"""Memory-scaling grid: one training step of every method at every model size, traced on ``meta`` (exact bytes per
component, nothing allocated), measured on the CPU where it fits, and predicted by the analytic model.

Each case is (config, method, density, bf16 weights, optimizer-state dtype, block size, uniform distribution, batch,
sequence, vocab, activation checkpointing); each gives up to three rows of ``memory.csv``, told apart by ``source``:

* ``traced``: :func:`profiling.memory_trace.trace_step_memory` on ``meta``, peak = the live bytes of
  :class:`~profiling.memory_trace.LiveBytes`, ``rest`` = peak − the four other components;
* ``measured``: :func:`profiling.memory_breakdown.measure_step_memory` on real CPU tensors (no allocator peak on a
  CPU, so no ``rest``/``peak``);
* ``model``: :func:`profiling.memory_model.predict_memory`.

Optimizers: ``smet`` = :class:`SMETAdamW` (compact states in the state dtype); ``dense`` / ``masked`` =
``torch.optim.AdamW`` when the states share the weights' dtype (fused on a CPU or GPU; single-tensor on ``meta``,
where no fused kernel exists), and :class:`SMETAdamW`'s dense path (plain AdamW, ``state_dtype``) for fp32 states,
which torch's AdamW cannot keep for bf16 weights; ``galore`` = GaLore-style AdamW, whose states follow the
gradient's dtype, so it has bf16-state cases only. On ``meta`` the traced transients are the GPU path's (Triton
backend, fused AdamW): the block-sparse products run their custom ops' fake (``meta``) implementation, which
allocates the output only, as the Triton kernels do, and the step of SMETAdamW and AdamW (one fused in-place kernel
on a GPU) adds no transient (``in_place_step``); GaLore's step runs PyTorch ops on a GPU too, so its transients
count. Activation checkpointing is the model's own (``LlamaModel.activation_checkpointing``).
"""

from __future__ import annotations

import argparse
import gc
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch

from profiling.memory_model import COMPONENTS
from smet_kernels.train.methods import BENCH_NAMES as METHODS
from smet_kernels.train.methods import SPARSE_BENCH_NAMES as SPARSE_METHODS

from .options import comma_list
from .results import ENVIRONMENT_COLUMNS, ResultsFile, environment

CONFIGS = ("20m", "60m", "130m", "350m", "1b", "7b")
DENSITIES = (0.5, 0.25, 0.1)
BATCH_SHAPES = ((8, 256), (32, 256))
VOCAB_SIZES = (256, 32000)
STATE_DTYPES = ("fp32", "bf16")
CHECKPOINTING = (False, True)
MEASURED_CONFIGS = ("20m", "60m")  # real CPU allocations (smaller batch, vocab 256): seconds per step on 2 cores
MEASURED_BATCH = (8, 256)
MEASURED_VOCAB = 256
BLOCK_SIZE = 64
DTYPE = "bf16"

MEMORY_KEY = ["config", "method", "density", "dtype", "state_dtype", "block_size", "distribution", "batch_size",
              "seq_len", "vocab_size", "activation_checkpointing", "source"]  # fmt: skip
MEMORY_COLUMNS = MEMORY_KEY + [f"{c}_bytes" for c in COMPONENTS] + ["peak_bytes", "peak_source"] + ENVIRONMENT_COLUMNS


@dataclass(frozen=True)
class MemoryCase:
    config: str
    method: str
    density: float
    state_dtype: str
    batch_size: int
    seq_len: int
    vocab_size: int
    activation_checkpointing: bool
    dtype: str = DTYPE
    block_size: int = BLOCK_SIZE
    distribution: str = "uniform"

    def key_row(self, source: str) -> dict:
        return asdict(self) | {"source": source}

    def llama_config(self):
        from smet_kernels.train.model import model_config

        return model_config(self.config, vocab_size=self.vocab_size, block_size=self.block_size,
                            max_seq_len=self.seq_len)  # fmt: skip


def memory_cases(configs=CONFIGS, methods=METHODS, densities=DENSITIES, batch_shapes=BATCH_SHAPES,
                 vocab_sizes=VOCAB_SIZES, state_dtypes=STATE_DTYPES,
                 checkpointing=CHECKPOINTING) -> Iterator[MemoryCase]:
    """Dense and GaLore once per setting, masked and SMET at every density; GaLore only with bf16 states."""
    for config in configs:
        for vocab in vocab_sizes:
            for batch, seq in batch_shapes:
                for ckpt in checkpointing:
                    for method in methods:
                        for state in state_dtypes:
                            if method == "galore" and state != DTYPE:
                                continue
                            for density in densities if method in SPARSE_METHODS else (1.0,):
                                yield MemoryCase(config, method, density, state, batch, seq, vocab, ckpt)


def _optimizer(case: MemoryCase, model, device: torch.device):
    from profiling.memory_model import parse_dtype
    from smet_kernels.optim.galore import GALORE_DEFAULT_RANK
    from smet_kernels.train import methods

    from .training import LR

    state_dtype = parse_dtype(case.state_dtype)
    # torch's AdamW cannot keep fp32 states for bf16 weights: those cases run SMETAdamW's dense path (plain AdamW)
    name = "smet" if case.method != "galore" and state_dtype != parse_dtype(case.dtype) else case.method
    adamw = {}
    if methods.method(name).optimizer == "adamw":
        fused = device.type != "meta"  # no fused (nor foreach) kernel on meta
        adamw = dict(fused=fused, foreach=None if fused else False)
    galore = dict(rank=GALORE_DEFAULT_RANK[case.config])
    return methods.build_optimizer(name, model, backend="reference", galore=galore,
                                   smet_adamw=dict(state_dtype=state_dtype), lr=LR, **adamw)  # fmt: skip


def build(case: MemoryCase, device: torch.device | str, seed: int = 0):
    """``(model, optimizer, forward)`` of ``case`` on ``device``; ``forward()`` returns the loss of one batch."""
    from profiling.memory_model import parse_dtype
    from smet_kernels.train.methods import build_model
    from smet_kernels.train.model import lm_loss

    device = torch.device(device)
    model = build_model(case.llama_config(), case.method, density=case.density, block_size=case.block_size,
                        dtype=parse_dtype(case.dtype), device=device, backend="reference", seed=seed)  # fmt: skip
    model.activation_checkpointing = case.activation_checkpointing
    optimizer = _optimizer(case, model, device)
    generator = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, case.vocab_size, (case.batch_size, case.seq_len + 1), generator=generator).to(device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    return model, optimizer, lambda: lm_loss(model(inputs), targets)


def _component_row(memory) -> dict:
    return {f"{c}_bytes": v for c, v in memory.as_dict().items() if c != "peak"} | {
        "peak_bytes": memory.peak,
        "peak_source": getattr(memory, "peak_source", "sum of the model's components"),
    }


def traced_row(case: MemoryCase) -> dict:
    from profiling.memory_trace import FlashAttentionOnMeta, LiveBytes, trace_step_memory

    with LiveBytes("meta") as live, FlashAttentionOnMeta():
        model, optimizer, forward = build(case, "meta")
        memory = trace_step_memory(model, optimizer, forward, live, in_place_step=case.method != "galore")
    return _component_row(memory)


def measured_row(case: MemoryCase) -> dict:
    from profiling.memory_breakdown import measure_step_memory

    model, optimizer, forward = build(case, "cpu")
    forward().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    memory = measure_step_memory(model, optimizer, forward, "cpu")
    del model, optimizer, forward
    gc.collect()
    return _component_row(memory)


def model_row(case: MemoryCase) -> dict:
    from profiling.memory_model import parse_dtype, predict_memory
    from smet_kernels.optim.galore import GALORE_DEFAULT_RANK

    estimate = predict_memory(
        case.llama_config(), case.method, density=case.density, block_size=case.block_size,
        batch_size=case.batch_size, seq_len=case.seq_len, param_dtype=parse_dtype(case.dtype),
        state_dtype=parse_dtype(case.state_dtype), distribution=case.distribution,
        rank=GALORE_DEFAULT_RANK[case.config] if case.method == "galore" else None,
        activation_checkpointing=case.activation_checkpointing,
    )  # fmt: skip
    return _component_row(estimate)


ROW_MAKERS = {"traced": traced_row, "measured": measured_row, "model": model_row}


def memory_file(out_dir) -> ResultsFile:
    return ResultsFile(Path(out_dir) / "memory.csv", MEMORY_COLUMNS, MEMORY_KEY)


def plan(cases, measured_configs=MEASURED_CONFIGS, measured_batch=MEASURED_BATCH, measured_vocab=MEASURED_VOCAB):
    """``(case, source)`` pairs: every case modelled and traced, then measured for ``measured_configs`` at
    ``measured_batch`` and ``measured_vocab`` (all traces first: they take a second each, measurements longer)."""
    cases = list(cases)
    pairs = [(case, source) for case in cases for source in ("model", "traced")]
    return pairs + [
        (case, "measured")
        for case in cases
        if case.config in measured_configs
        and (case.batch_size, case.seq_len) == tuple(measured_batch)
        and case.vocab_size == measured_vocab
    ]


def run_plan(pairs, file: ResultsFile, progress: bool = True) -> int:
    """Append the rows of ``pairs`` not yet in ``file``; returns how many were written."""
    from tqdm.auto import tqdm

    # once each: the GPU cases of two folders (or of a suite's triton and reference rows) may be the same case
    todo = [pair for pair in dict.fromkeys(pairs) if not file.done(pair[0].key_row(pair[1]))]
    for case, source in tqdm(todo, desc="memory", unit="row", disable=not progress, dynamic_ncols=True):
        device = "cpu" if source == "measured" else "meta"
        file.append(case.key_row(source) | ROW_MAKERS[source](case) | environment(device))
    return len(todo)


# ---------------------------------------------------------------------------------------------- command line
def _batch_shape(text: str) -> tuple[int, int]:
    batch, _, seq = text.lower().partition("x")
    if not (batch.isdigit() and seq.isdigit() and min(int(batch), int(seq)) >= 1):
        raise ValueError("expected BATCHxSEQ with positive integers, e.g. 8x256")
    return int(batch), int(seq)


def _switch(text: str) -> bool:
    if text not in ("off", "on"):
        raise ValueError("expected off or on")
    return text == "on"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out-dir", default="reports/memory-scaling",
                        help="folder of memory.csv, memory.md and the plots (default: reports/memory-scaling)")
    parser.add_argument("--configs", type=comma_list(str), default=list(CONFIGS),
                        help=f"model sizes (default: {','.join(CONFIGS)})")
    parser.add_argument("--methods", type=comma_list(str), default=list(METHODS),
                        help=f"methods (default: {','.join(METHODS)})")
    parser.add_argument("--densities", type=comma_list(float), default=list(DENSITIES),
                        help="block densities of masked and smet (default: 0.5,0.25,0.1)")
    parser.add_argument("--batch-shapes", type=comma_list(_batch_shape), default=list(BATCH_SHAPES),
                        help="batch × sequence shapes (default: 8x256,32x256)")
    parser.add_argument("--vocab-sizes", type=comma_list(int), default=list(VOCAB_SIZES),
                        help="vocabulary sizes (default: 256,32000)")
    parser.add_argument("--state-dtypes", type=comma_list(str), default=list(STATE_DTYPES),
                        help="optimizer-state dtypes with bf16 weights; GaLore has bf16 only (default: fp32,bf16)")
    parser.add_argument("--activation-checkpointing", "--checkpointing", dest="checkpointing",
                        type=comma_list(_switch), default=["off", "on"],
                        help="activation checkpointing per decoder layer, off and/or on, as smet-bench run's and "
                        "smet-train's option of that name (--checkpointing: its older name) (default: off,on)")
    parser.add_argument("--measure-configs", type=comma_list(str, allow_empty=True),
                        help="sizes of --configs also measured on real CPU tensors at batch 8x256, vocab 256 (which "
                        f"--batch-shapes and --vocab-sizes must then hold); empty for none (default: those of "
                        f"{','.join(MEASURED_CONFIGS)} in --configs)")
    parser.add_argument("--report-only", action="store_true",
                        help="render memory.md from the existing memory.csv without tracing (default: trace first)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar (default: shown)")


def _validate(args) -> None:
    from smet_kernels.layout import check_density
    from smet_kernels.train.config import check_choices, check_output_folder

    check_output_folder(args.out_dir, "--out-dir")

    measured = args.measure_configs
    for option, values, allowed in (("--configs", args.configs, CONFIGS), ("--methods", args.methods, METHODS),
                                    ("--state-dtypes", args.state_dtypes, STATE_DTYPES),
                                    ("--measure-configs", measured or [], CONFIGS)):  # fmt: skip
        check_choices(option, values, allowed)
    if measured:  # given: a size it cannot measure is refused, not silently left out
        missing = [v for v in measured if v not in args.configs]
        if missing:
            raise ValueError(f"--measure-configs {','.join(missing)} not in --configs {','.join(args.configs)}: "
                             "only traced sizes are measured")  # fmt: skip
        batch, seq = MEASURED_BATCH
        has_batch = tuple(MEASURED_BATCH) in map(tuple, args.batch_shapes)
        lacking = [] if has_batch else [f"{batch}x{seq} to --batch-shapes"]
        lacking += [f"{MEASURED_VOCAB} to --vocab-sizes"] if MEASURED_VOCAB not in args.vocab_sizes else []
        if lacking:
            raise ValueError(f"--measure-configs measures at batch {batch}x{seq} and vocab {MEASURED_VOCAB}: add "
                             + " and ".join(lacking))
    for density in args.densities:
        check_density(density, "--densities")
    if any(v < 2 for v in args.vocab_sizes):
        raise ValueError(f"--vocab-sizes must be ints >= 2, got {args.vocab_sizes}")


def _check_measurable(cases, memory_bytes: int | None = None) -> None:
    """Refuse measured ``cases`` whose predicted peak (the memory model's) exceeds this machine's memory
    (``memory_bytes``, default: physical memory): a measured 7b step would allocate some 100 GB of CPU tensors."""
    memory_bytes = memory_bytes or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    peaks: dict[str, int] = {}
    for case in cases:
        peaks[case.config] = max(peaks.get(case.config, 0), model_row(case)["peak_bytes"])
    too_large = {config: peak for config, peak in peaks.items() if peak > memory_bytes}
    if too_large:
        sizes = ", ".join(f"{config} about {peak / 1e9:.0f} GB" for config, peak in too_large.items())
        raise ValueError(f"--measure-configs {','.join(too_large)}: a measured step needs more than this machine's "
                         f"{memory_bytes / 1e9:.0f} GB of memory ({sizes}, predicted); trace it without measuring")


def main_from_args(args, prog: str, argv: list[str]) -> int:
    """Trace (resumable: rows already in memory.csv are skipped), then render memory.md."""
    import shlex

    from .memory_report import gpu_cases, write_memory_report
    from .runner import make_out_dir, usage_error

    out_dir = Path(args.out_dir)
    try:
        _validate(args)
        if not args.report_only:
            checkpointing = [c if isinstance(c, bool) else _switch(c) for c in args.checkpointing]
            cases = list(memory_cases(args.configs, args.methods, args.densities, args.batch_shapes,
                                      args.vocab_sizes, args.state_dtypes, checkpointing))  # fmt: skip
            if not cases:
                raise ValueError(f"--methods {','.join(args.methods)} with --state-dtypes "
                                 f"{','.join(args.state_dtypes)} gives no case to trace: GaLore keeps bf16 states only")
            cases += [c for c in gpu_cases(out_dir.parent) if c not in cases]
            measured = MEASURED_CONFIGS if args.measure_configs is None else args.measure_configs
            pairs = plan(cases, measured)
            _check_measurable([case for case, source in pairs if source == "measured"])
            make_out_dir(out_dir, prog)  # before the tracing, which writes its first row only when done
            written = run_plan(pairs, memory_file(out_dir), not args.no_progress)
            if written:
                with (out_dir / "commands.txt").open("a") as handle:
                    handle.write(f"{prog} {shlex.join(argv)}\n")
        path = write_memory_report(out_dir)
    except ValueError as error:
        usage_error(error, prog)
    print(f"{prog}: wrote {path}")
    return 0
