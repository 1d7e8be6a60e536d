"""Launch ``smet-train`` (or another program) as ``torchrun --nproc-per-node N`` would (one process per rank, gloo
on CPU); read metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from torch.distributed import TCPStore


SMET_TRAIN = ("-m", "smet_kernels.train.cli")


def launch(out_dir: Path, world_size: int, cache_dir: Path, args: list[str], program: tuple = SMET_TRAIN,
           returncode: int = 0) -> list[str]:
    """Run ``python PROGRAM ARGS --out-dir OUT_DIR`` (``smet-train`` by default) on ``world_size`` ranks and wait;
    every rank must exit with ``returncode``. Returns each rank's output (stdout and stderr).

    As torchrun's agent does, this process hosts the rendezvous store on a port the OS picks and holds for the whole
    run (``TORCHELASTIC_USE_AGENT_STORE``: every rank connects as a client), so no other process can take the port
    between choosing and binding it."""
    store = None
    if world_size > 1:
        store = TCPStore("127.0.0.1", 0, world_size, is_master=True, timeout=timedelta(seconds=240),
                         wait_for_workers=False)
    procs, outputs = [], []
    for rank in range(world_size):
        env = dict(os.environ, SMET_CACHE_DIR=str(cache_dir), OMP_NUM_THREADS="1")
        if store is not None:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                       LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port),
                       TORCHELASTIC_USE_AGENT_STORE="True")
        command = [sys.executable, *program, *args, "--out-dir", str(out_dir)]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        for proc in procs:
            output, _ = proc.communicate(timeout=240)
            assert proc.returncode == returncode, output
            outputs.append(output)
    finally:
        for proc in procs:
            proc.kill()
        del store
    return outputs


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
