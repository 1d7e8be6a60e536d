"""RigL under the SMET controller (``regrow="gradient"``): it regrows the blocks of largest dense gradient, recorded
only for update steps (summed over micro-batches, none from no-grad forwards or without a backward), by a probe
of one element that saves nothing a plain step does not; a failed update is not counted, a compiled model runs one
graph per step whether recording or not, and a new controller takes the hooks over from an earlier one."""

import pytest
import torch
from torch import nn

from smet_kernels.modules import BlockSparseLinear
from smet_kernels.optim.smet_adamw import SMETAdamW
from smet_kernels.topology import SMET
from topology_runs import B, FEATURES, _layouts, batch, make_run, train_step


def test_rigl_regrows_largest_dense_gradient_blocks():
    model, opt, smet = make_run(regrow="gradient", update_interval=2, end_step=2)
    assert not smet.needs_dense_grad()
    train_step(model, opt, smet, 1)
    assert smet.needs_dense_grad() and len(model.up._forward_hooks) == 1
    # two micro-batches: the recorded dense gradient is their sum, like the parameter gradients
    up_inputs, dys = [], []
    opt.zero_grad(set_to_none=True)
    for micro in range(2):
        x, target = batch(10 + micro)
        up_inputs.append(x)
        h = model.up(x)
        h.retain_grad()
        (model.down(torch.relu(h)) - target).pow(2).mean().backward()
        dys.append(h.grad.clone())
        h.grad = None
    dense_grad = sum(dy.t() @ x for dy, x in zip(dys, up_inputs))
    dys.clear()
    opt.step()
    layout = model.up.layout
    mask_before = layout.mask.clone()
    old = layout.block_indices.clone()
    record = smet.step()
    assert not smet.needs_dense_grad() and len(model.up._forward_hooks) == 1  # kept, but records nothing now
    n = record["layers"]["up.values"]["regrown"]
    block_scores = dense_grad.reshape(8, B, 4, B).abs().sum((1, 3))
    block_scores[mask_before] = -1.0
    expected = block_scores.flatten().argsort(descending=True)[:n].sort().values
    changed = (layout.block_indices != old).any(1)
    grown = layout.block_indices[changed]
    assert (grown[:, 0] * 4 + grown[:, 1]).sort().values.tolist() == expected.tolist()
    x, target = batch(12)
    (model(x) - target).pow(2).mean().backward()
    assert all(t.dense_grad is None for t in smet.targets)  # a dense gradient only on update steps


def test_rigl_without_backward_raises():
    model, opt, smet = make_run(regrow="gradient", update_interval=1)
    with pytest.raises(RuntimeError, match="dense gradient"):
        smet.step()


def test_a_rigl_update_that_raises_is_not_counted_and_the_retry_updates():
    model, opt, smet = make_run(regrow="gradient", update_interval=2)
    train_step(model, opt, smet, 1)
    x, target = batch(2)
    (model(x) - target).pow(2).mean().backward()
    opt.step()
    recorded = smet.targets[1].dense_grad
    smet.targets[1].probe.grad = None  # as if no backward went through the second layer
    before = [t.layout.block_indices.clone() for t in smet.targets]
    with pytest.raises(RuntimeError, match="dense gradient of 'down.values'"):
        smet.step()
    assert smet.step_count == 1 and smet.history == [] and smet.needs_dense_grad()
    assert all(torch.equal(t.layout.block_indices, b) for t, b in zip(smet.targets, before))
    smet.targets[1].probe.grad = recorded
    assert smet.step()["step"] == 2 and smet.step_count == 2


def test_rigl_ignores_no_grad_forwards():
    model, opt, smet = make_run(regrow="gradient", update_interval=1)
    with torch.no_grad():
        model(batch(0)[0])
    assert all(t.dense_grad is None for t in smet.targets)


def test_the_rigl_probe_holds_one_element_and_its_gradient_is_the_dense_gradient():
    """The zero probe whose gradient records ``dyᵀx`` is stored as one element: a dense fp32 ``[out, in]`` zero per
    layer beside its gradient doubled RigL's recording memory."""
    model, opt, smet = make_run(regrow="gradient", update_interval=2)
    train_step(model, opt, smet, 1)  # the next step is an update step: armed
    x, target = batch(2)
    y_up = model.up(x)
    y_up.retain_grad()
    (model.down(torch.relu(y_up)) - target).pow(2).mean().backward()
    up = smet.targets[0]
    assert up.name == "up.values" and up.probe.shape == up.layout.shape
    assert up.probe.untyped_storage().nbytes() == 4
    torch.testing.assert_close(up.dense_grad, y_up.grad.t() @ x)


def test_recording_keeps_no_fp32_copy_of_a_bf16_layers_input_and_leaves_its_output_bit_for_bit():
    """The probe's gradient needs ``x``: saved in its own dtype (the layer saves it anyway), a recording step of a bf16
    model saves what any other step saves. ``y + x.float()·probeᵀ`` saved an fp32 copy of every sparse layer's input
    (twice the bytes of a bf16 layer's own saved input), and turned a ``-0.0`` output into ``+0.0``."""

    def saved_bytes(armed):
        gen = torch.Generator().manual_seed(0)
        layer = BlockSparseLinear(FEATURES, FEATURES, 0.5, B, generator=gen, backend="reference").to(torch.bfloat16)
        opt = SMETAdamW(layer.parameters(), lr=1e-2, backend="reference")
        smet = SMET(layer, opt, update_interval=1 if armed else 100, prune_fraction=0.3, regrow="gradient")
        assert smet.needs_dense_grad() == armed
        x = torch.randn(4, 32, FEATURES, generator=gen).to(torch.bfloat16)
        saved = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = layer(x)
        y.float().pow(2).sum().backward()
        assert (smet.targets[0].dense_grad is not None) == armed
        return sum(saved.values())

    assert saved_bytes(armed=True) == saved_bytes(armed=False)

    model = BlockSparseLinear(FEATURES, FEATURES, 0.5, B, backend="reference")
    smet = SMET(model, torch.optim.SGD(model.parameters(), lr=0.1), update_interval=1, prune_fraction=0.3,
                regrow="gradient")
    target = smet.targets[0]
    target.probe = torch.zeros(1).expand(3, 2).detach().requires_grad_()  # a [3, 2] layer's probe
    y = torch.tensor([[-0.0, 1.0, -0.0]], requires_grad=True) * 1
    out = smet._make_recorder(target, model)(model, (torch.tensor([[-1.0, float("inf")]]),), {}, y)
    assert torch.equal(torch.signbit(out), torch.signbit(y)) and torch.isfinite(out).all()
    out.sum().backward()
    assert target.dense_grad.shape == (3, 2)


class LayerLoop(nn.Module):
    """Sparse layers called in a Python loop, as a transformer calls its blocks."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.layers = nn.ModuleList(
            BlockSparseLinear(FEATURES, FEATURES, 0.5, B, generator=gen, backend="reference") for _ in range(3)
        )

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


@pytest.mark.parametrize("fullgraph", [False, True])
def test_a_compiled_rigl_model_runs_its_whole_graph_on_every_step_recording_or_not(fullgraph):
    """The recording is traced (no tensor hook): one graph while armed, one while not, and no graph break. A tensor
    hook broke the graph inside the loop, and Dynamo then ran ``forward`` eagerly for good (a graph per layer)."""
    from torch._dynamo.backends.debugging import aot_eager

    calls = [0]

    def counting_aot_eager(graph, example_inputs):
        compiled = aot_eager(graph, example_inputs)

        def run(*args):
            calls[0] += 1
            return compiled(*args)

        return run

    def train(compile_model):
        torch._dynamo.reset()
        model = LayerLoop()
        opt = SMETAdamW(model.parameters(), lr=1e-2, backend="reference")
        smet = SMET(model, opt, update_interval=2, prune_fraction=0.3, regrow="gradient")
        run = torch.compile(model, backend=counting_aot_eager, fullgraph=fullgraph) if compile_model else model
        per_step, grads = [], []
        for step in range(1, 7):
            before = calls[0]
            x, target = batch(step)
            (run(x) - target).pow(2).mean().backward()
            grads.append([t.dense_grad for t in smet.targets])
            opt.step()
            opt.zero_grad(set_to_none=True)
            smet.step()
            per_step.append(calls[0] - before)
        return per_step, grads, smet.history, _layouts(model)

    eager_calls, eager_grads, eager_history, eager_layouts = train(False)
    calls_per_step, grads, history, layouts = train(True)
    assert eager_calls == [0] * 6 and calls_per_step == [1] * 6  # was [1, 6, 3, 3, 3, 3]
    assert [step for step, g in enumerate(grads, 1) if g[0] is not None] == [2, 4, 6]
    for ours, theirs in zip(grads, eager_grads):
        assert all(a is b is None or torch.equal(a, b) for a, b in zip(ours, theirs))
    assert history == eager_history and len(history) == 3
    assert all(torch.equal(layouts[k], eager_layouts[k]) for k in layouts)


def test_a_controller_built_on_a_model_takes_over_the_dense_gradient_hooks_of_an_earlier_one():
    """The hooks stay on the layers between updates: a second controller on the same model (a notebook cell run
    again, an in-process resume) must not leave the first one's hooks there, holding it and its optimizer alive and
    recording dense gradients at every backward while it was armed."""
    import gc
    import weakref

    model, opt, smet = make_run(regrow="gradient", update_interval=2)
    train_step(model, opt, smet, 1)  # the first controller is armed for its update
    earlier = weakref.ref(smet), weakref.ref(opt)
    del opt, smet
    opt = SMETAdamW(model.parameters(), lr=1e-2, warmup_steps=4, backend="reference")
    smet = SMET(model, opt, update_interval=2, prune_fraction=0.3, regrow="gradient", seed=0)
    gc.collect()
    assert [ref() for ref in earlier] == [None, None]
    assert len(model.up._forward_hooks) == len(model.down._forward_hooks) == 1
    for step in range(2):
        train_step(model, opt, smet, step)
    assert smet.history and smet.history[0]["step"] == 2
    SMET(model, opt, update_interval=2, prune_fraction=0.3, regrow="random", seed=0)  # a SET controller too
    assert len(model.up._forward_hooks) == len(model.down._forward_hooks) == 0


def test_remove_hooks_detaches_the_dense_gradient_recorders_and_the_next_step_attaches_them_again():
    """``remove_hooks`` leaves the layers as a plain model (a model handed on without its controller); the next
    ``step`` re-attaches them, so a later RigL update still sees its dense gradient. Removed while armed, the update
    cannot run: it says so, naming the layer, and is not counted."""
    model, opt, smet = make_run(regrow="gradient", update_interval=2, end_step=6)
    for step in (1, 2):
        train_step(model, opt, smet, step)
    smet.remove_hooks()
    smet.remove_hooks()  # twice is harmless
    assert len(model.up._forward_hooks) == len(model.down._forward_hooks) == 0
    train_step(model, opt, smet, 3)  # re-attached and armed for the update at step 4
    assert len(model.up._forward_hooks) == len(model.down._forward_hooks) == 1 and smet.needs_dense_grad()
    train_step(model, opt, smet, 4)
    assert [record["step"] for record in smet.history] == [2, 4]
    train_step(model, opt, smet, 5)
    smet.remove_hooks()  # armed: step 6's backward records nothing
    with pytest.raises(RuntimeError, match="dense gradient of 'up.values' at update step 6"):
        train_step(model, opt, smet, 6)
    assert smet.step_count == 5 and [record["step"] for record in smet.history] == [2, 4]


def test_a_rigl_controller_resumed_the_step_before_an_update_records_the_dense_gradient_for_it():
    model, opt, smet = make_run(regrow="gradient", update_interval=2)
    train_step(model, opt, smet, 1)
    resumed_model, resumed_opt, resumed = make_run(regrow="gradient", update_interval=2)
    assert not resumed.needs_dense_grad()
    resumed.load_state_dict(smet.state_dict())
    assert resumed.needs_dense_grad()
    assert train_step(resumed_model, resumed_opt, resumed, 2)["step"] == 2


def test_an_armed_controller_builds_no_graph_through_a_frozen_model():
    model, _, smet = make_run(regrow="gradient", update_interval=1)
    assert smet.needs_dense_grad()
    model.requires_grad_(False)
    assert not model(batch(0)[0]).requires_grad


def test_the_dense_gradient_is_formed_in_fp32_also_when_backward_runs_under_autocast():
    model, _, smet = make_run(regrow="gradient", update_interval=1)
    x, target = batch(0)
    y_up = model.up(x)
    y_up.retain_grad()
    loss = (model.down(torch.relu(y_up)) - target).pow(2).mean()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss.backward()
    torch.testing.assert_close(smet.targets[0].dense_grad, y_up.grad.t() @ x)


def test_the_output_of_a_recording_layer_may_be_modified_in_place():
    model, _, smet = make_run(regrow="gradient", update_interval=1)
    x, target = batch(0)
    (model.down(model.up(x).relu_()) - target).pow(2).mean().backward()
    assert all(t.dense_grad is not None for t in smet.targets)


class SharedWeight(nn.Module):
    """Two layers of one weight (``second.values is first.values``): ``y = W·relu(W·x)``."""

    def __init__(self):
        super().__init__()
        self.first = BlockSparseLinear(FEATURES, FEATURES, 0.5, B, generator=torch.Generator().manual_seed(3),
                                       backend="reference")
        self.second = BlockSparseLinear(FEATURES, FEATURES, layout=self.first.layout, backend="reference")
        self.second.values = self.first.values

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def test_the_dense_gradient_of_a_weight_two_layers_share_sums_both_uses():
    """The hook sat on the first module holding the weight only: RigL scored the blocks by half its gradient."""
    model = SharedWeight()
    opt = SMETAdamW(model.parameters(), lr=1e-2, backend="reference")
    smet = SMET(model, opt, update_interval=1, prune_fraction=0.3, regrow="gradient")
    x, target = batch(0)
    x, target = x.double(), target.double()
    model.double()
    (model(x) - target).pow(2).mean().backward()
    dense = model.first.to_dense_weight().detach().requires_grad_()
    (torch.relu(x @ dense.t()) @ dense.t() - target).pow(2).mean().backward()
    (recorded,) = [t.dense_grad for t in smet.targets]
    assert len(smet.targets) == 1 and recorded is not None
    torch.testing.assert_close(recorded.double(), dense.grad, rtol=1e-5, atol=1e-7)


def test_rigl_refuses_a_sparse_weight_that_modules_of_different_kinds_hold():
    """A tied embedding and head: the embedding's use of the weight has no ``dyᵀx`` gradient to record."""
    class Holder(nn.Module):
        def __init__(self, weight):
            super().__init__()
            self.weight = weight

    model = SharedWeight()
    model.holder = Holder(model.first.values)
    opt = SMETAdamW(model.parameters(), lr=1e-2, backend="reference")
    with pytest.raises(ValueError, match="modules of different kinds hold it .BlockSparseLinear, Holder.") as raised:
        SMET(model, opt, regrow="gradient")
    assert "\n" not in str(raised.value)
    assert SMET(model, opt, regrow="random").targets[0].modules == (model.first, model.second, model.holder)


def test_an_update_right_after_remove_hooks_raises_naming_it_and_its_retry_after_a_backward_updates():
    """The step before the update armed the recording; with the hooks detached the backward records nothing, so the
    update must fail (not regrow by a zero gradient), attach the hooks again, and succeed once a backward ran."""
    model, opt, smet = make_run(regrow="gradient", update_interval=2)
    train_step(model, opt, smet, 1)
    smet.remove_hooks()
    before = [t.layout.block_indices.clone() for t in smet.targets]
    with pytest.raises(RuntimeError, match=r"dense gradient of 'up.values' .* remove_hooks\(\) detached"):
        train_step(model, opt, smet, 2)
    assert smet.step_count == 1 and smet.history == [] and smet.needs_dense_grad()
    assert all(torch.equal(t.layout.block_indices, b) for t, b in zip(smet.targets, before))
    assert len(model.up._forward_hooks) == 1 and len(model.down._forward_hooks) == 1
    x, target = batch(2)
    (model(x) - target).pow(2).mean().backward()
    record = smet.step()
    assert record["step"] == 2 and record["layers"]["up.values"]["regrown"] > 0


def test_under_torch_distributed_the_failed_update_after_remove_hooks_names_it_too(monkeypatch):
    """Every rank checks for missing dense gradients together first (an all_reduce, here on one process)."""
    import smet_kernels.topology as topology

    model, opt, smet = make_run(regrow="gradient", update_interval=2)
    train_step(model, opt, smet, 1)
    smet.remove_hooks()
    monkeypatch.setattr(topology, "_distributed", lambda: True)
    monkeypatch.setattr(topology.dist, "all_reduce", lambda tensor, *args, **kwargs: None)
    monkeypatch.setattr(topology, "_collective_device", lambda: torch.device("cpu"))
    with pytest.raises(RuntimeError, match=r"some rank ran no backward .* \(remove_hooks\(\) detached the recording "
                                           r"hooks before"):
        train_step(model, opt, smet, 2)
    assert len(model.up._forward_hooks) == 1 and smet.step_count == 1


@pytest.mark.parametrize("masked", [False, True])
def test_a_layer_called_with_its_input_by_keyword_records_the_dense_gradient_on_the_armed_step(masked):
    """The hook read the layer's input as ``inputs[0]``: ``layer(x=h)`` raised an IndexError on the step before each
    update only."""
    from smet_kernels.masked import MaskedLinear

    cls = MaskedLinear if masked else BlockSparseLinear
    layer = cls(FEATURES, FEATURES, 0.5, B, generator=torch.Generator().manual_seed(0))
    model = nn.ModuleDict({"layer": layer})
    smet = SMET(model, torch.optim.SGD(model.parameters(), lr=0.0), update_interval=1, regrow="gradient")
    x, _ = batch(0)
    layer(x=x).pow(2).sum().backward()
    dense = layer.to_dense_weight().detach().requires_grad_()
    (x @ dense.t()).pow(2).sum().backward()
    (target,) = smet.targets
    torch.testing.assert_close(target.dense_grad, dense.grad)
    assert smet.step()["layers"]["layer." + ("weight" if masked else "values")]["regrown"] > 0


class _HiddenLayer(nn.Module):
    """A home-made sparse layer whose ``forward`` names its input ``hidden``."""

    def __init__(self, layer: BlockSparseLinear):
        super().__init__()
        self.values, self.layout = layer.values, layer.layout

    def forward(self, hidden, scale=None):
        from smet_kernels.functional import block_sparse_linear

        return block_sparse_linear(hidden, self.values, self.layout)


def test_a_home_made_layer_called_with_its_input_by_its_own_keyword_records_the_dense_gradient():
    """The hook read a keyword call's input as ``kwargs["x"]``: a layer whose forward names it otherwise raised a
    KeyError on the step before each update only."""
    layer = _HiddenLayer(BlockSparseLinear(FEATURES, FEATURES, 0.5, B, generator=torch.Generator().manual_seed(0)))
    model = nn.ModuleDict({"layer": layer})
    smet = SMET(model, torch.optim.SGD(model.parameters(), lr=0.0), update_interval=1, regrow="gradient")
    x, _ = batch(0)
    layer(hidden=x, scale=2.0).pow(2).sum().backward()
    from smet_kernels.functional import to_dense

    dense = to_dense(layer.values, layer.layout).detach().requires_grad_()
    (x @ dense.t()).pow(2).sum().backward()
    (target,) = smet.targets
    torch.testing.assert_close(target.dense_grad, dense.grad)


class _EitherInputLayer(_HiddenLayer):
    def forward(self, hidden=None, *, inputs=None):
        return super().forward(hidden if hidden is not None else inputs)


def test_a_rigl_layer_called_without_its_first_argument_raises_one_line_naming_it():
    layer = _EitherInputLayer(BlockSparseLinear(FEATURES, FEATURES, 0.5, B, generator=torch.Generator().manual_seed(0)))
    model = nn.ModuleDict({"layer": layer})
    SMET(model, torch.optim.SGD(model.parameters(), lr=0.0), update_interval=1, regrow="gradient")
    x, _ = batch(0)
    with pytest.raises(TypeError, match=r"called without a tensor as its first argument \('hidden'\); call it"):
        layer(inputs=x)


class _VariadicLayer(_HiddenLayer):
    """A layer whose ``forward`` takes ``*args, **kwargs`` (a wrapper's signature) and reads its input as ``x``."""

    def forward(self, *args, **kwargs):
        return super().forward(args[0] if args else kwargs["x"])


def test_a_layer_with_a_variadic_forward_called_with_x_by_keyword_records_the_dense_gradient():
    """The hook looked the input up under the first argument's name, ``args``, and raised on a ``x=`` call that it
    read before (as ``kwargs["x"]``)."""
    layer = _VariadicLayer(BlockSparseLinear(FEATURES, FEATURES, 0.5, B, generator=torch.Generator().manual_seed(0)))
    model = nn.ModuleDict({"layer": layer})
    smet = SMET(model, torch.optim.SGD(model.parameters(), lr=0.0), update_interval=1, regrow="gradient")
    x, _ = batch(0)
    layer(x=x).pow(2).sum().backward()
    from smet_kernels.functional import to_dense

    dense = to_dense(layer.values, layer.layout).detach().requires_grad_()
    (x @ dense.t()).pow(2).sum().backward()
    (target,) = smet.targets
    torch.testing.assert_close(target.dense_grad, dense.grad)
