"""The reference trainer end to end on the tiny model (reference backend, CPU): learning in every optimizer mode,
metrics, exact resume, atomic checkpoints, gradients and the LR schedule at the optimizer step, the update probe
(the command line's errors and help: tests/test_train_cli.py; the configuration: tests/test_train_config.py)."""

import dataclasses
import json
import math
import shutil
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE

from smet_kernels.train import checkpoint, cli, loop, trainer
from smet_kernels.train.data import eval_windows, load_corpus, window_batch
from smet_kernels.train.model import LlamaModel
from smet_kernels.train.trainer import TrainConfig, find_checkpoint, load_checkpoint_config, train


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory, monkeypatch):
    path = tmp_path_factory.getbasetemp() / "smet_cache"
    monkeypatch.setenv("SMET_CACHE_DIR", str(path))
    return path


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and spinning threads crawl on an oversubscribed CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides) -> TrainConfig:
    """The tiny model on the CPU (also where a GPU is present: these tests expect CPU memory records and bit-exact
    resumes, which CUDA's atomics would not give; test_resume_on_cuda trains on the GPU)."""
    values = dict(model="tiny", batch_size=4, seq_len=64, max_steps=24, lr=3e-3, eval_every=12, eval_batches=2,
                  update_interval=6, optimizer_warmup_steps=4, spike_window=3, backend="reference", device="cpu",
                  progress=False, galore_update_gap=10)
    values.update(overrides)
    return TrainConfig(**values)


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "optimizer, options",
    [("adamw", {}), ("galore", {}), ("smet", {}), ("smet", {"regrow": "gradient", "distribution": "erk"}),
     ("smet", {"supar": True, "warmup_mode": "momentum_ramp"}), ("masked-dst", {}), ("naive-dst", {})],
    ids=["adamw", "galore", "smet", "smet-rigl-erk", "smet-supar-momentum-ramp", "masked-dst", "naive-dst"],
)
def test_tiny_model_learns_in_every_mode(optimizer, options, tmp_path):
    summary = train(tiny_config(optimizer=optimizer, out_dir=str(tmp_path), **options))
    assert summary["steps"] == 24
    assert summary["final_val_loss"] < summary["initial_val_loss"] - 0.7, summary
    records = read_metrics(tmp_path)
    train_records = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train_records] == list(range(1, 25))
    for record in train_records:
        assert {"step", "loss", "lr", "tokens_per_s", "peak_mem_bytes"} <= set(record)
        assert record["peak_mem_bytes"] > 0 and record["tokens_per_s"] > 0
    assert [r["step"] for r in train_records if "val_loss" in r] == [12, 24]
    assert all(r["val_ppl"] == pytest.approx(torch.tensor(r["val_loss"]).exp().item()) for r in records
               if "val_loss" in r)
    updates = [r for r in records if r["type"] == "topology_update"]
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["final_val_loss"] == summary["final_val_loss"] and saved["peak_mem_kind"] == "cpu_peak_rss"
    if optimizer in ("smet", "masked-dst", "naive-dst"):
        assert [r["step"] for r in updates] == [6, 12, 18, 24]
        assert all(r["pruned"] == r["regrown"] for r in updates)
        assert updates[0]["pruned"] > 0 and updates[-1]["prune_fraction"] == pytest.approx(0.005)  # cosine decay
        spikes = [r for r in records if r["type"] == "loss_spike"]
        assert [(r["update_step"], r["step"]) for r in spikes] == [(6, 9), (12, 15), (18, 21)]  # none after 24
        assert summary["loss_spikes"]["count"] == 3
        assert summary["loss_spikes"]["max_rise"] == max(r["rise"] for r in spikes)
    else:
        assert updates == [] and summary["loss_spikes"]["count"] == 0


@pytest.mark.parametrize("optimizer", ["smet", "masked-dst", "galore"])
def test_resume_continues_exactly(optimizer, tmp_path, monkeypatch):
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    config = tiny_config(optimizer=optimizer, max_steps=8, update_interval=2, checkpoint_every=4, eval_every=0,
                         lr_warmup_steps=2, grad_accum=2, galore_update_gap=3, out_dir=str(full_dir))
    train(config)
    checkpoints = sorted(p.name for p in (full_dir / "checkpoints").iterdir())
    assert checkpoints == ["step_0000004", "step_0000008"]
    assert cli.main(["--resume", str(full_dir / "checkpoints" / "step_0000004"), "--out-dir", str(resumed_dir),
                     "--no-progress"]) == 0

    def losses_and_updates(out_dir):
        records = read_metrics(out_dir)
        losses = {r["step"]: (r["loss"], r["lr"]) for r in records if r["type"] == "train" and r["step"] > 4}
        return losses, [r for r in records if r["type"] == "topology_update" and r["step"] > 4]

    full_losses, full_updates = losses_and_updates(full_dir)
    resumed_losses, resumed_updates = losses_and_updates(resumed_dir)
    assert sorted(resumed_losses) == [5, 6, 7, 8]
    assert resumed_losses == full_losses  # bit-for-bit: same floats, not approximately
    assert resumed_updates == full_updates
    assert [r["step"] for r in resumed_updates] == ([6, 8] if optimizer != "galore" else [])
    final_a = torch.load(full_dir / "checkpoints/step_0000008/state.pt", weights_only=False)["model"]
    final_b = torch.load(resumed_dir / "checkpoints/step_0000008/state.pt", weights_only=False)["model"]
    for key, value in final_a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, final_b[key]), key
    assert load_checkpoint_config(resumed_dir).max_steps == 8
    # resuming in place (the interrupted run's own out-dir) rewrites the metrics after the checkpoint identically

    def deterministic_fields(out_dir):
        timing = {"tokens_per_s", "peak_mem_bytes"}
        return [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(out_dir)]

    before = deterministic_fields(full_dir)
    assert cli.main(["--resume", str(full_dir / "checkpoints" / "step_0000004"), "--no-progress"]) == 0
    assert deterministic_fields(full_dir) == before
    # settings that define the model, topology or data position cannot change on resume, refused before the state
    # (gigabytes in a large run) is read
    with monkeypatch.context() as patched, pytest.raises(SystemExit) as exit_info:
        patched.setattr(torch, "load", lambda *args, **kwargs: pytest.fail("state.pt read before the settings check"))
        cli.main(["--resume", str(full_dir / "checkpoints" / "step_0000004"), "--seq-len", "32",
                  "--out-dir", str(tmp_path / "other"), "--no-progress"])
    assert exit_info.value.code == 2
    # resuming a finished run is refused before anything in its out-dir is touched
    files = {name: (full_dir / name).read_bytes() for name in ("summary.json", "metrics.jsonl")}
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--resume", str(full_dir), "--no-progress"])
    assert exit_info.value.code == 2
    assert files == {name: (full_dir / name).read_bytes() for name in files}


def test_a_resume_names_an_option_without_effect_in_its_method_instead_of_refusing_it(tmp_path, capsys):
    """--density and --distribution do nothing for dense AdamW: changed on resume they are named, as in a fresh run."""
    train(tiny_config(optimizer="adamw", max_steps=2, checkpoint_every=1, eval_every=0, out_dir=str(tmp_path)))
    assert cli.main(["--resume", str(tmp_path / "checkpoints" / "step_0000001"), "--density", "0.25", "--distribution",
                     "erk", "--no-progress"]) == 0
    assert "smet-train: --density, --distribution have no effect with --optimizer adamw" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(tmp_path) if r["type"] == "train"] == [1, 2]


def test_steady_throughput_leaves_out_the_first_step(tmp_path, monkeypatch):
    """The first step of a process pays for kernel compilation/autotuning; ``steady_tokens_per_s`` excludes it. The
    loop's clock is a fake one that only the steps advance: 1 s for the first (standing for Triton JIT + autotune
    on a GPU), 1 ms for each later one."""
    real_step = loop.Run.train_step
    clock = types.SimpleNamespace(now=0.0, perf_counter=lambda: clock.now)
    calls = []

    def slow_first_step(self):
        calls.append(1)
        clock.now += 1.0 if len(calls) == 1 else 1e-3
        return real_step(self)

    monkeypatch.setattr(loop, "time", clock)
    monkeypatch.setattr(loop.Run, "train_step", slow_first_step)
    # two steps: the median of all step times (1.0005 s) is not that of the steps after the first (1 ms)
    summary = train(tiny_config(optimizer="adamw", max_steps=2, eval_every=0, out_dir=str(tmp_path)))
    assert summary["steady_tokens_per_s"] > 2 * summary["tokens_per_s"]
    step_tokens = 4 * 64
    assert summary["steady_tokens_per_s"] > step_tokens / 0.5  # a tiny step takes far less than 0.5 s
    assert summary["steady_tokens_per_s"] == pytest.approx(step_tokens / 1e-3)
    assert summary["tokens_per_s"] == pytest.approx(2 * step_tokens / (1.0 + 1e-3))


def test_the_update_probe_leaves_the_optimizer_steps_gpu_time_in_the_step_time(monkeypatch):
    """A step returns with its kernels still queued; the update probe's first readback would wait for them inside
    the probe's own time, which is left out of the step time (every probed step then looked faster). The fake clock
    advances only when the host waits for the queued work: 1 s a step."""
    from smet_kernels.train import probe

    clock = types.SimpleNamespace(now=0.0, queued=0.0, perf_counter=lambda: clock.now)

    def wait():
        clock.now, clock.queued = clock.now + clock.queued, 0.0

    real_step, real_after_step = loop.Run.train_step, probe.UpdateProbe.after_step

    def queued_step(self):
        result = real_step(self)
        clock.queued += 1.0
        return result

    def waiting_after_step(self):
        wait()
        return real_after_step(self)

    monkeypatch.setattr(loop, "time", clock)
    monkeypatch.setattr(loop.Run, "train_step", queued_step)
    monkeypatch.setattr(loop.Run, "_synchronize", lambda self: wait())
    monkeypatch.setattr(probe.UpdateProbe, "after_step", waiting_after_step)
    summary = train(tiny_config(max_steps=4, eval_every=0))
    assert summary["train_time_s"] == pytest.approx(4.0) and summary["steady_tokens_per_s"] == 4 * 64


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    real_save = torch.save
    calls = []

    def save_then_crash(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"half a checkpoint")
            raise OSError("disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save_then_crash)
    with pytest.raises(trainer.TrainingFailed, match="^could not write checkpoint step_0000004: disk full$"):
        train(tiny_config(optimizer="adamw", max_steps=4, checkpoint_every=2, eval_every=0, out_dir=str(tmp_path)))
    visible = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if not p.name.startswith("."))
    assert visible == ["step_0000002"]
    assert find_checkpoint(tmp_path).name == "step_0000002"
    state = torch.load(tmp_path / "checkpoints/step_0000002/state.pt", weights_only=False)
    assert state["step"] == 2 and state["data"]["position"] == 8


def test_extending_a_finished_run_measures_each_update_once(tmp_path):
    """The end of a run measures unfinished spike windows with the losses there are; a resume that extends the run
    replaces those partial records with full ones instead of adding a second record for the same update."""
    out = str(tmp_path)
    train(tiny_config(optimizer="smet", max_steps=10, update_interval=4, spike_window=3, checkpoint_every=5,
                      eval_every=0, out_dir=out))
    partial = [r for r in read_metrics(tmp_path) if r["type"] == "loss_spike" and not r["complete"]]
    assert [r["update_step"] for r in partial] == [8]
    assert cli.main(["--resume", out, "--max-steps", "14", "--no-progress"]) == 0
    spikes = [r for r in read_metrics(tmp_path) if r["type"] == "loss_spike"]
    assert [r["update_step"] for r in spikes] == [4, 8, 12] and [r["complete"] for r in spikes] == [True, True, False]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["loss_spikes"]["count"] == len(spikes)


def test_resuming_a_copied_run_continues_in_the_copy_and_leaves_the_original_untouched(tmp_path):
    original, copy = tmp_path / "original", tmp_path / "copy"
    train(tiny_config(optimizer="smet", max_steps=4, checkpoint_every=2, eval_every=0, update_interval=2,
                      out_dir=str(original)))
    shutil.copytree(original, copy)
    before = {path: path.read_bytes() for path in original.rglob("*") if path.is_file()}
    assert cli.main(["--resume", str(copy / "checkpoints" / "step_0000002"), "--max-steps", "6", "--lr", "1e-4",
                     "--no-progress"]) == 0
    assert before == {path: path.read_bytes() for path in original.rglob("*") if path.is_file()}
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["step_0000002", "step_0000004", "step_0000006",
                                                                        "superseded-0000002-1"]  # the old step 4
    assert [r["step"] for r in read_metrics(copy) if r["type"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert load_checkpoint_config(copy).out_dir == str(copy)


def test_optimizer_options_given_with_resume_act_as_its_config_records_them(tmp_path, capsys):
    """The saved param groups must not silently override what --resume was told (and config.json records)."""
    out = tmp_path / "run"
    train(tiny_config(optimizer="smet", max_steps=2, checkpoint_every=1, eval_every=0, out_dir=str(out)))
    assert cli.main(["--resume", str(out / "checkpoints" / "step_0000001"), "--out-dir", str(tmp_path / "resumed"),
                     "--weight-decay", "0.25", "--warmup-mode", "none", "--optimizer-warmup-steps", "7",
                     "--density-lr-exponent", "0.5", "--no-progress"]) == 0
    final = tmp_path / "resumed" / "checkpoints" / "step_0000002"
    recorded = json.loads((final / "config.json").read_text())
    for group in torch.load(final / "state.pt", weights_only=False)["optimizer"]["param_groups"]:
        assert (group["weight_decay"], group["warmup"], group["warmup_steps"], group["density_lr_exponent"]) == (
            recorded["weight_decay"], recorded["warmup_mode"], recorded["optimizer_warmup_steps"],
            recorded["density_lr_exponent"]) == (0.25, "none", 7, 0.5)
    # GaLore's moments live in the space of its rank: that cannot change under them
    train(tiny_config(optimizer="galore", max_steps=1, checkpoint_every=1, eval_every=0, galore_rank=4,
                      out_dir=str(tmp_path / "galore")))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--resume", str(tmp_path / "galore"), "--galore-rank", "8", "--max-steps", "2", "--no-progress"])
    assert exit_info.value.code == 2 and "cannot change --galore-rank" in capsys.readouterr().err
    # SuPar's parameter groups (one per hidden weight) cannot replace the saved ones: one line, not a traceback
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--resume", str(out), "--supar", "--max-steps", "3", "--no-progress"])
    assert exit_info.value.code == 2 and "cannot change --supar" in capsys.readouterr().err


def test_evaluation_runs_in_training_micro_batches(tmp_path, monkeypatch):
    """Evaluation must fit wherever training fits: it uses the micro-batch of batch_size / grad_accum."""
    shapes = []
    real_forward = LlamaModel.forward

    def recording_forward(self, tokens):
        shapes.append((torch.is_grad_enabled(), tuple(tokens.shape)))
        return real_forward(self, tokens)

    monkeypatch.setattr(LlamaModel, "forward", recording_forward)
    train(tiny_config(optimizer="adamw", batch_size=8, grad_accum=4, max_steps=1, eval_every=1, eval_batches=1,
                      out_dir=str(tmp_path)))
    assert {shape for grad, shape in shapes if not grad} == {(2, 64)}
    assert {shape for grad, shape in shapes if grad} == {(2, 64)}


def test_lr_schedule_warmup_then_cosine_to_ten_percent():
    assert trainer.lr_factor(1, 4, 20) == 0.25 and trainer.lr_factor(4, 4, 20) == 1.0
    assert trainer.lr_factor(20, 4, 20) == pytest.approx(0.1)
    assert trainer.lr_factor(12, 4, 20) == pytest.approx(0.55)


def _gradients_at_the_optimizer_step(config):
    """Run one training step of ``config``; returns (loss, reported grad norm, the gradients the optimizer steps with)."""
    run = loop.Run(config)
    seen = []
    real_step = run.optimizer.step

    def step(*args, **kwargs):
        seen.append([p.grad.detach().clone() for p in run.model.parameters()])
        return real_step(*args, **kwargs)

    run.optimizer.step = step
    loss, grad_norm = run.train_step()
    assert len(seen) == 1
    return loss, grad_norm, seen[0]


def test_gradient_accumulation_averages_the_micro_batches_like_one_batch():
    """grad_accum splits the same global batch: the loss, the gradient norm and the gradients do not change."""
    one = _gradients_at_the_optimizer_step(tiny_config(optimizer="adamw", grad_accum=1, grad_clip=0.0, eval_every=0))
    two = _gradients_at_the_optimizer_step(tiny_config(optimizer="adamw", grad_accum=2, grad_clip=0.0, eval_every=0))
    assert two[0] == pytest.approx(one[0], rel=1e-5) and two[1] == pytest.approx(one[1], rel=1e-4)
    for a, b in zip(one[2], two[2]):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-6)


def test_gradients_are_clipped_to_grad_clip_before_the_optimizer_step_and_the_norm_before_clipping_is_reported():
    loss, grad_norm, grads = _gradients_at_the_optimizer_step(tiny_config(optimizer="adamw", grad_clip=0.01,
                                                                          eval_every=0))
    stepped_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()
    assert grad_norm > 0.1 and stepped_norm == pytest.approx(0.01, rel=1e-4)
    _, unclipped_norm, grads = _gradients_at_the_optimizer_step(tiny_config(optimizer="adamw", grad_clip=0.0,
                                                                            eval_every=0))
    assert unclipped_norm == pytest.approx(grad_norm, rel=1e-6)
    assert torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item() == pytest.approx(grad_norm, rel=1e-5)


def test_bf16_gradient_norm_is_reported_and_clipped_in_fp32_not_rounded_to_bf16():
    """torch reduces bf16 gradients to a bf16 norm (8 significant bits): 2.7656 for a norm of 2.7684, clipping to
    1.0012 x grad_clip."""
    _, grad_norm, grads = _gradients_at_the_optimizer_step(tiny_config(optimizer="adamw", precision="bf16",
                                                                       grad_clip=0.0, eval_every=0))
    assert grads[0].dtype == torch.bfloat16
    assert torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item() == pytest.approx(grad_norm, rel=1e-5)
    _, _, grads = _gradients_at_the_optimizer_step(tiny_config(optimizer="adamw", precision="bf16", grad_clip=0.01,
                                                               eval_every=0))
    assert torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item() == pytest.approx(0.01, rel=5e-4)


def test_logged_learning_rates_follow_linear_warmup_then_cosine_to_ten_percent(tmp_path):
    train(tiny_config(optimizer="adamw", lr=1e-3, lr_warmup_steps=2, max_steps=6, eval_every=0, out_dir=str(tmp_path)))
    lrs = [r["lr"] for r in read_metrics(tmp_path) if r["type"] == "train"]
    # steps 1, 2: 1/2 and 2/2 of the LR; steps 3..6: cosine from 1 at step 2 to 0.1 at step 6 (quarter steps)
    cosine = [0.1 + 0.9 * (1 + math.cos(math.pi * k / 4)) / 2 for k in (1, 2, 3, 4)]
    assert lrs == pytest.approx([1e-3 * f for f in [0.5, 1.0] + cosine], rel=1e-12)


def test_validation_loss_is_the_mean_token_loss_over_the_validation_windows():
    """Evaluated in micro-batches (grad_accum 2: four of two windows), the mean is the one over all eight windows."""
    config = tiny_config(optimizer="adamw", batch_size=4, grad_accum=2, eval_batches=2)
    run = loop.Run(config)
    val = load_corpus("stdlib").val
    windows = eval_windows(val, config.seq_len, config.eval_batches * config.batch_size)
    x, y = window_batch(val, windows, config.seq_len)
    assert x.shape == (8, config.seq_len)
    with torch.no_grad():
        logits = run.model(x)
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), y.reshape(-1)).item()
    assert run.evaluate() == pytest.approx(expected, rel=1e-5)


@pytest.mark.usefixtures("one_matmul_config")
def test_triton_kernels_train_like_the_reference(tmp_path):
    """The same two SMET steps through the Triton kernels (interpreter on CPU, compiled on a GPU) and the PyTorch
    reference, on the same device."""
    small = dict(optimizer="smet", batch_size=2, seq_len=16, max_steps=2, eval_every=0, update_interval=1,
                 device=DEVICE, progress=False)
    triton_run = train(tiny_config(backend="triton", out_dir=str(tmp_path / "triton"), **small))
    reference_run = train(tiny_config(backend="reference", out_dir=str(tmp_path / "reference"), **small))
    assert triton_run["topology_updates"] == reference_run["topology_updates"] == 2
    losses = {name: [r["loss"] for r in read_metrics(tmp_path / name) if r["type"] == "train"]
              for name in ("triton", "reference")}
    assert losses["triton"] == pytest.approx(losses["reference"], rel=1e-4)


def test_issue_acceptance_command(tmp_path, capsys):
    """``smet-train --config tiny --optimizer smet --density 0.5 --max-steps 40 --out-dir DIR``: the loss falls.
    (``--warmup-scope regrown``: with the released default ``all`` embeddings and head warm up over 100 steps, longer
    than this run.)"""
    assert cli.main(["--config", "tiny", "--optimizer", "smet", "--density", "0.5", "--max-steps", "40",
                     "--warmup-scope", "regrown", "--out-dir", str(tmp_path), "--backend", "reference",
                     "--no-progress"]) == 0
    brief = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert brief["steps"] == 40 and brief["final_val_loss"] < brief["initial_val_loss"] - 1.0
    losses = [r["loss"] for r in read_metrics(tmp_path) if r["type"] == "train"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resume_on_cuda(tmp_path):
    """A checkpoint written on the GPU resumes there (RNG states are read back as CPU ByteTensors)."""
    config = tiny_config(optimizer="smet", max_steps=6, update_interval=2, checkpoint_every=3, eval_every=0,
                         device="cuda", out_dir=str(tmp_path / "full"))
    train(config)
    train(dataclasses.replace(config, out_dir=str(tmp_path / "resumed"),
                              resume=str(tmp_path / "full" / "checkpoints" / "step_0000003")))
    full = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "full") if r["type"] == "train" and r["step"] > 3}
    resumed = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "resumed") if r["type"] == "train"}
    assert sorted(resumed) == [4, 5, 6]
    assert [resumed[s] for s in (4, 5, 6)] == pytest.approx([full[s] for s in (4, 5, 6)], rel=1e-5)


@pytest.mark.parametrize("optimizer", ["naive-dst", "warmup-only"])
def test_update_probe_measures_prune_damage_and_the_first_step_of_regrown_weights(optimizer, tmp_path):
    """The first step of a zero-initialised regrown weight is exactly lr·(1−β1)/(1−β1^t)·sqrt((1−β2^t)/(1−β2))
    for naive DST (t = global step) and lr/W with warm-up (local step 1): sign(g) times a known factor."""
    train(tiny_config(optimizer=optimizer, max_steps=9, eps=1e-14, out_dir=str(tmp_path)))  # eps: no softening
    records = read_metrics(tmp_path)
    probes = [r for r in records if r["type"] == "update_probe"]
    assert [(r["update_step"], r["step"], r["complete"]) for r in probes] == [(6, 9, True)]
    probe = probes[0]
    assert probe["prune_damage"] == pytest.approx(probe["loss_after"] - probe["loss_before"])
    assert probe["prune_damage"] != 0.0 and len(probe["probe_losses"]) == 3
    assert probe["cold_start_rise"] == pytest.approx(max(probe["probe_losses"]) - probe["loss_after"])
    lr = next(r["lr"] for r in records if r["type"] == "train" and r["step"] == 7)
    beta1, beta2 = TrainConfig().betas
    if optimizer == "naive-dst":
        expected = lr * (1 - beta1) / (1 - beta1**7) * ((1 - beta2**7) / (1 - beta2)) ** 0.5
    else:
        expected = lr / 4  # optimizer_warmup_steps of tiny_config
    first = probe["step_sizes"][0]
    assert first["step"] == 1 and first["regrown_relative_update"] is None  # regrown blocks start at zero
    assert first["regrown_update_rms"] == pytest.approx(expected, rel=1e-3)
    assert first["surviving_update_rms"] > 0 and first["surviving_relative_update"] > 0


def test_dense_runs_probe_the_same_steps_as_a_control(tmp_path):
    train(tiny_config(optimizer="adamw", max_steps=9, out_dir=str(tmp_path)))
    probes = [r for r in read_metrics(tmp_path) if r["type"] == "update_probe"]
    assert [r["update_step"] for r in probes] == [6]
    assert probes[0]["prune_damage"] == 0.0 and probes[0]["step_sizes"] == []


@pytest.mark.parametrize("optimizer", ["smet", "adamw"])
def test_a_training_step_reads_the_device_back_once_outside_the_optimizer(optimizer, readbacks):
    """Loss and gradient norm come back in one readback (a GPU sync each; the finite check needs both before the
    optimizer step): not one after the backward and a second after the norm's kernels."""
    run = loop.Run(tiny_config(optimizer=optimizer, grad_clip=1.0, eval_every=0, grad_accum=2))
    real_step = run.optimizer.step

    def uncounted_step(*args, **kwargs):  # the optimizers' own readbacks are tested with them
        readbacks.counting = False
        try:
            return real_step(*args, **kwargs)
        finally:
            readbacks.counting = True

    run.optimizer.step = uncounted_step
    for _ in range(2):
        readbacks.counting = True
        loss, grad_norm = run.train_step()
        readbacks.counting = False
        assert readbacks.take() == ["tolist in train_step"] and math.isfinite(loss) and grad_norm > 0


def test_each_param_group_follows_the_schedule_from_its_own_peak_lr():
    """SuPar gives the hidden weights their own LRs: the schedule scales each group's peak, not the first group's."""
    run = loop.Run(tiny_config(optimizer="smet", supar=True, lr_warmup_steps=4, eval_every=0))
    peaks = [group["lr"] for group in run.optimizer.param_groups]
    assert len(set(peaks)) > 1
    run.train_step()
    assert [group["lr"] for group in run.optimizer.param_groups] == pytest.approx([peak / 4 for peak in peaks])


def test_the_update_probe_evaluates_the_first_validation_windows_in_one_training_micro_batch():
    config = tiny_config(optimizer="smet", batch_size=4, grad_accum=2)
    run = loop.Run(config)
    x, y = window_batch(run.val_tokens, run.val_indices[:2], config.seq_len)
    with torch.no_grad():
        logits = run.model(x)
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item()
    assert run.probe_loss() == pytest.approx(expected, rel=1e-6)


def test_the_update_probes_own_loss_evaluations_are_left_out_of_the_step_time(monkeypatch):
    """A fake clock: 1 s for each step, 100 s for each loss the probe measures (before and after the update at step 6,
    after steps 7 and 8)."""
    clock = types.SimpleNamespace(now=0.0, perf_counter=lambda: clock.now)
    real_step, real_probe_loss = loop.Run.train_step, loop.Run.probe_loss
    probed = []

    def one_second_step(self):
        clock.now += 1.0
        return real_step(self)

    def slow_probe_loss(self):
        probed.append(clock.now)
        clock.now += 100.0
        return real_probe_loss(self)

    monkeypatch.setattr(loop, "time", clock)
    monkeypatch.setattr(loop.Run, "train_step", one_second_step)
    monkeypatch.setattr(loop.Run, "probe_loss", slow_probe_loss)
    summary = train(tiny_config(optimizer="smet", max_steps=8, eval_every=0))
    assert len(probed) == 4 and summary["train_time_s"] == 8.0


def test_with_log_every_the_final_step_is_logged_and_an_eval_between_logged_steps_gets_its_own_record(tmp_path):
    train(tiny_config(optimizer="adamw", max_steps=6, log_every=4, eval_every=3, out_dir=str(tmp_path)))
    records = [(r["type"], r["step"], "val_loss" in r) for r in read_metrics(tmp_path)
               if r["type"] in ("train", "eval")]
    assert records == [("eval", 0, True), ("eval", 3, True), ("train", 4, False), ("train", 6, True)]


def test_the_logged_throughput_is_that_of_the_steps_since_the_previous_record(tmp_path, monkeypatch):
    """A fake clock: 1 s for the first step, 1 ms for each later one; records every second step."""
    real_step = loop.Run.train_step
    clock = types.SimpleNamespace(now=0.0, perf_counter=lambda: clock.now)

    def timed_step(self):
        clock.now += 1.0 if self.step == 0 else 1e-3
        return real_step(self)

    monkeypatch.setattr(loop, "time", clock)
    monkeypatch.setattr(loop.Run, "train_step", timed_step)
    train(tiny_config(optimizer="adamw", max_steps=4, log_every=2, eval_every=0, out_dir=str(tmp_path)))
    throughput = [r["tokens_per_s"] for r in read_metrics(tmp_path) if r["type"] == "train"]
    step_tokens = 4 * 64
    assert throughput == pytest.approx([2 * step_tokens / 1.001, 2 * step_tokens / 2e-3])


def test_bf16_autocast_runs_training_and_evaluation_forwards_in_bf16_over_fp32_weights(monkeypatch):
    dtypes = []
    real_forward = LlamaModel.forward

    def recording_forward(self, tokens):
        logits = real_forward(self, tokens)
        dtypes.append((torch.is_grad_enabled(), logits.dtype))
        return logits

    monkeypatch.setattr(LlamaModel, "forward", recording_forward)
    run = loop.Run(tiny_config(optimizer="adamw", precision="bf16-autocast", eval_batches=1))
    run.train_step()
    run.evaluate()
    assert {p.dtype for p in run.model.parameters()} == {torch.float32}
    assert dtypes == [(True, torch.bfloat16), (False, torch.bfloat16)]


def test_the_summary_counts_updates_and_tokens_and_gives_a_block_size_to_sparse_methods_only():
    sparse = train(tiny_config(optimizer="smet", max_steps=4, update_interval=2, eval_every=0))
    dense = train(tiny_config(optimizer="adamw", max_steps=4, eval_every=0))
    assert (sparse["topology_updates"], sparse["tokens"], sparse["block_size"]) == (2, 4 * 4 * 64, 16)
    assert (dense["topology_updates"], dense["tokens"], dense["block_size"]) == (0, 4 * 4 * 64, None)


def test_a_resume_keeps_the_runs_initial_validation_loss_and_does_not_evaluate_step_0_again(tmp_path):
    config = tiny_config(optimizer="adamw", max_steps=4, eval_every=2, eval_batches=1, checkpoint_every=2,
                         out_dir=str(tmp_path))
    uninterrupted = train(config)
    resumed = train(dataclasses.replace(config, resume=str(tmp_path / "checkpoints" / "step_0000002")))
    assert resumed["initial_val_loss"] == uninterrupted["initial_val_loss"]
    assert [r["step"] for r in read_metrics(tmp_path) if r["type"] == "eval"] == [0]


def test_a_run_without_the_update_probe_writes_no_probe_record(tmp_path):
    train(tiny_config(optimizer="smet", max_steps=7, update_probe=False, out_dir=str(tmp_path)))
    assert not [r for r in read_metrics(tmp_path) if r["type"] == "update_probe"]


def test_train_puts_the_backend_it_was_called_with_back():
    import smet_kernels

    previous = smet_kernels.get_backend()
    smet_kernels.set_backend("auto")
    try:
        train(tiny_config(optimizer="adamw", max_steps=1, eval_every=0, backend="reference"))
        assert smet_kernels.get_backend() == "auto"
    finally:
        smet_kernels.set_backend(previous)


def test_a_run_that_ends_inside_a_probe_window_writes_its_record_marked_incomplete(tmp_path):
    train(tiny_config(optimizer="smet", max_steps=7, out_dir=str(tmp_path)))
    probes = [r for r in read_metrics(tmp_path) if r["type"] == "update_probe"]
    assert [(r["update_step"], r["step"], r["complete"], len(r["probe_losses"])) for r in probes] == [(6, 7, False, 1)]


def test_the_summarys_final_perplexity_is_the_exponential_of_its_final_validation_loss():
    summary = train(tiny_config(optimizer="adamw", max_steps=2, eval_every=2, eval_batches=1))
    assert summary["final_val_ppl"] == pytest.approx(math.exp(summary["final_val_loss"]))
