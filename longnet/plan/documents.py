"""Packed documents: the lengths of the documents a row holds (a list repeated, or
draws from a distribution), their checks, and which of them cross a rank boundary."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

from longnet.parallel.layout import spanning_documents
from longnet.plan.units import parse_count

__all__ = ["DISTRIBUTIONS", "check_doc_lengths", "cumulative", "document_lengths", "spanning"]

DISTRIBUTIONS = ("fixed:LEN", "uniform:LO,HI", "lognormal:MEAN,SIGMA")


def document_lengths(
    tokens: int,
    lengths: Sequence[int] | None = None,
    distribution: str | None = None,
    seed: int = 0,
) -> list[int]:
    """Lengths of the documents packed into a row of ``tokens`` tokens: ``lengths``
    repeated in order, or draws from ``distribution`` (seeded by ``seed``), until the
    row is full; the last document is cut at ``tokens``.

    ``distribution`` is ``"fixed:LEN"``, ``"uniform:LO,HI"`` (integers, both
    included) or ``"lognormal:MEAN,SIGMA"`` (a log-normal of mean ``MEAN`` tokens and
    log-space standard deviation ``SIGMA``, rounded, at least 1). Counts take the
    suffixes of :func:`parse_count` (``4K``)."""
    if (lengths is None) == (distribution is None):
        raise ValueError("give the document lengths either as a list or as a distribution")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens must be a positive int, got {tokens!r}")
    if lengths is not None:
        draw = _repeated(lengths, tokens)
    else:
        assert distribution is not None
        draw = _drawn(distribution, seed)
    out, total = [], 0
    while total < tokens:
        x = min(draw(), tokens - total)
        out.append(x)
        total += x
    return out


def _repeated(lengths: Sequence[int], tokens: int) -> Callable[[], int]:
    """``lengths`` (counts) one after the other, from the first again after the last."""
    fixed = [parse_count(x) for x in lengths]
    if not fixed or not any(fixed) or min(fixed) < 0:
        raise ValueError(f"document lengths must be >= 0, not all 0, got {list(lengths)}")
    return iter(fixed[i % len(fixed)] for i in range(tokens + len(fixed))).__next__


def _drawn(distribution: str, seed: int) -> Callable[[], int]:
    """Draws from ``distribution`` (one of :data:`DISTRIBUTIONS`), seeded by ``seed``."""
    name, _, args = distribution.partition(":")
    vals = args.split(",") if args else []
    rnd = random.Random(seed)
    try:
        if name == "fixed" and len(vals) == 1:
            n = parse_count(vals[0])
            if n < 1:
                raise ValueError
            return lambda: n
        if name == "uniform" and len(vals) == 2:
            lo, hi = parse_count(vals[0]), parse_count(vals[1])
            if not 0 <= lo <= hi or hi < 1:
                raise ValueError
            return lambda: rnd.randint(lo, hi)
        if name == "lognormal" and len(vals) == 2:
            mean, sigma = float(parse_count(vals[0])), float(vals[1])
            if mean < 1 or not sigma >= 0:
                raise ValueError
            mu = math.log(mean) - sigma * sigma / 2  # the mean of exp(N(mu, sigma^2))
            return lambda: max(1, round(rnd.lognormvariate(mu, sigma)))
        raise ValueError
    except ValueError:
        raise ValueError(
            f"document length distribution {distribution!r}: use one of "
            f"{', '.join(DISTRIBUTIONS)} (lengths >= 1, LO <= HI, SIGMA >= 0)"
        ) from None


def check_doc_lengths(doc_lengths: Sequence[int], tokens: int) -> list[int]:
    """``doc_lengths`` as a list after checking that they are ints >= 0 summing to
    ``tokens``; a ValueError names the first bad entry."""
    if isinstance(doc_lengths, (str, bytes)) or not hasattr(doc_lengths, "__iter__"):
        raise ValueError(f"doc_lengths must be a sequence of ints, got {doc_lengths!r}")
    out = []
    for i, x in enumerate(doc_lengths):
        if isinstance(x, bool) or not isinstance(x, int) or x < 0:
            raise ValueError(f"doc_lengths[{i}] must be an int >= 0, got {x!r}")
        out.append(x)
    if not out or sum(out) != tokens:
        raise ValueError(
            f"doc_lengths must sum to tokens ({tokens}), got {sum(out)} over {len(out)} documents"
        )
    return out


def cumulative(doc_lengths: Sequence[int]) -> list[int]:
    """The documents' boundaries ``cu_seqlens``: ``[0, l0, l0 + l1, ...]``."""
    cu = [0]
    for x in doc_lengths:
        cu.append(cu[-1] + x)
    return cu


def spanning(
    doc_lengths: Sequence[int] | None, ranks: int, chunk: int
) -> tuple[tuple[int, int], ...]:
    """The ``(start, end)`` of the documents that cross a rank boundary when ``ranks``
    ranks hold ``chunk`` tokens each (none without documents)."""
    if doc_lengths is None:
        return ()
    return spanning_documents(cumulative(doc_lengths), ranks, chunk)
