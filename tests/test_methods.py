"""The training-method registry: every CLI choice and benchmark method list is derived from it, and its factories
build what each method says it sparsifies and trains with."""

import argparse
import itertools
import re
import warnings

import pytest
import torch
from conftest import usage_error

from smet_kernels.masked import MaskedLinear
from smet_kernels.modules import BlockSparseLinear
from smet_kernels.optim.galore import GaLoreAdamW
from smet_kernels.optim.smet_adamw import SMETAdamW
from smet_kernels.topology import SMET
from smet_kernels.train import methods
from smet_kernels.train.model import model_config


def _choices(parser: argparse.ArgumentParser, dest: str):
    (action,) = [a for a in parser._actions if a.dest == dest]
    return tuple(action.choices)


def test_smet_train_optimizer_choices_are_the_registry_names():
    from smet_kernels.train.cli import build_parser

    assert _choices(build_parser(), "optimizer") == methods.TRAINER_NAMES
    assert methods.TRAINER_NAMES == ("adamw", "galore", "masked-dst", "smet", "naive-dst", "warmup-only",
                                     "density-lr-only")


def test_benchmark_method_lists_are_the_registry_families():
    from bench import memory_scaling, training
    from bench.gpu_check import measure
    from profiling import memory_model

    assert methods.BENCH_NAMES == ("dense", "galore", "masked", "smet")
    assert methods.SPARSE_BENCH_NAMES == ("masked", "smet")
    for names in (training.METHODS, memory_scaling.METHODS, memory_model.METHODS):
        assert names == methods.BENCH_NAMES
    assert training.SPARSE_METHODS == memory_scaling.SPARSE_METHODS == methods.SPARSE_BENCH_NAMES
    assert set(measure.CHECKPOINTED_METHODS) <= set(methods.BENCH_NAMES)  # its other rows: training.METHODS


def test_bench_cli_methods_accepts_the_registry_families_and_nothing_else(tmp_path, capsys):
    from bench.cli import build_parser, main

    error = usage_error(main, ["run", "--suites", "training", "--methods", "adamw", "--out-dir", str(tmp_path)], capsys)
    assert error == f"smet-bench: error: --methods must be from {','.join(methods.BENCH_NAMES)}, got adamw"
    (run,) = [a for a in build_parser()._actions if a.dest == "command"]
    assert ",".join(methods.BENCH_NAMES) in run.choices["run"].format_help().replace("\n", "")


def test_stability_methods_name_registry_methods_and_share_their_sparsity():
    from bench.stability.spec import METHODS

    for study_method in METHODS.values():
        assert study_method.optimizer in methods.METHODS
        assert study_method.sparse == methods.METHODS[study_method.optimizer].sparse
    assert {m.optimizer for m in METHODS.values()} == set(methods.TRAINER_NAMES)


def test_each_benchmark_family_is_one_trainer_method():
    for bench_name, method in methods.BENCH_METHODS.items():
        assert methods.method(bench_name) is methods.method(method.name) is method
    with pytest.raises(ValueError, match="method must be one of"):
        methods.method("sparse")


def test_a_method_with_an_unknown_sparsity_is_refused():
    assert {m.sparsity for m in methods.METHODS.values()} == set(methods.SPARSITIES)
    with pytest.raises(ValueError, match="sparsity must be one of"):
        methods.Method("half", "semi", "adamw")


@pytest.mark.parametrize("name", methods.TRAINER_NAMES)
def test_the_factories_build_what_the_registry_says(name):
    method = methods.METHODS[name]
    shape = model_config("tiny", vocab_size=64, block_size=16, max_seq_len=8)
    model = methods.build_model(shape, name, density=0.5, block_size=16, dtype=torch.float32, device="cpu",
                                backend="reference", seed=0)
    layers = {type(m) for n, m in model.named_modules() if n.endswith("q_proj")}
    expected_layer = {"none": torch.nn.Linear, "compact": BlockSparseLinear, "masked": MaskedLinear}
    assert layers == {expected_layer[method.sparsity]}
    optimizer = methods.build_optimizer(name, model, backend="reference", galore=dict(rank=4), lr=1e-3)
    expected_optimizer = {"adamw": torch.optim.AdamW, "galore": GaLoreAdamW, "smet_adamw": SMETAdamW}
    assert type(optimizer) is expected_optimizer[method.optimizer]
    with warnings.catch_warnings():  # smet-train names a run without updates by its options, not the library
        warnings.simplefilter("error")
        controller = methods.build_controller(name, model, optimizer, update_interval=5, prune_fraction=0.2,
                                              total_steps=4)
    assert (controller is not None) == method.sparse and (controller is None or isinstance(controller, SMET))
    assert (method.arm is not None) == (method.optimizer == "smet_adamw")


def test_smet_train_warns_about_exactly_the_options_a_method_does_not_take(tmp_path, capsys):
    from smet_kernels.train.cli import _warn_ignored_options
    from smet_kernels.train.config import TrainConfig

    for (name, method), probe in itertools.product(methods.METHODS.items(), (True, False)):
        given = {option: None for option in methods.SPARSE_OPTIONS + methods.GALORE_OPTIONS}
        _warn_ignored_options(argparse.Namespace(**given), TrainConfig(optimizer=name, update_probe=probe))
        (line,) = [line for line in capsys.readouterr().err.splitlines() if "no effect with --optimizer" in line]
        warned = set(re.findall(r"--[a-z-]+", line.split(" ha")[0]))  # whole flags: --density is no --density-lr-…
        for option in given:
            acts = option in method.options or (probe and option in methods.PROBE_SCHEDULE_OPTIONS)
            assert ("--" + option.replace("_", "-") in warned) == (not acts), (name, option, probe)


@pytest.mark.parametrize("name, ignored", [("naive-dst", True), ("density-lr-only", True), ("warmup-only", False),
                                           ("smet", False)])
def test_smet_train_names_the_warm_up_options_as_ignored_in_the_arms_without_warm_up(name, ignored, capsys):
    """naive-dst and density-lr-only fix warmup="none": --warmup-mode linear must not pass for a warm-up."""
    from smet_kernels.train.cli import _warn_ignored_options
    from smet_kernels.train.config import TrainConfig

    given = argparse.Namespace(warmup_mode="linear", optimizer_warmup_steps=50, warmup_scope="regrown")
    _warn_ignored_options(given, TrainConfig(optimizer=name))
    warning = (f"smet-train: --warmup-mode, --optimizer-warmup-steps, --warmup-scope have no effect with --optimizer "
               f"{name}\n")
    assert capsys.readouterr().err == (warning if ignored else "")


def _layouts(name: str, **options) -> dict[str, torch.Tensor]:
    shape = model_config("tiny", vocab_size=64, block_size=16, max_seq_len=8)
    model = methods.build_model(shape, name, density=0.25, block_size=16, dtype=torch.float32, device="cpu",
                                backend="reference", **options)
    return {n: m.layout.block_indices for n, m in model.named_modules() if isinstance(m, (BlockSparseLinear,
                                                                                          MaskedLinear))}


def test_the_layouts_are_drawn_from_the_generator_given_or_else_from_one_seeded_with_seed():
    default = _layouts("smet", seed=0)
    same = _layouts("smet", seed=0, generator=torch.Generator().manual_seed(0))
    other = _layouts("smet", seed=0, generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(default[n], same[n]) for n in default)
    assert any(not torch.equal(default[n], other[n]) for n in default)


def test_masked_layers_take_the_distribution_of_their_blocks_over_the_layers_as_compact_ones_do():
    blocks = {name: {n: len(indices) for n, indices in _layouts(name, distribution="erk").items()}
              for name in ("smet", "masked-dst")}
    assert blocks["masked-dst"] == blocks["smet"] and len(set(blocks["smet"].values())) > 1


@pytest.mark.parametrize("name", methods.TRAINER_NAMES)
def test_the_optimizer_factory_passes_the_hyperparameters_to_every_method(name):
    shape = model_config("tiny", vocab_size=64, block_size=16, max_seq_len=8)
    model = methods.build_model(shape, name, density=0.5, block_size=16, dtype=torch.float32, device="cpu",
                                backend="reference", seed=0)
    hyper = dict(lr=2e-3, betas=(0.8, 0.9), eps=1e-7, weight_decay=0.3)
    optimizer = methods.build_optimizer(name, model, backend="reference",
                                        galore=dict(rank=4, update_proj_gap=7, scale=0.5), **hyper)
    for group in optimizer.param_groups:
        assert {key: group[key] for key in hyper} == hyper
    if name == "galore":
        (projected,) = [group for group in optimizer.param_groups if "rank" in group]
        assert (projected["rank"], projected["update_proj_gap"], projected["scale"]) == (4, 7, 0.5)


def test_galore_refuses_params_it_would_have_dropped_for_the_groups_of_the_models_layers():
    model = methods.build_model(model_config("tiny", vocab_size=64, block_size=16, max_seq_len=8), "galore",
                                density=1.0, block_size=16, dtype=torch.float32, device="cpu", backend="reference",
                                seed=0)
    with pytest.raises(ValueError, match="^params: galore builds its param groups from model"):
        methods.build_optimizer("galore", model, [{"params": list(model.parameters()), "lr": 0.5}],
                                galore=dict(rank=4), lr=1e-3)
