"""Activation checkpointing of the LLaMA decoder layers: the same loss and gradients as without it, fewer saved
tensors, the block-sparse layout guard still refuses a topology change between forward and backward, and
``smet-train --activation-checkpointing`` trains as without it."""

import json

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from smet_kernels.masked import masked_sparsify
from smet_kernels.modules import sparsify
from smet_kernels.recompute import LAYOUT_CHANGED
from smet_kernels.topology import SMET
from smet_kernels.train import cli
from smet_kernels.train.model import LlamaModel, lm_loss, model_config
from smet_kernels.train.trainer import TrainConfig, train

CONFIG = model_config("tiny", block_size=16, max_seq_len=16)
TOKENS = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))


def tiny_model(sparse: str | None, checkpointing: bool) -> LlamaModel:
    torch.manual_seed(0)
    model = LlamaModel(CONFIG)
    generator = torch.Generator().manual_seed(1)
    if sparse == "smet":
        sparsify(model, 0.5, block_size=16, include=r"\.(q_proj|up_proj)$", generator=generator, backend="reference")
    elif sparse == "masked":
        masked_sparsify(model, 0.5, block_size=16, include=r"\.(q_proj|up_proj)$", generator=generator)
    model.activation_checkpointing = checkpointing
    return model


def loss_of(model):
    return lm_loss(model(TOKENS[:, :-1]), TOKENS[:, 1:])


@pytest.mark.parametrize("sparse", [None, "smet", "masked"])
def test_checkpointed_layers_give_the_same_loss_and_gradients(sparse):
    plain, recomputed = tiny_model(sparse, False), tiny_model(sparse, True)
    loss_a, loss_b = loss_of(plain), loss_of(recomputed)
    loss_a.backward()
    loss_b.backward()
    assert torch.equal(loss_a, loss_b)
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters()):
        assert torch.equal(a.grad, b.grad), name


def test_evaluation_does_not_checkpoint():
    model = tiny_model(None, True)
    with torch.no_grad():
        logits = model(TOKENS[:, :-1])
    assert logits.grad_fn is None


def test_checkpoint_runs_the_given_function_not_the_module_and_its_hooks():
    """A decoder layer checkpoints its ``block`` from inside its own call: running the module again would run its
    hooks (FSDP2's all-gathers) once more, in forward and in the recompute."""
    from smet_kernels.recompute import checkpoint

    module, calls = torch.nn.Linear(3, 3), []
    module.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(2, 3, requires_grad=True)
    checkpoint(module, x, function=lambda t: 2 * t).sum().backward()
    assert calls == [] and torch.equal(x.grad, torch.full((2, 3), 2.0))


def test_checkpoint_given_a_function_in_place_of_the_module_is_refused_by_name():
    """``checkpoint(fn, x)``, torch.utils.checkpoint's order, raised AttributeError: 'function' object has no
    attribute 'parameters'."""
    from smet_kernels.recompute import checkpoint

    with pytest.raises(TypeError, match=r"^module must be an nn.Module \(pass a plain function as function=\), got "):
        checkpoint(lambda t: 2 * t, torch.randn(2, 3, requires_grad=True))


@pytest.mark.parametrize("sparse", ["smet", "masked"])
def test_a_layout_change_before_the_recompute_is_refused(sparse):
    model = tiny_model(sparse, True)
    loss = loss_of(model)
    layer = model.layers[0].attn.q_proj
    layout = layer.layout
    free = [(r, c) for r in range(layout.block_shape[0]) for c in range(layout.block_shape[1])
            if (r, c) not in {tuple(x) for x in layout.block_indices.tolist()}]
    layout.replace_blocks(torch.tensor([0]), torch.tensor([free[0]]))
    with pytest.raises(RuntimeError, match="changed between forward and backward"):
        loss.backward()
    assert "topology updates only after optimizer.step()" in LAYOUT_CHANGED


@pytest.mark.parametrize("sparse", ["smet", "masked"])
def test_compiled_checkpointed_model_recompiles_at_most_once_and_keeps_the_layout_guard(sparse):
    """Topology updates between compiled steps with checkpointing: at most one recompile (no guard on the Python
    version), and a layout change between compiled forward and backward still raises (a masked layer's recompute
    would otherwise build the new mask)."""
    torch._dynamo.reset()
    model = tiny_model(sparse, True)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    smet = SMET(model, opt, update_interval=1, prune_fraction=0.3, regrow="random", seed=0)
    layout = model.layers[0].attn.q_proj.layout
    for _ in range(4):
        opt.zero_grad()
        lm_loss(compiled(TOKENS[:, :-1]), TOKENS[:, 1:]).backward()
        opt.step()
        smet.step()
    assert layout.version >= 4
    assert counter.frame_count <= 2
    loss = lm_loss(compiled(TOKENS[:, :-1]), TOKENS[:, 1:])
    free = (~layout.mask).nonzero()[:1]
    layout.replace_blocks(torch.tensor([0]), free)
    with pytest.raises(RuntimeError, match="changed between forward"):
        loss.backward()


def test_the_trainer_option_trains_identically_and_is_in_help(tmp_path, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SMET_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "smet_cache"))
    losses = {}
    for checkpointing in (False, True):  # on the CPU also beside a GPU: equal to the bit, as CUDA's atomics need not be
        out = tmp_path / str(checkpointing)
        train(TrainConfig(model="tiny", optimizer="smet", batch_size=4, seq_len=32, max_steps=4, update_interval=2,
                          eval_every=0, backend="reference", device="cpu", progress=False, out_dir=str(out),
                          activation_checkpointing=checkpointing))
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[checkpointing] = [(r["loss"], r["grad_norm"]) for r in records if r["type"] == "train"]
    assert losses[True] == losses[False]
    help_text = " ".join(cli.build_parser().format_help().split())
    assert "--activation-checkpointing recompute each decoder layer" in help_text
