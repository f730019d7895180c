"""Small helpers shared by the project's command-line scripts (examples, benchmarks)."""

from __future__ import annotations

import argparse

__all__ = ["int_list"]


def int_list(text: str) -> list[int]:
    """``"512, 1024,2048"`` -> ``[512, 1024, 2048]``, as an ``argparse`` type (a clear
    usage error for anything that is not comma-separated integers)."""
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
