"""Checkpoints and resumes, faults the trainer survives: checkpoints verified against their manifest on resume (a
corrupt newest one is passed over, each file hashed once), checkpoints of earlier releases, data changed under a
resume, a checkpoint that cannot be written, runs refused into the folder of another run, and a run stopped between
its final checkpoint and summary.json (the folders on disk: test_checkpoint_files.py)."""

import dataclasses
import json
import math
import random
import shutil
import types
import warnings

import numpy as np
import pytest
import torch

from fault_runs import one_line_error, strict_records, tiny_config
from smet_kernels.train import checkpoint, cli, loop
from smet_kernels.train.checkpoint import (
    CheckpointWarning,
    find_checkpoint,
    load_checkpoint_config,
    verify_checkpoint,
)
from smet_kernels.train.resume import continues_in_place, logged_loss
from smet_kernels.train.trainer import ConfigError, TrainConfig, train
from test_train_trainer import cache_dir, one_thread  # noqa: F401 -- autouse: shared token cache, one thread


def written_checkpoints(out_dir, *steps):
    """``out_dir/checkpoints`` after writing a tiny checkpoint (state ``{"step": step}``) of each of ``steps``."""
    for step in steps:
        checkpoint.write_checkpoint(out_dir, step, {"step": step}, TrainConfig())
    return out_dir / "checkpoints"


def test_resume_passes_over_a_corrupt_newest_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_config(max_steps=6, checkpoint_every=2, out_dir=str(out)))
    checkpoints = out / "checkpoints"
    assert {p.name for p in checkpoints.iterdir()} == {"step_0000002", "step_0000004", "step_0000006"}
    assert all(verify_checkpoint(p) is None for p in checkpoints.iterdir())
    manifest = json.loads((checkpoints / "step_0000006" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"state.pt", "config.json"}
    # the newest is truncated, the next one has a flipped byte: resume falls back to step 2
    state = checkpoints / "step_0000006" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    state = checkpoints / "step_0000004" / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    assert "has" in verify_checkpoint(checkpoints / "step_0000006")
    assert "sha256 of state.pt" in verify_checkpoint(checkpoints / "step_0000004")
    with pytest.warns(CheckpointWarning) as caught:
        assert find_checkpoint(out).name == "step_0000002"
    assert ["step_0000006" in str(w.message) for w in caught] == [True, False]
    assert [str(w.message).rsplit("; ", 1)[1] for w in caught] == ["trying step_0000004", "trying step_0000002"]
    resumed = tmp_path / "resumed"
    assert cli.main(["--resume", str(out), "--out-dir", str(resumed), "--no-progress"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert any(line.startswith("smet-train: warning: checkpoint") and "step_0000006" in line for line in err), err
    assert any("step_0000004" in line and "sha256" in line for line in err), err
    assert not any("Traceback" in line for line in err)
    steps = [r["step"] for r in strict_records(resumed / "metrics.jsonl") if r["type"] == "train"]
    assert steps == [3, 4, 5, 6]


def test_a_resume_hashes_each_checkpoint_file_once_and_a_rewritten_file_again(tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(tiny_config(max_steps=2, checkpoint_every=2, out_dir=str(out)))
    real_sha256, hashed = checkpoint.hashlib.sha256, []

    class CountingSha256:
        def __init__(self):
            self.digest = real_sha256()
            hashed.append(self)

        def update(self, chunk):
            self.digest.update(chunk)

        def hexdigest(self):
            return self.digest.hexdigest()

    monkeypatch.setattr(checkpoint, "hashlib", types.SimpleNamespace(sha256=CountingSha256))
    assert cli.main(["--resume", str(out), "--max-steps", "3", "--no-progress"]) == 0  # config read, then load
    assert len(hashed) == 2 + 2  # state.pt and config.json of step 2; then those of the new step-3 checkpoint
    state = out / "checkpoints" / "step_0000002" / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    assert "sha256 of state.pt" in verify_checkpoint(state.parent)


def test_a_checkpoint_of_an_earlier_release_without_manifest_resumes_when_its_archive_is_intact(tmp_path):
    out = tmp_path / "run"
    train(tiny_config(max_steps=2, checkpoint_every=2, out_dir=str(out)))
    checkpoint = out / "checkpoints" / "step_0000002"
    (checkpoint / "manifest.json").unlink()
    assert verify_checkpoint(checkpoint) is None
    assert cli.main(["--resume", str(out), "--max-steps", "4", "--no-progress"]) == 0
    state = checkpoint / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    assert "manifest.json missing" in verify_checkpoint(checkpoint)


def test_a_checkpoint_without_manifest_is_unusable_when_its_config_json_does_not_parse(tmp_path):
    folder = written_checkpoints(tmp_path, 1) / "step_0000001"
    (folder / "manifest.json").unlink()
    assert verify_checkpoint(folder) is None
    (folder / "config.json").write_text("{cut")
    assert verify_checkpoint(folder) == "manifest.json missing and config.json unreadable (JSONDecodeError)"


def test_a_manifest_that_is_no_json_object_makes_its_checkpoint_unusable(tmp_path):
    folder = written_checkpoints(tmp_path, 1) / "step_0000001"
    (folder / "manifest.json").write_text("[]")
    assert verify_checkpoint(folder) == "manifest.json missing or unreadable (TypeError)"


def test_the_fixed_settings_check_passes_over_checkpoints_whose_config_json_does_not_parse_or_is_no_object(tmp_path):
    root = written_checkpoints(tmp_path, 1, 2, 3)
    (root / "step_0000003" / "config.json").write_text("[]")
    (root / "step_0000002" / "config.json").write_text("{cut")
    checkpoint.refuse_fixed_changes(tmp_path, {"seq_len": TrainConfig().seq_len})
    with pytest.raises(ConfigError, match=f"^cannot change seq_len when resuming {str(root / 'step_0000001')!r}"):
        checkpoint.refuse_fixed_changes(tmp_path, {"seq_len": TrainConfig().seq_len + 1})


def test_a_run_checkpointed_without_the_update_probe_resumes_with_it(tmp_path):
    options = dict(optimizer="smet", update_interval=2, eval_every=2, eval_batches=2, checkpoint_every=2,
                   out_dir=str(tmp_path))
    train(tiny_config(max_steps=2, update_probe=False, **options))
    assert train(tiny_config(max_steps=4, resume=str(tmp_path), **options))["steps"] == 4


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP in one process, as intended
def test_a_sharded_checkpoint_whose_optimizer_holds_another_number_of_parameters_is_refused(tmp_path):
    import torch.distributed.checkpoint as dcp

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dcp.save({f"model.{key}": value for key, value in model.state_dict().items()}, checkpoint_id=tmp_path / "sharded")
    state = {"optimizer": {"param_groups": [{"params": [0]}], "state": {}}}
    with pytest.raises(ConfigError, match="^checkpoint optimizer has 1 parameters, this model 2$"):
        checkpoint.load_sharded(tmp_path, state, model, optimizer)


def test_a_fresh_run_over_checkpoints_that_all_fail_verification_starts_without_a_warning(tmp_path):
    for folder in written_checkpoints(tmp_path, 1, 2).iterdir():
        (folder / "state.pt").write_bytes(b"cut short")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checkpoint.check_fresh_out_dir(tmp_path)


def test_an_out_dir_holding_a_file_where_the_checkpoints_folder_goes_is_refused(tmp_path):
    checkpoint.check_checkpoint_folder(tmp_path)
    (tmp_path / "checkpoints").write_text("")
    with pytest.raises(ConfigError, match="holds a file 'checkpoints' where checkpoints are written"):
        checkpoint.check_checkpoint_folder(tmp_path)


def test_a_smet_checkpoint_of_an_earlier_release_resumes_with_its_warmup_scope(tmp_path):
    """Saved before warm-up scopes existed: no ``warmup_scope`` in config.json nor in the optimizer's groups; such
    a run warmed up its sparse values only, and resumes so."""
    out = tmp_path / "run"
    train(tiny_config(optimizer="smet", max_steps=2, checkpoint_every=2, out_dir=str(out)))
    checkpoint = out / "checkpoints" / "step_0000002"
    config = json.loads((checkpoint / "config.json").read_text())
    del config["warmup_scope"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    state = torch.load(checkpoint / "state.pt", weights_only=False)
    for group in state["optimizer"]["param_groups"]:
        del group["warmup_scope"]
    torch.save(state, checkpoint / "state.pt")
    (checkpoint / "manifest.json").unlink()  # an earlier release wrote none
    assert load_checkpoint_config(out).warmup_scope == "regrown"
    run = loop.Run(dataclasses.replace(load_checkpoint_config(out), max_steps=4, out_dir=str(tmp_path / "resumed")))
    try:
        assert run.step == 2
        assert {group["warmup_scope"] for group in run.optimizer.param_groups} == {"regrown"}
        run.train_step()
    finally:
        run.metrics.close()


def test_resume_without_a_good_checkpoint_is_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_config(max_steps=2, checkpoint_every=2, out_dir=str(out)))
    (out / "checkpoints" / "step_0000002" / "manifest.json").unlink()
    state = out / "checkpoints" / "step_0000002" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    for target in (out, out / "checkpoints" / "step_0000002"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["--resume", str(target), "--max-steps", "4", "--no-progress"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("smet-train: error: ") and "manifest.json missing" in " ".join(err), err
        assert not any("Traceback" in line for line in err)


def test_a_resume_of_a_folder_that_holds_no_run_is_a_one_line_error_naming_the_option(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a run")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--resume", str(tmp_path), "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("smet-train: error: --resume: no checkpoint found in "), err


def test_a_resume_on_data_whose_tokens_changed_is_a_one_line_error(tmp_path, capsys):
    """An edited text file would silently give other batches, a token file with a new vocabulary a shape traceback."""
    text, tokens = tmp_path / "corpus.txt", tmp_path / "tokens.bin"
    text.write_bytes(b"hello world " * 500)
    (torch.arange(6000) % 300).to(torch.int16).numpy().tofile(tokens)
    for data, edit in ((text, lambda: text.write_bytes(b"hello there " * 500)),
                       (tokens, lambda: (torch.arange(6000) % 400).to(torch.int16).numpy().tofile(tokens))):
        out = tmp_path / f"run-{data.suffix[1:]}"
        train(tiny_config(max_steps=1, checkpoint_every=1, data=str(data), out_dir=str(out)))
        edit()
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["--resume", str(out), "--max-steps", "2", "--no-progress"])
        assert exit_info.value.code == 2
        *warned, err = capsys.readouterr().err.strip().splitlines()  # warned: its few evaluation windows repeat
        assert all(line.startswith("smet-train: warning: ") for line in warned), warned
        assert err.startswith(f"smet-train: error: --data {str(data)!r} is not the data that"), err


def test_a_resume_may_name_its_data_by_another_path_and_continues_exactly(tmp_path, monkeypatch):
    """A relative --data path saved by a run started in another folder: given again from here, not refused."""
    (tmp_path / "corpus.txt").write_bytes(b"hello world, hello data " * 300)
    monkeypatch.chdir(tmp_path)
    train(tiny_config(max_steps=2, checkpoint_every=1, data="corpus.txt", out_dir=str(tmp_path / "full")))
    monkeypatch.chdir(tmp_path / "full")
    assert cli.main(["--resume", str(tmp_path / "full" / "checkpoints" / "step_0000001"), "--data",
                     str(tmp_path / "corpus.txt"), "--out-dir", str(tmp_path / "resumed"), "--no-progress"]) == 0
    losses = [[r["loss"] for r in strict_records(tmp_path / run / "metrics.jsonl") if r["type"] == "train"][-1]
              for run in ("full", "resumed")]
    assert losses[0] == losses[1]


def test_a_checkpoint_that_cannot_be_written_stops_the_run_with_one_line(tmp_path, monkeypatch, capsys):
    """A full disk at a checkpoint write (state.pt written to /dev/full): the run failed with a traceback of the
    RuntimeError that torch.save raises there (not an OSError), and left its partial folder on the full disk."""
    from full_disk_worker import save_on_a_full_disk

    monkeypatch.setattr(checkpoint.torch, "save", save_on_a_full_disk)
    reason = one_line_error(capsys, ["--config", "tiny", "--batch-size", "4", "--seq-len", "32", "--max-steps", "2",
                                     "--update-interval", "2", "--checkpoint-every", "2", "--eval-every", "0",
                                     "--backend", "reference",
                                     "--no-progress", "--out-dir", str(tmp_path / "run")], 1)
    assert reason.startswith("could not write checkpoint step_0000002: ") and reason.split(": ", 1)[1], reason
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []  # its partial folder left on the full disk


def test_a_fresh_run_into_a_folder_with_a_good_checkpoint_is_refused_before_anything_is_written(tmp_path, capsys):
    """A fresh run into the out-dir of another run wrote over its metrics.jsonl beside its checkpoints, and a later
    ``--resume`` continued the other run from its newest checkpoint, mixing both runs' steps in one metrics.jsonl."""
    out = tmp_path / "run"
    train(tiny_config(max_steps=6, checkpoint_every=2, out_dir=str(out)))
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--config", "tiny", "--optimizer", "smet", "--batch-size", "4", "--seq-len", "32", "--max-steps", "3",
                  "--eval-every", "0", "--backend", "reference", "--device", "cpu", "--out-dir", str(out),
                  "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"smet-train: error: --out-dir {str(out)!r} holds the checkpoints of another run (latest: "
                       f"step 6): pass --resume {out} to continue that run, or an empty or other --out-dir to start "
                       "a new one")
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before
    # checkpoints that all fail verification are no run to continue (the stability sweep starts afresh over them)
    for folder in (out / "checkpoints").iterdir():
        (folder / "state.pt").write_bytes(b"cut short")
    summary = train(tiny_config(optimizer="smet", max_steps=3, out_dir=str(out)))
    assert summary["steps"] == 3 and summary["config"]["optimizer"] == "smet"


def test_a_resume_into_the_folder_of_another_run_is_refused_but_into_its_own_or_a_free_one_goes_on(tmp_path):
    """``--resume A --out-dir B`` with B holding another run's checkpoints mixed the two runs in B (its metrics.jsonl
    rewritten, a later ``--resume B`` free to continue either)."""
    first, second = tmp_path / "first", tmp_path / "second"
    for out in (first, second):
        train(tiny_config(max_steps=2, checkpoint_every=2, eval_every=0, out_dir=str(out)))
    checkpoint = first / "checkpoints" / "step_0000002"
    with pytest.raises(ConfigError, match=f"^out_dir {str(second)!r} holds the checkpoints of another run"):
        train(tiny_config(max_steps=3, eval_every=0, resume=str(checkpoint), out_dir=str(second)))
    assert not (second / "checkpoints" / "step_0000003").exists()
    for out in (first, tmp_path / "free"):  # its own folder (by its step folder or by itself), a free one
        summary = train(tiny_config(max_steps=3, eval_every=0, resume=str(checkpoint), out_dir=str(out)))
        assert summary["steps"] == 3
    assert train(tiny_config(max_steps=4, eval_every=0, resume=str(first), out_dir=str(first)))["steps"] == 4


def test_a_resume_into_a_folder_holding_another_runs_metrics_but_no_checkpoint_starts_its_metrics_anew(tmp_path):
    """``--resume A --out-dir B`` with B holding the metrics.jsonl of a run without checkpoints kept B's records up to
    A's checkpoint step and appended A's continuation to them: one file, two runs' losses, silently."""
    first, second = tmp_path / "first", tmp_path / "second"
    train(tiny_config(max_steps=2, checkpoint_every=2, eval_every=0, out_dir=str(first)))
    train(tiny_config(max_steps=3, checkpoint_every=0, eval_every=0, seed=1, out_dir=str(second)))
    train(tiny_config(max_steps=3, eval_every=0, resume=str(first), out_dir=str(second)))
    assert [r["step"] for r in strict_records(second / "metrics.jsonl") if r["type"] == "train"] == [3]
    in_place = [r for r in strict_records(first / "metrics.jsonl") if r["type"] == "train"]
    train(tiny_config(max_steps=3, eval_every=0, resume=str(first), out_dir=str(first)))  # its own folder: kept
    assert [r["step"] for r in strict_records(first / "metrics.jsonl") if r["type"] == "train"] == [1, 2, 3]
    assert in_place == [r for r in strict_records(first / "metrics.jsonl") if r["type"] == "train"][:2]


def test_a_resume_may_name_the_checkpoints_folder_of_its_run_and_continues_the_run_in_place(tmp_path, capsys):
    """``--resume RUN/checkpoints`` was refused with "no checkpoint found in 'RUN/checkpoints'", the folder that holds
    them all; it now resumes the newest, in its run's folder (by the command line, and for a Python caller)."""
    out = tmp_path / "run"
    train(tiny_config(max_steps=2, checkpoint_every=1, out_dir=str(out)))
    assert find_checkpoint(out / "checkpoints") == out / "checkpoints" / "step_0000002"
    assert cli.main(["--resume", str(out / "checkpoints"), "--max-steps", "3", "--no-progress"]) == 0
    assert continues_in_place(TrainConfig(resume=str(out / "checkpoints"), out_dir=str(out)))
    assert train(tiny_config(max_steps=4, resume=str(out / "checkpoints"), out_dir=str(out)))["steps"] == 4
    assert [r["step"] for r in strict_records(out / "metrics.jsonl") if r["type"] == "train"] == [1, 2, 3, 4]


def test_a_resume_in_place_from_an_earlier_checkpoint_sets_the_later_ones_aside_so_the_next_resume_continues_it(
        tmp_path):
    """Rewound to step 2 of a 6-step run and ended at 3, a later ``--resume RUN`` continued the abandoned course at
    step 6 (its metrics: steps 1-3, then 7 on): the later checkpoints are moved aside, kept, with a warning."""
    out = tmp_path / "run"
    train(tiny_config(max_steps=6, checkpoint_every=2, out_dir=str(out)))
    checkpoints = out / "checkpoints"
    summary = (out / "summary.json").read_text()
    with pytest.warns(CheckpointWarning, match=r"^resumed at step 2: step_0000004, step_0000006, summary.json \(past "
                                               r"it: the course it leaves, or unusable\) moved to '.*superseded-"
                                               r"0000002-1', so that a later --resume continues this course$"):
        train(tiny_config(max_steps=3, checkpoint_every=2, resume=str(checkpoints / "step_0000002"), out_dir=str(out)))
    assert {p.name for p in checkpoints.iterdir()} == {"step_0000002", "step_0000003", "superseded-0000002-1"}
    aside = checkpoints / "superseded-0000002-1"
    assert {p.name for p in aside.iterdir()} == {"step_0000004", "step_0000006", "summary.json"}
    assert (aside / "summary.json").read_text() == summary
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(tiny_config(max_steps=4, checkpoint_every=2, resume=str(out), out_dir=str(out)))
    assert [r["step"] for r in strict_records(out / "metrics.jsonl") if r["type"] == "train"] == [1, 2, 3, 4]


def test_a_resume_without_an_out_dir_continues_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    train(tiny_config(max_steps=2, checkpoint_every=2, out_dir=str(out)))
    before = sorted(out.rglob("*"))
    assert train(tiny_config(max_steps=3, resume=str(out), out_dir=None))["steps"] == 3
    assert sorted(out.rglob("*")) == before


def test_a_resume_from_a_checkpoint_outside_any_run_folder_is_refused_into_another_runs_folder(tmp_path):
    """A step folder copied out of its run (no checkpoints/ around it) resumed with ``--out-dir B`` went on in B even
    when B held another run's checkpoints, mixing both there; into the folder saved in it, or a free one, it goes on."""
    import shutil

    first, second = tmp_path / "first", tmp_path / "second"
    for out in (first, second):
        train(tiny_config(max_steps=2, checkpoint_every=2, eval_every=0, out_dir=str(out)))
    standalone = tmp_path / "kept" / "step_0000002"
    shutil.copytree(first / "checkpoints" / "step_0000002", standalone)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--resume", str(standalone), "--out-dir", str(second), "--max-steps", "3", "--no-progress"])
    assert exit_info.value.code == 2
    assert sorted(path.name for path in (second / "checkpoints").iterdir()) == ["step_0000002"]
    for options in ([], ["--out-dir", str(tmp_path / "free")]):  # its saved out-dir (its own run's), a free one
        assert cli.main(["--resume", str(standalone), "--max-steps", "3", "--no-progress", *options]) == 0
    assert (first / "checkpoints" / "step_0000003").is_dir() and (tmp_path / "free" / "summary.json").is_file()


def test_a_resume_continues_in_place_in_its_own_folder_by_any_path_or_in_the_out_dir_a_standalone_checkpoint_saved(
        tmp_path, monkeypatch):
    """Relative and absolute paths to one folder are one folder; a standalone step folder (no checkpoints/ around it)
    continues in place only in the ``out_dir`` its config.json saved, none when it saved none or no object."""
    monkeypatch.chdir(tmp_path)
    step = tmp_path / "run" / "checkpoints" / "step_0000002"
    step.mkdir(parents=True)

    def in_place(resume, out_dir="run"):
        return continues_in_place(TrainConfig(resume=str(resume), out_dir=out_dir))

    assert in_place(step) and in_place(tmp_path / "run", "./run") and not in_place(step, "other")
    standalone = tmp_path / "kept"
    standalone.mkdir()
    for saved, expected in (({"out_dir": str(tmp_path / "run")}, True), ({"out_dir": ""}, False), ({}, False),
                            ([], False)):
        (standalone / "config.json").write_text(json.dumps(saved))
        assert in_place(standalone) is expected, saved


def test_a_run_stopped_between_its_final_checkpoint_and_summary_json_is_finished_by_a_resume(tmp_path, capsys):
    """A kill after the final checkpoint left no summary.json, and every resume refused with "already reached step 6":
    the run could never get its summary (the stability sweep retried it forever). The resume now finishes it."""
    out = tmp_path / "run"
    config = tiny_config(optimizer="smet", update_interval=2, spike_window=3, eval_every=3, eval_batches=2,
                         checkpoint_every=3, out_dir=str(out))
    uninterrupted = json.loads(json.dumps(train(config)))
    records = (out / "metrics.jsonl").read_text()
    (out / "summary.json").unlink()  # as a run stopped right after writing its final checkpoint leaves it
    assert cli.main(["--resume", str(out), "--no-progress"]) == 0
    finished = json.loads((out / "summary.json").read_text())
    timing = ("steady_tokens_per_s", "peak_mem_bytes")  # no step taken here; another process's peak
    assert finished["config"].pop("resume") == str(out / "checkpoints" / "step_0000006")
    assert uninterrupted["config"].pop("resume") is None
    assert {k: v for k, v in finished.items() if k not in timing} == {
        k: v for k, v in uninterrupted.items() if k not in timing}
    assert finished["final_val_loss"] is not None and finished["final_train_loss"] is not None
    assert finished["loss_spikes"]["count"] > 0
    assert (out / "metrics.jsonl").read_text() == records
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # a finished run (summary.json there) is still refused
        cli.main(["--resume", str(out), "--no-progress"])
    assert exit_info.value.code == 2 and "already reached step 6" in capsys.readouterr().err


def save_as_an_older_release(monkeypatch, section: str, key: str) -> None:
    """Make the trainer's checkpoints lack ``state[section][key]``, as those of a release before that key."""
    saved_state = loop.Run._state

    def older_release(self, *args):
        state = saved_state(self, *args)
        del state[section][key]
        return state

    monkeypatch.setattr(loop.Run, "_state", older_release)


def test_finishing_a_run_whose_final_checkpoint_lacks_the_last_loss_takes_it_from_metrics_jsonl(tmp_path, monkeypatch):
    """Checkpoints of older releases hold no ``last_loss``: a run they stopped before summary.json was finished with
    ``final_train_loss`` null, though metrics.jsonl logs the final step's loss."""
    out = tmp_path / "run"
    save_as_an_older_release(monkeypatch, "progress", "last_loss")
    uninterrupted = train(tiny_config(max_steps=4, checkpoint_every=2, out_dir=str(out)))
    monkeypatch.undo()
    (out / "summary.json").unlink()
    assert cli.main(["--resume", str(out), "--no-progress"]) == 0
    final_train_loss = json.loads((out / "summary.json").read_text())["final_train_loss"]
    assert final_train_loss is not None and final_train_loss == uninterrupted["final_train_loss"]


def test_a_final_checkpoint_copied_out_of_its_run_finishes_in_another_folder_with_the_loss_it_saved(tmp_path):
    """No metrics.jsonl beside a copied step folder: the final training loss is the one its state saved."""
    uninterrupted = train(tiny_config(max_steps=2, checkpoint_every=2, out_dir=str(tmp_path / "run")))
    standalone = tmp_path / "kept" / "step_0000002"
    shutil.copytree(tmp_path / "run" / "checkpoints" / "step_0000002", standalone)
    assert cli.main(["--resume", str(standalone), "--out-dir", str(tmp_path / "free"), "--no-progress"]) == 0
    finished = json.loads((tmp_path / "free" / "summary.json").read_text())
    assert finished["final_train_loss"] == uninterrupted["final_train_loss"]


def test_the_logged_loss_of_a_step_is_read_from_the_metrics_of_its_checkpoints_run_folder_only(tmp_path):
    records = [{"type": "nonfinite", "step": 2, "loss": None}, {"type": "train", "step": 2, "loss": 1.5}]
    for folder in (tmp_path, tmp_path / "run"):
        folder.mkdir(exist_ok=True)
        (folder / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    assert logged_loss(tmp_path / "run" / "checkpoints" / "step_0000002", 2) == 1.5
    assert math.isnan(logged_loss(tmp_path / "run" / "checkpoints" / "step_0000003", 3))
    assert math.isnan(logged_loss(tmp_path / "kept" / "step_0000002", 2))  # no run folder around it


def test_the_saved_rng_states_put_back_the_torch_python_and_numpy_generators():
    saved = checkpoint.rng_state(torch.device("cpu"))
    drawn = torch.rand(3), random.random(), np.random.rand(3)
    checkpoint.set_rng_state(saved, torch.device("cpu"))
    again = torch.rand(3), random.random(), np.random.rand(3)
    assert torch.equal(drawn[0], again[0]) and drawn[1] == again[1] and np.array_equal(drawn[2], again[2])


def test_a_resume_puts_back_the_global_rng_states_a_run_had_drawn_from(tmp_path, monkeypatch):
    real_loss = loop.lm_loss
    monkeypatch.setattr(loop, "lm_loss", lambda logits, targets: real_loss(logits, targets) + 0 * torch.rand(()))
    train(tiny_config(max_steps=2, checkpoint_every=2, out_dir=str(tmp_path)))
    monkeypatch.undo()
    folder = tmp_path / "checkpoints" / "step_0000002"
    saved = torch.load(folder / "state.pt", weights_only=False)["rng"]
    run = loop.Run(tiny_config(max_steps=3, resume=str(folder), out_dir=str(tmp_path)))
    run.metrics.close()
    assert torch.equal(torch.get_rng_state(), saved["torch"])


def test_a_checkpoint_of_a_release_that_saved_no_data_digest_refuses_another_data_path(tmp_path, monkeypatch):
    """Without the digest of its tokens the data is known by its path only: another one is refused."""
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_bytes(b"hello world, hello data " * 300)
    save_as_an_older_release(monkeypatch, "data", "corpus_sha256")
    out = str(tmp_path / "run")
    train(tiny_config(max_steps=1, checkpoint_every=1, data=str(tmp_path / "a.txt"), out_dir=out))
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="^cannot change data when resuming"):
        train(tiny_config(max_steps=2, data=str(tmp_path / "b.txt"), resume=out, out_dir=out))
    assert train(tiny_config(max_steps=2, data=str(tmp_path / "a.txt"), resume=out, out_dir=out))["steps"] == 2


def test_a_checkpoint_saved_before_settings_fixed_on_resume_existed_resumes_with_their_defaults(tmp_path):
    """A checkpoint of an earlier release lacks the settings fixed on resume that came later (--tokenizer, --supar,
    --galore-rank, --spike-window); they had their defaults then, and the resume compares against those instead of
    stopping with a KeyError."""
    out = tmp_path / "run"
    train(tiny_config(max_steps=2, checkpoint_every=2, out_dir=str(out)))
    saved = out / "checkpoints" / "step_0000002"
    config = json.loads((saved / "config.json").read_text())
    for name in ("tokenizer", "supar", "galore_rank", "spike_window"):
        del config[name]
    (saved / "config.json").write_text(json.dumps(config))
    (saved / "manifest.json").unlink()  # an earlier release wrote none
    assert cli.main(["--resume", str(out), "--max-steps", "3", "--no-progress"]) == 0
    assert [r["step"] for r in strict_records(out / "metrics.jsonl") if r["type"] == "train"] == [1, 2, 3]


def test_a_resume_that_changes_a_fixed_setting_is_refused_before_the_checkpoint_is_hashed(tmp_path, monkeypatch):
    """The settings check came after find_checkpoint had verified the checkpoint, hashing every file: on a large run
    (a 7b checkpoint holds ~100 GB) a mistyped option was refused only minutes later."""
    out = tmp_path / "run"
    train(tiny_config(max_steps=2, checkpoint_every=2, out_dir=str(out)))
    monkeypatch.setattr(checkpoint, "_sha256", lambda path: pytest.fail(f"{path} hashed before the settings check"))
    for resume in (out, out / "checkpoints" / "step_0000002"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["--resume", str(resume), "--seq-len", "16", "--no-progress"])
        assert exit_info.value.code == 2
        with pytest.raises(ConfigError, match=r"^cannot change seq_len when resuming .*\(saved: seq_len 32\)"):
            train(tiny_config(max_steps=4, checkpoint_every=2, out_dir=str(out), resume=str(resume), seq_len=16))


def test_a_resume_keeps_the_default_block_size_its_run_resolved_and_takes_that_size_given_explicitly(
        tmp_path, monkeypatch, capsys):
    """The default block size follows --prune-fraction, which a resume may change: a resume with another one built the
    model at another block size and died in load_state_dict with a traceback, and --block-size given as the very size
    the run trained with was refused ("saved: --block-size None"). (The tiny model resolves to 16 whatever the prune
    fraction: a rule that follows it stands in for the larger presets'.)"""
    monkeypatch.setattr(TrainConfig, "resolved_block_size",
                        lambda self: self.block_size or (32 if self.prune_fraction >= 0.1 else 16))
    out = tmp_path / "run"
    train(tiny_config(optimizer="smet", density=0.5, max_steps=2, checkpoint_every=1, out_dir=str(out)))
    step = str(out / "checkpoints" / "step_0000001")
    for name, options in (("pf", ["--prune-fraction", "0.05"]), ("bs", ["--block-size", "32"])):
        assert cli.main(["--resume", step, "--out-dir", str(tmp_path / name), "--no-progress", *options]) == 0
        assert json.loads((tmp_path / name / "summary.json").read_text())["block_size"] == 32
    capsys.readouterr()
    message = one_line_error(capsys, ["--resume", step, "--block-size", "16", "--out-dir", str(tmp_path / "other")], 2)
    assert message.startswith("cannot change --block-size") and "(saved: --block-size 32)" in message
    with pytest.raises(ConfigError, match=r"^cannot change block_size .* \(saved: block_size 32\)"):
        train(tiny_config(optimizer="smet", density=0.5, max_steps=2, prune_fraction=0.05, resume=step,
                          out_dir=str(tmp_path / "python")))


def test_a_galore_resume_given_the_rank_its_run_defaulted_to_goes_on_and_another_rank_is_refused(tmp_path, capsys):
    """--galore-rank given as the model's default rank, the one the run trained with, was refused ("saved:
    --galore-rank None") and named as a change."""
    step = tmp_path / "run" / "checkpoints" / "step_0000001"
    train(tiny_config(optimizer="galore", max_steps=1, checkpoint_every=1, out_dir=str(tmp_path / "run")))
    assert cli.main(["--resume", str(step), "--max-steps", "2", "--galore-rank", "16", "--no-progress"]) == 0
    assert "galore-rank" not in capsys.readouterr().err
    message = one_line_error(capsys, ["--resume", str(step), "--max-steps", "3", "--galore-rank", "8"], 2)
    assert message.startswith("cannot change --galore-rank") and "(saved: --galore-rank 16)" in message


def test_a_corrupt_newest_checkpoint_of_another_run_does_not_refuse_the_resume_of_the_good_one(tmp_path):
    """A fresh run may use a folder whose checkpoints all fail verification (check_fresh_out_dir), and its resume
    passes over them: the early settings check read the newest config.json alone, that of the corrupt checkpoint of
    the other run (seed 1 here), and refused the resume of this run's good checkpoint as a change of seed."""
    other, out = tmp_path / "other", tmp_path / "run"
    train(tiny_config(max_steps=2, checkpoint_every=2, out_dir=str(other), seed=1))
    stale = out / "checkpoints" / "step_0000010"
    stale.parent.mkdir(parents=True)
    (other / "checkpoints" / "step_0000002").rename(stale)
    (stale / "state.pt").write_bytes(b"cut short")
    train(tiny_config(max_steps=2, checkpoint_every=2, out_dir=str(out)))
    with pytest.raises(ConfigError, match=r"cannot change seed when resuming .*step_0000010.*\(saved: seed 1\)"):
        checkpoint.refuse_fixed_changes(out, {"seed": 2})  # no checkpoint would take it: the newest one is named
    with pytest.warns(CheckpointWarning, match="step_0000010"):
        summary = train(tiny_config(max_steps=3, checkpoint_every=2, out_dir=str(out), resume=str(out)))
    assert summary["steps"] == 3
    assert (out / "checkpoints" / "superseded-0000002-1" / "step_0000010").is_dir()  # past step 2: set aside


def test_a_checkpoint_saved_before_the_topology_end_and_regrow_init_options_resumes_at_their_defaults(tmp_path,
                                                                                                       monkeypatch):
    """config.json of a release before ``update_end_step``, ``min_prune_fraction``, ``regrow_init`` and
    ``regrow_init_std`` resumes with the schedule those releases ran: updates over the whole run, decaying to 0.005."""
    newer = ("update_end_step", "min_prune_fraction", "regrow_init", "regrow_init_std")
    to_dict = TrainConfig.to_dict
    monkeypatch.setattr(TrainConfig, "to_dict", lambda self: {k: v for k, v in to_dict(self).items() if k not in newer})
    out = tmp_path / "run"
    train(tiny_config(optimizer="smet", max_steps=4, update_interval=2, checkpoint_every=2, out_dir=str(out)))
    monkeypatch.undo()
    assert not set(newer) & set(json.loads((out / "checkpoints" / "step_0000004" / "config.json").read_text()))
    assert cli.main(["--resume", str(out), "--max-steps", "8", "--no-progress"]) == 0
    saved = json.loads((out / "summary.json").read_text())["config"]
    assert [saved[name] for name in newer] == [None, 0.005, "zeros", 0.02]
    updates = [r for r in strict_records(out / "metrics.jsonl") if r["type"] == "topology_update"]
    assert [r["step"] for r in updates] == [2, 4, 6, 8] and updates[-1]["prune_fraction"] == pytest.approx(0.005)
