"""The update probe around a topology update, on a hand-made model: one compact values tensor and one masked weight
whose updates and losses are set by hand, so that every number of a record is known."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from smet_kernels.train.checkpoint import CheckpointWarning
from smet_kernels.train.probe import UpdateProbe
from smet_kernels.train.trainer import train
from test_train_trainer import cache_dir, one_thread, read_metrics, tiny_config  # noqa: F401 -- autouse fixtures


class TwoSparseLayers(nn.Module):
    """Compact values: 3 slots of 2×2 blocks at (0,0), (0,1), (1,0) of a 2×2 block grid; a masked 4×4 weight active
    at blocks (0,0), (1,1). All active weights 1."""

    def __init__(self):
        super().__init__()
        self.values = nn.Parameter(torch.ones(3, 2, 2))
        self.values.smet_layout = SimpleNamespace(block_indices=torch.tensor([[0, 0], [0, 1], [1, 0]]), block_size=2)
        self.weight = nn.Parameter(torch.zeros(4, 4))
        self.weight.smet_mask_layout = SimpleNamespace(mask=torch.tensor([[True, False], [False, True]]), block_size=2)
        with torch.no_grad():
            self.weight[:2, :2] = 1.0
            self.weight[2:, 2:] = 1.0

    def update_topology(self):
        """Slot 1 moves from (0,1) to (1,1) (its column kept); the masked weight's block (0,0) moves to (0,1).
        Regrown blocks start at 0, a pruned masked block is zeroed."""
        with torch.no_grad():
            self.values.smet_layout.block_indices = torch.tensor([[0, 0], [1, 1], [1, 0]])
            self.values[1] = 0.0
            self.weight.smet_mask_layout.mask = torch.tensor([[False, True], [False, True]])
            self.weight[:2, :2] = 0.0
            self.weight[:2, 2:] = 0.0

    def step(self, regrown: float, surviving: float):
        """An optimizer step adding ``regrown`` to every regrown weight and ``surviving`` to every surviving one."""
        with torch.no_grad():
            self.values[1] += regrown
            self.values[0] += surviving
            self.values[2] += surviving
            self.weight[:2, 2:] += regrown
            self.weight[2:, 2:] += surviving


def probed(window: int, losses: list[float]) -> tuple[TwoSparseLayers, UpdateProbe]:
    model, losses = TwoSparseLayers(), iter(losses)
    return model, UpdateProbe(model, lambda: next(losses), window)


def test_the_probe_sizes_each_step_of_the_regrown_and_the_surviving_weights_against_the_step_before():
    """8 regrown weights (a compact slot whose block row changed, a masked block grown), 12 surviving ones; the
    second step is measured from the weights after the first. A slot counted regrown only when both its block row
    and column changed, a pruned masked block counted regrown or active, a second step measured from the weights at
    the update, or the ratio turned upside down, went unnoticed by the trainer's tests (they check the first step's
    regrown size)."""
    model, probe = probed(window=2, losses=[2.0, 2.5, 3.0, 2.7])
    probe.before_update()
    model.update_topology()
    assert probe.after_update(10) == []
    model.step(regrown=0.3, surviving=0.1)
    assert probe.after_step() == []
    model.step(regrown=0.2, surviving=0.4)
    (record,) = probe.after_step()
    first, second = record["step_sizes"]
    assert first == pytest.approx({
        "step": 1, "regrown_update_rms": 0.3, "regrown_relative_update": None, "surviving_update_rms": 0.1,
        "surviving_relative_update": 0.1, "regrown_vs_surviving": 3.0})
    assert second == pytest.approx({
        "step": 2, "regrown_update_rms": 0.2, "regrown_relative_update": 0.2 / 0.3, "surviving_update_rms": 0.4,
        "surviving_relative_update": 0.4 / 1.1, "regrown_vs_surviving": 0.5})
    assert record == {**record, "type": "update_probe", "update_step": 10, "window": 2, "complete": True,
                      "probe_losses": [3.0, 2.7]}
    assert record["prune_damage"] == pytest.approx(0.5) and record["cold_start_rise"] == pytest.approx(0.5)


def test_a_window_cut_short_by_the_next_update_is_a_complete_record_and_one_cut_by_the_end_of_the_run_is_not():
    """A resume drops the records up to its step that are not complete and measures again only the window open at
    its checkpoint: the record of a window closed by the next update must be written complete, or a resume lost it."""
    model, probe = probed(window=3, losses=[2.0, 2.5, 2.6, 2.4, 2.2, 2.3])
    probe.before_update()
    model.update_topology()
    probe.after_update(10)
    model.step(regrown=0.3, surviving=0.1)
    probe.after_step()
    probe.before_update()
    (cut_short,) = probe.after_update(11)
    assert (cut_short["update_step"], cut_short["complete"], cut_short["probe_losses"]) == (10, True, [2.6])
    model.step(regrown=0.1, surviving=0.1)
    probe.after_step()
    (at_end,) = probe.finish()
    assert (at_end["update_step"], at_end["complete"], at_end["probe_losses"]) == (11, False, [2.3])
    assert at_end["prune_damage"] == pytest.approx(2.2 - 2.4) and at_end["cold_start_rise"] == pytest.approx(0.1)
    assert probe.finish() == []


@pytest.mark.parametrize("window", [0, -1, True, 2.0])
def test_a_window_that_is_not_a_positive_int_is_refused(window):
    with pytest.raises(ValueError, match=f"window must be a positive int, got {window!r}"):
        UpdateProbe(TwoSparseLayers(), lambda: 0.0, window)


def test_a_resume_that_changes_the_held_out_batch_of_an_open_probe_window_leaves_that_window_out_with_a_warning(
        tmp_path):
    """The probe's batch is the first batch_size / grad_accum validation windows: another --grad-accum on resume
    measured the rest of an open window on another batch, and its cold_start_rise compared the two."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"".join(b"line %d of the probe corpus\n" % i for i in range(800)))
    options = dict(data=str(corpus), max_steps=6, update_interval=3, spike_window=3, eval_every=0, checkpoint_every=4)
    train(tiny_config(out_dir=str(tmp_path / "run"), **options))
    checkpoint = str(tmp_path / "run" / "checkpoints" / "step_0000004")  # inside the window of the update at step 3
    train(tiny_config(out_dir=str(tmp_path / "same"), resume=checkpoint, **options))
    with pytest.warns(CheckpointWarning, match="window of the update at step 3 is left out"):
        train(tiny_config(out_dir=str(tmp_path / "other"), resume=checkpoint, grad_accum=2, **options))

    def probed_updates(run):
        return {r["update_step"]: r for r in read_metrics(tmp_path / run) if r["type"] == "update_probe"}

    assert probed_updates("same")[3] == probed_updates("run")[3]
    assert sorted(probed_updates("other")) == [6]
