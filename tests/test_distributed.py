"""SMET under torch.distributed: two gloo processes on CPU (DDP) end with identical topologies and weights."""

import gc
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from smet_kernels.masked import MaskedLinear
from smet_kernels.modules import BlockSparseLinear
from smet_kernels.optim.smet_adamw import SMETAdamW
from smet_kernels.topology import SMET

WORLD = 2
B = 16
STEPS = 6
# (name, SMET keyword arguments, whether the controller seed differs per rank)
SCENARIOS = [
    ("random", dict(regrow="random", regrow_init="normal"), False),
    ("gradient", dict(regrow="gradient"), False),
    ("rank_seeds", dict(regrow="random", regrow_init="normal"), True),  # rank 0's decisions and init values win
]


def _model() -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    return nn.Sequential(
        BlockSparseLinear(32, 64, 0.5, B, generator=gen, backend="reference"),
        nn.ReLU(),
        MaskedLinear(64, 32, 0.5, B, generator=gen),
    )


def _rigl_layer() -> BlockSparseLinear:
    return BlockSparseLinear(32, 64, 0.5, B, generator=torch.Generator().manual_seed(0), backend="reference")


def _rigl_input(rank: int) -> torch.Tensor:
    return torch.randn(4, 32, generator=torch.Generator().manual_seed(10 + rank))


def _rigl_gradient_weight(rank: int) -> torch.Tensor:
    """Weights of the outputs in rank ``rank``'s loss: each rank's dense gradient ranks the blocks differently."""
    return torch.randn(4, 64, generator=torch.Generator().manual_seed(20 + rank))


def _rigl_layout_after_one_update(ranks) -> torch.Tensor:
    """One process: the layout RigL reaches when the dense gradient is the mean over ``ranks``' losses."""
    layer = _rigl_layer()
    smet = SMET(layer, SMETAdamW(layer.parameters(), backend="reference"), update_interval=1, prune_fraction=0.5,
                regrow="gradient")  # fmt: skip
    sum((layer(_rigl_input(rank)) * _rigl_gradient_weight(rank)).sum() for rank in ranks).div(len(ranks)).backward()
    smet.step()
    return layer.layout.block_indices


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for name, kwargs, rank_seed in SCENARIOS:
            model = DistributedDataParallel(_model())
            opt = SMETAdamW(model.parameters(), lr=1e-2, warmup_steps=2, backend="reference")
            smet = SMET(model, opt, update_interval=2, prune_fraction=0.5, seed=rank if rank_seed else 0, **kwargs)
            data = torch.Generator().manual_seed(100 + rank)  # every rank sees different data
            for _ in range(STEPS):
                x, target = torch.randn(8, 32, generator=data), torch.randn(8, 32, generator=data)
                opt.zero_grad(set_to_none=True)
                (model(x) - target).pow(2).mean().backward()
                opt.step()
                smet.step()
            torch.save(
                {
                    "layouts": {t.name: t.layout.block_indices.clone() for t in smet.targets},
                    "params": {n: p.detach().clone() for n, p in model.named_parameters()},
                    "history": smet.history,
                },
                os.path.join(out_dir, f"{name}_{rank}.pt"),
            )
        # layouts drawn from a different seed on each rank: SMET refuses them on every rank
        differing = BlockSparseLinear(32, 64, 0.5, B, generator=torch.Generator().manual_seed(rank), backend="reference")
        try:
            SMET(differing, SMETAdamW(differing.parameters(), backend="reference"))
            refused = False
        except ValueError as error:
            refused = "differ between ranks" in str(error)
        torch.save({"refused": refused}, os.path.join(out_dir, f"differing_{rank}.pt"))
        # RigL when only rank 1 ran a backward pass: every rank raises (none waits forever in all_reduce)
        layer = BlockSparseLinear(32, 64, 0.5, B, generator=torch.Generator().manual_seed(0), backend="reference")
        opt = SMETAdamW(layer.parameters(), backend="reference")
        smet = SMET(layer, opt, update_interval=1, prune_fraction=0.5, regrow="gradient")
        if rank == 1:
            layer(torch.randn(4, 32)).sum().backward()
        try:
            smet.step()
            raised = False
        except RuntimeError as error:
            raised = "on every rank" in str(error)
        torch.save({"raised": raised}, os.path.join(out_dir, f"rigl_{rank}.pt"))
        # RigL scores the regrow candidates by the mean of every rank's dense gradient, not by rank 0's own
        layer, gradient_weight = _rigl_layer(), _rigl_gradient_weight(rank)
        smet = SMET(layer, SMETAdamW(layer.parameters(), backend="reference"), update_interval=1,
                    prune_fraction=0.5, regrow="gradient")  # fmt: skip
        (layer(_rigl_input(rank)) * gradient_weight).sum().backward()
        smet.step()
        torch.save({"layout": layer.layout.block_indices.clone()}, os.path.join(out_dir, f"rigl_mean_{rank}.pt"))
    finally:
        # free DDP (its Reducer) while the group lives: a group destroyed from the Reducer's C++ destructor holds
        # the GIL while joining a gloo thread that may need it (intermittent deadlock at exit)
        model = smet = opt = None
        gc.collect()
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_gloo_ranks_keep_identical_topology(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    initial = _model()
    initial_layouts = {
        "0.values": initial[0].layout.block_indices,  # the plain model's names: states load in one process
        "2.weight": initial[2].layout.block_indices,
    }
    for name, _, _ in SCENARIOS:
        rank0, rank1 = (torch.load(tmp_path / f"{name}_{rank}.pt", weights_only=False) for rank in range(WORLD))
        assert len(rank0["history"]) == STEPS // 2 and rank0["history"] == rank1["history"], name
        assert rank0["layouts"].keys() == initial_layouts.keys()
        for layer, indices in rank0["layouts"].items():
            assert torch.equal(indices, rank1["layouts"][layer]), (name, layer)
            assert not torch.equal(indices, initial_layouts[layer]), (name, layer)  # the topology did move
        for param, value in rank0["params"].items():
            assert torch.equal(value, rank1["params"][param]), (name, param)
    assert all(torch.load(tmp_path / f"differing_{rank}.pt")["refused"] for rank in range(WORLD))
    assert all(torch.load(tmp_path / f"rigl_{rank}.pt")["raised"] for rank in range(WORLD))
    mean_gradient = _rigl_layout_after_one_update(range(WORLD))
    assert not torch.equal(mean_gradient, _rigl_layout_after_one_update([0]))  # the scenario tells the two apart
    for rank in range(WORLD):
        assert torch.equal(torch.load(tmp_path / f"rigl_mean_{rank}.pt")["layout"], mean_gradient), rank


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_a_controller_on_a_ddp_model_saves_a_state_that_loads_in_one_process_and_back(tmp_path):
    """Built on the DDP wrapper, the controller named its layers ``module.*``: its state, refused by a controller on
    the plain model (a DDP run resumed in one process), and the reverse."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(_model())
        on_ddp = SMET(wrapped, SMETAdamW(wrapped.parameters(), backend="reference"), update_interval=1, seed=1)
        plain = _model()
        on_plain = SMET(plain, SMETAdamW(plain.parameters(), backend="reference"), update_interval=1)
        assert [t.name for t in on_ddp.targets] == [t.name for t in on_plain.targets] == ["0.values", "2.weight"]
        on_ddp.targets[0].layout.set_block_indices(on_ddp.targets[0].layout.block_indices.flip(0))
        on_plain.load_state_dict(on_ddp.state_dict())
        assert torch.equal(plain[0].layout.block_indices, wrapped.module[0].layout.block_indices)
        saved_with_prefix = {**on_plain.state_dict(), "layouts": {
            f"module.{name}": layout for name, layout in on_plain.state_dict()["layouts"].items()}}
        on_ddp.load_state_dict(saved_with_prefix)  # a state an earlier release saved under DDP
        on_ddp.load_state_dict(on_plain.state_dict())
    finally:
        wrapped = on_ddp = None
        gc.collect()
        dist.destroy_process_group()
