"""Resumable long-format CSVs and device slugs."""

import pytest

from bench.results import KERNEL_COLUMNS, KERNEL_KEY, ResultsFile, device_slug, kernels_file, slugify


def _row(**overrides):
    row = {
        "suite": "kernels", "op": "forward", "provider": "smet", "variant": "tiny:qkvo", "M": 64, "K": 64, "N": 64,
        "block_size": 32, "density": 0.5, "dtype": "fp32", "backend": "triton", "ms_p50": 1.0, "status": "ok",
    }  # fmt: skip
    return row | overrides


def test_append_and_resume(tmp_path):
    results = kernels_file(tmp_path)
    assert not results.done(_row())
    results.append(_row())
    reopened = kernels_file(tmp_path)
    assert len(reopened) == 1
    assert reopened.done(_row(density="0.50", M="64.0"))  # the same key spelled differently
    assert not reopened.done(_row(density=0.25))
    text = (tmp_path / "kernels.csv").read_text().splitlines()
    assert text[0].split(",") == KERNEL_COLUMNS and len(text) == 2


def test_schema_mismatch_and_unknown_columns(tmp_path):
    (tmp_path / "kernels.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="columns"):
        kernels_file(tmp_path)
    results = ResultsFile(tmp_path / "other.csv", KERNEL_COLUMNS, KERNEL_KEY)
    with pytest.raises(ValueError, match="not in the schema"):
        results.append(_row(bogus=1))
    with pytest.raises(ValueError, match="key columns"):
        ResultsFile(tmp_path / "x.csv", ["op"], ["op", "provider"])


def test_slugs():
    assert slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert device_slug("cpu").startswith("cpu-")
