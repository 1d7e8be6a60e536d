"""Checkpoint folders on disk: a write is atomic and durable (files and folders fsynced before the rename that makes
it visible, the rename after), the folders a stopped write or rewrite leaves are put back or removed at the next
run start or search (only a dead writer's), and the newest checkpoint is found among them."""

import json

import pytest
import torch

from fault_runs import strict_records, tiny_config
from smet_kernels.train import checkpoint, cli, loop
from smet_kernels.train.checkpoint import CheckpointWarning, find_checkpoint, verify_checkpoint
from smet_kernels.train.trainer import ConfigError, train
from test_train_checkpoints import written_checkpoints
from test_train_trainer import cache_dir, one_thread  # noqa: F401 -- autouse: shared token cache, one thread


def test_a_checkpoint_write_replaces_a_leftover_temporary_folder_of_its_own_name(tmp_path):
    """A process of a reused PID (a write not preceded by a run start's clear_leftovers) meets such a folder."""
    import os

    leftover = tmp_path / "checkpoints" / f".tmp-step_0000001-{os.getpid()}"
    leftover.mkdir(parents=True)
    (leftover / "junk").write_text("partial")
    written = written_checkpoints(tmp_path, 1) / "step_0000001"
    assert verify_checkpoint(written) is None and not (written / "junk").exists() and not leftover.exists()


def test_a_run_start_removes_the_folders_a_stopped_checkpoint_write_left(tmp_path):
    """A run killed while writing a checkpoint left ``.tmp-step_*`` (partial, or whole but never renamed) and
    ``.old-step_*`` folders that nothing removed; resumes never read them and the next run now removes them."""
    import shutil

    out = tmp_path / "run"
    train(tiny_config(max_steps=4, checkpoint_every=2, out_dir=str(out)))
    root = out / "checkpoints"
    shutil.copytree(root / "step_0000004", root / ".tmp-step_0000008-999")  # whole, its rename never came
    shutil.copytree(root / "step_0000004", root / ".tmp-step_0000006-999")
    (root / ".tmp-step_0000006-999" / "manifest.json").unlink()  # cut short before its manifest
    shutil.copytree(root / "step_0000002", root / ".old-step_0000002-999")  # its removal never finished
    assert find_checkpoint(out) == root / "step_0000004"
    assert cli.main(["--resume", str(out), "--max-steps", "6", "--no-progress"]) == 0
    assert sorted(path.name for path in root.iterdir()) == ["step_0000002", "step_0000004", "step_0000006"]


@pytest.mark.parametrize("new_copy", ["sealed", "unsealed", "damaged"])
def test_a_checkpoint_a_stopped_rewrite_left_under_a_temporary_name_is_put_back_and_resumed(
        tmp_path, monkeypatch, new_copy):
    """A run stopped between the two renames that replace a checkpoint it writes again (after resuming from an
    earlier one) left that step only as ``.old-step_*`` and ``.tmp-step_*``: a resume went back to the step before
    and the next run would have deleted both. The new copy (when whole), else the old one, is put back: a new copy
    that fails its manifest put back instead would be passed over and the whole old one deleted with the leftovers.
    (Such a rewrite is of a release before resumes set later checkpoints aside, or of ``write_checkpoint`` called
    twice for one step.)"""
    import os

    out = tmp_path / "run"
    train(tiny_config(max_steps=4, checkpoint_every=2, out_dir=str(out)))
    root = out / "checkpoints"
    real_replace = os.replace
    monkeypatch.setattr(loop, "set_aside_later_checkpoints", lambda out_dir, step: None)  # such a release

    def stopped(source, target):
        if os.path.basename(source).startswith(".tmp-step_0000004"):
            raise KeyboardInterrupt  # killed between the two renames
        real_replace(source, target)

    monkeypatch.setattr(checkpoint.os, "replace", stopped)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["--resume", str(root / "step_0000002"), "--no-progress"])  # writes step 4 again
    monkeypatch.undo()
    (new,) = root.glob(".tmp-step_0000004-*")
    (old,) = root.glob(".old-step_0000004-*")
    assert not (root / "step_0000004").exists()
    if new_copy == "unsealed":
        (new / "manifest.json").unlink()
    elif new_copy == "damaged":
        (new / "config.json").write_text((new / "config.json").read_text().replace('"seed": 0', '"seed": 1'))
    kept = (new if new_copy == "sealed" else old) / "manifest.json"
    manifest = kept.read_text()
    assert find_checkpoint(out) == root / "step_0000004"
    assert (root / "step_0000004" / "manifest.json").read_text() == manifest
    assert cli.main(["--resume", str(out), "--max-steps", "6", "--no-progress"]) == 0
    assert sorted(path.name for path in root.iterdir()) == ["step_0000002", "step_0000004", "step_0000006"]
    steps = [r["step"] for r in strict_records(out / "metrics.jsonl") if r["type"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("writer_alive", [True, False], ids=["live-writer", "dead-writer"])
def test_finding_a_checkpoint_between_the_renames_of_a_rewrite_repairs_only_a_dead_writers_folders(
        tmp_path, writer_alive):
    """A reader (``--resume``, a fresh run's out_dir check) finding checkpoints while another run was between the two
    renames of rewriting step 4 put the writer's sealed ``.tmp-step_*`` in place itself, so the writer's own rename
    failed and that run crashed. A writer alive (its PID in the ``.old-step_*`` name) is now left alone; the folders
    of a dead one are still put back."""
    import os
    import shutil
    import subprocess

    root = written_checkpoints(tmp_path, 2, 4)
    final = root / "step_0000004"
    writer = subprocess.Popen(["sleep", "60"])
    try:
        if not writer_alive:
            writer.kill()
            writer.wait()
        tmp = root / f".tmp-step_0000004-{writer.pid}"  # sealed: it holds its manifest, as before the renames
        shutil.copytree(final, tmp)
        old = root / f".old-step_0000004-{writer.pid}"
        os.replace(final, old)  # the writer's first rename (_atomic_replace_dir)
        if writer_alive:
            with pytest.warns(CheckpointWarning, match=f"step_0000004' is being rewritten by process {writer.pid}"):
                assert find_checkpoint(tmp_path) == root / "step_0000002"
            assert tmp.is_dir() and old.is_dir() and not final.exists()
            os.replace(tmp, final)  # the writer's second rename
        else:
            assert find_checkpoint(tmp_path) == final and not tmp.exists() and old.is_dir()
    finally:
        writer.kill()
        writer.wait()
    assert torch.load(final / "state.pt") == {"step": 4} and verify_checkpoint(final) is None


def test_the_newest_checkpoint_is_the_highest_step_also_past_seven_digits(tmp_path):
    """Checkpoint folders are named ``step_%07d``: the newest was taken by name, so after step 9,999,999 a resume
    went back to ``step_9999999`` (``step_10000000`` sorts before it) and continued from there."""
    root = written_checkpoints(tmp_path, 9_999_999, 10_000_000)
    assert find_checkpoint(tmp_path) == root / "step_10000000"


def test_a_stopped_rewrite_is_put_back_from_its_own_steps_copies_not_from_a_longer_step_number_sharing_its_prefix(
        tmp_path):
    import os

    root = written_checkpoints(tmp_path, 1_000_000, 10_000_000)
    os.replace(root / "step_1000000", root / ".old-step_1000000-4242")
    os.replace(root / "step_10000000", root / ".tmp-step_10000000-4242")  # sealed, never renamed
    checkpoint.clear_leftovers(tmp_path)
    assert torch.load(root / "step_1000000" / "state.pt") == {"step": 1_000_000}


def test_finding_a_checkpoint_repairs_a_rewrite_named_with_a_pid_no_process_can_have(tmp_path):
    import os

    root = written_checkpoints(tmp_path, 2, 4)
    os.replace(root / "step_0000004", root / f".old-step_0000004-{2**64}")
    assert find_checkpoint(tmp_path) == root / "step_0000004"


@pytest.mark.parametrize("writer", ["dead", "alive"])
def test_a_run_start_puts_back_a_checkpoint_that_only_a_stopped_rewrite_left_before_removing_the_leftovers(
        tmp_path, writer):
    """``--resume run/checkpoints/step_0000002`` names its checkpoint, so no search repairs the folder: the run start
    (clear_leftovers) is the last chance to put back step 4, which a rewrite stopped between its renames left as
    ``.old-step_*`` only; removing the leftovers without that deleted its one copy. A run is its folder's only writer:
    a live process of the PID in the name is another one, and does not stop the repair."""
    import os

    root = written_checkpoints(tmp_path, 2, 4)
    os.replace(root / "step_0000004", root / f".old-step_0000004-{4242 if writer == 'dead' else os.getppid()}")
    checkpoint.clear_leftovers(tmp_path)
    assert sorted(path.name for path in root.iterdir()) == ["step_0000002", "step_0000004"]
    assert torch.load(root / "step_0000004" / "state.pt") == {"step": 4}


def test_a_rewrite_by_a_live_process_of_another_user_is_passed_over_not_repaired(tmp_path, monkeypatch):
    """Signal 0 to a live process of another user raises PermissionError: that writer is alive, and taking it for
    dead would put its folders back under it and fail the rename it is about to make."""
    import os

    root = written_checkpoints(tmp_path, 2, 4)
    os.replace(root / "step_0000004", root / ".old-step_0000004-4242")
    real_kill = os.kill

    def kill(pid, signal):
        if pid == 4242:
            raise PermissionError(1, "Operation not permitted")
        return real_kill(pid, signal)

    monkeypatch.setattr(checkpoint.os, "kill", kill)
    with pytest.warns(CheckpointWarning, match="step_0000004' is being rewritten by process 4242"):
        assert find_checkpoint(tmp_path) == root / "step_0000002"
    assert sorted(path.name for path in root.iterdir()) == [".old-step_0000004-4242", "step_0000002"]


def test_the_newest_checkpoint_is_used_without_a_warning_beside_an_archive_and_a_live_rewriters_old_copy(tmp_path):
    """A file named like a checkpoint (an archived copy) is no candidate, and the old copy that a live writer is
    still removing after its last rename (``step_*`` is back) is no rewrite in progress: neither is worth a warning
    (that the archive is unusable, that the step is passed over) when the newest checkpoint is used."""
    import os
    import shutil
    import warnings

    root = written_checkpoints(tmp_path, 2, 4)
    (root / "step_0000009.tar").write_bytes(b"an archive")
    shutil.copytree(root / "step_0000004", root / f".old-step_0000004-{os.getppid()}")  # the parent: alive
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_checkpoint(tmp_path) == root / "step_0000004"


def test_a_checkpoint_folder_given_by_path_is_refused_naming_what_fails(tmp_path):
    """A step folder that lost its state.pt is an unusable checkpoint whose missing file is named, not a folder with
    no checkpoint in it; one whose manifest does not cover config.json is refused too (the run reads it unchecked)."""
    root = written_checkpoints(tmp_path, 2, 4)
    (root / "step_0000004" / "state.pt").unlink()
    with pytest.raises(ConfigError, match="step_0000004' is unusable: state.pt is missing$"):
        find_checkpoint(root / "step_0000004")
    manifest = json.loads((root / "step_0000002" / "manifest.json").read_text())
    del manifest["files"]["config.json"]
    (root / "step_0000002" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="step_0000002' is unusable: manifest.json lists no config.json$"):
        find_checkpoint(root / "step_0000002")


def test_a_newest_checkpoint_whose_manifest_lost_a_files_size_or_digest_is_passed_over_with_a_warning(tmp_path):
    """A flipped byte in a manifest's "bytes" key (still JSON) stopped the resume with a KeyError traceback, the good
    checkpoint before it unused."""
    root = written_checkpoints(tmp_path, 2, 4, 6)
    for step, (old, new) in ((6, ('"bytes"', '"bztes"')), (4, ('"sha256"', '"sha257"'))):
        manifest = root / f"step_{step:07d}" / "manifest.json"
        manifest.write_text(manifest.read_text().replace(old, new, 1))
        assert verify_checkpoint(manifest.parent) == "manifest.json is malformed (each file needs its bytes and sha256)"
    with pytest.warns(CheckpointWarning) as caught:
        assert find_checkpoint(tmp_path) == root / "step_0000002"
    assert [("is malformed" in str(w.message), str(w.message).rsplit("; ", 1)[1]) for w in caught] == [
        (True, "trying step_0000004"), (True, "trying step_0000002")]


def test_a_sharded_checkpoint_without_its_manifest_is_unusable_not_taken_for_an_earlier_releases(tmp_path):
    """Its state.pt and config.json passed as an earlier release's checkpoint (those have no manifest, but no shards
    either), the shards unchecked: a truncated shard then stopped the resume with torch's zip-reader traceback."""
    folder = written_checkpoints(tmp_path, 2) / "step_0000002"
    (folder / checkpoint.SHARDED_DIR).mkdir()
    (folder / checkpoint.SHARDED_DIR / "__0_0.distcp").write_bytes(b"cut short")
    (folder / "manifest.json").unlink()
    assert verify_checkpoint(folder) == "manifest.json missing or unreadable (FileNotFoundError)"


def test_a_checkpoint_file_that_goes_while_it_is_verified_makes_it_unusable_not_a_traceback(tmp_path, monkeypatch):
    """Under DDP a rank can still be checking a checkpoint that rank 0 has just set aside."""
    folder = written_checkpoints(tmp_path, 2) / "step_0000002"

    def gone(path):
        raise FileNotFoundError(path)

    monkeypatch.setattr(checkpoint, "_sha256", gone)
    assert verify_checkpoint(folder) == "config.json unreadable (FileNotFoundError)"


def test_every_file_of_a_checkpoint_is_flushed_to_disk_before_the_rename_that_makes_it_visible(tmp_path, monkeypatch):
    """A crash of the machine just after the rename must not leave a visible checkpoint whose files were still in
    the page cache (empty or partial on disk): each file, the manifest last, and the folder that names them are
    fsynced before ``step_*`` appears, and the checkpoints folder (the rename itself) once it has."""
    import os
    from pathlib import Path

    real_fsync, real_replace, synced, visible = os.fsync, os.replace, [], {}

    def fsync(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        real_fsync(fd)

    def replace(source, target):
        visible[Path(target).name] = set(synced)
        real_replace(source, target)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    root = written_checkpoints(tmp_path, 2)
    files = {path.name for path in (root / "step_0000002").iterdir()}
    assert files == {"state.pt", "config.json", "manifest.json"}
    # the out-dir too: the checkpoints folder it gained (a crash could otherwise lose the folder and all in it)
    assert visible == {"step_0000002": files | {f".tmp-step_0000002-{os.getpid()}", tmp_path.name}}
    assert synced[-1] == root.name == "checkpoints"


@pytest.mark.parametrize("code", ["EINVAL", "ENOTSUP"])
def test_a_file_system_that_cannot_fsync_a_folder_still_gets_its_checkpoints(tmp_path, monkeypatch, code):
    """Some network and FUSE mounts refuse fsync on a folder: the files are on disk, the write goes on; any other
    error of that fsync (an I/O error) still stops the run."""
    import errno
    import os
    import stat

    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))
        real_fsync(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    root = written_checkpoints(tmp_path / "refused", 2)
    assert find_checkpoint(root.parent) == root / "step_0000002"

    def failing(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(checkpoint.os, "fsync", failing)
    with pytest.raises(checkpoint.TrainingFailed, match="could not write checkpoint"):
        written_checkpoints(tmp_path / "failed", 2)
