"""Stability-study tooling (bench/stability/plots.py): the data the seaborn plots of stability.md draw, the validation
curves per (density, α) panel and the loss profile around topology updates, read off ``seaborn.relplot``'s input."""

import pytest

from bench.plotting import pyplot
from bench.stability import RunSpec, load_study, spike_events
from bench.stability.plots import plot_spike_profile, plot_val_curves
from stability_runs import _synthetic_study, _write_run, cache_dir  # noqa: F401 -- cache_dir: autouse


@pytest.fixture
def drawn(monkeypatch):
    """The grids ``seaborn.relplot`` drew, each with the frame it drew."""
    sns = pyplot()[1]
    relplot, grids = sns.relplot, []

    def spy(*args, **kwargs):
        grids.append(relplot(*args, **kwargs))
        grids[-1].frame = kwargs["data"]
        return grids[-1]

    monkeypatch.setattr(sns, "relplot", spy)
    return grids


def _study(root):
    """The synthetic study (seed 0: naive-dst spikes by 0.5, dense by 0.01 at step 12) with a GaLore control, a
    smet-linear run at d = 0.25 that lies 0.1 above the flat loss, 0.3 more at the update (step 10) and 0.2 more at
    step 12, and a naive-dst run of a seed without a dense run (no reference to measure the excess over)."""
    _synthetic_study(root, seeds=(0,))
    _write_run(root, RunSpec("tiny", "galore", None, None, 0), [2.0] * 30, val_loss=2.05)
    offset = [2.1] * 30
    offset[9] += 0.3
    offset[11] += 0.2
    _write_run(root, RunSpec("tiny", "smet-linear", 0.25, 1.0, 0), offset, {10: 4}, val_loss=2.5)
    spike = [2.0] * 30
    spike[11] += 1.0
    _write_run(root, RunSpec("tiny", "naive-dst", 0.25, 0.0, 7), spike, {10: 4}, val_loss=2.2)
    return load_study(root)


def test_the_validation_curves_repeat_the_dense_like_runs_in_every_panel_and_zoom_on_the_late_losses(tmp_path, drawn):
    path = plot_val_curves(_study(tmp_path), "tiny", tmp_path / "curves.png")
    assert path.stat().st_size > 1000
    frame = drawn[0].frame
    panels = {(d, a): set(group["method"]) for (d, a), group in frame.groupby(["panel_density", "panel_alpha"])}
    assert panels == {("d=0.5", "α=0"): {"adamw", "galore", "naive-dst"},
                      ("d=0.5", "α=1"): {"adamw", "galore", "smet-linear"},
                      ("d=0.25", "α=0"): {"adamw", "galore", "naive-dst"},
                      ("d=0.25", "α=1"): {"adamw", "galore", "smet-linear"}}
    assert len(frame) == 2 * 4 * 3  # the first and the final evaluation of three runs per panel
    assert set(frame[frame["panel_density"] == "d=0.25"]["seed"]) == {0, 7}
    # the y range: the final losses 2.0 to 2.5, with 5 % of their spread either side
    assert drawn[0].axes.flat[0].get_ylim() == pytest.approx((2.0 - 0.025, 2.5 + 0.025))


def test_the_spike_profile_is_the_excess_over_the_dense_run_minus_its_pre_update_mean_from_minus_k_plus_1_to_k(
        tmp_path, drawn):
    data = _study(tmp_path)
    path = plot_spike_profile(data, spike_events(data), "tiny", tmp_path / "profile.png")
    assert path.stat().st_size > 1000
    frame = drawn[0].frame
    assert sorted(set(frame["offset"])) == [-2, -1, 0, 1, 2, 3]  # k = 3 steps either side of the update at step 10
    curves = {key: list(group.sort_values("offset")["excess"].round(6))
              for key, group in frame.groupby(["method", "panel", "α"])}
    assert curves == {("galore", "d=0.5", "-"): [0, 0, 0, 0, -0.01, 0],  # the control, in every density's panel
                      ("galore", "d=0.25", "-"): [0, 0, 0, 0, -0.01, 0],
                      ("naive-dst", "d=0.5", "0"): [0, 0, 0, 0, 0.49, 0],
                      ("smet-linear", "d=0.5", "1"): [0, 0, 0, 0, -0.01, 0],
                      # minus its mean excess 0.2 over the steps -2 to 0 (0.1, 0.1, 0.4)
                      ("smet-linear", "d=0.25", "1"): [-0.1, -0.1, 0.2, -0.1, 0.09, -0.1]}


def test_no_spike_profile_is_drawn_when_no_update_moved_a_block(tmp_path, drawn):
    _write_run(tmp_path, RunSpec("tiny", "adamw", None, None, 0), [2.0] * 30)
    _write_run(tmp_path, RunSpec("tiny", "naive-dst", 0.5, 0.0, 0), [2.0] * 30, {10: 0})
    data = load_study(tmp_path)
    assert plot_spike_profile(data, spike_events(data), "tiny", tmp_path / "profile.png") is None
    assert not drawn and not (tmp_path / "profile.png").exists()
