"""``smet-train`` on a full disk: what it writes there goes to ``/dev/full``, where every write fails with ENOSPC as on
a full disk -- tests may run as root, whom an unwritable folder does not stop. ``FULL_DISK=state`` (the default):
``state.pt`` (rank 0 writes it in every checkpoint), whose ``torch.save`` reports the failure as a ``RuntimeError``
of its zip writer, not an ``OSError``; ``FULL_DISK=shards``: the DCP shards of rank 1 alone (``--parallel fsdp``);
``FULL_DISK=metrics``: the records of ``metrics.jsonl`` from step 2 on; ``FULL_DISK=summary``: ``summary.json``.
Run by ``tests/test_train_ddp.py`` through ``torchrun_launch.launch``; ``tests/test_train_checkpoints.py`` patches
:func:`save_on_a_full_disk` in."""

import os
import sys
from pathlib import Path

import torch

save = torch.save


def save_on_a_full_disk(value, target, *args, **kwargs):
    """``torch.save``, with ``state.pt`` written to ``/dev/full``."""
    save(value, Path("/dev/full") if isinstance(target, Path) and target.name == "state.pt" else target, *args,
         **kwargs)


def shards_of_rank_1_on_a_full_disk() -> None:
    """DCP writes the ``.distcp`` shard files of rank 1 to ``/dev/full``."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    create_stream = FileSystem.create_stream

    def create(self, path, mode):
        full = mode == "wb" and str(path).endswith(".distcp") and os.environ.get("RANK") == "1"
        return create_stream(self, Path("/dev/full") if full else path, mode)

    FileSystem.create_stream = create


def records_from_step_2_on_a_full_disk() -> None:
    """``metrics.jsonl`` fills the disk at step 2: ``MetricsLog`` writes that record and later ones through its own
    file, now on ``/dev/full``, whose flush fails and keeps the record in the buffer (closing the file fails again)."""
    from smet_kernels.train.metrics import MetricsLog

    log = MetricsLog.log

    def log_on_a_full_disk(self, record):
        if record["step"] >= 2 and self.file.name != "/dev/full":
            self.file.close()
            self.file = open("/dev/full", "w")
        return log(self, record)

    MetricsLog.log = log_on_a_full_disk


def summary_on_a_full_disk() -> None:
    """``summary.json`` (through its temporary file) is written to ``/dev/full``."""
    write_text = Path.write_text

    def write(self, text, *args, **kwargs):
        return write_text(Path("/dev/full") if self.name == "summary.json.tmp" else self, text, *args, **kwargs)

    Path.write_text = write


def state_on_a_full_disk() -> None:
    torch.save = save_on_a_full_disk


FULL_DISK = {"state": state_on_a_full_disk, "shards": shards_of_rank_1_on_a_full_disk,
             "metrics": records_from_step_2_on_a_full_disk, "summary": summary_on_a_full_disk}

if __name__ == "__main__":
    from smet_kernels.train import cli

    FULL_DISK[os.environ.get("FULL_DISK", "state")]()
    sys.exit(cli.main())
