"""Training-step timings under pytest-benchmark: one step per method (60m on a GPU, tiny on CPU), checked once
against the dense reference (:func:`bench.training.check_step`) before it is timed."""

import pytest
import torch

from bench.conftest import DEVICE, FULL_SIZE
from bench.training import METHODS, SPARSE_METHODS, TrainingCase, build, check_step
from smet_kernels.backend import resolve_backend
from smet_kernels.train.model import lm_loss

CONFIG = "60m" if FULL_SIZE else "tiny"
BATCH, SEQ = (16, 256) if FULL_SIZE else (2, 32)
BLOCK_SIZE = 64 if FULL_SIZE else 32
DTYPE = torch.bfloat16 if FULL_SIZE else torch.float32
DENSITY = 0.25


@pytest.mark.parametrize("method", METHODS)
def test_training_step(timed, method):
    density = DENSITY if method in SPARSE_METHODS else 1.0
    case = TrainingCase(CONFIG, method, density, BLOCK_SIZE, BATCH, SEQ, DTYPE)
    try:
        model, optimizer = build(case, DEVICE, resolve_backend(DEVICE))
    except ImportError as error:
        pytest.skip(f"method {method} unavailable: {error}")
    tokens = torch.randint(0, model.config.vocab_size, (BATCH, SEQ + 1)).to(DEVICE)
    assert check_step(model, optimizer, tokens[:, :-1], tokens[:, 1:]) == ""

    def step():
        lm_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    timed(step, config=CONFIG, method=method, density=density, tokens=BATCH * SEQ)
