"""Two-process data-parallel training (gloo, CPU): ranks stay identical and match one process on the same
global batch, RigL topology updates (dense gradients averaged over ranks) included; a file that rank 0 (or one
process) cannot write stops every rank with one line. In this process, one rank's DDP paths: its slice of each
micro-batch and of the validation windows, no_sync on all micro-steps but the last, the cross-rank checksum and
finite checks, the batch that does not split over the ranks."""

import contextlib
import json
import types
from pathlib import Path

import pytest
import torch

from smet_kernels import BlockLayout, BlockSparseLinear
from smet_kernels.train import loop
from smet_kernels.train.data import PackedBatches, window_batch
from smet_kernels.train.trainer import TrainConfig
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


# ---------------------------------------------------------------- DDP paths of one rank, in this process


def _rank(rank: int, world_size: int):
    """What a rank's ``Run.ddp`` tells it, the all-reduce of its mean left out (one process holds no group)."""
    return types.SimpleNamespace(rank=rank, world_size=world_size, enabled=True, mean=lambda value: value)


class _DdpWrapper:
    """Stands for ``DistributedDataParallel``: records each forward's input and whether it ran under ``no_sync``."""

    def __init__(self, model):
        self.model, self.calls, self.syncing = model, [], True

    def __call__(self, x):
        self.calls.append((x.clone(), self.syncing))
        return self.model(x)

    @contextlib.contextmanager
    def no_sync(self):
        self.syncing = False
        try:
            yield
        finally:
            self.syncing = True


@pytest.fixture
def tiny_run(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SMET_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "smet_cache"))
    torch.manual_seed(0)
    return loop.Run(TrainConfig(model="tiny", batch_size=12, grad_accum=3, seq_len=16, max_steps=2, eval_batches=1,
                                backend="reference", device="cpu", progress=False))


def test_a_ddp_rank_takes_its_own_slice_of_each_micro_batch_and_syncs_gradients_on_the_last_only(tiny_run):
    run, drawn = tiny_run, []
    run.ddp, run.wrapped = _rank(1, 2), _DdpWrapper(run.model)
    next_global = run.batches.next_global
    run.batches.next_global = lambda: drawn.append(next_global()) or drawn[-1]
    run.train_step()
    assert [syncing for _, syncing in run.wrapped.calls] == [False, False, True]
    for micro, (x, _) in enumerate(run.wrapped.calls):
        expected = run.batches.batch(PackedBatches.shard(drawn[0], micro, 3, 1, 2))[0]
        assert x.shape == (2, 16) and torch.equal(x, expected)


def test_a_ddp_rank_evaluates_its_own_slice_of_the_validation_windows(tiny_run):
    run, seen = tiny_run, []
    run.ddp = _rank(1, 2)
    run.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    run.evaluate()
    windows = run.val_indices.view(-1, 2, 2)
    assert len(seen) == windows.shape[0] == 3
    for batch, x in zip(windows[:, 1], seen):
        assert torch.equal(x, window_batch(run.val_tokens, batch, 16)[0])


def test_the_ranks_update_probe_measures_the_held_out_micro_batch_of_one_process_between_them(tiny_run):
    """Each rank measured the first batch / (ranks x grad_accum) windows, all the same: the probe's losses depended on
    the world size, and a resume on another world size compared losses of different batches."""
    run = tiny_run
    one_process = run.probe_loss()  # the first 4 windows
    ranks = []
    for rank in (0, 1):
        run.ddp = _rank(rank, 2)
        ranks.append(run.probe_loss())
    assert ranks[0] != ranks[1]
    assert sum(ranks) / 2 == pytest.approx(one_process, rel=1e-6)


def _checksum(model) -> torch.Tensor:
    return loop.Run.params_checksum(types.SimpleNamespace(model=model))


def test_the_rank_checksum_tells_apart_models_that_differ_only_in_which_slot_holds_which_block():
    layer = BlockSparseLinear(32, 32, layout=BlockLayout(torch.tensor([[0, 0], [1, 1]]), (32, 32), 16))
    with torch.no_grad():
        layer.values.fill_(1.0)  # both slots hold the same values: only the slot -> block map tells them apart
    before = _checksum(layer)
    layer.layout.set_block_indices(torch.tensor([[1, 1], [0, 0]]))
    assert not torch.equal(before, _checksum(layer))
    layer.layout.set_block_indices(torch.tensor([[0, 1], [1, 1]]))  # slot 0 moved
    assert not torch.equal(before, _checksum(layer))


def test_the_rank_checksum_tells_apart_parameters_of_the_same_sum():
    first, second = torch.nn.Linear(2, 1, bias=False), torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1.0, -1.0]]))
        second.weight.zero_()
    assert not torch.equal(_checksum(first), _checksum(second))


def test_ranks_are_out_of_sync_when_another_rank_gathers_another_checksum(monkeypatch):
    mine = torch.tensor([1.0, 2.0], dtype=torch.float64)
    run = types.SimpleNamespace(ddp=_rank(0, 3), device=torch.device("cpu"), params_checksum=lambda: mine)

    def all_gather(gathered, checksum, others):
        for out, value in zip(gathered, [checksum, *others]):
            out.copy_(value)

    monkeypatch.setattr(loop.dist, "all_gather", lambda gathered, checksum: all_gather(gathered, checksum,
                                                                                           [mine, mine]))
    assert loop.Run.ranks_in_sync(run) is True
    monkeypatch.setattr(loop.dist, "all_gather", lambda gathered, checksum: all_gather(gathered, checksum,
                                                                                           [mine, mine + 1]))
    assert loop.Run.ranks_in_sync(run) is False


def test_a_global_batch_that_the_ranks_cannot_split_evenly_is_refused_by_name(tmp_path_factory, monkeypatch):
    """6 sequences in 2 micro-steps divide, but not over 2 ranks as well: a view error deep in the first step."""
    from smet_kernels.train.config import ConfigError
    from smet_kernels.train.distributed import DistInfo

    monkeypatch.setenv("SMET_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "smet_cache"))
    monkeypatch.setattr(loop, "init_distributed", lambda device: DistInfo(rank=0, world_size=2))
    with pytest.raises(ConfigError, match=r"\(6\) must be divisible by .* x world size \(2 x 2\)$"):
        loop.Run(TrainConfig(model="tiny", batch_size=6, grad_accum=2, seq_len=16, max_steps=2, backend="reference",
                             device="cpu", progress=False))


def test_parameters_are_not_finite_when_another_rank_holds_a_non_finite_one(monkeypatch):
    run = types.SimpleNamespace(model=torch.nn.Linear(2, 2), device=torch.device("cpu"), ddp=_rank(0, 2))
    monkeypatch.setattr(loop.dist, "all_reduce", lambda tensor, op: tensor)  # the other rank's parameters finite
    assert loop.Run.parameters_finite(run) is True
    monkeypatch.setattr(loop.dist, "all_reduce", lambda tensor, op: tensor.fill_(0.0))  # one of theirs not
    assert loop.Run.parameters_finite(run) is False


def test_only_rank_0_draws_the_progress_bar(tmp_path, tmp_path_factory):
    args = [arg for arg in ARGS if arg != "--no-progress"] + ["--max-steps", "2", "--update-interval", "2"]
    outputs = launch(tmp_path / "run", 2, tmp_path_factory.getbasetemp() / "smet_cache", args)
    assert "smet-train:" in outputs[0] and "smet-train" not in outputs[1], outputs
