"""Stability study: loss spikes after topology updates (naive DST vs SMET), quality against dense and
GaLore at equal tokens, and a density × density-LR-exponent (α) sweep.

    smet-bench stability run                                       # H100 study -> reports/stability/
    smet-bench stability run --quick                       # CPU pilot (tiny config, minutes) -> runs/stability-pilot/
    smet-bench stability run --cpu-study                   # CPU study (tiny, 3 seeds) -> reports/stability-cpu/
    smet-bench stability report --out-dir reports/stability        # stability.md + PNG plots

(``python -m bench.stability run|report ...`` is the same command.)

**Sweep.** Every run uses the trainer's Python API (:func:`smet_kernels.train.trainer.train`) with the same data,
seed list and token budget ``steps × batch_size × seq_len``; only the method, density and α differ (the topology and
warm-up settings, ``--prune-fraction`` to ``--warmup-scope``, are smet-train's, one value for the study). Methods:

* ``adamw`` (dense), ``galore``: no topology, one run per seed (α and density do not apply);
* ``masked-dst``: dense weights × mask and ``torch.optim.AdamW`` (α does not apply), one run per density;
* ``naive-dst`` (the paper's: plain Adam, α = 0), ``warmup-only`` (α = 0), ``density-lr-only`` (each α > 0),
  ``smet-linear``, ``smet-momentum_ramp`` (each α): SMETAdamW arms, one run per density (and α).

Each run writes ``runs/<config>/<method>[-d<density>][-a<alpha>]-s<seed>/`` (``metrics.jsonl[.gz]``,
``summary.json``); a folder with ``summary.json`` is finished and skipped, so rerunning the same command
resumes. A finished run, or the checkpoint of an interrupted one, whose saved configuration differs from the
requested one is an error, never silently mixed in. Each run executes in a fresh process, so the CPU peak-RSS
figure belongs to that run alone.

**Spike statistics** (the trainer's window ``k``, :mod:`smet_kernels.train.spikes`): for an update after step
``s``, ``rise = max(loss[s+1..s+k]) − mean(loss[s−k+1..s])``. Only updates that moved at least one block
count. The dense run of the same seed sees the same batches, so its rise at the same steps is the noise floor;
``excess = rise − rise_dense`` (paired by seed and step) removes batch-to-batch noise. A *spike* is an update
whose rise exceeds the noise threshold ``mean + 2·sd`` of the dense rises of that config. The trainer's update
probe (:mod:`smet_kernels.train.probe`) splits a rise into prune damage and cold-start rise on a fixed held-out
batch and sizes the first steps of regrown against surviving weights.

Modules: :mod:`.spec` (grid), :mod:`.sweep` (running), :mod:`.load` (tables), :mod:`.stats` (statistics),
:mod:`.findings` (verdicts), :mod:`.plots`, :mod:`.report` (``stability.md``), :mod:`.cli`.
"""

from .cli import add_arguments, main_from_args, spec_from_args
from .findings import findings
from .load import StudyData, load_study, read_metrics, run_from_config
from .plots import plot_spike_profile, plot_val_curves
from .report import gpu_command, write_report
from .spec import (
    ABLATION_ARMS,
    DENSE_METHOD,
    METHOD_ORDER,
    METHODS,
    PRESETS,
    Method,
    RunSpec,
    StudySpec,
    enumerate_runs,
)
from .stats import compare, noise_thresholds, probe_table, quality_table, spike_events, spike_table, t_quantile_975
from .sweep import check_runnable, is_done, run_sweep

__all__ = [
    "ABLATION_ARMS", "DENSE_METHOD", "METHODS", "METHOD_ORDER", "PRESETS", "Method", "RunSpec", "StudyData",
    "StudySpec", "add_arguments", "check_runnable", "compare", "enumerate_runs", "findings", "gpu_command",
    "is_done", "load_study", "main_from_args", "noise_thresholds", "plot_spike_profile", "plot_val_curves",
    "probe_table", "quality_table", "read_metrics", "run_from_config", "run_sweep", "spec_from_args",
    "spike_events", "spike_table", "t_quantile_975", "write_report",
]
