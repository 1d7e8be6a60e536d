"""``smet-train --compile``: the trainer trains through ``torch.compile`` of the sparsified model (one graph: the
block-sparse products are ``torch.ops.smet`` custom ops), with topology updates between compiled steps, and learns
exactly what the eager run learns."""

import json

import torch

from smet_kernels.train import loop
from smet_kernels.train.trainer import train
from test_train_trainer import cache_dir, one_thread, tiny_config  # noqa: F401 -- autouse fixtures


def test_compiled_training_matches_eager_losses_across_topology_updates(tmp_path, monkeypatch):
    real_compile, calls = torch.compile, []

    def compile_with_aot_eager(model, **kwargs):  # aot_eager: the same graph capture, no C++ build on a CPU
        calls.append(kwargs)
        return real_compile(model, backend="aot_eager", **kwargs)

    monkeypatch.setattr(loop.torch, "compile", compile_with_aot_eager)
    config = dict(optimizer="smet", max_steps=14, update_interval=4, eval_every=0)
    eager = train(tiny_config(**config, out_dir=str(tmp_path / "eager")))
    compiled = train(tiny_config(**config, compile=True, out_dir=str(tmp_path / "compiled")))
    assert calls == [{"fullgraph": True}]
    assert compiled["config"]["compile"] is True and eager["config"]["compile"] is False
    assert compiled["topology_updates"] == eager["topology_updates"] >= 3
    torch.testing.assert_close(compiled["final_train_loss"], eager["final_train_loss"], rtol=1e-4, atol=1e-5)


def test_compiled_rigl_training_matches_eager_losses_across_topology_updates(tmp_path, monkeypatch):
    """RigL's dense-gradient hooks, armed on the step before each update, are traced into the compiled model (no
    graph break: it is compiled with fullgraph, one graph while they record and one while they do not)."""
    torch._dynamo.reset()  # Dynamo does not guard on hooks: no code an earlier test compiled without them
    real_compile, calls = torch.compile, []

    def compile_with_aot_eager(model, **kwargs):
        calls.append(kwargs)
        return real_compile(model, backend="aot_eager", **kwargs)

    monkeypatch.setattr(loop.torch, "compile", compile_with_aot_eager)
    config = dict(optimizer="smet", regrow="gradient", max_steps=7, update_interval=3, eval_every=0)
    eager = train(tiny_config(**config, out_dir=str(tmp_path / "eager")))
    compiled = train(tiny_config(**config, compile=True, out_dir=str(tmp_path / "compiled")))
    assert calls == [{"fullgraph": True}]
    assert compiled["topology_updates"] == eager["topology_updates"] == 2
    torch.testing.assert_close(compiled["final_train_loss"], eager["final_train_loss"], rtol=1e-4, atol=1e-5)


def test_a_compiled_rigl_run_after_a_compiled_run_without_hooks_in_the_same_process_makes_its_updates(
    tmp_path, monkeypatch
):
    """Dynamo does not guard on module hooks: the code compiled for the first run's model class (no dense-gradient
    hooks) was reused by the RigL run, whose first update then raised 'needs the dense gradient'."""
    real_compile = torch.compile
    monkeypatch.setattr(loop.torch, "compile", lambda model, **kwargs: real_compile(model, backend="aot_eager",
                                                                                      **kwargs))  # fmt: skip
    config = dict(optimizer="smet", max_steps=4, update_interval=3, eval_every=0, compile=True)
    torch._dynamo.reset()
    assert train(tiny_config(**config, out_dir=str(tmp_path / "set")))["topology_updates"] == 1
    assert train(tiny_config(**config, regrow="gradient", out_dir=str(tmp_path / "rigl")))["topology_updates"] == 1


def test_a_resumed_compiled_rigl_run_continues_the_uninterrupted_compiled_run_bit_for_bit(tmp_path, monkeypatch):
    """Both processes run the same two compiled graphs (recording or not) on the same steps. With a tensor hook the
    uninterrupted run dropped its whole graph for good at its first recording step, and the resumed run used it until
    its own: their losses differed by an ulp after the resume point."""
    real_compile = torch.compile
    monkeypatch.setattr(loop.torch, "compile", lambda model, **kwargs: real_compile(model, backend="aot_eager",
                                                                                      **kwargs))  # fmt: skip
    config = dict(optimizer="smet", regrow="gradient", max_steps=8, update_interval=3, checkpoint_every=4,
                  eval_every=0, compile=True)
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    train(tiny_config(**config, out_dir=str(full_dir)))
    train(tiny_config(**config, resume=str(full_dir / "checkpoints" / "step_0000004"), out_dir=str(resumed_dir)))

    def after_resume(out_dir):
        records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
        return [(r["type"], r["step"], r.get("loss"), r.get("layers")) for r in records
                if r["type"] in ("train", "topology_update") and r["step"] > 4]

    assert after_resume(resumed_dir) == after_resume(full_dir)
    assert [step for kind, step, _, _ in after_resume(full_dir) if kind == "topology_update"] == [6]
    final = [torch.load(d / "checkpoints/step_0000008/state.pt", weights_only=False)["model"]
             for d in (full_dir, resumed_dir)]
    for key, value in final[0].items():
        assert torch.equal(value, final[1][key]), key
