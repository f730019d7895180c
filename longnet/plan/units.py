"""Units of the planner: element sizes per dtype, counts with binary suffixes
(``64K``, ``1G``, ``2^30``), byte formatting and integer ceilings."""

from __future__ import annotations

import re

__all__ = ["DTYPE_BYTES", "ceil_div", "format_bytes", "lse_bytes", "parse_count"]

DTYPE_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}


def lse_bytes(item: int) -> int:
    """Bytes of one log-sum-exp (the merge's dtype) for elements of ``item`` bytes:
    float64 inputs keep float64 log-sum-exps, every other dtype float32 ones."""
    return 8 if item == 8 else 4


def parse_count(text) -> int:
    """``"1048576"``, ``"1M"``, ``"1G"`` / ``"1B"``, ``"64K"``, ``"2^30"`` -> int.

    Suffixes are binary: K = 2**10, M = 2**20, G = B = 2**30, T = 2**40.
    """
    if isinstance(text, int):
        return text
    s = str(text).strip().replace("_", "").replace(",", "")
    m = re.fullmatch(r"(\d+)\s*\^\s*(\d+)", s)
    if m:
        return int(m.group(1)) ** int(m.group(2))
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KkMmGgBbTt]?)", s)
    if not m:
        raise ValueError(f"not a count: {text!r} (use e.g. 1048576, 1M, 1G, 2^30)")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "b": 2**30, "t": 2**40}[m.group(2).lower()]
    value = float(m.group(1)) * scale
    if value != int(value):
        raise ValueError(f"not a whole count: {text!r}")
    return int(value)


def format_bytes(n) -> str:
    """``n`` bytes as ``"512 B"``, ``"1.5 KiB"``, ... ``"2 TiB"`` (4 significant
    digits); ``"-"`` for ``None``."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.4g} {unit}"
        n /= 1024
    return f"{n:.4g} TiB"  # pragma: no cover


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints (``b > 0``)."""
    return -((-a) // b)
