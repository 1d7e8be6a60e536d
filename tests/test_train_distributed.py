"""The trainer's multi-process set-up in one process (tests/test_train_ddp.py and tests/test_train_fsdp.py launch the
ranks): the rank torchrun's environment gives, the backend of the process group, the mean over ranks, rank 0's
failure heard by every rank, the gather of a sharded state dict and the cut of a full optimizer state into shards,
with torch.distributed's collectives and the DTensor helpers stood in for."""

import types

import pytest
import torch

from smet_kernels.train import distributed
from smet_kernels.train.config import ConfigError, TrainConfig
from smet_kernels.train.distributed import DistInfo, TrainingFailed, on_rank0


def test_one_process_is_rank_0_of_a_world_of_one_that_it_did_not_set_up(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    one = distributed.init_distributed("cpu")
    assert one == DistInfo(rank=0, world_size=1, local_rank=0, initialised_here=False) == DistInfo()
    assert not one.enabled
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun with one process: no RANK needed, no process group
    assert distributed.init_distributed("cpu") == DistInfo()


@pytest.mark.parametrize("device, cuda, backend", [
    ("cpu", True, "gloo"), ("cuda", True, "nccl"), ("cuda", False, "gloo"), ("auto", False, "gloo"),
])
def test_torchruns_environment_gives_the_rank_and_the_backend_of_the_process_group(monkeypatch, device, cuda,
                                                                                   backend):
    """nccl only on CUDA: ``--device cpu`` trains over gloo also beside a GPU."""
    started = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: bool(started))
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: started.append(backend))
    ddp = distributed.init_distributed(device)
    assert started == [backend]
    assert ddp == DistInfo(rank=1, world_size=2, local_rank=1, initialised_here=True) and ddp.enabled
    assert distributed.init_distributed(device).initialised_here is False  # a group set up by the caller is kept
    assert started == [backend]


@pytest.mark.parametrize("environ, message", [
    ({"WORLD_SIZE": "2"}, "the WORLD_SIZE environment variable is 2, but RANK is not set: launch the ranks with "
                          "torchrun"),
    ({"WORLD_SIZE": "two"}, "the WORLD_SIZE environment variable must be an int, got 'two': launch"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, "environment variable MASTER_ADDR expected, but not set: launch the ranks with "
                                       "torchrun .*, or unset WORLD_SIZE$"),
])
def test_a_world_size_without_the_rest_of_torchruns_environment_is_a_one_line_config_error(monkeypatch, environ,
                                                                                           message):
    """A WORLD_SIZE left in the shell, without torchrun: a KeyError or torch's ValueError traceback."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    with pytest.raises(ConfigError, match=message):
        distributed.init_distributed("cpu")


def test_a_process_group_started_without_torchrun_is_a_one_line_config_error_not_every_process_as_rank_0(
        monkeypatch):
    """``mp.spawn`` with ``init_process_group`` and no WORLD_SIZE: each process ran the whole run as rank 0 of one,
    all writing the same out_dir."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    with pytest.raises(ConfigError, match="^a process group of 2 ranks is initialised, but WORLD_SIZE is not set: "
                                          r"launch the ranks with torchrun \(it sets RANK, .*MASTER_PORT\)$"):
        distributed.init_distributed("cpu")
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 1)  # a group of one: the run is this process's
    assert distributed.init_distributed("cpu") == DistInfo()


def test_the_mean_over_ranks_divides_the_all_reduced_sum_by_the_world_size(monkeypatch):
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda value: value.mul_(4))  # the sum over 4 equal ranks
    assert DistInfo(rank=3, world_size=4).mean(torch.tensor(2.0)).item() == 2.0
    assert DistInfo().mean(torch.tensor(2.0)).item() == 2.0  # one process: no collective


def _broadcasting(monkeypatch, sent_by_rank_0):
    """Stand-in for the broadcast of :func:`on_rank0`'s outcome: rank 0's is recorded, the others receive
    ``sent_by_rank_0[0]``."""
    sent = []

    def broadcast_object_list(outcome, src):
        assert src == 0
        sent.append(list(outcome))
        outcome[:] = sent_by_rank_0

    monkeypatch.setattr(distributed.dist, "broadcast_object_list", broadcast_object_list)
    return sent


def test_on_rank0_runs_the_work_on_rank_0_alone_and_every_rank_waits_in_the_broadcast(monkeypatch):
    calls = []
    sent = _broadcasting(monkeypatch, [None])
    assert on_rank0(DistInfo(rank=0, world_size=2), lambda: calls.append(0) or "written") == "written"
    assert on_rank0(DistInfo(rank=1, world_size=2), lambda: calls.append(1) or "written") is None
    assert calls == [0] and sent == [[None], [None]]
    assert on_rank0(DistInfo(), lambda: "alone") == "alone" and len(sent) == 2  # one process: no broadcast


@pytest.mark.parametrize("error, kind, message", [
    (ConfigError("--out-dir holds a file"), ConfigError, "--out-dir holds a file"),
    (OSError(28, "No space left on device"), TrainingFailed, "[Errno 28] No space left on device"),
    (KeyError(), TrainingFailed, "KeyError"),  # no message: named by its type
])
def test_a_failure_of_rank_0_stops_every_rank_with_an_error_of_its_kind(monkeypatch, error, kind, message):
    def fail():
        raise error

    sent = _broadcasting(monkeypatch, [(kind is ConfigError, message)])
    with pytest.raises(type(error)) as raised:
        on_rank0(DistInfo(rank=0, world_size=2), fail)
    assert raised.value is error and sent == [[(kind is ConfigError, message)]]
    with pytest.raises(kind, match=f"^rank 0 failed: {message}$".replace("[", r"\[")):
        on_rank0(DistInfo(rank=1, world_size=2), lambda: "never run")
    with pytest.raises(type(error)):
        on_rank0(DistInfo(), fail)


class _Sharded:
    """Stands for a DTensor: its full value behind :func:`full`, and the rows of this rank."""

    def __init__(self, value: torch.Tensor):
        self.value, self.shape = value, value.shape


@pytest.fixture
def stand_in_sharding(monkeypatch):
    monkeypatch.setattr(distributed, "is_sharded", lambda value: isinstance(value, _Sharded))
    monkeypatch.setattr(distributed, "full", lambda value: value.value)
    monkeypatch.setattr(distributed, "shard_like", lambda value, like: ("shard of", value))


def test_full_state_gathers_every_sharded_tensor_of_the_tree_and_keeps_it_on_rank_0_only(stand_in_sharding):
    weight, step = torch.ones(2, 3), torch.tensor(7)
    state = {"model": {"w": _Sharded(weight), "rope": step}, "groups": [{"lr": 0.1, "params": [0]}],
             "moments": [_Sharded(weight * 2)]}
    kept = distributed.full_state(state, keep=True)
    assert kept["model"]["rope"] is step and kept["groups"] == [{"lr": 0.1, "params": [0]}]
    assert torch.equal(kept["model"]["w"], weight) and torch.equal(kept["moments"][0], weight * 2)
    assert kept["model"]["w"].device.type == "cpu"
    assert distributed.full_state(state, keep=False) is None
    assert distributed.full_state([_Sharded(weight)], keep=False) is None
    assert distributed.full_state(_Sharded(weight), keep=False) is None


def _optimizer(*params):
    return types.SimpleNamespace(param_groups=[{"params": list(params)}])


def test_a_full_optimizer_state_is_cut_into_shards_of_the_tensors_placed_like_their_parameter(stand_in_sharding):
    sharded, plain = _Sharded(torch.zeros(4, 2)), torch.zeros(4, 2)
    moment, block_step, other_rows, scalar = torch.ones(4, 2), torch.zeros(4), torch.ones(3, 2), torch.tensor(5.0)
    saved = {"param_groups": [{"lr": 0.1, "params": [10, 11]}, {"lr": 0.2, "params": [12]}],
             "state": {10: {"exp_avg": moment, "block_step": block_step, "step": scalar, "other": other_rows,
                            "name": "adamw"},
                       12: {"exp_avg": moment}}}
    cut = distributed.sharded_optimizer_state(_optimizer(sharded, torch.zeros(2), plain), saved)
    assert cut["param_groups"] is saved["param_groups"] and sorted(cut["state"]) == [10, 12]  # 11 holds no state
    first = cut["state"][10]
    assert first["exp_avg"] == ("shard of", moment) and first["block_step"] == ("shard of", block_step)
    assert first["step"] is scalar and first["other"] is other_rows and first["name"] == "adamw"
    assert cut["state"][12]["exp_avg"] is moment  # a parameter that is not sharded keeps its state whole


def test_an_optimizer_state_of_another_parameter_count_is_refused_naming_both_counts(stand_in_sharding):
    saved = {"param_groups": [{"params": [0, 1, 2]}], "state": {}}
    with pytest.raises(ConfigError, match="^checkpoint optimizer has 3 parameters, this model 2$"):
        distributed.sharded_optimizer_state(_optimizer(torch.zeros(1), torch.zeros(1)), saved)


def test_a_device_that_is_not_here_is_a_config_error_naming_the_setting():
    assert distributed.resolve_device("cpu", DistInfo()) == torch.device("cpu")
    with pytest.raises(ConfigError, match="^device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'$"):
        distributed.resolve_device("tpu", DistInfo())


def test_each_rank_trains_on_the_gpu_of_its_local_rank_and_one_process_on_the_gpu_it_names(monkeypatch):
    """The GPU paths with CUDA stood in for (torch.device("cuda", n) needs no GPU): ``cuda`` is GPU 0 alone, GPU
    ``LOCAL_RANK`` under torchrun whatever the name."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(distributed.backend_module, "resolve_device", lambda name, source: torch.device(name))
    for name, ddp, expected in [("cuda", DistInfo(), 0), ("cuda:1", DistInfo(), 1),
                                ("cuda:1", DistInfo(rank=3, world_size=4, local_rank=0), 0),
                                ("cuda", DistInfo(rank=3, world_size=4, local_rank=3), 3)]:  # fmt: skip
        assert distributed.resolve_device(name, ddp) == torch.device("cuda", expected), (name, ddp)
    assert chosen == [torch.device("cuda", n) for n in (0, 1, 0, 3)]


class _Ddp:
    """Stands for ``DistributedDataParallel`` (of torch 2.13: ``forward_sync_buffers``): records its arguments."""

    def __init__(self, module, device_ids=None, forward_sync_buffers=None):
        self.module, self.device_ids, self.sync_buffers = module, device_ids, forward_sync_buffers


class _OldDdp:
    """Stands for ``DistributedDataParallel`` of a torch before the rename (``broadcast_buffers``)."""

    def __init__(self, module, device_ids=None, broadcast_buffers=True):
        self.module, self.device_ids, self.sync_buffers = module, device_ids, broadcast_buffers


@pytest.mark.parametrize("ddp_class", [_Ddp, _OldDdp])
def test_ddp_wraps_the_model_on_its_gpu_or_the_cpu_without_a_buffer_sync_at_each_forward(monkeypatch, ddp_class):
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", ddp_class)
    model = torch.nn.Linear(2, 2)
    on_cpu, on_gpu = (distributed.wrap_ddp(model, torch.device(*device)) for device in (["cpu"], ["cuda", 1]))
    assert on_cpu.module is model and on_cpu.device_ids is None and on_cpu.sync_buffers is False
    assert on_gpu.device_ids == [1] and on_gpu.sync_buffers is False


def test_fsdp_shards_each_decoder_layer_then_the_root_over_every_rank_on_the_devices_type(monkeypatch):
    import torch.distributed.device_mesh
    import torch.distributed.fsdp

    sharded = []
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 3)
    monkeypatch.setattr(torch.distributed.device_mesh, "init_device_mesh", lambda kind, shape: (kind, shape))
    monkeypatch.setattr(torch.distributed.fsdp, "fully_shard", lambda module, mesh: sharded.append((module, mesh)))
    model = types.SimpleNamespace(layers=[torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])
    assert distributed.shard_model(model, torch.device("cpu")) is model
    assert sharded == [(model.layers[0], ("cpu", (3,))), (model.layers[1], ("cpu", (3,))), (model, ("cpu", (3,)))]


def test_reshard_frees_the_unsharded_parameters_of_every_fsdp_module_of_the_model(monkeypatch):
    import torch.distributed.fsdp

    class Sharded(torch.nn.Linear):
        resharded = 0

        def reshard(self):
            self.resharded += 1

    monkeypatch.setattr(torch.distributed.fsdp, "FSDPModule", Sharded)
    model = torch.nn.Sequential(Sharded(2, 2), torch.nn.ReLU(), torch.nn.Sequential(Sharded(2, 2)))
    distributed.reshard(model)
    assert [module.resharded for module in (model[0], model[2][0])] == [1, 1]


def test_a_batch_size_that_the_ranks_cannot_share_is_refused_before_the_data_is_read(monkeypatch):
    """A world of 3 with --batch-size 8 waited for its BPE tokenizer's training (or a dataset's download) first."""
    from smet_kernels.train import build
    from smet_kernels.train.config import ConfigError, TrainConfig

    def read(*args, **kwargs):
        raise AssertionError("the data was read")

    monkeypatch.setattr(build, "load_corpus", read)
    with pytest.raises(ConfigError, match=r"^batch_size \(8\) must be divisible by grad_accum x world size \(1 x 3\)$"):
        build.prepare_data(TrainConfig(batch_size=8), torch.device("cpu"), world_size=3)


def test_a_run_refused_after_its_process_group_started_destroys_the_group(monkeypatch, tmp_path):
    """A setting every rank refuses after ``init_distributed`` (here the data) left the group it started alive: NCCL
    warns at exit of a group never destroyed, and a second ``train()`` in the process met the stale group. A group
    the caller started is left to the caller."""
    from smet_kernels.train import loop

    def one_rank_group(device_name):
        store = torch.distributed.HashStore()
        torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
        return DistInfo(initialised_here=True)

    monkeypatch.setattr(loop, "init_distributed", one_rank_group)
    config = TrainConfig(model="tiny", data=str(tmp_path / "missing.txt"), max_steps=1, device="cpu")
    with pytest.raises(ConfigError, match="does not exist"):
        loop.train(config)
    assert not torch.distributed.is_initialized()
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        monkeypatch.setattr(loop, "init_distributed", lambda device_name: DistInfo())
        with pytest.raises(ConfigError, match="does not exist"):
            loop.train(config)
        assert torch.distributed.is_initialized()
    finally:
        torch.distributed.destroy_process_group()
