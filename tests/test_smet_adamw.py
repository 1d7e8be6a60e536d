"""SMETAdamW against a plain per-block loop of the SPEC §2 formulas, with regrows, param groups and resume."""

import copy
import io
import math
import pickle
import warnings

import pytest
import torch

from smet_kernels.layout import BlockLayout
from smet_kernels.ops.library import regrow_blocks
from smet_kernels.optim.smet_adamw import SMETAdamW

BETAS, EPS = (0.9, 0.99), 1e-8


def sparse_param(out_features, in_features, block_size, density, seed, dtype=torch.float32, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    layout = BlockLayout.random(out_features, in_features, block_size, density, generator=generator)
    values = torch.randn(layout.nnz, block_size, block_size, generator=generator)
    param = torch.nn.Parameter(values.to(device=device, dtype=dtype))
    param.smet_layout = layout
    return param


def dense_param(shape, seed, dtype=torch.float32, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(shape, generator=generator).to(device=device, dtype=dtype))


class SpecLoop:
    """SPEC §2, one slot (sparse) or one tensor (dense) at a time, in float64 Python arithmetic."""

    def __init__(self, params, lrs, weight_decays, warmup, warmup_steps, alpha, bias_correction, warmup_scope="all"):
        self.theta = [p.detach().double().clone() for p in params]
        self.m = [torch.zeros_like(t) for t in self.theta]
        self.v = [torch.zeros_like(t) for t in self.theta]
        self.local = [[0] * p.shape[0] if hasattr(p, "smet_layout") else None for p in params]
        self.steps = [0] * len(params)
        self.density = [p.smet_layout.density if hasattr(p, "smet_layout") else None for p in params]
        self.lrs, self.weight_decays = lrs, weight_decays
        self.warmup, self.warmup_steps, self.alpha = warmup, warmup_steps, alpha
        self.bias_correction = bias_correction
        self.warmup_scope = warmup_scope

    def update(self, i, k, grad, t, s, lr, ramp, warmup):
        beta1, beta2 = BETAS
        theta, m, v = self.theta[i], self.m[i], self.v[i]
        index = slice(None) if k is None else k
        m[index] = beta1 * m[index] + (1 - beta1) * grad
        v[index] = beta2 * v[index] + (1 - beta2) * grad * grad
        if warmup == "momentum_ramp":
            m[index] = m[index] * ramp
        m_hat = m[index] / (1 - beta1**s)
        v_hat = v[index] / (1 - beta2**s)
        w = ramp if warmup == "linear" else 1.0
        theta[index] = theta[index] - lr * (w * m_hat / (v_hat.sqrt() + EPS) + self.weight_decays[i] * theta[index])

    def step(self, grads):
        for i, grad in enumerate(grads):
            if grad is None:
                continue
            grad = grad.double()
            self.steps[i] += 1
            if self.local[i] is None:  # dense: AdamW with the parameter's step, warmed up by it in scope "all"
                t = self.steps[i]
                warmup = self.warmup if self.warmup_scope == "all" else "none"
                self.update(i, None, grad, t, t, self.lrs[i], min(t / self.warmup_steps, 1.0), warmup)
                continue
            lr = self.lrs[i] * self.density[i] ** (-self.alpha)
            for k in range(len(self.local[i])):
                self.local[i][k] += 1
                t = self.local[i][k]
                s = self.steps[i] if self.bias_correction == "global" else t
                ramp = min(t / self.warmup_steps, 1.0)
                self.update(i, k, grad[k], t, s, lr, ramp, self.warmup)

    def regrow(self, i, slots):
        for k in slots.tolist():
            self.theta[i][k] = 0.0
            self.m[i][k] = 0.0
            self.v[i][k] = 0.0
            self.local[i][k] = 0


def make_params(device, dtype=torch.float32):
    return [
        sparse_param(64, 48, 16, 0.5, seed=1, dtype=dtype, device=device),
        dense_param((8, 24), seed=2, dtype=dtype, device=device),
        sparse_param(64, 64, 32, 0.75, seed=3, dtype=dtype, device=device),
        dense_param((24,), seed=4, dtype=dtype, device=device),
    ]


def grads_for(step, params):
    generator = torch.Generator().manual_seed(1000 + step)
    grads = [torch.randn(p.shape, generator=generator).to(device=p.device, dtype=p.dtype) for p in params]
    if step == 10:
        grads[0] = None  # a parameter without a gradient is skipped (no step counted)
    return grads


def regrow(optimizer, param, slots):
    state = optimizer.state[param]
    regrow_blocks(param.data, slots.to(param.device), state["exp_avg"], state["exp_avg_sq"], state["block_step"])


WARMUPS = ("linear", "momentum_ramp", "none")
CASES = [(w, a, "local") for w in WARMUPS for a in (0.0, 0.5, 1.0)]
CASES.append(("none", 1.0, "global"))  # naive DST (cold start)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("warmup, alpha, bias_correction, warmup_scope",
                         [case + ("all",) for case in CASES] + [(w, 1.0, "local", "regrown") for w in WARMUPS])
def test_matches_spec_loop_with_regrows(warmup, alpha, bias_correction, warmup_scope, backend, device):
    params = make_params(device)
    hyper = dict(betas=BETAS, eps=EPS, warmup=warmup, warmup_steps=5, density_lr_exponent=alpha,
                 bias_correction=bias_correction, warmup_scope=warmup_scope, backend=backend)  # fmt: skip
    optimizer = SMETAdamW(
        [{"params": params[:2], "lr": 0.01, "weight_decay": 0.1}, {"params": params[2:], "lr": 0.02}], **hyper
    )
    loop = SpecLoop(params, [0.01, 0.01, 0.02, 0.02], [0.1, 0.1, 0.0, 0.0], warmup, 5, alpha, bias_correction,
                    warmup_scope)
    regrows = {7: (0, torch.tensor([1, 4])), 14: (2, torch.tensor([0])), 15: (0, torch.tensor([4, 5]))}
    for step in range(20):
        grads = grads_for(step, params)
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
        loop.step(grads)
        if step in regrows:
            i, slots = regrows[step]
            regrow(optimizer, params[i], slots)
            loop.regrow(i, slots)
    for p, want in zip(params, loop.theta):
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-4, atol=1e-5)
    for i in (0, 2):
        assert optimizer.state[params[i]]["block_step"].tolist() == loop.local[i]
        torch.testing.assert_close(optimizer.state[params[i]]["exp_avg"].double(), loop.m[i], rtol=1e-4, atol=1e-6)


def test_groups_differing_only_in_lr_share_one_fused_call(device, monkeypatch):
    """SμPar gives every sparse layer its own group (own lr): still one fused step, not one per tensor."""
    import smet_kernels.optim.smet_adamw as smet_adamw_module

    calls = []
    real_step = smet_adamw_module.launch_adamw_step
    monkeypatch.setattr(smet_adamw_module, "launch_adamw_step", lambda *a, **k: calls.append(1) or real_step(*a, **k))
    params = make_params(device)
    lrs = [0.01, 0.02, 0.03, 0.04]
    optimizer = SMETAdamW([{"params": [p], "lr": lr} for p, lr in zip(params, lrs)], betas=BETAS, eps=EPS,
                          warmup_steps=3, density_lr_exponent=1.0, backend="triton")
    loop = SpecLoop(params, lrs, [0.0] * 4, "linear", 3, 1.0, "local")
    for step in range(4):
        grads = grads_for(step, params)
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
        loop.step(grads)
    assert len(calls) == 4  # one per optimizer step
    for p, want in zip(params, loop.theta):
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-4, atol=1e-5)


def test_state_layout(device):
    params = make_params(device, dtype=torch.float16)
    optimizer = SMETAdamW(params, lr=0.01)
    for p, g in zip(params, grads_for(0, params)):
        p.grad = g
    optimizer.step()
    sparse, dense = optimizer.state[params[0]], optimizer.state[params[1]]
    assert set(sparse) == {"exp_avg", "exp_avg_sq", "block_step"}
    assert sparse["exp_avg"].dtype == torch.float32 and sparse["exp_avg"].shape == params[0].shape
    assert sparse["block_step"].dtype == torch.int32 and sparse["block_step"].tolist() == [1] * params[0].shape[0]
    assert set(dense) == {"exp_avg", "exp_avg_sq", "step"}
    global_optimizer = SMETAdamW(params[:1], lr=0.01, bias_correction="global", warmup="none")
    params[0].grad = torch.ones_like(params[0])
    global_optimizer.step()
    assert set(global_optimizer.state[params[0]]) == {"exp_avg", "exp_avg_sq", "block_step", "step"}


def run_steps(optimizer, params, steps):
    for step in steps:
        for p, g in zip(params, grads_for(step, params)):
            p.grad = g
        optimizer.step()
        if step == 2:
            regrow(optimizer, params[0], torch.tensor([3, 0]))


@pytest.mark.parametrize("bias_correction", ["local", "global"])
def test_state_dict_resume_is_bit_exact(bias_correction, device):
    params = make_params(device) + [sparse_param(32, 32, 16, 0.5, seed=9, dtype=torch.float16, device=device)]
    hyper = dict(lr=0.01, weight_decay=0.05, warmup_steps=3, bias_correction=bias_correction)
    optimizer = SMETAdamW(params, **hyper)
    run_steps(optimizer, params, range(0, 5))
    buffer = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "optimizer": optimizer.state_dict()}, buffer)
    run_steps(optimizer, params, range(5, 10))

    buffer.seek(0)
    checkpoint = torch.load(buffer)
    resumed = make_params(device) + [sparse_param(32, 32, 16, 0.5, seed=9, dtype=torch.float16, device=device)]
    with torch.no_grad():
        for p, saved in zip(resumed, checkpoint["params"]):
            p.copy_(saved)
    resumed_optimizer = SMETAdamW(resumed, **hyper)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    assert resumed_optimizer.state[resumed[4]]["exp_avg"].dtype == torch.float32  # not cast to the fp16 weights
    run_steps(resumed_optimizer, resumed, range(5, 10))

    for p, q in zip(params, resumed):
        assert torch.equal(p, q)
        for key, value in optimizer.state[p].items():
            assert torch.equal(value, resumed_optimizer.state[q][key]), key


def test_naive_cold_start_spikes_and_warmup_does_not(device):
    """After many steps a regrown block's first update is ~(1-b1)/sqrt(1-b2) lr (global) vs lr/W (SMET)."""
    lr, warmup_steps = 0.01, 10
    sizes = {}
    for mode, warmup in (("global", "none"), ("local", "linear")):
        param = sparse_param(32, 32, 16, 1.0, seed=5, device=device)
        optimizer = SMETAdamW([param], lr=lr, betas=(0.9, 0.999), eps=1e-12, warmup=warmup,
                              warmup_steps=warmup_steps, density_lr_exponent=0.0, bias_correction=mode)  # fmt: skip
        param.grad = torch.ones_like(param)
        optimizer.step()
        state = optimizer.state[param]
        if mode == "global":
            state["step"].fill_(100_000)  # a long run so far
        else:
            state["block_step"].fill_(100_000)
        regrow(optimizer, param, torch.tensor([0]))
        optimizer.step()
        sizes[mode] = param.detach()[0].abs().mean().item()
    assert sizes["global"] == pytest.approx(lr * 0.1 / math.sqrt(0.001), rel=1e-3)
    assert sizes["local"] == pytest.approx(lr / warmup_steps, rel=1e-3)


@pytest.mark.parametrize("global_step, size", [(100, 0.976), (1_000, 2.515)])
def test_naive_cold_start_first_update_grows_with_the_global_step_as_spec_states(global_step, size, device):
    """SPEC §2: ≈ (1−β1)·sqrt((1−β2^t)/(1−β2)) × lr — about 1× at t = 100, 2.5× at 1,000 (3.16× only in the limit)."""
    lr = 0.01
    param = sparse_param(32, 32, 16, 1.0, seed=5, device=device)
    optimizer = SMETAdamW([param], lr=lr, eps=1e-12, warmup="none", density_lr_exponent=0.0, bias_correction="global")
    param.grad = torch.ones_like(param)
    optimizer.step()
    optimizer.state[param]["step"].fill_(global_step - 1)  # the regrown block's first update is global step t
    regrow(optimizer, param, torch.tensor([0]))
    optimizer.step()
    expected = (1 - 0.9) * math.sqrt((1 - 0.999**global_step) / (1 - 0.999)) / (1 - 0.9**global_step)
    assert expected == pytest.approx(size, abs=1e-3)
    assert param.detach()[0].abs().mean().item() == pytest.approx(lr * expected, rel=1e-4)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("warmup_scope, first_update", [("all", 0.01 / 10), ("regrown", 0.01)])
def test_a_dense_parameter_warms_up_by_its_own_steps_in_scope_all(warmup_scope, first_update, backend, device):
    """Released behaviour: embeddings, norms and head warm up too; ``"regrown"`` leaves them plain AdamW."""
    param = dense_param((32,), seed=5, device=device)
    before = param.detach().clone()
    optimizer = SMETAdamW([param], lr=0.01, eps=1e-12, warmup_steps=10, warmup_scope=warmup_scope, backend=backend)
    param.grad = torch.ones_like(param)
    optimizer.step()
    torch.testing.assert_close((before - param.detach()).abs(), torch.full_like(before, first_update))


@pytest.mark.usefixtures("one_matmul_config")  # the layer's products: on a GPU one config, not 18 autotuned
def test_closure_and_module_integration(device):
    """SMETAdamW(model.parameters()) finds BlockSparseLinear values by their smet_layout."""
    from smet_kernels.modules import BlockSparseLinear

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        BlockSparseLinear(32, 32, density=0.5, block_size=16, bias=True, device=device), torch.nn.Linear(32, 4)
    ).to(device)
    optimizer = SMETAdamW(model.parameters(), lr=0.01, warmup_steps=1)
    x, target = torch.randn(8, 32, device=device), torch.randn(8, 4, device=device)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        return loss

    first = optimizer.step(closure)
    for _ in range(5):
        last = optimizer.step(closure)
    assert last.item() < first.item()
    assert "block_step" in optimizer.state[model[0].values]
    assert "block_step" not in optimizer.state[model[0].bias]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(lr=-1.0), ValueError, "lr"),
        (dict(eps=0.0), ValueError, "eps"),
        (dict(betas=(0.9, 1.0)), ValueError, r"betas\[1\]"),
        (dict(betas=0.9), TypeError, "betas"),
        (dict(weight_decay=-0.1), ValueError, "weight_decay"),
        (dict(warmup="cosine"), ValueError, "warmup"),
        (dict(warmup_steps=0), ValueError, "warmup_steps"),
        (dict(warmup_steps=10.0), TypeError, "warmup_steps"),
        (dict(density_lr_exponent=-1.0), ValueError, "density_lr_exponent"),
        (dict(bias_correction="none"), ValueError, "bias_correction"),
        (dict(warmup_scope="dense"), ValueError, "warmup_scope"),
        (dict(state_dtype="float32"), TypeError, "state_dtype"),
        (dict(state_dtype=torch.int32), ValueError, "state_dtype"),
        (dict(backend="cuda"), ValueError, "backend"),
    ],
)
def test_bad_arguments_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        SMETAdamW([dense_param((4,), seed=0)], **kwargs)


@pytest.mark.parametrize("name", ["lr", "eps", "weight_decay", "density_lr_exponent"])
def test_an_infinite_hyperparameter_is_refused_by_name(name):
    with pytest.raises(ValueError, match=f"^{name} must be a finite float"):
        SMETAdamW([dense_param((4,), seed=0)], **{name: float("inf")})
    optimizer = SMETAdamW([dense_param((4,), seed=0)])
    with pytest.raises(ValueError, match=f"^{name} must be a finite float"):
        optimizer.add_param_group({"params": [dense_param((4,), seed=1)], name: float("inf")})
    assert len(optimizer.param_groups) == 1


def test_a_bad_parameter_fails_the_step_before_anything_changes(device):
    good = dense_param((4,), seed=0, device=device)
    bad = torch.nn.Parameter(torch.ones(3, dtype=torch.float64, device=device))
    optimizer = SMETAdamW([good])
    optimizer.add_param_group({"params": [bad]})
    good.grad, bad.grad = torch.ones_like(good), torch.ones_like(bad)
    before = good.detach().clone()
    with pytest.raises(TypeError, match="parameter 0 of param group 1 must be one of"):
        optimizer.step()
    assert torch.equal(good, before) and not optimizer.state


@pytest.mark.parametrize("bad_lr", [-1e-3, float("nan")])
def test_a_step_refused_for_a_later_group_changes_no_parameter_and_counts_no_step(bad_lr, device):
    first, second = dense_param((4,), seed=0, device=device), dense_param((4,), seed=1, device=device)
    optimizer = SMETAdamW([first], lr=1e-2)
    optimizer.add_param_group({"params": [second], "betas": (0.8, 0.99)})  # another fused batch
    first.grad, second.grad = torch.ones_like(first), torch.ones_like(second)
    optimizer.step()
    before = [first.detach().clone(), second.detach().clone()]
    optimizer.param_groups[1]["lr"] = bad_lr  # e.g. a schedule run past its end; named as set (no density factor)
    with pytest.raises(ValueError, match=rf"^param group 1: lr must be a finite float >= 0, got {bad_lr}$"):
        optimizer.step()
    assert torch.equal(first, before[0]) and torch.equal(second, before[1])
    assert [float(optimizer.state[p]["step"]) for p in (first, second)] == [1.0, 1.0]


def test_an_infinite_lr_from_a_schedule_is_refused_by_name_instead_of_turning_the_weights_into_inf(device):
    """The constructor refused lr=inf, the step let it through (a tensor lr filled by a schedule, or one set by hand)
    and every weight became inf or NaN."""
    values = sparse_param(32, 32, 16, 0.5, seed=0, device=device)
    optimizer = SMETAdamW([values], lr=torch.tensor(1e-2))
    optimizer.param_groups[0]["lr"].fill_(float("inf"))
    values.grad = torch.ones_like(values)
    before = values.detach().clone()
    with pytest.raises(ValueError, match=r"^param group 0: lr must be a finite float >= 0, got inf$"):
        optimizer.step()
    assert torch.equal(values, before) and not optimizer.state


def test_a_tensor_lr_of_two_elements_set_by_hand_is_refused_by_name_at_the_step(device):
    """It raised torch's 'only one element tensors can be converted to Python scalars', naming no lr."""
    values = sparse_param(32, 32, 16, 0.5, seed=0, device=device)
    optimizer = SMETAdamW([values], lr=torch.tensor(1e-2))
    optimizer.param_groups[0]["lr"] = torch.tensor([1e-2, 2e-2])
    values.grad = torch.ones_like(values)
    with pytest.raises(ValueError, match=r"^param group 0: lr as a tensor must hold one element, got shape \(2,\)$"):
        optimizer.step()
    assert not optimizer.state


def test_a_numpy_lr_set_by_hand_steps_like_the_same_float(device):
    np = pytest.importorskip("numpy")
    params = [dense_param((8,), seed=0, device=device) for _ in range(2)]
    optimizers = [SMETAdamW([p], lr=1e-2) for p in params]
    optimizers[0].param_groups[0]["lr"] = np.float32(0.5)
    optimizers[1].param_groups[0]["lr"] = float(np.float32(0.5))
    for p, optimizer in zip(params, optimizers):
        p.grad = torch.ones_like(p)
        optimizer.step()
    assert torch.equal(params[0], params[1])


def test_a_backend_that_cannot_run_fails_the_step_before_another_group_steps_or_any_step_counts(monkeypatch):
    """``backend="triton"`` where Triton cannot run (CPU tensors without the interpreter) was refused at its batch's
    launch: the batches before it had stepped and every dense step count was bumped, so the first step that ran
    after the fix bias-corrected with t = 2."""
    import smet_kernels.backend as backend_module

    first, second = dense_param((4,), seed=0), dense_param((4,), seed=1)
    optimizer = SMETAdamW([first], lr=1e-2, backend="reference")
    optimizer.add_param_group({"params": [second], "backend": "triton"})
    monkeypatch.setattr(backend_module, "triton_can_run", lambda device: False)
    first.grad, second.grad = torch.ones_like(first), torch.ones_like(second)
    before = [first.detach().clone(), second.detach().clone()]
    with pytest.raises(ValueError, match="^backend='triton' cannot run on device cpu"):
        optimizer.step()
    assert torch.equal(first, before[0]) and torch.equal(second, before[1])
    assert [float(optimizer.state[p]["step"]) for p in (first, second)] == [0.0, 0.0]


@pytest.mark.parametrize("option, value", [("bias_correction", "Global"), ("warmup_scope", "All"),
                                           ("density_lr_exponent", float("nan"))])
def test_an_option_set_by_hand_in_a_param_group_is_checked_at_the_step_by_name(option, value):
    """A typo was read as the other mode (``"Global"`` as local bias correction), a NaN exponent raised naming the
    fused batch's ``lrs[0]``: each is refused naming its group, before any parameter changes."""
    values = sparse_param(32, 32, 16, 0.5, seed=0)
    optimizer = SMETAdamW([values], lr=1e-2, backend="reference")
    optimizer.param_groups[0][option] = value
    values.grad = torch.ones_like(values)
    before = values.detach().clone()
    with pytest.raises(ValueError, match=f"^param group 0: {option} must be"):
        optimizer.step()
    assert torch.equal(values, before) and not optimizer.state


@pytest.mark.parametrize("value, error", [(torch.float64, ValueError), ("fp32", TypeError)])
def test_a_state_dtype_set_by_hand_is_checked_at_the_first_step_by_name_and_no_state_is_made(value, error):
    """A float64 ``state_dtype`` made float64 moments that the step then refused naming ``exp_avgs[0]`` and kept (a
    corrected group could not replace them); a string raised ``zeros_like()``'s message."""
    values = sparse_param(32, 32, 16, 0.5, seed=0)
    optimizer = SMETAdamW([values], lr=1e-2, backend="reference")
    optimizer.param_groups[0]["state_dtype"] = value
    values.grad = torch.ones_like(values)
    with pytest.raises(error, match="^param group 0: state_dtype must be"):
        optimizer.step()
    assert not optimizer.state


def test_bad_param_group_and_values_shape_raise(device):
    optimizer = SMETAdamW([dense_param((4,), seed=0, device=device)])
    rejected = dense_param((4,), seed=1, device=device)
    with pytest.raises(ValueError, match="warmup_steps"):
        optimizer.add_param_group({"params": [rejected], "warmup_steps": -3})
    assert len(optimizer.param_groups) == 1  # the rejected group is not left behind
    with pytest.raises(TypeError, match="state_dtype must be a torch.dtype"):
        optimizer.add_param_group({"params": [rejected], "state_dtype": "float32"})
    assert len(optimizer.param_groups) == 1  # nor one refused with a TypeError
    optimizer.add_param_group({"params": [rejected]})  # so its parameter can still be added properly
    twice = sparse_param(32, 32, 16, 0.5, seed=2, device=device)
    with warnings.catch_warnings(), pytest.raises(ValueError, match="must not repeat"):
        warnings.simplefilter("ignore")  # torch itself only warns about the repeat
        SMETAdamW([twice, twice])  # two programs of the fused step would update it at once
    param = sparse_param(32, 32, 16, 0.5, seed=0, device=device)
    param.smet_layout = BlockLayout.random(32, 32, 16, 1.0)  # nnz 4, values hold 2 slots
    param.grad = torch.zeros_like(param)
    with pytest.raises(ValueError, match="sparse values must have shape"):
        SMETAdamW([param]).step()


def _grad_data(param, data):
    param.grad = torch.zeros_like(param)
    param.grad.data = data  # bypasses the checks of the .grad setter, as a hook or a buggy trainer may


@pytest.mark.parametrize(
    "spoil, exc, match",
    [
        (lambda p: _grad_data(p, torch.zeros(16)), ValueError, r"grad has shape \(16,\) but the parameter has"),
        (lambda p: _grad_data(p, torch.zeros(4, 4, dtype=torch.float64)), TypeError, "grad has dtype torch.float64"),
        (lambda p: setattr(p, "grad", torch.zeros(4, 4).to_sparse()), TypeError, "torch sparse gradients"),
        (lambda p: setattr(p, "data", torch.randn(4, 4).t()) or setattr(p, "grad", torch.zeros(4, 4)), ValueError,
         "must be contiguous"),
    ],
    ids=["grad_shape", "grad_dtype", "sparse_grad", "non_contiguous"],
)
def test_a_bad_gradient_or_parameter_is_refused_naming_its_index_before_any_state_changes(spoil, exc, match):
    good, bad = dense_param((4, 4), seed=0), dense_param((4, 4), seed=1)
    good.grad = torch.ones(4, 4)
    spoil(bad)
    optimizer = SMETAdamW([good, bad], backend="reference")
    with pytest.raises(exc, match=f"^parameter 1 of param group 0:? {match}"):
        optimizer.step()
    assert not optimizer.state and torch.equal(good, dense_param((4, 4), seed=0))


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda optimizer: pickle.loads(pickle.dumps(optimizer))],
                         ids=["deepcopy", "pickle"])
def test_a_deep_copied_or_unpickled_optimizer_steps_like_the_original(clone, device):
    params = make_params(device)
    optimizer = SMETAdamW(params, lr=0.01, warmup_steps=3)
    run_steps(optimizer, params, range(2))
    copied = clone(optimizer)
    copied_params = [p for group in copied.param_groups for p in group["params"]]
    for source, param in zip(params, copied_params):
        if hasattr(source, "smet_layout"):  # deepcopy of a bare Parameter drops attributes (BlockSparseLinear re-tags)
            param.smet_layout = source.smet_layout
    run_steps(optimizer, params, range(2, 4))
    run_steps(copied, copied_params, range(2, 4))
    for p, q in zip(params, copied_params):
        assert torch.equal(p.detach(), q.detach())


def test_a_schedule_of_betas_reuses_the_device_tables_instead_of_caching_one_set_per_step(device, monkeypatch):
    """OneCycleLR cycles beta1 every step (cycle_momentum): the tables depend on the tensors only."""
    import smet_kernels.ops.adamw as adamw_module

    builds = []
    real_build = adamw_module._work_tables
    monkeypatch.setattr(adamw_module, "_work_tables", lambda *a: builds.append(1) or real_build(*a))
    real_pointers = adamw_module._pointer_table
    monkeypatch.setattr(adamw_module, "_pointer_table", lambda *a: builds.append(1) or real_pointers(*a))
    params = make_params(device)
    optimizer = SMETAdamW(params, lr=0.01, backend="triton")
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.01, total_steps=10)
    for p in params:
        p.grad = torch.zeros_like(p)
    for step in range(6):
        for p, g in zip(params, grads_for(step, params)):
            p.grad.copy_(g)  # the same addresses every step (as the caching allocator tends to give)
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["betas"][0] != 0.95  # the schedule moved beta1
    assert len(builds) == 2  # the work tables and the pointer table, once


def test_gradients_at_new_addresses_rebuild_only_the_pointer_table(device, monkeypatch):
    """``zero_grad(set_to_none=True)`` frees the gradients and the next backward may put them elsewhere: that costs
    one small pointer table, not the sizes and work tables (a host loop over every tensor's slots), which depend on
    the shapes only. Host tables reach the device through ``_to_device``: three on the first step, then the scalars
    and the pointers each step. The steps match the reference backend's."""
    import smet_kernels.ops.adamw as adamw_module

    copies = []
    real_to_device = adamw_module._to_device
    monkeypatch.setattr(adamw_module, "_to_device", lambda *a: copies.append(1) or real_to_device(*a))
    params, expected = make_params(device), make_params(device)
    optimizer = SMETAdamW(params, lr=0.01, backend="triton")
    reference = SMETAdamW(expected, lr=0.01, backend="reference")
    kept = []  # the earlier gradients stay alive: each step's gradients lie at new addresses
    for step in range(4):
        for group in (params, expected):
            for p, g in zip(group, grads_for(step, group)):
                p.grad = g
        kept += [p.grad for p in params]
        optimizer.step()
        reference.step()
    assert len(copies) == 3 + 1 + 2 * 3
    for p, q in zip(params, expected):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_a_compiled_optimizer_step_matches_the_eager_step_on_either_backend(backend, device):
    """``torch.compile(opt.step)``: Dynamo traced into the Triton launch (its host tables of raw addresses; on the
    CPU, into the interpreter, which raised); the launch now runs as it is inside the compiled step."""
    torch._dynamo.reset()
    params = [sparse_param(64, 32, 16, 0.5, seed=0, device=device), dense_param((40,), seed=1, device=device)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twins[0].smet_layout = params[0].smet_layout
    opt, eager = SMETAdamW(params, lr=0.01, backend=backend), SMETAdamW(twins, lr=0.01, backend=backend)
    step = torch.compile(opt.step)
    generator = torch.Generator().manual_seed(2)
    for _ in range(3):
        for p, q in zip(params, twins):
            p.grad = torch.randn(p.shape, generator=generator).to(device)
            q.grad = p.grad.clone()
        step()
        eager.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert opt.state_dict()["state"][0]["block_step"].tolist() == eager.state_dict()["state"][0]["block_step"].tolist()
