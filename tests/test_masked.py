"""Masked-DST baseline: MaskedLinear, masked_sparsify, and the SMET controller on dense masked weights."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smet_kernels.functional import to_dense
from smet_kernels.layout import BlockLayout
from smet_kernels.masked import MaskedLinear, masked_sparsify
from smet_kernels.modules import BlockSparseLinear, sparsify
from smet_kernels.topology import SMET
from topology_runs import FRESH_STATE_OPTIMIZERS

B = 16


def expand(layout):
    return layout.mask.repeat_interleave(B, 0).repeat_interleave(B, 1)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(32, 64, bias=False)
        self.up_proj = nn.Linear(64, 64, bias=True)
        self.lm_head = nn.Linear(64, 48, bias=False)

    def forward(self, x):
        return self.lm_head(torch.relu(self.up_proj(self.q_proj(x))))


def test_forward_and_gradient_are_masked():
    layer = MaskedLinear(64, 32, density=0.5, block_size=B, bias=True, generator=torch.Generator().manual_seed(0))
    mask = expand(layer.layout)
    assert torch.all(layer.weight.detach()[~mask] == 0) and layer.weight.smet_mask_layout is layer.layout
    assert not hasattr(layer.weight, "smet_layout")
    with torch.no_grad():
        layer.weight.add_(1.0)  # inactive entries must not leak into the output
    x = torch.randn(5, 64, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, F.linear(x, layer.weight * mask, layer.bias))
    y.sum().backward()
    assert torch.all(layer.weight.grad[~mask] == 0) and torch.any(layer.weight.grad[mask] != 0)


def test_mask_follows_layout_updates():
    layer = MaskedLinear(32, 32, density=0.5, block_size=B, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 32)
    layer(x)
    inactive = (~layer.layout.mask).nonzero()[0]
    layer.layout.replace_blocks(torch.tensor([0]), inactive[None])
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight * expand(layer.layout), layer.bias))


def test_a_mask_first_built_by_an_evaluation_under_inference_mode_serves_training():
    """After a topology update an evaluation under ``torch.inference_mode`` built the new mask as an inference
    tensor, which the next training backward refused to save."""
    layer = MaskedLinear(32, 32, density=0.5, block_size=B, generator=torch.Generator().manual_seed(0))
    layer.layout.replace_blocks(torch.tensor([0]), (~layer.layout.mask).nonzero()[:1])
    with torch.inference_mode():
        layer(torch.randn(2, 32))
    layer(torch.randn(2, 32)).sum().backward()
    assert torch.equal(layer.weight.grad != 0, expand(layer.layout))


def test_mask_follows_a_new_layout_object():
    layer = MaskedLinear(32, 32, density=0.5, block_size=B, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 32)
    layer(x)
    layer.layout = BlockLayout.from_mask(~layer.layout.mask, B)  # also at version 0, like the old one
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight * expand(layer.layout), layer.bias))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_layer_with_a_cpu_generator():
    """A CPU generator seeds a CUDA layer (as sparsify's does) and gives the CPU layer's weights."""
    layers = [MaskedLinear(64, 32, 0.5, B, bias=True, device=device, generator=torch.Generator().manual_seed(0))
              for device in ("cpu", "cuda")]
    torch.testing.assert_close(layers[1].weight.cpu(), layers[0].weight)
    torch.testing.assert_close(layers[1].bias.cpu(), layers[0].bias)


def test_constructor_validation():
    with pytest.raises(TypeError, match="density"):
        MaskedLinear(32, 32, block_size=B)
    with pytest.raises(TypeError, match="layout"):
        MaskedLinear(32, 32, layout="dense")
    with pytest.raises(ValueError, match="layout.shape"):
        MaskedLinear(32, 64, layout=BlockLayout.random(32, 32, B, 0.5))
    with pytest.raises(ValueError, match="density"):
        MaskedLinear(32, 32, density=1.5, block_size=B)


@pytest.mark.parametrize("x, error, message", [
    (torch.ones(2, 32), ValueError, r"x must have shape \[\.\.\., 64\] \(in_features of the layout\), got \(2, 32\)"),
    (torch.ones(2, 64, dtype=torch.int64), TypeError, "x must be a floating tensor"),
    (torch.ones(2, 64, dtype=torch.float64), TypeError, "weight has dtype torch.float32 but x has dtype torch.float64"),
    (torch.ones(2, 64, device="meta"), ValueError, "weight is on cpu but x is on meta"),
])  # fmt: skip
def test_forward_names_x_when_its_shape_dtype_or_device_does_not_fit_the_layer(x, error, message):
    with pytest.raises(error, match=message):
        MaskedLinear(64, 32, 0.5, B)(x)


def test_forward_under_autocast_takes_x_of_another_dtype_than_the_weight():
    layer = MaskedLinear(64, 32, 0.5, B)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.ones(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_from_linear_keeps_active_blocks():
    linear = nn.Linear(32, 48, bias=True)
    layout = BlockLayout.random(48, 32, B, 0.5, generator=torch.Generator().manual_seed(1))
    masked = MaskedLinear.from_linear(linear, layout)
    torch.testing.assert_close(masked.weight, linear.weight * expand(layout), rtol=0, atol=0)
    torch.testing.assert_close(masked.bias, linear.bias, rtol=0, atol=0)


def test_masked_sparsify_matches_sparsify():
    torch.manual_seed(0)
    dense = Block()
    compact_model, masked_model = Block(), Block()
    compact_model.load_state_dict(dense.state_dict())
    masked_model.load_state_dict(dense.state_dict())
    sparsify(compact_model, 0.5, B, "erk", exclude="lm_head", generator=torch.Generator().manual_seed(3))
    masked_sparsify(masked_model, 0.5, B, "erk", exclude="lm_head", generator=torch.Generator().manual_seed(3))
    assert isinstance(masked_model.q_proj, MaskedLinear) and isinstance(masked_model.up_proj, MaskedLinear)
    assert type(masked_model.lm_head) is nn.Linear
    for name in ("q_proj", "up_proj"):
        c, m = getattr(compact_model, name), getattr(masked_model, name)
        assert c.layout == m.layout
        torch.testing.assert_close(m.weight, to_dense(c.values, c.layout), rtol=0, atol=0)
    torch.testing.assert_close(masked_model.up_proj.bias, dense.up_proj.bias, rtol=0, atol=0)
    x = torch.randn(4, 32)
    torch.testing.assert_close(masked_model(x), compact_model(x), rtol=1e-5, atol=1e-5)


def test_masked_sparsify_validation():
    with pytest.raises(TypeError, match="model"):
        masked_sparsify("model", 0.5, B)
    with pytest.raises(ValueError, match="density"):
        masked_sparsify(Block(), 0.0, B)
    with pytest.raises(ValueError, match="no nn.Linear"):
        masked_sparsify(Block(), 0.5, B, include="nothing_matches")
    with pytest.raises(ValueError, match="nn.Linear"):
        masked_sparsify(nn.Linear(32, 32), 0.5, B)


def test_layout_round_trips_through_state_dict():
    source = MaskedLinear(32, 64, density=0.5, block_size=B, generator=torch.Generator().manual_seed(0))
    target = MaskedLinear(32, 64, density=0.5, block_size=B, generator=torch.Generator().manual_seed(1))
    layout_object = target.layout
    target.load_state_dict(source.state_dict())
    assert target.layout is layout_object and target.layout == source.layout
    x = torch.randn(2, 32)
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def _masked_model(seed=0):
    torch.manual_seed(seed)
    model = Block()
    return masked_sparsify(model, 0.5, B, exclude="lm_head", generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("regrow_init", ["zeros", "normal"])
def test_controller_on_masked_weights(regrow_init):
    model = _masked_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    smet = SMET(model, opt, update_interval=2, prune_fraction=0.4, regrow_init=regrow_init, init_std=0.1)
    assert {t.name for t in smet.targets} == {"q_proj.weight", "up_proj.weight"}
    for step in range(1, 5):
        x = torch.randn(4, 32)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        old = {n: (m.layout.mask.clone(), m.weight.detach().clone()) for n, m in model.named_modules()
               if isinstance(m, MaskedLinear)}
        record = smet.step()
        if record is None:
            continue
        for name, (old_mask, old_weight) in old.items():
            layer = getattr(model, name)
            state = opt.state[layer.weight]
            new_mask = layer.layout.mask
            pruned, grown = old_mask & ~new_mask, new_mask & ~old_mask
            n = record["layers"][f"{name}.weight"]["pruned"]
            assert n > 0 and int(pruned.sum()) == int(grown.sum()) == n and layer.layout.nnz == int(old_mask.sum())
            w = layer.weight.detach().reshape(new_mask.shape[0], B, new_mask.shape[1], B).permute(0, 2, 1, 3)
            assert torch.all(w[pruned] == 0)
            if regrow_init == "zeros":
                assert torch.all(w[grown] == 0)
            else:
                assert torch.all(w[grown] != 0) and w[grown].std() < 0.2
            for key in ("exp_avg", "exp_avg_sq"):
                moments = state[key].reshape(new_mask.shape[0], B, new_mask.shape[1], B).permute(0, 2, 1, 3)
                assert torch.all(moments[grown] == 0)
            kept = old_mask & new_mask
            old_w = old_weight.reshape(new_mask.shape[0], B, new_mask.shape[1], B).permute(0, 2, 1, 3)
            assert torch.equal(w[kept], old_w[kept])
            l1 = old_w.abs().sum((2, 3))
            assert l1[pruned].max() < l1[kept].min()
            x = torch.randn(2, layer.in_features)
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight * expand(layer.layout), layer.bias))


def test_a_masked_update_zeroes_every_adam_moment_amsgrads_maximum_included_of_pruned_and_regrown_blocks():
    """A block pruned now and regrown later must start without the moments it had: AMSGrad's ``max_exp_avg_sq``
    would otherwise keep damping its steps."""
    model = _masked_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, amsgrad=True)
    smet = SMET(model, opt, update_interval=1, prune_fraction=0.4)
    model(torch.randn(4, 32)).pow(2).mean().backward()
    opt.step()
    old = model.q_proj.layout.mask.clone()
    smet.step()
    new, state = model.q_proj.layout.mask, opt.state[model.q_proj.weight]
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        moments = state[key].reshape(new.shape[0], B, new.shape[1], B).permute(0, 2, 1, 3)
        assert moments[old].abs().sum() > 0 and torch.all(moments[old ^ new] == 0), key


def test_a_masked_update_zeroes_the_sgd_momentum_of_pruned_and_regrown_blocks():
    """SGD's ``momentum_buffer`` would otherwise move a regrown block with the momentum it had when pruned."""
    model = _masked_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    smet = SMET(model, opt, update_interval=1, prune_fraction=0.4)
    model(torch.randn(4, 32)).pow(2).mean().backward()
    opt.step()
    old = model.q_proj.layout.mask.clone()
    smet.step()
    new, buffer = model.q_proj.layout.mask, opt.state[model.q_proj.weight]["momentum_buffer"]
    moments = buffer.reshape(new.shape[0], B, new.shape[1], B).permute(0, 2, 1, 3)
    assert moments[old & new].abs().sum() > 0 and torch.all(moments[old ^ new] == 0)


@pytest.mark.parametrize("name", FRESH_STATE_OPTIMIZERS)
def test_a_masked_update_starts_every_optimizer_state_of_regrown_blocks_where_a_fresh_optimizer_starts_it(name):
    """Only Adam's, AMSGrad's and SGD's state restarted at pruned and regrown blocks: RMSprop's, Adagrad's or Rprop's
    state of a block pruned now went on scaling it once regrown later."""
    make_optimizer, fresh = FRESH_STATE_OPTIMIZERS[name]
    model = _masked_model()
    opt = make_optimizer(model.parameters())
    smet = SMET(model, opt, update_interval=1, prune_fraction=0.4)
    for _ in range(2):
        model(torch.randn(4, 32)).pow(2).mean().backward()
        opt.step()
    old = model.q_proj.layout.mask.clone()
    before = {key: opt.state[model.q_proj.weight][key].clone() for key in fresh}
    smet.step()
    new = model.q_proj.layout.mask
    assert (new & ~old).any()
    for key, value in fresh.items():
        blocks = opt.state[model.q_proj.weight][key].reshape(new.shape[0], B, new.shape[1], B).permute(0, 2, 1, 3)
        was = before[key].reshape(new.shape[0], B, new.shape[1], B).permute(0, 2, 1, 3)
        assert torch.all(blocks[old ^ new] == value) and torch.equal(blocks[old & new], was[old & new]), key
        assert not torch.all(was[old & ~new] == value), key  # the pruned blocks' state was not fresh


def test_a_masked_update_leaves_optimizer_state_that_is_not_per_weight_as_it_is_on_a_square_layer():
    """GaLore's ``[d, d]`` projection of a square layer is shaped like the weight but is no per-weight state: an
    update that zeroed its blocks made it no longer orthonormal."""
    from smet_kernels.optim.galore import GaLoreAdamW

    model = masked_sparsify(nn.Sequential(nn.Linear(32, 32, bias=False)), 0.5, B,
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
    weight = model[0].weight
    opt = GaLoreAdamW([{"params": [weight], "rank": 32}], lr=1e-2)
    smet = SMET(model, opt, update_interval=1, prune_fraction=0.5)
    for _ in range(2):
        model(torch.randn(4, 32)).pow(2).mean().backward()
        opt.step()
    projection = opt.state[weight]["projection"].clone()
    assert smet.step()["layers"]["0.weight"]["regrown"] > 0
    assert torch.equal(opt.state[weight]["projection"], projection)


@pytest.mark.parametrize("regrow", ["random", "gradient"])
def test_compact_and_masked_make_identical_decisions(regrow):
    """One selection function serves both storage schemes: same weights, seed and gradients -> same topology."""
    compact = nn.Sequential(BlockSparseLinear(64, 64, 0.5, B, generator=torch.Generator().manual_seed(4),
                                              backend="reference"))
    masked = nn.Sequential(MaskedLinear(64, 64, layout=compact[0].layout.clone()))
    with torch.no_grad():
        masked[0].weight.copy_(to_dense(compact[0].values, compact[0].layout))
    runs = []
    for model in (compact, masked):
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        smet = SMET(model, opt, update_interval=1, prune_fraction=0.5, regrow=regrow, regrow_init="normal", seed=9)
        x = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
        model(x).pow(2).sum().backward()
        opt.step()
        smet.step()
        layer = model[0]
        weight = layer.to_dense_weight() if isinstance(layer, BlockSparseLinear) else layer.weight
        runs.append((layer.layout.mask.clone(), weight.detach().clone()))
    assert torch.equal(runs[0][0], runs[1][0])
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=0, atol=0)


def test_compact_and_masked_prune_the_same_blocks_when_their_norms_differ_only_by_rounding():
    """Blocks holding the same values in other orders: the masked scores were summed in another order than the compact
    ones (over the dense weight's block grid), so their last bits, hence the pruned blocks, differed."""
    compact = nn.Sequential(BlockSparseLinear(64, 64, 0.5, B, generator=torch.Generator().manual_seed(4),
                                              backend="reference"))
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(B * B, generator=gen)
    with torch.no_grad():
        blocks = [values[torch.randperm(B * B, generator=gen)] for _ in range(8)]
        compact[0].values.copy_(torch.stack(blocks).view(8, B, B))
    masked = nn.Sequential(MaskedLinear(64, 64, layout=compact[0].layout.clone()))
    with torch.no_grad():
        masked[0].weight.copy_(to_dense(compact[0].values, compact[0].layout))
    for model in (compact, masked):
        SMET(model, torch.optim.SGD(model.parameters(), lr=0.0), update_interval=1, prune_fraction=0.5).step()
    assert torch.equal(compact[0].layout.block_indices, masked[0].layout.block_indices)


def test_weight_keeps_its_mask_layout_tag_when_replaced():
    import copy

    layer = MaskedLinear(32, 32, density=0.5, block_size=16)
    assert layer.weight.smet_mask_layout is layer.layout
    clone = copy.deepcopy(layer)
    assert clone.weight.smet_mask_layout is clone.layout
    layer.load_state_dict(clone.state_dict(), assign=True)
    assert layer.weight.smet_mask_layout is layer.layout


def test_compiled_masked_model_follows_topology_updates_without_recompiling():
    """``smet-train --compile --optimizer masked-dst``: a guard on the layout's Python version recompiled the model at
    every update, and ``fullgraph=True`` failed at Dynamo's recompile limit."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = _masked_model()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    smet = SMET(model, opt, update_interval=1, prune_fraction=0.4, seed=0)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        opt.zero_grad()
        compiled(x).pow(2).mean().backward()
        opt.step()
        smet.step()
    assert model.q_proj.layout.version == 3 and counter.frame_count == 1
    torch.testing.assert_close(compiled(x), model(x))  # the eager function of the current topology


@pytest.mark.parametrize("compiled", [False, True])
def test_a_topology_update_between_forward_and_backward_is_refused(compiled):
    """As the block-sparse products: the backward would give the old mask's gradient to the new topology (non-zero
    gradient in a block just pruned), so it raises, eagerly and compiled."""
    torch._dynamo.reset()
    model = _masked_model()
    run = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
    loss = run(torch.randn(4, 32)).pow(2).mean()
    layout = model.q_proj.layout
    layout.replace_blocks(torch.tensor([0]), (~layout.mask).nonzero()[:1])
    with pytest.raises(RuntimeError, match="changed between forward .* and backward"):
        loss.backward()


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # inside torch.func's vmap
def test_torch_func_transforms_run_through_a_masked_layer():
    """``W ⊙ M`` is an autograd function (for its layout check): ``torch.func`` (per-sample gradients with
    ``vmap(grad)``; ``jvp`` eagerly) ran through the plain ``W * M`` and must still run, with the masked results."""
    from torch.func import functional_call, grad, jvp, vmap

    layer = MaskedLinear(32, 32, density=0.5, block_size=B, generator=torch.Generator().manual_seed(0))
    mask, weight = expand(layer.layout).float(), layer.weight.detach()
    x, tangent = torch.randn(4, 32), torch.randn(32, 32)

    def loss(w, row):
        return functional_call(layer, {"weight": w}, (row[None],)).pow(2).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(weight, x)
    for row, got in zip(x, per_sample):
        w = weight.clone().requires_grad_()
        (expected,) = torch.autograd.grad(F.linear(row[None], w * mask).pow(2).sum(), w)
        torch.testing.assert_close(got, expected)
    _, out_tangent = jvp(lambda w: functional_call(layer, {"weight": w}, (x,)), (weight,), (tangent,))
    torch.testing.assert_close(out_tangent, x @ (tangent * mask).T)


def test_masked_sparsify_of_a_bare_linear_points_to_masked_linear_from_linear():
    with pytest.raises(ValueError, match=r"model is itself an nn.Linear: use MaskedLinear\.from_linear"):
        masked_sparsify(nn.Linear(32, 32), density=0.5, block_size=16)


def test_masked_weight_is_drawn_within_one_over_root_in_features():
    layer = MaskedLinear(64, 16, density=1.0, block_size=16, bias=True, generator=torch.Generator().manual_seed(0))
    bound = 1 / 8  # 1 / √64, not 1 / √16
    assert 0.9 * bound < layer.weight.abs().max() <= bound and 0.5 * bound < layer.bias.abs().max() <= bound


def test_dense_mask_is_rebuilt_in_the_weights_new_dtype():
    layer = MaskedLinear(32, 32, density=0.5, block_size=16)
    assert layer.dense_mask().dtype == torch.float32
    layer.to(torch.float64)
    assert layer.cached_dense_mask() is None and layer.dense_mask().dtype == torch.float64


def test_to_dense_weight_zeroes_inactive_blocks_even_when_the_weight_holds_values_there():
    layout = BlockLayout(torch.tensor([[0, 1]]), (32, 32), 16)
    layer = MaskedLinear(32, 32, layout=layout)
    with torch.no_grad():
        layer.weight.fill_(1.0)  # e.g. a dense state dict loaded into it
    expected = torch.zeros(32, 32)
    expected[:16, 16:] = 1.0
    assert torch.equal(layer.to_dense_weight(), expected)


def test_the_dense_mask_is_built_once_per_layout_version_and_reported_as_cached():
    layer = MaskedLinear(32, 32, 0.5, B, generator=torch.Generator().manual_seed(0))
    mask = layer.dense_mask()
    assert layer.cached_dense_mask() is mask and layer.dense_mask() is mask
    free = (~layer.layout.mask).nonzero()[:1]
    layer.layout.replace_blocks(torch.tensor([0]), free)
    assert layer.cached_dense_mask() is None and layer.dense_mask() is not mask


def test_from_linear_keeps_the_dtype_of_the_dense_layer():
    linear = nn.Linear(32, 32, dtype=torch.float64)
    masked = MaskedLinear.from_linear(linear, BlockLayout.random(32, 32, B, 0.5))
    assert masked.weight.dtype == torch.float64 and masked.bias.dtype == torch.float64
    torch.testing.assert_close(masked.bias, linear.bias, rtol=0, atol=0)
