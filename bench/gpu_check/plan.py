"""What ``smet-bench gpu-check`` runs: the stages in priority order, their sizes on a GPU and on a CPU, the pinned
Triton configs that bound compilation, and the printed plan with an estimated time per stage.

Pinned configs (``(BLOCK_M, num_warps, num_stages)`` per kernel family and block size) are taken from
``reports/static-sm90/kernel_resources.md``: each is kept by the kernels' pruner, compiles to a pipelined loop
(``cp_async`` or TMA > 0) on sm_90 and does not spill (``stack`` = 0). Correctness compiles exactly one config per
family; the headline shape of the timings autotunes over the small ``TIMING_CONFIGS`` set and the other shapes of
that block size, the training steps and the compiled step reuse its picks. Compilation is spread over the CPU cores:
during ``correctness`` worker processes run the matmul checks and compile every config the headline autotuning will
try, into Triton's on-disk cache (:mod:`.parallel`).
"""

from __future__ import annotations

from dataclasses import dataclass

STAGES = ("env", "correctness", "kernels", "adamw", "training", "compile")
STAGE_TITLES = {
    "env": "environment and ceilings (cuBLAS matmul, device copy)",
    "correctness": "correctness: matmul variants (in worker processes, which also compile the kernel timings' "
    "configs), fused AdamW with regrows, one SMET training step",
    "kernels": "headline kernel timings vs cuBLAS and torch BSR, every variant",
    "adamw": "compact AdamW step over every hidden weight of the model vs torch AdamW (fused) and the copy ceiling",
    "training": "training steps: dense, GaLore, masked DST, SMET (tokens/s, peak memory); SMET and dense with "
    "activation checkpointing at the last config",
    "compile": "SMET training step: torch.compile vs eager",
}

PINNED_CONFIGS = {  # block size -> family -> {(BLOCK_M, num_warps, num_stages)}
    128: {"dense_sparse": {(128, 8, 3)}, "dense_sparse_persistent": {(128, 8, 2)}, "grad_weight": {(64, 8, 3)}},
    64: {"dense_sparse": {(128, 4, 3)}, "dense_sparse_persistent": {(128, 4, 3)}, "grad_weight": {(64, 4, 3)}},
    32: {"dense_sparse": {(128, 4, 3)}, "dense_sparse_persistent": {(128, 4, 3)}, "grad_weight": {(64, 4, 3)}},
}
TIMING_CONFIGS = {  # autotuned on the headline shape only; the kernels' pruner drops those that do not fit
    "dense_sparse": {(64, 4, 3), (128, 4, 3), (128, 8, 3), (128, 8, 4)},
    "dense_sparse_persistent": {(64, 4, 3), (128, 4, 3), (128, 8, 2)},
    "grad_weight": {(64, 4, 3), (64, 8, 3), (128, 8, 3)},
}


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of every stage; :data:`GPU` is the H200 run, :data:`CPU` the same stages at interpreter size."""

    name: str
    dtype: str  # kernel timings and training
    ceiling_matmul: int  # n of the n x n x n matmul
    ceiling_copy_side: int  # the copied fp32 tensor is side x side
    check_dtypes: tuple[str, ...]
    check_block_sizes: tuple[int, ...]
    check_tokens: int  # several token tiles with a ragged tail
    check_grid: tuple[int, int]  # block rows x block columns of the checked layout
    split_k: int  # the "split-K on" setting of the weight-grad checks
    adamw_config: str  # its largest hidden linear shape holds the AdamW checks' values
    adamw_block_size: int
    adamw_steps: int
    regrow_every: int
    step_config: str  # the SMET training step checked against the reference backend
    step_block_size: int
    step_batch: int
    step_seq: int
    kernel_configs: tuple[str, ...]
    kernel_tokens: int
    kernel_block_sizes: tuple[int, ...]  # the first is the block size of the "b = 128" bars
    kernel_densities: tuple[float, ...]
    headline_shape: str  # autotuned first; the other shapes reuse its configs
    optimizer_config: str
    optimizer_block_size: int
    training_configs: tuple[str, ...]
    training_block_size: int
    training_batch: int
    training_seq: int
    training_vocab: int
    training_steps: int
    compile_config: str
    estimates_s: dict  # stage -> estimated seconds


GPU = Sizes(
    name="gpu",
    dtype="bf16",
    ceiling_matmul=8192,
    ceiling_copy_side=16384,  # 1 GiB of fp32: 2 GiB read + written
    check_dtypes=("bf16", "fp16"),
    check_block_sizes=(32, 64, 128),
    check_tokens=1000,
    check_grid=(6, 24),
    split_k=4,
    adamw_config="1b",
    adamw_block_size=32,  # 1b gate/up at d = 0.25: ~2750 blocks
    adamw_steps=30,
    regrow_every=10,
    step_config="20m",
    step_block_size=64,
    step_batch=4,
    step_seq=256,
    kernel_configs=("7b", "1b"),
    kernel_tokens=8192,
    kernel_block_sizes=(128, 64),
    kernel_densities=(0.5, 0.25, 0.1),
    headline_shape="7b:gate_up",
    optimizer_config="1b",
    optimizer_block_size=128,
    training_configs=("350m", "1b"),
    training_block_size=128,
    training_batch=32,
    training_seq=256,
    training_vocab=32000,
    training_steps=5,
    compile_config="20m",
    # correctness: ~60 check + ~50 warm-up compiles + ~40 of the weight grads' other SPLIT_K values over 14 workers
    # beside the AdamW checks; kernels: the headline configs and every split value come compiled from the workers,
    # the other shapes only benchmark the picks;
    # training: 8 cases ~100 s, + ~15 s for the two checkpointed 1b rows (1.33× a step, the shapes already autotuned),
    # + ~45 s for the first GaLore step at 1b: 168 full fp32 SVDs (per layer 4 of 2048², 3 of 2048 × 5504) on the GPU,
    # whose cuSOLVER time is the least known term here
    estimates_s={"env": 20, "correctness": 85, "kernels": 120, "adamw": 15, "training": 160, "compile": 45},
)

CPU = Sizes(
    name="cpu",
    dtype="fp32",  # Triton's interpreter mishandles bf16 dot products
    ceiling_matmul=256,
    ceiling_copy_side=512,
    check_dtypes=("fp32", "fp16"),
    check_block_sizes=(16, 32),
    check_tokens=40,
    check_grid=(3, 17),
    split_k=2,
    adamw_config="tiny",
    adamw_block_size=16,
    adamw_steps=6,
    regrow_every=3,
    step_config="tiny",
    step_block_size=32,
    step_batch=2,
    step_seq=16,
    kernel_configs=("tiny",),
    kernel_tokens=40,
    kernel_block_sizes=(32, 16),
    kernel_densities=(0.5, 0.25),
    headline_shape="tiny:gate_up",
    optimizer_config="tiny",
    optimizer_block_size=16,
    training_configs=("tiny",),
    training_block_size=32,
    training_batch=2,
    training_seq=16,
    training_vocab=256,
    training_steps=1,
    compile_config="tiny",
    estimates_s={"env": 2, "correctness": 35, "kernels": 40, "adamw": 3, "training": 28, "compile": 50},
)


def sizes_for(device_type: str) -> Sizes:
    return GPU if device_type == "cuda" else CPU


def format_plan(sizes: Sizes, stages: list[str], minutes: float) -> str:
    """The stages to run, in order, with their estimated seconds and the running total against the budget."""
    lines = [f"gpu-check plan ({sizes.name} sizes, budget {minutes:g} min; estimates, not measurements):"]
    total = 0.0
    for stage in STAGES:
        if stage not in stages:
            lines.append(f"  {stage:<12} not selected")
            continue
        total += sizes.estimates_s[stage]
        over = "" if total <= 60 * minutes else "  (past the budget: may end as not run)"
        lines.append(f"  {stage:<12} ~{sizes.estimates_s[stage]:>4.0f} s  (total ~{total:.0f} s)  "
                     f"{STAGE_TITLES[stage]}{over}")  # fmt: skip
    return "\n".join(lines)
