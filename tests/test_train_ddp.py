"""Two-process data-parallel training (gloo, CPU): ranks stay identical and match one process on the same
global batch, RigL topology updates (dense gradients averaged over ranks) included; a file that rank 0 (or one
process) cannot write stops every rank with one line."""

import json
from pathlib import Path

import pytest

from torchrun_launch import launch, metrics

ARGS = ["--config", "tiny", "--optimizer", "smet", "--density", "0.5", "--batch-size", "8", "--grad-accum", "2",
        "--seq-len", "32", "--max-steps", "6", "--update-interval", "3", "--regrow", "gradient", "--eval-every", "3", "--eval-batches", "1",
        "--lr", "3e-3", "--backend", "reference", "--no-progress",
        "--device", "cpu"]  # gloo on the CPU also beside a GPU (two ranks would need two GPUs)
FULL_DISK_WORKER = Path(__file__).with_name("full_disk_worker.py")


def test_two_gloo_ranks_match_single_process(tmp_path, tmp_path_factory):
    cache_dir = tmp_path_factory.getbasetemp() / "smet_cache"
    launch(tmp_path / "single", 1, cache_dir, ARGS)
    outputs = launch(tmp_path / "ddp", 2, cache_dir, ARGS)
    assert not any("Warning" in output for output in outputs), outputs  # DDP's deprecated broadcast_buffers warned
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] is True
    single = {r["step"]: r for r in metrics(tmp_path / "single") if r["type"] == "train"}
    ddp = {r["step"]: r for r in metrics(tmp_path / "ddp") if r["type"] == "train"}
    assert sorted(ddp) == list(range(1, 7))
    for step, record in single.items():
        assert ddp[step]["loss"] == pytest.approx(record["loss"], rel=1e-5, abs=1e-6), step
        if "val_loss" in record:
            assert ddp[step]["val_loss"] == pytest.approx(record["val_loss"], rel=1e-5, abs=1e-6), step
    single_updates = [r for r in metrics(tmp_path / "single") if r["type"] == "topology_update"]
    ddp_updates = [r for r in metrics(tmp_path / "ddp") if r["type"] == "topology_update"]
    assert [r["step"] for r in ddp_updates] == [3, 6] and ddp_updates == single_updates
    assert not (tmp_path / "ddp" / "rank1").exists()


def test_a_file_named_checkpoints_in_the_out_dir_stops_every_rank_with_one_line(tmp_path, tmp_path_factory):
    """Rank 0 alone wrote checkpoints: it failed at the first one with a FileExistsError traceback, after training,
    and rank 1 with a gloo 'Connection closed by peer' traceback."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("not a folder")
    outputs = launch(out, 2, tmp_path_factory.getbasetemp() / "smet_cache", ARGS + ["--checkpoint-every", "2"],
                     returncode=2)
    expected = (f"smet-train: error: --out-dir {str(out)!r} holds a file 'checkpoints' where checkpoints are written: "
                "move it away or pass another --out-dir")
    assert [output.strip().splitlines()[-1] for output in outputs] == [expected, expected]
    assert sorted(path.name for path in out.iterdir()) == ["checkpoints"]


def test_a_resume_of_a_run_whose_metrics_jsonl_has_a_corrupt_line_stops_every_rank_with_one_line(
        tmp_path, tmp_path_factory):
    """Rank 0 alone reads metrics.jsonl: it failed with a JSONDecodeError traceback, and rank 1 with a gloo
    'Connection closed by peer' traceback in its next collective (a hang until the timeout under NCCL)."""
    out, cache_dir = tmp_path / "run", tmp_path_factory.getbasetemp() / "smet_cache"
    launch(out, 1, cache_dir, ARGS + ["--max-steps", "2", "--checkpoint-every", "2"])
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(["{garbage", *lines[1:]]) + "\n")
    outputs = launch(out, 2, cache_dir, ["--resume", str(out), "--max-steps", "4", "--no-progress"], returncode=2)
    reason = (f"{out / 'metrics.jsonl'}: line 1 '{{garbage' is not JSON (the file is corrupt): repair or remove that "
              "line")
    assert [output.strip().splitlines()[-1] for output in outputs] == [
        f"smet-train: error: {reason}", f"smet-train: error: rank 0 failed: {reason}"]
    assert not any("Traceback" in output for output in outputs)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_checkpoint_rank_0_cannot_write_stops_every_rank_with_one_line(tmp_path, tmp_path_factory, parallel):
    """Rank 0 alone writes state.pt (under fsdp beside the shards every rank writes): on a full disk (torch.save's
    RuntimeError) it failed with a traceback, and rank 1 with a gloo 'Connection closed by peer' traceback in its next
    collective (a hang until the timeout under NCCL)."""
    outputs = launch(tmp_path / "run", 2, tmp_path_factory.getbasetemp() / "smet_cache",
                     ARGS + ["--max-steps", "2", "--checkpoint-every", "2", "--parallel", parallel],
                     program=(str(FULL_DISK_WORKER),), returncode=1)
    last = [output.strip().splitlines()[-1] for output in outputs]
    prefix = "smet-train: error: could not write checkpoint step_0000002: "
    assert last[0].startswith(prefix) and len(last[0]) > len(prefix), outputs[0]
    assert last[1] == last[0].replace("error: ", "error: rank 0 failed: ", 1)
    assert not any("Traceback" in output for output in outputs)
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []  # no partial folder left on the full disk


def test_a_checkpoint_shard_one_rank_cannot_write_stops_every_rank_with_one_line(tmp_path, tmp_path_factory,
                                                                                   monkeypatch):
    """DCP reports a failed shard write (here rank 1's alone, on a full disk) on every rank, as a CheckpointException
    (a BaseException) carrying every rank's traceback: each rank printed them all."""
    monkeypatch.setenv("FULL_DISK", "shards")
    outputs = launch(tmp_path / "run", 2, tmp_path_factory.getbasetemp() / "smet_cache",
                     ARGS + ["--max-steps", "2", "--checkpoint-every", "2", "--parallel", "fsdp"],
                     program=(str(FULL_DISK_WORKER),), returncode=1)
    expected = "smet-train: error: could not write checkpoint step_0000002: rank 1: [Errno 28] No space left on device"
    assert [output.strip().splitlines()[-1] for output in outputs] == [expected, expected]
    assert not any("Traceback" in output for output in outputs)
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("written", ["metrics", "summary"])
def test_a_metrics_record_or_summary_that_cannot_be_written_stops_every_rank_with_one_line(
        tmp_path, tmp_path_factory, monkeypatch, written, world_size):
    """Rank 0 alone writes metrics.jsonl and summary.json: on a full disk it failed with an OSError traceback, and
    rank 1 with a gloo 'Connection closed by peer' traceback in its next collective (a hang until the timeout under
    NCCL); a failed record now stops every rank at the next step, before a checkpoint is written past it."""
    monkeypatch.setenv("FULL_DISK", written)
    out = tmp_path / "run"
    outputs = launch(out, world_size, tmp_path_factory.getbasetemp() / "smet_cache",
                     ARGS + ["--max-steps", "4", "--checkpoint-every", "2"], program=(str(FULL_DISK_WORKER),),
                     returncode=1)
    file = out / ("metrics.jsonl" if written == "metrics" else "summary.json")
    reason = f"could not write {str(file)!r}: [Errno 28] No space left on device"
    assert [output.strip().splitlines()[-1] for output in outputs] == [
        f"smet-train: error: {reason}", f"smet-train: error: rank 0 failed: {reason}"][:world_size]
    assert not any("Traceback" in output for output in outputs)
    steps = [r["step"] for r in metrics(out) if r["type"] == "train"]
    checkpoints = sorted(path.name for path in (out / "checkpoints").glob("*"))
    if written == "metrics":  # step 2's records were lost: no checkpoint of step 2 or later, no later step taken
        assert steps == [1] and checkpoints == []
    else:
        assert steps == [1, 2, 3, 4] and checkpoints == ["step_0000002", "step_0000004"]
