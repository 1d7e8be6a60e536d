"""Non-finite losses, a fault the trainer survives: a diverging run stops with one line and writes no non-finite
checkpoint, or ``--on-nonfinite skip`` drops the step (up to ``--max-consecutive-skips`` in a row) and leaves no dense
gradient of it for RigL to score; the options are validated and explained."""

import json
import math

import pytest
import torch

from fault_runs import strict_records, tiny_config
from smet_kernels.train import cli, loop
from smet_kernels.train.trainer import ConfigError, TrainingDiverged, train
from test_train_trainer import cache_dir, one_thread  # noqa: F401 -- autouse: shared token cache, one thread


def non_finite_on(monkeypatch, name: str, bad_calls, factor: float) -> list:
    """Multiply what the loop's ``name`` returns by ``factor`` (NaN, inf) on the given (1-based) calls; returns the
    list of the calls so far (clear it to count from 1 again)."""
    real, calls = getattr(loop, name), []

    def poisoned(*args):
        calls.append(1)
        value = real(*args)
        return value * factor if len(calls) in bad_calls else value

    monkeypatch.setattr(loop, name, poisoned)
    return calls


def nan_losses_on(monkeypatch, bad_calls):
    """Make the training loss NaN on the given (1-based) calls of ``lm_loss`` in the loop."""
    non_finite_on(monkeypatch, "lm_loss", bad_calls, float("nan"))


def test_a_diverging_run_stops_with_one_line_and_writes_no_nonfinite_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--config", "tiny", "--lr", "50", "--grad-clip", "0", "--checkpoint-every", "2", "--batch-size",
                  "4", "--seq-len", "64", "--max-steps", "40", "--eval-every", "0", "--backend", "reference",
                  "--no-progress", "--out-dir", str(out)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("smet-train: error: non-finite ") and " at step " in err[-1], err
    assert "lower --lr, enable --grad-clip, or pass --on-nonfinite 'skip'" in err[-1]
    assert not any("Traceback" in line for line in err)
    records = strict_records(out / "metrics.jsonl")
    stop = records[-1]
    assert stop["type"] == "nonfinite" and stop["action"] == "stop"
    assert f"at step {stop['step']} " in err[-1]
    assert stop["loss"] is None or stop["grad_norm"] is None  # NaN/Inf written as null
    assert all(r["step"] < stop["step"] for r in records[:-1])
    assert not (out / "summary.json").exists()  # a summary marks a finished run
    for checkpoint in (out / "checkpoints").glob("step_*"):
        state = torch.load(checkpoint / "state.pt", weights_only=False)
        assert int(checkpoint.name[5:]) < stop["step"]
        assert all(torch.isfinite(v).all() for v in state["model"].values()
                   if isinstance(v, torch.Tensor) and torch.is_floating_point(v))


def test_skip_drops_nonfinite_steps_and_counts_them(tmp_path, monkeypatch):
    nan_losses_on(monkeypatch, {3})
    summary = train(tiny_config(on_nonfinite="skip", out_dir=str(tmp_path)))
    assert summary["steps"] == 6 and summary["nonfinite_skips"] == 1
    records = strict_records(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3, 4, 5, 6]
    skipped = [r for r in records if r["type"] == "nonfinite"]
    assert skipped == [{"type": "nonfinite", "step": 3, "loss": None, "grad_norm": None, "action": "skip",
                        "consecutive_skips": 1}]
    assert all(math.isfinite(r["loss"]) for r in records if r["type"] == "train")
    assert json.loads((tmp_path / "summary.json").read_text())["nonfinite_skips"] == 1


def test_skip_stops_after_the_allowed_skips_in_a_row(tmp_path, monkeypatch):
    nan_losses_on(monkeypatch, set(range(3, 100)))
    with pytest.raises(TrainingDiverged, match=r"non-finite loss at step 3 .*2 step\(s\) in a row already skipped "
                       r"\(max_consecutive_skips 2\)"):  # a Python caller: the field, not the option
        train(tiny_config(on_nonfinite="skip", max_consecutive_skips=2, checkpoint_every=1, out_dir=str(tmp_path)))
    records = strict_records(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["action"]) for r in records if r["type"] == "nonfinite"] == [(3, "skip"), (3, "skip"),
                                                                                          (3, "stop")]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000001", "step_0000002"]


def test_skips_apart_do_not_add_up_to_the_consecutive_limit(tmp_path, monkeypatch):
    """A good step resets the count of skips in a row: one skip allowed in a row, three skips apart all pass."""
    nan_losses_on(monkeypatch, {2, 4, 6})  # the attempts at steps 2, 3 and 4 (each bad attempt is retried)
    summary = train(tiny_config(on_nonfinite="skip", max_consecutive_skips=1, out_dir=str(tmp_path)))
    assert summary["steps"] == 6 and summary["nonfinite_skips"] == 3
    skipped = [r for r in strict_records(tmp_path / "metrics.jsonl") if r["type"] == "nonfinite"]
    assert [(r["step"], r["action"], r["consecutive_skips"]) for r in skipped] == [(2, "skip", 1), (3, "skip", 1),
                                                                                     (4, "skip", 1)]


def test_a_resumed_run_counts_the_steps_skipped_before_its_checkpoint(tmp_path, monkeypatch):
    nan_losses_on(monkeypatch, {3})
    summary = train(tiny_config(on_nonfinite="skip", max_steps=4, checkpoint_every=4, out_dir=str(tmp_path)))
    assert summary["nonfinite_skips"] == 1
    monkeypatch.undo()
    assert cli.main(["--resume", str(tmp_path), "--max-steps", "6", "--no-progress"]) == 0
    assert json.loads((tmp_path / "summary.json").read_text())["nonfinite_skips"] == 1


def test_a_checkpoint_of_nonfinite_parameters_is_refused(tmp_path):
    run = loop.Run(tiny_config(out_dir=str(tmp_path)))
    try:
        with torch.no_grad():
            next(run.model.parameters())[0, 0] = float("inf")
        with pytest.raises(TrainingDiverged, match="non-finite parameters at step 0"):
            run.save_checkpoint()
    finally:
        run.metrics.close()
    assert not (tmp_path / "checkpoints").exists()


def test_the_nonfinite_options_are_validated_and_explained():
    with pytest.raises(ConfigError, match="on_nonfinite"):
        tiny_config(on_nonfinite="ignore").validate()
    with pytest.raises(ConfigError, match="max_consecutive_skips"):
        tiny_config(max_consecutive_skips=0).validate()
    help_text = " ".join(cli.build_parser().format_help().split())
    assert "--on-nonfinite {stop,skip}" in help_text and "(default: stop)" in help_text
    assert "--max-consecutive-skips" in help_text and "(default: 5)" in help_text


def test_a_skipped_step_leaves_no_dense_gradient_for_rigl_to_score(tmp_path, monkeypatch):
    nan_losses_on(monkeypatch, {1})
    run = loop.Run(tiny_config(optimizer="smet", regrow="gradient", update_interval=1, on_nonfinite="skip",
                               out_dir=str(tmp_path)))
    try:
        assert run.controller.needs_dense_grad()
        loss, _ = run.train_step()
        assert not math.isfinite(loss) and run.step == 0
        assert all(target.dense_grad is None for target in run.controller.targets)
        run.train_step()  # the retried step records its own dense gradients
        assert all(torch.isfinite(target.dense_grad).all() for target in run.controller.targets)
    finally:
        run.metrics.close()


def infinite_grad_norm_on(monkeypatch, bad_calls) -> list:
    """Make the gradient norm the loop measures infinite on the given (1-based) calls, the loss kept finite; returns
    the list of the calls so far (clear it to count from 1 again)."""
    return non_finite_on(monkeypatch, "clip_grad_norm", bad_calls, float("inf"))


def test_a_finite_loss_with_an_infinite_gradient_norm_is_skipped_and_named_a_grad_norm_fault(tmp_path, monkeypatch):
    calls = infinite_grad_norm_on(monkeypatch, {2})
    summary = train(tiny_config(on_nonfinite="skip", max_steps=3, out_dir=str(tmp_path)))
    assert summary["steps"] == 3 and summary["nonfinite_skips"] == 1
    records = strict_records(tmp_path / "metrics.jsonl")
    (skipped,) = [r for r in records if r["type"] == "nonfinite"]
    assert (skipped["step"], skipped["grad_norm"], skipped["action"]) == (2, None, "skip")
    assert math.isfinite(skipped["loss"]) and [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3]
    calls.clear()
    with pytest.raises(TrainingDiverged, match=r"^non-finite grad norm at step 2 \(loss=\d"):
        train(tiny_config(max_steps=3, out_dir=str(tmp_path / "stop")))
