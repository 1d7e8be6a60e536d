"""GaLore-style AdamW (Zhao et al. 2024): Adam moments in a low-rank projection of the gradient.

For a 2-D weight ``W [m, n]`` in a param group with a ``rank`` key (``r``), at step ``t`` (0-based):

```
every update_proj_gap steps:  U, S, Vᵀ = svd(G)
    P = Vᵀ[:r]  (right, when m >= n)          or   P = U[:, :r]  (left, when m < n)
R = G Pᵀ   (right)                            or   R = Pᵀ G                  # projected gradient
m = β1 m + (1-β1) R ;  v = β2 v + (1-β2) R²
N = m / (sqrt(v) + ε)
Δ = scale · (N P)   (right)                   or   scale · (P N)             # back-projection
W = W - lr · sqrt(1-β2^(t+1)) / (1-β1^(t+1)) · Δ ;  W = W - lr · λ · W
```

Groups without ``rank`` get the same AdamW step without projection. This matches the published
``galore_torch.GaLoreAdamW`` (``proj_type="std"``) step for step, including its bias-correction form
(folded into the step size, ε added to the uncorrected ``sqrt(v)``) and weight decay applied after the
update. The projection matrix lives in ``state["projection"]`` so ``state_dict`` round-trips.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch
from torch import nn

from ..ops.adamw import check_betas, check_finite

# GaLore paper defaults (rank per model size; gap 200; scale 0.25). tiny/20m/7b extrapolate the table.
GALORE_DEFAULT_RANK = {"tiny": 16, "20m": 64, "60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}
GALORE_DEFAULT_UPDATE_PROJ_GAP = 200
GALORE_DEFAULT_SCALE = 0.25
_UNSUPPORTED_FLAGS = ("amsgrad", "maximize", "capturable", "differentiable")


def _check_positive_int(value: int, name: str) -> int:
    """``value`` as an ``int`` (numpy integers too), ``TypeError``/``ValueError`` naming ``name`` unless a positive
    integer."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return int(value)


def _check_scale(scale: float) -> None:
    """The back-projection factor of ``Δ = scale · N P``: a finite number > 0 (else the projected update vanishes
    or ascends)."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):  # numpy floats too
        raise TypeError(f"scale must be a number, got {type(scale).__name__}")
    if not 0.0 < scale < math.inf:
        raise ValueError(f"scale must be a finite number > 0, got {scale}")


def _check_adamw_options(group: dict) -> None:
    """``ValueError``/``TypeError`` naming the first AdamW option of a group (defaults filled in) out of range, with
    the messages of the fused AdamW step (:func:`~smet_kernels.ops.adamw.check_hyperparameters`): ``betas`` in
    ``[0, 1)``, finite ``lr >= 0``, ``eps > 0``, ``weight_decay >= 0``. ``eps = 0`` would step a gradient element that
    stayed 0 (an unused embedding row) by ``0 / 0 = NaN``. ``lr`` may be a one-element tensor, as in
    ``torch.optim.AdamW``. ``torch.optim.AdamW`` flags this step does not implement are refused when true, not
    ignored."""
    for flag in _UNSUPPORTED_FLAGS:
        if group.get(flag):
            raise ValueError(f"{flag}=True is not supported by GaLoreAdamW")
    lr = group["lr"]
    check_finite(lr.item() if isinstance(lr, torch.Tensor) and lr.numel() == 1 else lr, "lr")
    check_betas(group["betas"])
    check_finite(group["eps"], "eps", positive=True)
    check_finite(group["weight_decay"], "weight_decay")


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW whose param groups with a ``rank`` key are updated in a GaLore low-rank gradient subspace.

    Group keys: ``lr``, ``betas``, ``eps``, ``weight_decay`` and, for projected groups, ``rank``,
    ``update_proj_gap``, ``scale`` (their defaults apply to the groups that set ``rank``).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        update_proj_gap: int = GALORE_DEFAULT_UPDATE_PROJ_GAP,
        scale: float = GALORE_DEFAULT_SCALE,
    ):
        update_proj_gap = _check_positive_int(update_proj_gap, "update_proj_gap")
        _check_scale(scale)
        # in the defaults (torch fills them into every group; only groups with a rank use them): a deep-copied or
        # unpickled optimizer keeps them, as torch pickles only defaults, state and groups
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, update_proj_gap=update_proj_gap,
                        scale=scale)
        _check_adamw_options(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group (defaults filled in); a group with an invalid option, or with ``rank`` and a parameter that is
        not 2-D (also given by name, as ``named_parameters()`` pairs), raises and is not added."""
        if "rank" in param_group:
            param_group["rank"] = _check_positive_int(param_group["rank"], "rank")
            for key in ("update_proj_gap", "scale"):
                param_group.setdefault(key, self.defaults[key])
            param_group["update_proj_gap"] = _check_positive_int(param_group["update_proj_gap"], "update_proj_gap")
            _check_scale(param_group["scale"])
        super().add_param_group(param_group)
        try:
            group = self.param_groups[-1]
            _check_adamw_options(group)
            for p in group["params"] if "rank" in group else ():
                if p.dim() != 2:
                    raise ValueError(f"params of a group with 'rank' must be 2-D, got shape {tuple(p.shape)}")
        except ValueError:
            self.param_groups.pop()
            raise

    @staticmethod
    def _projection(grad: torch.Tensor, rank: int) -> torch.Tensor:
        """Top-``rank`` singular vectors of ``grad``: ``Vᵀ[:r]`` when tall (m >= n), else ``U[:, :r]``."""
        matrix = grad if grad.dtype in (torch.float32, torch.float64) else grad.float()  # SVD needs fp32+
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        basis = vh[:rank] if grad.shape[0] >= grad.shape[1] else u[:, :rank]
        return basis.to(grad.dtype, copy=True)  # a copy: a view would keep the whole SVD factor alive

    def _check_grads(self) -> None:
        """``TypeError`` naming the first parameter with a sparse gradient (``nn.Embedding(sparse=True)``) or of a
        complex dtype (``sqrt(v)`` of a complex ``v`` is no Adam step), before any parameter is updated."""
        for group_index, group in enumerate(self.param_groups):
            for index, p in enumerate(group["params"]):
                name = f"parameter {index} of param group {group_index}"
                if p.grad is not None and p.grad.layout != torch.strided:
                    raise TypeError(f"{name}: sparse gradients ({p.grad.layout}) are not supported by GaLoreAdamW")
                if p.grad is not None and p.is_complex():
                    raise TypeError(f"{name}: complex parameters ({p.dtype}) are not supported by GaLoreAdamW")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_grads()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            projected = "rank" in group
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                step = state.get("step", 0)
                tall = projected and p.shape[0] >= p.shape[1]
                if projected:
                    if "projection" not in state or step % group["update_proj_gap"] == 0:
                        state["projection"] = self._projection(grad, group["rank"])
                    basis = state["projection"]
                    grad = grad @ basis.t() if tall else basis.t() @ grad
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                step += 1
                state["step"] = step
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                step_size = group["lr"] * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
                update = exp_avg / exp_avg_sq.sqrt().add_(group["eps"])
                if projected:
                    basis = state["projection"]
                    update = (update @ basis if tall else basis @ update) * group["scale"]
                p.add_(update, alpha=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss


def galore_param_groups(
    model: nn.Module,
    rank: int,
    update_proj_gap: int = GALORE_DEFAULT_UPDATE_PROJ_GAP,
    scale: float = GALORE_DEFAULT_SCALE,
    target_names: Iterable[str] | str = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
) -> list[dict]:
    """Two param groups: the weights of ``nn.Linear`` layers whose name ends with one of ``target_names``
    (projected, with ``rank``/``update_proj_gap``/``scale``) and every other parameter (plain AdamW). A single
    name may be given as a str."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    rank = _check_positive_int(rank, "rank")
    targets = (target_names,) if isinstance(target_names, str) else tuple(target_names)  # not its characters
    projected = []
    projected_ids = set()
    for name, module in model.named_modules():
        # a weight shared by two target layers listed once: twice, it would be stepped twice a step
        if isinstance(module, nn.Linear) and name.split(".")[-1] in targets and id(module.weight) not in projected_ids:
            projected.append(module.weight)
            projected_ids.add(id(module.weight))
    if not projected:  # else GaLoreAdamW would train the model as plain AdamW without a word
        raise ValueError(f"model has no nn.Linear layer named by target_names {list(targets)}: nothing to project "
                         "(GaLore projects nn.Linear weights; e.g. GPT-2's Conv1D layers are not)")
    plain = [p for p in model.parameters() if id(p) not in projected_ids and p.requires_grad]
    return [{"params": plain},
            {"params": projected, "rank": rank, "update_proj_gap": update_proj_gap, "scale": scale}]
