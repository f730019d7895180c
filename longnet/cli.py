"""Small helpers shared by the project's command-line scripts (examples, benchmarks):
``argparse`` types that turn one option string into a checked list."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

__all__ = ["int_list", "choice_list"]


def int_list(text: str) -> list[int]:
    """``"512, 1024,2048"`` -> ``[512, 1024, 2048]``, as an ``argparse`` type (a clear
    usage error for anything that is not comma-separated integers)."""
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def choice_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """An ``argparse`` type for a comma-separated subset of ``choices``, kept in the
    order given: ``choice_list(("a", "b", "c"))("c, a")`` -> ``["c", "a"]``. Names
    outside ``choices`` are a usage error that lists them and the choices."""
    allowed = tuple(choices)

    def parse(text: str) -> list[str]:
        names = [t.strip() for t in text.split(",") if t.strip()]
        unknown = [n for n in names if n not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}, expected some of {allowed}")
        return names

    parse.__name__ = "choice_list"
    return parse
