"""Compilation spread over the CPU cores for ``smet-bench gpu-check``.

Triton compiles a kernel the first time a process launches it with a new set of constexprs and argument
specialisations, one kernel after another, and keeps the binary in its on-disk cache (``~/.triton/cache``), which
every process on the machine reads. So during the ``correctness`` stage worker processes (``spawn``, one CUDA
context each) run

* the matmul checks, one task per (block size, dtype) (:func:`matmul_group`), and
* on a GPU, one launch of every (op, config) that the headline autotuning of the ``kernels`` stage will try, on the
  headline operands themselves (:func:`warm_kernel_timings`), so that the same specialisations are compiled, and of
  the weight grads at every other ``SPLIT_K`` value of the timed shapes and training steps
  (:func:`weight_grad_splits`),

while the main process runs the AdamW, regrow and training-step checks. The kernel timings then load those binaries
from the cache instead of compiling them. Nothing is timed while workers run. A worker that dies (a hard fault) breaks
the pool, so the matmul groups not returned run again, each in a process of its own: only a group that dies again
fails. A worker still running at its deadline is stopped: its checks fail as timed out where the deadline was
3 × the stage's estimate (a hang), and are listed as not run where it was the budget (:func:`.correctness.run`).
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import multiprocessing
import os
import time
from concurrent.futures.process import BrokenProcessPool

import torch

from . import kernel_ops
from .plan import TIMING_CONFIGS, Sizes

GRACE_S = 30.0  # a worker may finish the case it started when its deadline passed
#: the providers with a weight-grad kernel of their own, and its variant (``persistent`` runs the grouped one)
WEIGHT_GRAD_VARIANTS = {"triton_grouped": "grouped", "triton_tma": "tma"}


def default_workers(device: torch.device) -> int:
    """Worker processes: every core but two on a GPU machine (the main process and the driver keep theirs); one on a
    CPU, where the interpreter's checks compete with the main process for the same cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, cores - 2) if device.type == "cuda" else 1


def _share_triton_cache() -> None:
    """Name Triton's cache folder in the environment (its default where unset) before workers start: Inductor, once
    it runs in this process, points an unset ``TRITON_CACHE_DIR`` at a folder of its own, where the binaries the
    workers compiled would not be found."""
    import triton

    knobs = getattr(triton, "knobs", None)  # Triton >= 3.4
    if not os.environ.get("TRITON_CACHE_DIR") and knobs is not None:
        os.environ["TRITON_CACHE_DIR"] = str(knobs.cache.dir)


def _start_worker(device_name: str) -> None:
    if device_name == "cpu":
        torch.set_num_threads(1)


class Pool:
    """A ``spawn`` process pool whose :meth:`result` never raises: a task's exception, a dead worker or the deadline
    become a value the caller reports. Every wait ends by one absolute time, ``deadline`` + ``grace_s``."""

    def __init__(self, workers: int, device: torch.device, deadline, grace_s: float = GRACE_S):
        _share_triton_cache()
        self.end = time.monotonic() + deadline.left_s() + grace_s
        self.futures: list[concurrent.futures.Future] = []
        self.executor = concurrent.futures.ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(device.type,),
        )

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def submit(self, fn, *args) -> concurrent.futures.Future:
        future = self.executor.submit(fn, *args)
        self.futures.append(future)
        return future

    def result(self, future: concurrent.futures.Future):
        """``("ok", value)``, ``("raised", message)``, ``("died", message)`` or ``("timeout", message)``. A dead
        worker breaks the whole pool: every task not yet returned comes back ``died`` (see :func:`run_alone`)."""
        try:
            return "ok", future.result(timeout=max(0.0, self.end - time.monotonic()))
        except concurrent.futures.TimeoutError:
            return "timeout", "the worker was still running at its deadline"
        except BrokenProcessPool:
            return "died", "the worker process died (a hard fault in a compiler or a kernel?)"
        except Exception as error:  # the task's own exception, re-raised here
            return "raised", f"{type(error).__name__}: {error}"[:300]

    def close(self) -> None:
        """Cancel what has not started; stop the workers only if a task is still running (stuck in a kernel)."""
        running = [f for f in self.futures if not f.done()]
        processes = list((getattr(self.executor, "_processes", None) or {}).values())  # CPython keeps them here
        self.executor.shutdown(wait=False, cancel_futures=True)
        if running:
            for process in processes:
                if process.is_alive():
                    process.terminate()
        self.executor.shutdown(wait=True)


def run_alone(tasks: list[tuple], device: torch.device, deadline) -> list[tuple[str, object]]:
    """Each ``(fn, *args)`` of ``tasks`` in a pool of its own, all at once: after a worker died, so that a task that
    kills its process again fails alone instead of every task that shared its pool."""
    pools = [Pool(1, device, deadline) for _ in tasks]
    try:
        futures = [pool.submit(*task) for pool, task in zip(pools, tasks)]
        return [pool.result(future) for pool, future in zip(pools, futures)]
    finally:
        for pool in pools:
            pool.close()


def matmul_group(sizes: Sizes, device_name: str, seed: int, block_size: int, dtype_name: str, budget):
    """Worker task: the matmul checks of one (block size, dtype): ``(rows, not_run)``."""
    from .correctness import matmul_checks

    return matmul_checks(sizes, torch.device(device_name), seed, budget, groups=[(block_size, dtype_name)])


def config_choices(block_size: int, operand: torch.Tensor) -> list[dict[str, set]]:
    """Config selections, one config per kernel each, that together cover every config of :data:`TIMING_CONFIGS`
    that the kernel's own pruner keeps at ``block_size`` for operands like ``operand`` (a lone config skips the
    pruner, see :func:`kernel_ops.restrict_configs`); a kernel with fewer configs repeats its last. ``[{}]`` (each
    kernel as it is) where no timing config exists (the interpreter's single config)."""
    kept = {}
    for name, family, tuner in kernel_ops.autotuners():
        candidates = [c for c in tuner.configs if kernel_ops.config_key(c) in TIMING_CONFIGS[family]]
        prune = getattr(tuner, "early_config_prune", None)
        if candidates and prune is not None:
            candidates = prune(candidates, {"operand": operand}, BLOCK_SIZE=block_size)
        if candidates:
            kept[name] = sorted(kernel_ops.config_key(c) for c in candidates)
    count = max((len(keys) for keys in kept.values()), default=1)
    return [{name: {keys[min(i, len(keys) - 1)]} for name, keys in kept.items()} for i in range(count)]


def warm_kernel_timings(sizes: Sizes, device_name: str, seed: int, block_size: int, provider: str, budget,
                        split_k: int | None = None) -> int:  # fmt: skip
    """Worker task: launch each op of ``provider`` on the headline operands at ``block_size`` once per config of
    :func:`config_choices`, compiling what the ``kernels`` stage's autotuning will try; with ``split_k``, only its
    weight grad, split ``split_k`` times (another binary: ``SPLIT_K`` is a constexpr). Returns the launches made."""
    from bench import kernels

    from .measure import kernel_cases

    device = torch.device(device_name)
    headline = kernel_cases(sizes, block_size)[0]
    operands, key, launches = None, None, 0
    for case in (c for c in headline if c.provider == provider and (split_k is None or c.op == "grad_weight")):
        if kernels.operands_key(case) != key:
            operands, key = kernels.make_operands(case, device, seed, previous=operands), kernels.operands_key(case)
        fn = kernels.case_function(case, operands, "triton")
        if split_k is not None:
            grad_weight = kernel_ops.matmul_ops(WEIGHT_GRAD_VARIANTS[provider])["grad_weight"]
            fn = functools.partial(grad_weight, operands.dy, operands.x, operands.layout, split_k)
        for choice in config_choices(block_size, torch.empty(0, dtype=case.dtype, device=device)):
            if budget.expired():
                return launches
            with kernel_ops.restrict_configs(choice):
                fn()
            launches += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return launches


def weight_grad_splits(sizes: Sizes, block_size: int, device: torch.device) -> list[int]:
    """The ``SPLIT_K`` values of the timed Triton weight-grad cases at ``block_size`` and, at the training block size,
    of the SMET training steps' layers (``default_split_k`` of each case's tokens and block count; the headline's
    first)."""
    from bench import kernels
    from profiling.memory_model import parse_dtype
    from smet_kernels.layout import nnz_for_density
    from smet_kernels.ops.launch_config import default_split_k

    from .measure import TRAINING_DENSITY, kernel_cases

    cases = list(itertools.chain(*kernel_cases(sizes, block_size)))
    if block_size == sizes.training_block_size:
        cases += kernels.kernel_cases((*sizes.training_configs, sizes.compile_config), [TRAINING_DENSITY],
                                      [block_size], [sizes.training_batch * sizes.training_seq],
                                      parse_dtype(sizes.dtype), providers=("triton_grouped",),
                                      ops=("grad_weight",))  # fmt: skip
    splits: list[int] = []
    for case in cases:
        if case.op == "grad_weight" and case.provider in kernels.TRITON_PROVIDERS:
            blocks = (case.shape.N // block_size) * (case.shape.K // block_size)
            split = default_split_k(case.M, nnz_for_density(blocks, case.density), device)
            splits += [split] if split not in splits else []
    return splits


def warm_tasks(sizes: Sizes, device: torch.device) -> list[tuple[int, str, int | None]]:
    """``(block size, provider, split_k)`` of :func:`warm_kernel_timings`: every Triton provider the headline
    autotuning times (``split_k`` None), then each weight-grad kernel at the split values of the other timed shapes
    and training steps (each a binary of its own, which those stages would otherwise compile one after another)."""
    from bench import kernels

    # triton_plain_order is the grouped kernel with another GROUP_M, which the autotune key leaves out: it runs the
    # grouped kernel's pick for the same key (one compile per op in the main process), so warming it all is waste
    providers = [p for p in kernels.default_providers("triton")
                 if p in kernels.TRITON_PROVIDERS and p != "triton_plain_order"]  # fmt: skip
    tasks = [(block_size, provider, None) for block_size in sizes.kernel_block_sizes for provider in providers]
    for block_size in sizes.kernel_block_sizes:
        _, *others = weight_grad_splits(sizes, block_size, device)
        tasks += [(block_size, provider, split) for provider in WEIGHT_GRAD_VARIANTS if provider in providers
                  for split in others]  # fmt: skip
    return tasks
