"""``smet-train``: command-line front end of :func:`smet_kernels.train.loop.train` (also
:func:`smet_kernels.train.trainer.train`).

Bad arguments, unusable data and bad configurations end with exit code 2: after argparse's usage text, or (found
after parsing) with one line ``smet-train: error: ...``; a run that meets a non-finite loss or gradient norm it may
not skip ends with one line and exit code 1 (its metrics flushed, no checkpoint of the non-finite state).
``--resume DIR`` continues the run saved in ``DIR`` (an out-dir or one checkpoint folder) with its saved
configuration; options given next to it override that configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Callable, NoReturn

from ..layout import SUPPORTED_BLOCK_SIZES
from ..optim.galore import GALORE_DEFAULT_RANK
from ..distribution import DISTRIBUTIONS
from ..reference.adamw import WARMUP_MODES
from ..topology import REGROW_INITS, REGROW_MODES
from .checkpoint import (
    CheckpointWarning,
    load_checkpoint_config,
    refuse_fixed_changes,
    saved_block_size,
    saved_defaults,
)
from .config import (
    CHECKPOINT_FORMATS,
    NONFINITE_ACTIONS,
    OPTIMIZERS,
    PARALLEL_MODES,
    PRECISIONS,
    WARMUP_SCOPES,
    ConfigError,
    TrainConfig,
    interval,
    last_update_step,
    naming_options,
)
from .data import DataWarning
from .distributed import TrainingFailed
from .loop import train, update_probe_runs
from .methods import METHODS, PROBE_SCHEDULE_OPTIONS
from .metrics import MetricsWarning, strict_json
from .model import MODEL_CONFIGS
from .tokenizer import DEFAULT_BPE_VOCAB

DEFAULTS = TrainConfig()
LIBRARY_PREFIXES = ("smet_kernels: ", "sparsify: ", "SMET: ")  # how the library's own warnings begin


def int_at_least(minimum: int):
    """argparse type: an int >= ``minimum`` (a bad value is named in the usage error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def float_in(low: float, high: float, low_open: bool = False, high_open: bool = False):
    """argparse type: a finite float in the interval from ``low`` to ``high``, each end open where asked."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if not (low <= value <= high) or (low_open and value == low) or (high_open and value == high):
            raise argparse.ArgumentTypeError(f"must be in {interval(low, high, low_open, high_open)}, got {text}")
        return value

    return parse


def add_topology_arguments(group, default: Callable[[str], str]) -> None:
    """The topology schedule and SMETAdamW per-block warm-up options of smet-train, also those of the stability
    study's ``run`` (one definition: the same names, checks and help); ``default(field)`` is a help's closing
    ``(default: ...)`` for the :class:`TrainConfig` field behind the option."""
    inf = float("inf")
    group.add_argument("--update-interval", type=int_at_least(1),
                       help=f"optimizer steps between topology updates {default('update_interval')}")
    group.add_argument("--prune-fraction", type=float_in(0.0, 1.0, True, True),
                       help=f"initial fraction of active blocks swapped per update, cosine-decayed "
                       f"{default('prune_fraction')}")
    group.add_argument("--min-prune-fraction", type=float_in(0.0, 1.0),
                       help="the fraction the cosine decay of --prune-fraction ends at, at --update-end-step; at most "
                       f"--prune-fraction {default('min_prune_fraction')}")
    group.add_argument("--update-end-step", type=int_at_least(1),
                       help="last optimizer step with a topology update; the prune fraction decays over steps 0 to it "
                       f"{default('update_end_step')}")
    group.add_argument("--regrow", choices=REGROW_MODES,
                       help=f"regrow criterion: random (SET) or gradient (RigL) {default('regrow')}")
    group.add_argument("--regrow-init", choices=REGROW_INITS,
                       help="values of a regrown block: zeros, or normal (drawn from N(0, --regrow-init-std²) with the "
                       f"topology's seeded generator); its Adam moments and step start at 0 {default('regrow_init')}")
    group.add_argument("--regrow-init-std", type=float_in(0.0, inf, True),
                       help=f"standard deviation of --regrow-init normal {default('regrow_init_std')}")
    group.add_argument("--distribution", choices=DISTRIBUTIONS,
                       help=f"per-layer density distribution of the sparse hidden linears {default('distribution')}")
    group.add_argument("--optimizer-warmup-steps", type=int_at_least(1),
                       help=f"SMETAdamW per-block warm-up length in local steps {default('optimizer_warmup_steps')}")
    group.add_argument("--warmup-scope", choices=WARMUP_SCOPES,
                       help="which parameters SMETAdamW warms up: all (embeddings, norms and head by their own step "
                       "count too, as the authors' released code) or regrown (sparse values only) "
                       f"{default('warmup_scope')}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smet-train",
        description="Train a small LLaMA with SMET dynamic block-sparse training or a baseline optimizer; "
        "writes metrics.jsonl, summary.json and checkpoints to --out-dir.",
        argument_default=argparse.SUPPRESS,
    )
    d = DEFAULTS
    inf = float("inf")
    model = parser.add_argument_group("model and method")
    model.add_argument("--config", dest="model", choices=list(MODEL_CONFIGS),
                       help=f"LLaMA size preset (default: {d.model})")
    model.add_argument("--optimizer", choices=OPTIMIZERS,
                       help="adamw: dense; galore: dense + GaLore projection; smet: compact block-sparse SMET "
                       "(warm-up + density-aware LR); masked-dst: dense weights x mask + AdamW; naive-dst: compact "
                       "storage + plain Adam (cold start: global bias correction, no warm-up, alpha 0); ablations: "
                       "warmup-only (SMET with alpha 0), density-lr-only (naive-dst with alpha 1) "
                       f"(default: {d.optimizer})")
    model.add_argument("--density", type=float_in(0.0, 1.0, low_open=True),
                       help=f"global density of the hidden linear layers in (0, 1] (default: {d.density})")
    model.add_argument("--block-size", type=int, choices=SUPPORTED_BLOCK_SIZES,
                       help="block size b of the b x b blocks (default: the largest with >= 4 blocks per hidden row "
                       "for which the first topology update moves at least one block of a hidden x hidden layer)")
    model.add_argument("--supar", action="store_true",
                       help="SuPar: scale hidden init variance and Adam LR by 1/(width mult x density mult) "
                       "(default: off)")
    model.add_argument("--supar-base-width", type=int_at_least(1),
                       help=f"SuPar base width: width mult = hidden size / base width (default: {d.supar_base_width})")
    smet = parser.add_argument_group("SMET topology and optimizer")
    topology_defaults = {"update_end_step": "--max-steps, the whole run", "regrow_init_std":
                         f"{d.regrow_init_std}, the model presets' init std before any --supar scaling"}
    add_topology_arguments(smet, lambda name: f"(default: {topology_defaults.get(name, getattr(d, name))})")
    smet.add_argument("--warmup-mode", choices=WARMUP_MODES,
                      help=f"per-block optimizer warm-up of SMETAdamW (default: {d.warmup_mode})")
    smet.add_argument("--density-lr-exponent", type=float_in(0.0, inf),
                      help="alpha of the density-aware LR lr x density^-alpha, 0 disables (default: 1 for smet and "
                      "density-lr-only, 0 for naive-dst; warmup-only is always 0)")
    galore = parser.add_argument_group("GaLore")
    galore.add_argument("--galore-rank", type=int_at_least(1),
                        help="projection rank (default: per model size, "
                        f"{', '.join(f'{rank} for {name}' for name, rank in GALORE_DEFAULT_RANK.items())}; "
                        "the GaLore paper's from 60m to 1b)")
    galore.add_argument("--galore-update-gap", type=int_at_least(1),
                        help=f"steps between projection refreshes (default: {d.galore_update_gap})")
    galore.add_argument("--galore-scale", type=float_in(0.0, inf, low_open=True),
                        help=f"scale of the projected-back update (default: {d.galore_scale})")
    opt = parser.add_argument_group("optimization")
    opt.add_argument("--lr", type=float_in(0.0, inf, low_open=True),
                     help=f"peak learning rate; cosine decay to 10%% at --max-steps (default: {d.lr})")
    opt.add_argument("--lr-warmup-steps", type=int_at_least(0),
                     help=f"linear LR warm-up steps (default: {d.lr_warmup_steps})")
    opt.add_argument("--weight-decay", type=float_in(0.0, inf),
                     help=f"decoupled weight decay (default: {d.weight_decay})")
    opt.add_argument("--precision", choices=PRECISIONS,
                     help="fp32; bf16-autocast (fp32 weights, bf16 matmuls); bf16 (bf16 weights, fp32 optimizer "
                     f"states for SMET) (default: {d.precision})")
    opt.add_argument("--activation-checkpointing", action="store_true",
                     help="recompute each decoder layer in backward (non-reentrant torch.utils.checkpoint): only the "
                     "layer inputs stay saved, activation memory falls by about the layer count, a step costs about "
                     "one more forward; the same losses (default: off)")
    opt.add_argument("--batch-size", type=int_at_least(1),
                     help=f"global batch in sequences per optimizer step, split over --grad-accum micro-steps and "
                     f"the data-parallel ranks (default: {d.batch_size})")
    opt.add_argument("--seq-len", type=int_at_least(1), help=f"tokens per sequence (default: {d.seq_len})")
    opt.add_argument("--grad-accum", type=int_at_least(1),
                     help=f"micro-steps per optimizer step (default: {d.grad_accum})")
    opt.add_argument("--grad-clip", type=float_in(0.0, inf),
                     help=f"max global gradient norm, 0 disables (default: {d.grad_clip})")
    opt.add_argument("--on-nonfinite", choices=NONFINITE_ACTIONS,
                     help="a step whose loss or global gradient norm is NaN/Inf: stop (one-line error, exit 1, "
                     "metrics flushed, no checkpoint of that state) or skip it (no update; the batch is consumed; "
                     f"counted as nonfinite_skips in summary.json) (default: {d.on_nonfinite})")
    opt.add_argument("--max-consecutive-skips", type=int_at_least(1),
                     help="with --on-nonfinite skip: stop when a non-finite step follows this many skipped steps in a "
                     f"row (default: {d.max_consecutive_skips})")
    opt.add_argument("--max-steps", type=int_at_least(1), help=f"optimizer steps to train (default: {d.max_steps})")
    opt.add_argument("--parallel", choices=PARALLEL_MODES,
                     help="multi-process mode under torchrun (ignored in one process): ddp replicates the model "
                     "(DistributedDataParallel on the compact parameters); fsdp shards it with FSDP2 (fully_shard "
                     "per decoder layer and root): weights, gradients and optimizer states (SMET per-block steps "
                     "included) are split over the ranks by value slot; checkpoints per --checkpoint-format; not "
                     f"with --optimizer galore (default: {d.parallel})")
    opt.add_argument("--seed", type=int_at_least(0), help=f"seed of init, topology and data order (default: {d.seed})")
    run = parser.add_argument_group("data, evaluation and output")
    run.add_argument("--data",
                     help="'stdlib' (Python standard library sources, byte tokens), a text file, a folder of text "
                     "files (.txt, .md, .jsonl, source code, ...; others left out with a warning), a uint16 .bin "
                     "token file, or hf:NAME[:CONFIG][@REVISION] (the text column of a Hugging Face dataset, a hub "
                     "name or a local folder, downloaded once and cached; @REVISION pins a hub "
                     f"branch, tag or commit; needs the datasets package) (default: {d.data})")
    run.add_argument("--tokenizer",
                     help="byte (each byte a token, vocab 256) or bpe[:VOCAB], a byte-level BPE (Hugging Face "
                     "tokenizers) trained on the training split of a text corpus and cached with its tokens "
                     f"(VOCAB default {DEFAULT_BPE_VOCAB}); validation also reports bits per byte, comparable across "
                     f"tokenizers (default: {d.tokenizer})")
    run.add_argument("--eval-every", type=int_at_least(0),
                     help=f"validate every N steps (and at step 0 and the end), 0 disables (default: {d.eval_every})")
    run.add_argument("--eval-batches", type=int_at_least(1),
                     help=f"validation batches per evaluation (default: {d.eval_batches})")
    run.add_argument("--log-every", type=int_at_least(1),
                     help=f"write a metrics.jsonl record every N steps (default: {d.log_every})")
    run.add_argument("--spike-window", type=int_at_least(1),
                     help=f"k of the loss-spike diagnostic around topology updates (default: {d.spike_window})")
    run.add_argument("--no-update-probe", dest="update_probe", action="store_false",
                     help="do not measure prune damage, cold-start rise and first-step sizes around topology updates "
                     "(update_probe records; costs k+2 forwards of one held-out micro-batch per update) "
                     "(default: measured, but not under --parallel fsdp on several ranks)")
    run.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: auto; under torchrun cuda:LOCAL_RANK)")
    run.add_argument("--backend", choices=("auto", "triton", "reference"),
                     help="kernels: triton, the pure-PyTorch reference, or auto (default: auto)")
    run.add_argument("--compile", action="store_true",
                     help="train through torch.compile(model) (one graph with the block-sparse custom ops, under "
                     "--parallel fsdp one per part: the embedding, each decoder layer, the head; with --regrow "
                     "gradient a second one for the steps that end in an update; the first steps include "
                     "compilation; default: eager)")
    run.add_argument("--out-dir", help="output folder for metrics.jsonl, summary.json, checkpoints/; a fresh run, "
                     "or a resume into a folder other than its own run's, refuses a folder holding a good checkpoint "
                     "of another run (--resume it, or pick another folder) (default: runs/CONFIG-OPTIMIZER; with "
                     "--resume, the run folder holding the checkpoint)")
    run.add_argument("--checkpoint-every", type=int_at_least(0),
                     help=f"checkpoint every N steps and at the end, 0 disables (default: {d.checkpoint_every})")
    run.add_argument("--checkpoint-format", choices=CHECKPOINT_FORMATS,
                     help="under --parallel fsdp: sharded (every rank writes its shards with "
                     "torch.distributed.checkpoint, resumable on any number of ranks or one process) or full (gathered "
                     "to rank 0 in the single-process format, an export); one process always writes full "
                     f"(default: {d.checkpoint_format})")
    run.add_argument("--resume", metavar="DIR",
                     help="continue from the newest checkpoint in DIR (an out-dir, its checkpoints folder or a "
                     "checkpoints/step_* folder) whose files match the sha256 checksums of its manifest.json; a newer "
                     "corrupt or unreadable one is named in a warning and passed over; a run stopped after its final "
                     "checkpoint, before summary.json, is finished (final evaluation, summary.json) (default: a fresh "
                     "run)")
    run.add_argument("--no-progress", dest="progress", action="store_false",
                     help="hide the progress bar (default: shown)")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A :class:`TrainConfig` from parsed arguments (on ``--resume``, the saved config plus given options)."""
    given = vars(args)
    if "resume" in given:
        if not os.path.exists(given["resume"]):
            raise ConfigError(f"--resume {given['resume']!r} does not exist")
        refuse_fixed_changes(given["resume"], given)  # before load_checkpoint_config hashes the checkpoint
        try:
            saved = load_checkpoint_config(given["resume"])
        except ConfigError as error:  # no checkpoint there, or none that verifies: name the option
            raise ConfigError(f"--resume: {error}") from None
        values = saved.to_dict()
        values.update({k: v for k, v in given.items() if k != "resume"})
        # by default it follows --prune-fraction: the run keeps its own (None: a dense method, or a model preset or
        # method this release lacks, which the run's checks refuse by name)
        block_size = saved_block_size(saved.to_dict())
        if block_size is not None and TrainConfig.from_dict(values).resolved_block_size() != block_size:
            values["block_size"] = block_size
    else:
        values = dataclasses.asdict(TrainConfig())  # unresolved: α follows the chosen optimizer
        values.update(given)
        values["out_dir"] = values["out_dir"] or f"runs/{values['model']}-{values['optimizer']}"
    return TrainConfig.from_dict(values)


def _warn_ignored_options(args: argparse.Namespace, config: TrainConfig) -> None:
    """Options that have no effect in the chosen mode are named on stderr (the run still starts)."""
    given = vars(args)
    ignored = [name for name in METHODS[config.optimizer].ignored_options if name in given]
    if update_probe_runs(config, int(os.environ.get("WORLD_SIZE", "1"))):
        ignored = [name for name in ignored if name not in PROBE_SCHEDULE_OPTIONS]
    if ignored:
        flags = ", ".join("--" + name.replace("_", "-") for name in ignored)
        print(f"smet-train: {flags} ha{'s' if len(ignored) == 1 else 've'} no effect with --optimizer "
              f"{config.optimizer}", file=sys.stderr)
    if "checkpoint_format" in given and (config.parallel != "fsdp" or int(os.environ.get("WORLD_SIZE", "1")) <= 1):
        print("smet-train: --checkpoint-format has no effect without --parallel fsdp on several ranks (checkpoints "
              "are written full)", file=sys.stderr)
    if config.on_nonfinite == "stop" and "max_consecutive_skips" in given:
        print("smet-train: --max-consecutive-skips has no effect with --on-nonfinite stop", file=sys.stderr)
    last = last_update_step(config.update_end_step, config.max_steps)
    if METHODS[config.optimizer].sparse and config.update_interval > last:
        limit = "--max-steps" if last == config.max_steps else "--update-end-step"
        print(f"smet-train: no topology update in this run: --update-interval {config.update_interval} is past "
              f"{limit} {last}; the topology stays as {'the checkpoint has it' if config.resume else 'initialised'}",
              file=sys.stderr)
    hidden = MODEL_CONFIGS[config.model].hidden_size  # the largest smaller side of a projected layer
    if METHODS[config.optimizer].optimizer == "galore" and (config.galore_rank or 0) >= hidden:
        print(f"smet-train: --galore-rank {config.galore_rank} is at least every hidden layer's smaller side (the "
              f"hidden size {hidden} of --config {config.model}): GaLore projects nothing, its moments are full size",
              file=sys.stderr)
    if config.regrow_init == "zeros" and "regrow_init_std" in given and "regrow_init_std" not in ignored:
        print("smet-train: --regrow-init-std has no effect with --regrow-init zeros", file=sys.stderr)


_UNNOTED_ON_RESUME = ("resume", "out_dir", "progress", "max_steps")  # where it goes, how it shows, how long it runs


def _note_resume_changes(args: argparse.Namespace, config: TrainConfig, options: dict[str, str]) -> None:
    """A resume's given options that differ from its checkpoint's run are named (``options``: dest -> flag) on
    stderr, old -> new: they act from here on (``--precision bf16`` rounds the saved fp32 weights)."""
    if not config.resume:
        return
    saved = json.loads((Path(config.resume) / "config.json").read_text())  # the checkpoint verified by the setup
    saved.update(saved_defaults(saved))  # a default block size or GaLore rank as the run resolved it
    changed = []
    for name, value in vars(args).items():
        before = saved.get(name, value)
        if name not in _UNNOTED_ON_RESUME and before != (list(value) if isinstance(value, tuple) else value):
            flag = options.get(name, name)
            if flag.startswith("--no-"):  # the flag's own state: --no-update-probe False -> True, not the field's
                before, value = not before, not value
            changed.append(f"{flag} {before} -> {value}")
    rounded = config.precision == "bf16" and saved.get("precision", "fp32") != "bf16"
    if changed:
        print(f"smet-train: resumed with settings changed from its run (they act from here on): {', '.join(changed)}"
              + ("; the fp32 weights are rounded to bf16" if rounded else ""), file=sys.stderr)
    windows = saved.get("eval_batches", config.eval_batches)
    if windows != config.eval_batches and saved.get("eval_every", 0) > 0 and config.eval_every > 0:
        print(f"smet-train: --eval-batches {windows} -> {config.eval_batches}: summary.json's initial_val_loss stays "
              f"the step-0 loss over {windows} batches, so it no longer compares with the final one", file=sys.stderr)
    steps = saved.get("max_steps", config.max_steps)
    if steps != config.max_steps:  # extending a run: its schedules are laid over the new length, not continued
        old_end, new_end = (last_update_step(saved.get("update_end_step"), n) for n in (steps, config.max_steps))
        updates = (f", and topology updates run to step {new_end}, not {old_end}"
                   if METHODS[config.optimizer].sparse and new_end != old_end else "")
        print(f"smet-train: --max-steps {steps} -> {config.max_steps}: from here on the learning rate follows the "
              f"cosine decay laid over the new length (to step {config.max_steps}, not {steps}){updates}",
              file=sys.stderr)


@contextlib.contextmanager
def one_line_warnings(prog: str, categories: tuple[type[Warning], ...] = ()):
    """Within it, a warning of this library (a skipped checkpoint or metrics line, data left out or evaluated twice,
    one that begins with a :data:`LIBRARY_PREFIXES` name: the CPU fallback, sparsify's density, ...) or of the
    command's own ``categories`` prints as one line ``<prog>: warning: ...``, like a command's errors; others
    (torch's, ...) keep Python's format."""
    categories = (CheckpointWarning, MetricsWarning, DataWarning, *categories)
    with warnings.catch_warnings():
        for category in categories:
            warnings.simplefilter("always", category)
        library_format = warnings.showwarning

        def show(message, category, *rest, **options):
            if issubclass(category, categories) or str(message).startswith(LIBRARY_PREFIXES):
                print(f"{prog}: warning: {str(message).removeprefix('smet_kernels: ')}", file=sys.stderr)
            else:
                library_format(message, category, *rest, **options)

        warnings.showwarning = show
        yield


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with one_line_warnings(parser.prog):
        return _run(parser, args)


def end_interrupted(message: str) -> NoReturn:
    """After a Ctrl-C: ``message`` (one line, instead of a traceback from inside a step), then the end by SIGINT
    that Python gives an uncaught KeyboardInterrupt, so that a shell loop around the command stops too."""
    print(message, file=sys.stderr, flush=True)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
    sys.exit(130)  # 128 + SIGINT, where the signal did not end the process


def console_main() -> NoReturn:
    """The ``smet-train`` command: :func:`main`, with a Ctrl-C ended by :func:`end_interrupted`."""
    try:
        code = main()
    except KeyboardInterrupt:
        end_interrupted("smet-train: interrupted; the checkpoints written so far are kept: continue with --resume "
                        "and the run's --out-dir")
    sys.exit(code)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    options = {action.dest: action.option_strings[0] for action in parser._actions if action.option_strings}
    try:
        with naming_options(options):  # errors name --batch-size, --config, ..., not the config fields
            config = config_from_args(args)

            def notes() -> None:  # once the run is set up: a refused run shows its error alone
                _warn_ignored_options(args, config)
                _note_resume_changes(args, config, options)

            summary = train(config, on_ready=notes if os.environ.get("RANK", "0") == "0" else None)  # rank 0 only
    except ConfigError as error:  # one line: the usage that parser.error would print first says nothing of it
        parser.exit(2, f"{parser.prog}: error: {' '.join(str(error).split())}\n")
    except TrainingFailed as error:  # a diverged run, a checkpoint that could not be written, another rank's failure
        parser.exit(1, f"{parser.prog}: error: {' '.join(str(error).split())}\n")
    if summary["rank"] == 0:
        keys = ("steps", "initial_val_loss", "final_val_loss", "final_val_bpb", "tokens_per_s", "steady_tokens_per_s",
                "peak_mem_bytes")
        brief = {k: summary[k] for k in keys}
        brief["loss_spikes"] = summary["loss_spikes"]
        print(strict_json(brief))
    return 0


if __name__ == "__main__":
    console_main()
