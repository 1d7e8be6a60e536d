"""``smet-train`` on a full disk for ``state.pt``: its ``torch.save`` (rank 0 writes it in every checkpoint) writes to
``/dev/full``, where every write fails with ENOSPC as on a full disk -- tests may run as root, whom an unwritable
folder does not stop. ``torch.save`` reports that failure as a ``RuntimeError`` of its zip writer, not an
``OSError``. Run by ``tests/test_train_ddp.py`` through ``torchrun_launch.launch``; ``tests/test_train_faults.py``
patches :func:`save_on_a_full_disk` in."""

import sys
from pathlib import Path

import torch

save = torch.save


def save_on_a_full_disk(value, target, *args, **kwargs):
    """``torch.save``, with ``state.pt`` written to ``/dev/full``."""
    save(value, Path("/dev/full") if isinstance(target, Path) and target.name == "state.pt" else target, *args,
         **kwargs)


if __name__ == "__main__":
    from smet_kernels.train import cli

    torch.save = save_on_a_full_disk
    sys.exit(cli.main())
