"""Loss-spike diagnostics around topology updates.

For a topology update after optimizer step ``s`` and a window of ``k`` steps:

```
before = mean(loss[s-k+1 .. s])                 # the k training losses up to the update
rise   = max(loss[s+1 .. s+k]) - before         # largest rise over the k steps after it
relative_rise = rise / before
```

A window is measured once its ``k`` following losses are in (or, at the end of a run, with the ones
there are). :meth:`SpikeTracker.summary` reports count, mean and max of ``rise`` and ``relative_rise``.
"""

from __future__ import annotations


class SpikeTracker:
    """Collects training losses and update steps; yields one spike record per topology update."""

    def __init__(self, window: int = 10):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        self.window = window
        self.losses: dict[int, float] = {}
        self.pending: list[int] = []
        self.records: list[dict] = []

    def add_loss(self, step: int, loss: float) -> list[dict]:
        """Record the training loss of ``step``; returns the spike records completed by it."""
        self.losses[step] = float(loss)
        self._forget_old(step)
        return self._complete(lambda update: step >= update + self.window)

    def add_update(self, step: int) -> None:
        """Mark a topology update after optimizer step ``step``."""
        self.pending.append(step)

    def finish(self) -> list[dict]:
        """Measure the remaining updates with the losses available (end of run)."""
        return self._complete(lambda update: True)

    def _complete(self, ready) -> list[dict]:
        done = []
        for update in [u for u in self.pending if ready(u)]:
            self.pending.remove(update)
            record = self._measure(update)
            if record is not None:
                self.records.append(record)
                done.append(record)
        return done

    def _measure(self, update: int) -> dict | None:
        before = [self.losses[s] for s in range(update - self.window + 1, update + 1) if s in self.losses]
        after = [self.losses[s] for s in range(update + 1, update + self.window + 1) if s in self.losses]
        if not before or not after:
            return None
        mean_before = sum(before) / len(before)
        peak = max(after)
        rise = peak - mean_before
        return {
            "update_step": update,
            "window": self.window,
            "loss_before": mean_before,
            "max_loss_after": peak,
            "rise": rise,
            "relative_rise": rise / mean_before if mean_before else float("nan"),
            "complete": len(after) == self.window,  # False: measured by finish() with the losses there were
        }

    def _forget_old(self, step: int) -> None:
        """Keep only losses that a pending or future window can still use."""
        oldest = min(self.pending, default=step) - self.window
        for s in [s for s in self.losses if s <= min(oldest, step - self.window)]:
            del self.losses[s]

    def summary(self) -> dict:
        return spike_summary(self.records, self.window)

    def state_dict(self) -> dict:
        return {"window": self.window, "losses": dict(self.losses), "pending": list(self.pending),
                "records": [dict(r) for r in self.records]}

    def load_state_dict(self, state: dict) -> None:
        self.window = int(state["window"])
        self.losses = {int(k): float(v) for k, v in state["losses"].items()}
        self.pending = [int(s) for s in state["pending"]]
        self.records = [dict(r) for r in state["records"]]


def spike_summary(records: list[dict], window: int) -> dict:
    """``count``, ``mean`` / ``max`` of ``rise`` and of ``relative_rise`` over ``records`` (None when empty)."""
    rises = [r["rise"] for r in records]
    relative = [r["relative_rise"] for r in records]
    return {
        "window": window,
        "count": len(records),
        "mean_rise": sum(rises) / len(rises) if rises else None,
        "max_rise": max(rises) if rises else None,
        "mean_relative_rise": sum(relative) / len(relative) if relative else None,
        "max_relative_rise": max(relative) if relative else None,
    }
