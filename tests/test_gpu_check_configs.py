"""smet-bench gpu-check's Triton configs: which configs each block-sparse autotuner may try (pinned and timing
configs inside the GPU autotune space, kept by the pruner), and how the headline shape's picks carry over to the
later shapes, block sizes, variants and the training and compile stages."""

import torch

from bench.gpu_check import kernel_ops
from bench.gpu_check.plan import CPU
from test_gpu_check import cpu_context


def test_restricting_configs_clears_and_then_restores_the_autotuners(monkeypatch):
    tuners = list(kernel_ops.autotuners())
    for _, _, tuner in tuners:  # an earlier block's pick, which must not read as one made inside the next block
        monkeypatch.setattr(tuner, "best_config", tuner.configs[0], raising=False)
        monkeypatch.setattr(tuner, "cache", {("earlier key",): tuner.configs[0]})
    saved = [(tuner.configs, dict(tuner.cache), tuner.best_config) for _, _, tuner in tuners]
    every = {name: {kernel_ops.config_key(c) for c in tuner.configs} for name, _, tuner in tuners}
    with kernel_ops.restrict_configs(every):
        assert all(tuner.cache == {} for _, _, tuner in tuners)
        assert kernel_ops.chosen_configs() == {}
    assert [(tuner.configs, dict(tuner.cache), tuner.best_config) for _, _, tuner in tuners] == saved


def test_the_restricted_autotuners_are_every_autotuner_of_the_block_sparse_matmul():
    """A kernel left out would autotune its whole space on the GPU run (18 configs, again for every split value)."""
    from triton.runtime.autotuner import Autotuner

    from smet_kernels.ops import block_sparse_matmul as bsmm

    every = {name for name, value in vars(bsmm).items() if isinstance(value, Autotuner)}
    assert {name for name, _, _ in kernel_ops.autotuners()} == every


def test_each_pinned_and_timing_config_is_in_the_gpu_autotune_space_and_the_pruner_keeps_each_pinned_one(monkeypatch):
    """A config outside the space restricts nothing: the kernel would autotune every config on the GPU run. A lone
    pinned config runs without the pruner, so the pruner must keep it (bf16, its block size)."""
    from bench.gpu_check.plan import PINNED_CONFIGS, TIMING_CONFIGS
    from smet_kernels.ops import launch_config

    x = {"x": torch.empty(0, dtype=torch.bfloat16)}
    for name, family, tuner in kernel_ops.autotuners():
        block_ms = launch_config.GRAD_WEIGHT_BLOCK_MS if "grad_weight" in name else launch_config.DENSE_SPARSE_BLOCK_MS
        monkeypatch.setattr(tuner, "configs", launch_config.matmul_configs(block_ms, interpret=False))
        space = {kernel_ops.config_key(c): c for c in tuner.configs}
        assert TIMING_CONFIGS[family] <= set(space), name
        for block_size, families in PINNED_CONFIGS.items():
            assert kernel_ops.per_kernel(families)[name] == families[family]
            pinned = [space[key] for key in families[family] if key in space]
            kept = tuner.early_config_prune(pinned, x, BLOCK_SIZE=block_size)
            assert {kernel_ops.config_key(c) for c in kept} == families[family], (name, block_size)


def test_a_model_on_a_gpu_autotunes_among_the_headline_picks_of_its_block_size_else_its_pinned_configs(tmp_path):
    from bench.gpu_check import measure
    from bench.gpu_check.plan import PINNED_CONFIGS
    from bench.runner import CommandLog, Deadline

    ctx = measure.Context(torch.device("cuda"), "triton", CPU, tmp_path, Deadline(None), CommandLog(tmp_path, None),
                          0, True)  # fmt: skip
    ctx.picks[128] = picks = {"bsmm_dense_sparse_kernel": {(64, 4, 3)}}
    assert ctx.configs_for(128) == picks
    assert ctx.configs_for(64) == kernel_ops.per_kernel(PINNED_CONFIGS[64])
    assert kernel_ops.pinned_configs(64, torch.device("cpu")) is None  # the interpreter's single config


def test_on_a_gpu_the_headline_picks_replace_the_timing_configs_of_their_kernel_for_the_later_shapes(tmp_path,
                                                                                                   monkeypatch):
    import contextlib

    from bench.gpu_check import measure
    from bench.gpu_check.plan import TIMING_CONFIGS
    from bench.runner import CommandLog, Deadline

    allowed_by_suite, inside = {}, []

    @contextlib.contextmanager
    def restrict_configs(allowed, caches=None):
        inside.append(allowed)
        yield
        inside.pop()

    picked = [{"bsmm_dense_sparse_kernel": {(64, 4, 3)}}, {"bsmm_dense_sparse_kernel": {(128, 4, 3)}}]
    picks = iter(picked)  # one per block size, in order
    monkeypatch.setattr(kernel_ops, "restrict_configs", restrict_configs)
    monkeypatch.setattr(kernel_ops, "chosen_configs", lambda: next(picks))
    monkeypatch.setattr(kernel_ops, "tuning_caches", dict)
    monkeypatch.setattr(measure.Context, "run",
                        lambda self, suite, *rest: allowed_by_suite.__setitem__(suite, inside[-1]) or (0, []))
    ctx = measure.Context(torch.device("cuda"), "triton", CPU, tmp_path, Deadline(None), CommandLog(tmp_path, None),
                          0, True)  # fmt: skip
    assert measure.run_kernels(ctx) == (0, [])
    timing = kernel_ops.per_kernel(TIMING_CONFIGS)
    assert len(CPU.kernel_block_sizes) == len(picked)
    for block_size, its_picks in zip(CPU.kernel_block_sizes, picked):
        assert allowed_by_suite[f"kernels b={block_size} headline"] == timing
        expected = timing | its_picks  # a kernel the headline did not run keeps the timing configs
        assert allowed_by_suite[f"kernels b={block_size}"] == expected == ctx.picks[block_size]
        assert allowed_by_suite[f"kernels b={block_size} variants"] == expected


def test_the_configs_a_kernel_ran_are_the_ones_later_shapes_choose_from(device):
    from smet_kernels.layout import BlockLayout

    layout = BlockLayout.random(64, 64, 32, 0.5, generator=torch.Generator().manual_seed(0)).to(device)
    values = torch.randn(layout.nnz, 32, 32, device=device)
    # the first two configs of each kernel (the interpreter has one): a GPU autotunes between them, not all 18
    allowed = {name: {kernel_ops.config_key(c) for c in tuner.configs[:2]}
               for name, _, tuner in kernel_ops.autotuners()}  # fmt: skip
    with kernel_ops.restrict_configs(allowed):
        kernel_ops.matmul_ops("grouped")["forward"](torch.randn(40, 64, device=device), values, layout)
        chosen = kernel_ops.chosen_configs()
    assert chosen["bsmm_dense_sparse_kernel"] <= allowed["bsmm_dense_sparse_kernel"]
    assert len(chosen["bsmm_dense_sparse_kernel"]) == 1


def test_a_later_block_starts_from_the_picks_an_earlier_block_saved():
    name, allowed = "bsmm_dense_sparse_kernel", {name: {kernel_ops.config_key(c) for c in tuner.configs[:2]}
                                                 for name, _, tuner in kernel_ops.autotuners()}  # fmt: skip
    tuner = dict((n, t) for n, _, t in kernel_ops.autotuners())[name]
    before = dict(tuner.cache)
    with kernel_ops.restrict_configs(allowed):
        tuner.cache[("shape",)] = pick = tuner.configs[0]  # what a GPU's autotuning leaves
        caches = kernel_ops.tuning_caches()
    assert tuner.cache == before
    foreign = caches[name] | {("other",): object()}  # a config not among the allowed ones is not carried
    with kernel_ops.restrict_configs(allowed, {name: foreign}):
        assert tuner.cache == {("shape",): pick}
    with kernel_ops.restrict_configs(allowed):
        assert tuner.cache == {}


def test_the_variants_of_a_block_size_reuse_the_picks_its_bars_made(tmp_path, monkeypatch):
    """triton_plain_order runs triton_grouped's kernel: at each shape it must time the config grouped's autotuning
    picked there (the A/B of the two orders), not tune again after the bars of the other block sizes."""
    import contextlib

    from bench.gpu_check import measure
    from bench.runner import CommandLog, Deadline

    calls, inside = [], []

    @contextlib.contextmanager
    def restrict_configs(allowed, caches=None):
        inside.append((caches, []))
        calls.append(inside[-1])
        yield
        inside.pop()

    made = iter(range(100))
    monkeypatch.setattr(kernel_ops, "restrict_configs", restrict_configs)
    monkeypatch.setattr(kernel_ops, "tuning_caches", lambda: {"made": next(made)})
    monkeypatch.setattr(measure.Context, "run", lambda self, suite, *rest: inside[-1][1].append(suite) or (0, []))
    ctx = measure.Context(torch.device("cpu"), "triton", CPU, tmp_path, Deadline(None), CommandLog(tmp_path, None), 0,
                          True)  # fmt: skip
    assert measure.run_kernels(ctx) == (0, [])
    started_from = {suite: caches for caches, suites in calls for suite in suites}
    assert len(CPU.kernel_block_sizes) > 1 and started_from[f"kernels b={CPU.kernel_block_sizes[0]}"] is None
    for saved_by_its_bars, block_size in enumerate(CPU.kernel_block_sizes):  # saved in this order, one per block
        assert started_from[f"kernels b={block_size} variants"] == {"made": saved_by_its_bars}


def test_the_training_and_compile_stages_autotune_among_the_configs_of_their_block_size(tmp_path, monkeypatch):
    import contextlib

    from bench.gpu_check import measure

    allowed = []

    @contextlib.contextmanager
    def restrict_configs(configs, caches=None):
        allowed.append(configs)
        yield

    monkeypatch.setattr(kernel_ops, "restrict_configs", restrict_configs)
    monkeypatch.setattr(measure.Context, "run", lambda self, *args: (0, []))
    monkeypatch.setattr(measure.training, "build", lambda case, device, backend, seed: ("model", "optimizer"))
    monkeypatch.setattr(torch, "compile", lambda model: model)
    monkeypatch.setattr(measure, "_step_times_ms", lambda *args: [1.0])
    ctx = cpu_context(tmp_path)
    ctx.picks[CPU.training_block_size] = picks = {"bsmm_dense_sparse_kernel": {(64, 4, 3)}}
    measure.run_training(ctx)
    measure.run_compile(ctx)
    assert allowed == [picks, picks]
