"""Launch ``smet-train`` as ``torchrun --nproc-per-node N`` would (one process per rank, gloo on CPU); read metrics."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(out_dir: Path, world_size: int, cache_dir: Path, args: list[str]) -> None:
    """Run ``smet-train ARGS --out-dir OUT_DIR`` on ``world_size`` ranks and wait; every rank must exit 0."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, SMET_CACHE_DIR=str(cache_dir), OMP_NUM_THREADS="1")
        if world_size > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                       LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        command = [sys.executable, "-m", "smet_kernels.train.cli", *args, "--out-dir", str(out_dir)]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for proc in procs:
        output, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, output


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
