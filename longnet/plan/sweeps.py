"""Patterns and sweeps over rank counts: LongNet's geometric patterns, the plan of
``N = P * L`` tokens as ``P`` grows (:func:`scaling_sweep`), and the fewest ranks
whose attention memory fits a budget (:func:`fit_ranks`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from longnet.plan.cost import plan_run
from longnet.plan.units import DTYPE_BYTES

__all__ = ["fit_ranks", "geometric_patterns", "patterns_for", "scaling_sweep"]


def geometric_patterns(
    tokens: int, first_w: int, first_r: int = 1, w_factor: int = 2, r_factor: int | None = None
) -> tuple[list[int], list[int]]:
    """LongNet's geometric patterns: ``w_i = first_w * w_factor**i``,
    ``r_i = first_r * r_factor**i`` (``r_factor`` defaults to ``w_factor``, which keeps
    ``w / r`` fixed), from ``i = 0`` up to the first ``w_i >= tokens`` (so the last
    pattern's segment covers the whole sequence)."""
    r_factor = w_factor if r_factor is None else r_factor
    for name, value in (("tokens", tokens), ("first_w", first_w), ("first_r", first_r)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(w_factor, int) or w_factor < 2:
        raise ValueError(f"w_factor must be an int >= 2, got {w_factor!r}")
    if not isinstance(r_factor, int) or r_factor < 1:
        raise ValueError(f"r_factor must be an int >= 1, got {r_factor!r}")
    if first_r > first_w:
        raise ValueError(f"first_r ({first_r}) must not exceed first_w ({first_w})")
    ws, rs = [first_w], [first_r]
    while ws[-1] < tokens:
        ws.append(ws[-1] * w_factor)
        rs.append(min(rs[-1] * r_factor, ws[-1]))
    return ws, rs


def patterns_for(
    tokens: int,
    segment_lengths: Sequence[int] | None,
    dilation_rates: Sequence[int] | None,
    first_w: int | None,
    first_r: int,
    w_factor: int,
    r_factor: int | None,
) -> tuple[list[int], list[int]]:
    """The patterns of a sequence of ``tokens``: the lists given, or the geometric
    rule from ``first_w`` (:func:`geometric_patterns`); a ValueError when both or
    neither are given."""
    if segment_lengths is not None or dilation_rates is not None:
        if first_w is not None:
            raise ValueError(
                "give either segment_lengths/dilation_rates or first_w "
                "(the geometric rule), not both"
            )
        if segment_lengths is None or dilation_rates is None:
            raise ValueError("segment_lengths and dilation_rates go together")
        return list(segment_lengths), list(dilation_rates)
    if first_w is None:
        raise ValueError(
            "give the patterns: segment_lengths and dilation_rates, or "
            "first_w (with first_r, w_factor) for geometric ones"
        )
    return geometric_patterns(tokens, first_w, first_r, w_factor, r_factor)


def scaling_sweep(
    tokens_per_rank: int,
    ranks: Sequence[int],
    *,
    heads: int,
    head_dim: int,
    segment_lengths: Sequence[int] | None = None,
    dilation_rates: Sequence[int] | None = None,
    first_w: int | None = None,
    first_r: int = 1,
    w_factor: int = 2,
    r_factor: int | None = None,
    **kwargs,
) -> list[dict[str, Any]]:
    """:meth:`RunPlan.summary` for every rank count in ``ranks`` with ``N = P *
    tokens_per_rank``: N and P grow together. With ``first_w`` the patterns follow the
    geometric rule for each N; otherwise they stay fixed. ``kwargs`` go to
    :func:`plan_run` (kv_heads, dtype, batch, layers, causal, tflops, link_gbs)."""
    rows = []
    for p in ranks:
        n = p * tokens_per_rank
        ws, rs = patterns_for(
            n, segment_lengths, dilation_rates, first_w, first_r, w_factor, r_factor
        )
        plan = plan_run(
            n, p, heads=heads, head_dim=head_dim, segment_lengths=ws, dilation_rates=rs, **kwargs
        )
        row = plan.summary()
        row["crossing_segment_lengths"] = [ws[i] for i in plan.crossing_patterns]
        rows.append(row)
    return rows


def fit_ranks(
    tokens: int, fit_memory: float, *, heads: int, head_dim: int, max_ranks: int = 65536, **kwargs
) -> int:
    """The fewest ranks (a divisor of ``tokens``, at most ``max_ranks``) whose busiest
    rank needs at most ``fit_memory`` bytes of attention memory in a training step
    (:attr:`RunPlan.memory_per_rank_bytes`: every layer's activations plus one layer's
    forward buffers; weights, optimizer state and the rest of the model are not
    counted). ``kwargs`` go to :func:`plan_run`."""
    if not (isinstance(fit_memory, (int, float)) and fit_memory > 0):
        raise ValueError(f"fit_memory must be a positive number of bytes, got {fit_memory!r}")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens must be a positive int, got {tokens!r}")
    item = DTYPE_BYTES.get(kwargs.get("dtype", "bfloat16"), 2)
    kv = kwargs.get("kv_heads") or heads
    floor_per_token = (
        kwargs.get("layers", 1) * kwargs.get("batch", 1) * (2 * heads + 2 * kv) * head_dim * item
    )  # q, k, v, out
    for p in _divisors(tokens):
        if p > max_ranks:
            break
        if floor_per_token * (tokens // p) > fit_memory:
            continue
        if (
            plan_run(tokens, p, heads=heads, head_dim=head_dim, **kwargs).memory_per_rank_bytes
            <= fit_memory
        ):
            return p
    raise ValueError(
        f"fit_memory: no rank count up to {max_ranks} that divides {tokens} "
        f"keeps the attention memory within {fit_memory:.4g} bytes per rank"
    )


def _divisors(n: int) -> list[int]:
    """The divisors of ``n`` in increasing order."""
    small, large = [], []
    d = 1
    while d * d <= n:
        if n % d == 0:
            small.append(d)
            if d * d != n:
                large.append(n // d)
        d += 1
    return small + large[::-1]
