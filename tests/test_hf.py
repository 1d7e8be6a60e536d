"""Hugging Face integration: SMETCallback inside transformers.Trainer, sparse checkpoints through safetensors."""

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments  # noqa: E402
from transformers.trainer_utils import load_sharded_checkpoint  # noqa: E402

import smet_kernels as sk  # noqa: E402
from smet_kernels.hf import SMETCallback  # noqa: E402

B = 16
VOCAB, SEQ = 128, 16
STEPS, INTERVAL, INTERRUPT = 20, 5, 10


pytestmark = pytest.mark.usefixtures("reference_backend")


def tiny_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random-init causal LM small enough for CPU tests (nothing downloaded); ``overrides`` change its config."""
    sizes = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64) | overrides  # fmt: skip
    if family == "llama":
        config, cls = transformers.LlamaConfig(**sizes), transformers.LlamaForCausalLM
    else:
        config, cls = transformers.Qwen2Config(**sizes), transformers.Qwen2ForCausalLM
    torch.manual_seed(seed)
    return cls(config)


def random_tokens(n: int = 64, seed: int = 1) -> list[dict]:
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": row, "labels": row} for row in ids]


def sparse_setup(family: str, regrow: str, layout_seed: int = 0):
    model = tiny_model(family)
    sk.sparsify(model, 0.5, block_size=B, exclude="lm_head", generator=torch.Generator().manual_seed(layout_seed))
    optimizer = sk.SMETAdamW(model.parameters(), lr=1e-2, warmup_steps=3)
    smet = sk.SMET(model, optimizer, update_interval=INTERVAL, prune_fraction=0.3, regrow=regrow, seed=3)
    return model, optimizer, smet


def layouts(model) -> dict[str, torch.Tensor]:
    return {name: m.layout.block_indices.clone() for name, m in model.named_modules() if hasattr(m, "layout")}


def same_layouts(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    first, second = layouts(a), layouts(b)
    return first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)


class StopAt(TrainerCallback):
    """Interrupts training after optimizer step ``step`` (after that step's checkpoint is written)."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def make_trainer(out_dir, model, optimizer, smet, extra_callbacks=(), **arguments) -> Trainer:
    """A Trainer of ``model`` with SMETCallback; ``arguments`` change its TrainingArguments."""
    args = TrainingArguments(**dict(
        output_dir=str(out_dir), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-2,
        save_steps=INTERRUPT, logging_steps=1, seed=0, report_to=[], use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True,
    ) | arguments)  # fmt: skip
    return Trainer(model=model, args=args, train_dataset=random_tokens(), optimizers=(optimizer, None),
                   callbacks=[SMETCallback(smet), *extra_callbacks])  # fmt: skip


def step_losses(trainer: Trainer, after: int = 0) -> dict[int, float]:
    """Loss of each optimizer step logged after step ``after`` (a resumed run's history starts with the saved one)."""
    history = trainer.state.log_history
    return {record["step"]: record["loss"] for record in history if "loss" in record and record["step"] > after}


@pytest.mark.parametrize("family, regrow", [("llama", "gradient"), ("qwen2", "random")])
def test_interrupted_trainer_run_resumes_to_the_uninterrupted_losses_and_layouts(tmp_path, family, regrow):
    model, optimizer, smet = sparse_setup(family, regrow)
    initial = layouts(model)
    straight = make_trainer(tmp_path / "straight", model, optimizer, smet)
    straight.train()
    expected = step_losses(straight)
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert [record["step"] for record in smet.history] == [5, 10, 15, 20]
    assert all(sum(layer["regrown"] for layer in r["layers"].values()) > 0 for r in smet.history)
    assert any(not torch.equal(initial[name], indices) for name, indices in layouts(model).items())  # blocks moved

    model_a, optimizer_a, smet_a = sparse_setup(family, regrow)
    interrupted = make_trainer(tmp_path / "resumed", model_a, optimizer_a, smet_a, [StopAt(INTERRUPT)])
    interrupted.train()
    assert smet_a.step_count == INTERRUPT
    checkpoint = tmp_path / "resumed" / f"checkpoint-{INTERRUPT}"
    saved_optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)  # as the Trainer reads it
    assert saved_optimizer["smet"]["step"] == INTERRUPT and len(saved_optimizer["smet"]["history"]) == 2
    saved_indices = load_file(checkpoint / "model.safetensors")["model.layers.1.mlp.down_proj.block_indices"]
    assert torch.equal(saved_indices, model_a.model.layers[1].mlp.down_proj.layout.block_indices)
    # a fresh process: other objects, another initial layout; everything comes from the checkpoint
    model_b, optimizer_b, smet_b = sparse_setup(family, regrow, layout_seed=7)
    assert not same_layouts(model_b, model_a)
    resumed = make_trainer(tmp_path / "resumed", model_b, optimizer_b, smet_b)
    resumed.train(resume_from_checkpoint=str(checkpoint))

    got = step_losses(resumed, after=INTERRUPT)
    assert sorted(got) == list(range(INTERRUPT + 1, STEPS + 1))
    for step, loss in got.items():
        assert abs(loss - expected[step]) <= 1e-5 * abs(expected[step]), (step, loss, expected[step])
    assert smet_b.step_count == STEPS and smet_b.history == smet.history
    assert same_layouts(model_b, model)


class SkipSteps(TrainerCallback):
    """Makes the optimizer skip the Trainer's steps ``steps`` as fp16 loss scaling does on an overflow (accelerate's
    ``AcceleratedOptimizer``: no ``optimizer.step()``, ``step_was_skipped`` true, the LR schedule not stepped)."""

    def __init__(self, steps: set[int], monkeypatch):
        from accelerate.optimizer import AcceleratedOptimizer

        self.steps, self.current = steps, 0
        real_step = AcceleratedOptimizer.step

        def step(optimizer, closure=None):
            optimizer._is_overflow = self.current in self.steps
            if not optimizer._is_overflow:
                real_step(optimizer, closure)

        monkeypatch.setattr(AcceleratedOptimizer, "step", step)

    def on_step_begin(self, args, state, control, **kwargs):
        self.current = state.global_step + 1


def test_a_step_that_fp16_loss_scaling_skipped_is_not_counted_and_the_due_update_runs_at_the_next_step(
    tmp_path, monkeypatch
):
    """An overflowed step changes no weight and does not step the LR schedule: the controller does not count it
    either (its dense gradients are dropped), the update due there runs at the next step, and a resume from a
    checkpoint after the skip matches the Trainer's step count and continues to the same layouts."""
    model, optimizer, smet = sparse_setup("llama", "gradient")
    kept = []  # whether the skipped step left its (recorded, overflowed) dense gradients for the retried step

    class DenseGradsAfterTheSkip(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == INTERVAL:
                kept.extend(target.dense_grad is not None for target in smet.targets)

    make_trainer(tmp_path / "straight", model, optimizer, smet,
                 [SkipSteps({INTERVAL}, monkeypatch), DenseGradsAfterTheSkip()]).train()  # fmt: skip
    assert kept and not any(kept)
    assert smet.step_count == STEPS - 1 and [r["step"] for r in smet.history] == [5, 10, 15]
    model_a, optimizer_a, smet_a = sparse_setup("llama", "gradient")
    make_trainer(tmp_path / "resumed", model_a, optimizer_a, smet_a,
                 [SkipSteps({INTERVAL}, monkeypatch), StopAt(INTERRUPT)]).train()  # fmt: skip
    checkpoint = tmp_path / "resumed" / f"checkpoint-{INTERRUPT}"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert saved["smet"]["step"] == INTERRUPT - 1 and saved["smet_skipped_steps"] == 1
    model_b, optimizer_b, smet_b = sparse_setup("llama", "gradient", layout_seed=7)
    resumed = make_trainer(tmp_path / "resumed", model_b, optimizer_b, smet_b, [SkipSteps({INTERVAL}, monkeypatch)])
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert smet_b.step_count == STEPS - 1 and smet_b.history == smet.history and same_layouts(model_b, model)


def test_topology_update_runs_after_the_optimizer_step_before_gradients_are_zeroed(tmp_path, monkeypatch):
    model, optimizer, smet = sparse_setup("llama", "random")
    seen = []
    step = smet.step

    def recording_step():
        seen.append((optimizer.state[model.model.layers[0].mlp.up_proj.values]["block_step"].max().item(),
                     all(p.grad is not None for p in model.parameters())))  # fmt: skip
        return step()

    monkeypatch.setattr(smet, "step", recording_step)
    trainer = make_trainer(tmp_path, model, optimizer, smet)
    trainer.args.max_steps = 3
    trainer.train()
    assert seen == [(1, True), (2, True), (3, True)]


def test_rigl_under_a_trainer_with_torch_compile_makes_the_eager_runs_updates(tmp_path):
    """The Trainer compiles the model after the controller is built: the dense-gradient hooks must run in the
    compiled model, armed on the step before each update only."""
    torch._dynamo.reset()  # Dynamo does not guard on hooks: no code an earlier test compiled without them
    runs = []
    for compiled in (False, True):
        model, optimizer, smet = sparse_setup("llama", "gradient")
        options = dict(torch_compile=True, torch_compile_backend="aot_eager") if compiled else {}
        trainer = make_trainer(tmp_path / str(compiled), model, optimizer, smet, max_steps=INTERVAL + 1,
                               save_strategy="no", **options)  # fmt: skip
        trainer.train()
        runs.append((step_losses(trainer), layouts(model), smet.history))
    (eager_losses, eager_layouts, eager_history), (losses, compiled_layouts, history) = runs
    assert [record["step"] for record in history] == [INTERVAL] and history == eager_history
    assert compiled_layouts.keys() == eager_layouts.keys()
    assert all(torch.equal(compiled_layouts[name], eager_layouts[name]) for name in eager_layouts)
    for step, loss in losses.items():
        assert abs(loss - eager_losses[step]) <= 1e-5 * abs(eager_losses[step]), (step, loss, eager_losses[step])


def test_two_ddp_ranks_under_the_trainer_make_the_same_topology_updates(tmp_path, tmp_path_factory):
    """The Trainer wraps the model in DDP (gloo); the controller, built on the unwrapped model, must decide every
    RigL update identically on both ranks (from the rank-averaged dense gradients), so layouts and values agree."""
    from torchrun_launch import launch

    worker = Path(__file__).with_name("hf_ddp_worker.py")
    launch(tmp_path, 2, tmp_path_factory.getbasetemp() / "smet_cache", ["--regrow", "gradient"], program=(str(worker),))
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    for saved in ranks:
        assert saved["world_size"] == 2 and saved["steps"] == 7 and saved["updates"] == [3, 6]
        assert any(not torch.equal(a, b) for a, b in zip(saved["initial"], saved["layouts"]))  # the topology moved
    for key in ("layouts", "values"):
        assert all(torch.equal(a, b) for a, b in zip(ranks[0][key], ranks[1][key])), key


def test_callback_refuses_another_optimizer(tmp_path):
    model, optimizer, smet = sparse_setup("llama", "random")
    other = sk.SMETAdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="steps another optimizer.*optimizers=\\(smet.optimizer, None\\)"):
        make_trainer(tmp_path, model, other, smet)
    trainer = make_trainer(tmp_path, model, optimizer, smet)
    trainer.add_callback(SMETCallback(sparse_setup("llama", "random")[2]))  # added later: refused at train begin
    with pytest.raises(ValueError, match="steps another optimizer.*optimizers=\\(smet.optimizer, None\\)"):
        trainer.train()


def test_a_trainer_left_to_create_its_own_optimizer_is_refused_when_built_not_when_resuming_deep_inside(tmp_path):
    """Without ``optimizers=`` the Trainer makes an AdamW of its own: resuming, it loaded the controller's
    ``optimizer.pt`` into it before any callback ran (torch's "different number of parameter groups")."""
    model, optimizer, smet = sparse_setup("llama", "random")
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_steps=INTERRUPT, disable_tqdm=True)  # fmt: skip
    with pytest.raises(ValueError, match="would create its own optimizer.*optimizers=\\(smet.optimizer, None\\)"):
        Trainer(model=model, args=args, train_dataset=random_tokens(), callbacks=[SMETCallback(smet)])


def test_callback_refuses_a_controller_out_of_step_with_the_trainer(tmp_path):
    model, optimizer, smet = sparse_setup("llama", "random")
    smet.step()
    with pytest.raises(ValueError, match="counted 1 optimizer steps but the Trainer starts at step 0"):
        make_trainer(tmp_path, model, optimizer, smet).train()
    with pytest.raises(TypeError, match="smet"):
        SMETCallback(optimizer)


def test_callback_refuses_a_fresh_controller_on_a_resumed_trainer():
    """The other direction of a mismatch: the Trainer resumes at step 3, the controller has counted none."""
    model, optimizer, smet = sparse_setup("llama", "random")
    callback = SMETCallback(smet)
    with pytest.raises(ValueError, match="counted 0 optimizer steps but the Trainer starts at step 3.*"
                       "save_only_model=True checkpoints have none"):
        callback.on_train_begin(None, TrainerState(global_step=3), None, optimizer=optimizer)


@pytest.mark.parametrize("sparsify_fn", [sk.sparsify, sk.masked_sparsify])
def test_sparse_model_round_trips_through_sharded_save_pretrained(tmp_path, sparsify_fn):
    source = tiny_model("llama")
    sparsify_fn(source, 0.5, B, exclude="lm_head", generator=torch.Generator().manual_seed(0))
    source.save_pretrained(tmp_path, max_shard_size="40KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    target = tiny_model("llama", seed=5)
    sparsify_fn(target, 0.5, B, exclude="lm_head", generator=torch.Generator().manual_seed(9))
    q_layout = target.model.layers[0].self_attn.q_proj.layout
    version = q_layout.version
    result = load_sharded_checkpoint(target, tmp_path)
    assert not result.missing_keys and not result.unexpected_keys
    assert target.model.layers[0].self_attn.q_proj.layout is q_layout and q_layout.version > version
    assert same_layouts(target, source)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(target(ids).logits, source(ids).logits, rtol=0, atol=0)


def test_loading_block_indices_of_another_shape_fails_naming_the_key(tmp_path):
    model = tiny_model("llama")
    sk.sparsify(model, 0.5, B, exclude="lm_head")
    state = model.state_dict()
    state["model.layers.0.mlp.up_proj.block_indices"] = state["model.layers.0.mlp.up_proj.block_indices"][:-1]
    save_file(state, tmp_path / "weights.safetensors")
    with pytest.raises(RuntimeError, match="model.layers.0.mlp.up_proj.block_indices"):
        model.load_state_dict(load_file(tmp_path / "weights.safetensors"))


def test_readme_hugging_face_snippet_runs(tmp_path, monkeypatch):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Hugging Face", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert namespace["smet"].step_count == namespace["trainer"].state.global_step > 0
    assert type(namespace["model"].model.layers[0].mlp.up_proj) is torch.nn.Linear  # densified at the end


def test_an_optimizer_state_saved_without_the_controller_loads_and_leaves_the_controller_as_it_was():
    """An ``optimizer.pt`` of a run without SMETCallback holds no ``"smet"`` entry: the load hook passes it through."""
    model, optimizer, smet = sparse_setup("llama", "random")
    plain = optimizer.state_dict()
    callback = SMETCallback(smet)
    smet.step()
    optimizer.load_state_dict(plain)
    assert smet.step_count == 1 and callback.skipped_steps == 0
    assert optimizer.state_dict()["smet"]["step"] == 1


def test_an_optimizer_state_the_optimizer_refuses_leaves_the_controllers_topology_and_count_as_they_were():
    """The controller's state rides in ``optimizer.pt``: a file the optimizer refuses (here a group option it does
    not support) restored the saved topology and step count all the same, half a resume."""
    model, optimizer, smet = sparse_setup("llama", "random")
    callback = SMETCallback(smet)
    saved = optimizer.state_dict()
    saved["param_groups"][0]["amsgrad"] = "yes"
    saved["smet_skipped_steps"] = 3
    initial = layouts(model)
    for _ in range(INTERVAL):  # one update: the topology moves away from the saved one
        smet.step()
    updated = layouts(model)
    with pytest.raises(ValueError, match="amsgrad"):
        optimizer.load_state_dict(saved)
    assert smet.step_count == INTERVAL and callback.skipped_steps == 0
    assert layouts(model).keys() == updated.keys() and all(torch.equal(layouts(model)[n], updated[n]) for n in updated)
    saved["param_groups"][0]["amsgrad"] = False
    optimizer.load_state_dict(saved)
    assert smet.step_count == 0 and callback.skipped_steps == 3
    assert all(torch.equal(layouts(model)[name], initial[name]) for name in initial)
    assert any(not torch.equal(updated[name], initial[name]) for name in initial)


def test_a_controller_state_saved_before_skipped_steps_were_counted_loads_with_none_skipped():
    """An ``optimizer.pt`` of an earlier release holds ``"smet"`` but no ``"smet_skipped_steps"``: none was skipped."""
    model, optimizer, smet = sparse_setup("llama", "random")
    callback = SMETCallback(smet)
    smet.step()
    saved = optimizer.state_dict()
    del saved["smet_skipped_steps"]
    callback.skipped_steps = 4
    optimizer.load_state_dict(saved)
    assert callback.skipped_steps == 0 and smet.step_count == 1


def test_callback_accepts_a_controller_whose_steps_and_skipped_steps_add_up_to_the_trainers():
    """A resume after skipped steps: 2 counted + 1 skipped is the Trainer's step 3; a call without the optimizer
    (nothing to compare) is no mismatch either."""
    model, optimizer, smet = sparse_setup("llama", "random")
    callback = SMETCallback(smet)
    smet.step()
    smet.step()
    callback.skipped_steps = 1
    callback.on_train_begin(None, TrainerState(global_step=3), None, optimizer=optimizer)
    callback.on_train_begin(None, TrainerState(global_step=3), None)
    with pytest.raises(ValueError, match=r"counted 2 optimizer steps \(and 1 skipped\) but the Trainer starts at "
                                         "step 4"):
        callback.on_train_begin(None, TrainerState(global_step=4), None, optimizer=optimizer)


def test_each_step_that_fp16_loss_scaling_skipped_is_counted_once_drops_its_dense_gradients_and_is_no_smet_step(
        monkeypatch):
    """The callback's own accounting, without a Trainer (the fp16 run above checks it end to end): a skipped step adds
    one to ``skipped_steps`` and drops the dense gradients, a step taken is the controller's."""
    model, optimizer, smet = sparse_setup("llama", "gradient")
    callback, dropped = SMETCallback(smet), []
    monkeypatch.setattr(smet, "discard_dense_grad", lambda: dropped.append(smet.step_count))
    for skipped in (True, False, True):
        callback.on_optimizer_step(None, None, None, optimizer=SimpleNamespace(step_was_skipped=skipped))
    assert callback.skipped_steps == 2 and smet.step_count == 1 and dropped == [0, 1]


@pytest.mark.parametrize("same_instance", [True, False])
def test_the_controllers_callback_given_twice_is_refused_before_any_step_is_counted_twice(tmp_path, same_instance):
    """Trainer only warns about a second callback of one class and calls both: the controller would count each
    optimizer step twice (updates at half the interval) without a word."""
    model, optimizer, smet = sparse_setup("llama", "random")
    trainer = make_trainer(tmp_path, model, optimizer, smet, save_strategy="no")
    given = next(callback for callback in trainer.callback_handler.callbacks if isinstance(callback, SMETCallback))
    trainer.add_callback(given if same_instance else SMETCallback(smet))
    with pytest.raises(ValueError, match="callback twice"):
        trainer.train()
    assert smet.step_count == 0
    trainer.remove_callback(SMETCallback)  # one left: a new train() runs, each step counted once
    trainer.args.max_steps = 3
    trainer.train()
    assert smet.step_count == trainer.state.global_step == 3


def test_a_new_callback_of_the_same_controller_takes_over_the_checkpoint_and_loads_the_skipped_steps():
    """A new Trainer resuming in the same process gets a new SMETCallback of the same controller and optimizer: the
    earlier callback's load hook took the skipped steps for itself, so the new one refused a consistent resume."""
    model, optimizer, smet = sparse_setup("llama", "random")
    first = SMETCallback(smet)
    first.skipped_steps = 1
    smet.step()
    saved = optimizer.state_dict()
    first.skipped_steps = 2
    second = SMETCallback(smet)
    assert optimizer.state_dict()["smet_skipped_steps"] == 0  # the new callback's count, not the earlier one's
    optimizer.load_state_dict(saved)
    assert second.skipped_steps == 1 and first.skipped_steps == 2
    second.on_train_begin(None, TrainerState(global_step=2), None, optimizer=optimizer)
    first.on_init_end(None, None, None, optimizer=optimizer)  # the one given to a Trainer, after a stray one
    assert optimizer.state_dict()["smet_skipped_steps"] == 2


def test_a_trainer_given_another_model_than_the_controllers_is_refused_before_training_nothing(tmp_path):
    """A model built (or loaded) anew, given with the old optimizer and controller: the Trainer stepped the old model's
    parameters and the controller moved its blocks, while the model trained stayed as it was."""
    model, optimizer, smet = sparse_setup("llama", "random")
    reloaded = tiny_model("llama")
    sk.sparsify(reloaded, 0.5, block_size=B, exclude="lm_head")
    with pytest.raises(ValueError, match="another model than the SMET controller's.*model.layers.0.self_attn.q_proj"):
        make_trainer(tmp_path, reloaded, optimizer, smet, save_strategy="no").train()
    assert smet.step_count == 0


def test_a_sparse_layer_frozen_after_the_controller_was_built_keeps_its_blocks_under_the_trainer(tmp_path):
    """RigL records no gradient it needs for a frozen layer, and the updates pass over it (SMET.step)."""
    model, optimizer, smet = sparse_setup("llama", "gradient")
    frozen = model.model.layers[0].mlp.up_proj
    frozen.requires_grad_(False)
    before = (frozen.layout.block_indices.clone(), frozen.values.detach().clone())
    make_trainer(tmp_path, model, optimizer, smet, save_strategy="no").train()
    assert smet.step_count == STEPS and smet.history and all(
        "model.layers.0.mlp.up_proj.values" not in record["layers"] for record in smet.history)
    assert torch.equal(frozen.layout.block_indices, before[0]) and torch.equal(frozen.values, before[1])


def test_a_new_controller_on_the_same_optimizer_resumes_from_the_checkpoint_not_the_earlier_controller(tmp_path):
    """A resume in the same process with a new controller (and callback) on the model and optimizer in memory: the
    earlier callback's hooks loaded the checkpoint into the earlier controller, and the new one, left at step 0,
    refused the resume as not saved with SMETCallback."""
    model, optimizer, first = sparse_setup("llama", "random")
    make_trainer(tmp_path, model, optimizer, first, [StopAt(INTERRUPT)], max_steps=INTERRUPT + 1).train()
    second = sk.SMET(model, optimizer, update_interval=INTERVAL, prune_fraction=0.3, seed=3)
    trainer = make_trainer(tmp_path, model, optimizer, second, max_steps=INTERRUPT + 1)
    trainer.train(resume_from_checkpoint=str(tmp_path / f"checkpoint-{INTERRUPT}"))
    assert second.step_count == trainer.state.global_step == INTERRUPT + 1
    assert [record["step"] for record in second.history] == [5, 10]


def test_a_trainer_built_after_another_of_the_same_controller_leaves_the_training_one_checkpointing_its_skips(
    tmp_path, monkeypatch
):
    """A second Trainer of the model (e.g. to evaluate) built before the first trains took the checkpoint hooks: the
    first's checkpoints held the second's skipped-step count (0), and their resume was refused as out of step."""
    model, optimizer, smet = sparse_setup("llama", "random")
    trainer = make_trainer(tmp_path, model, optimizer, smet, [SkipSteps({INTERVAL}, monkeypatch), StopAt(INTERRUPT)])
    make_trainer(tmp_path / "eval", model, optimizer, smet, save_strategy="no")
    trainer.train()
    saved = torch.load(tmp_path / f"checkpoint-{INTERRUPT}" / "optimizer.pt", weights_only=True)
    assert saved["smet"]["step"] == INTERRUPT - 1 and saved["smet_skipped_steps"] == 1
