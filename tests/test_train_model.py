"""The LLaMA model of the reference trainer, composed from its parts: attention over rotated heads, the sublayers'
own norms, the final norm before the head, the loss in fp32, re-initialisation and the shape catalog."""

import dataclasses
import math

import pytest
import torch

from smet_kernels.train.model import (
    Attention,
    DecoderLayer,
    LlamaModel,
    RMSNorm,
    apply_rope,
    layer_linear_shapes,
    lm_loss,
    model_config,
    rope_tables,
)


def test_attention_is_causal_softmax_of_rotated_queries_and_keys_per_head_over_the_values():
    """Per head h: softmax(RoPE(q_h) RoPE(k_h)ᵀ / √d + causal mask) v_h, the heads concatenated before o_proj."""
    config = model_config("tiny", max_seq_len=6)
    attention = Attention(config)
    x = torch.randn(2, 6, config.hidden_size, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    attention.double()
    cos, sin = (t.double() for t in rope_tables(config.head_dim, 6, config.rope_theta))
    d = config.head_dim
    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    heads = []
    with torch.no_grad():
        for h in range(config.num_heads):
            rows = slice(h * d, (h + 1) * d)
            q = apply_rope(x @ attention.q_proj.weight[rows].t(), cos, sin)
            k = apply_rope(x @ attention.k_proj.weight[rows].t(), cos, sin)
            v = x @ attention.v_proj.weight[rows].t()
            scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~mask, -math.inf)
            heads.append(scores.softmax(-1) @ v)
        expected = torch.cat(heads, dim=-1) @ attention.o_proj.weight.t()
        torch.testing.assert_close(attention(x, cos, sin), expected)


def test_each_sublayer_of_a_decoder_layer_is_normalised_by_its_own_norm_weight():
    config = model_config("tiny", max_seq_len=4)
    layer = DecoderLayer(config)
    x = torch.randn(1, 4, config.hidden_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        layer.mlp_norm.weight.mul_(3.0)
        expected = x + layer.attn(layer.attn_norm(x), *rope_tables(config.head_dim, 4, config.rope_theta))
        expected = expected + layer.mlp(layer.mlp_norm(expected))
        torch.testing.assert_close(layer(x, *rope_tables(config.head_dim, 4, config.rope_theta)), expected)


def test_logits_are_the_head_of_the_final_norm_of_the_last_layer():
    torch.manual_seed(0)
    model = LlamaModel(model_config("tiny", max_seq_len=8))
    tokens = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        model.norm.weight.mul_(2.0)
        x = model.embed(tokens)
        for layer in model.layers:
            x = layer(x, model.rope_cos[:8], model.rope_sin[:8])
        torch.testing.assert_close(model(tokens), model.lm_head(model.norm(x)))


def test_the_loss_of_bf16_logits_is_computed_and_returned_in_fp32():
    logits = (4 * torch.randn(3, 5, 256, generator=torch.Generator().manual_seed(6))).to(torch.bfloat16)
    targets = torch.randint(0, 256, (3, 5), generator=torch.Generator().manual_seed(7))
    loss = lm_loss(logits, targets)
    assert loss.dtype == torch.float32
    assert loss.item() == torch.nn.functional.cross_entropy(logits.float().reshape(-1, 256), targets.reshape(-1)).item()


def test_reset_parameters_sets_the_norm_weights_back_to_one():
    model = LlamaModel(model_config("tiny", max_seq_len=8))
    with torch.no_grad():
        for norm in (model.norm, model.layers[0].attn_norm, model.layers[1].mlp_norm):
            norm.weight.fill_(0.5)
    model.reset_parameters()
    for norm in (model.norm, model.layers[0].attn_norm, model.layers[1].mlp_norm):
        assert torch.equal(norm.weight, torch.ones(64))


def test_the_shape_catalog_has_the_weight_shape_of_every_hidden_linear_of_a_model():
    config = model_config("tiny", max_seq_len=8)
    layer = LlamaModel(config).layers[0]
    shapes = {name: tuple(module.weight.shape) for name, module in layer.named_modules() if hasattr(module, "weight")
              and isinstance(module, torch.nn.Linear)}
    assert {name.split(".")[-1]: shape for name, shape in shapes.items()} == layer_linear_shapes(config)


def test_rmsnorm_of_a_bf16_input_is_the_fp32_result_rounded_once():
    norm = RMSNorm(64)
    x = (torch.randn(32, 64, generator=torch.Generator().manual_seed(8)) * 10).to(torch.bfloat16)
    x_float = x.float()
    expected = (x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + norm.eps)).to(torch.bfloat16)
    assert torch.equal(norm(x), expected)


@pytest.mark.parametrize("vocab_size", [1, 0, 2.0, True, "256"])
def test_a_vocabulary_that_is_not_an_int_of_at_least_2_is_refused_naming_it(vocab_size):
    with pytest.raises(ValueError, match=f"^vocab_size must be an int >= 2, got {vocab_size!r}$"):
        model_config("tiny", vocab_size=vocab_size)


def test_a_hidden_size_that_the_number_of_heads_does_not_divide_is_refused_naming_both():
    config = dataclasses.replace(model_config("tiny"), num_heads=3)
    with pytest.raises(ValueError, match=f"^hidden_size {config.hidden_size} is not divisible by num_heads 3$"):
        LlamaModel(config)


def test_an_odd_head_dim_is_refused_naming_it_instead_of_a_shape_error_in_rope():
    config = dataclasses.replace(model_config("tiny"), hidden_size=66)  # 2 heads of 33 dims
    with pytest.raises(ValueError, match=r"^head dim hidden_size / num_heads = 33 must be even for RoPE \(hidden_size "
                                         r"66, num_heads 2\)$"):
        LlamaModel(config)
