"""GaLoreAdamW: against a direct re-implementation of the formulas and against galore_torch."""

import copy
import math
import pickle

import pytest
import torch
from torch import nn

from smet_kernels.optim.galore import GaLoreAdamW, galore_param_groups


def reference_galore_steps(weight, grads, lr, betas, eps, weight_decay, rank, gap, scale):
    """The GaLore AdamW update written out with explicit SVDs, one step per gradient."""
    beta1, beta2 = betas
    w = weight.clone()
    m = v = basis = None
    tall = w.shape[0] >= w.shape[1]
    for t, g in enumerate(grads):
        if t % gap == 0:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            basis = vh[:rank] if tall else u[:, :rank]
        r = g @ basis.T if tall else basis.T @ g
        if m is None:
            m, v = torch.zeros_like(r), torch.zeros_like(r)
        m = beta1 * m + (1 - beta1) * r
        v = beta2 * v + (1 - beta2) * r * r
        n = m / (v.sqrt() + eps)
        delta = scale * (n @ basis if tall else basis @ n)
        step_size = lr * math.sqrt(1 - beta2 ** (t + 1)) / (1 - beta1 ** (t + 1))
        w = w - step_size * delta
        w = w - lr * weight_decay * w
    return w


@pytest.mark.parametrize("shape", [(24, 16), (16, 24), (16, 16)])  # square (q/k/v/o): right, as galore_torch
def test_matches_formula(shape):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=gen, dtype=torch.float64)
    grads = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(7)]
    kwargs = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)
    param = nn.Parameter(weight.clone())
    opt = GaLoreAdamW([{"params": [param], "rank": 4, "update_proj_gap": 3, "scale": 0.25}], **kwargs)
    for g in grads:
        param.grad = g.clone()
        opt.step()
    expected = reference_galore_steps(weight, grads, rank=4, gap=3, scale=0.25, **kwargs)
    torch.testing.assert_close(param.detach(), expected, rtol=1e-10, atol=1e-12)
    assert opt.state[param]["exp_avg"].shape == ((shape[0], 4) if shape[0] >= shape[1] else (4, shape[1]))


def test_unprojected_group_is_adamw_with_galore_weight_decay():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    grads = [torch.randn(5, 3, generator=gen, dtype=torch.float64) for _ in range(4)]
    ours = nn.Parameter(weight.clone())
    torch_param = nn.Parameter(weight.clone())
    opt = GaLoreAdamW([ours], lr=0.01, eps=1e-8, weight_decay=0.0)
    ref = torch.optim.AdamW([torch_param], lr=0.01, eps=1e-8, weight_decay=0.0)
    for g in grads:
        ours.grad, torch_param.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    # torch folds eps into the bias-corrected denominator, GaLore into the raw one: equal up to eps effects
    torch.testing.assert_close(ours.detach(), torch_param.detach(), rtol=1e-6, atol=1e-6)


def test_state_dict_round_trip():
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(12, 8, generator=gen) for _ in range(6)]
    a, b = nn.Parameter(torch.zeros(12, 8)), nn.Parameter(torch.zeros(12, 8))
    opt_a = GaLoreAdamW([{"params": [a], "rank": 2}], lr=0.1, update_proj_gap=2)
    opt_b = GaLoreAdamW([{"params": [b], "rank": 2}], lr=0.1, update_proj_gap=2)
    for g in grads[:3]:
        a.grad = g.clone()
        opt_a.step()
    b.data.copy_(a.data)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as if read from a checkpoint file
    for g in grads[3:]:
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    assert torch.equal(a, b)


def test_projected_group_accepts_a_generator_or_a_single_tensor():
    """``{"params": layer.parameters(), "rank": r}`` (a generator) must keep its parameters, as torch groups do."""
    gen = torch.Generator().manual_seed(4)
    a, b = nn.Parameter(torch.randn(8, 6, generator=gen)), nn.Parameter(torch.randn(6, 8, generator=gen))
    opt = GaLoreAdamW([{"params": (p for p in [a]), "rank": 2}, {"params": b, "rank": 2}], lr=0.1)
    assert [g["params"] for g in opt.param_groups] == [[a], [b]]
    before = [a.detach().clone(), b.detach().clone()]
    a.grad, b.grad = torch.randn(8, 6, generator=gen), torch.randn(6, 8, generator=gen)
    opt.step()
    assert not torch.equal(a, before[0]) and not torch.equal(b, before[1])


def test_param_groups_and_bad_input():
    model = nn.ModuleDict({"q_proj": nn.Linear(8, 8, bias=False), "other": nn.Linear(8, 4)})
    groups = galore_param_groups(model, rank=2, update_proj_gap=5, scale=0.5)
    assert [len(g["params"]) for g in groups] == [2, 1]
    assert groups[1]["rank"] == 2 and groups[1]["params"][0] is model["q_proj"].weight
    with pytest.raises(ValueError, match="rank"):
        galore_param_groups(model, rank=0)
    with pytest.raises(ValueError, match="2-D"):
        GaLoreAdamW([{"params": [model["other"].bias], "rank": 2}])
    with pytest.raises(TypeError, match="update_proj_gap"):
        GaLoreAdamW([model["other"].bias], update_proj_gap=1.5)
    with pytest.raises(ValueError, match="lr"):
        GaLoreAdamW([model["other"].bias], lr=-1.0)


def test_matches_galore_torch():
    galore_torch = pytest.importorskip("galore_torch")
    gen = torch.Generator().manual_seed(3)
    params = {"tall": torch.randn(32, 16, generator=gen), "wide": torch.randn(16, 32, generator=gen)}
    bias = torch.randn(16, generator=gen)
    ours = {k: nn.Parameter(v.clone()) for k, v in params.items()}
    theirs = {k: nn.Parameter(v.clone()) for k, v in params.items()}
    ours_bias, theirs_bias = nn.Parameter(bias.clone()), nn.Parameter(bias.clone())
    group = {"rank": 4, "update_proj_gap": 3, "scale": 0.25}
    kwargs = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.05)
    opt = GaLoreAdamW([{"params": [ours_bias]}, {"params": list(ours.values()), **group}], **kwargs)
    ref = galore_torch.GaLoreAdamW(
        [{"params": [theirs_bias]}, {"params": list(theirs.values()), **group, "proj_type": "std"}],
        no_deprecation_warning=True,
        **kwargs,
    )
    for _ in range(8):
        for key in params:
            g = torch.randn(params[key].shape, generator=gen)
            ours[key].grad, theirs[key].grad = g.clone(), g.clone()
        g = torch.randn(16, generator=gen)
        ours_bias.grad, theirs_bias.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        for key in params:
            torch.testing.assert_close(ours[key].detach(), theirs[key].detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours_bias.detach(), theirs_bias.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda opt: pickle.loads(pickle.dumps(opt))],
                         ids=["deepcopy", "pickle"])
def test_a_copied_optimizer_gives_a_new_projected_group_its_own_update_proj_gap_and_scale(clone):
    """torch pickles only defaults, state and groups: the projection defaults must live in the defaults."""
    opt = GaLoreAdamW([nn.Parameter(torch.zeros(3))], lr=0.1, update_proj_gap=7, scale=0.5)
    copied = clone(opt)
    copied.add_param_group({"params": [nn.Parameter(torch.zeros(8, 6))], "rank": 2})
    assert (copied.param_groups[-1]["update_proj_gap"], copied.param_groups[-1]["scale"]) == (7, 0.5)


@pytest.mark.parametrize("scale", [0.0, -0.25, math.nan, math.inf])
def test_a_scale_that_is_not_a_finite_positive_number_is_refused_by_name(scale):
    weight = nn.Parameter(torch.zeros(8, 6))
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        GaLoreAdamW([weight], scale=scale)
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        GaLoreAdamW([{"params": [weight], "rank": 2, "scale": scale}])


def test_a_numpy_scale_is_a_number():
    """``scale`` from a numpy computation (``np.float32``: not a Python ``float``) is accepted, as before its check."""
    import numpy as np

    optimizer = GaLoreAdamW([{"params": [nn.Parameter(torch.zeros(8, 6))], "rank": 2, "scale": np.float32(0.25)}])
    assert optimizer.param_groups[0]["scale"] == 0.25


def test_numpy_integers_are_accepted_as_rank_and_update_gap_and_stored_as_ints():
    """A rank computed with numpy (``np.int64``: not a Python ``int``) was refused as 'must be an int'."""
    import numpy as np

    optimizer = GaLoreAdamW([{"params": [nn.Parameter(torch.randn(8, 6))], "rank": np.int64(2)}],
                            update_proj_gap=np.int32(3))
    group = optimizer.param_groups[0]
    assert (group["rank"], group["update_proj_gap"]) == (2, 3)
    assert type(group["rank"]) is int and type(group["update_proj_gap"]) is int


@pytest.mark.parametrize("kwargs, group, error, message", [
    (dict(betas=(0.9, 1.0)), {}, ValueError, r"betas\[1\] must be a float in \[0, 1\)"),
    (dict(eps=-1e-8), {}, ValueError, "eps must be a finite float > 0"),
    # an always-zero gradient element would step by 0 / 0
    (dict(eps=0.0), {}, ValueError, "eps must be a finite float > 0"),
    (dict(weight_decay=-0.1), {}, ValueError, "weight_decay must be a finite float >= 0"),
    ({}, dict(rank=True), TypeError, "rank must be an int, got bool"),
    ({}, dict(rank=2, update_proj_gap=0), ValueError, "update_proj_gap must be positive"),
    ({}, dict(lr=-1e-3), ValueError, "lr must be a finite float >= 0"),
    ({}, dict(rank=2, betas=(0.9, 1.5)), ValueError, r"betas\[1\] must be a float in \[0, 1\)"),
    ({}, dict(eps=0.0), ValueError, "eps must be a finite float > 0"),
    ({}, dict(weight_decay=math.inf), ValueError, "weight_decay must be a finite float >= 0"),
], ids=["beta2-one", "eps", "eps-zero", "weight-decay", "bool-rank", "group-gap", "group-lr", "group-betas",
        "group-eps", "group-weight-decay"])  # fmt: skip
def test_a_setting_out_of_range_is_refused_by_name_also_in_a_param_group(kwargs, group, error, message):
    with pytest.raises(error, match=message):
        GaLoreAdamW([{"params": [nn.Parameter(torch.zeros(8, 6))], **group}], **kwargs)


@pytest.mark.parametrize("flag", ["amsgrad", "maximize", "capturable", "differentiable"])
def test_a_torch_adamw_flag_it_does_not_implement_is_refused_by_name_not_silently_ignored(flag):
    with pytest.raises(ValueError, match=f"{flag}=True is not supported by GaLoreAdamW"):
        GaLoreAdamW([{"params": [nn.Parameter(torch.zeros(8, 6))], "rank": 2, flag: True}])


@pytest.mark.parametrize("dtype, sparse, message", [
    (torch.float32, True, "sparse gradients"), (torch.complex64, False, "complex parameters"),
], ids=["sparse-grad", "complex"])  # fmt: skip
def test_a_sparse_gradient_or_complex_parameter_is_refused_by_name_before_any_parameter_changes(dtype, sparse, message):
    first, second = nn.Parameter(torch.ones(8, 6)), nn.Parameter(torch.ones(8, 6, dtype=dtype))
    optimizer = GaLoreAdamW([{"params": [first], "rank": 2}, {"params": [second]}], lr=0.1)
    first.grad = torch.ones(8, 6)
    second.grad = torch.ones_like(second).to_sparse() if sparse else torch.ones_like(second)
    with pytest.raises(TypeError, match=f"parameter 0 of param group 1: {message}"):
        optimizer.step()
    assert torch.equal(first, torch.ones(8, 6)) and not optimizer.state


def test_a_projected_group_given_by_name_refuses_a_parameter_that_is_not_2d():
    """``named_parameters()`` pairs (torch >= 2.6): a bias in a group with ``rank`` failed the first step instead."""
    layer = nn.Linear(8, 6)
    with pytest.raises(ValueError, match=r"must be 2-D, got shape \(6,\)"):
        GaLoreAdamW([{"params": list(layer.named_parameters()), "rank": 2}])
    optimizer = GaLoreAdamW([{"params": [("weight", layer.weight)], "rank": 2}])
    assert optimizer.param_groups[0]["params"] == [layer.weight]


def test_a_group_added_with_a_bad_lr_is_refused_and_not_added_and_a_tensor_lr_is_accepted():
    optimizer = GaLoreAdamW([nn.Parameter(torch.zeros(8, 6))], lr=torch.tensor(0.01))
    with pytest.raises(ValueError, match="lr must be a finite float >= 0"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(8, 6))], "rank": 2, "lr": -0.01})
    assert len(optimizer.param_groups) == 1


def test_a_learning_rate_of_zero_is_accepted_and_leaves_the_weights_unchanged():
    """A schedule may start at lr = 0 (warm-up), as with torch's AdamW."""
    weight = nn.Parameter(torch.ones(8, 6))
    optimizer = GaLoreAdamW([{"params": [weight], "rank": 2}], lr=0.0, weight_decay=0.1)
    weight.grad = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    optimizer.step()
    assert torch.equal(weight, torch.ones(8, 6))


def test_param_groups_carry_the_given_gap_and_scale_and_leave_out_frozen_parameters():
    model = nn.ModuleDict({"q_proj": nn.Linear(8, 8, bias=False), "other": nn.Linear(8, 4)})
    model["other"].bias.requires_grad_(False)
    plain, projected = galore_param_groups(model, rank=2, update_proj_gap=5, scale=0.5)
    assert plain["params"] == [model["other"].weight]
    assert (projected["update_proj_gap"], projected["scale"]) == (5, 0.5)


def test_a_bfloat16_weight_is_projected_through_an_fp32_svd_and_keeps_its_dtype():
    gen = torch.Generator().manual_seed(5)
    weight = nn.Parameter(torch.randn(8, 6, generator=gen).to(torch.bfloat16))
    before = weight.detach().clone()
    optimizer = GaLoreAdamW([{"params": [weight], "rank": 2}], lr=0.1)
    weight.grad = torch.randn(8, 6, generator=gen).to(torch.bfloat16)
    optimizer.step()
    assert optimizer.state[weight]["projection"].dtype == weight.dtype == torch.bfloat16
    assert not torch.equal(weight, before)


def test_step_evaluates_a_closure_with_gradients_enabled_and_returns_its_loss():
    weight = nn.Parameter(torch.ones(8, 6))
    optimizer = GaLoreAdamW([{"params": [weight], "rank": 2}], lr=0.1)

    def closure():
        optimizer.zero_grad()
        loss = (weight**2).sum()
        loss.backward()
        return loss

    assert optimizer.step(closure).item() == 48.0 and not torch.equal(weight, torch.ones(8, 6))


def test_a_parameter_without_a_gradient_is_left_as_it_is():
    weight, unused = nn.Parameter(torch.ones(8, 6)), nn.Parameter(torch.ones(8, 6))
    optimizer = GaLoreAdamW([{"params": [weight, unused], "rank": 2}], lr=0.1)
    weight.grad = torch.ones(8, 6)
    optimizer.step()
    assert torch.equal(unused, torch.ones(8, 6)) and unused not in optimizer.state and weight in optimizer.state


def test_a_single_target_name_given_as_a_str_projects_that_layer_not_its_characters():
    model = nn.ModuleDict({"q_proj": nn.Linear(8, 8, bias=False), "other": nn.Linear(8, 4)})
    plain, projected = galore_param_groups(model, rank=2, target_names="q_proj")
    assert projected["params"] == [model["q_proj"].weight] and len(plain["params"]) == 2


def test_a_weight_shared_by_two_target_layers_is_listed_once_and_stepped_once_a_step():
    model = nn.ModuleList([nn.ModuleDict({"q_proj": nn.Linear(8, 8, bias=False)}) for _ in range(2)])
    model[1]["q_proj"].weight = model[0]["q_proj"].weight
    shared = model[0]["q_proj"].weight
    plain, projected = galore_param_groups(model, rank=2)
    assert projected["params"] == [shared] and plain["params"] == []
    optimizer = GaLoreAdamW([projected], lr=0.1)
    shared.grad = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    optimizer.step()
    assert optimizer.state[shared]["step"] == 1


def test_a_module_given_as_a_param_of_a_projected_group_is_refused_by_torchs_type_error():
    with pytest.raises(TypeError, match="optimizer can only optimize Tensors"):
        GaLoreAdamW([{"params": [nn.Linear(8, 8)], "rank": 2}])


def test_param_groups_of_something_that_is_no_module_are_refused_naming_model():
    with pytest.raises(TypeError, match="model must be an nn.Module, got generator"):
        galore_param_groups(nn.Linear(8, 8).parameters(), rank=2)


def test_param_groups_of_a_model_without_a_target_layer_are_refused_not_plain_adamw_in_disguise():
    """GPT-2's Conv1D attention (``c_attn``) or a misspelt name matched no ``nn.Linear``: the model trained as plain
    AdamW, reported as GaLore."""
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"no nn.Linear layer named by target_names \['c_attn'\]: nothing to "
                                         "project"):
        galore_param_groups(model, rank=2, target_names="c_attn")
