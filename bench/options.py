"""Argument types shared by the ``smet-bench`` subcommands. Importing this module imports no smet_kernels: the
CLI turns the Triton interpreter on (CPU runs) only while smet_kernels is not imported yet."""

import argparse

MAX_SEED = 2**32 - 1  # smet_kernels.train.config.MAX_SEED, the bound smet-train's --seed takes (a test pins them)


def comma_list(kind, allow_empty: bool = False, container=list):
    """argparse type: ``"a, b"`` → ``container([kind("a"), kind("b")])``. An empty item (``"a,,b"``, a trailing
    comma) is refused, and so is an empty list unless ``allow_empty``; a value ``kind`` refuses is named."""

    def parse(text: str):
        items = [item.strip() for item in text.split(",")]
        if items == [""]:
            if allow_empty:
                return container()
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        if "" in items:
            raise argparse.ArgumentTypeError(f"empty item in {text!r}")
        try:
            return container(kind(item) for item in items)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"cannot read {text!r}: {error}") from None

    return parse


def seed_int(text: str) -> int:
    """argparse type: a seed, an int in ``[0, MAX_SEED]``, as ``smet-train --seed`` takes it."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in [0, {MAX_SEED}], got {value}")
    return value
