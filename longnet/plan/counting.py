"""Per-rank counts of one layer's sequence-parallel attention: the key/value rows a
rank sends, receives and selects for itself, its operator calls, the (query, key)
pairs it attends, and the bytes of the storages it keeps from forward to backward.

The counts follow the sequence-parallel planner (the head groups of every
rank-crossing segment, :func:`longnet.parallel.layout.segment`) but visit each
crossing segment once for all of its ranks and count rows instead of building index
tensors, so the work grows with the number of ranks and patterns, not with the
sequence's length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from longnet.parallel.layout import Segment, cdiv, segment, segment_ranks, spanning_documents
from longnet.plan.units import lse_bytes

__all__ = ["Call", "RankCount", "count_ranks", "attention_memory", "index_bytes"]

# The planner's segment function without its cache: counting leaves the op's cache alone.
_segment = getattr(segment, "__wrapped__", segment)


@dataclass
class Call:
    """One operator call of a rank for the cross-rank rows of a head group."""

    pattern: int
    n_q: int  # query rows per head on this rank
    n_heads: int
    n_pairs: int  # exchanged (kv head, offset) pairs
    n_keys: int  # key rows per pair (own and received)
    pieces: int  # key pieces (own rows, each sending rank)
    head_map: bool  # whether the heads are mapped to pairs by an index


@dataclass
class RankCount:
    """What one rank's plan holds for one layer, counted."""

    send: int = 0  # kv entries (row, kv head) sent
    recv: int = 0
    own: int = 0  # kv entries this rank selects for itself
    calls: list[Call] = field(default_factory=list)
    cross: list[int] = field(default_factory=list)  # crossing pattern indices
    partial: dict[int, int] = field(default_factory=dict)  # pattern -> local positions
    partial_calls: dict[int, int] = field(default_factory=dict)  # pattern -> calls
    local_pairs: int = 0
    cross_pairs: int = 0
    pieces: int = 0  # local calls (and all-crossing fragments) in row order
    local_rows: int = 0  # rows of the local calls that run the operator


@dataclass(frozen=True)
class _Frame:
    """The inputs every counting step shares."""

    world: int
    chunk: int
    num_heads: int
    kv_group: int  # query heads per key/value head
    causal: bool
    offset: int  # absolute position of the sequence's (each document's) first token


# --------------------------------------------------------------- attended pairs


def _heads_with_offset(num_heads: int, r: int, o: int) -> int:
    """How many heads j < num_heads have j % r == o."""
    return max(0, cdiv(num_heads - o, r))


def _part_pairs(seg_start: int, lo: int, hi: int, r: int, num_heads: int, causal: bool) -> int:
    """Attended pairs, all heads, of the positions ``[lo, hi)`` of the segment that
    starts at ``seg_start`` (head j's rows: ``seg_start + j % r + t*r``)."""
    total = 0
    for o in range(min(num_heads, r)):
        n = max(0, cdiv(hi - seg_start - o, r)) - max(0, cdiv(lo - seg_start - o, r))
        if n > 0:
            total += _heads_with_offset(num_heads, r, o) * (n * (n + 1) // 2 if causal else n * n)
    return total


def _region_pairs(a: int, b: int, w: int, r: int, num_heads: int, causal: bool) -> int:
    """Pairs of the absolute positions ``[a, b)`` computed alone (segments clipped at
    both ends): a first and a last partial segment and full ones between."""
    if a >= b:
        return 0
    s0, s1 = a // w, (b - 1) // w
    if s0 == s1:
        return _part_pairs(s0 * w, a, b, r, num_heads, causal)
    return (
        _part_pairs(s0 * w, a, (s0 + 1) * w, r, num_heads, causal)
        + (s1 - s0 - 1) * _part_pairs(0, 0, w, r, num_heads, causal)
        + _part_pairs(s1 * w, s1 * w, b, r, num_heads, causal)
    )


# ------------------------------------------------------------ rows and calls


def _crossing_segments(
    w: int, chunk: int, world: int, offset: int, start: int = 0, stop: int | None = None
) -> list[int]:
    """Segments of a pattern that span more than one rank, in order: those with a rank
    boundary strictly inside. ``[start, stop)``: a document's global tokens (default
    the whole sequence), its first token at absolute position ``offset``."""
    stop = world * chunk if stop is None else stop
    segs = set()
    for p in range(1, world):
        g = p * chunk
        if start < g < stop:
            b = offset + g - start
            if b % w:
                segs.add(b // w)
    return sorted(segs)


def _spans_ranks(s: int, w: int, lo: int, hi: int, base: int, chunk: int) -> bool:
    """Whether segment ``s`` of the sequence in this frame lies on two ranks or more."""
    ranks_of = segment_ranks(s, w, lo, hi, base, chunk)
    return ranks_of[3] > ranks_of[2]


def _count_segment(ranks: list[RankCount], seg: Segment, pattern: int, causal: bool) -> None:
    """Add the rows, calls and pairs of crossing segment ``seg`` to each of its ranks."""
    m = seg.last_rank - seg.first_rank + 1
    for g in seg.groups:
        cnt = g.counts
        npairs, nheads = len(g.pairs), len(g.heads)
        ratio = nheads // npairs
        uniform = nheads % npairs == 0 and all(
            mm == jj // ratio for jj, mm in enumerate(g.head_to_pair)
        )
        pos = [1 if x > 0 else 0 for x in cnt]
        pre_rows, pre_pos = [0], [0]
        for x, y in zip(cnt, pos):
            pre_rows.append(pre_rows[-1] + x)
            pre_pos.append(pre_pos[-1] + y)
        for a in range(m):
            if cnt[a] == 0:
                continue
            rc = ranks[seg.first_rank + a]
            own = cnt[a] * npairs
            if causal:
                dsts = pre_pos[m] - pre_pos[a + 1]
                keys = pre_rows[a + 1]
                pieces = pre_pos[a + 1]
            else:
                dsts = pre_pos[m] - 1
                keys = pre_rows[m]
                pieces = pre_pos[m]
            rc.send += own * dsts
            rc.recv += (keys - cnt[a]) * npairs
            rc.own += own
            rc.calls.append(Call(pattern, cnt[a], nheads, npairs, keys, pieces, not uniform))
            pairs = (
                cnt[a] * keys
                if not causal
                else cnt[a] * (keys - cnt[a]) + cnt[a] * (cnt[a] + 1) // 2
            )
            rc.cross_pairs += nheads * pairs


def _count_partial(
    rc: RankCount,
    pattern: int,
    w: int,
    r: int,
    fragment: tuple[int, int],
    frame: tuple[int, int, int],
    f: _Frame,
) -> None:
    """Rank ``rc``'s local part of a pattern that crosses its boundaries: the segments
    wholly inside its ``fragment`` (absolute positions) of the sequence at ``frame``
    ``(lo, hi, base)``, computed alone and merged with the crossing ones."""
    a_abs, b_abs = fragment
    lo, hi, base = frame
    if pattern not in rc.cross:
        rc.cross.append(pattern)
    s_a, s_b = a_abs // w, (b_abs - 1) // w
    s_lo = s_a + 1 if _spans_ranks(s_a, w, lo, hi, base, f.chunk) else s_a
    s_hi = s_b - 1 if _spans_ranks(s_b, w, lo, hi, base, f.chunk) else s_b
    if s_lo <= s_hi:
        pa, pb = max(s_lo * w, a_abs), min((s_hi + 1) * w, b_abs)
        rc.partial[pattern] = rc.partial.get(pattern, 0) + pb - pa
        rc.partial_calls[pattern] = rc.partial_calls.get(pattern, 0) + 1
        rc.local_pairs += _region_pairs(pa, pb, w, r, f.num_heads, f.causal)


def _count_span(
    ranks: list[RankCount],
    c: int,
    e: int,
    ws: Sequence[int],
    rs: Sequence[int],
    f: _Frame,
) -> None:
    """Add the global tokens ``[c, e)`` (the whole sequence, or a document that
    crosses a rank boundary) to the ranks that hold them, pattern by pattern."""
    chunk = f.chunk
    lo, hi, base = f.offset, f.offset + e - c, f.offset - c  # the document's frame
    holders = range(c // chunk, (e - 1) // chunk + 1)
    for p in holders:
        ranks[p].pieces += 1
    n_local = dict.fromkeys(holders, 0)  # patterns wholly local to p's fragment
    for i, (w, r) in enumerate(zip(ws, rs)):
        touched: set[int] = set()
        for s in _crossing_segments(w, chunk, f.world, f.offset, c, e):
            seg = _segment(i, s, w, r, lo, hi, base, chunk, f.num_heads, f.kv_group)
            touched.update(range(seg.first_rank, seg.last_rank + 1))
            _count_segment(ranks, seg, i, f.causal)
        for p in holders:
            a_abs = base + max(c, p * chunk)  # the fragment's absolute positions
            b_abs = base + min(e, (p + 1) * chunk)
            if p in touched:
                _count_partial(ranks[p], i, w, r, (a_abs, b_abs), (lo, hi, base), f)
            else:
                # Every segment of the pattern touching p's fragment lies inside it.
                ranks[p].local_pairs += _region_pairs(a_abs, b_abs, w, r, f.num_heads, f.causal)
                n_local[p] += 1
    for p in holders:
        if n_local[p]:  # the fragment's call of its local patterns
            ranks[p].local_rows += min(e, (p + 1) * chunk) - max(c, p * chunk)


def _count_inside(
    ranks: list[RankCount],
    cu: Sequence[int],
    spanning: set[tuple[int, int]],
    ws: Sequence[int],
    rs: Sequence[int],
    f: _Frame,
) -> None:
    """Documents inside one rank: one packed call per rank, each document alone."""
    alone: dict[int, int] = {}
    inside = [0] * f.world
    for c, e in zip(cu[:-1], cu[1:]):
        if e == c or (c, e) in spanning:
            continue
        if e - c not in alone:
            alone[e - c] = sum(
                _region_pairs(f.offset, f.offset + e - c, w, r, f.num_heads, f.causal)
                for w, r in zip(ws, rs)
            )
        ranks[c // f.chunk].local_pairs += alone[e - c]
        inside[c // f.chunk] += e - c
    for p in range(f.world):
        ranks[p].local_rows += inside[p]
        ranks[p].pieces += 1 if inside[p] else 0


def count_ranks(
    world: int,
    chunk: int,
    num_heads: int,
    kv_heads: int,
    ws: Sequence[int],
    rs: Sequence[int],
    causal: bool,
    offset: int = 0,
    cu_seqlens: Sequence[int] | None = None,
) -> list[RankCount]:
    """Per-rank rows, calls and pairs, as :func:`longnet.parallel.schedule.plan_rank`
    would plan them on every rank, visiting each crossing segment once. Without ``cu_seqlens``
    the sequence occupies the absolute positions ``[offset, offset + world * chunk)``;
    with it, each document (first token at ``offset``) is planned alone."""
    f = _Frame(world, chunk, num_heads, num_heads // kv_heads, causal, offset)
    ranks = [RankCount() for _ in range(world)]
    cu = None if cu_seqlens is None else list(cu_seqlens)
    spans = ((0, world * chunk),) if cu is None else spanning_documents(cu, world, chunk)
    for c, e in spans:
        _count_span(ranks, c, e, ws, rs, f)
    if cu is not None:
        _count_inside(ranks, cu, set(spans), ws, rs, f)
    # Calls in the planner's order: by pattern (segment, group order is kept).
    for rc in ranks:
        rc.calls.sort(key=lambda c: c.pattern)
        rc.cross.sort()
    return ranks


# ----------------------------------------------------------------- memory


def attention_memory(
    rc: RankCount,
    world: int,
    chunk: int,
    batch: int,
    num_heads: int,
    kv_heads: int,
    head_dim: int,
    item: int,
) -> tuple[int, int]:
    """``(held, peak)``: the bytes one layer's attention keeps from forward to backward
    on one rank, storage by storage as ``sequence_parallel_dilated_attention`` builds
    them, and those plus what is alive only until the forward returns (exchange
    buffers, per-pattern lists, the output before the last add). The plan's index
    tensors, held once per configuration for all layers, are :func:`index_bytes`."""
    b, d, h = batch, head_dim, num_heads
    lse_item = lse_bytes(item)
    total = b * chunk * (h + 2 * kv_heads) * d * item  # q, k, v
    total += b * chunk * h * (d * item + lse_item)  # out and lse returned
    if world == 1:
        return total, total
    if rc.local_rows:  # the local calls' out, lse
        total += b * rc.local_rows * h * (d * item + lse_item)
    # with documents, the local calls' results concatenated in row order
    joined = b * chunk * h * (d * item + lse_item) if rc.pieces > 1 else 0
    if not rc.cross:
        return total, total + joined
    temp = 2 * b * (rc.send + rc.recv) * d * item + joined  # rows sent, received
    held, calls_temp = _calls_memory(rc, b, d, item)
    merge_held, merge_temp, merged = _merge_memory(rc, b, h, d, item)
    total += held + merge_held
    temp += calls_temp + merge_temp
    if merged:
        temp += b * chunk * h * (d * item + lse_item)  # out, lse before the tie
    return total, total + temp


def _calls_memory(rc: RankCount, b: int, d: int, item: int) -> tuple[int, int]:
    """``(held, temporary)`` bytes of a rank's cross-rank calls: the selected query
    rows, each call's output and lse, and the keys/values it gathers or views."""
    lse_item = lse_bytes(item)
    held = temp = 0
    q_len = sum(c.n_q * c.n_heads for c in rc.calls)
    if q_len:
        held += b * q_len * d * item  # q_sel
    keeps_k_sel = False
    for c in rc.calls:
        rows_q = c.n_q * c.n_heads
        held += b * rows_q * (d * item + lse_item)  # the call's out, lse
        if c.head_map:
            held += 2 * b * c.n_keys * c.n_heads * d * item  # k, v per head
        elif c.pieces > 1:
            held += 2 * b * c.n_keys * c.n_pairs * d * item  # gathered k, v
        else:
            keeps_k_sel = True  # views of k_sel, v_sel
    kv_len = rc.send + rc.own
    if keeps_k_sel:
        held += 2 * b * kv_len * d * item
    else:
        temp += 2 * b * kv_len * d * item  # k_sel, v_sel
    return held, temp


def _merge_memory(rc: RankCount, b: int, h: int, d: int, item: int) -> tuple[int, int, bool]:
    """``(held, temporary, merged)``: bytes of merging each crossing pattern's partial
    results (the local part's call and the cross-rank calls) by their log-sum-exps,
    and whether any pattern has rows to merge on this rank."""
    lse_item = lse_bytes(item)
    acc_item = lse_item  # the merge runs in the lse dtype
    by_pattern: dict[int, list[Call]] = {}
    for c in rc.calls:
        by_pattern.setdefault(c.pattern, []).append(c)
    held = temp = 0
    merged = False
    for i in rc.cross:
        calls = by_pattern.get(i, [])
        part_rows = rc.partial.get(i, 0) * h
        rows = part_rows + sum(c.n_q * c.n_heads for c in calls)
        if rows == 0:
            continue  # nothing to merge here
        merged = True
        temp += b * rows * lse_item  # lse rows, transposed
        if part_rows:  # the partial call's out, lse
            held += b * part_rows * (d * item + lse_item)
        pieces = len(calls) + rc.partial_calls.get(i, 0)
        # the merge: exp(a), exp(b), total, a/total, b/total (lse dtype), where mask
        held += b * rows * (5 * lse_item + 1)
        held += b * rows * d * acc_item  # o_a (in the lse dtype)
        held += b * rows * (d * item + lse_item)  # merged rows (index_copy)
        if item != acc_item:
            held += b * rows * d * acc_item  # o_b in the lse dtype
        elif pieces > 1:
            held += b * rows * d * item  # o_b, concatenated
        if pieces > 1:
            temp += b * rows * lse_item + (b * rows * d * item if item != acc_item else 0)
    return held, temp, merged


def index_bytes(rc: RankCount, chunk: int, num_heads: int) -> int:
    """Bytes of the int64 index tensors of a rank's plan (kv, q, output and lse rows,
    head maps), cached with the plan and shared by every layer."""
    if not rc.cross:
        return 0
    q_len = sum(c.n_q * c.n_heads for c in rc.calls)
    rows = sum(rc.partial.get(i, 0) * num_heads for i in rc.cross) + q_len
    maps = sum(c.n_heads for c in rc.calls if c.head_map)
    return 8 * (rc.send + rc.own + q_len + 2 * rows + maps)
