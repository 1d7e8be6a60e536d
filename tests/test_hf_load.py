"""load_sparse_pretrained: a sparse save_pretrained folder back as a sparse model, no dense weight ever built."""

import collections
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from test_densify import tiny_causal_lm  # noqa: E402
from test_hf import B, SEQ, random_tokens, same_layouts, tiny_model  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402
from transformers.trainer_utils import load_sharded_checkpoint  # noqa: E402

import smet_kernels as sk  # noqa: E402
from smet_kernels import hf  # noqa: E402
from smet_kernels.hf import load_sparse_pretrained  # noqa: E402
from smet_kernels.modules import BlockLayoutLinear  # noqa: E402

pytestmark = pytest.mark.usefixtures("reference_backend")

UP_VALUES = "model.layers.0.mlp.up_proj.values"
UP_INDICES = "model.layers.0.mlp.up_proj.block_indices"
IDS = torch.randint(0, 32, (2, SEQ), generator=torch.Generator().manual_seed(0))  # within every vocabulary here


def sparse_model(family: str, **overrides) -> torch.nn.Module:
    """A tiny causal LM of ``family`` (``llama``, ``qwen2``, GPT-2's ``Conv1D`` layers) sparsified but its head."""
    model = tiny_causal_lm("gpt2") if family == "gpt2" else tiny_model(family, **overrides)
    sk.sparsify(model, 0.5, B, exclude="lm_head", generator=torch.Generator().manual_seed(0))
    return model.eval()


def sparse_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, BlockLayoutLinear)}


def saved(folder, family: str = "llama", **overrides) -> torch.nn.Module:
    model = sparse_model(family, **overrides)
    model.save_pretrained(folder)
    return model


def rewrite_checkpoint(folder, edit) -> None:
    """Replace ``model.safetensors`` by ``edit`` applied to its tensors."""
    path = folder / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in bytes) that an op returns off the meta device while the mode is on."""

    def __init__(self):
        super().__init__()
        self.nbytes, self.what = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and not tensor.is_meta:
                if tensor.numel() * tensor.element_size() > self.nbytes:
                    self.nbytes, self.what = tensor.numel() * tensor.element_size(), (func, tuple(tensor.shape))
        return out


@pytest.mark.parametrize(
    "family, overrides, shard_size, model_class",
    [
        ("llama", {}, None, transformers.AutoModelForCausalLM),
        ("llama", {}, "40KB", transformers.AutoModelForCausalLM),
        ("qwen2", {"tie_word_embeddings": True}, "40KB", transformers.AutoModelForCausalLM),
        ("gpt2", {}, None, transformers.GPT2LMHeadModel),
    ],
    ids=["llama", "llama-sharded", "qwen2-tied-sharded", "gpt2-conv1d"],
)
def test_sparse_checkpoint_loads_back_with_its_layouts_and_the_saved_logits(
    tmp_path, family, overrides, shard_size, model_class
):
    source = sparse_model(family, **overrides)
    source.save_pretrained(tmp_path, **({} if shard_size is None else {"max_shard_size": shard_size}))
    assert (len(list(tmp_path.glob("*.safetensors"))) > 1) == (shard_size is not None)
    model = load_sparse_pretrained(tmp_path, model_class)
    assert type(model) is type(source) and not model.training
    assert same_layouts(model, source)
    dense_class = transformers.pytorch_utils.Conv1D if family == "gpt2" else torch.nn.Linear
    assert sparse_layers(model).keys() == sparse_layers(source).keys()
    for layer in sparse_layers(model).values():
        assert type(layer) is sk.BlockSparseLinear and layer.values.smet_layout is layer.layout
        assert getattr(layer, "dense_class", torch.nn.Linear) is dense_class  # densify gives GPT-2 its Conv1D back
    assert dict(model.named_parameters()).keys() == dict(source.named_parameters()).keys()
    assert all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    tied = [m.get_output_embeddings().weight is m.get_input_embeddings().weight for m in (model, source)]
    assert tied == [family != "llama"] * 2
    torch.testing.assert_close(model(IDS).logits, source(IDS).logits, rtol=0, atol=0)


def test_loading_never_allocates_the_dense_weight_of_a_sparse_layer(tmp_path):
    """Every sparse layer is 64 x 64 and the checkpoint's dense tensors (embeddings, head) are smaller: a tensor of
    a sparse layer's dense size made during the load is its dense weight. The route it replaces does make them."""
    sizes = dict(vocab_size=32, intermediate_size=64, num_key_value_heads=4)
    source = sparse_model("llama", **sizes)
    source.save_pretrained(tmp_path, max_shard_size="40KB")
    dense_bytes = min(layer.in_features * layer.out_features * 4 for layer in sparse_layers(source).values())
    with LargestTensor() as naive:
        model = tiny_model("llama", seed=5, **sizes)
        sk.sparsify(model, 0.5, B, exclude="lm_head")
        load_sharded_checkpoint(model, tmp_path)
    assert naive.nbytes >= dense_bytes
    with LargestTensor() as loading:
        model = load_sparse_pretrained(tmp_path)
    assert 0 < loading.nbytes < dense_bytes, loading.what
    torch.testing.assert_close(model(IDS).logits, source(IDS).logits, rtol=0, atol=0)


def test_dtype_casts_every_floating_tensor_of_the_checkpoint_and_backend_reaches_every_sparse_layer(tmp_path):
    source = saved(tmp_path)
    model = load_sparse_pretrained(tmp_path, dtype=torch.bfloat16, backend="reference")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {layer.backend for layer in sparse_layers(model).values()} == {"reference"}
    assert same_layouts(model, source)
    up, source_up = model.model.layers[0].mlp.up_proj, source.model.layers[0].mlp.up_proj
    assert torch.equal(up.values, source_up.values.to(torch.bfloat16))
    logits, expected = model(IDS).logits, source(IDS).logits
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), expected, rtol=0, atol=0.05 * expected.abs().max().item())


def test_loaded_model_trains_on_with_smet_from_the_saved_topology(tmp_path):
    source = sparse_model("llama")
    optimizer = sk.SMETAdamW(source.parameters(), lr=1e-2, warmup_steps=2)
    smet = sk.SMET(source.train(), optimizer, update_interval=1, prune_fraction=0.3, regrow="random", seed=3)
    batch = torch.stack([row["input_ids"] for row in random_tokens(4)])
    source(batch, labels=batch).loss.backward()
    optimizer.step()
    smet.step()  # the slots no longer run row by row
    source.eval().save_pretrained(tmp_path, max_shard_size="40KB")
    model = load_sparse_pretrained(tmp_path)
    assert same_layouts(model, source)
    torch.testing.assert_close(model(IDS).logits, source(IDS).logits, rtol=0, atol=0)
    optimizer = sk.SMETAdamW(model.parameters(), lr=1e-2, warmup_steps=2)
    smet = sk.SMET(model.train(), optimizer, update_interval=1, prune_fraction=0.3, regrow="random", seed=4)
    before = {name: layer.layout.block_indices.clone() for name, layer in sparse_layers(model).items()}
    values = model.model.layers[0].mlp.up_proj.values.detach().clone()
    model(batch, labels=batch).loss.backward()
    optimizer.step()
    smet.step()
    assert smet.step_count == 1 and len(smet.history) == 1
    assert not torch.equal(model.model.layers[0].mlp.up_proj.values, values)
    assert any(not torch.equal(layer.layout.block_indices, before[name]) for name, layer in
               sparse_layers(model).items())  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_model_loads_onto_the_requested_device(tmp_path):
    source = saved(tmp_path)
    model = load_sparse_pretrained(tmp_path, device="cuda")
    assert all(t.device.type == "cuda" for t in [*model.parameters(), *model.buffers()])
    assert same_layouts(model, source) and model.model.layers[0].mlp.up_proj.layout.device.type == "cpu"
    torch.testing.assert_close(model(IDS.cuda()).logits.cpu(), source(IDS).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("removed, message", [("config.json", "holds no config.json"),
                                              ("model.safetensors", "holds no model.safetensors")])  # fmt: skip
def test_a_folder_without_config_or_weights_is_refused_in_one_line(tmp_path, removed, message):
    saved(tmp_path)
    (tmp_path / removed).unlink()
    with pytest.raises(FileNotFoundError, match=message) as info:
        load_sparse_pretrained(tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("option, error, message", [
    ({"dtype": "bfloat16"}, TypeError, "dtype must be None or a floating torch.dtype .* got 'bfloat16'"),
    ({"dtype": torch.int64}, TypeError, "dtype must be None or a floating torch.dtype .* got torch.int64"),
    ({"device": "tpu"}, ValueError, "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    ({"model_class": int}, TypeError, "model_class must be an AutoModel... class or a PreTrainedModel subclass"),
    ({"model_class": transformers.BertModel}, ValueError, "model_class BertModel takes a BertConfig, but .* holds a "
                                                          "LlamaConfig: pass its model class or an AutoModel"),
], ids=["dtype-str", "dtype-int", "device", "model-class", "model-class-of-another-family"])  # fmt: skip
def test_a_bad_dtype_device_or_model_class_is_refused_in_one_line_naming_it(tmp_path, option, error, message):
    saved(tmp_path)
    with pytest.raises(error, match=message) as info:
        load_sparse_pretrained(tmp_path, **option)
    assert "\n" not in str(info.value)


def test_a_folder_that_is_no_path_is_refused_in_one_line_naming_folder():
    with pytest.raises(TypeError, match=r"^folder must be a path \(str or os.PathLike\) of a save_pretrained folder, "
                                        "got 123$"):
        load_sparse_pretrained(123)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_device_without_cuda_is_refused_in_one_line(tmp_path):
    saved(tmp_path)
    with pytest.raises(ValueError, match="device 'cuda' requested but CUDA is not available"):
        load_sparse_pretrained(tmp_path, device="cuda")


def test_a_checkpoint_without_sparse_layer_is_sent_to_from_pretrained(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no sparse layer .* AutoModelForCausalLM.from_pretrained") as info:
        load_sparse_pretrained(tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda state: state.pop("model.norm.weight"), "'model.norm.weight' is missing"),
        (lambda state: state.update(extra=torch.zeros(2)), "unexpected key 'extra' in model.safetensors"),
        (lambda state: state.update({"model.layers.0.mlp.up_proj.values": torch.zeros(3, B, B)}),
         r"'model.layers.0.mlp.up_proj.values' \[3, 16, 16\] does not hold one b x b block per row"),
        (lambda state: state.update({UP_VALUES: state[UP_VALUES][..., :8].contiguous()}),
         rf"'{UP_VALUES}' \[\d+, 16, 8\] does not hold one b x b block per row"),
        (lambda state: state.update({UP_VALUES: state[UP_VALUES][:, 0].contiguous()}),
         rf"'{UP_VALUES}' \[\d+, 16\] does not hold one b x b block per row"),
        (lambda state: state.update({"model.layers.0.mlp.up_proj.bias": torch.zeros(128)}),
         "unexpected key 'model.layers.0.mlp.up_proj.bias'"),
        (lambda state: state.update({"model.norm.weight": torch.zeros(3)}),
         r"'model.norm.weight' in model.safetensors has shape \[3\], the model's \[64\]"),
        (lambda state: state.update({"model.norm.block_indices": torch.zeros(1, 2, dtype=torch.int64)}),
         "unexpected key 'model.norm.block_indices' .* 'model.norm' .* is a LlamaRMSNorm, not an nn.Linear"),
        (lambda state: state.update({UP_INDICES: state[UP_INDICES].float()}),
         rf"^'{UP_INDICES}' in model.safetensors: block_indices must be an integer tensor, got torch.float32$"),
        (lambda state: state.update({UP_INDICES: state[UP_INDICES] + 1000}),
         rf"^'{UP_INDICES}' in model.safetensors: block_indices out of range for a block grid of 8x4$"),
        (lambda state: state.pop(UP_VALUES),
         rf"^'{UP_VALUES}' \(or a masked layer's 'model.layers.0.mlp.up_proj.weight'\) is missing from the checkpoint "
         rf"\(its '{UP_INDICES}' is in model.safetensors\)$"),
    ],
    ids=["missing", "unexpected", "values-beside-indices", "values-not-square", "values-2d", "unexpected-bias",
         "misshapen", "sparse-non-linear", "indices-not-integer", "indices-out-of-range", "values-and-weight-missing"],
)  # fmt: skip
def test_a_missing_unexpected_or_misshapen_key_is_refused_in_one_line_naming_it(tmp_path, edit, message):
    saved(tmp_path)
    rewrite_checkpoint(tmp_path, edit)
    with pytest.raises(ValueError, match=message) as info:
        load_sparse_pretrained(tmp_path)
    assert "\n" not in str(info.value)


def test_layouts_are_read_with_one_open_of_each_safetensors_file(tmp_path, monkeypatch):
    """Besides the load of its tensors, each shard is opened once for its headers and block indices, not once per
    sparse layer it holds."""
    source = saved(tmp_path)
    opened = collections.Counter()

    def counting_open(file, *args, **kwargs):
        opened[Path(file).name] += 1
        return safe_open(file, *args, **kwargs)

    monkeypatch.setattr(hf, "safe_open", counting_open)
    model = load_sparse_pretrained(tmp_path)
    assert opened == {"model.safetensors": 2}
    assert same_layouts(model, source)


@pytest.mark.parametrize("family, shard_size", [("llama", "40KB"), ("gpt2", None)],
                         ids=["llama-sharded", "gpt2-conv1d"])  # fmt: skip
def test_masked_checkpoint_loads_back_as_masked_layers_with_its_layouts_and_trains_on(tmp_path, family, shard_size):
    source = tiny_causal_lm("gpt2") if family == "gpt2" else tiny_model("llama")
    sk.masked_sparsify(source, 0.5, B, exclude="lm_head", generator=torch.Generator().manual_seed(0))
    batch = IDS.repeat(2, 1)
    optimizer = torch.optim.AdamW(source.parameters(), lr=1e-2)
    smet = sk.SMET(source.train(), optimizer, update_interval=1, prune_fraction=0.3, regrow="random", seed=3)
    source(batch, labels=batch).loss.backward()
    optimizer.step()
    smet.step()  # regrown blocks start at zero
    source.eval().save_pretrained(tmp_path, **({} if shard_size is None else {"max_shard_size": shard_size}))
    model = load_sparse_pretrained(tmp_path, type(source))
    assert sparse_layers(model).keys() == sparse_layers(source).keys() and same_layouts(model, source)
    dense_class = transformers.pytorch_utils.Conv1D if family == "gpt2" else torch.nn.Linear
    for layer in sparse_layers(model).values():
        assert type(layer) is sk.MaskedLinear and layer.weight.smet_mask_layout is layer.layout
        assert getattr(layer, "dense_class", torch.nn.Linear) is dense_class
    torch.testing.assert_close(model(IDS).logits, source(IDS).logits, rtol=0, atol=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    smet = sk.SMET(model.train(), optimizer, update_interval=1, prune_fraction=0.3, regrow="random", seed=4)
    before = {name: layer.layout.block_indices.clone() for name, layer in sparse_layers(model).items()}
    model(batch, labels=batch).loss.backward()
    optimizer.step()
    smet.step()
    assert smet.step_count == 1 and any(not torch.equal(layer.layout.block_indices, before[name]) for name, layer in
                                        sparse_layers(model).items())  # fmt: skip


def single_block(state: dict, outside: float) -> None:
    """Make ``up_proj`` ([128, 64]) a masked layer of the one block (0, 0), its weight ``outside`` elsewhere."""
    weight = torch.full((128, 64), outside)
    weight[:B, :B] = 1.0
    state["model.layers.0.mlp.up_proj.weight"] = weight
    state["model.layers.0.mlp.up_proj.block_indices"] = torch.zeros(1, 2, dtype=torch.int64)


@pytest.mark.parametrize("outside, fits", [(0.0, r"3 of the block sizes \(16, 32, 64, 128\) \[16, 32, 64\]"),
                                           (1.0, r"0 of the block sizes \(16, 32, 64, 128\) \[\]")],
                         ids=["several", "none"])  # fmt: skip
def test_a_masked_layer_that_not_exactly_one_block_size_fits_is_refused_in_one_line(tmp_path, outside, fits):
    model = tiny_model("llama")
    sk.masked_sparsify(model, 0.5, B, exclude="lm_head")
    model.save_pretrained(tmp_path)
    rewrite_checkpoint(tmp_path, lambda state: single_block(state, outside))
    with pytest.raises(ValueError, match=f"masked layer 'model.layers.0.mlp.up_proj' in model.safetensors: .* fit "
                       f"{fits}, not one: .* masked_sparsify it alike") as info:  # fmt: skip
        load_sparse_pretrained(tmp_path)
    assert "\n" not in str(info.value)


def test_a_shard_named_in_the_index_but_missing_from_the_folder_is_refused_in_one_line_naming_it(tmp_path):
    sparse_model("llama").save_pretrained(tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"^{shard.name}, named in model.safetensors.index.json, is not in ") \
            as info:
        load_sparse_pretrained(tmp_path)
    assert "\n" not in str(info.value)


def test_the_generation_config_saved_beside_the_weights_is_loaded_with_them(tmp_path):
    source = sparse_model("llama")
    source.generation_config.max_new_tokens = 7
    source.save_pretrained(tmp_path)
    assert load_sparse_pretrained(tmp_path).generation_config.max_new_tokens == 7


def test_a_folder_without_generation_config_loads_with_the_default_one(tmp_path):
    """A generation_config.json is optional (save_pretrained of an older transformers, or removed by hand)."""
    saved(tmp_path)
    (tmp_path / transformers.utils.GENERATION_CONFIG_NAME).unlink()
    model = load_sparse_pretrained(tmp_path)
    assert model.generation_config.max_new_tokens is None


def test_each_shard_of_a_sharded_checkpoint_is_opened_once_for_its_headers_and_once_for_its_tensors(tmp_path,
                                                                                                   monkeypatch):
    sparse_model("llama").save_pretrained(tmp_path, max_shard_size="40KB")
    shards = [path.name for path in tmp_path.glob("*.safetensors")]
    opened = collections.Counter()

    def counting_open(file, *args, **kwargs):
        opened[Path(file).name] += 1
        return safe_open(file, *args, **kwargs)

    monkeypatch.setattr(hf, "safe_open", counting_open)
    load_sparse_pretrained(tmp_path)
    assert len(shards) > 1 and opened == {name: 2 for name in shards}


def test_a_masked_layers_weight_of_another_shape_is_refused_in_one_line_naming_it(tmp_path):
    model = tiny_model("llama")
    sk.masked_sparsify(model, 0.5, B, exclude="lm_head")
    model.save_pretrained(tmp_path)
    wider = {"model.layers.0.mlp.up_proj.weight": torch.zeros(256, 64)}
    rewrite_checkpoint(tmp_path, lambda state: state.update(wider))
    with pytest.raises(ValueError, match=r"^'model.layers.0.mlp.up_proj.weight' in model.safetensors has shape "
                       r"\[256, 64\], the model's \[128, 64\]$") as info:
        load_sparse_pretrained(tmp_path)
    assert "\n" not in str(info.value)


def test_the_loaded_models_config_records_the_dtype_it_was_loaded_in(tmp_path):
    saved(tmp_path)
    assert load_sparse_pretrained(tmp_path, dtype=torch.bfloat16).config.dtype == torch.bfloat16


class KeepsFp32Llama(transformers.LlamaForCausalLM):
    """A model class that keeps its MLP down projections in fp32 under fp16, and its norms under fp16 and bf16."""

    _keep_in_fp32_modules = ["mlp.down_proj"]
    _keep_in_fp32_modules_strict = ["norm"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_modules_a_model_class_keeps_in_fp32_load_in_fp32_as_from_pretrained_loads_them(tmp_path, dtype):
    """Every floating tensor was cast to ``dtype``: a model class's fp32 modules lost the precision they keep."""
    saved(tmp_path / "sparse")
    tiny_model("llama").save_pretrained(tmp_path / "dense")
    model = load_sparse_pretrained(tmp_path / "sparse", KeepsFp32Llama, dtype=dtype)
    dense = KeepsFp32Llama.from_pretrained(tmp_path / "dense", dtype=dtype)
    expected = {name.removesuffix(".weight"): p.dtype for name, p in dense.named_parameters()}
    loaded = {name.rpartition(".")[0]: p.dtype for name, p in model.named_parameters()}
    assert loaded == expected and {torch.float32, dtype} == set(loaded.values())
    assert model.model.layers[0].mlp.down_proj.values.dtype == (torch.float32 if dtype == torch.float16 else dtype)


def test_a_base_model_class_loads_the_sparse_backbone_of_a_causal_lm_and_a_causal_lm_class_a_backbones(tmp_path):
    """As ``from_pretrained`` maps them: a causal LM's ``model.*`` keys load into its base model (the head's left out),
    a base model's keys into a causal LM below its ``model`` (the head tied to the embeddings)."""
    source = saved(tmp_path / "lm")  # an untied head: lm_head.weight is in the checkpoint
    backbone = load_sparse_pretrained(tmp_path / "lm", transformers.AutoModel)
    assert type(backbone) is transformers.LlamaModel and same_layouts(backbone, source.model)
    torch.testing.assert_close(backbone(IDS).last_hidden_state, source.model(IDS).last_hidden_state, rtol=0, atol=0)
    tied = sparse_model("qwen2", tie_word_embeddings=True)
    tied.model.save_pretrained(tmp_path / "backbone")
    model = load_sparse_pretrained(tmp_path / "backbone", transformers.AutoModelForCausalLM)
    assert type(model) is transformers.Qwen2ForCausalLM and same_layouts(model, tied)
    torch.testing.assert_close(model(IDS).logits, tied(IDS).logits, rtol=0, atol=0)
