"""SMETAdamW's state dicts from elsewhere and their loading: torch.optim.AdamW states (fused included, sparse values
without ``block_step``), step counters that stay on the CPU, unsupported AdamW flags, tensor learning rates, and
``load_state_dict`` hooks run in torch's order."""

import copy
import math

import pytest
import torch

from smet_kernels.optim.smet_adamw import SMETAdamW
from test_smet_adamw import BETAS, EPS, dense_param, grads_for, make_params, sparse_param


def _torch_adamw_after_three_steps(params, fused=None):
    """``torch.optim.AdamW`` stepped three times over ``params``, and copies of them (layout tags kept) to resume
    its state into."""
    reference = torch.optim.AdamW(params, lr=0.01, betas=BETAS, eps=EPS, weight_decay=0.1, fused=fused)
    for step in range(3):
        for p, g in zip(params, grads_for(step, params)):
            p.grad = g
        reference.step()
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, resumed):
        if hasattr(p, "smet_layout"):
            q.smet_layout = p.smet_layout
    return reference, resumed


def _assert_steps_match(params, reference, resumed, optimizer):
    """Three more steps of ``reference`` over ``params`` and of ``optimizer`` over ``resumed`` end equal."""
    for step in range(3, 6):
        for p, q, g in zip(params, resumed, grads_for(step, params)):
            p.grad, q.grad = g, g.clone()
        reference.step()
        optimizer.step()
    for p, q in zip(params, resumed):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-5, atol=1e-6)


def test_a_torch_adamw_state_dict_loads_and_the_dense_parameters_continue_as_torch_adamw(device):
    """Its groups lack SMET's options: they take the defaults, warm-up scope "regrown" (plain AdamW when dense)."""
    params = [dense_param((8, 24), seed=2, device=device), dense_param((24,), seed=4, device=device)]
    reference, resumed = _torch_adamw_after_three_steps(params)
    optimizer = SMETAdamW(resumed, backend="reference")
    optimizer.load_state_dict(copy.deepcopy(reference.state_dict()))  # not aliasing its moments
    assert optimizer.param_groups[0]["warmup_scope"] == "regrown"
    _assert_steps_match(params, reference, resumed, optimizer)


def test_a_fused_torch_adamw_state_dict_loads_with_its_steps_on_the_cpu(device):
    """torch moves a loaded ``step`` to the parameter's device when the saved group says ``fused``: on a GPU every
    dense parameter's step then cost a device sync (``.item()``) in each optimizer step. (The device check bites on
    a GPU only, where ``device`` is CUDA; on the CPU the test checks that a fused AdamW's state continues exactly.)"""
    params = [dense_param((8, 24), seed=2, device=device), dense_param((24,), seed=4, device=device)]
    reference, resumed = _torch_adamw_after_three_steps(params, fused=True)
    optimizer = SMETAdamW(resumed, backend="reference")
    optimizer.load_state_dict(copy.deepcopy(reference.state_dict()))
    assert [optimizer.state[p]["step"].device.type for p in resumed] == ["cpu", "cpu"]
    _assert_steps_match(params, reference, resumed, optimizer)


@pytest.mark.parametrize("bias_correction", ["local", "global"])
def test_step_counters_stay_on_the_cpu_whatever_the_default_device(bias_correction):
    """Every step reads each dense parameter's ``step`` (and, bias-corrected globally, each sparse one's) with
    ``.item()``: made on the default device, under ``torch.set_default_device("cuda")`` that was a device sync per
    parameter per step. The meta device stands in for CUDA here (``.item()`` of a meta tensor raises)."""
    params = make_params("cpu")
    optimizer = SMETAdamW(params, lr=1e-2, betas=BETAS, eps=EPS, bias_correction=bias_correction,
                          backend="reference")
    expected = make_params("cpu")
    reference = SMETAdamW(expected, lr=1e-2, betas=BETAS, eps=EPS, bias_correction=bias_correction,
                          backend="reference")
    for step in (1, 2):
        for group in (params, expected):
            for param, grad in zip(group, grads_for(step, group)):
                param.grad = grad
        with torch.device("meta"):
            optimizer.step()
        reference.step()
    counters = [optimizer.state[p]["step"] for p in params if "step" in optimizer.state[p]]
    assert len(counters) == (4 if bias_correction == "global" else 2)
    assert all(c.device.type == "cpu" and c.item() == 2.0 for c in counters)
    for param, same in zip(params, expected):
        torch.testing.assert_close(param, same, rtol=0, atol=0)


@pytest.mark.parametrize("bias_correction", ["local", "global"])
def test_a_torch_adamw_state_of_sparse_values_loads_with_every_slot_at_its_step(device, bias_correction):
    """torch.optim.AdamW keeps one ``step`` per tensor and no ``block_step``: the first step raised KeyError."""
    params = make_params(device)
    reference, resumed = _torch_adamw_after_three_steps(params)
    optimizer = SMETAdamW(resumed, warmup="none", density_lr_exponent=0.0, bias_correction=bias_correction,
                          backend="reference")  # plain AdamW on the sparse values too
    optimizer.load_state_dict(copy.deepcopy(reference.state_dict()))
    assert optimizer.state[resumed[0]]["block_step"].tolist() == [3] * resumed[0].shape[0]
    assert ("step" in optimizer.state[resumed[0]]) == (bias_correction == "global")  # local: block_step replaces it
    _assert_steps_match(params, reference, resumed, optimizer)


def test_loading_its_own_state_dict_adds_no_option_to_its_groups():
    """torch's ``load_state_dict`` puts ``differentiable`` into the defaults (``__setstate__``): filling a saved
    group's missing options from them must not copy it in (a resumed FSDP run's groups differed from the saved)."""
    optimizer = SMETAdamW([dense_param((8, 24), seed=2, device="cpu")], lr=0.01, backend="reference")
    saved = copy.deepcopy(optimizer.state_dict())
    optimizer.load_state_dict(copy.deepcopy(saved))
    assert optimizer.state_dict()["param_groups"] == saved["param_groups"]


@pytest.mark.parametrize("flag", ["amsgrad", "maximize", "capturable", "differentiable"])
def test_an_unsupported_adamw_flag_in_a_group_or_a_loaded_state_is_refused_by_name(flag):
    param = dense_param((4,), seed=0)
    optimizer = SMETAdamW([param], lr=0.01)
    with pytest.raises(ValueError, match=f"^{flag}=True is not supported"):
        optimizer.add_param_group({"params": [dense_param((4,), seed=1)], flag: True})
    assert len(optimizer.param_groups) == 1
    saved = torch.optim.AdamW([param], lr=0.02, **{flag: True}).state_dict()
    with pytest.raises(ValueError, match=f"^{flag}=True is not supported"):
        optimizer.load_state_dict(saved)
    assert optimizer.param_groups[0]["lr"] == 0.01 and flag not in optimizer.param_groups[0]


@pytest.mark.parametrize("other_density", [0.25, 1.0])
def test_a_state_of_parameters_of_other_shapes_is_refused_by_name_at_load_and_changes_nothing(other_density):
    """The state of another model (here sparse values of another density) loaded without a look, and the next step
    raised naming positions in its fused batch (``exp_avgs[0]``), not the parameter."""
    saved_params = [sparse_param(64, 48, 16, other_density, seed=1), dense_param((8, 24), seed=2)]
    saved_optimizer = SMETAdamW(saved_params, lr=0.02, backend="reference")
    for p, g in zip(saved_params, grads_for(0, saved_params)):
        p.grad = g
    saved_optimizer.step()
    params = [sparse_param(64, 48, 16, 0.5, seed=1), dense_param((8, 24), seed=2)]
    optimizer = SMETAdamW(params, lr=0.01, backend="reference")
    with pytest.raises(ValueError, match="^state of parameter 0 of param group 0: exp_avg has shape"):
        optimizer.load_state_dict(saved_optimizer.state_dict())
    assert optimizer.param_groups[0]["lr"] == 0.01 and not optimizer.state


def test_a_torch_adam_state_with_l2_weight_decay_is_refused():
    param = dense_param((4,), seed=0)
    with pytest.raises(ValueError, match="^decoupled_weight_decay=False"):
        SMETAdamW([param]).load_state_dict(torch.optim.Adam([param], weight_decay=0.1).state_dict())
    SMETAdamW([param]).load_state_dict(torch.optim.Adam([param]).state_dict())  # no decay: the same update


def test_a_tensor_lr_is_accepted_as_torch_adamw_accepts_it_and_follows_a_schedule(device, monkeypatch):
    params, twins = make_params(device), make_params(device)
    optimizer = SMETAdamW(params, lr=torch.tensor(0.01), warmup_steps=3, backend="reference")
    twin = SMETAdamW(twins, lr=0.01, warmup_steps=3, backend="reference")
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda epoch: 0.5**epoch) for o in (optimizer, twin)]
    for step in range(3):
        for p, q, g in zip(params, twins, grads_for(step, params)):
            p.grad, q.grad = g, g.clone()
        for o, scheduler in zip((optimizer, twin), schedulers):
            o.step()
            scheduler.step()
    assert isinstance(optimizer.param_groups[0]["lr"], torch.Tensor)
    for p, q in zip(params, twins):  # the same but for the fp32 rounding of the tensor lr
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
    reads = []
    real_float = torch.Tensor.__float__
    monkeypatch.setattr(torch.Tensor, "__float__", lambda t: reads.append(t is lr) or real_float(t))
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()  # a CUDA tensor lr syncs at each read: once per group and step, not once per parameter
    assert reads.count(True) == 1
    monkeypatch.undo()
    with pytest.raises(ValueError, match="^lr as a tensor must hold one element"):
        SMETAdamW(params, lr=torch.tensor([0.01, 0.02]))
    with pytest.raises(ValueError, match="^lr must be a finite float"):
        SMETAdamW(params, lr=torch.tensor(float("inf")))


def _stepped_once(optimizer, params):
    for p, g in zip(params, grads_for(0, params)):
        p.grad = g
    optimizer.step()
    return optimizer


def test_the_dict_a_load_pre_hook_returns_is_the_one_checked_and_loaded_with_its_state_dtypes():
    """The checks, the kept fp32 moments of bf16 weights and the ids all read the pre-hooks' dict, as torch's do."""
    params = make_params("cpu", dtype=torch.bfloat16)
    saved = _stepped_once(SMETAdamW(params, lr=0.01, backend="reference"), params).state_dict()
    saved["param_groups"][0]["amsgrad"] = True  # e.g. from torch.optim.AdamW(amsgrad=True): refused unless rewritten
    optimizer = SMETAdamW(make_params("cpu", dtype=torch.bfloat16), lr=0.01)
    with pytest.raises(ValueError, match="^amsgrad=True is not supported"):
        optimizer.load_state_dict(saved)

    def reset_moments_without_amsgrad(_, state_dict):
        groups = [{**group, "amsgrad": False} for group in state_dict["param_groups"]]
        state = {i: {**s, "exp_avg": torch.zeros_like(s["exp_avg"])} for i, s in state_dict["state"].items()}
        return {"state": state, "param_groups": groups}

    def infinite_lr(_, state_dict):
        return {**state_dict, "param_groups": [{**group, "lr": math.inf} for group in state_dict["param_groups"]]}

    optimizer.register_load_state_dict_pre_hook(reset_moments_without_amsgrad)
    optimizer.load_state_dict(saved)
    for param in optimizer.param_groups[0]["params"]:
        exp_avg = optimizer.state[param]["exp_avg"]
        assert exp_avg.dtype == torch.float32 and not exp_avg.any()
    optimizer.register_load_state_dict_pre_hook(infinite_lr)
    with pytest.raises(ValueError, match="^lr must be a finite float"):
        optimizer.load_state_dict(saved)
    assert optimizer.param_groups[0]["lr"] == 0.01


def test_load_post_hooks_run_once_the_state_dtypes_and_block_steps_are_restored():
    params = make_params("cpu", dtype=torch.bfloat16)
    reference = _stepped_once(torch.optim.AdamW(params, lr=0.01), params)  # bf16 moments, no block_step
    saved = copy.deepcopy(reference.state_dict())
    for state in saved["state"].values():
        state["exp_avg"] = state["exp_avg"].float()
    optimizer = SMETAdamW(params, lr=0.01)
    seen = []
    optimizer.register_load_state_dict_post_hook(lambda o: seen.append(dict(o.state[params[0]])))
    optimizer.load_state_dict(saved)
    assert len(seen) == 1 and seen[0]["exp_avg"].dtype == torch.float32
    assert seen[0]["block_step"].tolist() == [1] * params[0].shape[0]


def test_loaded_fp32_moments_of_bf16_weights_are_copies_that_later_steps_leave_unchanged_in_the_saved_dict():
    """torch copies every loaded tensor; the fp32 moments kept for bf16 weights are copies too, not the saved ones."""
    params = make_params("cpu", dtype=torch.bfloat16)
    saved = _stepped_once(SMETAdamW(params, lr=0.01, backend="reference"), params).state_dict()
    before = copy.deepcopy(saved)
    optimizer = SMETAdamW(params, lr=0.01, backend="reference")
    optimizer.load_state_dict(saved)
    _stepped_once(optimizer, params)
    for index, state in saved["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[key].dtype == torch.float32 and torch.equal(state[key], before["state"][index][key])


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_a_non_contiguous_gradient_steps_like_its_contiguous_copy(backend):
    params, copies = make_params("cpu"), make_params("cpu")
    optimizers = [SMETAdamW(p, lr=0.01, backend=backend) for p in (params, copies)]
    for p, q, g in zip(params, copies, grads_for(0, params)):
        p.grad = g.transpose(0, -1).contiguous().transpose(0, -1) if g.dim() > 1 else g
        q.grad = g.clone()
    assert not params[0].grad.is_contiguous()
    for optimizer in optimizers:
        optimizer.step()
    for p, q in zip(params, copies):
        assert torch.equal(p, q)


def test_the_device_tables_kept_are_those_of_the_last_steps_batches_only():
    first, second = dense_param((4,), seed=1), dense_param((4,), seed=2)
    optimizer = SMETAdamW([{"params": [first]}, {"params": [second], "eps": 1e-6}], lr=0.01, backend="triton")
    for param in (first, second):
        optimizer.zero_grad()
        param.grad = torch.ones(4)
        optimizer.step()
    assert list(optimizer._tables) == [(1,)]
