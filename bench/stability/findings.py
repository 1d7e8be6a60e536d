"""Plain-language findings computed from a study's numbers (markdown lines).

A difference counts only when the 95% t-interval of the paired differences (same seed; per seed the mean over its
updates: seeds, not updates, are the independent samples) excludes 0; otherwise it is reported as within noise,
and a single seed as giving no noise estimate. A pilot (a test of the tooling) gives no verdict: each difference
is reported by the side of 0 its interval lies on.
"""

from __future__ import annotations

import numpy as np

from .load import StudyData
from .spec import ABLATION_ARMS, DENSE_METHOD, METHOD_ORDER, METHODS
from .stats import _in_study_order, _same, compare, missing

NAIVE = "naive-dst"
# the run an arm equals at α = 0 (used where the arm itself is not run at α = 0)
SAME_AT_ALPHA_ZERO = {"density-lr-only": NAIVE, "smet-linear": "warmup-only"}
COLUMN_NAMES = {"rise": "rise", "cold_start_rise": "cold start rise",
                "regrown_vs_surviving_1": "first-step ratio regrown/surviving"}
NOT_MOVED = ("no update moved a block (layers with a single active block keep it: a smaller block size fixes it) "
             "— nothing to measure")
NO_UPDATE = ("no topology update in these runs (--steps below --update-interval, or --update-end-step before the "
             "first update) — nothing to measure")


def signed(value) -> str:
    return "n/a" if missing(value) else f"{value:+.4f}"


def plus_minus(half_width) -> str:
    return "" if missing(half_width) else f" ± {half_width:.4f} (95% CI)"


def label(config, density, alpha) -> str:
    return f"{config}, d={density:g}, α={alpha:g}"


def over(updates, seeds) -> str:
    return f"over {updates} updates in {seeds} seed{'s' if seeds != 1 else ''} (seed means compared)"


def verdict_words(verdict, more, less) -> str:
    return {"a > b": more, "a < b": less, "within noise": "within noise",
            "one sample": "one sample only: no noise estimate", "no data": "nothing to compare",
            "not finite": "a run without a finite value: no verdict"}[verdict]


def select(frame, config, method, density, alpha):
    return frame[(frame["config"] == config) & (frame["method"] == method) & _same(frame["density"], density)
                 & _same(frame["alpha"], alpha)]


def seed_means(frame, a, b):
    """Per seed, the mean over its updates of columns ``a`` and ``b``; and the number of updates. An update without a
    value in either column (a probe at the last step: no step after it) is left out of both, so both means cover the
    same updates."""
    frame = frame.dropna(subset=[a, b])
    means = frame.groupby("seed")[[a, b]].mean()
    return means[a].to_numpy(), means[b].to_numpy(), len(frame)


def naive_alpha(runs, config, density, alpha):
    """The α of the naive-DST runs to pair with an arm at ``alpha``: the same α when naive DST ran it, else the one α
    naive DST ran at this config and density (α = 0, the paper's naive DST)."""
    naive = runs[(runs["config"] == config) & (runs["method"] == NAIVE) & _same(runs["density"], density)]
    alphas = set(naive["alpha"])
    return alpha if alpha in alphas else (min(alphas) if alphas else alpha)


def paired(events, method_a, alpha_a, method_b, alpha_b, config, density, column="rise"):
    """Seed means of ``column`` of two methods at the same config and density, paired by seed and update step."""
    merged = select(events, config, method_a, density, alpha_a).merge(
        select(events, config, method_b, density, alpha_b), on=["seed", "update_step"], suffixes=("_a", "_b"))
    return seed_means(merged, f"{column}_a", f"{column}_b")


class _Findings:
    def __init__(self, data: StudyData, events, quality, probes=None, pilot=False):
        self.data, self.events, self.quality, self.pilot = data, events, quality, pilot
        self.runs = data.runs
        self.methods = set(self.runs["method"])
        self.probes = probes
        self.lines: list[str] = []
        self.claims: list[tuple[str, int, int, int]] = []  # (claim, holds, reversed, measurable settings)
        # a pilot gives no verdict: per setting, only the side of 0 its interval lies on
        self.sides = ("above 0", "below 0") if pilot else ("holds", "reversed")

    def words(self, verdict, more, less) -> str:
        """:func:`verdict_words`; in a pilot the side of 0 of the interval instead of ``more`` / ``less``."""
        return verdict_words(verdict, *(("interval above 0", "interval below 0") if self.pilot else (more, less)))

    def final_losses(self, config, method, density, alpha):
        losses = select(self.runs, config, method, density, alpha).set_index("seed")["final_val_loss"]
        if not len(losses) and alpha == 0 and method in SAME_AT_ALPHA_ZERO:
            return self.final_losses(config, SAME_AT_ALPHA_ZERO[method], density, alpha)
        return losses

    def best(self, group):
        """The row of ``group`` (quality rows of one config and density, one per method and α) with the lowest mean
        final loss over the seeds all of them finished (over all seeds a setting that missed a hard one would look
        better; a seed without a final loss: no mean, not the best)."""
        losses = [self.final_losses(row.config, row.method, row.density, row.alpha) for row in group.itertuples()]
        seeds = sorted(set.intersection(*(set(loss.index) for loss in losses)))
        means = [loss.loc[seeds].mean(skipna=False) if seeds else np.nan for loss in losses]
        return group.iloc[int(np.argmin(np.where(np.isnan(means), np.inf, means)))]

    @staticmethod
    def paired_losses(a, b):
        seeds = sorted(set(a.index) & set(b.index))
        return a.loc[seeds].to_numpy(), b.loc[seeds].to_numpy()

    def settings(self, method):
        """(config, density, α) of ``method``'s runs, by config, density (high to low), α."""
        rows = self.runs[self.runs["method"] == method]
        return sorted({(r.config, r.density, r.alpha) for r in rows.itertuples()},
                      key=lambda s: (s[0], -s[1], s[2]))

    def unpaired(self, frame, config, density, *sides) -> str:
        """Why the ``(method, α)`` sides have no pair in ``frame`` at ``config`` and ``density``: a side without a
        finished run there, no topology update at all, no update that moved a block, or no seed measured on both
        sides."""
        sides = [(method, density if METHODS[method].sparse else None, alpha) for method, alpha in sides]
        for method, where, alpha in sides:
            if not len(select(self.runs, config, method, where, alpha)):
                at = "" if missing(alpha) else f" at α={alpha:g}"
                return f"no finished {method} run{at} here — nothing to compare"
        if any(not len(select(frame, config, *side)) for side in sides):
            keys = set().union(*(select(self.runs, config, *side)["key"] for side in sides))
            return NOT_MOVED if self.data.updates["key"].isin(keys).any() else NO_UPDATE
        return "no seed measured on both sides — nothing to compare"

    def naive_spikes(self):
        """1. naive DST against the dense noise floor at the same steps."""
        if NAIVE not in self.methods:
            return
        self.lines.append("**Naive DST (cold start) spikes after topology updates** — rise minus the dense run's "
                          "rise at the same steps and batches:")
        holds = reverse = measurable = 0
        for config, density, alpha in self.settings(NAIVE):
            naive = select(self.events, config, NAIVE, density, alpha).dropna(subset=["dense_rise"])
            if not len(naive):
                why = self.unpaired(self.events, config, density, (NAIVE, alpha), (DENSE_METHOD, None))
                self.lines.append(f"  - {label(config, density, alpha)}: {why}")
                continue
            rise, dense_rise, updates = seed_means(naive, "rise", "dense_rise")
            mean, ci, verdict = compare(rise, dense_rise)
            measurable += verdict in ("a > b", "a < b", "within noise")  # one seed: no verdict
            holds += verdict == "a > b"
            reverse += verdict == "a < b"
            self.lines.append(f"  - {label(config, density, alpha)}: {signed(mean)}{plus_minus(ci)} "
                              f"{over(updates, len(rise))} — "
                              f"{self.words(verdict, 'spikes above dense: holds', 'rises less than dense')}")
        self.claims.append(("naive DST's loss rises more than dense after topology updates", holds, reverse,
                            measurable))

    def arms_reduce_the_spike(self, frame, column, title, unit):
        """2. each ablation arm against naive DST, paired by seed and update (``column`` of ``frame``)."""
        if NAIVE not in self.methods:
            return
        for method in [m for m in ABLATION_ARMS if m in self.methods]:
            tally, details = {"holds": 0, "reversed": 0, "noise": 0, "single": 0, "none": 0}, []
            settings = self.settings(method)
            for config, density, alpha in settings:
                partner = naive_alpha(self.runs, config, density, alpha)
                naive, arm, updates = paired(frame, NAIVE, partner, method, alpha, config, density, column)
                name = label(config, density, alpha) + ("" if partner == alpha else f" (naive α={partner:g})")
                if not len(naive):
                    tally["none"] += 1
                    why = self.unpaired(frame, config, density, (NAIVE, partner), (method, alpha))
                    details.append(f"{name}: {why}")
                    continue
                mean, ci, verdict = compare(naive, arm)
                tally[{"a > b": "holds", "a < b": "reversed", "within noise": "noise",
                       "not finite": "none"}.get(verdict, "single")] += 1
                details.append(f"{name}: {signed(mean)}{plus_minus(ci)} {over(updates, len(naive))} — "
                               f"{self.words(verdict, 'holds', f'{method} {unit} MORE: does not hold')}")
            what = COLUMN_NAMES.get(column, column)
            self.lines.append(f"**{method} {title}** — naive-DST {what} minus {method} {what}: {self.sides[0]} in "
                              f"{tally['holds']}, {self.sides[1]} in {tally['reversed']}, within noise in "
                              f"{tally['noise']}, "
                              + (f"one seed only in {tally['single']}, " if tally["single"] else "")
                              + f"not measurable in {tally['none']} of {len(settings)} settings:")
            self.lines += [f"  - {d}" for d in details]
            self.claims.append((f"{method} {title} of naive DST ({what})", tally["holds"],
                                tally["reversed"], tally["holds"] + tally["reversed"] + tally["noise"]))

    def claim_summary(self) -> list[str]:
        """One line per claim: reproduces (every measurable setting), partly, or does not reproduce at this scale; in a
        pilot no verdict, only the settings whose interval lies on either side of 0."""
        if not self.claims:
            return []
        if self.pilot:
            return ["**Claims: no verdict from a pilot** (a test of the tooling, see above; per claim, the settings "
                    "whose 95% interval over seeds lies above or below 0; details below):",
                    *(f"  - {claim}: interval on the claim's side of 0 in {holds}, on the other side in {reverse} of "
                      f"{measurable} measurable settings" for claim, holds, reverse, measurable in self.claims)]
        lines = ["**Claims at this scale** (95% intervals over seeds; details below):"]
        for claim, holds, reverse, measurable in self.claims:
            if not measurable:
                verdict = "not measurable here"
            elif holds == measurable:
                verdict = "reproduces"
            elif holds == 0:
                verdict = "does NOT reproduce at this scale" + (" (reversed in some)" if reverse else "")
            else:
                verdict = "reproduces in part"
            lines.append(f"  - {claim}: {verdict} — holds in {holds}, reversed in {reverse} of {measurable} "
                         "measurable settings")
        return lines

    def quality_vs_dense(self):
        """3. quality against dense at equal tokens (best α per method and density)."""
        self.lines.append("**Quality against dense at equal tokens** — final validation loss minus dense, paired by "
                          "seed (SMETAdamW methods at their best α, chosen on these same seeds: with several α the "
                          "interval is optimistic):")
        quality = self.quality
        for config in _in_study_order(self.runs)["config"].unique():
            dense = self.final_losses(config, DENSE_METHOD, None, None)
            candidates = quality[(quality["config"] == config) & (quality["method"] != DENSE_METHOD)]
            for (method, density), group in candidates.groupby(["method", "density"], dropna=False, sort=False):
                best = self.best(group)
                a, b = self.paired_losses(self.final_losses(config, method, density, best["alpha"]), dense)
                mean, ci, verdict = compare(a, b)
                name = method + ("" if missing(density) else f" d={density:g}") + \
                    ("" if missing(best["alpha"]) else f" (best α={best['alpha']:g} of {len(group)})")
                self.lines.append(f"  - {config} {name}: {signed(mean)}{plus_minus(ci)}, ppl × "
                                  f"{best['ppl_vs_dense']:.3f} — "
                                  f"{self.words(verdict, 'worse than dense', 'better than dense')}")

    def density_lr(self):
        """4. density-aware LR: largest α against α = 0 (or the arm that equals it at α = 0)."""
        alphas = sorted(self.runs["alpha"].dropna().unique())
        if len(alphas) < 2:
            return
        low, high = alphas[0], alphas[-1]
        rows = []
        for method in [m for m in METHOD_ORDER if METHODS[m].alphas in ("sweep", "sweep>0") and m in self.methods]:
            for config, density, alpha in self.settings(method):
                if alpha != high:
                    continue
                a, b = self.paired_losses(self.final_losses(config, method, density, high),
                                          self.final_losses(config, method, density, low))
                if not len(a):
                    continue
                mean, ci, verdict = compare(a, b)
                rows.append(f"  - {config} {method} d={density:g}: {signed(mean)}{plus_minus(ci)} — "
                            f"{self.words(verdict, f'α={high:g} is worse', f'α={high:g} is better')}")
        if rows:
            self.lines.append(f"**Density-aware LR** — final validation loss at α={high:g} minus α={low:g} (for "
                              "density-lr-only: naive-dst; for smet-linear without α=0 runs: warmup-only), paired by "
                              "seed:")
            self.lines += rows

    def consistency(self):
        """5. arms that apply the same arithmetic must agree: naive DST at α = 0 and masked DST (compact vs dense
        storage); smet-linear at α = 0 and warmup-only."""
        for a_method, b_method, b_alpha, what in ((NAIVE, "masked-dst", None, "compact vs dense-masked storage"),
                                                  ("smet-linear", "warmup-only", 0.0, "the same arm by two names")):
            if a_method not in self.methods or b_method not in self.methods:
                continue
            gaps = []
            for config, density, alpha in self.settings(a_method):
                if alpha != 0.0:
                    continue
                a, b = self.paired_losses(select(self.runs, config, a_method, density, 0.0).set_index("seed")[
                    "final_val_loss"], select(self.runs, config, b_method, density, b_alpha).set_index("seed")[
                    "final_val_loss"])
                gaps += list(np.abs(a - b))
            if gaps:
                largest = float(np.max(gaps))  # NaN (a run without a final loss) when any gap is: not an agreement
                self.lines.append(f"**Consistency check** — {a_method} at α=0 and {b_method} apply the same update "
                                  f"({what}): largest final-loss gap {largest:.2e} over {len(gaps)} pairs "
                                  f"({'agree' if largest < 1e-3 else 'they DISAGREE: investigate'}).")

    def first_steps(self):
        """7. the size of the first step of regrown weights against surviving ones (the quantity the method is
        about), per arm, at step 1 after each update."""
        probes = self.probes
        if probes is None or not len(probes) or probes["regrown_vs_surviving_1"].isna().all():
            return
        self.lines.append("**First step of regrown weights** — update RMS of the blocks grown at an update over that "
                          "of the surviving blocks, first step after the update (mean over updates; seeds × updates "
                          "in brackets); naive DST's cold start predicts ≈ (1−β1)·√((1−β2^t)/(1−β2)) × lr for a "
                          "regrown weight, warm-up lr/W:")
        table = probes.dropna(subset=["regrown_vs_surviving_1"])
        for (config, density), group in table.groupby(["config", "density"], sort=True):
            parts = []
            for row in _in_study_order(group).itertuples():
                name = row.method + ("" if missing(row.alpha) else f" α={row.alpha:g}")
                per_seed, uneven = divmod(row.first_steps, max(row.seeds, 1))  # seeds with unequal counts: the
                count = f"{row.first_steps} over {row.seeds} seeds" if uneven else f"{row.seeds}×{per_seed}"  # total
                parts.append(f"{name} {row.regrown_vs_surviving_1:.2f}× ({count})")
            self.lines.append(f"  - {config} d={density:g}: " + "; ".join(parts))

    def defaults(self):
        """6. library defaults (TrainConfig: warm-up linear, α = 1)."""
        from smet_kernels.train.trainer import TrainConfig

        default = TrainConfig()
        default_method, default_alpha = f"smet-{default.warmup_mode}", default.resolved_density_lr_exponent()
        smet = self.quality[self.quality["method"].isin(["smet-linear", "smet-momentum_ramp"])]
        if not len(smet):
            return
        self.lines.append(f"**Defaults** (library: warm-up `{default.warmup_mode}`, α={default_alpha:g}; per-block "
                          f"warm-up length as in this study) — best SMETAdamW setting per density by final validation "
                          f"loss (chosen on the same seeds it is compared on, so a 'default is worse' verdict is "
                          f"optimistic):")
        for (config, density), group in smet.groupby(["config", "density"]):
            best = self.best(group)
            mine = self.final_losses(config, default_method, density, default_alpha)
            a, b = self.paired_losses(mine, self.final_losses(config, best["method"], density, best["alpha"]))
            mean, ci, verdict = compare(a, b)
            if best["method"] == default_method and best["alpha"] == default_alpha:
                outcome = "the default is best"
            elif not len(a):
                outcome = "the default setting was not run"
            else:
                outcome = (f"default − best {signed(mean)}{plus_minus(ci)}: "
                           + self.words(verdict, "the default is worse", "the default is better"))
            self.lines.append(f"  - {config} d={density:g}: {best['method']} α={best['alpha']:g} "
                              f"(val loss {best['val_loss']:.4f}); {outcome}")
        if any(d.startswith("cpu") for d in self.runs["device"]):
            self.lines.append("  - CPU runs: no default is changed on the strength of these runs.")


def findings(data: StudyData, events, quality, probes=None, probe_events=None, pilot=False) -> list[str]:
    """Plain-language statements computed from the numbers (markdown lines; see the module docs).

    ``probes``: :func:`~bench.stability.stats.probe_table`; ``probe_events``: the probe rows joined to their runs
    (``prune_damage`` / ``cold_start_rise`` per update), both optional (studies without update probes); ``pilot``: a
    test of the tooling (the report's banner), which gives no verdict, only the side of 0 of each interval."""
    found = _Findings(data, events, quality, probes, pilot)
    found.naive_spikes()
    found.arms_reduce_the_spike(events, "rise", "reduces the spike", "spikes")
    if probe_events is not None and len(probe_events):
        found.lines.append("**Two causes of a post-update rise, measured apart** on one fixed held-out batch: prune "
                           "damage (loss right after the update − right before it, before any optimizer step) is the "
                           "same mechanism for every arm; the cold-start rise (max loss over the next k steps − loss "
                           "right after the update) is what the optimizer does next:")
        for name, column in (("prune damage", "prune_damage"), ("cold-start rise", "cold_start_rise")):
            rows = []
            for (config, method, density, alpha), group in probe_events.groupby(
                    ["config", "method", "density", "alpha"], dropna=False, sort=False):
                if not METHODS[method].sparse:
                    continue
                means = group.groupby("seed")[column].mean().to_numpy()
                mean, ci, _ = compare(means, np.zeros_like(means))
                rows.append((config, method, density, alpha, f"{signed(mean)}{plus_minus(ci)}"))
            for config, method, density, alpha, text in sorted(
                    rows, key=lambda r: (r[0], -r[2], METHOD_ORDER.index(r[1]), -1 if missing(r[3]) else r[3])):
                alpha_text = "" if missing(alpha) else f" α={alpha:g}"
                found.lines.append(f"  - {name}, {config} d={density:g} {method}{alpha_text}: {text}")
        found.arms_reduce_the_spike(probe_events, "cold_start_rise", "reduces the cold-start rise", "rises")
        found.arms_reduce_the_spike(probe_events.dropna(subset=["regrown_vs_surviving_1"]), "regrown_vs_surviving_1",
                                    "shrinks the first step of regrown weights", "steps larger")
    found.first_steps()
    found.quality_vs_dense()
    found.density_lr()
    found.consistency()
    found.defaults()
    paragraphs = []
    # a blank line before each statement, so that it does not join the previous list
    for line in found.claim_summary() + found.lines:
        paragraphs += ["", line] if line.startswith("**") and paragraphs else [line]
    return paragraphs
