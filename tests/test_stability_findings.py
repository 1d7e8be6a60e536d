"""Stability-study tooling (bench/stability/), the findings: the sentences that state each claim's verdict from the
runs (spikes above dense, the SMET arms and ablations against naive DST, final loss against dense, the best α and the
library default, the consistency check of naive and masked DST), counting seeds rather than updates, pairing each
arm with the right naive-DST and dense runs, and giving no verdict on missing, unmoved or non-finite values."""

import math

import pandas as pd
import pytest

from bench import stability
from bench.stability import RunSpec, load_study, quality_table, spike_events
from stability_runs import _synthetic_study, _write_run, cache_dir, study_findings  # noqa: F401 -- cache_dir: autouse


def test_quality_and_findings_with_seed_noise(tmp_path):
    _synthetic_study(tmp_path, seeds=(0, 1, 2))
    data = load_study(tmp_path)
    quality = quality_table(data).set_index("method")
    assert quality.loc["naive-dst", "vs_dense"] == pytest.approx(0.3)
    assert quality.loc["smet-linear", "ppl_vs_dense"] == pytest.approx(math.exp(0.1), rel=1e-3)
    lines = "\n".join(study_findings(tmp_path))
    assert "tiny, d=0.5, α=0: +0.5" in lines and "spikes above dense: holds" in lines
    assert "smet-linear reduces the spike** — naive-DST rise minus smet-linear rise: holds in 1, reversed in 0" in lines
    assert "tiny naive-dst d=0.5 (best α=0 of 1): +0.3000" in lines and "worse than dense" in lines
    assert "**Consistency check**" not in lines  # no masked-dst or warmup-only runs to check against


def test_findings_say_within_noise_when_it_is(tmp_path):
    _synthetic_study(tmp_path, seeds=(0, 1), naive_spike=0.0, smet_spike=0.0)
    lines = "\n".join(study_findings(tmp_path))
    assert "within noise in 1" in lines


def test_spike_verdicts_count_seeds_not_updates(tmp_path):
    """Updates of one run are not independent samples: one seed gives no noise estimate, however many updates."""
    _synthetic_study(tmp_path, seeds=(0,))
    lines = "\n".join(study_findings(tmp_path))
    assert "in 1 seed (seed means compared) — one sample only" in lines
    assert "spikes above dense: holds" not in lines


def test_ablation_arms_and_update_probe_reach_the_findings(tmp_path):
    """Warm-up only reduces the cold-start rise, density-LR only does not; prune damage is the same for both."""
    for seed in (0, 1, 2):
        flat = [2.0] * 30
        noise = 0.01 * seed
        _write_run(tmp_path, RunSpec("tiny", "adamw", None, None, seed), flat, probes=[(10, 0.0, -0.01, 1.0)])
        for method, cold, ratio in (("naive-dst", 0.3, 3.0), ("warmup-only", 0.0, 0.01),
                                    ("density-lr-only", 0.3 + noise, 3.0)):
            alpha = 1.0 if method == "density-lr-only" else 0.0
            _write_run(tmp_path, RunSpec("tiny", method, 0.5, alpha, seed), flat, {10: 4},
                       probes=[(10, 0.05 + noise, cold + noise, ratio)])
    data = load_study(tmp_path)
    table = stability.probe_table(data).set_index("method")
    assert table.loc["naive-dst", "cold_start_rise"] == pytest.approx(0.31)
    assert table.loc["warmup-only", "regrown_vs_surviving_1"] == pytest.approx(0.01)
    assert table.loc["adamw", "prune_damage"] == 0.0 and table.loc["naive-dst", "updates"] == 3
    lines = "\n".join(study_findings(tmp_path, probes=True))
    assert ("**warmup-only reduces the cold-start rise** — naive-DST cold start rise minus warmup-only cold start "
            "rise: holds in 1") in lines
    assert "**density-lr-only reduces the cold-start rise**" in lines and "tiny, d=0.5, α=1 (naive α=0)" in lines
    assert "prune damage, tiny d=0.5 naive-dst α=0: +0.0600" in lines
    assert "naive-dst α=0 3.00× (3×1)" in lines
    assert "adamw" not in "".join(line for line in lines.splitlines() if line.startswith("  - prune damage"))
    assert "warmup-only reduces the cold-start rise of naive DST (cold start rise): reproduces — holds in 1" in lines
    assert "density-lr-only reduces the cold-start rise of naive DST (cold start rise): does NOT reproduce" in lines


def _two_density_study(root):
    """Naive DST spikes by 0.5 (+ 0.05 per seed) after the update at d=0.5 and not at all at d=0.25; dense wiggles
    by 0.01 (seed + 1) at the same step; three seeds."""
    for seed in (0, 1, 2):
        flat = [2.0] * 30
        wiggle = list(flat)
        wiggle[11] += 0.01 * (seed + 1)
        spiking = list(flat)
        spiking[11] += 0.5 + 0.05 * seed
        _write_run(root, RunSpec("tiny", "adamw", None, None, seed), wiggle)
        _write_run(root, RunSpec("tiny", "naive-dst", 0.5, 0.0, seed), spiking, {10: 4})
        _write_run(root, RunSpec("tiny", "naive-dst", 0.25, 0.0, seed), flat, {10: 4})


def test_a_claim_that_holds_in_one_of_two_settings_and_is_within_noise_in_the_other_reproduces_in_part(tmp_path):
    _two_density_study(tmp_path)
    lines = study_findings(tmp_path)
    assert ("  - naive DST's loss rises more than dense after topology updates: reproduces in part — holds in 1, "
            "reversed in 0 of 2 measurable settings") in lines
    assert any(line.startswith("  - tiny, d=0.5, α=0: +0.5300") and line.endswith("spikes above dense: holds")
               for line in lines)
    assert any(line.startswith("  - tiny, d=0.25, α=0: -0.0200") and line.endswith("within noise") for line in lines)
    settings = [line for line in lines if line.startswith("  - tiny, d=")]
    assert settings[0].startswith("  - tiny, d=0.5,") and settings[1].startswith("  - tiny, d=0.25,")  # high to low


def test_a_claim_within_noise_everywhere_is_measurable_and_does_not_reproduce(tmp_path):
    _synthetic_study(tmp_path, seeds=(0, 1), naive_spike=0.0, smet_spike=0.0)
    lines = study_findings(tmp_path)
    assert ("  - naive DST's loss rises more than dense after topology updates: does NOT reproduce at this scale — "
            "holds in 0, reversed in 0 of 1 measurable settings") in lines


def test_two_updates_of_one_seed_are_one_sample_not_two(tmp_path):
    """Both updates move blocks and both spike: still one seed, so no noise estimate and no verdict."""
    flat = [2.0] * 30
    spiking = list(flat)
    spiking[11] += 0.5
    spiking[21] += 0.6
    _write_run(tmp_path, RunSpec("tiny", "adamw", None, None, 0), flat)
    _write_run(tmp_path, RunSpec("tiny", "naive-dst", 0.5, 0.0, 0), spiking, {10: 4, 20: 4})
    lines = "\n".join(study_findings(tmp_path))
    assert "tiny, d=0.5, α=0: +0.5500 over 2 updates in 1 seed (seed means compared) — one sample only" in lines
    assert "spikes above dense: holds" not in lines


def test_best_alpha_density_lr_and_default_sentences_say_which_side_is_worse(tmp_path):
    """smet-linear at α=0 ends 0.10, 0.12, 0.11 above dense, at α=1 0.20, 0.23, 0.21: the best α is 0
    (+0.11 ± 4.303·0.01/√3 above dense: worse than dense); α=1 − α=0 is 0.10, 0.11, 0.10
    (+0.1033 ± 4.303·0.00577/√3 = 0.0143: α=1 is worse), and the library default (smet-linear, α=1) is that same
    comparison against the best (the default is worse)."""
    flat = [2.0] * 30
    for seed, low, high in zip((0, 1, 2), (2.10, 2.12, 2.11), (2.20, 2.23, 2.21)):
        _write_run(tmp_path, RunSpec("tiny", "adamw", None, None, seed), flat, val_loss=2.0)
        _write_run(tmp_path, RunSpec("tiny", "smet-linear", 0.5, 0.0, seed), flat, {10: 4}, val_loss=low)
        _write_run(tmp_path, RunSpec("tiny", "smet-linear", 0.5, 1.0, seed), flat, {10: 4}, val_loss=high)
    lines = study_findings(tmp_path)
    best_ci, alpha_ci = 4.303 * 0.01 / math.sqrt(3), 4.303 * math.sqrt(1 / 3) * 0.01 / math.sqrt(3)
    assert (f"  - tiny smet-linear d=0.5 (best α=0 of 2): +0.1100 ± {best_ci:.4f} (95% CI), ppl × "
            f"{math.exp(0.11):.3f} — worse than dense") in lines
    assert f"  - tiny smet-linear d=0.5: +0.1033 ± {alpha_ci:.4f} (95% CI) — α=1 is worse" in lines
    assert (f"  - tiny d=0.5: smet-linear α=0 (val loss 2.1100); default − best +0.1033 ± {alpha_ci:.4f} (95% CI): "
            "the default is worse") in lines


def test_a_pair_without_a_final_loss_is_no_agreement_in_the_consistency_check(tmp_path):
    flat = [2.0] * 12
    for seed, masked_loss in ((0, 2.0004), (1, float("nan"))):  # the NaN gap after a finite one
        _write_run(tmp_path, RunSpec("tiny", "naive-dst", 0.5, 0.0, seed), flat, val_loss=2.0)
        _write_run(tmp_path, RunSpec("tiny", "masked-dst", 0.5, None, seed), flat, val_loss=masked_loss)
    lines = "\n".join(study_findings(tmp_path))
    assert "largest final-loss gap nan over 2 pairs (they DISAGREE: investigate)" in lines


def test_a_pair_without_a_final_loss_has_no_verdict_and_is_not_better_than_dense(tmp_path):
    """A NaN difference gave a NaN mean and interval, and ``NaN > 0`` is False: the verdict was 'a < b'."""
    flat = [2.0] * 12
    for seed, naive_loss in ((0, 2.1), (1, float("nan")), (2, 2.2)):
        _write_run(tmp_path, RunSpec("tiny", "adamw", None, None, seed), flat, val_loss=2.0)
        _write_run(tmp_path, RunSpec("tiny", "naive-dst", 0.5, 0.0, seed), flat, val_loss=naive_loss)
    lines = "\n".join(study_findings(tmp_path))
    assert "tiny naive-dst d=0.5 (best α=0 of 1): n/a" in lines and "better than dense" not in lines
    assert "a run without a finite value: no verdict" in lines
    assert stability.stats.compare([1.0, float("inf")], [0.0, 0.0])[2] == "not finite"


def test_an_alpha_with_a_seed_without_a_final_loss_is_not_the_best_alpha(tmp_path):
    """pandas' mean skips NaN: α=0 (2.10, NaN, 2.12) averaged 2.11 over the two seeds that ended and beat α=1."""
    flat = [2.0] * 12
    for seed, low, high in zip((0, 1, 2), (2.10, float("nan"), 2.12), (2.15, 2.16, 2.17)):
        _write_run(tmp_path, RunSpec("tiny", "adamw", None, None, seed), flat, val_loss=2.0)
        _write_run(tmp_path, RunSpec("tiny", "smet-linear", 0.5, 0.0, seed), flat, val_loss=low)
        _write_run(tmp_path, RunSpec("tiny", "smet-linear", 0.5, 1.0, seed), flat, val_loss=high)
    data = load_study(tmp_path)
    quality = quality_table(data)
    assert quality[quality["alpha"] == 0.0][["val_loss", "val_loss_sd", "ppl"]].isna().all(axis=None)
    lines = "\n".join(stability.findings(data, spike_events(data), quality))
    assert "tiny smet-linear d=0.5 (best α=1 of 2): +0.1600" in lines
    assert "tiny d=0.5: smet-linear α=1 (val loss 2.1600); the default is best" in lines


def test_an_arm_pairs_with_naive_dst_at_its_own_alpha_else_at_the_smallest_one_naive_dst_ran():
    """The smallest is α = 0, the paper's naive DST; where naive DST did not run at all, the arm's own α."""
    from bench.stability.findings import NAIVE, naive_alpha

    runs = [{"config": "tiny", "method": NAIVE, "density": 0.5, "alpha": alpha} for alpha in (2.0, 0.0, 1.0)]
    runs.append({"config": "tiny", "method": "masked-dst", "density": 0.25, "alpha": 3.0})
    runs = pd.DataFrame(runs)
    assert naive_alpha(runs, "tiny", 0.5, 1.0) == 1.0
    assert naive_alpha(runs, "tiny", 0.5, 0.5) == 0.0
    assert naive_alpha(runs, "tiny", 0.25, 0.5) == 0.5


@pytest.mark.parametrize("gap, verdict", [(5e-4, "agree"), (5e-3, "they DISAGREE: investigate")])
def test_the_consistency_check_calls_a_final_loss_gap_of_1e_3_or_more_a_disagreement(tmp_path, gap, verdict):
    """naive DST at α = 0 and masked DST apply the same update: final losses within 1e-3 agree, beyond it do not."""
    flat = [2.0] * 12
    for seed in (0, 1):
        _write_run(tmp_path, RunSpec("tiny", "naive-dst", 0.5, 0.0, seed), flat, val_loss=2.0 + 0.01 * seed)
        _write_run(tmp_path, RunSpec("tiny", "masked-dst", 0.5, None, seed), flat, val_loss=2.0 + 0.01 * seed + gap)
    lines = "\n".join(study_findings(tmp_path))
    assert f"largest final-loss gap {gap:.2e} over 2 pairs ({verdict})" in lines


def test_the_prune_damage_of_one_seed_has_no_interval_and_of_two_seeds_a_t_interval(tmp_path):
    """One seed: no spread, so no interval (never ±0). Two seeds, damage 0.2 and 0.3: mean 0.25, sample sd 0.0707,
    interval ± 12.706 · 0.0707 / √2 = 0.6353 (t with 1 degree of freedom)."""
    lines = {}
    for seeds in ((0,), (0, 1)):
        root = tmp_path / str(len(seeds))
        for seed in seeds:
            _write_run(root, RunSpec("tiny", "adamw", None, None, seed), [2.0] * 20)
            _write_run(root, RunSpec("tiny", "naive-dst", 0.5, 0.0, seed), [2.0] * 20, {10: 4},
                       probes=[(10, 0.2 + 0.1 * seed, 0.1, 3.0)])  # fmt: skip
        found = study_findings(root, probes=True)
        lines[len(seeds)] = [line for line in found if line.startswith("  - prune damage,")]
    assert lines[1] == ["  - prune damage, tiny d=0.5 naive-dst α=0: +0.2000"]
    assert lines[2] == ["  - prune damage, tiny d=0.5 naive-dst α=0: +0.2500 ± 0.6353 (95% CI)"]


def test_runs_without_any_topology_update_say_so_rather_than_blaming_the_block_size(tmp_path):
    """--steps below --update-interval: no update took place, so a smaller block size would not help."""
    for seed in (0, 1):
        _write_run(tmp_path, RunSpec("tiny", "adamw", None, None, seed), [2.0] * 30)
        _write_run(tmp_path, RunSpec("tiny", "naive-dst", 0.5, 0.0, seed), [2.0] * 30)
        _write_run(tmp_path, RunSpec("tiny", "smet-linear", 0.5, 1.0, seed), [2.0] * 30)
    lines = study_findings(tmp_path)
    reason = ("no topology update in these runs (--steps below --update-interval, or --update-end-step before the "
              "first update) — nothing to measure")
    assert f"  - tiny, d=0.5, α=0: {reason}" in lines and f"  - tiny, d=0.5, α=1 (naive α=0): {reason}" in lines
    assert not any("no update moved a block" in line for line in lines)


def test_a_cold_start_at_updates_that_moved_no_block_is_not_measurable_rather_than_a_verdict(tmp_path):
    """At d=0.1 no update moved a block: no block was regrown, so there is no cold start to remove (the spike
    comparison already says so); the probe rows of those updates must not yield a cold-start verdict either."""
    for seed in (0, 1, 2):
        flat, noise = [2.0] * 30, 0.01 * seed
        _write_run(tmp_path, RunSpec("tiny", "adamw", None, None, seed), flat, probes=[(10, 0.0, 0.0, None)])
        for method, cold in (("naive-dst", 0.3), ("warmup-only", 0.0)):
            _write_run(tmp_path, RunSpec("tiny", method, 0.1, 0.0, seed), flat, {10: 0},
                       probes=[(10, 0.0, cold + noise, None)])
    lines = study_findings(tmp_path, probes=True)
    assert ("  - warmup-only reduces the cold-start rise of naive DST (cold start rise): not measurable here — holds "
            "in 0, reversed in 0 of 0 measurable settings") in lines
    assert not any(line.startswith("  - cold-start rise, tiny d=0.1") for line in lines)
    assert set(stability.probe_table(load_study(tmp_path))["method"]) == {"adamw"}


def test_an_update_at_the_last_step_has_no_cold_start_and_is_not_counted_among_the_updates_compared(tmp_path):
    """The update at the final step (30) has no steps after it: its probe has a prune damage but neither a cold-start
    rise nor a first step, so the cold-start and first-step sentences count one update per seed, not two."""
    for seed in (0, 1, 2):
        flat, noise = [2.0] * 30, 0.01 * seed
        _write_run(tmp_path, RunSpec("tiny", "adamw", None, None, seed), flat)
        for method, cold, ratio in (("naive-dst", 0.3, 3.0), ("warmup-only", 0.0, 0.01)):
            _write_run(tmp_path, RunSpec("tiny", method, 0.5, 0.0, seed), flat, {10: 4, 30: 4},
                       probes=[(10, 0.05, cold + noise, ratio), (30, 0.05, None, None)])
    lines = "\n".join(study_findings(tmp_path, probes=True))
    cold_start = lines.split("**warmup-only reduces the cold-start rise**")[1].splitlines()[1]
    assert cold_start.startswith("  - tiny, d=0.5, α=0: +0.3000") and "over 3 updates in 3 seeds" in cold_start
    assert "naive-dst α=0 3.00× (3×1); warmup-only α=0 0.01× (3×1)" in lines


def test_a_setting_without_a_naive_dst_or_dense_run_to_pair_with_is_not_said_to_have_moved_no_block(tmp_path):
    """smet-linear ran at d=0.5 and d=0.25, naive DST at d=0.5 only, and the dense run of the only seed is missing:
    every update moved blocks, so 'no update moved a block' would be false; the sentence names the missing run."""
    flat = [2.0] * 30
    for density in (0.5, 0.25):
        _write_run(tmp_path, RunSpec("tiny", "smet-linear", density, 0.0, 0), flat, {10: 4})
    _write_run(tmp_path, RunSpec("tiny", "naive-dst", 0.5, 0.0, 0), flat, {10: 4})
    lines = study_findings(tmp_path)
    assert "  - tiny, d=0.25, α=0: no finished naive-dst run at α=0 here — nothing to compare" in lines
    assert "  - tiny, d=0.5, α=0: no finished adamw run here — nothing to compare" in lines
    assert not any("no update moved a block" in line for line in lines)


def test_the_best_alpha_is_chosen_on_the_seeds_every_alpha_finished(tmp_path):
    """α=1 ends lower than α=0 on both seeds α=0 finished (2.12 < 2.15, 2.13 < 2.16); its mean over three seeds,
    with the hard seed 2 (2.40) that α=0 did not finish, was higher, and α=0 was named the best α."""
    flat = [2.0] * 12
    for seed, low, high in zip((0, 1, 2), (2.15, 2.16, None), (2.12, 2.13, 2.40)):
        _write_run(tmp_path, RunSpec("tiny", "adamw", None, None, seed), flat, val_loss=2.0)
        if low is not None:
            _write_run(tmp_path, RunSpec("tiny", "smet-linear", 0.5, 0.0, seed), flat, val_loss=low)
        _write_run(tmp_path, RunSpec("tiny", "smet-linear", 0.5, 1.0, seed), flat, val_loss=high)
    lines = "\n".join(study_findings(tmp_path))
    assert "tiny smet-linear d=0.5 (best α=1 of 2): +0.2167" in lines
    assert "tiny d=0.5: smet-linear α=1 (val loss 2.2167); the default is best" in lines


def test_a_naive_dst_run_at_alpha_one_from_before_the_density_lr_only_arm_loads_as_that_arm(tmp_path):
    """The CPU pilot ran naive DST at every α: its α = 1 runs are the density-LR-only arm (no warm-up, global bias
    correction, lr × d^−α), not the paper's naive DST; they must not enter the naive-DST spike claim nor be the naive
    DST an arm at α = 1 is paired with."""
    for seed in (0, 1):
        spiking = [2.0] * 30
        spiking[11] += 0.5 + 0.05 * seed
        _write_run(tmp_path, RunSpec("tiny", "adamw", None, None, seed), [2.0] * 30)
        for alpha in (0.0, 1.0):
            _write_run(tmp_path, RunSpec("tiny", "naive-dst", 0.5, alpha, seed), spiking, {10: 4})
            _write_run(tmp_path, RunSpec("tiny", "smet-linear", 0.5, alpha, seed), [2.0] * 30, {10: 4})
    data = load_study(tmp_path)
    runs = data.runs.set_index("path")
    assert runs.loc["runs/tiny/naive-dst-d0.5-a1-s0", ["method", "alpha"]].tolist() == ["density-lr-only", 1.0]
    assert runs.loc["runs/tiny/naive-dst-d0.5-a0-s0", ["method", "alpha"]].tolist() == ["naive-dst", 0.0]
    lines = study_findings(tmp_path)
    naive = lines[lines.index(next(line for line in lines if line.startswith("**Naive DST"))) + 1:]
    assert naive[0].startswith("  - tiny, d=0.5, α=0: +0.5") and not naive[1].startswith("  - tiny, d=0.5, α=1")
    assert any(line.startswith("  - tiny, d=0.5, α=1 (naive α=0): +0.5") for line in lines)
    assert "**density-lr-only reduces the spike**" in "\n".join(lines)


def test_seed_means_leave_out_an_update_without_a_value_in_either_column_from_both_means_and_the_count():
    from bench.stability.findings import seed_means

    frame = pd.DataFrame({"seed": [0, 0, 1], "a": [0.3, 0.9, 0.5], "b": [0.1, math.nan, 0.2]})
    a, b, updates = seed_means(frame, "a", "b")
    assert a.tolist() == [0.3, 0.5] and b.tolist() == [0.1, 0.2] and updates == 2


def test_an_arm_is_compared_with_naive_dst_at_the_update_steps_where_both_moved_blocks(tmp_path):
    """Naive DST moved blocks at step 10 only (rise 0.5), smet-linear at 10 (no rise) and 20 (rise 0.4): the pair is
    the update at step 10, a difference of 0.5 per seed; paired by seed alone, smet-linear's mean would be 0.2."""
    for seed in (0, 1):
        naive, smet = [2.0] * 30, [2.0] * 30
        naive[11] += 0.5 + 0.01 * seed
        smet[21] += 0.4
        _write_run(tmp_path, RunSpec("tiny", "naive-dst", 0.5, 0.0, seed), naive, {10: 4, 20: 0})
        _write_run(tmp_path, RunSpec("tiny", "smet-linear", 0.5, 0.0, seed), smet, {10: 4, 20: 4})
    lines = study_findings(tmp_path)
    arm = lines[lines.index(next(line for line in lines if line.startswith("**smet-linear reduces the spike"))) + 1]
    assert arm.startswith("  - tiny, d=0.5, α=0: +0.5050 ± ") and "over 2 updates in 2 seeds" in arm


def test_one_seed_gives_no_measurable_setting_so_the_spike_claim_is_not_measurable(tmp_path):
    _synthetic_study(tmp_path, seeds=(0,))
    lines = study_findings(tmp_path)
    assert ("  - naive DST's loss rises more than dense after topology updates: not measurable here — holds in 0, "
            "reversed in 0 of 0 measurable settings") in lines


def test_naive_dst_rising_less_than_dense_is_a_reversed_setting_of_the_spike_claim(tmp_path):
    """Dense rises by 0.5 (+ 0.01 per seed) after step 10, naive DST not at all: the claim is reversed there."""
    for seed in (0, 1, 2):
        wiggle = [2.0] * 30
        wiggle[11] += 0.5 + 0.01 * seed
        _write_run(tmp_path, RunSpec("tiny", "adamw", None, None, seed), wiggle)
        _write_run(tmp_path, RunSpec("tiny", "naive-dst", 0.5, 0.0, seed), [2.0] * 30, {10: 4})
    lines = study_findings(tmp_path)
    assert ("  - naive DST's loss rises more than dense after topology updates: does NOT reproduce at this scale "
            "(reversed in some) — holds in 0, reversed in 1 of 1 measurable settings") in lines
    assert any(line.startswith("  - tiny, d=0.5, α=0: -0.5100") and line.endswith("rises less than dense")
               for line in lines)


def test_an_arm_setting_with_an_infinite_cold_start_is_not_measurable_rather_than_one_seed_only(tmp_path):
    for seed, cold in ((0, 0.0), (1, math.inf)):
        _write_run(tmp_path, RunSpec("tiny", "naive-dst", 0.5, 0.0, seed), [2.0] * 30, {10: 4},
                   probes=[(10, 0.05, 0.3, 3.0)])
        _write_run(tmp_path, RunSpec("tiny", "warmup-only", 0.5, 0.0, seed), [2.0] * 30, {10: 4},
                   probes=[(10, 0.05, cold, 0.01)])
    lines = study_findings(tmp_path, probes=True)
    header = next(line for line in lines if line.startswith("**warmup-only reduces the cold-start rise**"))
    assert header.endswith("within noise in 0, not measurable in 1 of 1 settings:")
    assert lines[lines.index(header) + 1].endswith("a run without a finite value: no verdict")


def test_the_consistency_check_pairs_smet_linear_at_alpha_zero_only_with_warmup_only(tmp_path):
    """smet-linear at α=0 and warmup-only are the same arm; smet-linear at α=1 is not, and is not compared."""
    for seed in (0, 1):
        loss = 2.0 + 0.01 * seed
        _write_run(tmp_path, RunSpec("tiny", "smet-linear", 0.5, 0.0, seed), [2.0] * 12, val_loss=loss)
        _write_run(tmp_path, RunSpec("tiny", "smet-linear", 0.5, 1.0, seed), [2.0] * 12, val_loss=loss + 0.1)
        _write_run(tmp_path, RunSpec("tiny", "warmup-only", 0.5, 0.0, seed), [2.0] * 12, val_loss=loss)
    lines = "\n".join(study_findings(tmp_path))
    assert "smet-linear at α=0 and warmup-only" in lines
    assert "largest final-loss gap 0.00e+00 over 2 pairs (agree)" in lines


def test_density_lr_only_at_its_largest_alpha_is_compared_with_naive_dst_which_it_equals_at_alpha_zero(tmp_path):
    """density-lr-only ran at α=1 only; at α=0 it is naive DST, so its density-LR sentence is α=1 minus naive DST."""
    for seed, naive_loss, arm_loss in ((0, 2.30, 2.10), (1, 2.32, 2.11), (2, 2.31, 2.12)):
        _write_run(tmp_path, RunSpec("tiny", "naive-dst", 0.5, 0.0, seed), [2.0] * 12, val_loss=naive_loss)
        _write_run(tmp_path, RunSpec("tiny", "density-lr-only", 0.5, 1.0, seed), [2.0] * 12, val_loss=arm_loss)
    lines = study_findings(tmp_path)
    assert any(line.startswith("  - tiny density-lr-only d=0.5: -0.2000 ± ") and line.endswith("α=1 is better")
               for line in lines)


def test_the_density_lr_sentence_compares_only_the_largest_alpha_with_the_smallest(tmp_path):
    for seed in (0, 1):
        for alpha in (0.0, 0.5, 1.0):
            _write_run(tmp_path, RunSpec("tiny", "smet-linear", 0.5, alpha, seed), [2.0] * 12,
                       val_loss=2.0 + 0.1 * alpha + 0.01 * seed)
    lines = study_findings(tmp_path)
    assert [line for line in lines if line.startswith("  - tiny smet-linear d=0.5: ")] == [
        "  - tiny smet-linear d=0.5: +0.1000 ± 0.0000 (95% CI) — α=1 is worse"]


def test_the_first_step_count_is_the_total_when_the_seeds_measured_unequal_numbers(tmp_path):
    """Seed 0 measured two first steps, seed 1 one: the bracket read (2×1), two measurements where the mean is over
    three (3 // 2 seeds)."""
    for seed, updates in ((0, (10, 20)), (1, (10,))):
        flat = [2.0] * 30
        _write_run(tmp_path, RunSpec("tiny", "adamw", None, None, seed), flat)
        _write_run(tmp_path, RunSpec("tiny", "naive-dst", 0.5, 0.0, seed), flat, {10: 4, 20: 4},
                   probes=[(step, 0.05, 0.3, 3.0) for step in updates])
    lines = "\n".join(study_findings(tmp_path, probes=True))
    assert "naive-dst α=0 3.00× (3 over 2 seeds)" in lines
