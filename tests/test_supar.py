"""SμPar (smet_kernels.supar): the multiplier, init std and learning-rate formulas and their checks, the optimizer's
parameter groups, and the init of compact and masked sparse weights (a CPU generator also for a CUDA model)."""

import copy
import math

import pytest
import torch
from torch import nn

from smet_kernels.masked import masked_sparsify
from smet_kernels.optim.smet_adamw import SMETAdamW
from smet_kernels.supar import supar_init_, supar_init_std, supar_lr, supar_multiplier, supar_param_groups
from topology_runs import B, FEATURES, TinyMLP


def test_supar_formulas():
    assert supar_multiplier(1024, 256, 0.25, 1.0) == pytest.approx(1.0)
    assert supar_init_std(0.02, 1024, 256, 0.5) == pytest.approx(0.02 / math.sqrt(2.0))
    assert supar_lr(1e-3, 512, 256, 0.1, 0.2) == pytest.approx(1e-3 / (2.0 * 0.5))
    assert supar_lr(1e-3, 1024, 256, 0.5) == pytest.approx(1e-3 / 2.0)  # a multiplier of 2: lr / m, not / sqrt(m)
    for bad in (dict(width=0), dict(width=math.inf), dict(base_width=-1), dict(density=1.5), dict(base_density=0.0)):
        args = dict(width=512, base_width=256, density=0.5, base_density=1.0) | bad
        with pytest.raises(ValueError, match=next(iter(bad))):
            supar_lr(1e-3, **args)
    for not_a_number in ("512", True):
        with pytest.raises(TypeError, match="width"):
            supar_lr(1e-3, not_a_number, 256, 0.5)


def test_supar_param_groups_and_init():
    model = nn.Sequential(nn.Linear(FEATURES, FEATURES), TinyMLP())
    groups = supar_param_groups(model, lr=1e-3, width=FEATURES, base_width=FEATURES // 2, weight_decay=0.1)
    assert len(groups) == 3 and len(groups[0]["params"]) == 2 and groups[0]["lr"] == 1e-3
    assert groups[0]["weight_decay"] == 0.1
    for group in groups[1:]:
        (param,) = group["params"]
        assert group["lr"] == pytest.approx(1e-3 / (2 * param.smet_layout.density))
        assert group["density_lr_exponent"] == 0.0 and group["weight_decay"] == 0.1
    SMETAdamW(copy.deepcopy(groups), backend="reference")
    torch.optim.AdamW(groups)
    generator = torch.Generator().manual_seed(0)
    assert supar_init_(model, 0.02, width=8 * FEATURES, base_width=FEATURES, generator=generator) is model  # in place
    std = model[1].up.values.std().item()
    assert std == pytest.approx(0.02 / math.sqrt(8 * 0.5), rel=0.1)
    with pytest.raises(ValueError, match="no sparse parameters"):
        supar_param_groups(nn.Linear(4, 4), 1e-3, 4, 4)


@pytest.mark.parametrize("call, error, message", [
    (lambda: supar_init_("model", 0.02, 512, 256), TypeError, "model must be an nn.Module, got str"),
    (lambda: supar_param_groups(None, 1e-3, 512, 256), TypeError, "model must be an nn.Module, got NoneType"),
    (lambda: supar_init_(TinyMLP(), 0.02, 512, 256, generator=0), TypeError, "generator must be a torch.Generator"),
], ids=["init-model", "groups-model", "init-generator"])  # fmt: skip
def test_supar_init_and_param_groups_name_a_model_or_generator_of_the_wrong_type(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_supar_init_keeps_the_inactive_blocks_of_masked_weights_at_zero():
    model = masked_sparsify(nn.Sequential(nn.Linear(FEATURES, FEATURES)), 0.5, B,
                            generator=torch.Generator().manual_seed(0))
    supar_init_(model, 0.02, width=2 * FEATURES, base_width=FEATURES, generator=torch.Generator().manual_seed(1))
    layer = model[0]
    mask = layer.layout.mask.repeat_interleave(B, 0).repeat_interleave(B, 1)
    assert torch.all(layer.weight[~mask] == 0)
    assert layer.weight[mask].std().item() == pytest.approx(0.02 / math.sqrt(2 * 0.5), rel=0.1)


def test_supar_init_of_a_model_without_sparse_weights_is_refused_and_frozen_weights_get_no_group():
    """TinyMLP holds only sparse weights: with one frozen, one group is left (no empty group for the others)."""
    with pytest.raises(ValueError, match="no sparse parameters"):
        supar_init_(nn.Linear(4, 4), 0.02, 512, 256)
    model = TinyMLP()
    model.up.values.requires_grad_(False)
    groups = supar_param_groups(model, lr=1e-3, width=FEATURES, base_width=FEATURES)
    assert [group["params"] for group in groups] == [[model.down.values]]
    model.requires_grad_(False)
    with pytest.raises(ValueError, match=r"^every sparse parameter of model is frozen \(requires_grad=False\): 2 "
                                         r"sparse layers$"):
        supar_param_groups(model, lr=1e-3, width=FEATURES, base_width=FEATURES)


def test_supar_param_groups_refuse_a_density_lr_exponent_which_would_count_the_density_twice():
    with pytest.raises(ValueError, match="^density_lr_exponent must be 0, got 1.0: SμPar's lr / m_rho already is the "):
        supar_param_groups(TinyMLP(), 1e-3, FEATURES, FEATURES, density_lr_exponent=1.0)
    groups = supar_param_groups(TinyMLP(), 1e-3, FEATURES, FEATURES, density_lr_exponent=0.0)  # harmless: taken
    assert groups[-1]["density_lr_exponent"] == 0.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_supar_init_on_cuda_with_a_cpu_generator():
    """The trainer seeds init with a CPU generator; a CUDA model gets the same draws as a CPU one."""
    on_cpu, on_cuda = TinyMLP(), TinyMLP().cuda()
    for model in (on_cpu, on_cuda):
        supar_init_(model, 0.02, width=2 * FEATURES, base_width=FEATURES, generator=torch.Generator().manual_seed(0))
    for p, q in zip(on_cpu.parameters(), on_cuda.parameters()):
        torch.testing.assert_close(q.cpu(), p)
