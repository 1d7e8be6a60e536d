"""The trainer fault tests' shared pieces (tests/test_train_nonfinite.py, tests/test_train_checkpoints.py,
tests/test_train_metrics.py): their tiny run on the CPU, metrics records read as strict JSON readers (jq) read them,
and the one stderr line ``smet-train`` stops with."""

import json

import pytest

from smet_kernels.train import cli
from smet_kernels.train.trainer import TrainConfig


def tiny_config(**overrides) -> TrainConfig:
    values = dict(model="tiny", optimizer="adamw", batch_size=4, seq_len=32, max_steps=6, lr=3e-3, eval_every=0,
                  backend="reference", device="cpu", progress=False)  # CPU also beside a GPU: exact resumes
    values.update(overrides)
    return TrainConfig(**values)


def strict_records(path):
    """Parse JSON lines refusing NaN/Infinity, as strict readers (jq) do."""

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def one_line_error(capsys, argv: list[str], code: int) -> str:
    """The one stderr line ``smet-train ARGV`` stops with (exit ``code``, no traceback), without its prefix."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == code and len(err) == 1 and err[0].startswith("smet-train: error: "), err
    return err[0].removeprefix("smet-train: error: ")
