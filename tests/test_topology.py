"""SMET topology controller: schedule, prune/regrow invariants, determinism, resume (its state on any model and device),
argument validation. RigL's dense gradients: tests/test_topology_rigl.py; SμPar: tests/test_supar.py."""

import contextlib
import copy
import io
import re
import warnings

import pytest
import torch
from torch import nn

from smet_kernels.layout import BlockLayout
from smet_kernels.modules import BlockSparseLinear
from smet_kernels.optim.smet_adamw import SMETAdamW
from smet_kernels.prune_regrow import blocks_to_move
from smet_kernels.topology import SMET
from topology_runs import B, FEATURES, FRESH_STATE_OPTIMIZERS, TinyMLP, _layouts, batch, make_run, train_step


# ---------------------------------------------------------------------------------------------- schedule
def test_update_steps_and_end_step():
    model, opt, _ = make_run()
    smet = SMET(model, opt, update_interval=3, end_step=9)
    assert [t for t in range(1, 20) if smet.is_update_step(t)] == [3, 6, 9]
    assert SMET(model, opt, update_interval=3, total_steps=7).end_step == 7
    assert SMET(model, opt, update_interval=3, end_step=5, total_steps=7).end_step == 5
    forever = SMET(model, opt, update_interval=4)
    assert forever.end_step is None and forever.is_update_step(4000)
    assert forever.prune_fraction_at(4000) == forever.prune_fraction


def test_a_controller_whose_first_update_is_past_its_end_step_says_it_will_update_no_topology():
    """``update_interval=100`` with ``total_steps=50``: nothing moves all run; smet-train says so, a script got
    nothing. A first update at ``T_end`` itself runs, and says nothing."""
    model, opt, _ = make_run()
    for options in (dict(update_interval=10, total_steps=9), dict(update_interval=10, end_step=9, total_steps=50)):
        with pytest.warns(RuntimeWarning, match=r"no topology update will run: update_interval=10 is past T_end=9"):
            SMET(model, opt, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SMET(model, opt, update_interval=10, total_steps=10)
        SMET(model, opt, update_interval=10)


def test_the_final_prune_fraction_may_be_zero_or_the_initial_fraction():
    """Without a warning that layers stay static: ``ζ0`` moves blocks of every layer, whatever ``ζ_min``."""
    model, opt, _ = make_run()
    for final in (0.0, 0.3):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            smet = SMET(model, opt, update_interval=5, prune_fraction=0.3, min_prune_fraction=final, end_step=10)
        assert smet.prune_fraction_at(10) == pytest.approx(final)


def test_step_returns_records_only_on_update_steps():
    model, opt, smet = make_run(update_interval=2, end_step=4)
    records = [train_step(model, opt, smet, t) for t in range(1, 7)]
    assert [r is not None for r in records] == [False, True, False, True, False, False]
    assert smet.history == [records[1], records[3]]
    first = records[1]
    assert first["step"] == 2 and first["prune_fraction"] == pytest.approx(smet.prune_fraction_at(2))
    nnz = model.up.layout.nnz
    assert first["layers"]["up.values"] == {"pruned": blocks_to_move(first["prune_fraction"], nnz),
                                            "regrown": blocks_to_move(first["prune_fraction"], nnz)}
    assert set(first["layers"]) == {"up.values", "down.values"}


# ---------------------------------------------------------------------------------------------- selection
# ---------------------------------------------------------------------------------------------- invariants
def _snapshot(model, opt):
    snap = {}
    for name, p in model.named_parameters():
        state = opt.state[p]
        snap[name] = dict(
            indices=p.smet_layout.block_indices.clone(),
            mask=p.smet_layout.mask.clone(),
            values=p.detach().clone(),
            block_step=state["block_step"].clone(),
        )
    return snap


@pytest.mark.parametrize("regrow", ["random", "gradient"])
def test_invariants_after_every_update(regrow):
    model, opt, smet = make_run(regrow=regrow, update_interval=2)
    params = dict(model.named_parameters())
    updates = 0
    for step in range(1, 9):
        x, target = batch(step)
        opt.zero_grad(set_to_none=True)
        (model(x) - target).pow(2).mean().backward()
        opt.step()
        before = _snapshot(model, opt)
        record = smet.step()
        if record is None:
            assert all(torch.equal(before[n]["indices"], p.smet_layout.block_indices) for n, p in params.items())
            continue
        updates += 1
        for name, layer in record["layers"].items():
            p, layout, state, old = params[name], params[name].smet_layout, opt.state[params[name]], before[name]
            n = layer["pruned"]
            assert n == layer["regrown"] == blocks_to_move(record["prune_fraction"], layout.nnz) > 0
            assert layout.nnz == p.shape[0] == old["indices"].shape[0]
            flat = layout.block_indices[:, 0] * layout.block_shape[1] + layout.block_indices[:, 1]
            assert flat.unique().numel() == layout.nnz  # no duplicate blocks
            changed = (layout.block_indices != old["indices"]).any(1)
            assert int(changed.sum()) == n
            # the pruned slots held the n smallest blocks by L1 norm
            l1 = old["values"].abs().sum((1, 2))
            assert l1[changed].max() < l1[~changed].min()
            # kept slots: untouched block, values and local step
            assert torch.equal(p.detach()[~changed], old["values"][~changed])
            assert torch.equal(state["block_step"][~changed], old["block_step"][~changed])
            # regrown slots: zero values, zero moments, local step 0
            assert torch.all(p.detach()[changed] == 0)
            assert torch.all(state["exp_avg"][changed] == 0) and torch.all(state["exp_avg_sq"][changed] == 0)
            assert torch.all(state["block_step"][changed] == 0)
            # no regrown block was active before the update (so none of the just-pruned)
            grown = layout.block_indices[changed]
            assert not old["mask"][grown[:, 0], grown[:, 1]].any()
    assert updates == 4


def test_regrow_normal_init_and_no_optimizer_state():
    model = TinyMLP()
    opt = SMETAdamW(model.parameters(), lr=1e-2, backend="reference")
    smet = SMET(model, opt, update_interval=1, prune_fraction=0.5, regrow_init="normal", init_std=0.5, seed=3)
    old = model.up.layout.block_indices.clone()
    smet.step()  # before any optimizer step: state is empty, values still re-initialised
    changed = (model.up.layout.block_indices != old).any(1)
    regrown = model.up.values.detach()[changed]
    assert regrown.numel() > 0 and 0.3 < regrown.std().item() < 0.7
    assert len(opt.state) == 0


def test_an_update_whose_regrow_of_a_later_layer_raises_moves_no_layout():
    gen = torch.Generator().manual_seed(0)
    first = BlockSparseLinear(FEATURES, FEATURES, 0.5, B, generator=gen, backend="reference")
    second = BlockSparseLinear(FEATURES, FEATURES, 0.5, B, generator=gen, backend="reference", dtype=torch.float64)
    model = nn.Sequential(first, second)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    smet = SMET(model, opt, update_interval=1, prune_fraction=0.3)
    before = [t.layout.block_indices.clone() for t in smet.targets]
    generator = smet.generator.get_state()
    with pytest.raises(TypeError, match="values must be one of"):  # the regrow takes no fp64 values
        smet.step()
    assert all(torch.equal(t.layout.block_indices, b) for t, b in zip(smet.targets, before))
    assert torch.equal(smet.generator.get_state(), generator)  # the first layer's random regrow drew from it
    assert smet.step_count == 0 and smet.history == []


def test_an_update_whose_regrow_backend_cannot_run_moves_no_layout(monkeypatch):
    """The global backend ``"triton"`` where Triton cannot run (CPU tensors without the interpreter) was refused by
    the regrow, after its layer's layout had moved: the pruned blocks' values then sat at the grown blocks with their
    moments, and a retry updated that topology again."""
    import smet_kernels.backend as backend_module

    _, _, smet = make_run(update_interval=1)
    before = [t.layout.block_indices.clone() for t in smet.targets]
    monkeypatch.setattr(backend_module, "triton_can_run", lambda device: False)
    monkeypatch.setattr(backend_module, "_backend", "triton")
    with pytest.raises(ValueError, match="^backend='triton' cannot run on device cpu"):
        smet.step()
    assert all(torch.equal(t.layout.block_indices, b) for t, b in zip(smet.targets, before))
    assert smet.step_count == 0 and smet.history == []


@pytest.mark.parametrize("make_optimizer, key", [
    (lambda params: torch.optim.AdamW(params, lr=1e-2, amsgrad=True), "max_exp_avg_sq"),
    (lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9), "momentum_buffer"),
], ids=["amsgrad", "sgd-momentum"])
def test_a_regrown_slot_inherits_neither_the_amsgrad_maximum_nor_the_sgd_momentum_of_the_pruned_block(
    make_optimizer, key
):
    """As the Adam moments: a regrown block's first steps must not follow the pruned block's state."""
    model = TinyMLP()
    opt = make_optimizer(model.parameters())
    smet = SMET(model, opt, update_interval=1, prune_fraction=0.5)
    x, target = batch(1)
    (model(x) - target).pow(2).mean().backward()
    opt.step()
    old = model.up.layout.block_indices.clone()
    smet.step()
    changed = (model.up.layout.block_indices != old).any(1)
    state = opt.state[model.up.values][key]
    assert changed.any() and torch.all(state[changed] == 0) and state[~changed].abs().sum() > 0


@pytest.mark.parametrize("key", ["row_var", "col_var"])
def test_a_regrown_slot_restarts_the_adafactor_second_moment_factors_of_the_pruned_block_at_zero(key):
    model = TinyMLP()
    opt = torch.optim.Adafactor(model.parameters(), lr=1e-2)
    smet = SMET(model, opt, update_interval=1, prune_fraction=0.5)
    x, target = batch(1)
    (model(x) - target).pow(2).mean().backward()
    opt.step()
    old = model.up.layout.block_indices.clone()
    smet.step()
    changed = (model.up.layout.block_indices != old).any(1)
    state = opt.state[model.up.values][key]
    assert changed.any() and torch.all(state[changed] == 0) and state[~changed].abs().sum() > 0


@pytest.mark.parametrize("name", FRESH_STATE_OPTIMIZERS)
def test_a_regrown_slot_starts_every_optimizer_state_where_a_fresh_optimizer_starts_it(name):
    """Only Adam's, AMSGrad's and SGD's state restarted: RMSprop's, Adagrad's or Rprop's state of the pruned block
    went on scaling the regrown one."""
    make_optimizer, fresh = FRESH_STATE_OPTIMIZERS[name]
    model = TinyMLP()
    opt = make_optimizer(model.parameters())
    smet = SMET(model, opt, update_interval=1, prune_fraction=0.5)
    for step in (1, 2):
        x, target = batch(step)
        (model(x) - target).pow(2).mean().backward()
        opt.step()
    old = model.up.layout.block_indices.clone()
    before = {key: opt.state[model.up.values][key].clone() for key in fresh}
    smet.step()
    changed = (model.up.layout.block_indices != old).any(1)
    assert changed.any() and not changed.all()
    for key, value in fresh.items():
        state = opt.state[model.up.values][key]
        assert torch.all(state[changed] == value) and torch.equal(state[~changed], before[key][~changed]), key
        assert not torch.all(before[key][changed] == value), key  # the pruned blocks' state was not fresh


def test_kernels_follow_the_updated_topology():
    """After an update the (Triton, interpreted on CPU) layer computes with the new blocks."""
    gen = torch.Generator().manual_seed(0)
    layer = BlockSparseLinear(32, 32, 0.5, B, generator=gen)
    opt = SMETAdamW(layer.parameters(), lr=1e-2)
    smet = SMET(layer, opt, update_interval=1, prune_fraction=0.5, regrow_init="normal", init_std=0.5)
    x = torch.randn(4, 32, generator=gen)
    layer(x).sum().backward()
    opt.step()
    old = layer.layout.block_indices.clone()
    smet.step()
    assert not torch.equal(layer.layout.block_indices, old)
    torch.testing.assert_close(layer(x), x @ layer.to_dense_weight().t(), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- determinism
def test_deterministic_from_seed():
    runs = []
    for seed in (0, 0, 1):
        model, opt, smet = make_run(seed=seed, regrow_init="normal")
        for step in range(1, 7):
            train_step(model, opt, smet, step)
        runs.append((_layouts(model), [p.detach().clone() for p in model.parameters()]))
    (a, va), (b, vb), (c, _) = runs
    assert all(torch.equal(a[k], b[k]) for k in a) and all(torch.equal(x, y) for x, y in zip(va, vb))
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_resume_is_bit_exact():
    total, cut = 9, 5
    model, opt, smet = make_run(regrow_init="normal", update_interval=2, total_steps=total)
    for step in range(1, cut + 1):
        train_step(model, opt, smet, step)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "smet": smet.state_dict()}, buffer)
    for step in range(cut + 1, total + 1):
        train_step(model, opt, smet, step)

    resumed, ropt, rsmet = make_run(model_seed=7, seed=5, regrow_init="normal", update_interval=2, total_steps=total)
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=False)
    resumed.load_state_dict(ckpt["model"])
    ropt.load_state_dict(ckpt["opt"])
    rsmet.load_state_dict(ckpt["smet"])
    for step in range(cut + 1, total + 1):
        train_step(resumed, ropt, rsmet, step)
    assert rsmet.history == smet.history and rsmet.step_count == total
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
        assert torch.equal(p.smet_layout.block_indices, q.smet_layout.block_indices), name
        assert torch.equal(opt.state[p]["block_step"], ropt.state[q]["block_step"])


def test_a_controller_on_a_compiled_model_names_its_layers_as_on_the_plain_model():
    """``torch.compile`` wraps the model (or a submodule) in an ``_orig_mod``: the controller's layer names, history
    and state leave it out, so a state saved with or without compiling loads into the other."""
    model, opt, _ = make_run()
    model.down = torch.compile(model.down)  # compiled submodule: ``down._orig_mod.values``
    plain = SMET(model, opt)
    on_compiled = SMET(torch.compile(model), opt)  # the whole model: ``_orig_mod.up.values``
    assert [t.name for t in on_compiled.targets] == [t.name for t in plain.targets] == ["up.values", "down.values"]
    saved = plain.state_dict()
    saved["layouts"] = {"_orig_mod." + name: layout for name, layout in saved["layouts"].items()}  # an older save
    on_compiled.load_state_dict(saved)
    plain.load_state_dict(on_compiled.state_dict())


def test_a_saved_state_is_a_snapshot_that_later_updates_leave_as_it_was():
    model, opt, smet = make_run(update_interval=2)
    for step in range(1, 3):
        train_step(model, opt, smet, step)
    state = smet.state_dict()
    for step in range(3, 5):
        train_step(model, opt, smet, step)
    assert [record["step"] for record in state["history"]] == [2] and len(smet.history) == 2


def test_a_loaded_state_stays_as_it_was_when_the_controller_goes_on():
    model, opt, smet = make_run(update_interval=2)
    for step in range(1, 3):
        train_step(model, opt, smet, step)
    state = smet.state_dict()
    resumed, resumed_opt, controller = make_run(update_interval=2)
    controller.load_state_dict(state)
    for step in range(3, 5):
        train_step(resumed, resumed_opt, controller, step)
    assert [record["step"] for record in state["history"]] == [2] and len(controller.history) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_state_dict_mapped_to_cuda():
    """A controller state read with ``map_location="cuda"`` still restores (the generator state goes back to CPU)."""
    model, opt, smet = make_run(regrow_init="normal")
    for step in range(1, 4):
        train_step(model, opt, smet, step)
    buffer = io.BytesIO()
    torch.save(smet.state_dict(), buffer)
    buffer.seek(0)
    _, _, resumed = make_run(model_seed=7, seed=5, regrow_init="normal")
    resumed.load_state_dict(torch.load(buffer, map_location="cuda", weights_only=False))
    assert torch.equal(resumed.generator.get_state(), smet.generator.get_state())
    assert resumed.step_count == smet.step_count


def test_load_state_dict_rejects_other_model():
    _, _, smet = make_run()
    other = nn.Sequential(BlockSparseLinear(FEATURES, FEATURES, 0.5, B))
    smet_other = SMET(other, SMETAdamW(other.parameters()), update_interval=2)
    with pytest.raises(ValueError, match="layouts"):
        smet.load_state_dict(smet_other.state_dict())


def test_load_state_dict_refuses_a_state_that_lacks_a_layer_of_the_model():
    _, _, smet = make_run()
    state = smet.state_dict()
    del state["layouts"]["down.values"]
    with pytest.raises(ValueError, match=r"state's layouts are for \['up.values'\]"):
        smet.load_state_dict(state)


@pytest.mark.parametrize("key, value", [("shape", (64, 128)), ("block_size", 8)])
def test_load_state_dict_refuses_a_layout_of_another_shape_or_block_size(key, value):
    _, _, smet = make_run()
    state = smet.state_dict()
    state["layouts"]["up.values"][key] = value
    with pytest.raises(ValueError, match="layout of 'up.values' in state does not match the model's layer"):
        smet.load_state_dict(state)


@pytest.mark.parametrize("key, value, match", [("step", -4, "step must be an int >= 0"),
                                                ("step", 2.5, "step must be an int >= 0"),
                                                ("step", "3", "step must be an int >= 0"),
                                                ("history", {}, "history must be a list")])
def test_load_state_dict_refuses_a_bad_step_or_history_by_name_and_changes_nothing(key, value, match):
    """A step of -4 or 2.5 was taken (as -4 and 2), "3" raised int()'s error, and a history that is no list made the
    next update raise after it had moved the layouts."""
    model, opt, smet = make_run(update_interval=1)
    state = smet.state_dict()
    train_step(model, opt, smet, 1)
    before = _layouts(model)
    state[key] = value
    with pytest.raises(ValueError, match=f"^state's {match}"):
        smet.load_state_dict(state)
    assert smet.step_count == 1 and all(torch.equal(before[n], i) for n, i in _layouts(model).items())


@pytest.mark.parametrize("state", [{}, {"state": {}, "param_groups": []}, "smet.pt"],
                         ids=["empty", "optimizer-state", "path"])  # fmt: skip
def test_load_state_dict_names_the_keys_missing_from_a_state_that_is_no_controller_state(state):
    _, _, smet = make_run()
    expected = "state is not an SMET.state_dict(): it lacks ['step', 'generator', 'history', 'layouts']"
    with pytest.raises(ValueError, match=re.escape(expected)):
        smet.load_state_dict(state)


def test_load_state_dict_incompatible_in_a_later_layer_changes_no_layout():
    model, opt, smet = make_run()
    for step in range(1, 5):
        train_step(model, opt, smet, step)
    state = copy.deepcopy(smet.state_dict())
    state["layouts"]["down.values"]["block_indices"] = state["layouts"]["down.values"]["block_indices"][:-1]
    _, _, fresh = make_run(model_seed=7)
    before = [target.layout.block_indices.clone() for target in fresh.targets]
    with pytest.raises(ValueError, match="block_indices must have shape"):
        fresh.load_state_dict(state)
    assert all(torch.equal(t.layout.block_indices, b) for t, b in zip(fresh.targets, before))
    assert fresh.step_count == 0 and fresh.history == []


def test_load_state_dict_refuses_a_broken_generator_state_before_any_layout_changes():
    model, opt, smet = make_run()
    for step in range(1, 5):
        train_step(model, opt, smet, step)
    state = copy.deepcopy(smet.state_dict())
    state["generator"] = torch.zeros(3, dtype=torch.uint8)
    _, _, fresh = make_run(model_seed=7)
    before = [target.layout.block_indices.clone() for target in fresh.targets]
    with pytest.raises(RuntimeError):
        fresh.load_state_dict(state)
    assert all(torch.equal(t.layout.block_indices, b) for t, b in zip(fresh.targets, before))


def test_works_with_hand_built_sparse_parameter():
    layout = BlockLayout.random(32, 32, B, 0.5, generator=torch.Generator().manual_seed(0))
    values = nn.Parameter(torch.randn(layout.nnz, B, B))
    values.smet_layout = layout
    holder = nn.Module()
    holder.values = values
    opt = torch.optim.SGD([values], lr=0.1)
    smet = SMET(holder, opt, update_interval=1, prune_fraction=0.5)
    smallest = values.detach().abs().sum((1, 2)).argmin().item()
    old = layout.block_indices.clone()
    record = smet.step()
    assert record["layers"]["values"]["pruned"] == 1
    assert (layout.block_indices != old).any(1).nonzero().flatten().tolist() == [smallest]


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(update_interval=0), ValueError, "update_interval"),
        (dict(update_interval=2.0), TypeError, "update_interval"),
        (dict(update_interval=True), TypeError, "update_interval"),
        (dict(prune_fraction=0.0), ValueError, "prune_fraction"),
        (dict(prune_fraction=1.0), ValueError, "prune_fraction"),
        (dict(prune_fraction="0.2"), TypeError, "prune_fraction"),
        (dict(min_prune_fraction=0.5), ValueError, "min_prune_fraction"),
        (dict(min_prune_fraction=-0.1), ValueError, "min_prune_fraction"),
        (dict(end_step=0), ValueError, "end_step"),
        (dict(total_steps=-3), ValueError, "total_steps"),
        (dict(regrow="magnitude"), ValueError, "regrow"),
        (dict(regrow_init="ones"), ValueError, "regrow_init"),
        (dict(init_std=0.0), ValueError, "init_std"),
        (dict(init_std=float("inf")), ValueError, "init_std"),
        (dict(init_std=True), TypeError, "init_std"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(seed=2**64), ValueError, r"^seed must be in \[0, 18446744073709551615\], got 18446744073709551616$"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    model = TinyMLP()
    opt = SMETAdamW(model.parameters(), backend="reference")
    with pytest.raises(error, match=match):
        SMET(model, opt, **kwargs)


def test_bad_model_and_optimizer():
    model = TinyMLP()
    with pytest.raises(TypeError, match="model"):
        SMET(object(), SMETAdamW(model.parameters()))
    with pytest.raises(TypeError, match="optimizer"):
        SMET(model, object())
    dense = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="no sparse parameters"):
        SMET(dense, torch.optim.SGD(dense.parameters(), lr=0.1))


def test_a_layer_frozen_when_the_controller_is_built_keeps_its_blocks_and_need_not_be_in_the_optimizer():
    model = TinyMLP()
    model.down.requires_grad_(False)
    frozen = (model.down.layout.block_indices.clone(), model.down.values.detach().clone())
    opt = SMETAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, backend="reference")
    smet = SMET(model, opt, update_interval=1, prune_fraction=0.3)
    record = train_step(model, opt, smet, 1)
    assert set(record["layers"]) == {"up.values"} and record["layers"]["up.values"]["pruned"] > 0
    assert torch.equal(model.down.layout.block_indices, frozen[0]) and torch.equal(model.down.values, frozen[1])
    model.requires_grad_(False)
    with pytest.raises(ValueError, match=r"^every sparse parameter of model is frozen \(requires_grad=False\), "
                                         r"e.g. 'up.values': SMET updates the topology of the layers that train$"):
        SMET(model, opt)


@pytest.mark.parametrize("regrow", ["random", "gradient"])
def test_an_update_passes_over_a_layer_frozen_after_the_controller_was_built_which_keeps_its_blocks(regrow):
    """RigL arms no dense-gradient recording for it either (a full fp32 dyᵀx per update, for nothing)."""
    model, opt, smet = make_run(regrow=regrow, update_interval=1)
    model.down.requires_grad_(False)
    frozen = (model.down.layout.block_indices.clone(), model.down.values.detach().clone())
    record = train_step(model, opt, smet, 1)
    assert set(record["layers"]) == {"up.values"} and record["layers"]["up.values"]["pruned"] > 0
    assert torch.equal(model.down.layout.block_indices, frozen[0]) and torch.equal(model.down.values, frozen[1])
    up, down = smet.targets
    assert down.probe is None and (up.probe is not None) == (regrow == "gradient")  # armed for step 2
    model.up.requires_grad_(False)  # none left to update: an empty record
    assert smet.step()["layers"] == {}


@pytest.mark.parametrize("sparsify_fn", ["sparsify", "masked_sparsify"])
def test_an_update_under_another_default_device_moves_the_blocks_as_under_the_cpu(sparsify_fn):
    """``torch.set_default_device("cuda")`` (here: meta, the one other device of every machine) made the random regrow
    and the masked "normal" init draw with the controller's CPU generator on that device: refused on CUDA."""
    import smet_kernels as sk

    def run(context):
        torch.manual_seed(0)
        model = getattr(sk, sparsify_fn)(nn.Sequential(nn.Linear(FEATURES, FEATURES)), 0.5, B,
                                         generator=torch.Generator().manual_seed(1))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        smet = SMET(model, opt, update_interval=1, prune_fraction=0.5, regrow_init="normal", seed=3)
        model(batch(0)[0]).square().mean().backward()
        opt.step()
        with context:
            smet.step()
        return model[0].layout.block_indices, model[0].to_dense_weight().detach()

    expected, got = run(contextlib.nullcontext()), run(torch.device("meta"))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_layers_sharing_one_layout_object_are_refused():
    """Two layers built on one BlockLayout would see each other's blocks moved by every update."""
    layout = BlockLayout.random(FEATURES, FEATURES, B, 0.5, generator=torch.Generator().manual_seed(0))
    model = nn.Sequential(
        BlockSparseLinear(FEATURES, FEATURES, layout=layout, backend="reference"),
        BlockSparseLinear(FEATURES, FEATURES, layout=layout, backend="reference"),
    )
    with pytest.raises(ValueError, match="share one BlockLayout"):
        SMET(model, SMETAdamW(model.parameters(), backend="reference"))
    model[1].layout = layout.clone()
    SMET(model, SMETAdamW(model.parameters(), backend="reference"))


def test_optimizer_must_hold_the_sparse_parameters():
    """Else regrown slots would keep the pruned blocks' Adam moments and local steps."""
    model = TinyMLP()
    stepping_only_up = SMETAdamW(model.up.parameters(), backend="reference")
    with pytest.raises(ValueError, match=r"optimizer does not hold the sparse parameter\(s\) \['down.values'\]"):
        SMET(model, stepping_only_up)


def test_layers_too_small_to_move_a_block_are_reported():
    layer = torch.nn.Sequential(BlockSparseLinear(64, 64, density=1 / 16, block_size=16))  # nnz = 1: kept
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match="moves no block of 1 layer"):
        SMET(layer, optimizer, update_interval=1, prune_fraction=0.2)


@pytest.mark.parametrize("regrow", ["random", "gradient"])
def test_a_step_without_an_update_runs_no_tensor_op_and_reads_nothing_back(regrow, readbacks):
    """:meth:`SMET.step` follows every optimizer step: off its update steps it only counts (no aten op, no readback,
    no index rebuilt), except that RigL arms its recording (a zero probe per layer) the step before an update."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    model, opt, smet = make_run(regrow=regrow, update_interval=4)
    versions = [p.smet_layout.version for p in model.parameters()]
    for step in range(1, 4):
        x, target = batch(step)
        opt.zero_grad(set_to_none=True)
        (model(x) - target).pow(2).mean().backward()
        opt.step()
        readbacks.counting = True
        with CountOps() as counted:
            assert smet.step() is None
        readbacks.counting = False
        armed = regrow == "gradient" and step == 3
        probes = ["aten.zeros.default", "aten.expand.default", "aten.detach.default"] * len(smet.targets)
        assert readbacks.take() == [] and counted.ops == (probes if armed else [])
    assert [p.smet_layout.version for p in model.parameters()] == versions
