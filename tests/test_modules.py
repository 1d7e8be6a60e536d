import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from smet_kernels import BlockLayout, BlockSparseLinear, MaskedLinear, from_dense, sparsify, to_dense
from smet_kernels.modules import sparsify_with_layouts


def test_block_sparse_linear_matches_dense_linear():
    torch.manual_seed(0)
    layer = BlockSparseLinear(48, 32, density=0.5, block_size=16, bias=True)
    assert isinstance(layer.values, nn.Parameter) and layer.values.shape == (layer.layout.nnz, 16, 16)
    assert layer.values.smet_layout is layer.layout
    x = torch.randn(2, 5, 48)
    expected = nn.functional.linear(x, to_dense(layer.values, layer.layout), layer.bias)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    layer(x).sum().backward()
    assert layer.values.grad.shape == layer.values.shape and layer.bias.grad.shape == (32,)


def test_state_dict_restores_layout_in_place():
    src = BlockSparseLinear(64, 64, density=0.25, block_size=16, generator=torch.Generator().manual_seed(1))
    dst = BlockSparseLinear(64, 64, density=0.25, block_size=16, generator=torch.Generator().manual_seed(2))
    assert src.layout != dst.layout
    layout_object = dst.layout
    dst.load_state_dict(src.state_dict())
    assert dst.layout is layout_object and dst.values.smet_layout is layout_object
    assert dst.layout == src.layout
    assert torch.equal(dst.values, src.values)
    x = torch.randn(3, 64)
    torch.testing.assert_close(dst(x), src(x))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process: DCP says so
@pytest.mark.parametrize("sparsify_fn", ["sparsify", "masked_sparsify"])
def test_torch_distributed_checkpoint_state_dict_api_saves_and_restores_a_sparse_model_and_its_optimizer(
    tmp_path, sparsify_fn
):
    """``get_state_dict`` / ``set_state_dict`` (torch.distributed.checkpoint.state_dict, the FSDP2 training loops'
    API) resolve every state-dict key as an attribute: ``block_indices`` must be one (it raised AttributeError)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import smet_kernels as sk

    def build(seed):
        model = nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 32))
        getattr(sk, sparsify_fn)(model, 0.5, 16, generator=torch.Generator().manual_seed(seed))
        optimizer = sk.SMETAdamW(model.parameters(), lr=1e-2)
        model(torch.randn(4, 32)).square().sum().backward()
        optimizer.step()
        return model, optimizer

    source, source_optimizer = build(0)
    model_state, optimizer_state = get_state_dict(source, source_optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp_path)
    target, target_optimizer = build(1)
    model_state, optimizer_state = get_state_dict(target, target_optimizer)
    loaded = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(loaded, checkpoint_id=tmp_path)
    set_state_dict(target, target_optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
    for got, want in zip(target.state_dict().values(), source.state_dict().values()):
        assert torch.equal(got, want)
    for p, q in zip(target.parameters(), source.parameters()):
        for name, value in source_optimizer.state[q].items():
            assert torch.equal(target_optimizer.state[p][name], value), name


@pytest.mark.parametrize("cls", [BlockSparseLinear, MaskedLinear])
def test_a_layer_built_under_the_meta_device_is_filled_by_to_empty_and_load_state_dict(cls):
    """``with torch.device("meta")`` (deferred init, as Hugging Face's) leaves the layout's index on the CPU."""
    src = cls(64, 64, density=0.25, block_size=16, bias=True, generator=torch.Generator().manual_seed(1))
    with torch.device("meta"):
        dst = cls(64, 64, density=0.25, block_size=16, bias=True, generator=torch.Generator().manual_seed(2))
    assert dst.layout.kernel_index("cpu").device.type == "cpu" and dst.layout.version_tensor.device.type == "cpu"
    dst.to_empty(device="cpu")
    dst.load_state_dict(src.state_dict())
    assert dst.layout == src.layout
    x = torch.randn(3, 64)
    torch.testing.assert_close(dst(x), src(x))


def test_state_dict_holds_the_layout_as_an_int64_tensor_snapshot():
    layer = BlockSparseLinear(64, 32, density=0.5, block_size=16, bias=True)
    state = layer.state_dict()
    assert set(state) == {"values", "bias", "block_indices"}  # tensors only: safetensors can store it
    assert state["block_indices"].dtype == torch.int64
    assert torch.equal(state["block_indices"], layer.layout.block_indices)
    layer.layout.replace_blocks(torch.tensor([0]), (~layer.layout.mask).nonzero()[:1])  # a later topology update
    assert not torch.equal(state["block_indices"], layer.layout.block_indices)


def test_state_dict_without_block_indices_is_refused_when_strict():
    layer = BlockSparseLinear(64, 32, density=0.5, block_size=16)
    with pytest.raises(RuntimeError, match="block_indices"):
        layer.load_state_dict({"values": layer.values.detach().clone()})
    layer.load_state_dict({"values": layer.values.detach().clone()}, strict=False)


def test_state_dict_of_an_earlier_release_with_the_layout_as_extra_state_still_loads():
    src = BlockSparseLinear(64, 64, density=0.25, block_size=16, generator=torch.Generator().manual_seed(1))
    dst = BlockSparseLinear(64, 64, density=0.25, block_size=16, generator=torch.Generator().manual_seed(2))
    old = {"values": src.values.detach().clone(), "_extra_state": src.layout.state_dict()}
    dst.load_state_dict(old)
    assert dst.layout == src.layout
    x = torch.randn(3, 64)
    torch.testing.assert_close(dst(x), src(x))


def test_state_dict_with_mismatched_layout_shape_fails():
    src = BlockSparseLinear(64, 64, density=0.25, block_size=16)
    dst = BlockSparseLinear(64, 64, density=0.25, block_size=32)
    with pytest.raises((ValueError, RuntimeError)):
        dst.load_state_dict(src.state_dict())


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32, bias=False)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.down(torch.relu(self.up(x))))


def test_sparsify_keeps_the_weights_of_kept_blocks():
    torch.manual_seed(0)
    model = _Mlp()
    dense_up = model.up.weight.detach().clone()
    sparsify(model, density=0.5, block_size=16, exclude=["head"], generator=torch.Generator().manual_seed(0))
    assert isinstance(model.up, BlockSparseLinear) and isinstance(model.down, BlockSparseLinear)
    assert type(model.head) is nn.Linear
    assert torch.equal(model.up.values, from_dense(dense_up, model.up.layout))
    assert model.up.bias is not None and model.down.bias is None
    assert model(torch.randn(4, 32)).shape == (4, 10)


def test_sparsify_with_layouts_uses_the_given_layouts_and_allocates_nothing_on_the_meta_device():
    model = _Mlp()
    dense_up = model.up.weight.detach().clone()
    up_layout = BlockLayout.random(64, 32, 16, 0.5, generator=torch.Generator().manual_seed(3))
    sparsify_with_layouts(model, {"up": up_layout})
    assert model.up.layout is up_layout and type(model.down) is nn.Linear
    assert torch.equal(model.up.values, from_dense(dense_up, up_layout))
    with torch.device("meta"):
        skeleton = _Mlp()
    sparsify_with_layouts(skeleton, {"down": BlockLayout.random(32, 64, 16, 0.5)})
    assert skeleton.down.values.is_meta and skeleton.down.values.shape == (4, 16, 16)
    with pytest.raises(ValueError, match="'up' is no nn.Linear"):
        sparsify_with_layouts(model, {"up": up_layout})
    with pytest.raises(ValueError, match="layout.shape"):
        sparsify_with_layouts(model, {"head": up_layout})


def test_sparsify_include_and_erk():
    model = _Mlp()
    sparsify(model, density=0.5, block_size=16, include=[r"^up$"])
    assert isinstance(model.up, BlockSparseLinear) and type(model.down) is nn.Linear
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(256, 256))
    sparsify(model, density=0.3, block_size=16, distribution="erk")
    assert model[0].density == 1.0 and model[1].density < 0.3


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        ({"density": 0.0}, ValueError, "density"),
        ({"density": 0.5, "block_size": 48}, ValueError, "block_size"),
        ({"density": 0.5, "block_size": 64}, ValueError,
         "^layer 'up': in_features=32 is not divisible by block_size=64 "),
        ({"density": 0.5, "include": ["nothing-matches"]}, ValueError, "no nn.Linear"),
        ({"density": 0.5, "include": ["("]}, ValueError, "include"),
        ({"density": 0.5, "include": 3}, TypeError, "^include must be a regular expression or a list of them, got int$"),
        ({"density": 0.5, "distribution": "normal"}, ValueError, "distribution"),
        ({"density": 0.5, "layer_factory": "BlockSparseLinear"}, TypeError,
         r"^layer_factory must be None or a callable \(linear, layout\) -> nn.Module, got str$"),
        ({"density": 0.5, "layer_factory": lambda linear, layout: None}, TypeError,
         "^layer_factory returned a NoneType for layer 'up', not an nn.Module$"),
    ],
)
def test_sparsify_bad_arguments(kwargs, exc, word):
    kwargs.setdefault("block_size", 16)
    with pytest.raises(exc, match=word):
        sparsify(_Mlp(), exclude=["head"] if "include" not in kwargs else None, **kwargs)


def test_block_sparse_linear_bad_arguments():
    with pytest.raises(TypeError, match="density"):
        BlockSparseLinear(32, 32, block_size=16)
    with pytest.raises(ValueError, match="layout.shape"):
        BlockSparseLinear(32, 32, layout=BlockLayout.random(64, 32, 16, 0.5))
    with pytest.raises(ValueError, match="in_features"):
        BlockSparseLinear(40, 32, density=0.5, block_size=16)


def test_a_density_or_block_size_given_beside_a_layout_must_describe_it():
    layout = BlockLayout.random(64, 32, 16, 0.5)  # 4 of 8 blocks
    for layer in (BlockSparseLinear, MaskedLinear):
        assert layer(32, 64, density=0.5, block_size=16, layout=layout).layout is layout
        assert layer(32, 64, density=0.45, layout=layout).layout is layout  # round(0.45 · 8) = 4 blocks too
        with pytest.raises(ValueError, match="^block_size 32 does not match layout.block_size 16$"):
            layer(32, 64, block_size=32, layout=layout)
        with pytest.raises(ValueError, match=r"^density 0.25 does not match the layout's \(4 of 8 blocks, 0.5\)"):
            layer(32, 64, density=0.25, layout=layout)
    assert BlockSparseLinear(256, 256, density=0.5).layout.block_size == 128  # without a layout: b = 128


def test_a_non_floating_dtype_or_unknown_backend_is_refused_when_the_layer_is_built():
    for layer in (BlockSparseLinear, MaskedLinear):
        with pytest.raises(TypeError, match="^dtype must be None or a floating dtype .*, got torch.int32$"):
            layer(32, 64, density=0.5, block_size=16, dtype=torch.int32)
    with pytest.raises(ValueError, match="^backend must be one of .*, got 'cuda'$"):
        BlockSparseLinear(32, 64, density=0.5, block_size=16, backend="cuda")
    with pytest.raises(ValueError, match="^backend must be one of .*, got 'cuda'$"):
        sparsify(_Mlp(), density=0.5, block_size=16, exclude=["head"], backend="cuda")


def test_a_generator_that_is_not_a_torch_generator_is_refused_by_name():
    for build in (
        lambda: BlockLayout.random(64, 32, 16, 0.5, generator=0),
        lambda: BlockSparseLinear(32, 64, density=0.5, block_size=16, generator=0),
        lambda: BlockSparseLinear(32, 64, layout=BlockLayout.random(64, 32, 16, 0.5), generator=0),
        lambda: MaskedLinear(32, 64, density=0.5, block_size=16, generator=0),
        lambda: sparsify(_Mlp(), density=0.5, block_size=16, exclude=["head"], generator="seed"),
    ):
        with pytest.raises(TypeError, match="^generator must be a torch.Generator or None, got (int|str)$"):
            build()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_cuda_layer_seeded_by_a_cpu_generator():
    layer = BlockSparseLinear(64, 64, density=0.5, block_size=16, bias=True, device="cuda",
                              generator=torch.Generator().manual_seed(0))
    again = BlockSparseLinear(64, 64, density=0.5, block_size=16, bias=True, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(layer.values.cpu(), again.values)


def test_values_keep_their_layout_tag_when_the_parameter_object_is_replaced():
    import copy

    layer = BlockSparseLinear(32, 32, density=0.5, block_size=16)
    twin = copy.deepcopy(layer)
    assert twin.values.smet_layout is twin.layout and twin.layout == layer.layout
    other = BlockSparseLinear(32, 32, density=0.5, block_size=16)
    other.load_state_dict(layer.state_dict(), assign=True)
    assert other.values.smet_layout is other.layout and other.layout == layer.layout
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        layer.double()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
    assert layer.values.dtype == torch.float64 and layer.values.smet_layout is layer.layout


def test_sparsify_keeps_a_shared_layer_shared():
    shared = nn.Sequential(nn.Linear(32, 32))
    model = nn.ModuleDict({"first": shared, "second": shared, "own": nn.Linear(32, 32)})
    sparsify(model, density=0.5, block_size=16, include=[r"^second\."])  # matches the second name only
    assert isinstance(model["first"][0], BlockSparseLinear) and model["first"][0] is model["second"][0]
    assert type(model["own"]) is nn.Linear
    again = nn.Linear(32, 32)
    model = nn.ModuleDict({"a": again, "b": again})
    sparsify(model, density=0.5, block_size=16)
    assert isinstance(model["a"], BlockSparseLinear) and model["a"] is model["b"]


def test_sparsify_refuses_to_untie_tied_weights():
    embed = nn.Embedding(64, 32)
    head = nn.Linear(32, 64, bias=False)
    head.weight = embed.weight
    model = nn.ModuleDict({"embed": embed, "up": nn.Linear(32, 32), "head": head})
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    with pytest.raises(ValueError, match="'head' shares a parameter with 'embed.weight'"):
        sparsify(model, density=0.5, block_size=16, generator=generator)
    assert torch.equal(generator.get_state(), state)  # refused before any layout was drawn
    sparsify(model, density=0.5, block_size=16, exclude="head")
    assert isinstance(model["up"], BlockSparseLinear) and model["head"].weight is model["embed"].weight


def test_sparsify_that_refuses_a_later_layer_leaves_every_layer_dense():
    first, second = nn.Linear(32, 32), nn.Linear(32, 32, dtype=torch.complex64)
    model = nn.Sequential(first, second)
    with pytest.raises(TypeError, match="dtype must be None or a floating dtype"):
        sparsify(model, density=0.5, block_size=16)
    assert model[0] is first and model[1] is second


def test_sparsify_an_already_sparsified_model():
    model = _Mlp()
    sparsify(model, density=0.5, block_size=16, include="up")
    up = model.up
    sparsify(model, density=0.5, block_size=16, exclude="head")
    assert model.up is up and isinstance(model.down, BlockSparseLinear)
    with pytest.raises(ValueError, match="no nn.Linear"):
        sparsify(model, density=0.5, block_size=16, exclude="head")


def test_sparsify_keeps_eval_mode_and_frozen_parameters():
    from smet_kernels.masked import MaskedLinear, masked_sparsify

    for convert, cls in ((sparsify, BlockSparseLinear), (masked_sparsify, MaskedLinear)):
        model = _Mlp().eval()
        model.up.weight.requires_grad_(False)
        model.down.requires_grad_(True)
        model.up.bias.requires_grad_(True)
        convert(model, density=0.5, block_size=16, exclude="head")
        assert isinstance(model.up, cls) and not model.up.training and not model.down.training
        weight = "values" if cls is BlockSparseLinear else "weight"
        assert not getattr(model.up, weight).requires_grad and model.up.bias.requires_grad
        assert getattr(model.down, weight).requires_grad


def test_sparsify_warns_when_whole_blocks_miss_the_target_density():
    with pytest.warns(RuntimeWarning, match="realised density is 0.5 for a target of 0.05"):
        sparsify(_Mlp(), density=0.05, block_size=32, exclude="head")  # 2 + 2 blocks of 32 x 32, at least 1 each
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsify(_Mlp(), density=0.5, block_size=16, exclude="head")


def test_sparsify_warns_when_whole_blocks_miss_a_small_target_by_more_than_one_percent():
    with pytest.warns(RuntimeWarning, match="realised density is 0.125 for a target of 0.05"):
        sparsify(_Mlp(), density=0.05, block_size=16, exclude="head")  # 1 of 8 blocks of 16 x 16 in each layer


def test_sparsify_warns_when_one_block_per_layer_is_twice_a_tiny_target():
    with pytest.warns(RuntimeWarning, match="realised density is 0.003906 for a target of 0.002"):
        sparsify(nn.Sequential(nn.Linear(256, 256)), density=0.002, block_size=16)  # 1 of 256 blocks


def test_sparsify_refuses_a_model_that_is_itself_a_linear():
    with pytest.raises(ValueError, match="model is itself an nn.Linear: use BlockSparseLinear.from_linear"):
        sparsify(nn.Linear(32, 32), density=0.5, block_size=16)


def test_sparsify_refuses_a_layer_whose_bias_is_tied_to_another_modules():
    model = _Mlp()
    model.head.bias = model.down.bias = None
    other = nn.Linear(64, 64)
    other.bias = model.up.bias
    model.other = other
    with pytest.raises(ValueError, match="'up' shares a parameter with 'other.bias'"):
        sparsify(model, density=0.5, block_size=16, include="^up$")


def test_sparsify_excludes_a_shared_layer_when_any_of_its_names_matches_exclude():
    shared = nn.Linear(32, 32)
    model = nn.ModuleDict({"first": shared, "second": shared, "own": nn.Linear(32, 32)})
    sparsify(model, density=0.5, block_size=16, exclude=r"^second$")
    assert model["first"] is shared and model["second"] is shared and isinstance(model["own"], BlockSparseLinear)


def test_block_sparse_linear_draws_values_and_bias_within_one_over_root_in_features():
    layer = BlockSparseLinear(64, 16, density=1.0, block_size=16, bias=True, generator=torch.Generator().manual_seed(0))
    bound = 1 / 8  # 1 / √64, not 1 / √16
    assert 0.9 * bound < layer.values.abs().max() <= bound and 0.5 * bound < layer.bias.abs().max() <= bound


@pytest.mark.parametrize("sparsify_fn", ["sparsify", "masked_sparsify"])
def test_sparsify_with_a_generator_leaves_the_global_random_stream_as_it_was(sparsify_fn):
    import smet_kernels as sk

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32, bias=True), nn.Linear(32, 64))
    weight = model[0].weight.detach().clone()
    state = torch.get_rng_state()
    getattr(sk, sparsify_fn)(model, 1.0, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)  # dropout and data order as in the dense run
    assert torch.equal(model[0].to_dense_weight(), weight)


@pytest.mark.parametrize("compact", [True, False])
def test_from_linear_of_a_subclass_passing_its_arguments_on_through_kwargs_builds_that_subclass(compact):
    base = BlockSparseLinear if compact else MaskedLinear

    class Scaled(base):
        def __init__(self, *args, scale=2.0, **kwargs):  # nn.utils.skip_init refused it: no 'device' in its signature
            super().__init__(*args, **kwargs)
            self.scale = scale

    linear = nn.Linear(32, 64)
    layer = Scaled.from_linear(linear, BlockLayout.random(64, 32, 16, 1.0))
    assert type(layer) is Scaled and layer.scale == 2.0
    assert torch.equal(layer.to_dense_weight(), linear.weight)


def test_load_state_dict_refuses_block_indices_outside_the_layers_block_grid_naming_the_key():
    layer = BlockSparseLinear(64, 64, density=0.25, block_size=16, generator=torch.Generator().manual_seed(0))
    before = layer.layout.block_indices.clone()
    state = layer.state_dict()
    state["block_indices"] = before.clone()
    state["block_indices"][0] = torch.tensor([4, 0])  # a 4x4 grid has block rows 0..3
    with pytest.raises(RuntimeError, match=r"block_indices: block_indices out of range .*shape \(64, 64\)"):
        layer.load_state_dict(state)
    assert torch.equal(layer.layout.block_indices, before) and layer.layout.version == 0


def test_a_layout_that_is_not_a_block_layout_is_refused_by_name():
    for cls in (BlockSparseLinear, MaskedLinear):
        with pytest.raises(TypeError, match="^layout must be a BlockLayout, got dict$"):
            cls(32, 32, layout={"block_indices": torch.tensor([[0, 0]])})


@pytest.mark.parametrize("cls", [BlockSparseLinear, MaskedLinear])
def test_from_linear_refuses_a_layer_that_is_no_linear_by_name(cls):
    """A GPT-2 ``Conv1D`` (or any other layer) raised ``AttributeError: ... no attribute 'in_features'``."""
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    layout = BlockLayout.random(32, 32, 16, 0.5)
    for layer in (pytorch_utils.Conv1D(32, 32), nn.Conv1d(32, 32, 1)):
        with pytest.raises(TypeError, match=f"^linear must be an nn.Linear, got {type(layer).__name__}"):
            cls.from_linear(layer, layout)


def test_forward_runs_the_backend_the_layer_was_built_with(monkeypatch):
    import smet_kernels.modules as modules

    seen = []
    real = modules.block_sparse_linear
    monkeypatch.setattr(modules, "block_sparse_linear",
                        lambda *args, **kwargs: seen.append(kwargs.get("backend")) or real(*args, **kwargs))
    layer = BlockSparseLinear(32, 32, density=0.5, block_size=16, backend="reference")
    layer(torch.randn(2, 32))
    assert seen == ["reference"]


def test_sparse_linear_names_lists_a_shared_layer_once_by_its_first_name():
    from smet_kernels.modules import sparse_linear_names

    shared = nn.Linear(32, 32)
    model = nn.ModuleDict({"first": shared, "own": nn.Linear(32, 32), "second": shared})
    assert sparse_linear_names(model) == ["first", "own"]
    assert sparse_linear_names(model, include=r"^second$") == ["first"]


def test_sparsify_with_layouts_refuses_a_layer_factory_that_is_not_callable_by_name():
    model = _Mlp()
    with pytest.raises(TypeError, match="^layer_factory must be None or a callable .*, got int$"):
        sparsify_with_layouts(model, {"up": BlockLayout.random(64, 32, 16, 0.5)}, layer_factory=3)
    assert type(model.up) is nn.Linear


def test_readme_use_the_library_snippet_runs_and_trains_a_sparse_model(reference_backend):
    """The README's first example, as a newcomer pastes it (the reference ops: the interpreter would take minutes)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", readme.split("## Use the library", 1)[1], re.S).group(1)
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "Triton cannot run on device 'cpu'" where it applies
        exec(compile(snippet, "README.md", "exec"), namespace)
    assert namespace["y"].shape == (8, 1024) and torch.isfinite(namespace["loss"])
    model, smet = namespace["model"], namespace["smet"]
    assert smet.step_count == 3 and len(smet.targets) == 7 * len(model.layers)
    assert isinstance(model.layers[0].mlp.up_proj, BlockSparseLinear)
