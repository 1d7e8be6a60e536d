"""``smet-train --parallel fsdp`` (FSDP2 ``fully_shard``) with two gloo processes on CPU: ranks stay in sync, the
loss matches one process on the same global batch, topology updates happen and match, checkpoints are sharded
(DCP; resumable on 2 ranks exactly and on 1 rank, and a one-process checkpoint on 2 ranks) or full (the
single-process format) and resuming one continues exactly like the uninterrupted run. Bad combinations raise."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from smet_kernels.train.cli import build_parser, main
from smet_kernels.train.trainer import ConfigError, TrainConfig
from torchrun_launch import launch, metrics

COMMON = ["--config", "tiny", "--batch-size", "8", "--seq-len", "32", "--eval-batches", "1", "--lr", "3e-3",
          "--backend", "reference", "--no-progress", "--device", "cpu"]  # gloo on the CPU also beside a GPU
# density 0.3: the 16-block q/k/v/o layers hold 5 slots -> uneven shards (3 + 2 slots)
COMPILE_WORKER = Path(__file__).with_name("compile_worker.py")
SMET_ARGS = COMMON + ["--optimizer", "smet", "--density", "0.3", "--grad-accum", "2", "--max-steps", "6",
                      "--update-interval", "3", "--regrow", "gradient", "--eval-every", "3", "--checkpoint-every", "3"]


def train_records(out_dir):
    return {r["step"]: r for r in metrics(out_dir) if r["type"] == "train"}


def assert_matches(single_dir, fsdp_dir, steps):
    summary = json.loads((fsdp_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] is True
    assert summary["config"]["parallel"] == "fsdp"
    single, fsdp = train_records(single_dir), train_records(fsdp_dir)
    assert sorted(fsdp) == list(range(1, steps + 1))
    for step, record in single.items():
        assert fsdp[step]["loss"] == pytest.approx(record["loss"], rel=1e-5, abs=1e-6), step
        if "val_loss" in record:
            assert fsdp[step]["val_loss"] == pytest.approx(record["val_loss"], rel=1e-5, abs=1e-6), step
    single_updates = [r for r in metrics(single_dir) if r["type"] == "topology_update"]
    fsdp_updates = [r for r in metrics(fsdp_dir) if r["type"] == "topology_update"]
    assert fsdp_updates == single_updates
    return fsdp_updates


def assert_same_state(a, b, path=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same_state(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}/{i}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
    else:
        assert a == b, path


def load_state(out_dir, step):
    return torch.load(out_dir / "checkpoints" / f"step_{step:07d}" / "state.pt", weights_only=False)


def test_fsdp_smet_matches_single_process_and_resumes_exactly(tmp_path, tmp_path_factory):
    cache_dir = tmp_path_factory.getbasetemp() / "smet_cache"
    launch(tmp_path / "single", 1, cache_dir, SMET_ARGS)
    launch(tmp_path / "fsdp", 2, cache_dir, SMET_ARGS + ["--parallel", "fsdp", "--checkpoint-format", "full"])
    updates = assert_matches(tmp_path / "single", tmp_path / "fsdp", 6)
    assert [r["step"] for r in updates] == [3, 6] and updates[0]["pruned"] > 0
    assert not (tmp_path / "fsdp" / "rank1").exists()

    # the checkpoint is gathered to full tensors, in the single-process format (same keys, shapes, dtypes)
    single_state, fsdp_state = load_state(tmp_path / "single", 6), load_state(tmp_path / "fsdp", 6)
    assert fsdp_state["model"].keys() == single_state["model"].keys()
    for key, value in single_state["model"].items():
        if isinstance(value, torch.Tensor):
            assert fsdp_state["model"][key].shape == value.shape and fsdp_state["model"][key].dtype == value.dtype
            torch.testing.assert_close(fsdp_state["model"][key], value.cpu(), rtol=1e-4, atol=1e-5)
    assert fsdp_state["optimizer"]["param_groups"] == single_state["optimizer"]["param_groups"]
    for index, state in single_state["optimizer"]["state"].items():
        for key, value in state.items():
            got = fsdp_state["optimizer"]["state"][index][key]
            assert not hasattr(got, "placements") and got.shape == value.shape and got.dtype == value.dtype
            if key == "block_step":
                assert torch.equal(got, value.cpu())

    # resume from the step-3 checkpoint: steps 4..6 and the final state as in the uninterrupted run
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "fsdp" / "checkpoints" / "step_0000003", resumed / "checkpoints" / "step_0000003")
    launch(resumed, 2, cache_dir, ["--resume", str(resumed), "--no-progress"])
    uninterrupted, continued = train_records(tmp_path / "fsdp"), train_records(resumed)
    assert sorted(continued) == [4, 5, 6]
    for step in (4, 5, 6):
        assert continued[step]["loss"] == uninterrupted[step]["loss"], step
        assert continued[step].get("val_loss") == uninterrupted[step].get("val_loss"), step
    final, resumed_final = load_state(tmp_path / "fsdp", 6), load_state(resumed, 6)
    for key in ("model", "optimizer", "controller", "step"):
        assert_same_state(resumed_final[key], final[key], key)


def resume_copy(checkpoint, out_dir, world_size, cache_dir, options=()):
    """Resume a copy of ``checkpoint`` in ``out_dir`` on ``world_size`` ranks; its train records by step."""
    (out_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint, out_dir / "checkpoints" / checkpoint.name)
    launch(out_dir, world_size, cache_dir, ["--resume", str(out_dir), "--no-progress", *options])
    return train_records(out_dir)


def test_sharded_checkpoints_resume_on_another_world_size(tmp_path, tmp_path_factory):
    cache_dir = tmp_path_factory.getbasetemp() / "smet_cache"
    launch(tmp_path / "single", 1, cache_dir, SMET_ARGS + ["--parallel", "fsdp"])  # one process: full checkpoints
    launch(tmp_path / "fsdp", 2, cache_dir, SMET_ARGS + ["--parallel", "fsdp"])
    checkpoint = tmp_path / "fsdp" / "checkpoints" / "step_0000003"
    state = torch.load(checkpoint / "state.pt", weights_only=False)
    assert state["format"] == "sharded" and state["model"] is None and state["step"] == 3
    assert (checkpoint / "sharded" / ".metadata").is_file()
    manifest = json.loads((checkpoint / "manifest.json").read_text())["files"]
    assert "sharded/.metadata" in manifest and sum(name.endswith(".distcp") for name in manifest) == 2
    assert "format" not in load_state(tmp_path / "single", 3)
    single, fsdp = train_records(tmp_path / "single"), train_records(tmp_path / "fsdp")

    # the same world size: bit for bit, also with the decoder layers recomputed in backward under FSDP2
    on_two = resume_copy(checkpoint, tmp_path / "2to2", 2, cache_dir, ["--activation-checkpointing"])
    assert sorted(on_two) == [4, 5, 6]
    assert all(on_two[step]["loss"] == fsdp[step]["loss"] for step in on_two)
    on_one = resume_copy(checkpoint, tmp_path / "2to1", 1, cache_dir)
    from_one = resume_copy(tmp_path / "single" / "checkpoints" / "step_0000003", tmp_path / "1to2", 2, cache_dir)
    for resumed, reference in ((on_one, single), (from_one, fsdp)):
        assert sorted(resumed) == [4, 5, 6]
        for step in resumed:
            assert resumed[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5, abs=1e-6), step
            if "val_loss" in reference[step]:
                assert resumed[step]["val_loss"] == pytest.approx(reference[step]["val_loss"], rel=1e-5), step
    single_updates = [r for r in metrics(tmp_path / "single") if r["type"] == "topology_update" and r["step"] > 3]
    assert [r["step"] for r in single_updates] == [6]
    for name in ("2to2", "2to1", "1to2"):
        assert [r for r in metrics(tmp_path / name) if r["type"] == "topology_update"] == single_updates, name
    final = torch.load(tmp_path / "2to1" / "checkpoints" / "step_0000006" / "state.pt", weights_only=False)
    assert "format" not in final and set(final["model"]) == set(load_state(tmp_path / "single", 6)["model"])


@pytest.mark.parametrize("optimizer", ["adamw", "masked-dst"])
def test_fsdp_dense_and_masked_match_single_process(tmp_path, tmp_path_factory, optimizer):
    cache_dir = tmp_path_factory.getbasetemp() / "smet_cache"
    args = COMMON + ["--optimizer", optimizer, "--density", "0.3", "--max-steps", "4", "--update-interval", "2",
                     "--eval-every", "2"]
    launch(tmp_path / "single", 1, cache_dir, args)
    launch(tmp_path / "fsdp", 2, cache_dir, args + ["--parallel", "fsdp"])
    updates = assert_matches(tmp_path / "single", tmp_path / "fsdp", 4)
    if optimizer == "masked-dst":
        assert [r["step"] for r in updates] == [2, 4] and updates[0]["pruned"] > 0


def test_compiled_fsdp_training_with_activation_checkpointing_compiles_every_part_and_matches_one_process(
        tmp_path, tmp_path_factory):
    """The model checkpointed each sharded layer's whole call, FSDP2's hooks included, which Dynamo cannot trace
    inside a checkpoint: under --compile the whole model ran eagerly (no decoder layer compiled, no word of it). The
    layer now checkpoints its body within the hooks: its graph (one recording RigL's gradients, one not) compiles.
    The hooks break the graph inside forward's loop over the layers, so Dynamo runs forward's own frame eagerly: the
    embedding and the head (norm, lm_head) compile as graphs of their own (they ran eagerly while inline in it)."""
    cache_dir = tmp_path_factory.getbasetemp() / "smet_cache"
    args = SMET_ARGS + ["--activation-checkpointing"]
    launch(tmp_path / "single", 1, cache_dir, args)
    outputs = launch(tmp_path / "fsdp", 2, cache_dir, args + ["--parallel", "fsdp", "--compile"],
                     program=(str(COMPILE_WORKER),))
    assert [r["step"] for r in assert_matches(tmp_path / "single", tmp_path / "fsdp", 6)] == [3, 6]
    for output in outputs:
        assert "with a recomputed decoder layer: 2, with the embedding: 1, with a dense linear: 1" in output, output


def test_fsdp_bf16_gradient_norm_is_the_single_process_one(tmp_path, tmp_path_factory):
    """Under FSDP2 the bf16 gradients are DTensor shards: their fp32 norm must be the global one, not the rank's
    shards', and clipping must use it."""
    cache_dir = tmp_path_factory.getbasetemp() / "smet_cache"
    args = COMMON + ["--optimizer", "smet", "--density", "0.3", "--max-steps", "2", "--precision", "bf16",
                     "--eval-every", "0", "--grad-clip", "0.5"]  # fmt: skip
    launch(tmp_path / "single", 1, cache_dir, args)
    launch(tmp_path / "fsdp", 2, cache_dir, args + ["--parallel", "fsdp"])
    single, fsdp = train_records(tmp_path / "single"), train_records(tmp_path / "fsdp")
    assert sorted(fsdp) == sorted(single) == [1, 2]
    for step, record in single.items():
        assert record["grad_norm"] > 0.5  # clipped: the next step starts from clipped updates on both sides
        # bf16 reduce-scatter rounding: 1e-3 apart here; a shard's own norm was 1.3 % off
        assert fsdp[step]["grad_norm"] == pytest.approx(record["grad_norm"], rel=4e-3), step
        assert fsdp[step]["loss"] == pytest.approx(record["loss"], rel=1e-2), step


def test_parallel_option_validation(capsys):
    assert TrainConfig().parallel == "ddp"
    TrainConfig(parallel="fsdp", optimizer="smet").validate()
    with pytest.raises(ConfigError, match="parallel must be one of"):
        TrainConfig(parallel="zero3").validate()
    with pytest.raises(ConfigError, match="parallel 'fsdp' does not support optimizer 'galore'"):
        TrainConfig(parallel="fsdp", optimizer="galore").validate()
    with pytest.raises(SystemExit) as exit_info:
        main(["--optimizer", "galore", "--parallel", "fsdp", "--no-progress"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("smet-train: error: --parallel 'fsdp' does not support --optimizer 'galore'")
    assert "fsdp" in build_parser().format_help() and "fully_shard" in build_parser().format_help()


def test_the_update_probe_help_says_that_fsdp_on_several_ranks_leaves_it_out():
    """The probe runs on plain tensors only: an fsdp run on several ranks wrote no update_probe record, where the
    help said 'default: measured'."""
    text = " ".join(build_parser().format_help().split())
    assert "(default: measured, but not under --parallel fsdp on several ranks)" in text


def test_a_sharded_checkpoint_loads_in_one_process_without_torchs_warning_that_it_assumes_one(tmp_path):
    """torch.distributed.checkpoint warned on every one-process resume (two lines of torch's format): 'assuming the
    intent is to load in a single process', the case the checkpoint format is documented for."""
    import warnings

    import torch.distributed.checkpoint as dcp

    from smet_kernels.train.checkpoint import SHARDED_DIR, load_sharded, sharded_state

    def model_and_optimizer(seed):
        torch.manual_seed(seed)
        model = torch.nn.Linear(4, 3)
        optimizer = torch.optim.AdamW(model.parameters())
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        return model, optimizer

    saved_model, saved_optimizer = model_and_optimizer(0)
    tensors, rest = sharded_state(saved_model, saved_optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(tensors, checkpoint_id=tmp_path / SHARDED_DIR)
    model, optimizer = model_and_optimizer(1)
    state = {"optimizer": rest}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_sharded(tmp_path, state, model, optimizer)
    assert [str(w.message) for w in caught] == []
    assert all(torch.equal(state["model"][key], value) for key, value in saved_model.state_dict().items())
