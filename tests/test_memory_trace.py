"""Memory traced on ``meta`` (profiling.memory_trace) against real CPU tensors and the analytic model."""

import pytest
import torch

from torch.utils._python_dispatch import TorchDispatchMode

from bench.memory_scaling import MemoryCase, build, measured_row, model_row, traced_row
from profiling.memory_trace import FlashAttentionOnMeta, LiveBytes, _without_transients

EXACT = ("weights", "gradients", "optimizer", "activations")


def test_live_bytes_peak_includes_a_freed_transient_and_live_drops_after_it():
    with LiveBytes("meta") as live:
        kept = torch.empty(1000, device="meta")
        live.reset_peak()
        transient = kept * 2
        view = transient.view(10, 100)  # a view is the same storage, counted once
        del transient, view
    assert live.peak == 8000
    assert live.live == 4000
    del kept
    assert live.live == 0


def test_a_step_without_transients_leaves_the_peak_at_what_stays_live():
    with LiveBytes("meta") as live:
        kept = torch.empty(1000, device="meta")
        live.reset_peak()
        _without_transients(lambda: kept.add_(kept * 2), live)()  # the temporary kept * 2: 4000 bytes
    assert live.peak == live.live == 4000


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_checkpointed_layers_recompute_flash_attention_on_meta_in_backward():
    case = MemoryCase("tiny", "dense", 1.0, "bf16", 2, 16, 256, True, block_size=32)
    with FlashAttentionOnMeta(), _Ops() as ops:
        model, _, forward = build(case, "meta")
        forward().backward()
    layers = model.config.num_layers
    assert ops.names.count("_scaled_dot_product_flash_attention_for_cpu.default") == 2 * layers  # forward, recompute
    assert "_safe_softmax.default" not in ops.names  # the math path's S × S softmax never runs


def test_live_bytes_ignores_tensors_on_other_devices():
    with LiveBytes("meta") as live:
        torch.ones(100)
    assert live.peak == 0


@pytest.mark.parametrize("method,density,states,checkpointing", [
    ("dense", 1.0, "bf16", False), ("dense", 1.0, "fp32", True), ("galore", 1.0, "bf16", False),
    ("masked", 0.5, "fp32", True), ("smet", 0.25, "fp32", False), ("smet", 0.5, "bf16", True),
])  # fmt: skip
def test_traced_components_equal_real_cpu_tensors_and_the_model(method, density, states, checkpointing):
    case = MemoryCase("tiny", method, density, states, 2, 16, 256, checkpointing, block_size=32)
    traced, measured, model = traced_row(case), measured_row(case), model_row(case)
    for component in EXACT:
        assert traced[f"{component}_bytes"] == measured[f"{component}_bytes"], component
        assert model[f"{component}_bytes"] == pytest.approx(traced[f"{component}_bytes"], rel=0.02), component
    assert traced["peak_bytes"] == sum(traced[f"{c}_bytes"] for c in EXACT + ("rest",))
    assert traced["rest_bytes"] > 0 and measured["peak_bytes"] is None
    # the step's reference temporaries on meta stand for a fused in-place GPU step (GaLore's are real): left out
    assert traced["peak_bytes"] == pytest.approx(model["peak_bytes"], rel=0.1)


def test_checkpointing_saves_less_than_storing_every_activation():
    plain = traced_row(MemoryCase("20m", "smet", 0.5, "fp32", 2, 64, 256, False))
    checkpointed = traced_row(MemoryCase("20m", "smet", 0.5, "fp32", 2, 64, 256, True))
    assert checkpointed["activations_bytes"] < plain["activations_bytes"] / 2
    assert checkpointed["weights_bytes"] == plain["weights_bytes"]


def test_a_1b_smet_step_traces_on_meta_without_allocating():
    case = MemoryCase("1b", "smet", 0.1, "bf16", 1, 16, 256, False)
    row, model = traced_row(case), model_row(case)
    for component in EXACT:  # ~121 M compact bf16 values: 0.24 GB of weights, nothing allocated
        assert row[f"{component}_bytes"] == pytest.approx(model[f"{component}_bytes"], rel=0.02), component
    assert row["weights_bytes"] > 2e8 and row["peak_bytes"] > row["weights_bytes"]
