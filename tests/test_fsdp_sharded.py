"""SMETAdamW and the SMET controller on FSDP2-sharded parameters (``fully_shard``, two gloo processes on CPU).

Each rank trains its half of every batch on a model whose compact values are DTensors sharded by slot (uneven
shards, one rank holding no slot of a layer, a masked dense layer too); the result must match one process training
the same model on the whole batch: weights, per-block steps, moments, layouts and the controller's history.
The row arithmetic of ``smet_kernels.sharding`` (uneven, empty, nested shards; 2-D meshes) runs on stand-in DTensors.
"""

import gc
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from smet_kernels.masked import MaskedLinear
from smet_kernels.modules import BlockSparseLinear
from smet_kernels.optim.smet_adamw import SMETAdamW
from smet_kernels.topology import SMET

WORLD = 2
B = 16
STEPS = 6
SCENARIOS = [
    ("random", dict(regrow="random", regrow_init="normal")),
    ("gradient", dict(regrow="gradient")),
]


def _model() -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    return nn.Sequential(
        BlockSparseLinear(32, 48, 0.5, B, generator=gen, backend="reference"),  # nnz 3: shards of 2 and 1 slots
        nn.ReLU(),
        MaskedLinear(48, 32, 0.5, B, generator=gen),
        nn.ReLU(),
        BlockSparseLinear(32, 64, 0.5, B, generator=gen, backend="reference"),  # nnz 4: 2 + 2
        nn.ReLU(),
        BlockSparseLinear(64, 16, 0.25, B, generator=gen, backend="reference"),  # nnz 1: rank 1 holds no slot
    )


def _train(model: nn.Module, kwargs: dict, rank: int | None) -> tuple[SMETAdamW, SMET]:
    """``STEPS`` steps on a fixed global batch of 16 rows; ``rank`` trains its 8 rows, None trains all."""
    opt = SMETAdamW(model.parameters(), lr=1e-2, warmup_steps=3, weight_decay=0.01, backend="reference")
    smet = SMET(model, opt, update_interval=2, prune_fraction=0.5, seed=0, **kwargs)
    data = torch.Generator().manual_seed(100)
    for _ in range(STEPS):
        x, target = torch.randn(16, 32, generator=data), torch.randn(16, 16, generator=data)
        if rank is not None:
            x, target = x[8 * rank : 8 * (rank + 1)], target[8 * rank : 8 * (rank + 1)]
        opt.zero_grad(set_to_none=True)
        (model(x) - target).pow(2).mean().backward()
        opt.step()
        smet.step()
    return opt, smet


def _snapshot(model: nn.Module, opt: SMETAdamW, smet: SMET) -> dict:
    from smet_kernels.sharding import full

    params = dict(model.named_parameters())
    return {
        "params": {name: full(p.detach()).clone() for name, p in params.items()},
        "state": {
            name: {key: full(value).clone() for key, value in opt.state[p].items() if key != "step"}
            for name, p in params.items()
        },
        "layouts": {t.name: t.layout.block_indices.clone() for t in smet.targets},
        "history": smet.history,
    }


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for name, kwargs in SCENARIOS:
            # one process on the whole batch (run on both ranks: the controller's collectives must pair up)
            reference = _model()
            expected = _snapshot(reference, *_train(reference, kwargs, None))
            model = _model()
            fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))  # FSDP2's default mesh: CUDA where it exists
            values = model[6].values
            assert isinstance(values, DTensor) and values.to_local().shape[0] == (1 if rank == 0 else 0)
            assert values.smet_layout is model[6].layout  # the layout followed the parameter swap
            opt, smet = _train(model, kwargs, rank)
            step = opt.state[model[0].values]["block_step"]
            assert isinstance(step, DTensor) and step.to_local().shape == (2 if rank == 0 else 1,)
            torch.save({"expected": expected, "got": _snapshot(model, opt, smet)},
                       os.path.join(out_dir, f"{name}_{rank}.pt"))  # fmt: skip
    finally:
        model = opt = smet = values = step = None  # the sharded model holds the group: free it first
        gc.collect()
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_fsdp_sharded_smet_matches_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    initial = {name: layer.layout.block_indices for name, layer in zip(("0", "2", "4"), _model()[0:5:2])}
    for name, _ in SCENARIOS:
        result = torch.load(tmp_path / f"{name}_0.pt", weights_only=False)
        expected, got = result["expected"], result["got"]
        assert got["history"] == expected["history"] and len(got["history"]) == STEPS // 2, name
        moved = [key for key in ("0.values", "2.weight", "4.values") if not torch.equal(got["layouts"][key],
                                                                                          initial[key[0]])]
        assert moved == ["0.values", "2.weight", "4.values"], name  # the topology did move
        for key, indices in expected["layouts"].items():
            assert torch.equal(got["layouts"][key], indices), (name, key)
        for key, value in expected["params"].items():
            torch.testing.assert_close(got["params"][key], value, rtol=1e-5, atol=1e-6, msg=f"{name} {key}")
        for key, state in expected["state"].items():
            assert state.keys() == got["state"][key].keys(), (name, key)
            for item, value in state.items():
                if item == "block_step":
                    assert torch.equal(got["state"][key][item], value), (name, key)
                else:
                    torch.testing.assert_close(got["state"][key][item], value, rtol=1e-5, atol=1e-7,
                                               msg=f"{name} {key} {item}")  # fmt: skip
        rank1 = torch.load(tmp_path / f"{name}_1.pt", weights_only=False)["got"]
        for key, value in got["params"].items():
            assert torch.equal(rank1["params"][key], value), (name, key)


class _Mesh:
    """A device mesh as ``row_range`` reads it: ``size(dim)`` and this rank's ``get_local_rank(dim)``."""

    def __init__(self, sizes, coordinates):
        self.size, self.get_local_rank = sizes.__getitem__, coordinates.__getitem__


class _Sharded:
    """A stand-in DTensor (global ``shape``, ``placements``, ``device_mesh``, ``to_local()``): no process group."""

    def __init__(self, rows, placements, mesh, local_rows):
        self.shape, self.placements, self.device_mesh = torch.Size([rows, 2]), placements, mesh
        self._local = torch.empty(local_rows, 2)

    def to_local(self):
        return self._local


@pytest.fixture
def stand_in_dtensor(monkeypatch):
    from smet_kernels import sharding

    monkeypatch.setattr(sharding, "DTensor", _Sharded)
    return sharding


def _chunk_range(rows, parts, rank, start=0):
    """Rows of ``rank`` in torch.chunk pieces (ranks past the last piece hold none, at the end)."""
    pieces = torch.chunk(torch.arange(start, start + rows), parts)
    piece = pieces[rank] if rank < len(pieces) else torch.empty(0, dtype=torch.long)
    return (int(piece[0]), int(piece[-1]) + 1) if piece.numel() else (start + rows, start + rows)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_row_range_follows_torch_chunk_for_every_size_rank_count_and_rank(stand_in_dtensor):
    from torch.distributed.tensor import Shard

    for rows in range(10):
        for parts in range(1, 5):
            for rank in range(parts):
                expected = _chunk_range(rows, parts, rank)
                sharded = _Sharded(rows, (Shard(0),), _Mesh([parts], [rank]), expected[1] - expected[0])
                assert stand_in_dtensor.row_range(sharded) == expected, (rows, parts, rank)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_row_range_on_a_2d_mesh_skips_replicated_dims_and_nests_shards(stand_in_dtensor):
    from torch.distributed.tensor import Replicate, Shard

    hsdp = _Sharded(10, (Replicate(), Shard(0)), _Mesh([2, 3], [1, 2]), 2)  # HSDP: the replica index moves nothing
    assert stand_in_dtensor.row_range(hsdp) == _chunk_range(10, 3, 2) == (8, 10)
    outer = _chunk_range(10, 2, 1)  # rows 5..9, then cut again in 2
    nested = _Sharded(10, (Shard(0), Shard(0)), _Mesh([2, 2], [1, 1]), 2)
    assert stand_in_dtensor.row_range(nested) == _chunk_range(outer[1] - outer[0], 2, 1, start=outer[0]) == (8, 10)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_values_sharded_on_another_dim_or_an_unexpected_local_shard_are_refused(stand_in_dtensor):
    from torch.distributed.tensor import Shard

    by_column = _Sharded(4, (Shard(1),), _Mesh([2], [0]), 4)
    with pytest.raises(ValueError, match=r"^values: sharded as \(Shard\(dim=1\),\), but block-sparse values"):
        stand_in_dtensor.check_row_sharded(by_column, "values")
    with pytest.raises(ValueError, match="must be sharded on dim 0"):
        stand_in_dtensor.row_range(by_column)
    with pytest.raises(RuntimeError, match=r"local shard has 1 rows, expected 2 \(torch.chunk layout\)"):
        stand_in_dtensor.row_range(_Sharded(4, (Shard(0),), _Mesh([2], [1]), 1))
