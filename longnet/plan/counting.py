"""Per-rank counts of one layer's sequence-parallel attention: the key/value rows a
rank sends, receives and selects for itself, its operator calls, the (query, key)
pairs it attends, the bytes of the storages it keeps from forward to backward and
the most bytes alive at once during its forward.

The counts follow the sequence-parallel planner (the head groups of every
rank-crossing segment, :func:`longnet.parallel.layout.segment`) but visit each
crossing segment once for all of its ranks and count rows instead of building index
tensors, so the work grows with the number of ranks and patterns, not with the
sequence's length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from longnet.parallel.layout import Segment, cdiv, segment, spanning_documents
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
    n_keys: int  # key rows per pair, all received
    pieces: int  # key pieces (one per sending rank)
    head_map: bool  # whether the heads are mapped to pairs by an index

    @property
    def blocks(self) -> int:
        """Batch rows the call's queries run as (more queries than keys: blocks of
        ``n_keys``, see ``longnet.parallel.attention._attend_received``)."""
        return cdiv(self.n_q, self.n_keys)


@dataclass
class RankCount:
    """What one rank's plan holds for one layer, counted."""

    send: int = 0  # kv entries (row, kv head) sent
    recv: int = 0
    calls: list[Call] = field(default_factory=list)
    cross: list[int] = field(default_factory=list)  # patterns with cross-rank calls here
    crossing: list[int] = field(default_factory=list)  # patterns with a segment across ranks here
    local_pairs: int = 0
    cross_pairs: int = 0
    pieces: int = 0  # local calls in row order
    local_rows: int = 0  # rows of the local calls


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


def _count_segment(ranks: list[RankCount], seg: Segment, pattern: int, causal: bool) -> None:
    """Add the rows, calls and pairs of crossing segment ``seg`` to each of its ranks:
    every rank sends its rows to the others (causal: the later ones) that have
    queries in the group, whose queries attend to them in one call."""
    m = seg.last_rank - seg.first_rank + 1
    for p in range(seg.first_rank, seg.last_rank + 1):
        if pattern not in ranks[p].crossing:
            ranks[p].crossing.append(pattern)
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
            if causal:
                dsts, keys, sources = pre_pos[m] - pre_pos[a + 1], pre_rows[a], pre_pos[a]
            else:
                dsts, keys, sources = pre_pos[m] - 1, pre_rows[m] - cnt[a], pre_pos[m] - 1
            rc.send += cnt[a] * npairs * dsts
            rc.recv += keys * npairs
            if keys:
                rc.calls.append(Call(pattern, cnt[a], nheads, npairs, keys, sources, not uniform))
                rc.cross_pairs += nheads * cnt[a] * keys
                if pattern not in rc.cross:
                    rc.cross.append(pattern)


def _count_span(
    ranks: list[RankCount],
    c: int,
    e: int,
    ws: Sequence[int],
    rs: Sequence[int],
    f: _Frame,
) -> None:
    """Add the global tokens ``[c, e)`` (the whole sequence, or a document that
    crosses a rank boundary) to the ranks that hold them: each fragment's local call
    of every pattern, and the crossing segments' exchanges and calls."""
    chunk = f.chunk
    lo, hi, base = f.offset, f.offset + e - c, f.offset - c  # the document's frame
    holders = range(c // chunk, (e - 1) // chunk + 1)
    for i, (w, r) in enumerate(zip(ws, rs)):
        for s in _crossing_segments(w, chunk, f.world, f.offset, c, e):
            seg = _segment(i, s, w, r, lo, hi, base, chunk, f.num_heads, f.kv_group)
            _count_segment(ranks, seg, i, f.causal)
    for p in holders:
        a_abs = base + max(c, p * chunk)  # the fragment's absolute positions
        b_abs = base + min(e, (p + 1) * chunk)
        ranks[p].pieces += 1
        ranks[p].local_rows += b_abs - a_abs
        ranks[p].local_pairs += sum(
            _region_pairs(a_abs, b_abs, w, r, f.num_heads, f.causal) for w, r in zip(ws, rs)
        )


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
        rc.crossing.sort()
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
    on one rank (q, k, v, the returned out and lse and what autograd saves), storage by
    storage as ``sequence_parallel_dilated_attention`` builds them, and the most bytes
    alive at once during its forward (:func:`_forward_peak`). The plan's index
    tensors, held once per configuration for all layers, are :func:`index_bytes`."""
    b, d, h = batch, head_dim, num_heads
    lse_item = lse_bytes(item)
    total = b * chunk * (h + 2 * kv_heads) * d * item  # q, k, v
    total += b * chunk * h * (d * item + lse_item)  # out and lse returned
    if world == 1:
        return total, total
    if rc.local_rows:  # the local calls' out, lse
        total += b * rc.local_rows * h * (d * item + lse_item)
    if rc.cross:
        total += _calls_held(rc, b, d, item) + _merge_held(rc, b, h, d, item)
    return total, _forward_peak(rc, chunk, b, h, kv_heads, d, item)


def _calls_held(rc: RankCount, b: int, d: int, item: int) -> int:
    """Bytes the cross-rank calls keep for backward: the selected query rows (or the
    zero-padded copy of a call with more queries than keys), each call's output and
    lse, and the keys/values it reads (a concatenation, the per-head copy of a head
    map, the batch-row copy of a blocked call, or views of the exchange's output)."""
    lse_item = lse_bytes(item)
    held = 0
    if any(c.blocks == 1 for c in rc.calls):  # some call reads views of q_sel
        held += b * sum(c.n_q * c.n_heads for c in rc.calls) * d * item
    keeps_got = False
    for c in rc.calls:
        kv_heads = c.n_heads if c.head_map else c.n_pairs
        rows_q = c.n_q * c.n_heads
        if c.blocks > 1:
            rows_q = c.blocks * c.n_keys * c.n_heads
            held += b * rows_q * d * item  # the padded queries
        if c.blocks > 1 and b > 1:
            held += 2 * b * c.blocks * c.n_keys * kv_heads * d * item  # k, v per batch row
        elif c.head_map or c.pieces > 1:
            # gathered or mapped k, v (with B = 1 the batch rows are views of them)
            held += 2 * b * c.n_keys * kv_heads * d * item
        else:
            keeps_got = True  # views of the exchange's output
        held += b * rows_q * (d * item + lse_item)  # the call's out, lse
    if keeps_got:
        held += 2 * b * rc.recv * d * item
    return held


def _merge_held(rc: RankCount, b: int, h: int, d: int, item: int) -> int:
    """Bytes that merging each crossing pattern's cross-rank results into the local
    one by their log-sum-exps keeps for backward."""
    lse_item = lse_bytes(item)
    acc_item = lse_item  # the merge runs in the lse dtype
    held = 0
    for _, calls, rows in _merged_patterns(rc):
        # the merge: exp(a), exp(b), total, a/total, b/total (lse dtype), where mask
        held += b * rows * (5 * lse_item + 1)
        held += b * rows * d * acc_item  # o_a (in the lse dtype)
        held += b * rows * (d * item + lse_item)  # merged rows (index_copy)
        if item != acc_item:
            held += b * rows * d * acc_item  # o_b in the lse dtype
        elif len(calls) > 1:
            held += b * rows * d * item  # o_b, concatenated
    return held


def _merged_patterns(rc: RankCount) -> list[tuple[int, list[Call], int]]:
    """``(pattern, its cross-rank calls, rows)`` of every pattern with cross-rank calls
    on this rank (rows: (position, head) entries), in merge order."""
    by_pattern: dict[int, list[Call]] = {}
    for c in rc.calls:
        by_pattern.setdefault(c.pattern, []).append(c)
    return [
        (i, by_pattern[i], sum(c.n_q * c.n_heads for c in by_pattern[i]))
        for i in rc.cross
        if i in by_pattern
    ]


class _Ledger:
    """The bytes alive during a forward (``now``), allocated and freed in the
    operator's order, and the most alive at once (``peak``)."""

    def __init__(self, start: int) -> None:
        self.now = self.peak = start

    def alloc(self, *sizes: int) -> None:
        """Storages created one after the other (each alive when the next is)."""
        for n in sizes:
            self.now += n
            self.peak = max(self.peak, self.now)

    def free(self, *sizes: int) -> None:
        """Storages whose last reference went."""
        self.now -= sum(sizes)


def _forward_peak(rc: RankCount, chunk: int, b: int, h: int, hk: int, d: int, item: int) -> int:
    """The most bytes alive at once during one rank's forward of
    ``sequence_parallel_dilated_attention`` (``world > 1``, gradients enabled): q, k,
    v and every storage the operator creates, in the order of
    ``longnet.parallel.attention._run_plan`` and freed where its last reference goes
    (a Python name or list, or a tensor autograd saved). Alive to the end: ``k_sel``,
    ``v_sel``, the exchange's output, every call's out and lse (with the lse rows
    transposed) and what autograd saves. Freed early: the stacked send rows when the
    exchange has started, their flat copy at its wait, a head map's gathered keys once
    mapped, the merge's temporaries, the cast copies and concatenated lse rows, and
    each merged out/lse once the next replaces it. Not counted: the operator's scratch
    inside a call."""
    li = lse_bytes(item)
    row_o = d * item  # one (position, head) row of an output
    out_o, out_l = b * chunk * h * row_o, b * chunk * h * li  # a whole out, lse
    led = _Ledger(b * chunk * (h + 2 * hk) * d * item)  # q, k, v
    # _start_exchange: k_sel, v_sel (the rows sent); stacked, their flat copy handed to
    # the all-to-all and its output; the stack goes when the function returns.
    kv_sel = b * rc.send * d * item
    sent, got = 2 * b * rc.send * d * item, 2 * b * rc.recv * d * item
    led.alloc(kv_sel, kv_sel, sent, sent, got)
    led.free(sent)
    # _local_calls: an out and lse for every row of the chunk, kept to the end.
    led.alloc(out_o, out_l)
    led.free(sent)  # the wait: the all-to-all lets go of the flat copy
    _cross_calls_ledger(led, rc, b, d, item)
    _merge_ledger(led, rc, chunk, b, h, d, item)
    return led.peak


def _cross_calls_ledger(led: _Ledger, rc: RankCount, b: int, d: int, item: int) -> None:
    """``_cross_rank_calls``: the selected query rows, then per call its keys and
    values (a concatenation of pieces; with a head map, the per-head copy that replaces
    it; blocked, the padded queries and the keys and values per batch row), its out,
    lse and lse rows transposed, all kept (autograd saves them or the lists hold them)."""
    li = lse_bytes(item)
    if not rc.calls:
        return
    led.alloc(b * sum(c.n_q * c.n_heads for c in rc.calls) * d * item)  # q_sel
    for c in rc.calls:
        gathered = 2 * b * c.n_keys * c.n_pairs * d * item if c.pieces > 1 else 0
        led.alloc(gathered)
        if c.head_map:
            led.alloc(2 * b * c.n_keys * c.n_heads * d * item)
            led.free(gathered)  # replaced by the mapped copy
        n = c.n_q
        if c.blocks > 1:  # the padded queries; with B > 1, k and v per batch row
            n = c.blocks * c.n_keys
            kv_heads = c.n_heads if c.head_map else c.n_pairs
            led.alloc(b * n * c.n_heads * d * item, 2 * b * n * kv_heads * d * item if b > 1 else 0)
        rows = b * n * c.n_heads
        transposed = rows * li if c.n_heads > 1 and min(n, c.n_keys) > 1 else 0
        led.alloc(rows * d * item, rows * li, transposed)


def _merge_ledger(
    led: _Ledger, rc: RankCount, chunk: int, b: int, h: int, d: int, item: int
) -> None:
    """``_merge_patterns`` and the tie: the local results concatenated (with several
    pieces), then per crossing pattern its results concatenated, the rows it replaces
    selected, ``_merge``'s temporaries and the out and lse with the merged rows copied
    in, which replace the previous ones; finally the tied out and lse."""
    li = lse_bytes(item)
    cast = item != li  # the merge runs in the lse dtype: o_a, o_b cast to it and back
    out_o, out_l = b * chunk * h * d * item, b * chunk * h * li
    freeable = (0, 0)  # the current out, lse if only their names hold them
    if rc.pieces > 1:  # the local results concatenated
        led.alloc(out_o, out_l)
        freeable = (out_o, out_l)
    drop_o = drop_l = 0  # the previous pattern's o_i / l_i, freed when replaced
    for _, calls, n in _merged_patterns(rc):
        rows = b * n
        cat = len(calls) > 1
        o_i, l_i = (rows * d * item, rows * li) if cat else (0, 0)
        led.alloc(o_i)
        led.free(drop_o)
        led.alloc(l_i)
        led.free(drop_l)
        drop_o = o_i if cast else 0  # without a cast the merge saves o_i
        drop_l = l_i
        led.alloc(rows * d * item, rows * li)  # o_a, l_a
        _merge_fn_ledger(led, rows, d, item, li, cast, True)  # the local result has a gradient
        led.free(rows * li)  # l_a, at _merge's return
        led.free(rows * d * item if cast else 0)  # o_a, when the merge saved its cast copy
        led.alloc(out_o, out_l)  # index_copy of out and lse
        led.free(*freeable)
        freeable = (out_o, out_l)
    led.free(drop_o, drop_l)  # _merge_patterns returns
    # The tie (adding an exact zero): a new out, then a new lse, each replacing its own.
    led.alloc(out_o)
    led.free(freeable[0])
    led.alloc(out_l)
    led.free(freeable[1])


def _merge_fn_ledger(
    led: _Ledger, rows: int, d: int, item: int, li: int, cast: bool, a_grad: bool
) -> None:
    """``_merge`` of ``rows`` entries (``rows`` already includes the batch): what it
    allocates and frees; it returns with o_m and l_m and, saved for backward, w_a, w_b,
    the total, the mask, both weights and the outputs it multiplied. Without
    ``a_grad`` (o_a, l_a without a gradient) the product saves no a/total."""
    r = rows * li  # one lse-dtype value per row
    led.alloc(r)  # maximum(l_a, l_b)
    led.alloc(rows, r, r)  # isfinite, zeros_like, where: m
    led.free(rows, r, r)  # isfinite, zeros_like, the maximum
    for _ in range(2):  # w_a = exp(l_a - m), w_b
        led.alloc(r, r)
        led.free(r)
    led.alloc(r, rows)  # total, has
    led.alloc(r, r)  # ones_like, where: total
    led.free(r, r)  # ones_like, the first total
    led.alloc(r, r)  # log(total), m + log
    led.free(r)  # the log (log saved its input)
    led.alloc(r, r)  # full_like(-inf), where: lse (l_m)
    led.free(r, r)  # m + log, full_like
    acc_rows = rows * d * li
    for saved in (a_grad, True):  # w / total, the output in the lse dtype, their product
        led.alloc(r, acc_rows if cast else 0, acc_rows)
        led.free(0 if saved else r)  # w_a / total, when the product did not save it
    led.alloc(acc_rows)  # the sum
    led.free(acc_rows, acc_rows)  # the products
    if cast:
        led.alloc(rows * d * item)  # o_m in the input dtype
        led.free(acc_rows)  # the sum
    led.free(r)  # m, at the return


def index_bytes(rc: RankCount, chunk: int, num_heads: int) -> int:
    """Bytes of the int64 index tensors of a rank's plan (kv, q, output and lse rows,
    head maps), cached with the plan and shared by every layer."""
    q_len = sum(c.n_q * c.n_heads for c in rc.calls)
    maps = sum(c.n_heads for c in rc.calls if c.head_map)
    return 8 * (rc.send + 3 * q_len + maps)  # kv rows sent; query, output, lse rows
