"""``stability.md``: setup, findings, tables and plots of a study, rendered from its finished runs."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

from ..markdown import table
from .findings import findings
from .load import load_study
from .plots import plot_spike_profile, plot_val_curves
from .spec import COMMANDS_FILE, PRESETS, REPORT_FILE, RUNS_DIR, TRAINER_SETTINGS
from .stats import _in_study_order, missing, probe_events, probe_table, quality_table, spike_events, spike_table
from .sweep import GZIP_ABOVE_BYTES, OLDER_RELEASES

PILOT_BELOW_STEPS = 1000  # shorter CPU runs are a tooling pilot: no evidence either way


def _display(rows, columns: dict[str, str], floats: dict[str, str]):
    frame = rows.copy()
    for column in ("density", "alpha"):
        if column in frame:
            frame[column] = frame[column].map(lambda v: "-" if missing(v) else f"{v:g}")
    for column, spec in floats.items():
        frame[column] = frame[column].map(lambda v: "n/a" if missing(v) else format(v, spec))
    return table(frame[list(columns)].rename(columns=columns))


def _threshold(config: str, value: float) -> str:
    """One config's dense noise threshold in the spike table's legend."""
    return f"{config}: none (fewer than two dense rises)" if math.isnan(value) else f"{config}: {value:.4f}"


def _commands(out_dir: Path) -> list[str]:
    path = out_dir / COMMANDS_FILE
    commands = [line.split(" ", 1)[1] for line in path.read_text().splitlines() if " " in line] if path.exists() else []
    return list(dict.fromkeys(commands))  # each distinct command once, in first-use order


def write_report(out_dir, output: str | Path | None = None) -> Path:
    """Render ``stability.md`` (and the PNGs next to it) from the finished runs in ``out_dir``."""
    out_dir = Path(out_dir)
    data = load_study(out_dir)
    if not len(data.runs):
        raise ValueError(f"no finished runs under {out_dir / RUNS_DIR}; run `smet-bench stability run` first")
    output = Path(output) if output else out_dir / REPORT_FILE
    output.parent.mkdir(parents=True, exist_ok=True)
    events = spike_events(data)
    spikes, thresholds = spike_table(data, events)
    quality = quality_table(data)
    probes = probe_table(data)
    runs = data.runs
    devices = sorted(set(runs["device"]))
    cpu = any(d.startswith("cpu") for d in devices)
    lines = ["# Stability study: loss spikes after topology updates, quality vs dense", ""]
    first = OLDER_RELEASES | json.loads((out_dir / runs.iloc[0]["path"] / "summary.json").read_text())["config"]
    pilot = cpu and first["max_steps"] < PILOT_BELOW_STEPS
    if pilot:
        lines += ["> **CPU pilot, not the H100 study.** Tiny models and short runs on a CPU: these numbers show that "
                  "the tooling works end to end; they are no evidence for or against the method's claims.", ""]
    elif cpu:
        lines += [f"> **CPU study at small scale** ({', '.join(sorted(set(runs['config'])))}; "
                  f"{first['max_steps']} steps of {first['batch_size']} × {first['seq_len']} tokens). Verdicts below "
                  "hold for these models and budgets only; where a claim does not reproduce here, it is said so, and "
                  "the GPU command at the end runs the same sweep at 20m/60m.", ""]
    lines += [
        "## Setup", "",
        f"- runs: {len(runs)} finished ({', '.join(f'{c}: {n}' for c, n in runs.groupby('config').size().items())})"
        + (f"; unfinished: {', '.join(data.unfinished)}" if data.unfinished else ""),
        f"- devices: {', '.join(devices)}; backend {first['backend']}, precision {first['precision']}, data "
        f"`{first['data']}`",
        f"- tokens per run: {', '.join(f'{c}: {t:,}' for c, t in runs.groupby('config')['tokens'].max().items())} "
        f"(steps × batch × seq = {first['max_steps']} × {first['batch_size']} × {first['seq_len']}); "
        + ("every run of a config has the same token budget" if runs.groupby("config")["tokens"].nunique().max() == 1
           else "**token budgets differ between runs of a config**"),
        f"- seeds: {sorted(set(runs['seed']))}; same seeds, data order and budget for every method",
        f"- topology: update every {first['update_interval']} steps up to step "
        f"{first['update_end_step'] or first['max_steps']}, prune fraction {first['prune_fraction']} cosine-decayed to "
        f"{first['min_prune_fraction']}, regrow {first['regrow']} (regrown blocks start at "
        + ("zero" if first["regrow_init"] == "zeros" else f"N(0, {first['regrow_init_std']:g}²)")
        + f"), {first['distribution']} density distribution, block size "
        f"{', '.join(f'{c}: {b:g}' for c, b in runs.groupby('config')['block_size'].max().dropna().items())}",
        f"- optimizer: lr {first['lr']} (linear warm-up {first['lr_warmup_steps']} steps, cosine to 10%), "
        f"SMETAdamW per-block warm-up {first['optimizer_warmup_steps']} steps, spike window k = "
        f"{first['spike_window']}",
        "- methods: `adamw` dense; `galore` GaLore-style; `masked-dst` dense weights × mask + AdamW; `naive-dst` "
        "the paper's naive DST (plain Adam on compact storage: global bias correction, moments reset on regrow, no "
        "warm-up, α = 0); ablations `warmup-only` (SMET with α = 0) and `density-lr-only` (naive DST with α > 0); "
        "`smet-linear` / `smet-momentum_ramp` SMETAdamW with per-block warm-up; α = density-LR exponent "
        f"(lr × d^−α); SMETAdamW warm-up scope `{first.get('warmup_scope', 'regrown')}`",
        "",
        "## Reproduce", "",
        "```bash",
        *(_commands(out_dir) or [f"smet-bench stability run --out-dir {out_dir}"]),
        f"smet-bench stability report --out-dir {out_dir}",
        "```", "",
        "## What was measured (no verdict)" if pilot else "## What holds and what does not", "",
        *findings(data, events, quality, probes, probe_events(data), pilot), "",
    ]
    for config in _in_study_order(runs)["config"].unique():
        curve = plot_val_curves(data, config, output.parent / f"stability_val_loss_{config}.png")
        lines += [f"## {config}: validation loss", "", f"![validation loss {config}]({curve.name})", ""]
        profile = plot_spike_profile(data, events, config, output.parent / f"stability_spikes_{config}.png")
        if profile is not None:
            lines += [f"![spike profile {config}]({profile.name})", ""]
    lines += [
        "## Loss spikes per topology update", "",
        f"`updates` = measured updates that moved ≥ 1 block / all topology updates (the last one, at the final "
        f"step, has no steps after it; for adamw/galore: the same steps, as a control). "
        f"`rise` = max loss over the k steps after an update − mean loss over the k steps up to it; "
        f"`excess` = rise − rise of the dense run at the same step and seed: the mean over seeds of their mean "
        f"excesses, ± 1 SE over them. `spikes` = updates with rise above the dense noise threshold (mean + 2 sd "
        f"of the dense rises: "
        f"{', '.join(_threshold(config, value) for config, value in thresholds.items())}).", "",
        _display(spikes, {"config": "config", "method": "method", "density": "density", "alpha": "α",
                          "runs": "runs", "updates": "updates", "spikes": "spikes", "mean_rise": "mean rise",
                          "max_rise": "max rise", "mean_rel_rise": "mean rel. rise", "mean_excess": "mean excess",
                          "excess_se": "± SE"},
                 {"mean_rise": ".4f", "max_rise": ".4f", "mean_rel_rise": ".2%", "mean_excess": "+.4f",
                  "excess_se": ".4f"}) if len(spikes) else "(no topology updates)", "",
        *_probe_section(probes),
        "## Final validation loss and perplexity at equal tokens", "",
        "`vs dense` = final validation loss − dense (same config and seed; ± 1 SE over seeds).", "",
        _display(quality, {"config": "config", "method": "method", "density": "density", "alpha": "α",
                           "seeds": "seeds", "tokens": "tokens", "val_loss": "val loss", "val_loss_sd": "sd",
                           "vs_dense": "vs dense", "vs_dense_se": "± SE", "ppl": "ppl",
                           "ppl_vs_dense": "ppl / dense"},
                 {"val_loss": ".4f", "val_loss_sd": ".4f", "vs_dense": "+.4f", "vs_dense_se": ".4f", "ppl": ".2f",
                  "ppl_vs_dense": ".3f"}), "",
        "## Peak memory and throughput per run", "",
        "CUDA: `torch.cuda.max_memory_allocated`; CPU: peak resident set size of the run's own process (includes "
        "the Python runtime, so differences between methods are hidden at this size).", "",
    ]
    memory = _in_study_order(runs, extra=("seed",))
    memory = memory.assign(peak_mib=memory["peak_mem_bytes"] / 2**20)
    lines += [_display(memory, {"config": "config", "method": "method", "density": "density", "alpha": "α",
                                "seed": "seed", "num_parameters": "parameters", "peak_mib": "peak MiB",
                                "peak_mem_kind": "measured as", "tokens_per_s": "tokens/s", "path": "raw data"},
                       {"peak_mib": ".1f", "tokens_per_s": ",.0f"}), ""]
    lines += ["## Raw data", "",
              f"`{RUNS_DIR}/<config>/<run>/`: `summary.json` (trainer summary with the full config) and "
              "`metrics.jsonl` "
              f"(gzipped as `metrics.jsonl.gz` above {GZIP_ABOVE_BYTES // 1024} KiB): per-step `train` records, "
              "`val_loss` on eval steps, `topology_update`, `loss_spike` and `update_probe` records (see "
              "smet_kernels/train/loop.py and probe.py).",
              ""]
    lines += gpu_section(out_dir)
    output.write_text("\n".join(lines))
    return output


def _probe_section(probes) -> list[str]:
    if not len(probes):
        return []
    return [
        "## Prune damage, cold start and first steps (update probe)", "",
        "On one fixed held-out batch: `damage` = loss right after an update − right before it (no optimizer step "
        "between); `cold start` = max loss over the next k steps − loss right after the update. First step after an "
        "update, over all sparse layers: update RMS of regrown and surviving weights, their ratio (step 1 and mean "
        "over the window), and ||Δw||/||w|| of the surviving weights. `updates` = updates probed (`damage` is their "
        "mean), `after` = those of them with steps after them (the last update, at the final step, has none): the "
        "cold-start and first-step columns are means over these, over all seeds; dense/GaLore rows are the same "
        "measurement at the same steps without an update (the control).", "",
        _display(probes, {"config": "config", "method": "method", "density": "density", "alpha": "α", "seeds": "seeds",
                          "updates": "updates", "with_steps_after": "after", "prune_damage": "damage",
                          "cold_start_rise": "cold start",
                          "regrown_rms_1": "regrown RMS", "surviving_rms_1": "surviving RMS",
                          "regrown_vs_surviving_1": "ratio, step 1", "regrown_vs_surviving_mean": "ratio, window",
                          "surviving_relative_1": "surviving ‖Δw‖/‖w‖"},
                 {"prune_damage": "+.4f", "cold_start_rise": "+.4f", "regrown_rms_1": ".2e", "surviving_rms_1": ".2e",
                  "regrown_vs_surviving_1": ".2f", "regrown_vs_surviving_mean": ".2f", "surviving_relative_1": ".2e"}),
        "",
    ]


def _number(value) -> str:
    """``value`` as an option gives it: ``1`` for 1.0, every digit of 0.1234567 (``:g`` keeps six)."""
    return f"{value:g}" if float(f"{value:g}") == value else repr(value)


def gpu_command(spec: dict, out_dir: str = "reports/stability-gpu") -> str:
    """The same sweep (methods, densities, α, seeds, steps, topology settings) for 20m and 60m on a GPU, with the
    H100 preset's batch, sequence length, backend and device."""
    h100 = PRESETS["h100"]
    alphas = sorted(set(spec["alphas"]) | set(h100.alphas))
    options = [("--configs", "20m,60m"), ("--methods", ",".join(spec["methods"])),
               ("--densities", ",".join(map(_number, spec["densities"]))),
               ("--alphas", ",".join(map(_number, alphas))),
               ("--seeds", ",".join(str(s) for s in spec["seeds"])), ("--steps", str(max(spec["steps"], h100.steps))),
               ("--update-interval", str(spec["update_interval"])), ("--spike-window", str(spec["spike_window"])),
               ("--optimizer-warmup-steps", str(spec["optimizer_warmup_steps"])), ("--device", "cuda"),
               ("--backend", "auto"), ("--out-dir", out_dir)]
    options += [("--" + name.replace("_", "-"),
                 _number(spec[name]) if isinstance(spec[name], float) else str(spec[name]))
                for name in TRAINER_SETTINGS if spec.get(name, getattr(h100, name)) != getattr(h100, name)]
    return "smet-bench stability run " + " ".join(f"{flag} {shlex.quote(value)}" for flag, value in options)


def read_study(path: Path) -> dict:
    """The settings a study saved in ``path`` (``study.json``); ``ValueError`` naming the file when it is not one
    (cut short by a release that wrote it in place, or edited): json's own error named no file, or was a traceback."""
    try:
        saved = json.loads(Path(path).read_text())
    except ValueError as error:  # not JSON, or not text
        saved = error
    if not isinstance(saved, dict):
        raise ValueError(f"{path} is not a study's settings ({saved}): delete it; the next `stability run` writes it "
                         "again")
    return saved


def gpu_section(out_dir: Path) -> list[str]:
    """The GPU command of this sweep, when the study saved its settings (``study.json``)."""
    path = Path(out_dir) / "study.json"
    if not path.is_file():
        return []
    command = gpu_command(read_study(path))
    return ["## The same sweep on the GPU (20m, 60m)", "",
            "Batch, sequence length and token budget of the H100 preset (≥ 50M tokens per 20m run), the α grid "
            "completed to 0, 0.5, 1; resumable like this one:", "", "```bash", command,
            "smet-bench stability report --out-dir reports/stability-gpu", "```", ""]
