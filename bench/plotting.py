"""Plot helpers shared by the reports: the pyplot/seaborn handles (headless, one theme) and the model-size order of
configurations on an axis."""

from __future__ import annotations

from smet_kernels.train.model import MODEL_CONFIGS

CONFIG_ORDER = tuple(MODEL_CONFIGS)  # the catalog's order: by model size


def pyplot():
    """``(matplotlib.pyplot, seaborn)`` on the headless Agg backend with the reports' theme."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    return plt, sns


def config_order(values) -> list[str]:
    present = list(dict.fromkeys(values))
    return [c for c in CONFIG_ORDER if c in present] + sorted(c for c in present if c not in CONFIG_ORDER)


def save(fig, path) -> str:
    """Lay out ``fig``, write it to ``path`` (PNG, 110 dpi), close it; returns the file name for the markdown."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name
