"""``smet-train`` on a full disk for ``state.pt``: its ``torch.save`` (rank 0 writes it in every checkpoint) fails with
ENOSPC -- tests may run as root, whom an unwritable folder does not stop. Run by ``tests/test_train_ddp.py`` through
``torchrun_launch.launch``."""

import errno
import os
import sys
from pathlib import Path

import torch

from smet_kernels.train import cli

save = torch.save


def no_space_for_state(value, target, *args, **kwargs):
    if isinstance(target, Path) and target.name == "state.pt":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    save(value, target, *args, **kwargs)


torch.save = no_space_for_state
sys.exit(cli.main())
