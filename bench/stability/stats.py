"""Statistics of a study: spike events against the dense noise floor, spike / quality / probe tables, and the
paired t-interval used by every verdict."""

from __future__ import annotations

import math

import numpy as np

from .load import StudyData
from .spec import DENSE_METHOD, METHOD_ORDER, METHODS


def control_rises(losses: dict[int, float], update_steps, window: int) -> dict[int, float]:
    """``rise`` at each of ``update_steps`` of a loss curve without updates (same formula as the trainer)."""
    from smet_kernels.train.spikes import SpikeTracker

    tracker = SpikeTracker(window)
    for step in sorted(update_steps):
        tracker.add_update(step)
    for step in sorted(losses):
        tracker.add_loss(step, losses[step])
    tracker.finish()
    return {record["update_step"]: record["rise"] for record in tracker.records}


def spike_events(data: StudyData):
    """One row per measured topology update that moved blocks (and one per dense/GaLore run at the same steps:
    ``method`` adamw/galore, the noise floor), with ``rise``, ``relative_rise`` and paired ``excess`` over the
    dense run of the same config and seed."""
    import pandas as pd

    runs = data.runs.set_index("key")
    moved = data.updates[data.updates["moved"] > 0]
    events = data.spikes.merge(moved.rename(columns={"step": "update_step"}), on=["key", "update_step"])
    events = events.join(runs[["config", "method", "density", "alpha", "seed", "window"]], on="key")
    control_rows = []
    for key, run in runs[~runs["method"].map(lambda m: METHODS[m].sparse)].iterrows():
        same = events[(events["config"] == run["config"]) & (events["seed"] == run["seed"])]
        steps = sorted(set(same["update_step"]))
        curve = data.losses[data.losses["key"] == key]
        curve = dict(zip(curve["step"].astype(int), curve["loss"]))
        for step, rise in control_rises(curve, steps, int(run["window"])).items():
            before = np.mean([curve[s] for s in range(step - int(run["window"]) + 1, step + 1) if s in curve])
            control_rows.append({"key": key, "update_step": step, "rise": rise, "relative_rise": rise / before,
                                 "moved": 0, **{c: run[c] for c in ("config", "method", "density", "alpha", "seed")}})
    controls = pd.DataFrame(control_rows, columns=["key", "update_step", "rise", "relative_rise", "moved", "config",
                                                   "method", "density", "alpha", "seed"])
    dense = controls[controls["method"] == DENSE_METHOD][["config", "seed", "update_step", "rise"]]
    dense = dense.rename(columns={"rise": "dense_rise"})
    events = pd.concat([events, controls], ignore_index=True) if len(controls) else events
    events = events.merge(dense, on=["config", "seed", "update_step"], how="left")
    events["excess"] = events["rise"] - events["dense_rise"]
    return events


def noise_thresholds(events) -> dict[str, float]:
    """Per config: ``mean + 2·sd`` of the dense rises at the update steps (NaN with fewer than two: no noise floor,
    so no rise is called a spike)."""
    thresholds = {}
    for config, group in events.groupby("config"):
        dense = group.loc[group["method"] == DENSE_METHOD, "rise"].to_numpy(dtype=float)
        thresholds[config] = float(dense.mean() + 2 * dense.std(ddof=1)) if len(dense) >= 2 else math.nan
    return thresholds


GROUP = ["config", "method", "density", "alpha"]


def _in_study_order(frame, extra=()):
    """``frame`` sorted by config size, method (study order), density, α (and ``extra`` columns)."""
    from ..plotting import CONFIG_ORDER

    order = {"_config": frame["config"].map(lambda c: CONFIG_ORDER.index(c) if c in CONFIG_ORDER else 99),
             "_method": frame["method"].map(METHOD_ORDER.index)}
    frame = frame.assign(**order).sort_values(["_config", "_method", "density", "alpha", *extra], na_position="first")
    return frame.drop(columns=list(order)).reset_index(drop=True)


def spike_table(data: StudyData, events=None):
    """Per (config, method, density, α): runs, updates (moving blocks / all), spikes above the noise threshold,
    mean and max rise, mean relative rise, mean paired excess over dense and its standard error, both over the seed
    means (the updates of a run are not independent samples; as in the findings)."""
    import pandas as pd

    events = spike_events(data) if events is None else events
    thresholds = noise_thresholds(events)
    rows = []
    for (config, method, density, alpha), group in data.runs.groupby(GROUP, dropna=False, sort=False):
        mine = events[events["key"].isin(group["key"])]
        seed_excess = mine.groupby("seed")["excess"].mean().dropna().to_numpy(dtype=float)  # seeds: the samples
        if METHODS[method].sparse:
            updates = f"{len(mine)}/{int(data.updates['key'].isin(group['key']).sum())}"
        else:
            updates = f"{len(mine)} (control)"
        rows.append({
            "config": config, "method": method, "density": density, "alpha": alpha, "runs": len(group),
            "updates": updates,
            "spikes": None if math.isnan(thresholds.get(config, math.nan))
            else int((mine["rise"] > thresholds[config]).sum()),
            "mean_rise": mine["rise"].mean(), "max_rise": mine["rise"].max(),
            "mean_rel_rise": mine["relative_rise"].mean(),
            "mean_excess": seed_excess.mean() if len(seed_excess) else math.nan,
            "excess_se": seed_excess.std(ddof=1) / math.sqrt(len(seed_excess)) if len(seed_excess) >= 2 else math.nan,
        })
    return _in_study_order(pd.DataFrame(rows)), thresholds


def missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _same(series, value):
    return series.isna() if value is None or (isinstance(value, float) and math.isnan(value)) else series == value


def quality_table(data: StudyData):
    """Per (config, method, density, α): seeds, tokens, final validation loss (mean, sd over seeds), paired
    difference to dense (same config and seed), perplexity and its ratio to dense."""
    import pandas as pd

    runs = data.runs
    dense = runs[runs["method"] == DENSE_METHOD].set_index(["config", "seed"])
    rows = []
    for group_key, group in runs.groupby(GROUP, dropna=False, sort=False):
        config, method, density, alpha = group_key
        paired = [(row["final_val_loss"], dense.loc[(config, row["seed"]), "final_val_loss"])
                  for _, row in group.iterrows() if (config, row["seed"]) in dense.index]
        diffs = np.array([a - b for a, b in paired], dtype=float)
        ppl = group["final_val_ppl"].mean(skipna=False)  # a seed without a final loss: no mean, no best α
        paired_ppl = np.exp(np.array(paired, dtype=float).reshape(-1, 2))  # the ratio: same seeds as vs_dense
        rows.append({
            "config": config, "method": method, "density": density, "alpha": alpha, "seeds": len(group),
            "tokens": int(group["tokens"].iloc[0]) if group["tokens"].nunique() == 1 else "mixed",
            "val_loss": group["final_val_loss"].mean(skipna=False),
            "val_loss_sd": group["final_val_loss"].std(ddof=1, skipna=False) if len(group) >= 2 else math.nan,
            "vs_dense": diffs.mean() if len(diffs) else math.nan,
            "vs_dense_se": diffs.std(ddof=1) / math.sqrt(len(diffs)) if len(diffs) >= 2 else math.nan,
            "ppl": ppl, "ppl_vs_dense": paired_ppl[:, 0].mean() / paired_ppl[:, 1].mean() if paired else math.nan,
        })
    return _in_study_order(pd.DataFrame(rows))


# two-sided 95% quantiles of Student's t by degrees of freedom (a df between entries uses the lower entry)
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}


def t_quantile_975(df: int) -> float:
    """Two-sided 95% critical value of Student's t with ``df`` degrees of freedom (conservative between entries)."""
    return _T975[max(k for k in _T975 if k <= df)] if df < 1000 else 1.960


def compare(a, b) -> tuple[float, float, str]:
    """Paired comparison of equal-length samples ``a``, ``b``: ``(mean(a−b), half-width of its 95% t-interval,
    verdict)``; verdict ``"a > b"`` / ``"a < b"`` when the interval excludes 0, else ``"within noise"``;
    ``"one sample"`` when n < 2 (no noise estimate); ``"not finite"`` when a difference is NaN or infinite (a run
    without a final loss: ``NaN > 0`` is False, so the verdict would read ``"a < b"``)."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(diff) == 0:
        return math.nan, math.nan, "no data"
    mean = float(diff.mean())
    if not np.isfinite(diff).all():
        return mean, math.nan, "not finite"
    if len(diff) < 2:
        return mean, math.nan, "one sample"
    half_width = t_quantile_975(len(diff) - 1) * float(diff.std(ddof=1)) / math.sqrt(len(diff))
    if abs(mean) <= half_width:
        return mean, half_width, "within noise"
    return mean, half_width, "a > b" if mean > 0 else "a < b"


def probe_events(data: StudyData):
    """The update-probe rows joined to their run's identity (config, method, density, α, seed): for a sparse run
    those of the updates that moved blocks (as :func:`spike_events`: at the others nothing was pruned or regrown,
    so there is no cold start to measure), for a dense/GaLore run all (the control)."""
    events = data.probes.merge(data.runs[["key", *GROUP, "seed"]], on="key")
    steps = data.updates.loc[data.updates["moved"] > 0, ["key", "step"]].rename(columns={"step": "update_step"})
    moved = events.merge(steps, on=["key", "update_step"], how="left", indicator=True)["_merge"].eq("both")
    sparse = events["method"].map(lambda m: METHODS[m].sparse).astype(bool)
    return events.loc[moved.to_numpy() | ~sparse.to_numpy()]


def probe_table(data: StudyData):
    """Per (config, method, density, α): updates probed, those with steps after them (``with_steps_after``: the
    last update, at the final step, has none) and those with a first step of regrown weights (``first_steps``); the
    mean prune damage over the updates probed and, over those with steps after them, the mean cold-start rise,
    first-step update RMS of regrown and surviving weights, their ratio (step 1 and mean over the window) and the
    surviving weights' relative first step ||Δw||/||w|| (the update probe, :mod:`smet_kernels.train.probe`)."""
    import pandas as pd

    probes = probe_events(data)
    rows = []
    for (config, method, density, alpha), group in probes.groupby(GROUP, dropna=False, sort=False):
        numbers = group.drop(columns=["key", "update_step", *GROUP, "seed"]).astype(float)
        rows.append({"config": config, "method": method, "density": density, "alpha": alpha,
                     "seeds": group["seed"].nunique(), "updates": len(group),
                     "with_steps_after": int(numbers["cold_start_rise"].notna().sum()),
                     "first_steps": int(numbers["regrown_vs_surviving_1"].notna().sum()), **numbers.mean().to_dict()})
    columns = ["config", "method", "density", "alpha", "seeds", "updates", "with_steps_after", "first_steps",
               *[c for c in data.probes.columns if c not in ("key", "update_step")]]
    return _in_study_order(pd.DataFrame(rows, columns=columns))
