"""The topology tests' shared model and run (tests/test_topology.py, tests/test_topology_rigl.py, tests/test_supar.py,
tests/test_masked.py): a tiny MLP of two block-sparse layers, SMETAdamW and an SMET controller on it, its seeded
batches and training step, the block indices of its layers, and optimizers of other state than Adam's."""

import torch
from torch import nn

from smet_kernels.modules import BlockSparseLinear
from smet_kernels.optim.smet_adamw import SMETAdamW
from smet_kernels.topology import SMET

B = 16  # block size
FEATURES = 64  # 4 x 4 blocks per layer

#: optimizers whose state a regrown block restarts (besides Adam's, AMSGrad's and SGD's): name -> (make optimizer on
#: params, {state key: the value a fresh optimizer starts it at})
FRESH_STATE_OPTIMIZERS = {
    "adagrad": (lambda params: torch.optim.Adagrad(params, lr=1e-2, initial_accumulator_value=0.25), {"sum": 0.25}),
    "rmsprop": (lambda params: torch.optim.RMSprop(params, lr=1e-2, momentum=0.9, centered=True),
                {"square_avg": 0.0, "momentum_buffer": 0.0, "grad_avg": 0.0}),
    "rprop": (lambda params: torch.optim.Rprop(params, lr=3e-3), {"prev": 0.0, "step_size": 3e-3}),
}


class TinyMLP(nn.Module):
    def __init__(self, seed: int = 0, density: float = 0.5):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.up = BlockSparseLinear(FEATURES, 2 * FEATURES, density, B, generator=gen, backend="reference")
        self.down = BlockSparseLinear(2 * FEATURES, FEATURES, density, B, generator=gen, backend="reference")

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def make_run(seed=0, model_seed=0, regrow="random", regrow_init="zeros", update_interval=2, **kwargs):
    model = TinyMLP(model_seed)
    opt = SMETAdamW(model.parameters(), lr=1e-2, warmup_steps=4, backend="reference")
    smet = SMET(
        model, opt, update_interval=update_interval, prune_fraction=0.3, regrow=regrow, regrow_init=regrow_init,
        seed=seed, **kwargs,
    )
    return model, opt, smet


def batch(step: int, rows: int = 8):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(rows, FEATURES, generator=gen), torch.randn(rows, FEATURES, generator=gen)


def train_step(model, opt, smet, step):
    x, target = batch(step)
    loss = (model(x) - target).pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return smet.step()


def _layouts(model):
    return {name: p.smet_layout.block_indices.clone() for name, p in model.named_parameters()}
