"""sk.densify: the inverse of sparsify / masked_sparsify, a plain model again (GPT-2 Conv1D included)."""

import sys
import warnings

import pytest
import torch
from torch import nn

import smet_kernels as sk
from smet_kernels.modules import BlockLayoutLinear

B = 16


pytestmark = pytest.mark.usefixtures("reference_backend")


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32, bias=False)
        self.again = self.up  # shared

    def forward(self, x):
        return self.down(torch.relu(self.again(x)))


@pytest.mark.parametrize("sparsify_fn", [sk.sparsify, sk.masked_sparsify])
def test_densify_gives_linears_with_the_sparse_weights_and_same_outputs(sparsify_fn):
    torch.manual_seed(0)
    model = sparsify_fn(Mlp(), 0.5, B, generator=torch.Generator().manual_seed(1))
    model.down.eval()
    sparse_param = model.down.values if sparsify_fn is sk.sparsify else model.down.weight
    sparse_param.requires_grad_(False)
    expected_down = model.down.to_dense_weight().detach().clone()
    up_bias = model.up.bias
    x = torch.randn(5, 32)
    expected = model(x)
    sk.densify(model)
    assert type(model.up) is nn.Linear and type(model.down) is nn.Linear and model.again is model.up
    assert not any(isinstance(m, BlockLayoutLinear) for m in model.modules())
    assert torch.equal(model.down.weight, expected_down) and model.down.bias is None and model.up.bias is up_bias
    mask = model.down.weight.reshape(2, B, 4, B).abs().sum(dim=(1, 3)) > 0
    assert int(mask.sum()) == 4  # zeros at the inactive blocks: 4 of 8 blocks stay
    assert not model.down.weight.requires_grad and model.up.weight.requires_grad
    assert not model.down.training and model.up.training
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)


def test_densify_keeps_dtype():
    model = sk.sparsify(Mlp().to(torch.bfloat16), 0.5, B)
    sk.densify(model)
    assert model.up.weight.dtype == torch.bfloat16 and model.up.bias.dtype == torch.bfloat16


def test_densify_after_topology_updates_follows_the_moved_blocks():
    torch.manual_seed(0)
    model = sk.sparsify(Mlp(), 0.5, B, generator=torch.Generator().manual_seed(1))
    optimizer = sk.SMETAdamW(model.parameters(), lr=1e-2)
    smet = sk.SMET(model, optimizer, update_interval=1, prune_fraction=0.5, regrow_init="normal")
    before = model.up.layout.block_indices.clone()
    model(torch.randn(4, 32)).sum().backward()
    optimizer.step()
    smet.step()
    assert not torch.equal(before, model.up.layout.block_indices)
    x = torch.randn(3, 32)
    expected = model(x)
    torch.testing.assert_close(sk.densify(model)(x), expected, rtol=0, atol=1e-6)


def test_densify_refuses_bad_input():
    with pytest.raises(TypeError, match="model"):
        sk.densify("model")
    with pytest.raises(ValueError, match="no sparse layer"):
        sk.densify(Mlp())
    with pytest.raises(ValueError, match="to_dense_weight"):
        sk.densify(sk.BlockSparseLinear(32, 32, density=0.5, block_size=B))


VOCAB = 128


def tiny_causal_lm(family: str) -> nn.Module:
    """A random-init causal LM small enough for CPU tests (nothing downloaded)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                                                    n_positions=64))  # fmt: skip
    sizes = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    if family == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**sizes))
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**sizes))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_densified_hf_model_keeps_logits_and_round_trips_through_save_pretrained(tmp_path, family):
    model = tiny_causal_lm(family).eval()
    sk.sparsify(model, 0.5, B, exclude="lm_head", generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sparse_logits = model(ids).logits
        sk.densify(model)
        dense_logits = model(ids).logits
    torch.testing.assert_close(dense_logits, sparse_logits, rtol=0, atol=1e-5)
    dense_type = sys.modules["transformers.pytorch_utils"].Conv1D if family == "gpt2" else nn.Linear
    first_block = model.transformer.h[0].mlp.c_fc if family == "gpt2" else model.model.layers[0].mlp.up_proj
    assert type(first_block) is dense_type
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, sparse_logits, rtol=0, atol=1e-5)


def test_sparsify_treats_gpt2_conv1d_as_a_transposed_linear():
    model = tiny_causal_lm("gpt2").eval()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    conv = model.transformer.h[0].attn.c_attn  # Conv1D(nf=192, nx=64): weight [64, 192]
    weight = conv.weight.detach().clone()
    sk.sparsify(model, 1.0, B, exclude="lm_head")  # density 1: every block kept, the same function
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, sk.BlockSparseLinear) and (layer.in_features, layer.out_features) == (64, 192)
    assert torch.equal(layer.to_dense_weight(), weight.t())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="lm_head"):  # GPT-2 ties its head to the embedding
        sk.sparsify(tiny_causal_lm("gpt2"), 0.5, B)


@pytest.mark.parametrize("sparsify_fn", [sk.sparsify, sk.masked_sparsify])
def test_hooks_on_a_layer_fire_after_sparsify_and_densify_and_their_handles_still_remove_them(sparsify_fn):
    model = Mlp()
    calls = []
    pre = model.down.register_forward_pre_hook(lambda module, args: calls.append(("pre", type(module).__name__)))
    model.down.register_forward_hook(lambda module, args, out: calls.append(("post", type(module).__name__)))
    model.down.register_full_backward_hook(lambda module, gin, gout: calls.append(("backward", type(module).__name__)))
    sparsify_fn(model, 0.5, B, generator=torch.Generator().manual_seed(1))
    name = type(model.down).__name__
    model(torch.randn(3, 32, requires_grad=True)).sum().backward()
    assert calls == [("pre", name), ("post", name), ("backward", name)]
    pre.remove()  # the handle of the dense layer's hook removes it from the sparse layer
    calls.clear()
    sk.densify(model)
    model(torch.randn(3, 32)).sum()
    assert calls == [("post", "Linear")]


def test_hooks_a_layer_factory_registers_on_its_layer_still_fire_beside_the_dense_layers_hooks():
    model = Mlp()
    calls = []
    model.down.register_forward_hook(lambda module, args, out: calls.append("dense"))

    def factory(linear, layout):
        layer = sk.BlockSparseLinear.from_linear(linear, layout)
        layer.register_forward_hook(lambda module, args, out: calls.append("factory"))
        layer.register_full_backward_hook(lambda module, gin, gout: calls.append("factory backward"))
        return layer

    sk.sparsify(model, 0.5, B, include=r"down", layer_factory=factory, generator=torch.Generator().manual_seed(1))
    model(torch.randn(3, 32, requires_grad=True)).sum().backward()
    assert calls == ["dense", "factory", "factory backward"]


def test_densify_leaves_a_rigl_controllers_recording_hooks_behind_so_the_plain_model_pickles_without_it():
    import gc
    import io
    import weakref

    model = sk.sparsify(Mlp(), 0.5, B, generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(model.parameters())
    controller = sk.SMET(model, optimizer, regrow="gradient", update_interval=1)
    for _ in range(2):
        model(torch.randn(3, 32)).sum().backward()
        optimizer.step()
        controller.step()
        optimizer.zero_grad()
    sk.densify(model)
    assert not model.up._forward_hooks and not model.down._forward_hooks
    torch.save(model, io.BytesIO())  # a local recorder function does not pickle
    alive = weakref.ref(controller)
    del controller, optimizer
    gc.collect()
    assert alive() is None


def test_a_layer_factory_that_raises_leaves_the_dense_layers_hooks_as_they_were():
    model = Mlp()
    built = []

    def factory(linear, layout):
        if built:
            raise RuntimeError("no second layer")
        layer = sk.BlockSparseLinear.from_linear(linear, layout)
        layer.register_forward_hook(lambda module, args, out: None)
        built.append(layer)
        return layer

    with pytest.raises(RuntimeError, match="no second layer"):
        sk.sparsify(model, 0.5, B, layer_factory=factory, generator=torch.Generator().manual_seed(1))
    assert not model.up._forward_hooks and not model.down._forward_hooks


@pytest.mark.parametrize("reparametrize", ["prune", "weight_norm", "spectral_norm"])
def test_a_torch_weight_reparametrization_is_baked_into_the_sparse_layer_not_carried_as_a_hook(reparametrize):
    from torch.nn.utils import prune

    model = Mlp()
    calls = []
    model.down.register_forward_pre_hook(lambda module, args: calls.append("pre"))
    if reparametrize == "prune":
        prune.random_unstructured(model.down, "weight", 0.3)
    else:
        with warnings.catch_warnings():  # weight_norm: deprecated for torch.nn.utils.parametrizations
            warnings.simplefilter("ignore", FutureWarning)
            getattr(torch.nn.utils, reparametrize)(model.down)
    weight = model.down.weight.detach().clone()
    sk.sparsify(model, 1.0, B, generator=torch.Generator().manual_seed(1))
    model(torch.randn(3, 32))  # raised AttributeError: no weight_orig / weight_g on a BlockSparseLinear
    assert calls == ["pre"]
    torch.testing.assert_close(model.down.to_dense_weight(), weight)
