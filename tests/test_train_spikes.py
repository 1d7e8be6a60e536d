"""Loss-spike diagnostics of the reference trainer: the rise of the loss in the k steps after each topology update."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smet_kernels.train.spikes import SpikeTracker


def test_spike_tracker_rise_after_update():
    tracker = SpikeTracker(window=3)
    losses = {1: 5.0, 2: 4.0, 3: 3.0, 4: 2.9, 5: 3.6, 6: 2.8, 7: 2.7}
    done = []
    for step, loss in losses.items():
        done += tracker.add_loss(step, loss)
        if step == 3:
            tracker.add_update(3)
        if step == 7:
            tracker.add_update(7)
    assert len(done) == 1 and done[0]["update_step"] == 3
    assert done[0]["loss_before"] == pytest.approx(4.0)
    assert done[0]["rise"] == pytest.approx(-0.4) and done[0]["max_loss_after"] == 3.6
    assert tracker.finish() == []  # no loss after the update at step 7
    summary = tracker.summary()
    assert summary["count"] == 1 and summary["max_rise"] == pytest.approx(-0.4)
    assert summary["mean_relative_rise"] == pytest.approx(-0.1)
    restored = SpikeTracker(window=1)
    restored.load_state_dict(tracker.state_dict())
    assert restored.summary() == summary
    for window in (0, True, 2.0):
        with pytest.raises(ValueError, match="window"):
            SpikeTracker(window=window)


def test_updates_a_step_apart_each_average_only_the_k_losses_up_to_themselves_also_at_the_end_of_a_run():
    """Two pending windows overlap: the later one's ``before`` must not reach the loss that only the earlier one
    uses, and that loss must stay until the earlier one is measured."""
    tracker, done = SpikeTracker(window=2), []
    for step, loss in {1: 9.0, 2: 8.0, 3: 6.0, 4: 5.0, 5: 7.0}.items():
        done += tracker.add_loss(step, loss)
        if step in (3, 4):
            tracker.add_update(step)
    done += tracker.finish()
    assert [(r["update_step"], r["loss_before"], r["max_loss_after"], r["complete"]) for r in done] == [
        (3, 7.0, 7.0, True), (4, 5.5, 7.0, False)]


def test_an_update_without_a_loss_before_it_is_not_measured():
    tracker = SpikeTracker(window=1)
    tracker.add_update(3)
    assert tracker.add_loss(4, 1.0) == [] and tracker.pending == [] and tracker.summary()["count"] == 0


def test_the_tracker_keeps_only_the_losses_a_window_can_still_use():
    """They are saved in every checkpoint: a long run without them forgotten wrote all its losses there."""
    tracker = SpikeTracker(window=3)
    for step in range(1, 101):
        tracker.add_loss(step, 1.0)
    assert sorted(tracker.state_dict()["losses"]) == [98, 99, 100]


def _spikes_by_the_formula(losses: list[float], updates: set[int], window: int) -> list[tuple]:
    """(step it is written at, None at the end of the run; record) per update, straight from the module docstring."""
    last, expected = len(losses), []
    for s in sorted(updates):
        before = [losses[t - 1] for t in range(max(1, s - window + 1), s + 1)]
        after = [losses[t - 1] for t in range(s + 1, min(last, s + window) + 1)]
        if after:
            rise = max(after) - sum(before) / len(before)
            expected.append((s + window if s + window <= last else None, {
                "update_step": s, "window": window, "loss_before": sum(before) / len(before),
                "max_loss_after": max(after), "rise": rise, "relative_rise": rise / (sum(before) / len(before)),
                "complete": len(after) == window}))
    return expected


@settings(max_examples=60, deadline=None, derandomize=True)
@given(losses=st.lists(st.floats(0.5, 8.0), min_size=1, max_size=24), window=st.integers(1, 5), data=st.data())
def test_spike_records_follow_the_documented_windows_whatever_the_updates_and_a_resume_between(losses, window, data):
    """``before`` = mean of the k losses up to the update, ``rise`` = max of the k after it minus ``before``, written
    once the k-th loss after it is in (or at the end, ``complete`` False); a tracker restored from ``state_dict`` at any
    step writes the same, and the summary is the mean and max over the records. A ``before`` window one loss too wide
    went unnoticed (the one test had no loss before its window), and so did the summary's mean rise and max relative
    rise."""
    steps = range(1, len(losses) + 1)
    updates = set(data.draw(st.lists(st.sampled_from(steps), unique=True), label="updates"))
    cut = data.draw(st.sampled_from(steps), label="resume after")
    tracker, written = SpikeTracker(window), []
    for step in steps:
        written += [(step, record) for record in tracker.add_loss(step, losses[step - 1])]
        if step in updates:
            tracker.add_update(step)
        if step == cut:
            tracker, state = SpikeTracker(1), tracker.state_dict()
            tracker.load_state_dict(state)
    written += [(None, record) for record in tracker.finish()]
    expected = _spikes_by_the_formula(losses, updates, window)
    assert [(step, record["update_step"]) for step, record in written] == [(s, r["update_step"]) for s, r in expected]
    for (_, record), (_, reference) in zip(written, expected):
        assert record == pytest.approx(reference)
    records = [reference for _, reference in expected]
    summary = tracker.summary()
    assert summary["count"] == len(records)
    for key, name in (("rise", "rise"), ("relative_rise", "relative_rise")):
        values = [record[key] for record in records]
        assert summary[f"mean_{name}"] == (pytest.approx(sum(values) / len(values)) if values else None)
        assert summary[f"max_{name}"] == (max(values) if values else None)
