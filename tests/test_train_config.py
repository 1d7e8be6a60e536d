"""The trainer's configuration: every field's validation, the default block size, the SMET ablation arms, and each
method built from the config (optimizer settings, SuPar, the model's sizes); a run of each mode is in
test_train_trainer.py."""

import json

import pytest
import torch

from smet_kernels.train import cli, trainer
from smet_kernels.train.trainer import ConfigError, TrainConfig
from test_train_trainer import cache_dir, one_thread, tiny_config  # noqa: F401 -- autouse: token cache, one thread


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="prune_fraction"):
        tiny_config(prune_fraction=1.0).validate()
    with pytest.raises(ConfigError, match="regrow"):
        tiny_config(regrow="magnitude").validate()
    with pytest.raises(ConfigError, match="lr_warmup_steps"):
        tiny_config(lr_warmup_steps=24).validate()
    assert tiny_config().resolved_block_size() == 16 and tiny_config(model="60m").resolved_block_size() == 128


@pytest.mark.parametrize(
    "model, density, expected",
    [("20m", 0.5, 64), ("20m", 0.1, 32), ("60m", 0.5, 128), ("60m", 0.1, 64), ("tiny", 0.5, 16)],
)
def test_default_block_size_lets_updates_move_blocks(model, density, expected):
    assert TrainConfig(model=model, density=density).resolved_block_size() == expected


def test_default_block_size_keeps_four_blocks_a_row_and_moves_a_block_when_exactly_one_is_due():
    """20m (hidden 256) at ζ0 = 0.5: density 0.5 would move 1 of 128's 2 blocks, but 2 blocks a row are too few
    (64); density 0.1 moves exactly 0.5 · 2 = 1 of 64's 2 active blocks (``>= 1``, so 64, not 32)."""
    assert TrainConfig(model="20m", density=0.5, prune_fraction=0.5).resolved_block_size() == 64
    assert TrainConfig(model="20m", density=0.1, prune_fraction=0.5).resolved_block_size() == 64


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("density", 0.0, r"^density must be in \(0, 1\], got 0.0$"),
        ("density", 1.5, r"^density must be in \(0, 1\], got 1.5$"),
        ("betas", (0.9, 1.0), r"^betas must be two numbers in \[0, 1\), got \(0.9, 1.0\)$"),
        ("galore_rank", 0, "^galore_rank must be an int >= 1, got 0$"),
        ("galore_scale", 0.0, r"^galore_scale must be in \(0, inf\), got 0.0$"),
        ("supar_base_width", 0, "^supar_base_width must be an int >= 1, got 0$"),
        ("seed", 2**32, "^seed must be <= 4294967295, got 4294967296$"),
        ("min_prune_fraction", -0.1, r"^min_prune_fraction must be in \[0, 1\], got -0.1$"),
        ("min_prune_fraction", 0.25, r"^min_prune_fraction \(0.25\) must be <= prune_fraction \(0.2\): the decay "),
        ("update_end_step", 0, "^update_end_step must be an int >= 1, got 0$"),
        ("regrow_init", "uniform", r"^regrow_init must be one of \['zeros', 'normal'\], got 'uniform'$"),
        ("regrow_init_std", 0.0, r"^regrow_init_std must be in \(0, inf\), got 0.0$"),
        ("block_size", 24, r"^block_size must be one of \[16, 32, 64, 128\], got 24$"),
    ],
)
def test_config_validation_refuses_a_value_at_or_past_each_bound(field, value, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**{field: value}).validate()


def test_check_choices_names_only_the_values_not_allowed_even_unhashable_ones_in_one_line():
    from smet_kernels.train.config import check_choices

    check_choices("--configs", ["tiny", "20m"], ("tiny", "20m", "60m"))
    check_choices("--configs", None, ("tiny",))
    with pytest.raises(ConfigError, match=r"^--configs must be from tiny,20m, got tiyn,\['20m'\]$"):
        check_choices("--configs", ["tiny", "tiyn", ["20m"]], {"tiny": 1, "20m": 2})


def test_a_min_prune_fraction_above_the_prune_fraction_asks_to_lower_it_or_raise_the_other_not_to_give_it(capsys):
    for argv, given in ((["--min-prune-fraction", "0.5"], "0.5"), (["--prune-fraction", "0.001"], "0.005")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*argv, "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1, err
        assert err[0].startswith(f"smet-train: error: --min-prune-fraction ({given}) must be <= --prune-fraction")
        assert err[0].endswith("(lower --min-prune-fraction or raise --prune-fraction)"), err


def test_config_from_dict_reads_betas_back_as_a_tuple():
    config = TrainConfig.from_dict({"betas": [0.9, 0.99]})
    assert config.betas == (0.9, 0.99) and config == TrainConfig(betas=(0.9, 0.99))


@pytest.mark.parametrize("betas", [None, 0.9])
def test_config_from_dict_leaves_betas_that_are_not_a_list_to_the_one_line_refusal_not_a_type_error(betas):
    with pytest.raises(ConfigError, match=rf"^betas must be two numbers in \[0, 1\), got {betas}$"):
        TrainConfig.from_dict({"betas": betas}).validate()


def test_config_from_dict_refuses_unknown_fields_naming_them_sorted():
    with pytest.raises(ConfigError, match=r"^unknown config fields \['lerning_rate', 'steps'\]$"):
        TrainConfig.from_dict({"steps": 10, "lr": 1e-3, "lerning_rate": 1e-3})


# ---------------------------------------------------------------------------------------------- arms and probe


@pytest.mark.parametrize(
    "optimizer, warmup, bias_correction, alpha",
    [("smet", "linear", "local", 1.0), ("naive-dst", "none", "global", 0.0),
     ("warmup-only", "linear", "local", 0.0), ("density-lr-only", "none", "global", 1.0)],
)
def test_each_smet_adamw_arm_builds_its_optimizer_and_records_its_alpha(optimizer, warmup, bias_correction, alpha):
    config = tiny_config(optimizer=optimizer).validate()
    options = trainer.smet_adamw_options(config)
    assert (options["warmup"], options["bias_correction"], options["density_lr_exponent"]) == (
        warmup, bias_correction, alpha)
    assert options["warmup_scope"] == "all" and config.to_dict()["density_lr_exponent"] == alpha
    given = tiny_config(optimizer=optimizer, density_lr_exponent=0.0 if optimizer == "warmup-only" else 0.5)
    assert trainer.smet_adamw_options(given.validate())["density_lr_exponent"] == given.density_lr_exponent


def test_warmup_only_refuses_a_density_lr():
    with pytest.raises(ConfigError, match="warmup-only"):
        tiny_config(optimizer="warmup-only", density_lr_exponent=1.0).validate()


def test_warmup_only_refuses_warmup_mode_none_which_would_run_an_arm_without_its_warm_up():
    with pytest.raises(ConfigError, match="'warmup-only' needs a warm-up, got warmup_mode 'none'"):
        tiny_config(optimizer="warmup-only", warmup_mode="none").validate()


def test_cli_naive_dst_records_alpha_zero(tmp_path, capsys):
    assert cli.main(["--config", "tiny", "--optimizer", "naive-dst", "--max-steps", "1", "--eval-every", "0",
                     "--batch-size", "2", "--seq-len", "32", "--backend", "reference", "--out-dir", str(tmp_path),
                     "--no-progress"]) == 0
    assert json.loads((tmp_path / "summary.json").read_text())["config"]["density_lr_exponent"] == 0.0


@pytest.mark.parametrize("optimizer", trainer.OPTIMIZERS)
def test_the_trainer_builds_each_method_with_the_configured_settings(optimizer):
    config = tiny_config(optimizer=optimizer, lr=2e-3, betas=(0.8, 0.9), eps=1e-7, weight_decay=0.3, galore_rank=4,
                         galore_update_gap=7, galore_scale=0.5, activation_checkpointing=True, update_interval=3,
                         prune_fraction=0.3, min_prune_fraction=0.1, update_end_step=17, regrow="gradient",
                         regrow_init="normal", regrow_init_std=0.5, seed=5, seq_len=4096)
    model = trainer.build_model(config, 64, torch.device("cpu"))
    assert model.activation_checkpointing is True and model.config.max_seq_len == 4096
    built = trainer.build_optimizer(config, model, torch.device("cpu"))
    for group in built.param_groups:
        assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (2e-3, (0.8, 0.9), 1e-7, 0.3)
    if optimizer == "galore":
        (projected,) = [group for group in built.param_groups if "rank" in group]
        assert (projected["rank"], projected["update_proj_gap"], projected["scale"]) == (4, 7, 0.5)
    controller = trainer.build_controller(config, model, built)
    if controller is not None:
        assert (controller.update_interval, controller.prune_fraction, controller.min_prune_fraction,
                controller.end_step, controller.regrow, controller.regrow_init, controller.init_std,
                controller.seed) == (3, 0.3, 0.1, 17, "gradient", "normal", 0.5, 5)
        whole_run = trainer.build_controller(tiny_config(optimizer=optimizer), model, built)
        assert (whole_run.end_step, whole_run.min_prune_fraction, whole_run.regrow_init) == (24, 0.005, "zeros")


def test_supar_scales_the_hidden_layers_init_and_lr_by_width_over_supar_base_width_times_density():
    config = tiny_config(optimizer="smet", supar=True, supar_base_width=4, density=0.5)
    model = trainer.build_model(config, 64, torch.device("cpu"))
    built = trainer.build_optimizer(config, model, torch.device("cpu"))
    hidden = [group for group in built.param_groups if hasattr(group["params"][0], "smet_layout")]
    assert hidden
    for group in hidden:
        (values,) = group["params"]
        multiplier = model.config.hidden_size / 4 * values.smet_layout.density
        assert group["lr"] == pytest.approx(config.lr / multiplier)
        assert values.std().item() == pytest.approx(model.config.init_std / multiplier**0.5, rel=0.15)


def test_a_dense_model_keeps_the_presets_intermediate_size_that_sparse_methods_round_up_to_a_multiple_of_128():
    """20m's 688 is no multiple of its default block size 64: sparse methods round it to 768, dense ones have none."""
    sizes = {optimizer: trainer.build_model(tiny_config(model="20m", optimizer=optimizer), 64,
                                            torch.device("cpu")).config.intermediate_size
             for optimizer in ("adamw", "smet")}
    assert sizes == {"adamw": 688, "smet": 768}


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("model", ["tiny"], r"^model must be one of \[.*\], got \['tiny'\]$"),
        ("betas", ("a", "b"), r"^betas must be two numbers in \[0, 1\), got \('a', 'b'\)$"),
        ("betas", 0.9, r"^betas must be two numbers in \[0, 1\), got 0.9$"),
        ("block_size", 32.0, r"^block_size must be one of \[16, 32, 64, 128\], got 32.0$"),
        ("device", None, "^device must be a string, got None$"),
        ("out_dir", 5, "^out_dir must be a path or None, got 5$"),
        ("resume", 3, "^resume must be a path or None, got 3$"),
    ],
)
def test_config_validation_refuses_a_value_of_the_wrong_type_in_one_line_not_a_type_error(field, value, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**{field: value}).validate()


@pytest.mark.parametrize("field", ["supar", "activation_checkpointing", "update_probe", "compile", "progress"])
def test_config_validation_refuses_a_flag_that_is_not_a_bool_where_a_truthy_no_turned_it_on(field):
    with pytest.raises(ConfigError, match=f"^{field} must be True or False, got 'no'$"):
        tiny_config(**{field: "no"}).validate()


def test_paths_given_as_pathlib_paths_are_kept_as_strings_that_a_checkpoints_config_json_can_hold(tmp_path):
    """A Path out_dir crashed the first checkpoint's write (TypeError: not JSON serializable) after its steps ran."""
    config = TrainConfig(data=tmp_path / "a.txt", out_dir=tmp_path / "run", resume=tmp_path / "run")
    assert (config.data, config.out_dir, config.resume) == (str(tmp_path / "a.txt"), *[str(tmp_path / "run")] * 2)
    assert json.loads(json.dumps(config.to_dict()))["out_dir"] == str(tmp_path / "run")


def test_checkpoints_asked_of_a_run_without_an_out_dir_are_refused_not_silently_left_unwritten():
    with pytest.raises(ConfigError, match="^checkpoint_every 5 needs out_dir: a run without one writes no checkpoint$"):
        tiny_config(checkpoint_every=5).validate()


@pytest.mark.parametrize("optimizer", ["adamw", "galore", "smet"])
def test_eps_zero_is_a_config_error_for_every_method_not_a_failure_when_the_optimizer_is_built(optimizer):
    """eps = 0 was accepted by the config: the smet methods then failed at build with an optimizer's ValueError, and
    torch's AdamW stepped an always-zero gradient element (an unused embedding row) by 0 / 0 = NaN."""
    with pytest.raises(ConfigError, match=r"^eps must be in \(0, inf\), got 0.0$"):
        tiny_config(optimizer=optimizer, eps=0.0).validate()


def test_more_evaluation_windows_than_the_validation_split_holds_warns_that_some_count_twice(tmp_path):
    """The validation share of a small file holds 4 windows of 32 tokens; 4 x 4 = 16 evaluation windows were spread
    over them without a word, weighting some four times in val_loss."""
    import warnings

    from smet_kernels.train.build import prepare_data

    text = tmp_path / "corpus.txt"
    text.write_bytes(bytes(range(32, 127)) * 160)  # 15200 bytes: the last 2 % (304) are validation
    config = tiny_config(data=str(text), eval_every=5, eval_batches=4)
    expected = (r"^eval_batches 4 x batch_size 4 = 16 evaluation windows, but the validation split holds 4: some are "
                r"evaluated more than once \(eval_batches 1 or fewer sees each once\)$")
    with pytest.warns(UserWarning, match=expected):
        prepare_data(config, torch.device("cpu"))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_data(tiny_config(data=str(text), eval_every=5, eval_batches=1), torch.device("cpu"))
