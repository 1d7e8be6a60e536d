"""Stage ``correctness`` of ``smet-bench gpu-check``: compiled kernels against independent computations.

* **matmul**: forward, input grad and weight grad (split-K off and on) of every variant, per dtype and block size,
  on a layout whose pipelined loops run long (block row 0 holds all but one block column), with an empty block row
  and an empty block column, over several token tiles with a ragged tail. The error ``‖out − ref‖ / ‖ref‖`` against
  a float64 dense computation must stay within ``bound = max(2 × PyTorch's own error in that dtype on the same
  inputs, 1e-6)`` (``F.linear`` / its backward matmuls). After a warm-up call (compile, autotune), each check runs
  twice with every new tensor NaN-filled (``torch.utils.deterministic.fill_uninitialized_memory`` under
  ``torch.use_deterministic_algorithms``): an element the kernel does not write stays NaN, and two results that
  differ bitwise are a race.
* **adamw**: the fused step (each warm-up mode, bf16 and fp32 parameters) over many steps with regrows in between,
  against the reference step on copies: ``block_step`` exactly, values and moments within the unit tests' bounds.
* **regrow**: the regrow kernel against its reference (exactly, right after each regrow).
* **training step**: one SMET step (forward, backward, SMETAdamW) with the Triton backend against the reference:
  the loss, every gradient (one AdamW step moves a parameter by about ``lr`` whatever its gradient, far less
  than the bf16 tolerance of the parameters: the gradients are the backward's check) and every parameter.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable

import torch

from profiling.memory_model import parse_dtype
from smet_kernels.ops.variant import VARIANTS, tma_supported

from . import kernel_ops
from .plan import Sizes

BOUND_FLOOR = 1e-6
ADAMW_HYPER = dict(betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1, warmup_steps=8)
ADAMW_PARAM_TOLERANCE = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}  # tests/test_adamw.py
STEP_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
#: relative error of each gradient of the training step (a wrong backward is off by O(1): negated, by 2)
GRAD_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-1, torch.bfloat16: 1e-1}


@contextlib.contextmanager
def poisoned_outputs():
    """Every tensor allocated inside is NaN-filled (integers: their maximum): PyTorch's deterministic mode fills
    uninitialised memory. ``warn_only`` keeps ops without a deterministic implementation running."""
    import torch.utils.deterministic as deterministic

    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    fill = deterministic.fill_uninitialized_memory
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.use_deterministic_algorithms(True, warn_only=True)
            deterministic.fill_uninitialized_memory = True
            yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        deterministic.fill_uninitialized_memory = fill


def relative_error(result: torch.Tensor, expected: torch.Tensor) -> float:
    """``‖result − expected‖ / ‖expected‖`` in float64 (NaN when ``result`` holds a NaN)."""
    expected = expected.double()
    return float((result.double() - expected).norm() / expected.norm().clamp_min(1e-300))


def check_layout(grid: tuple[int, int], block_size: int, generator: torch.Generator):
    """Block row 0 holds every block column but 1 (a long pipelined loop), row 1 and column 1 are empty, the other
    rows are random at density ~0.3; slots are shuffled (as after topology updates)."""
    from smet_kernels.layout import BlockLayout

    rows, cols = grid
    mask = torch.rand(rows, cols, generator=generator) < 0.3
    mask[0] = True
    mask[1] = False
    mask[:, 1] = False
    indices = mask.nonzero()
    indices = indices[torch.randperm(len(indices), generator=generator)]
    return BlockLayout(indices, (rows * block_size, cols * block_size), block_size)


class _MatmulOperands:
    """Random operands of one (dtype, block size) point, their float64 results and PyTorch's error in ``dtype``."""

    def __init__(self, sizes: Sizes, block_size: int, dtype: torch.dtype, device: torch.device, seed: int):
        from smet_kernels.functional import from_dense, to_dense

        generator = torch.Generator().manual_seed(seed)
        layout = check_layout(sizes.check_grid, block_size, generator)
        n, k = layout.shape
        m = sizes.check_tokens
        self.layout = layout.to(device)
        self.x = torch.randn(m, k, generator=generator).to(device, dtype)
        self.dy = torch.randn(m, n, generator=generator).to(device, dtype)
        self.values = (0.05 * torch.randn(layout.nnz, block_size, block_size, generator=generator)).to(device, dtype)
        weight = to_dense(self.values, self.layout)
        x64, dy64, w64 = self.x.double(), self.dy.double(), weight.double()
        grad_weight = from_dense(dy64.t() @ x64, self.layout)
        self.expected = {"forward": x64 @ w64.t(), "grad_input": dy64 @ w64, "grad_weight": grad_weight}
        torch_results = {
            "forward": torch.nn.functional.linear(self.x, weight),
            "grad_input": self.dy @ weight,
            "grad_weight": from_dense(self.dy.t() @ self.x, self.layout),
        }
        self.bound = {
            op: max(2.0 * relative_error(torch_results[op], self.expected[op]), BOUND_FLOOR) for op in self.expected
        }

    def call(self, ops: dict, op: str, split_k: int | None) -> Callable[[], torch.Tensor]:
        if op == "forward":
            return lambda: ops["forward"](self.x, self.values, self.layout)
        if op == "grad_input":
            return lambda: ops["grad_input"](self.dy, self.values, self.layout)
        return lambda: ops["grad_weight"](self.dy, self.x, self.layout, split_k)


def check_call(fn: Callable[[], torch.Tensor], expected: torch.Tensor, bound: float,
               locate: Callable[[torch.Tensor], str] | None = None) -> dict:  # fmt: skip
    """Warm up ``fn`` (compile, autotune), then run it twice on poisoned outputs: written, repeatable, within bound.
    A failing result is described by ``locate(result)`` too, if given (where it is wrong)."""
    fn()
    with poisoned_outputs():
        first, second = fn(), fn()
    error = relative_error(first, expected)
    unwritten = int((~torch.isfinite(first)).sum())
    repeatable = bool(torch.equal(first, second))
    problems = []
    if unwritten:
        problems.append(f"{unwritten} elements NaN/unwritten")
    if not repeatable:
        problems.append(f"moved between identical runs (max diff {(first.double() - second.double()).abs().max():.3g})")
    if not error <= bound:
        problems.append(f"error {error:.3g} > bound {bound:.3g}")
    if problems and locate is not None:
        problems.append(locate(first))
    return {"error": error, "bound": bound, "repeatable": repeatable, "status": "fail" if problems else "pass",
            "note": "; ".join(problems)}  # fmt: skip


OFF_FACTOR = 10.0  # an element is "off" when its error exceeds OFF_FACTOR × bound × the RMS of the expected output


def where_wrong(result: torch.Tensor, expected: torch.Tensor, bound: float, layout) -> str:
    """Where a failing matmul result is wrong, so that one GPU run says what to fix: the elements off by more than
    ``OFF_FACTOR × bound ×`` RMS(expected) (or not finite), by token rows and block columns of an ``[M, N]`` output,
    by blocks ``(row, column)`` of a ``[nnz, b, b]`` weight grad, and the worst one (got / want)."""
    difference = (result.double() - expected.double()).abs()
    scale = float(expected.double().pow(2).mean().sqrt())
    off = ~(difference <= OFF_FACTOR * bound * max(scale, 1e-300))  # NaN counts as off
    if not bool(off.any()):
        return f"no element off by more than {OFF_FACTOR:g} × bound × RMS"
    ranked = torch.where(torch.isfinite(difference), difference, torch.full_like(difference, float("inf")))
    flat = int(ranked.argmax())
    worst = [int(i) for i in torch.unravel_index(torch.tensor(flat), difference.shape)]
    got, want = float(result.flatten()[flat]), float(expected.flatten()[flat])
    b = layout.block_size
    if result.dim() == 3:
        slots = off.flatten(1).any(1).nonzero().flatten().cpu()
        blocks = [tuple(layout.block_indices[int(k)].tolist()) for k in slots[:4]]
        where = f"{len(slots)} of {layout.nnz} blocks, e.g. {blocks}"
        worst_at = f"block {tuple(layout.block_indices[worst[0]].tolist())} element {worst[1:]}"
    else:
        rows = off.any(1).nonzero().flatten().cpu()
        columns = (off.any(0).nonzero().flatten().cpu() // b).unique().tolist()
        where = (f"token rows {int(rows.min())}–{int(rows.max())} ({len(rows)} of {result.shape[0]}), "
                 f"block columns {columns[:8]}{' ...' if len(columns) > 8 else ''}")  # fmt: skip
        worst_at = f"[{worst[0]}, {worst[1]}] (block column {worst[1] // b})"
    return f"{int(off.sum())} elements off: {where}; worst at {worst_at}: got {got:.4g}, want {want:.4g}"


def variants_for(device: torch.device) -> tuple[str, ...]:
    """Every variant; ``tma`` only where the Tensor Memory Accelerator exists (sm_90+) or under the interpreter."""
    return VARIANTS if tma_supported(device) else tuple(v for v in VARIANTS if v != "tma")


def matmul_points(variants: tuple[str, ...], split_k: int) -> list[tuple[str, str, int | None]]:
    """``(variant, op, split_k)`` of every check at one dtype and block size; the persistent variant has no weight
    grad of its own (it runs the pointer kernel, checked as ``grouped``)."""
    points = [("forward", None), ("grad_input", None), ("grad_weight", 1), ("grad_weight", split_k)]
    return [(v, op, k) for v in variants for op, k in points if not (v == "persistent" and op == "grad_weight")]


def matmul_groups(sizes: Sizes) -> list[tuple[int, str]]:
    """``(block size, dtype)`` of every group of matmul checks (one worker task each, see :mod:`.parallel`)."""
    return [(block_size, dtype_name) for block_size in sizes.check_block_sizes for dtype_name in sizes.check_dtypes]


def group_checks(sizes: Sizes, device: torch.device, block_size: int, dtype_name: str) -> list[tuple[dict, int | None]]:
    """``(row keys, split_k)`` of each check of one group."""
    return [({"check": "matmul", "variant": variant, "dtype": dtype_name, "block_size": block_size,
              "op": op if split_k is None else f"{op} split_k={split_k}"}, split_k)
            for variant, op, split_k in matmul_points(variants_for(device), sizes.split_k)]  # fmt: skip


def not_run_label(row: dict) -> str:
    return f"matmul {row['variant']} {row['dtype']} b={row['block_size']} {row['op']}"


def matmul_checks(sizes: Sizes, device: torch.device, seed: int, budget, groups=None) -> tuple[list[dict], list[str]]:
    """Rows of the matmul checks of ``groups`` (default: :func:`matmul_groups`), and the checks the budget did not
    reach. On a GPU each block size compiles only its pinned configs (``plan.PINNED_CONFIGS``)."""
    rows, not_run = [], []
    for block_size, dtype_name in groups or matmul_groups(sizes):
        with kernel_ops.restrict_configs(kernel_ops.pinned_configs(block_size, device)):
            operands = None  # drawn at the first check that runs
            for row, split_k in group_checks(sizes, device, block_size, dtype_name):
                if budget.expired():
                    not_run.append(not_run_label(row))
                    continue
                try:
                    operands = operands or _MatmulOperands(sizes, block_size, parse_dtype(dtype_name), device, seed)
                    op = row["op"].split()[0]
                    call = operands.call(kernel_ops.matmul_ops(row["variant"]), op, split_k)
                    expected, bound = operands.expected[op], operands.bound[op]
                    row |= check_call(call, expected, bound,
                                      lambda result: where_wrong(result, expected, bound, operands.layout))
                except Exception as error:  # a crash is a failed check, the others still run
                    row |= {"status": "fail", "note": f"raised {type(error).__name__}: {error}"[:300]}
                rows.append(row)
    return rows, not_run


def _close(got: torch.Tensor, want: torch.Tensor, tolerance: float) -> tuple[bool, float]:
    difference = (got.float() - want.float()).abs()
    return bool((difference <= tolerance + tolerance * want.float().abs()).all()), float(difference.max())


def adamw_checks(sizes: Sizes, device: torch.device, seed: int, budget) -> tuple[list[dict], list[str]]:
    """Fused AdamW (each warm-up mode × bf16 / fp32 parameters) over ``adamw_steps`` steps with a regrow of a tenth
    of the blocks every ``regrow_every`` steps, against the reference on copies; one ``regrow`` row per run."""
    from bench.optimizer import optimizer_shapes
    from smet_kernels.layout import BlockLayout

    shape = optimizer_shapes([sizes.adamw_config])[0]
    b = sizes.adamw_block_size
    rows, not_run = [], []
    for warmup in kernel_ops.warmup_modes():
        for dtype_name in ("bf16", "fp32"):
            label = f"adamw {warmup} {dtype_name} ({shape.N}x{shape.K}, b={b})"
            if budget.expired():
                not_run.extend([label, f"regrow {warmup} {dtype_name}"])
                continue
            generator = torch.Generator().manual_seed(seed)
            layout = BlockLayout.random(shape.N, shape.K, b, 0.25, generator=generator)
            dtype = parse_dtype(dtype_name)
            size = (layout.nnz, b, b)
            fused = {
                "param": (0.02 * torch.randn(size, generator=generator)).to(device, dtype),
                "exp_avg": torch.zeros(size, device=device),
                "exp_avg_sq": torch.zeros(size, device=device),
                "block_step": torch.zeros(layout.nnz, dtype=torch.int32, device=device),
            }
            reference = {name: tensor.clone() for name, tensor in fused.items()}
            adamw = {"check": "adamw", "variant": warmup, "dtype": dtype_name, "block_size": b,
                     "op": f"{sizes.adamw_steps} steps, {layout.nnz} blocks", "status": "pass", "note": ""}  # fmt: skip
            regrows = sizes.adamw_steps // sizes.regrow_every
            regrow = {"check": "regrow", "variant": warmup, "dtype": dtype_name, "block_size": b,
                      "op": f"{regrows} regrows", "status": "pass", "note": ""}  # fmt: skip
            worst = 0.0
            try:
                for step in range(1, sizes.adamw_steps + 1):
                    grad = (0.01 * torch.randn(size, generator=generator)).to(device, dtype)
                    for state, backend in ((fused, "triton"), (reference, "reference")):
                        kernel_ops.adamw_step(state["param"], grad, state["exp_avg"], state["exp_avg_sq"],
                                              state["block_step"], lr=1e-3, backend=backend, warmup=warmup,
                                              **ADAMW_HYPER)  # fmt: skip
                    problem = _adamw_mismatch(fused, reference, dtype)
                    difference = float((fused["param"].float() - reference["param"].float()).abs().max())
                    # NaN stays: max(worst, NaN) would be worst, a failed row with an error inside its bound
                    worst = math.nan if math.isnan(worst) or math.isnan(difference) else max(worst, difference)
                    if problem:
                        adamw |= {"status": "fail", "note": f"step {step}: {problem}"}
                        break
                    if step % sizes.regrow_every == 0:
                        slots = torch.randperm(layout.nnz, generator=generator)[: max(1, layout.nnz // 10)]
                        problem = _regrow_mismatch(fused, reference, slots.to(device), device, seed + step)
                        if problem:
                            regrow |= {"status": "fail", "note": f"step {step}: {problem}"}
                            break
            except Exception as error:
                adamw |= {"status": "fail", "note": f"raised {type(error).__name__}: {error}"[:300]}
                regrow |= {"status": "fail", "note": "not reached: the AdamW run raised"}
            adamw |= {"error": worst, "bound": ADAMW_PARAM_TOLERANCE[dtype]}
            rows.extend([adamw, regrow])
    return rows, not_run


def _regrow_mismatch(fused: dict, reference: dict, slots: torch.Tensor, device: torch.device, seed: int) -> str:
    """Regrow ``slots`` in both states (same draws): the regrown slots must match the reference exactly and the
    other slots of the fused state must be untouched."""
    before = {name: tensor.clone() for name, tensor in fused.items()}
    for state, backend in ((fused, "triton"), (reference, "reference")):
        draw = torch.Generator(device=device).manual_seed(seed)
        kernel_ops.regrow(state["param"], slots, state["exp_avg"], state["exp_avg_sq"], state["block_step"], draw,
                          backend)  # fmt: skip
    kept = torch.ones(len(fused["block_step"]), dtype=torch.bool, device=device)
    kept[slots] = False
    for name in fused:
        if not torch.equal(fused[name][slots], reference[name][slots]):
            return f"regrown {name} differs from the reference"
        if not torch.equal(fused[name][kept], before[name][kept]):
            return f"regrow changed {name} outside the regrown slots"
    return ""


def _adamw_mismatch(fused: dict, reference: dict, dtype: torch.dtype) -> str:
    """What differs first, and where: the slots (blocks) and their local step ``block_step``."""
    steps, want_steps = fused["block_step"], reference["block_step"]
    differs = steps != want_steps
    if bool(differs.any()):
        k = int(differs.nonzero()[0])
        return (f"block_step differs at {int(differs.sum())} of {len(steps)} slots, e.g. slot {k}: {int(steps[k])}, "
                f"reference {int(want_steps[k])} (a race on the read-then-bump?)")  # fmt: skip
    for name, tolerance in (("param", ADAMW_PARAM_TOLERANCE[dtype]), ("exp_avg", 1e-5), ("exp_avg_sq", 1e-5)):
        ok, worst = _close(fused[name], reference[name], tolerance)
        if not ok:
            got, want = fused[name].float(), reference[name].float()
            off = (~((got - want).abs() <= tolerance + tolerance * want.abs())).flatten(1).any(1)  # NaN is off
            k = int(off.nonzero()[0])
            return (f"{name} differs by {worst:.3g} (tolerance {tolerance:g} abs + rel) at {int(off.sum())} of "
                    f"{len(off)} slots, e.g. slot {k} (block_step {int(steps[k])})")  # fmt: skip
    return ""


def training_step_check(sizes: Sizes, device: torch.device, seed: int) -> dict:
    """One SMET training step with the Triton backend against the reference backend: the loss and every parameter
    (``error``, ``bound``), and every gradient within :data:`GRAD_TOLERANCE` (the note says which is off)."""
    from bench.training import TrainingCase, build
    from smet_kernels.train.model import lm_loss

    label = "bf16" if device.type == "cuda" else "fp32"
    dtype = parse_dtype(label)
    case = TrainingCase(sizes.step_config, "smet", 0.25, sizes.step_block_size, sizes.step_batch, sizes.step_seq,
                        dtype)  # fmt: skip
    results = {}
    for backend in ("triton", "reference"):
        model, optimizer = build(case, device, backend, seed)
        generator = torch.Generator().manual_seed(seed + 1)
        tokens = torch.randint(0, model.config.vocab_size, (case.batch_size, case.seq_len + 1), generator=generator)
        tokens = tokens.to(device)
        loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        results[backend] = (loss.item(), {name: p.detach().clone() for name, p in model.named_parameters()}, grads)
    tolerance = STEP_TOLERANCE[dtype]
    loss_error = abs(results["triton"][0] - results["reference"][0]) / abs(results["reference"][0])
    param_errors = {name: relative_error(results["triton"][1][name], want)
                    for name, want in results["reference"][1].items()}  # fmt: skip
    worst_param = max(param_errors, key=lambda name: (math.isnan(param_errors[name]), param_errors[name]))
    param_error = param_errors[worst_param]
    error = math.nan if math.isnan(loss_error) or math.isnan(param_error) else max(loss_error, param_error)
    grads, want_grads = results["triton"][2], results["reference"][2]
    grad_errors = {name: relative_error(grads[name], want) if name in grads else math.inf
                   for name, want in want_grads.items()}  # fmt: skip
    grad_errors |= {name: math.inf for name in grads if name not in want_grads}
    worst_grad = max(grad_errors, key=lambda name: (math.isnan(grad_errors[name]), grad_errors[name]), default="")
    grad_error = grad_errors.get(worst_grad, 0.0)
    grad_tolerance = GRAD_TOLERANCE[dtype]
    ok = error <= tolerance and grad_error <= grad_tolerance and bool(want_grads)
    note = "" if ok else (f"loss differs by {loss_error:.3g}, parameters by {param_error:.3g} (relative; most: "
                          f"{worst_param}), gradients by {grad_error:.3g} (relative, tolerance {grad_tolerance:g}; "
                          f"most: {worst_grad or 'no gradient'})")  # fmt: skip
    return {"check": "training step", "variant": f"{case.config} smet d=0.25", "dtype": label,
            "block_size": case.block_size, "op": "forward+backward+SMETAdamW vs reference backend", "error": error,
            "bound": tolerance, "status": "pass" if ok else "fail", "note": note}  # fmt: skip


def poison_check(device: torch.device) -> dict:
    """The poisoning itself: a tensor allocated under :func:`poisoned_outputs` must be all NaN on ``device``."""
    with poisoned_outputs():
        probe = torch.empty(1024, device=device)
    ok = bool(torch.isnan(probe).all())
    return {"check": "poison", "op": "torch.empty under poisoned_outputs is NaN", "status": "pass" if ok else "fail",
            "note": "" if ok else "allocations are not NaN-filled: unwritten outputs would go unseen"}  # fmt: skip


def run(sizes: Sizes, device: torch.device, seed: int, budget, workers: int | None = None):
    """Every correctness row (poison, matmul, adamw, regrow, training step) and what the budget did not reach.

    The matmul groups run in worker processes (:mod:`.parallel`; on a GPU they also compile the kernel timings'
    configs) while this process runs the AdamW, regrow and training-step checks. A group still running at the
    workers' deadline fails its checks ("timed out") where that deadline was 3 × the stage's estimate, and lists them
    as not run where it was the budget."""
    from bench.runner import Deadline

    from . import parallel

    groups = matmul_groups(sizes)
    # the workers' own deadline: the budget, or 3x the stage's estimate if sooner (a stuck worker costs no timings)
    limit_s = 3 * sizes.estimates_s["correctness"]
    hang = limit_s < budget.left_s()  # a group past this deadline hangs; past the budget's it was cut short
    workers_budget = Deadline(min(budget.left_s(), limit_s) / 60)
    tasks = [(parallel.matmul_group, sizes, str(device), seed, *group, workers_budget) for group in groups]
    to_warm = parallel.warm_tasks(sizes, device) if device.type == "cuda" else []
    warm_tasks = [(parallel.warm_kernel_timings, sizes, str(device), seed, block_size, provider, workers_budget, split)
                  for block_size, provider, split in to_warm]  # fmt: skip
    with parallel.Pool(workers or parallel.default_workers(device), device, workers_budget) as pool:
        matmul = [pool.submit(*task) for task in tasks]
        warm = [pool.submit(*task) for task in warm_tasks]
        rows, not_run = [poison_check(device)], []
        adamw_rows, adamw_not_run = adamw_checks(sizes, device, seed, budget)
        if budget.expired():
            adamw_not_run.append("training step vs reference backend")
        else:
            try:
                with kernel_ops.restrict_configs(kernel_ops.pinned_configs(sizes.step_block_size, device)):
                    adamw_rows.append(training_step_check(sizes, device, seed))
            except Exception as error:
                adamw_rows.append({"check": "training step", "status": "fail",
                                   "note": f"raised {type(error).__name__}: {error}"[:300]})  # fmt: skip
        results = [pool.result(future) for future in matmul]
        warmed = [pool.result(future) for future in warm]
    died = [i for i, (status, _) in enumerate(results) if status == "died"]
    if died:  # a dead worker broke the pool: each group it took along runs again alone, so only its own fails
        for i, result in zip(died, parallel.run_alone([tasks[i] for i in died], device, workers_budget)):
            results[i] = result
    for (block_size, dtype_name), (status, value) in zip(groups, results):
        if status == "ok":
            rows += value[0]
            not_run += value[1]
            continue
        checks = [row for row, _ in group_checks(sizes, device, block_size, dtype_name)]
        if status == "timeout" and not hang:
            not_run += [not_run_label(row) for row in checks]
        elif status == "timeout":
            note = (f"timed out after {limit_s + parallel.GRACE_S:.0f} s: still running at 3 × the stage's estimate "
                    f"+ {parallel.GRACE_S:.0f} s (a hanging kernel or compile?)")  # fmt: skip
            rows += [row | {"status": "fail", "note": note} for row in checks]
        else:
            rows += [row | {"status": "fail", "note": f"not returned: {value}"} for row in checks]
    if warm:
        launches = sum(value for status, value in warmed if status == "ok")
        problems = [value for status, value in warmed if status != "ok"]
        print(f"gpu-check: compiled the kernel timings' configs in workers: {launches} launches"
              + (f"; {len(problems)} task(s) did not finish: {problems[0]}" if problems else ""), flush=True)
    return rows + adamw_rows, not_run + adamw_not_run
