"""Analytic memory model: hand computation, additivity, agreement with measured tensors; NVML degrades gracefully."""

import sys

import pytest
import torch

from bench.training import TrainingCase, build
from profiling.memory_breakdown import layout_tensors, measure_step_memory, tensor_bytes
from profiling.memory_model import COMPONENTS, predict_memory
from profiling.nvml import NvmlMemorySampler
from smet_kernels.train.model import lm_loss, model_config

TINY = model_config("tiny", block_size=32, max_seq_len=32)  # h 64, i 128, 2 heads, 2 layers, vocab 256


def test_dense_matches_hand_computation():
    estimate = predict_memory(TINY, "dense", batch_size=2, seq_len=32)
    # embedding + head 2·256·64, norms 5·64, per layer 4·64² + 3·64·128 (x2 layers), fp32
    params = 2 * 256 * 64 + 5 * 64 + 2 * (4 * 64 * 64 + 3 * 64 * 128)
    assert estimate.weights == estimate.gradients == 4 * params == 460032
    assert estimate.optimizer == 2 * 4 * params
    tokens = 64
    per_layer = tokens * 64 * (8 + 8 * 4) + 4 * 4 * tokens * 128 + 4 * 2 * 2 * 32 + 8 * tokens
    final = (4 + 2 * 4) * tokens * 64 + 4 * tokens + 4 * tokens * 256 + 16 * tokens
    assert estimate.activations == 2 * per_layer + final == 707840
    assert estimate.rest == max(8 * tokens * 256, 12 * tokens * 64, 3 * 4 * tokens * 128)  # loss, RMSNorm, SwiGLU
    assert estimate.peak == sum(getattr(estimate, c) for c in COMPONENTS)
    assert estimate.as_dict()["peak"] == estimate.peak


def test_smet_matches_hand_computation():
    estimate = predict_memory(TINY, "smet", density=0.5, block_size=32, batch_size=2, seq_len=32)
    # half of the 32x32 blocks: q,k,v,o 2 of 4, gate/up/down 4 of 8 -> 20 blocks per layer, 40 in all
    nnz = 2 * (4 * 2 + 3 * 4)
    dense_other = 2 * 256 * 64 + 5 * 64
    elements = dense_other + nnz * 32 * 32
    # each layout also keeps a packed int32 kernel index (6 nnz + 2 R + 2 C + 2: 22 for a 2x2-block q/k/v/o at 2
    # blocks, 38 for 4x2 / 2x4 gate/up/down at 4 blocks) and an int64 version: 2 layers x (4·22 + 3·38) x 4 + 14 x 8
    layouts = 2 * (4 * 22 + 3 * 38) * 4 + 14 * 8
    assert estimate.weights == 4 * elements + 16 * nnz + layouts
    assert estimate.gradients == 4 * elements
    assert estimate.optimizer == 8 * elements + 4 * nnz
    dense = predict_memory(TINY, "dense", batch_size=2, seq_len=32)
    assert estimate.activations == dense.activations + 14 * 8  # one int64 version snapshot per sparse product


def test_bf16_and_galore_and_masked_components():
    dense = predict_memory(TINY, "dense", batch_size=2, seq_len=32, param_dtype=torch.bfloat16)
    assert dense.weights == 460032 // 2
    masked = predict_memory(TINY, "masked", density=0.25, block_size=32, batch_size=2, seq_len=32)
    hidden = 2 * (4 * 64 * 64 + 3 * 64 * 128)
    layouts = 2 * (4 * 88 + 3 * 144)  # int64 indices, int32 kernel index, version: q,k,v,o 1 of 2x2 blocks, mlp 2 of 8
    assert masked.weights == 460032 + 4 * hidden + layouts  # expanded fp32 mask
    galore = predict_memory(TINY, "galore", batch_size=2, seq_len=32, rank=16)
    # per layer: q,k,v,o 2·16·64 moments + 16·64 projector; gate/up, down 2·16·128 + 16·64
    projected = 2 * (4 * (2 * 16 * 64 + 16 * 64) + 3 * (2 * 16 * 128 + 16 * 64))
    assert galore.optimizer == 4 * (2 * (2 * 256 * 64 + 5 * 64) + projected)


def test_galore_clamps_its_rank_and_keeps_moments_in_the_state_dtype_and_projectors_in_the_weight_dtype():
    galore = predict_memory(TINY, "galore", batch_size=2, seq_len=32, rank=100, param_dtype=torch.bfloat16,
                            state_dtype=torch.float32)
    # rank 100 > min(m, n) = 64 everywhere: fp32 moments 2·64·max(m, n), bf16 projector 64·64
    projected = 2 * (4 * (4 * 2 * 64 * 64 + 2 * 64 * 64) + 3 * (4 * 2 * 64 * 128 + 2 * 64 * 64))
    assert galore.optimizer == 4 * 2 * (2 * 256 * 64 + 5 * 64) + projected


def test_smet_with_erk_counts_the_blocks_erk_gives_each_layer():
    """At density 0.25 and 16x16 blocks ERK gives q, k, v, o 5 of their 16 blocks and gate, up, down 7 of their 32
    (uniform: 4 and 8), 41 blocks a layer instead of 40."""
    erk = predict_memory(TINY, "smet", density=0.25, block_size=16, batch_size=2, seq_len=32, distribution="erk")
    assert erk.gradients == 4 * (2 * 256 * 64 + 5 * 64 + 2 * 41 * 16 * 16)


def test_checkpointed_rest_adds_the_recomputed_layer_and_a_masked_layers_w_times_m():
    """With checkpointing the SwiGLU backward (3 e T i) overlaps the one recomputed layer's activations; a masked
    layer's recomputation also saves its W ⊙ M and version snapshots (a layer's share of them)."""
    tokens = 64
    per_layer = tokens * 64 * (8 + 8 * 4) + 4 * 4 * tokens * 128 + 4 * 2 * 2 * 32 + 8 * tokens
    hidden = 2 * (4 * 64 * 64 + 3 * 64 * 128)
    for method, extra in (("dense", 0), ("smet", 14 * 8 // 2), ("masked", (4 * hidden + 14 * 8) // 2)):
        estimate = predict_memory(TINY, method, density=0.5, block_size=32, batch_size=2, seq_len=32,
                                  activation_checkpointing=True)
        assert estimate.rest == 3 * 4 * tokens * 128 + per_layer + extra, method


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "sparse"}, "method"),
        ({"method": "smet", "density": 0.0}, "density"),
        ({"method": "galore"}, "rank"),
        ({"method": "galore", "rank": 0}, "rank"),
        ({"method": "dense", "batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"batch_size": 2, "seq_len": 32} | kwargs
    with pytest.raises(ValueError, match=match):
        predict_memory(TINY, **args)


CPU = torch.device("cpu")


def warmed_up_forward(model, optimizer):
    """The loss of a fixed batch through ``model``, after one step (gradients and optimizer states exist)."""
    tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))

    def forward():
        return lm_loss(model(tokens[:, :-1]), tokens[:, 1:])

    forward().backward()
    optimizer.step()
    return forward


@pytest.mark.parametrize("method, density", [("dense", 1.0), ("masked", 0.5), ("smet", 0.25)])
def test_prediction_matches_measured_tensors(method, density):
    model, optimizer = build(TrainingCase("tiny", method, density, 32, 2, 32, torch.float32), CPU, backend="reference")
    measured = measure_step_memory(model, optimizer, warmed_up_forward(model, optimizer), "cpu")
    predicted = predict_memory(TINY, method, density=density, block_size=32, batch_size=2, seq_len=32)
    assert measured.peak is None and measured.rest is None
    assert measured.weights == predicted.weights
    assert measured.gradients == predicted.gradients
    assert measured.optimizer == pytest.approx(predicted.optimizer, rel=1e-3)  # + torch's scalar step tensors
    assert measured.activations == pytest.approx(predicted.activations, rel=1e-3)


def test_a_benchmarked_training_case_measures_a_step_of_its_own_batch_and_sequence():
    """``run_case`` measures its step on ``batch_size`` sequences of ``seq_len`` tokens: the measured components are
    the ones the model predicts for that shape (a sequence one token short or long is ~3 % of activations off); its
    warm-up and step times are parts of the call's time."""
    import time

    from bench.training import run_case

    started = time.perf_counter()
    row = run_case(TrainingCase("tiny", "dense", 1.0, 32, 2, 32, torch.float32), CPU, "reference", steps=1)
    elapsed_s = time.perf_counter() - started
    assert row["status"] == "ok" and row["steps"] == 1
    assert 0 < row["warmup_s"] + row["ms_p50"] * 1e-3 <= elapsed_s  # parts of the call's own time
    for component in ("weights", "gradients", "optimizer", "activations"):
        assert row[f"{component}_bytes"] == pytest.approx(row[f"pred_{component}_bytes"], rel=1e-3), component


def test_every_method_leaves_the_same_few_unmodelled_activation_bytes():
    """The activation formulas are exact per method: what the model leaves out (a few scalars of the loss) is the
    same for dense, masked and SMET, with and without checkpointing, in fp32 and bf16, so a per-layer tensor one
    method saves and the model misses (masked DST's layout-version snapshot, 8 B a layer; a RoPE table cast per layer
    rather than once, 4 KiB a layer in bf16) shows here though ``rel=1e-3`` hides it."""
    left_out = set()
    for method, density in (("dense", 1.0), ("masked", 0.5), ("smet", 0.25)):
        for checkpointing in (False, True):
            for dtype in (torch.float32, torch.bfloat16):
                case = TrainingCase("tiny", method, density, 32, 2, 32, dtype, activation_checkpointing=checkpointing)
                model, optimizer = build(case, CPU, backend="reference")
                measured = measure_step_memory(model, optimizer, warmed_up_forward(model, optimizer), "cpu")
                predicted = predict_memory(TINY, method, density=density, block_size=32, batch_size=2, seq_len=32,
                                           param_dtype=dtype, activation_checkpointing=checkpointing)  # fmt: skip
                left_out.add(measured.activations - predicted.activations)
    assert len(left_out) == 1 and 0 <= left_out.pop() < 64, left_out


def test_measuring_a_compiled_masked_step_builds_no_eager_mask():
    """A compiled masked model builds its masks in its graph and holds none: the measurement built the eager ones
    (a weight's worth of memory, kept) inside the step it measured, and counted them as weights."""
    from smet_kernels.masked import MaskedLinear

    torch._dynamo.reset()
    model, optimizer = build(TrainingCase("tiny", "masked", 0.5, 32, 2, 32, torch.float32), CPU, backend="reference")
    model.to(torch.float64)  # as a model moved to its GPU and dtype once built: no mask of that dtype held yet
    forward = warmed_up_forward(torch.compile(model, backend="aot_eager"), optimizer)
    measured = measure_step_memory(model, optimizer, forward, "cpu")
    masked = [module for module in model.modules() if isinstance(module, MaskedLinear)]
    assert masked and all(module.cached_dense_mask() is None for module in masked)
    layouts = tensor_bytes(layout_tensors(model))
    assert measured.weights == sum(p.numel() * p.element_size() for p in model.parameters()) + layouts


def test_nvml_without_gpu_reports_unavailable():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the sampler works here")
    with NvmlMemorySampler() as sampler:
        torch.ones(8).sum()
    assert not sampler.available
    assert sampler.status.startswith("unavailable: ")
    assert sampler.peak_used_bytes is None


def test_nvml_without_package_reports_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    sampler = NvmlMemorySampler().start()
    sampler.stop()
    assert sampler.status == "unavailable: the nvidia-ml-py package (pynvml) is not installed"
    assert sampler.peak_used_bytes is None


def test_nvml_that_cannot_load_or_resolve_the_gpu_reports_unavailable(monkeypatch):
    """torch resolving GPU UUIDs in ``CUDA_VISIBLE_DEVICES`` loads NVML itself (``OSError`` without the library);
    NVML failing to initialise with another error: each is a status, never an exception out of a benchmark."""
    import profiling.nvml as nvml

    def no_library(device):
        raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    monkeypatch.setattr(nvml, "nvml_device_index", no_library)
    sampler = NvmlMemorySampler.for_device("cuda:0").start()
    sampler.stop()
    assert sampler.status.startswith("unavailable: no NVML index for cuda:0: libnvidia-ml.so.1")

    class BrokenNvml:
        class NVMLError(Exception):
            pass

        @staticmethod
        def nvmlInit():
            raise OSError("driver library mismatch")

    monkeypatch.setitem(sys.modules, "pynvml", BrokenNvml)
    sampler = NvmlMemorySampler().start()
    sampler.stop()
    assert sampler.status == "unavailable: OSError: driver library mismatch"


def test_nvml_bad_arguments():
    with pytest.raises(ValueError, match="device_index"):
        NvmlMemorySampler(-1)
    with pytest.raises(ValueError, match="interval_s"):
        NvmlMemorySampler(0, interval_s=0)


@pytest.mark.parametrize("interval_s", [float("inf"), float("nan"), True])
def test_an_nvml_interval_that_is_not_a_positive_finite_number_is_refused(interval_s):
    """An infinite interval made the sampling thread sleep forever: stop() (the end of the `with`) never returned."""
    with pytest.raises(ValueError, match="^interval_s must be a positive finite number, got "):
        NvmlMemorySampler(0, interval_s=interval_s)


class _FakeNvml:
    """A stand-in ``pynvml``: ``count`` GPUs, ``used`` bytes per call from ``readings`` (then the last forever)."""

    class NVMLError(Exception):
        pass

    def __init__(self, count=4, readings=(100, 300, 200), fail_after=None):
        self.count, self.readings, self.fail_after = count, list(readings), fail_after
        self.opened = self.calls = 0
        self.handles = []

    def nvmlInit(self):
        self.opened += 1

    def nvmlShutdown(self):
        self.opened -= 1

    def nvmlDeviceGetCount(self):
        return self.count

    def nvmlDeviceGetHandleByIndex(self, index):
        self.handles.append(index)
        return index

    def nvmlDeviceGetMemoryInfo(self, handle):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise self.NVMLError("GPU is lost")
        used = self.readings[min(self.calls - 1, len(self.readings) - 1)]
        return type("Info", (), {"used": used})()


def _wait_for(condition, timeout_s=5.0):
    import time

    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.001)


def _sampler_threads():
    import threading

    return [t for t in threading.enumerate() if t.name == "nvml-memory-sampler"]


def test_nvml_sampler_keeps_the_peak_and_stops_its_thread(monkeypatch):
    fake = _FakeNvml(readings=(100, 300, 200))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with NvmlMemorySampler(2, interval_s=0.001) as sampler:
        assert sampler.available and fake.handles == [2]
        with pytest.raises(RuntimeError, match="already running"):
            sampler.start()  # a second thread would leak
        _wait_for(lambda: fake.calls >= 4)
    assert sampler.peak_used_bytes == 300 and sampler.baseline_used_bytes == 100
    assert not _sampler_threads() and fake.opened == 0


def test_nvml_sampler_survives_nvml_failing_mid_run(monkeypatch):
    fake = _FakeNvml(readings=(100, 500), fail_after=2)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with NvmlMemorySampler(0, interval_s=0.001) as sampler:
        _wait_for(lambda: sampler.status != "ok")
    assert sampler.status.startswith("failed: ") and sampler.peak_used_bytes == 500
    assert not _sampler_threads() and fake.opened == 0


def test_nvml_sampler_never_raises_when_nvml_fails_at_start_or_stop(monkeypatch):
    fake = _FakeNvml(readings=(100,), fail_after=0)  # the baseline read in start() fails
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with NvmlMemorySampler(0, interval_s=0.001) as sampler:
        pass
    assert sampler.status.startswith("failed: ") and not _sampler_threads() and fake.opened == 0
    fake = _FakeNvml(readings=(100, 200))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with NvmlMemorySampler(0, interval_s=0.001) as sampler:
        _wait_for(lambda: fake.calls >= 3)
        fake.fail_after = fake.calls  # fails from now on: in the thread or in stop()'s last sample
    assert sampler.status.startswith("failed: ") and sampler.peak_used_bytes == 200
    assert not _sampler_threads() and fake.opened == 0


def test_nvml_sampler_never_raises_when_nvml_fails_to_shut_down(monkeypatch):
    """nvmlShutdown raising (the GPU fell off the bus) escaped the sampler's __exit__ and ended the benchmark case."""
    fake = _FakeNvml(readings=(100, 200))

    def shutdown():
        raise fake.NVMLError("GPU is lost")

    fake.nvmlShutdown = shutdown
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with NvmlMemorySampler(0, interval_s=0.001) as sampler:
        _wait_for(lambda: fake.calls >= 2)
    assert sampler.status == "ok" and sampler.peak_used_bytes == 200  # every sample was taken
    assert not _sampler_threads()


def test_nvml_sampler_undoes_its_init_when_nvml_fails_to_give_the_device(monkeypatch):
    """nvmlDeviceGetHandleByIndex failing after nvmlInit left NVML initialised (an init leaked per benchmark case)."""
    fake = _FakeNvml()

    def no_handle(index):
        raise fake.NVMLError("GPU is lost")

    fake.nvmlDeviceGetHandleByIndex = no_handle
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with NvmlMemorySampler(0, interval_s=0.001) as sampler:
        pass
    assert sampler.status == "unavailable: NVMLError: GPU is lost" and fake.opened == 0


def test_nvml_index_follows_cuda_visible_devices(monkeypatch):
    from bench.training import memory_sampler

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert memory_sampler(torch.device("cuda", 1)).device_index == 3  # torch's cuda:1 is NVML's GPU 3
    assert memory_sampler(torch.device("cuda")).device_index == 3
    assert memory_sampler(torch.device("cuda", 0)).device_index == 2
    unresolved = memory_sampler(torch.device("cuda", 5))  # not visible: say so rather than sample another GPU
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml())
    with unresolved:
        pass
    assert unresolved.status.startswith("unavailable: no NVML index for cuda:5")
    assert unresolved.peak_used_bytes is None


@pytest.mark.parametrize("method, density, dtype", [("dense", 1.0, torch.float32), ("masked", 0.5, torch.float32),
                                                    ("smet", 0.25, torch.float32), ("dense", 1.0, torch.bfloat16)])
def test_activation_checkpointing_prediction_matches_measured_tensors(method, density, dtype):
    """Each decoder layer saves only its input: the model predicts the measured split within 5 % (here to 0.1 %)."""
    measured = {}
    for checkpointing in (False, True):
        case = TrainingCase("tiny", method, density, 32, 2, 32, dtype, activation_checkpointing=checkpointing)
        model, optimizer = build(case, torch.device("cpu"), backend="reference")
        assert model.activation_checkpointing is checkpointing
        tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))

        def forward():
            return lm_loss(model(tokens[:, :-1]), tokens[:, 1:])

        forward().backward()
        optimizer.step()
        measured[checkpointing] = measure_step_memory(model, optimizer, forward, "cpu")
        predicted = predict_memory(TINY, method, density=density, block_size=32, batch_size=2, seq_len=32,
                                   param_dtype=dtype, activation_checkpointing=checkpointing)
        assert measured[checkpointing].weights == predicted.weights
        assert measured[checkpointing].activations == pytest.approx(predicted.activations, rel=1e-3)
    assert measured[True].activations < 0.4 * measured[False].activations
    assert measured[True].weights == measured[False].weights


def test_rest_is_the_peak_less_the_four_accounted_components():
    """W [3, 4] fp32 (48 bytes), its gradient (48), SGD's momentum (48), the saved input x [2, 4] (32): with a traced
    peak of 1000 bytes, the rest is 824."""
    from types import SimpleNamespace

    model = torch.nn.Linear(4, 3, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(2, 4)

    def forward():
        return model(x).sum()

    forward().backward()
    optimizer.step()  # warm-up: the gradient and the momentum exist
    live = SimpleNamespace(reset_peak=lambda: None, peak=1000)
    memory = measure_step_memory(model, optimizer, forward, "cpu", live=live)
    assert (memory.weights, memory.gradients, memory.optimizer, memory.activations) == (48, 48, 48, 32)
    assert (memory.peak, memory.rest) == (1000, 824)


def test_tensor_bytes_counts_each_storage_once_whole_and_skips_non_tensors_and_excluded_storages():
    x = torch.zeros(4, 8)  # 128 bytes
    y = torch.zeros(3, dtype=torch.float64)  # 24 bytes
    assert tensor_bytes([x, x[1], x.view(32), None, 3, y]) == 128 + 24
    assert tensor_bytes([x[1:2, :2]]) == 128  # a view keeps its whole storage alive
    assert tensor_bytes([x, y], exclude={(str(y.device), y.untyped_storage()._cdata)}) == 128


def test_optimizer_state_bytes_include_adams_scalar_step_tensors():
    from profiling.memory_breakdown import optimizer_state_bytes

    model = torch.nn.Linear(4, 3, bias=False)
    optimizer = torch.optim.Adam(model.parameters(), foreach=False)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    step = optimizer.state[model.weight]["step"]
    assert isinstance(step, torch.Tensor) and step.dim() == 0
    assert optimizer_state_bytes(optimizer) == 48 + 48 + step.element_size()  # exp_avg, exp_avg_sq, step


def test_measured_peak_is_the_live_trackers_peak_over_the_step_alone():
    """The tracker's peak is reset when the step starts: an earlier, higher peak is not the step's."""
    from types import SimpleNamespace

    model = torch.nn.Linear(4, 3, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.ones(2, 4)).sum().backward()
    live = SimpleNamespace(peak=10**9)
    live.reset_peak = lambda: setattr(live, "peak", 500)
    memory = measure_step_memory(model, optimizer, lambda: model(torch.ones(2, 4)).sum(), "cpu", live=live)
    assert memory.peak == 500 and memory.peak_source == "traced live bytes"


def test_element_size_takes_a_dtype_or_any_of_its_names():
    from profiling.memory_model import element_size, parse_dtype

    assert [element_size(name) for name in ("fp32", "float32", "fp16", "float16", "bf16", "bfloat16")] == [4, 4, 2, 2,
                                                                                                         2, 2]
    assert element_size(torch.bfloat16) == 2 and parse_dtype("fp16") is torch.float16
    with pytest.raises(ValueError, match="dtype must be one of"):
        parse_dtype("int8")
    with pytest.raises(TypeError, match="torch.dtype or a name"):
        element_size(4)


def test_a_bool_batch_size_is_refused():
    with pytest.raises(ValueError, match="batch_size"):
        predict_memory(TINY, "dense", batch_size=True, seq_len=32)


@pytest.mark.parametrize("method", ["dense", "masked", "smet"])
def test_weights_and_gradients_are_in_the_parameter_dtype_and_only_the_moments_in_the_state_dtype(method):
    """bf16 parameters with fp32 AdamW states: weights and gradients halve against fp32, the moments do not."""
    args = dict(density=0.5, block_size=32, batch_size=2, seq_len=32)
    fp32 = predict_memory(TINY, method, **args)
    bf16 = predict_memory(TINY, method, **args, param_dtype=torch.bfloat16)
    mixed = predict_memory(TINY, method, **args, param_dtype=torch.bfloat16, state_dtype=torch.float32)
    assert (mixed.weights, mixed.gradients) == (bf16.weights, bf16.gradients) and mixed.gradients == fp32.gradients // 2
    assert mixed.optimizer == fp32.optimizer


def test_galore_keeps_its_weights_and_gradients_in_the_parameter_dtype_whatever_its_state_dtype():
    bf16 = predict_memory(TINY, "galore", batch_size=2, seq_len=32, rank=16, param_dtype=torch.bfloat16)
    mixed = predict_memory(TINY, "galore", batch_size=2, seq_len=32, rank=16, param_dtype=torch.bfloat16,
                           state_dtype=torch.float32)
    assert (mixed.weights, mixed.gradients) == (bf16.weights, bf16.gradients) and mixed.optimizer > bf16.optimizer


def test_rest_is_the_rmsnorm_backward_where_it_is_the_largest_working_set():
    """A narrow SwiGLU and a small vocabulary: three fp32 ``T × h`` tensors (12 T h) outweigh the loss backward (8 T V)
    and the SwiGLU backward (3 e T i)."""
    from dataclasses import replace

    narrow = replace(TINY, intermediate_size=32, vocab_size=16)
    assert predict_memory(narrow, "dense", batch_size=2, seq_len=32).rest == 12 * 64 * 64


def _linear_step():
    model = torch.nn.Linear(4, 3, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.ones(2, 4)).sum().backward()
    return model, optimizer, lambda: model(torch.ones(2, 4)).sum()


def _fake_cuda_allocator(monkeypatch, peak):
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *args, **kwargs: peak)


def test_on_cuda_the_peak_is_the_allocators_and_the_rest_what_the_components_leave_of_it(monkeypatch):
    _fake_cuda_allocator(monkeypatch, 10**6)
    model, optimizer, forward = _linear_step()
    memory = measure_step_memory(model, optimizer, forward, "cuda")
    assert memory.peak == 10**6 and memory.peak_source == "torch.cuda.max_memory_allocated"
    assert memory.rest == 10**6 - memory.weights - memory.gradients - memory.optimizer - memory.activations


def test_a_live_tracker_gives_the_peak_even_for_a_cuda_device(monkeypatch):
    """A model traced on ``meta`` for a CUDA target: the allocator saw none of its step, the tracker all of it."""
    from types import SimpleNamespace

    _fake_cuda_allocator(monkeypatch, 10**6)
    model, optimizer, forward = _linear_step()
    memory = measure_step_memory(model, optimizer, forward, "cuda", live=SimpleNamespace(reset_peak=lambda: None,
                                                                                          peak=500))
    assert memory.peak == 500 and memory.peak_source == "traced live bytes"
