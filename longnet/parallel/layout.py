"""The geometry that sequence parallelism and the planner share: which ranks hold a
dilated segment of a sequence split into equal per-rank chunks, how many rows of it
each rank holds per head offset, and which packed documents cross a rank boundary.

A sequence (or a document of a packed sequence) occupies absolute positions ``[lo,
hi)``; rank ``q`` holds the absolute positions ``[base + q*chunk, base + (q+1)*chunk)``.
Segment ``s`` of a pattern ``(w, r)`` is the positions ``[s*w, (s+1)*w)`` clipped to
the sequence; for head ``j`` its sparse rows are ``s*w + (j mod r) + t*r``.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["cdiv", "HeadGroup", "Segment", "segment_ranks", "segment", "spanning_documents"]


def cdiv(a: int, b: int) -> int:
    """Ceiling division that is right for negative ``a`` too."""
    return -((-a) // b)


@dataclass(frozen=True)
class HeadGroup:
    """Query heads of one cross-rank segment whose offsets give every rank of the
    segment the same number of rows (so one operator call serves them)."""

    heads: tuple[int, ...]  # query heads J
    pairs: tuple[tuple[int, int], ...]  # (kv head, offset) rows that are exchanged
    head_to_pair: tuple[int, ...]  # J index -> pairs index
    counts: tuple[int, ...]  # rows per rank of the segment
    first_t: tuple[tuple[int, ...], ...]  # [rank in segment][offset] first sparse index


@dataclass(frozen=True)
class Segment:
    """A segment of pattern ``(w, r)`` that spans ranks ``first_rank..last_rank``, with
    its head groups."""

    pattern: int
    index: int
    start: int  # S0 = index * w, absolute (sparse index t counts from here)
    stop: int  # S1 (exclusive, clipped to the sequence's end)
    first_rank: int
    last_rank: int
    w: int
    r: int
    groups: tuple[HeadGroup, ...]


def segment_ranks(
    s: int, w: int, lo: int, hi: int, base: int, chunk: int
) -> tuple[int, int, int, int]:
    """Segment ``s`` of length ``w`` of a sequence (a document) at absolute positions
    ``[lo, hi)``, rank ``q`` holding its absolute positions ``[base + q*chunk, base +
    (q+1)*chunk)``: (start, stop) clipped to the sequence, and the first and last rank
    holding a position of it."""
    start, stop = max(s * w, lo), min((s + 1) * w, hi)
    return start, stop, (start - base) // chunk, (stop - 1 - base) // chunk


# At most 256 segments are kept (with packed documents most batches add new ones).
# A Segment holds ints only: per head group its heads, (kv head, offset) pairs and head
# map (at most H ints each over all groups), its rows per spanned rank and the first
# sparse index per spanned rank and offset: about groups * ranks * min(r, H) ints of
# ~40 bytes. A chunk that r divides gives one or two groups: ~4 KB for 8 heads over 4
# ranks, ~160 KB for 64 heads, r = 64 over 64 ranks (256 of them: ~40 MB), ~2.4 MB
# over 1024 ranks. A chunk that r does not divide splits the heads into up to
# min(r, H) groups: ~1.5 MB over 64 ranks, ~24 MB over 1024 ranks (64 heads, r = 64).
@lru_cache(maxsize=256)
def segment(
    pattern: int,
    s: int,
    w: int,
    r: int,
    lo: int,
    hi: int,
    base: int,
    chunk: int,
    num_heads: int,
    kv_group: int,
) -> Segment:
    """Head groups of cross-rank segment ``s`` of pattern ``(w, r)`` of the sequence
    at absolute positions ``[lo, hi)`` whose rank ``q`` starts at ``base + q*chunk``."""
    seg_lo, stop, r0, r1 = segment_ranks(s, w, lo, hi, base, chunk)
    start = s * w
    offsets = range(min(num_heads, r))
    firsts: dict[int, list[int]] = {}
    sig: dict[int, tuple[int, ...]] = {}
    for o in offsets:
        per_rank, ts = [], []
        for q in range(r0, r1 + 1):
            a = max(seg_lo, base + q * chunk) - start
            e = min(stop, base + (q + 1) * chunk) - start
            t_lo = max(0, cdiv(a - o, r))
            t_hi = max(0, cdiv(e - o, r))
            per_rank.append(max(0, t_hi - t_lo))
            ts.append(t_lo)
        sig[o] = tuple(per_rank)
        firsts[o] = ts
    groups = []
    for counts in sorted(set(sig.values()), key=lambda c: min(o for o in offsets if sig[o] == c)):
        if not any(counts):
            continue
        offs = [o for o in offsets if sig[o] == counts]
        heads = tuple(j for j in range(num_heads) if j % r in offs)
        pairs = tuple(sorted({(j // kv_group, j % r) for j in heads}))
        head_to_pair = tuple(pairs.index((j // kv_group, j % r)) for j in heads)
        first_t = tuple(
            tuple(firsts[o][q] if o in offs else -1 for o in range(max(offs) + 1))
            for q in range(r1 - r0 + 1)
        )
        groups.append(HeadGroup(heads, pairs, head_to_pair, counts, first_t))
    return Segment(pattern, s, start, stop, r0, r1, w, r, tuple(groups))


def spanning_documents(cu: Sequence[int], world: int, chunk: int) -> tuple[tuple[int, int], ...]:
    """The documents ``(start, stop)`` (global token indices) of the boundaries
    ``cu`` that hold a rank boundary ``p * chunk`` strictly inside, in order."""
    out: list[tuple[int, int]] = []
    for p in range(1, world):
        g = p * chunk
        i = bisect.bisect_right(cu, g) - 1  # the document that holds token g
        if 0 < g - cu[i] and i + 1 < len(cu):
            doc = (cu[i], cu[i + 1])
            if not out or out[-1] != doc:
                out.append(doc)
    return tuple(out)
