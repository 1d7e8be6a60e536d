"""``smet-train``'s command line: bad arguments and configurations as one-line errors naming the option (the field
for a Python caller), every option's default in ``--help``, and options without effect in the chosen mode named."""

import json
import math

import pytest

from conftest import usage_error
from smet_kernels.train import checkpoint, cli
from smet_kernels.train.trainer import ConfigError, TrainConfig
from test_train_trainer import cache_dir, one_thread  # noqa: F401 -- autouse: shared token cache, one thread
from test_train_trainer import read_metrics, tiny_config


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--density", "1.5"], "argument --density: must be in (0, 1], got 1.5"),
        (["--lr", "-1"], "argument --lr: must be in (0, inf), got -1"),  # inf is refused: an open interval
        (["--optimizer", "sgd"], "argument --optimizer: invalid choice"),
        (["--max-steps", "0"], "argument --max-steps: must be >= 1"),
        (["--batch-size", "x"], "argument --batch-size: expected an integer"),
        (["--data", "/nonexistent/corpus.txt"], "--data: data path '/nonexistent/corpus.txt' does not exist"),
        (["--batch-size", "6", "--grad-accum", "4"], "--batch-size (6) must be divisible by --grad-accum (4)"),
        (["--optimizer", "adamw", "--supar"], "--supar needs a sparse --optimizer mode"),
        (["--resume", "/nonexistent/run"], "--resume '/nonexistent/run' does not exist"),
        (["--device", "tpu:0"], "--device must be"),
        (["--block-size", "128", "--config", "tiny"], "--block-size 128 does not divide the hidden size 64 of --config "
                                                      "'tiny'"),
        (["--optimizer", "adamw", "--lr", "1e38"], "--lr 1e+38 overflows float32 in the first step's size"),
        (["--seed", "4294967296"], "--seed must be <= 4294967295, got 4294967296"),  # torch's 64-bit seeds overflowed
        (["--min-prune-fraction", "0.3"], "--min-prune-fraction (0.3) must be <= --prune-fraction (0.2)"),
        (["--regrow-init-std", "0"], "argument --regrow-init-std: must be in (0, inf), got 0"),
    ],
)
def test_bad_arguments_give_one_line_errors(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv + ["--out-dir", str(tmp_path), "--no-progress", "--max-steps", "1"] if "--max-steps" not in argv
                 else argv + ["--out-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("smet-train: error: ") and message in err[-1], err
    assert not any("Traceback" in line for line in err)


def test_a_bad_configuration_is_one_stderr_line_without_the_usage_and_exit_code_2(capsys, tmp_path):
    argv = ["--config", "tiny", "--block-size", "128", "--out-dir", str(tmp_path), "--no-progress"]
    error = usage_error(cli.main, argv, capsys)
    assert error.startswith("smet-train: error: ") and "does not divide the hidden size 64" in error, error


def test_an_error_names_the_option_on_the_command_line_and_the_field_for_a_python_caller(capsys, tmp_path):
    argv = ["--batch-size", "6", "--grad-accum", "4", "--out-dir", str(tmp_path), "--no-progress"]
    error = usage_error(cli.main, argv, capsys)
    assert error == "smet-train: error: --batch-size (6) must be divisible by --grad-accum (4)"
    with pytest.raises(ConfigError, match=r"^batch_size \(6\) must be divisible by grad_accum \(4\)$"):
        tiny_config(batch_size=6, grad_accum=4).validate()  # after the command line: its option names are gone


@pytest.mark.parametrize("option", ["--lr", "--weight-decay", "--density-lr-exponent", "--galore-scale", "--grad-clip"])
def test_an_infinite_number_is_a_one_line_error_before_training(option, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([option, "inf", "--out-dir", str(tmp_path / "run"), "--max-steps", "1", "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"smet-train: error: argument {option}: expected a finite number, got 'inf'", err
    assert not (tmp_path / "run").exists()
    field = option[2:].replace("-", "_")
    with pytest.raises(ConfigError, match=f"^{field} must be a finite number, got inf$"):
        tiny_config(**{field: float("inf")}).validate()


def test_every_option_of_smet_train_states_its_default():
    for action in cli.build_parser()._actions:
        if "-h" not in action.option_strings:
            assert "default: " in action.help, action.option_strings


def test_the_galore_rank_help_states_the_default_of_every_model_size_the_default_tiny_included():
    from smet_kernels.optim.galore import GALORE_DEFAULT_RANK

    text = " ".join(cli.build_parser().format_help().split())
    for name, rank in GALORE_DEFAULT_RANK.items():
        assert f"{rank} for {name}" in text, name


@pytest.mark.parametrize("variable, names", [("SMET_BACKEND", "'auto', 'triton', 'reference'"),
                                             ("SMET_MATMUL_VARIANT", "'grouped', 'persistent', 'tma'")])
def test_a_bad_backend_or_matmul_variant_environment_variable_is_a_one_line_error(tmp_path, monkeypatch, capsys,
                                                                                 variable, names):
    from smet_kernels import backend

    monkeypatch.setenv(variable, "fast")
    if variable == "SMET_BACKEND":  # read once, at import
        monkeypatch.setattr(backend, "_backend", "fast")
        monkeypatch.setattr(backend, "_backend_source", f"the {variable} environment variable")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--config", "tiny", "--max-steps", "1", "--no-progress", "--out-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"smet-train: error: the {variable} environment variable must be one of ({names}), got 'fast'")
    assert not (tmp_path / "run").exists()


def test_unusable_data_and_out_dir_give_one_line_errors(capsys, tmp_path):
    empty, a_file = tmp_path / "empty.txt", tmp_path / "a_file"
    empty.write_bytes(b"")
    a_file.write_text("not a folder")
    for argv, message in (
        (["--data", str(empty), "--out-dir", str(tmp_path / "run")], "holds no text"),
        (["--out-dir", str(a_file)], "exists and is not a folder"),
        (["--out-dir", str(a_file / "run")], f"cannot be created: '{a_file}' is not a folder"),
        (["--eval-batches", "0", "--out-dir", str(tmp_path / "run")], "--eval-batches: must be >= 1"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv + ["--config", "tiny", "--max-steps", "1", "--no-progress"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("smet-train: error: ") and message in err[-1], err


def test_a_corpus_too_short_for_a_batch_or_the_validation_windows_names_the_data_and_the_options_to_lower(capsys,
                                                                                                          tmp_path):
    corpus = tmp_path / "short.txt"
    corpus.write_bytes(b"x" * 200)  # 196 training bytes (6 windows of 33), 4 validation bytes
    run = ["--config", "tiny", "--max-steps", "1", "--data", str(corpus), "--seq-len", "32", "--no-progress"]
    assert usage_error(cli.main, run + ["--batch-size", "8"], capsys) == (
        f"smet-train: error: --data {str(corpus)!r}: training data holds 6 windows of --seq-len 32 + 1 tokens, "
        "fewer than --batch-size 8: lower --seq-len or --batch-size, or give more data")
    assert usage_error(cli.main, run + ["--batch-size", "2"], capsys) == (
        f"smet-train: error: --data {str(corpus)!r}: validation data is shorter than --seq-len 32 + 1 tokens: "
        "lower --seq-len, or give more data")


def test_a_run_without_evaluation_or_update_probe_trains_on_a_corpus_whose_validation_split_is_shorter_than_a_window(
        tmp_path):
    corpus = tmp_path / "short.txt"
    corpus.write_bytes(b"x" * 200)  # 4 validation bytes: no window of 33
    assert cli.main(["--config", "tiny", "--max-steps", "1", "--data", str(corpus), "--seq-len", "32", "--batch-size",
                     "2", "--eval-every", "0", "--no-update-probe", "--backend", "reference", "--no-progress"]) == 0


def test_options_without_effect_in_the_chosen_mode_are_named(capsys, tmp_path):
    assert cli.main(["--config", "tiny", "--optimizer", "adamw", "--density", "0.3", "--galore-rank", "4",
                     "--max-steps", "1", "--batch-size", "2", "--seq-len", "16", "--eval-every", "0",
                     "--out-dir", str(tmp_path), "--no-progress"]) == 0
    assert "smet-train: --density, --galore-rank have no effect with --optimizer adamw" in capsys.readouterr().err


@pytest.mark.parametrize("optimizer, message", [
    ("smet", "smet-train: --regrow-init-std has no effect with --regrow-init zeros"),
    ("adamw", "smet-train: --regrow-init-std has no effect with --optimizer adamw"),  # named once, for the mode
])
def test_a_regrow_init_std_without_the_normal_regrow_init_is_named(optimizer, message, capsys, tmp_path):
    assert cli.main(["--config", "tiny", "--optimizer", optimizer, "--regrow-init-std", "0.1", "--max-steps", "1",
                     "--batch-size", "2", "--seq-len", "16", "--eval-every", "0", "--backend", "reference",
                     "--device", "cpu", "--out-dir", str(tmp_path), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert message in err and err.count("--regrow-init-std") == 1


def test_masked_dst_names_the_smet_adamw_options_it_ignores_and_records_alpha_zero(capsys, tmp_path):
    """masked-dst trains with torch.optim.AdamW: SMETAdamW's warm-up and density-aware LR do not act there."""
    assert cli.main(["--config", "tiny", "--optimizer", "masked-dst", "--density-lr-exponent", "2", "--warmup-mode",
                     "none", "--update-interval", "3", "--max-steps", "1", "--batch-size", "2", "--seq-len", "16",
                     "--eval-every", "0", "--backend", "reference", "--device", "cpu", "--out-dir", str(tmp_path),
                     "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "smet-train: --warmup-mode, --density-lr-exponent have no effect with --optimizer masked-dst" in err
    assert json.loads((tmp_path / "summary.json").read_text())["config"]["density_lr_exponent"] == 0.0


def test_topology_updates_stop_at_update_end_step_where_the_prune_fraction_has_decayed_to_its_minimum(tmp_path):
    assert cli.main(["--config", "tiny", "--optimizer", "smet", "--backend", "reference", "--device", "cpu",
                     "--batch-size", "4", "--seq-len", "32", "--max-steps", "8", "--update-interval", "2",
                     "--update-end-step", "5", "--min-prune-fraction", "0.01", "--regrow-init", "normal",
                     "--eval-every", "0", "--out-dir", str(tmp_path), "--no-progress"]) == 0
    updates = [r for r in read_metrics(tmp_path) if r["type"] == "topology_update"]
    assert [r["step"] for r in updates] == [2, 4]  # not 6 and 8: past the end step
    assert updates[-1]["prune_fraction"] == pytest.approx(0.01 + 0.19 * (1 + math.cos(math.pi * 4 / 5)) / 2)
    saved = json.loads((tmp_path / "summary.json").read_text())["config"]
    assert (saved["update_end_step"], saved["min_prune_fraction"], saved["regrow_init"]) == (5, 0.01, "normal")


@pytest.mark.parametrize("probe", [True, False])
def test_a_dense_control_run_probes_at_the_update_steps_up_to_update_end_step(probe, capsys, tmp_path):
    """A dense run's update probe follows the sparse schedule, --update-end-step included (it probed every
    --update-interval to the end); so both options act there, and are named as without effect only without it."""
    assert cli.main(["--config", "tiny", "--optimizer", "adamw", "--device", "cpu", "--batch-size", "4", "--seq-len",
                     "32", "--max-steps", "8", "--update-interval", "2", "--update-end-step", "5", "--spike-window",
                     "1", "--eval-every", "0", "--out-dir", str(tmp_path), "--no-progress"]
                    + ([] if probe else ["--no-update-probe"])) == 0
    probes = [r["update_step"] for r in read_metrics(tmp_path) if r["type"] == "update_probe"]
    named = "--update-interval, --update-end-step have no effect with --optimizer adamw" in capsys.readouterr().err
    assert (probes, named) == (([2, 4], False) if probe else ([], True))


@pytest.mark.parametrize("world_size, named", [("2", True), ("1", False)])
def test_a_dense_fsdp_run_under_torchrun_names_the_probe_schedule_options_as_without_effect(world_size, named,
                                                                                           capsys, monkeypatch):
    """The update probe is off under FSDP on several ranks (plain tensors only): its schedule acts nowhere there."""
    monkeypatch.setenv("WORLD_SIZE", world_size)
    args = cli.build_parser().parse_args(["--config", "tiny", "--optimizer", "adamw", "--parallel", "fsdp",
                                          "--update-interval", "2"])
    cli._warn_ignored_options(args, cli.config_from_args(args))
    assert ("--update-interval has no effect with --optimizer adamw" in capsys.readouterr().err) == named


@pytest.mark.parametrize("options, message", [
    (["--update-end-step", "3"], "--update-interval 4 is past --update-end-step 3"),
    (["--max-steps", "3"], "--update-interval 4 is past --max-steps 3"),
    (["--update-end-step", "4", "--checkpoint-every", "4"], None),
])
def test_a_sparse_run_whose_first_update_is_past_its_last_step_is_told_its_topology_stays_fixed(options, message,
                                                                                               capsys, tmp_path):
    argv = ["--config", "tiny", "--optimizer", "smet", "--backend", "reference", "--device", "cpu", "--batch-size",
            "2", "--seq-len", "16", "--max-steps", "4", "--update-interval", "4", "--eval-every", "0", "--out-dir",
            str(tmp_path), "--no-progress"]
    assert cli.main(argv + options) == 0
    err = capsys.readouterr().err
    assert (f"smet-train: no topology update in this run: {message}; the topology stays as initialised" in err
            if message else "no topology update" not in err)
    if message is None:  # updated at step 4: a resume with an earlier end moves no block, past ones stay
        assert cli.main(["--resume", str(tmp_path), "--max-steps", "5", "--update-end-step", "3", "--no-progress"]) == 0
        assert ("smet-train: no topology update in this run: --update-interval 4 is past --update-end-step 3; the "
                "topology stays as the checkpoint has it") in capsys.readouterr().err


def test_a_resume_names_the_settings_it_changes_from_its_run_old_to_new_and_says_bf16_rounds_the_weights(capsys,
                                                                                                        tmp_path):
    argv = ["--config", "tiny", "--optimizer", "smet", "--backend", "reference", "--device", "cpu", "--batch-size",
            "2", "--seq-len", "16", "--max-steps", "2", "--update-interval", "2", "--eval-every", "0",
            "--checkpoint-every", "2", "--lr", "0.001", "--out-dir", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    assert cli.main(["--resume", str(tmp_path), "--max-steps", "3", "--config", "tiny", "--lr", "1e-4", "--precision",
                     "bf16", "--no-progress"]) == 0
    assert capsys.readouterr().err.splitlines()[0] == (
        "smet-train: resumed with settings changed from its run (they act from here on): --lr 0.001 -> 0.0001, "
        "--precision fp32 -> bf16; the fp32 weights are rounded to bf16")
    assert cli.main(["--resume", str(tmp_path), "--max-steps", "4"]) == 0  # extends the bf16 run: nothing changed
    assert "resumed with settings changed" not in capsys.readouterr().err


def test_a_resume_given_the_block_size_its_run_resolved_by_default_names_no_change(capsys, tmp_path):
    """The run saved block_size None (the default, resolved to 16 for tiny): --block-size 16 changes nothing."""
    argv = ["--config", "tiny", "--optimizer", "smet", "--backend", "reference", "--device", "cpu", "--batch-size",
            "2", "--seq-len", "16", "--max-steps", "2", "--update-interval", "2", "--eval-every", "0",
            "--checkpoint-every", "2", "--out-dir", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    assert cli.main(["--resume", str(tmp_path), "--max-steps", "3", "--block-size", "16", "--no-progress"]) == 0
    assert "resumed with settings changed" not in capsys.readouterr().err


def test_a_resume_with_no_update_probe_names_that_flag_turned_on_not_off(capsys, tmp_path):
    """--no-update-probe sets update_probe False: the note names the flag's state, False -> True."""
    argv = ["--config", "tiny", "--optimizer", "smet", "--backend", "reference", "--device", "cpu", "--batch-size",
            "2", "--seq-len", "16", "--max-steps", "2", "--eval-every", "0", "--checkpoint-every", "2", "--out-dir",
            str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    assert cli.main(["--resume", str(tmp_path), "--max-steps", "3", "--no-update-probe", "--no-progress"]) == 0
    assert ("smet-train: resumed with settings changed from its run (they act from here on): --no-update-probe False "
            "-> True") in capsys.readouterr().err


@pytest.mark.parametrize("optimizer, updates", [("smet", ", and topology updates run to step 6, not 4"),
                                                ("adamw", "")])
def test_extending_a_finished_run_says_its_schedules_now_run_to_the_new_last_step(capsys, tmp_path, optimizer,
                                                                                  updates):
    """--max-steps was left out of the resume note: the learning rate rose again at the resumed step unannounced."""
    argv = ["--config", "tiny", "--optimizer", optimizer, "--backend", "reference", "--device", "cpu", "--batch-size",
            "2", "--seq-len", "16", "--max-steps", "4", "--update-interval", "2", "--eval-every", "0",
            "--checkpoint-every", "4", "--no-update-probe", "--out-dir", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    assert cli.main(["--resume", str(tmp_path), "--max-steps", "6", "--no-progress"]) == 0
    assert ("smet-train: --max-steps 4 -> 6: from here on the learning rate follows the cosine decay laid over the new "
            f"length (to step 6, not 4){updates}\n") in capsys.readouterr().err


@pytest.mark.parametrize("rank, noted", [("64", True), ("1000", True), ("63", False)])
def test_a_galore_rank_of_at_least_the_hidden_size_is_named_as_projecting_nothing(capsys, tmp_path, rank, noted):
    """--galore-rank 1000 on tiny (hidden size 64) ran a full-size GaLore without a word."""
    argv = ["--config", "tiny", "--optimizer", "galore", "--galore-rank", rank, "--device", "cpu", "--max-steps", "1",
            "--batch-size", "2", "--seq-len", "16", "--eval-every", "0", "--out-dir", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 0
    note = (f"smet-train: --galore-rank {rank} is at least every hidden layer's smaller side (the hidden size 64 of "
            "--config tiny): GaLore projects nothing, its moments are full size\n")
    assert (note in capsys.readouterr().err) == noted


def test_a_resume_with_other_eval_batches_says_the_initial_validation_loss_no_longer_compares(capsys, tmp_path):
    """The summary set the step-0 loss over the first windows beside a final loss over the new ones: the loss seemed
    to rise after training, and only '--eval-batches 2 -> 1' was said."""
    argv = ["--config", "tiny", "--backend", "reference", "--device", "cpu", "--batch-size", "2", "--seq-len", "16",
            "--max-steps", "2", "--eval-every", "1", "--eval-batches", "2", "--checkpoint-every", "1",
            "--no-update-probe", "--out-dir", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    assert cli.main(["--resume", str(tmp_path / "checkpoints" / "step_0000001"), "--eval-batches", "1",
                     "--no-progress"]) == 0
    assert ("smet-train: --eval-batches 2 -> 1: summary.json's initial_val_loss stays the step-0 loss over 2 batches, "
            "so it no longer compares with the final one\n") in capsys.readouterr().err


def test_the_notes_on_options_are_printed_by_rank_0_only(capsys, tmp_path, monkeypatch):
    """Under torchrun each rank parses the same command line: the notes came once per rank."""
    argv = ["--config", "tiny", "--optimizer", "adamw", "--density", "0.3", "--device", "cpu", "--max-steps", "1",
            "--batch-size", "2", "--seq-len", "16", "--eval-every", "0", "--no-progress"]
    for rank, noted in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        assert cli.main(argv + ["--out-dir", str(tmp_path / rank)]) == 0
        assert ("--density has no effect" in capsys.readouterr().err) == noted


@pytest.mark.parametrize("on_nonfinite, named", [([], True), (["--on-nonfinite", "stop"], True),
                                                 (["--on-nonfinite", "skip"], False)])
def test_max_consecutive_skips_is_named_as_without_effect_unless_nonfinite_steps_are_skipped(on_nonfinite, named,
                                                                                             capsys):
    """The default --on-nonfinite stop ends the run at the first non-finite step: no skips to count."""
    args = cli.build_parser().parse_args(["--config", "tiny", "--max-consecutive-skips", "3"] + on_nonfinite)
    cli._warn_ignored_options(args, cli.config_from_args(args))
    noted = "smet-train: --max-consecutive-skips has no effect with --on-nonfinite stop\n" in capsys.readouterr().err
    assert noted == named


@pytest.mark.parametrize("parallel, world_size, named", [("ddp", "2", True), ("fsdp", "1", True),
                                                          ("fsdp", "2", False)])
def test_checkpoint_format_is_named_as_without_effect_unless_fsdp_runs_on_several_ranks(parallel, world_size, named,
                                                                                        capsys, monkeypatch):
    """DDP and one process write full checkpoints whatever --checkpoint-format says."""
    monkeypatch.setenv("WORLD_SIZE", world_size)
    args = cli.build_parser().parse_args(["--config", "tiny", "--parallel", parallel, "--checkpoint-format", "full"])
    cli._warn_ignored_options(args, cli.config_from_args(args))
    noted = "smet-train: --checkpoint-format has no effect without --parallel fsdp on several ranks" in \
        capsys.readouterr().err
    assert noted == named


def test_a_refused_run_shows_its_error_alone_without_the_notes_a_run_would_have_printed(capsys):
    """--max-steps 1 is shorter than --update-interval: a run would say so, but this one is refused first."""
    error = usage_error(cli.main, ["--config", "tiny", "--max-steps", "1", "--data", "/nonexistent/corpus.txt"], capsys)
    assert error == ("smet-train: error: --data: data path '/nonexistent/corpus.txt' does not exist (use 'stdlib', a "
                     "file, a folder or 'hf:NAME')")


def test_a_backend_that_cannot_run_on_the_device_is_named_by_its_option(monkeypatch, capsys):
    import smet_kernels.backend

    def cannot(device, backend):
        raise ValueError(f"backend={backend!r} cannot run on device {device}: no Triton here")

    monkeypatch.setattr(smet_kernels.backend, "resolve_backend", cannot)
    error = usage_error(cli.main, ["--config", "tiny", "--backend", "triton", "--device", "cpu"], capsys)
    assert error == "smet-train: error: --backend: backend='triton' cannot run on device cpu: no Triton here"


@pytest.mark.parametrize("saved", [{"model": "huge"}, {"model": "huge", "optimizer": "smet"}, {"optimizer": "sgd"}])
def test_a_checkpoint_of_a_model_preset_or_method_this_release_lacks_is_refused_by_name_not_a_traceback(
        saved, capsys, tmp_path):
    """A newer release's checkpoint (a preset it added) stopped a resume with a KeyError traceback from the block size
    it resolved."""
    checkpoint.write_checkpoint(tmp_path, 2, {"step": 2}, TrainConfig(**saved))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--resume", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    option = "--config" if "model" in saved else "--optimizer"
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith(f"smet-train: error: {option} must be one")
