"""Markdown report (tabulate tables) and PNG plots (seaborn) from the benchmark CSVs.

Derived kernel columns: ``vs_dense = t / t_dense`` and ``vs_d_dense = t / (d · t_dense)`` — the second is 1 at
the physical limit of a block-sparse product (``d`` the layout's exact density, ``t_dense`` the dense baseline's
time of the same op and shape: cuBLAS on CUDA, torch's CPU matmul on a CPU), and ``vs_roofline = t / max(d · t_dense,
compulsory bytes / copy bandwidth)`` — the ceilings measured in the same run (the dense time, and the device copy
of the optimizer suite; ``profiling.roofline``): 1 = the op runs at its roofline. Memory-model error =
``(predicted − measured) / measured``. A timing whose p80 / p20 exceeds ``NOISY_SPREAD`` is marked as noise.

Modules: :mod:`.load` (CSVs, pytest-benchmark JSON), :mod:`.derive` (derived columns), :mod:`.tables` (cell
formats, notes), :mod:`.plots`, :mod:`.sections` (one function per section), :mod:`.render` (``report.md``). The
markdown-table and plot helpers are shared with the stability study and the memory report (:mod:`bench.markdown`,
:mod:`bench.plotting`).
"""

from .derive import kernel_comparison
from .load import load_csv
from .render import write_report

__all__ = ["kernel_comparison", "load_csv", "write_report"]
