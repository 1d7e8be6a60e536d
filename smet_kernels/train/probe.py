"""Around each topology update: separate the two causes of a loss rise, and size the first updates of regrown weights.

For an update after optimizer step ``s`` and a window of ``k`` steps, on one fixed held-out batch (the same every
time, no dropout, no optimizer step in between)::

    prune_damage = L(after prune + regrow) − L(before)              # what the topology change itself costs
    probe_losses = [L after steps s+1 .. s+k]                       # what the optimizer does next
    cold_start_rise = max(probe_losses) − L(after prune + regrow)   # > 0: the next steps make the loss worse

and, per step ``s+j`` (j = 1..k), over all sparse layers, the weights split into the blocks grown at ``s``
(``regrown``) and those active before and after it (``surviving``)::

    update_rms[group]    = ||Δw_group|| / sqrt(n_group)             # size of the step, per weight
    relative_update[group] = ||Δw_group|| / ||w_group||             # w before the step (None when it is 0:
                                                                    # zero-initialised regrown blocks at j = 1)
    regrown_vs_surviving = update_rms[regrown] / update_rms[surviving]

The naive (cold-start) first step of a regrown weight is ≈ (1−β1)·sqrt((1−β2^t)/(1−β2)) × lr; SMET's (linear warm-up)
is lr·d^−α / W.
Records: ``type="update_probe"`` (one per update, written after its window) with the numbers above and
``step_sizes`` (one entry per step j). Steps without a topology update can be probed too (dense control runs:
``prune_damage`` is 0 there and no step sizes are measured). Single-process or DDP (plain tensors); the state of
an open window travels in checkpoints, so a resumed run writes the same records.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def _sparse_params(model: nn.Module) -> list[tuple[str, torch.Tensor, object, bool]]:
    """``(name, parameter, layout, compact)`` of every sparse parameter (compact values or masked dense)."""
    found = []
    for name, param in model.named_parameters():
        for attribute, compact in (("smet_layout", True), ("smet_mask_layout", False)):
            layout = getattr(param, attribute, None)
            if layout is not None:
                found.append((name, param, layout, compact))
    return found


def _regrown_elements(param: torch.Tensor, layout, compact: bool, old: torch.Tensor) -> torch.Tensor:
    """Boolean mask (shape of ``param``) of the elements in blocks grown since ``old`` (block indices or mask)."""
    if compact:  # a slot whose (row, col) changed holds a regrown block
        changed = (layout.block_indices.to(old.device) != old).any(dim=1)
        return changed.to(param.device)[:, None, None].expand_as(param)
    grown = layout.mask.to(old.device) & ~old
    b = layout.block_size
    return grown.repeat_interleave(b, 0).repeat_interleave(b, 1).to(param.device)


def _active_elements(param: torch.Tensor, layout, compact: bool) -> torch.Tensor:
    if compact:
        return torch.ones_like(param, dtype=torch.bool)
    b = layout.block_size
    return layout.mask.repeat_interleave(b, 0).repeat_interleave(b, 1).to(param.device)


class UpdateProbe:
    """Measures prune damage, cold-start rise and first-step sizes around topology updates (see module docs).

    ``probe_loss()`` returns the loss of the fixed held-out batch (no gradients, no state change). Call
    :meth:`before_update` after the optimizer step of an update step and before the controller's step,
    :meth:`after_update` right after the controller's step, and :meth:`after_step` after every optimizer step.
    """

    def __init__(self, model: nn.Module, probe_loss: Callable[[], float], window: int):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        self.model, self.probe_loss, self.window = model, probe_loss, window
        self._open: dict | None = None  # the update being followed
        self._before: tuple[float, list] | None = None

    @torch.no_grad()
    def before_update(self) -> None:
        """Loss and topology right before the topology update."""
        old = [(layout.block_indices if compact else layout.mask).clone()
               for _, _, layout, compact in _sparse_params(self.model)]
        self._before = (self.probe_loss(), old)

    @torch.no_grad()
    def after_update(self, step: int) -> list[dict]:
        """Loss right after the update (before the next optimizer step); starts following it. Returns the record of
        a previous update whose window was cut short by this one."""
        if self._before is None:
            raise RuntimeError("after_update() without before_update()")
        finished = self._close(complete=True) if self._open is not None else []  # cut short by this update
        loss_before, old = self._before
        self._before = None
        groups = []
        for (_, param, layout, compact), previous in zip(_sparse_params(self.model), old):
            regrown = _regrown_elements(param, layout, compact, previous)
            surviving = _active_elements(param, layout, compact) & ~regrown
            groups.append((param, regrown, surviving))
        loss_after = self.probe_loss()
        self._open = {
            "update_step": step, "loss_before": loss_before, "loss_after": loss_after,
            "prune_damage": loss_after - loss_before, "probe_losses": [], "step_sizes": [],
            "groups": [(regrown, surviving) for _, regrown, surviving in groups],
            "weights": [param.detach().clone() for param, _, _ in groups],
        }
        return finished

    @torch.no_grad()
    def after_step(self) -> list[dict]:
        """After an optimizer step (and controller step): measure the followed update; returns finished records."""
        record = self._open
        if record is None or self._before is not None:
            return []
        sums = {"regrown": [0.0, 0.0, 0], "surviving": [0.0, 0.0, 0]}  # ||Δw||², ||w||², count
        params = [param for _, param, _, _ in _sparse_params(self.model)]
        for param, (regrown, surviving), previous in zip(params, record["groups"], record["weights"]):
            delta = param.detach().float() - previous.float()
            for name, mask in (("regrown", regrown), ("surviving", surviving)):
                sums[name][0] += float(delta[mask].square().sum())
                sums[name][1] += float(previous.float()[mask].square().sum())
                sums[name][2] += int(mask.sum())
            previous.copy_(param.detach())
        size = {"step": len(record["step_sizes"]) + 1}
        for name, (delta_sq, weight_sq, count) in sums.items():
            size[f"{name}_update_rms"] = (delta_sq / count) ** 0.5 if count else None
            size[f"{name}_relative_update"] = (delta_sq / weight_sq) ** 0.5 if weight_sq > 0 else None
        regrown, surviving = size["regrown_update_rms"], size["surviving_update_rms"]
        size["regrown_vs_surviving"] = regrown / surviving if regrown is not None and surviving else None
        if sums["regrown"][2] or sums["surviving"][2]:
            record["step_sizes"].append(size)
        record["probe_losses"].append(self.probe_loss())
        return self._close(complete=True) if len(record["probe_losses"]) >= self.window else []

    def finish(self) -> list[dict]:
        """The record of a window cut short by the end of the run (``complete`` False: a longer run measures it
        again)."""
        return self._close(complete=False) if self._open is not None else []

    def _close(self, complete: bool) -> list[dict]:
        record, self._open = self._open, None
        del record["groups"], record["weights"]
        losses = record["probe_losses"]
        record["cold_start_rise"] = max(losses) - record["loss_after"] if losses else None
        record["window"] = self.window
        record["complete"] = complete
        return [{"type": "update_probe", **record}]

    def state_dict(self) -> dict:
        """The open window (masks and weight snapshots included), for checkpoints."""
        if self._open is None:
            return {"open": None}
        return {"open": {**self._open, "groups": [tuple(t.cpu() for t in g) for g in self._open["groups"]],
                         "weights": [w.cpu() for w in self._open["weights"]]}}

    def load_state_dict(self, state: dict) -> None:
        record = state["open"]
        if record is not None:
            params = [param for _, param, _, _ in _sparse_params(self.model)]
            record = {**record, "groups": [tuple(t.to(p.device) for t in g) for p, g in zip(params, record["groups"])],
                      "weights": [w.to(device=p.device, dtype=p.dtype) for p, w in zip(params, record["weights"])]}
        self._open = record
