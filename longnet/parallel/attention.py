"""Sequence-parallel dilated attention over ``torch.distributed`` (LongNet section 3.1).

A sequence of ``N = P * L`` positions is split over the ``P`` ranks of a process
group: rank ``p`` holds positions ``[p*L, (p+1)*L)`` of q, k and v (shifted by
``position_offset`` when the sequence itself starts there).
:func:`sequence_parallel_dilated_attention` returns this rank's rows of exactly the
operator of docs/operator.md evaluated on the whole sequence.

How it works, for every pattern ``(w, r)``:

* Segments that lie inside one rank's chunk are computed there. Patterns whose every
  segment touching this rank is local (e.g. ``L % w == 0``) are fused into one call
  of :func:`longnet.dilated_attention` on the local chunk.
* A segment that spans several ranks is handled in the dilated frame: for head
  ``j`` its sparse segment is the rows ``s*w + (j mod r) + t*r``. Each rank selects
  its own rows of that sparse segment (``1/r`` of its chunk per head; with
  grouped-query attention each key/value head once per offset its query heads
  need), and the ranks of the segment exchange them with one autograd-aware
  all-to-all (backward: the reverse all-to-all). Within the dilated frame the pattern
  is plain attention over the gathered rows, computed with the operator and the
  pattern ``([n_keys], [1])``. Causal: a rank receives only from the ranks before
  it, so its own rows are the last keys, the operator's bottom-right aligned
  ``Nq < Nk`` case, and the causal rule in the dilated frame is the causal rule in
  positions. Heads whose offsets give the same per-rank row counts share one call.
* The partial results are merged by their log-sum-exp, which is exact (docs/operator.md:
  one softmax over the multiset of keys of all patterns) and differentiable.
* Packed documents (``cu_seqlens``): every document is attended alone, its segments
  aligned to its own first token. Documents inside one rank's chunk run in one packed
  call of the operator; a document that crosses a rank boundary is planned as above in
  its own frame (its fragment on each rank is a sequence of its own, at its position
  in the document), so only its segments cross ranks and only its rows are exchanged.

All exchanges of one call go into a single all-to-all (and one in backward). A rank
sends its ``L / r`` selected rows per head to each other rank of a segment it shares
and receives the ``w / r`` rows of its segments: constant in ``N`` for fixed
patterns. :func:`comm_stats` reports the bytes.

Every rank of ``group`` must call with the same configuration (batch size, ``L``,
heads, head dim, dtype, patterns, ``is_causal``, ``scale``). The first time a rank
meets a configuration it checks it against the others and raises a ``ValueError``
on a mismatch. Collectives wait at most :func:`set_timeout` seconds, so a dead rank
makes the others raise a ``RuntimeError`` instead of hanging.

Training: the attention backward returns the gradients of the sum of all ranks'
losses. Parameters replicated over the sequence-parallel ranks need their gradients
summed over ``group`` (e.g. ``torch.distributed.all_reduce``, or DDP over it);
``longnet.parallel.parallelize`` does it with FSDP2 over a ``(dp, sp)`` mesh.
"""

from __future__ import annotations

import bisect
import math
import struct
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.distributed as dist
from torch import Tensor

import longnet
from longnet._dist_utils import (
    CommStats,
    all_gather_small,
    all_to_all,
    all_to_all_start,
    comm_stats,
    get_timeout,
    group_rank_and_size,
    reset_comm_stats,
    set_backward_overlap,
    set_timeout,
)
from longnet.ops import validate_inputs, validate_patterns, validate_position_offset
from longnet.parallel.layout import HeadGroup, Segment, segment, segment_ranks, spanning_documents

__all__ = [
    "sequence_parallel_dilated_attention",
    "split_sequence",
    "gather_sequence",
    "comm_stats",
    "reset_comm_stats",
    "CommStats",
    "set_timeout",
    "get_timeout",
    "set_backward_overlap",
]


# --------------------------------------------------------------------------- plan


@dataclass
class _Call:
    """One operator call for the cross-rank rows of a segment on this rank."""

    pattern: int
    n_q: int  # this rank's query rows per head
    n_heads: int  # query heads |J|
    n_pairs: int  # exchanged (kv head, offset) pairs |U|
    q_start: int  # offset of its queries in the gathered queries
    pieces: tuple[tuple[bool, int, int], ...]  # keys in position order: (received?, start, rows)
    head_map: Tensor | None  # (|J|,) pair index per head; None when GQA maps it


@dataclass(frozen=True)
class _Local:
    """One local operator call on this rank's rows ``[a, b)``: the rows of one sequence
    (or document fragment) whose first row sits at absolute position
    ``position_offset``, computed with the patterns ``ws``/``rs``; with ``packed``,
    rows that hold whole documents, run in one packed call (their boundaries come from
    each call's ``cu_seqlens``, every document's first token at ``position_offset``)."""

    a: int
    b: int
    ws: tuple[int, ...]
    rs: tuple[int, ...]
    position_offset: int
    packed: bool = False


@dataclass
class _RankPlan:
    """Everything one rank does for one configuration (index tensors on CPU).

    Key/value rows are addressed as flat indices ``row * Hk + head`` into a
    ``(B, L * Hk, D)`` view, query/output rows as ``row * H + head``, lse rows as
    ``head * L + row``.
    """

    pieces: tuple[_Local, ...]  # the local calls, in row order, covering [0, L)
    partial: tuple[_Local, ...]  # per-pattern calls of locally computed segments
    partial_pattern: tuple[int, ...]  # their pattern indices
    cross_patterns: tuple[int, ...]  # patterns that get a per-pattern result
    calls: list[_Call]
    kv_index: Tensor  # rows sent (by destination), then own rows
    send_rows: tuple[int, ...]  # kv_index entries per destination
    recv_rows: tuple[int, ...]  # received entries per source
    q_index: Tensor  # query rows of all calls
    out_index: dict[int, Tensor]  # pattern -> output rows (partial, then calls)
    lse_index: dict[int, Tensor]  # pattern -> lse rows (same entries and order)
    exchange: bool  # whether the ranks exchange anything
    _device_cache: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        local = [
            f"[{p.a}, {p.b}): " + ("packed documents" if p.packed else str(list(zip(p.ws, p.rs))))
            for p in self.pieces
        ]
        return (
            f"_RankPlan(local calls {local}, cross-rank patterns {list(self.cross_patterns)}, "
            f"partly local {[(i, p.a, p.b) for i, p in zip(self.partial_pattern, self.partial)]}, "
            f"{len(self.calls)} calls, rows sent {list(self.send_rows)}, "
            f"received {list(self.recv_rows)})"
        )


def _rows(
    seg: Segment, g: HeadGroup, rank: int, chunk: int, offs: Sequence[int], base: int = 0
) -> Tensor:
    """Local rows of ``rank`` for the given offsets: (count, len(offs)); ``base`` is
    the absolute position of the whole sequence's row 0 in the segment's frame."""
    qi = rank - seg.first_rank
    n = g.counts[qi]
    t = torch.arange(n).unsqueeze(1)
    first = base + rank * chunk  # absolute position of local row 0
    base_t = torch.tensor([seg.start + o + g.first_t[qi][o] * seg.r - first for o in offs])
    return base_t.unsqueeze(0) + t * seg.r


def _cat(ts: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in ts]) if ts else torch.zeros(0, dtype=torch.long)


@lru_cache(maxsize=64)
def _plan(
    world: int,
    rank: int,
    chunk: int,
    num_heads: int,
    kv_heads: int,
    ws: tuple[int, ...],
    rs: tuple[int, ...],
    is_causal: bool,
    offset: int = 0,
    docs: tuple[tuple[int, int], ...] | None = None,
) -> _RankPlan:
    """What ``rank`` computes, sends and receives.

    Without ``docs`` the sequence occupies absolute positions ``[offset, offset +
    world * chunk)``. With ``docs`` the global sequence is packed documents, each
    attended alone with its first token at ``offset``: ``docs`` are those that cross
    a rank boundary (:func:`spanning_documents`, the same on every rank); every other
    row belongs to a document inside one rank and runs in the packed local call (its
    boundaries are filled in per call)."""
    n = world * chunk
    kv_group = num_heads // kv_heads
    packed = docs is not None
    spans = docs if docs is not None else ((0, n),)
    # A rank boundary inside a segment of a document makes that segment cross ranks.
    exchange = any(
        (offset - c + p * chunk) % w
        for c, e in spans
        for p in range(1, world)
        if c < p * chunk < e
        for w in ws
    )
    r_lo, r_hi = rank * chunk, (rank + 1) * chunk
    cross: set[int] = set()
    pieces: list[_Local] = []
    partial: list[tuple[int, _Local]] = []
    # (key, ...) records; key = (document, pattern, segment, group) orders every exchange.
    jobs = []  # receiving side
    sends: list[list] = [[] for _ in range(world)]
    recvs: list[list] = [[] for _ in range(world)]
    for c, e in spans:
        if not (c < r_hi and e > r_lo):
            continue  # this document has no row here
        lo, hi, base = offset, offset + e - c, offset - c  # the document's frame
        first = base + rank * chunk  # absolute position of this rank's row 0
        fa, fb = max(c, r_lo) - r_lo, min(e, r_hi) - r_lo  # its rows here
        a_abs, b_abs = first + fa, first + fb
        local_ws, local_rs = [], []
        for i, (w, r) in enumerate(zip(ws, rs)):
            s_a, s_b = a_abs // w, (b_abs - 1) // w
            crossing = [
                s
                for s in sorted({s_a, s_b})
                if segment_ranks(s, w, lo, hi, base, chunk)[3]
                > segment_ranks(s, w, lo, hi, base, chunk)[2]
            ]
            if not crossing:
                local_ws.append(w)
                local_rs.append(r)
                continue
            cross.add(i)
            s_lo = s_a + 1 if s_a in crossing else s_a
            s_hi = s_b - 1 if s_b in crossing else s_b
            if s_lo <= s_hi:
                pa, pb = max(s_lo * w, a_abs), min((s_hi + 1) * w, b_abs)
                partial.append((i, _Local(pa - first, pb - first, (w,), (r,), pa)))
            for s in crossing:
                seg = segment(i, s, w, r, lo, hi, base, chunk, num_heads, kv_group)
                me = rank - seg.first_rank
                for gi, g in enumerate(seg.groups):
                    if g.counts[me] == 0:
                        continue  # no queries here, and no rows to send
                    key = (c, i, s, gi)
                    kv_rows = _rows(seg, g, rank, chunk, [o for _, o in g.pairs], base)
                    kvh = torch.tensor([hh for hh, _ in g.pairs])
                    flat_kv = kv_rows * kv_heads + kvh
                    ranks = [
                        q
                        for q in range(seg.first_rank, seg.last_rank + 1)
                        if not is_causal or q <= rank
                    ]
                    jobs.append((key, seg, g, ranks, flat_kv, base))
                    for q in ranks:
                        nq = g.counts[q - seg.first_rank]
                        if q != rank and nq > 0:
                            recvs[q].append((key, nq * len(g.pairs)))
                    # This rank's rows go to every later (causal) or other rank of
                    # the segment that has queries in the group.
                    for dst in range(seg.first_rank, seg.last_rank + 1):
                        if (
                            dst != rank
                            and not (is_causal and dst < rank)
                            and g.counts[dst - seg.first_rank] > 0
                        ):
                            sends[dst].append((key, flat_kv))
        pieces.append(_Local(fa, fb, tuple(local_ws), tuple(local_rs), a_abs))
    if packed:
        # Rows outside the spanning documents' fragments (which hold row 0 or row
        # L - 1) are whole documents: one packed call between the fragments.
        head = pieces[0].b if pieces and pieces[0].a == 0 else 0
        tail = pieces[-1].a if pieces and pieces[-1].b == chunk and pieces[-1].a >= head else chunk
        if head < tail:
            inside = _Local(head, tail, ws, rs, offset, packed=True)
            pieces = (
                [p for p in pieces if p.b <= head] + [inside] + [p for p in pieces if p.a >= tail]
            )
    jobs.sort(key=lambda x: x[0])
    for lst in sends + recvs:
        lst.sort(key=lambda x: x[0])

    recv_start, pos = {}, 0
    for src in range(world):
        for key, size in recvs[src]:
            recv_start[(key, src)] = pos
            pos += size
    send_parts = [t for dst in range(world) for _, t in sends[dst]]
    send_rows = tuple(sum(t.numel() for _, t in sends[dst]) for dst in range(world))

    calls, own_parts, q_parts = [], [], []
    cross_patterns = tuple(sorted(cross))
    out_parts: dict[int, list] = {i: [] for i in cross_patterns}
    lse_parts: dict[int, list] = {i: [] for i in cross_patterns}
    for i, part in partial:  # the locally computed segments come first
        local_rows = torch.arange(part.a, part.b)
        out_parts[i].append(local_rows.unsqueeze(1) * num_heads + torch.arange(num_heads))
        lse_parts[i].append(local_rows.unsqueeze(1) + torch.arange(num_heads) * chunk)
    own_pos = sum(send_rows)
    q_pos = 0
    for key, seg, g, ranks, flat_kv, base in jobs:
        q_rows = _rows(seg, g, rank, chunk, [j % seg.r for j in g.heads], base)
        heads = torch.tensor(g.heads)
        pieces_kv = []
        for src in ranks:
            rows = g.counts[src - seg.first_rank]
            if src == rank:
                pieces_kv.append((False, own_pos, rows))
                own_parts.append(flat_kv)
                own_pos += flat_kv.numel()
            elif rows > 0:
                pieces_kv.append((True, recv_start[(key, src)], rows))
        ratio = len(g.heads) // len(g.pairs)
        uniform = len(g.heads) % len(g.pairs) == 0 and all(
            m == jj // ratio for jj, m in enumerate(g.head_to_pair)
        )
        calls.append(
            _Call(
                seg.pattern,
                g.counts[rank - seg.first_rank],
                len(g.heads),
                len(g.pairs),
                q_pos,
                tuple(pieces_kv),
                None if uniform else torch.tensor(g.head_to_pair),
            )
        )
        q_flat = q_rows * num_heads + heads
        q_parts.append(q_flat)
        q_pos += q_flat.numel()
        out_parts[seg.pattern].append(q_flat)
        lse_parts[seg.pattern].append(heads * chunk + q_rows)
    return _RankPlan(
        tuple(pieces),
        tuple(p for _, p in partial),
        tuple(i for i, _ in partial),
        cross_patterns,
        calls,
        kv_index=_cat(send_parts + own_parts),
        send_rows=send_rows,
        recv_rows=tuple(sum(sz for _, sz in recvs[src]) for src in range(world)),
        q_index=_cat(q_parts),
        out_index={i: _cat(v) for i, v in out_parts.items()},
        lse_index={i: _cat(v) for i, v in lse_parts.items()},
        exchange=exchange,
    )


def _on(plan: _RankPlan, t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device``, cached per plan."""
    key = (id(t), device)
    hit = plan._device_cache.get(key)
    if hit is None:
        hit = plan._device_cache[key] = t.to(device)
    return hit


# --------------------------------------------------------------------- validation

_DTYPE_CODES = {torch.float32: 1, torch.float64: 2, torch.bfloat16: 3, torch.float16: 4}
_FIELDS = (
    "batch size",
    "local sequence length L",
    "query heads H",
    "key/value heads Hk",
    "head dim D",
    "dtype",
    "is_causal",
    "segment_lengths/dilation_rates",
    "scale",
    "return_lse",
    "requires_grad of q/k/v",
    "position_offset",
    "cu_seqlens",
)
# Configurations already checked; bounded, since document boundaries change per batch.
_validated: OrderedDict = OrderedDict()
_VALIDATED_MAX = 1024


def _grad_flags(q: Tensor, k: Tensor, v: Tensor) -> int:
    if not torch.is_grad_enabled():
        return 0
    return 4 * q.requires_grad + 2 * k.requires_grad + v.requires_grad


def _check_config(
    group, rank: int, cfg: tuple, device: torch.device, shown: dict[str, object]
) -> None:
    """All-gather ``cfg`` once per (group, configuration) and raise on a mismatch."""
    key = (id(group if group is not None else dist.group.WORLD), cfg)
    if key in _validated:
        _validated.move_to_end(key)
        return
    local = torch.tensor(cfg, dtype=torch.int64, device=device)
    every = [t.cpu().tolist() for t in all_gather_small(local, group, "configuration check")]
    for f, name in enumerate(_FIELDS):
        values = [row[f] for row in every]
        if len(set(values)) > 1:
            per_rank = ", ".join(f"rank {q}: {v}" for q, v in enumerate(values))
            raise ValueError(
                "sequence_parallel_dilated_attention: the ranks of the group were called "
                f"with different {name} ({per_rank}; this rank {rank} has "
                f"{shown.get(name, values[rank])}). Every rank must pass the same "
                "configuration."
            )
    _validated[key] = None
    if len(_validated) > _VALIDATED_MAX:
        _validated.popitem(last=False)


def _document_boundaries(cu_seqlens: object, total: int, device: torch.device) -> list[int]:
    """Check ``cu_seqlens`` (int32/int64 ``(S+1,)``, nondecreasing from 0 to ``total``,
    on q's device or the CPU) and return its values."""
    if not isinstance(cu_seqlens, Tensor):
        raise ValueError(
            "cu_seqlens must be an int32 or int64 torch.Tensor of shape (S+1,) or None, "
            f"got {type(cu_seqlens).__name__}"
        )
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be an int32 or int64 tensor, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(
            f"cu_seqlens must have shape (S+1,) with S >= 1, got {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device not in (device, torch.device("cpu")):
        raise ValueError(
            f"cu_seqlens must be on the device of q ({device}) or the CPU, got {cu_seqlens.device}"
        )
    cu = [int(x) for x in cu_seqlens.tolist()]
    if cu[0] != 0 or cu[-1] != total:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at the global sequence length world_size * L "
            f"= {total}, got {cu[0]} ... {cu[-1]}"
        )
    bad = next((i for i in range(len(cu) - 1) if cu[i + 1] < cu[i]), None)
    if bad is not None:
        raise ValueError(
            f"cu_seqlens must be nondecreasing, got cu_seqlens[{bad}] = {cu[bad]} > "
            f"cu_seqlens[{bad + 1}] = {cu[bad + 1]}"
        )
    return cu


# ------------------------------------------------------------------------ merging


def _merge(o_a: Tensor, l_a: Tensor, o_b: Tensor, l_b: Tensor) -> tuple[Tensor, Tensor]:
    """Exact merge of two attention results over disjoint key multisets.

    ``o``: ``(..., D)``, ``l``: ``(...)`` (the log-sum-exp). Returns
    ``sum_x exp(l_x - l) o_x`` and ``l = logaddexp(l_a, l_b)``; where both are
    ``-inf`` the result is ``o = 0``, ``l = -inf`` with finite gradients.
    """
    m = torch.maximum(l_a, l_b).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w_a, w_b = torch.exp(l_a - m), torch.exp(l_b - m)
    total = w_a + w_b
    has = total > 0
    total = torch.where(has, total, torch.ones_like(total))
    lse = torch.where(has, m + torch.log(total), torch.full_like(m, -math.inf))
    acc = l_a.dtype
    out = (w_a / total).unsqueeze(-1) * o_a.to(acc) + (w_b / total).unsqueeze(-1) * o_b.to(acc)
    return out.to(o_a.dtype), lse


# ----------------------------------------------------------------------- the op


@torch.compiler.disable  # collectives and plan bookkeeping run eagerly (a graph break)
def sequence_parallel_dilated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    group: dist.ProcessGroup | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
    position_offset: int = 0,
    cu_seqlens: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Dilated attention over a sequence split across the ranks of ``group``.

    Args:
        q: this rank's queries ``(B, L, H, D)``: positions ``[p*L, (p+1)*L)`` of a
            sequence of ``world_size * L`` positions, ``p`` the rank in ``group``.
        k: this rank's keys ``(B, L, Hk, D)``, ``H % Hk == 0``.
        v: this rank's values, shaped like ``k``.
        segment_lengths, dilation_rates: the patterns, as in
            :func:`longnet.dilated_attention` (segments are aligned to absolute
            positions of the whole sequence, or of each document).
        group: the sequence-parallel process group (default: the world).
        is_causal: no query attends to a later position.
        scale: softmax scale, default ``1 / sqrt(D)``.
        return_lse: also return this rank's log-sum-exp rows.
        position_offset: absolute position of the whole sequence's first token (an
            int >= 0, the same on every rank), as in :func:`longnet.dilated_attention`:
            rank ``p``'s rows sit at ``position_offset + p*L + i``. With
            ``cu_seqlens``: the position of every document's first token.
        cu_seqlens: packed documents (``B = 1``): int32/int64 ``(S+1,)``, the
            document boundaries of the whole global sequence of ``world_size * L``
            tokens (nondecreasing from 0 to ``world_size * L``, empty documents
            allowed), the same tensor on every rank (on q's device or the CPU).
            Document ``i`` is the tokens ``[cu_seqlens[i], cu_seqlens[i+1])``,
            attended as if alone (segments restart at its first token, no key of
            another document), as :func:`longnet.dilated_attention` with
            ``cu_seqlens_q = cu_seqlens_k = cu_seqlens`` on the whole sequence.
            Documents may span any number of ranks.

    Returns:
        ``out`` ``(B, L, H, D)`` (and ``lse`` ``(B, H, L)`` with ``return_lse``): this
        rank's rows of ``longnet.dilated_attention`` on the whole sequence.
        Differentiable; the backward is collective too (every rank must run it).

    Raises:
        ValueError: bad shapes, patterns or document boundaries, or ranks called
            with different configurations.
        RuntimeError: a collective failed or timed out (e.g. a rank died).
    """
    ws, rs = validate_patterns(segment_lengths, dilation_rates)
    scale = validate_inputs(q, k, v, scale)
    offset = validate_position_offset(position_offset)
    if k.shape[1] != q.shape[1]:
        raise ValueError(
            f"k must hold the same positions as q on every rank: q has {q.shape[1]} "
            f"positions, k has {k.shape[1]} (sequence parallelism has no key/value cache)"
        )
    rank, world = group_rank_and_size(group)
    b, chunk, h, d = q.shape
    hk = k.shape[2]
    cu: list[int] | None = None
    if cu_seqlens is not None:
        if b != 1:
            raise ValueError(
                f"packed documents (cu_seqlens) need batch size 1 (q of shape (1, L, H, D)), "
                f"got batch size {b}"
            )
        cu = _document_boundaries(cu_seqlens, world * chunk, q.device)
    if world == 1:
        cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int64, device=q.device)
        return longnet.dilated_attention(
            q,
            k,
            v,
            ws,
            rs,
            is_causal=is_causal,
            scale=scale,
            return_lse=return_lse,
            position_offset=offset,
            **({} if cu_t is None else {"cu_seqlens_q": cu_t, "cu_seqlens_k": cu_t}),
        )
    cfg = (
        b,
        chunk,
        h,
        hk,
        d,
        _DTYPE_CODES[q.dtype],
        int(bool(is_causal)),
        zlib.crc32(repr((ws, rs)).encode()) & 0x7FFFFFFF,
        struct.unpack("<q", struct.pack("<d", scale))[0],
        int(bool(return_lse)),
        _grad_flags(q, k, v),
        offset,
        -1 if cu is None else zlib.crc32(struct.pack(f"<{len(cu)}q", *cu)) & 0x7FFFFFFF,
    )
    _check_config(
        group,
        rank,
        cfg,
        q.device,
        {
            "segment_lengths/dilation_rates": f"{list(ws)}/{list(rs)}",
            "dtype": str(q.dtype),
            "scale": scale,
            "cu_seqlens": "none" if cu is None else f"{len(cu) - 1} documents (checksum)",
        },
    )
    if chunk == 0:
        raise ValueError("q must hold at least one position per rank, got L = 0")

    docs = None if cu is None else spanning_documents(cu, world, chunk)
    plan = _plan(world, rank, chunk, h, hk, ws, rs, bool(is_causal), offset, docs)
    dev = q.device
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    # Every key/value row this rank sends or uses itself, in one gather per tensor.
    kv_index = _on(plan, plan.kv_index, dev)
    k_sel = k.reshape(b, chunk * hk, d).index_select(1, kv_index)
    v_sel = v.reshape(b, chunk * hk, d).index_select(1, kv_index)
    n_send = sum(plan.send_rows)
    got = pending = None
    if plan.exchange:
        # One all-to-all carries every cross-rank row of this call, laid out per row
        # as (k or v, B, D) so that each destination's rows are contiguous. It runs
        # while this rank computes its local patterns.
        flat = torch.stack([k_sel[:, :n_send], v_sel[:, :n_send]]).permute(2, 0, 1, 3)
        unit = 2 * b * d
        got, pending = all_to_all_start(
            flat.reshape(-1),
            [unit * x for x in plan.send_rows],
            [unit * x for x in plan.recv_rows],
            group,
            "key/value exchange",
        )

    # The local calls, in row order: documents inside this rank in one packed call,
    # each sequence or document fragment with the patterns it holds whole.
    base_o, base_l = [], []
    for piece in plan.pieces:
        a, z = piece.a, piece.b
        qa, ka, va = (q, k, v) if (a, z) == (0, chunk) else (q[:, a:z], k[:, a:z], v[:, a:z])
        local_cu = None
        if piece.packed:
            assert cu is not None  # packed pieces exist only with documents
            g0 = rank * chunk + a
            lo_i, hi_i = bisect.bisect_left(cu, g0), bisect.bisect_right(cu, g0 + z - a)
            local_cu = torch.tensor([x - g0 for x in cu[lo_i:hi_i]], dtype=torch.int64, device=dev)
        if piece.ws:
            o_p, l_p = longnet.dilated_attention(
                qa,
                ka,
                va,
                piece.ws,
                piece.rs,
                is_causal=is_causal,
                scale=scale,
                return_lse=True,
                position_offset=piece.position_offset,
                cu_seqlens_q=local_cu,
                cu_seqlens_k=local_cu,
            )
        else:  # every pattern crosses ranks here: only the merges below add to it
            o_p = q.new_zeros(b, z - a, h, d)
            l_p = torch.full((b, h, z - a), -math.inf, dtype=lse_dtype, device=dev)
        base_o.append(o_p)
        base_l.append(l_p)
    outs: dict[int, list[Tensor]] = {i: [] for i in plan.cross_patterns}
    lses: dict[int, list[Tensor]] = {i: [] for i in plan.cross_patterns}
    for i, part in zip(plan.partial_pattern, plan.partial):
        lo, hi = part.a, part.b
        o_i, l_i = longnet.dilated_attention(
            q[:, lo:hi],
            k[:, lo:hi],
            v[:, lo:hi],
            part.ws,
            part.rs,
            is_causal=is_causal,
            scale=scale,
            return_lse=True,
            position_offset=part.position_offset,
        )
        outs[i].append(o_i.reshape(b, -1, d))
        lses[i].append(l_i.transpose(1, 2).reshape(b, -1))
    if pending is not None:
        assert got is not None  # all_to_all_start returns both
        pending.wait()
        # From here on the backward can start the reverse exchange: the local
        # patterns' backward (created above) then runs while it is in flight.
        got = pending.arrived(got).view(-1, 2, b, d).permute(1, 2, 0, 3)  # (2, B, rows, D)

    q_sel = q.reshape(b, chunk * h, d).index_select(1, _on(plan, plan.q_index, dev))
    for call in plan.calls:
        ks, vs = [], []
        for received, start, rows in call.pieces:
            size = rows * call.n_pairs
            if received:
                assert got is not None  # received pieces exist only after an exchange
                kk, vv = got[0, :, start : start + size], got[1, :, start : start + size]
            else:
                kk, vv = k_sel[:, start : start + size], v_sel[:, start : start + size]
            ks.append(kk.reshape(b, rows, call.n_pairs, d))
            vs.append(vv.reshape(b, rows, call.n_pairs, d))
        kk = torch.cat(ks, dim=1) if len(ks) > 1 else ks[0]
        vv = torch.cat(vs, dim=1) if len(vs) > 1 else vs[0]
        if call.head_map is not None:
            hm = _on(plan, call.head_map, dev)
            kk, vv = kk.index_select(2, hm), vv.index_select(2, hm)
        qq = q_sel[:, call.q_start : call.q_start + call.n_q * call.n_heads]
        o_c, l_c = longnet.dilated_attention(
            qq.reshape(b, call.n_q, call.n_heads, d),
            kk,
            vv,
            [kk.shape[1]],
            [1],
            is_causal=is_causal,
            scale=scale,
            return_lse=True,
        )
        outs[call.pattern].append(o_c.reshape(b, -1, d))
        lses[call.pattern].append(l_c.transpose(1, 2).reshape(b, -1))
    # Merge each cross-rank pattern into the result at the entries it reaches only.
    out = torch.cat(base_o, dim=1) if len(base_o) > 1 else base_o[0]
    lse = torch.cat(base_l, dim=2) if len(base_l) > 1 else base_l[0]
    out, lse = out.reshape(b, chunk * h, d), lse.reshape(b, h * chunk)
    for i in plan.cross_patterns:
        if not outs[i]:
            continue  # no head of this rank has rows in the pattern's segments here
        o_i = torch.cat(outs[i], dim=1) if len(outs[i]) > 1 else outs[i][0]
        l_i = torch.cat(lses[i], dim=1) if len(lses[i]) > 1 else lses[i][0]
        io, il = _on(plan, plan.out_index[i], dev), _on(plan, plan.lse_index[i], dev)
        o_m, l_m = _merge(out.index_select(1, io), lse.index_select(1, il), o_i, l_i)
        out, lse = out.index_copy(1, io, o_m), lse.index_copy(1, il, l_m)
    out, lse = out.view(b, chunk, h, d), lse.view(b, h, chunk)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        # Tie q, k, v and the exchange into both outputs (adding an exact zero) so
        # the backward runs, and reaches the exchange, on every rank.
        tie = q[:0].sum() + k_sel[:0].sum() + v_sel[:0].sum()
        if got is not None:
            tie = tie + got[:, :0].sum()
        out = out + tie.to(out.dtype)
        lse = lse + tie.to(lse.dtype)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------- helpers


def split_sequence(x: Tensor, group: dist.ProcessGroup | None = None, dim: int = 1) -> Tensor:
    """This rank's contiguous chunk of ``x`` along ``dim`` (a view, no communication).

    ``x.shape[dim]`` must be a multiple of the group size; rank ``p`` gets
    ``[p*L, (p+1)*L)``. Gradients reach only this rank's part of ``x``.
    """
    rank, world = group_rank_and_size(group)
    n = x.shape[dim]
    if n % world != 0:
        raise ValueError(f"x.shape[{dim}] = {n} must be a multiple of the group size {world}")
    chunk = n // world
    return x.narrow(dim, rank * chunk, chunk)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        rank, world = group_rank_and_size(group)
        xt = x.movedim(dim, 0).contiguous()
        n = xt.numel()
        got = all_to_all(
            xt.reshape(-1).repeat(world), [n] * world, [n] * world, group, "gather_sequence"
        )
        got = got.view(world * xt.shape[0], *xt.shape[1:])
        return got.movedim(0, dim).contiguous()

    @staticmethod
    def backward(ctx, grad):
        # Sum over ranks of the gradient of this rank's chunk (a reduce-scatter).
        rank, world = group_rank_and_size(ctx.group)
        gt = grad.movedim(ctx.dim, 0).contiguous()
        chunk = gt.shape[0] // world
        n = gt.numel() // world
        got = all_to_all(
            gt.reshape(-1), [n] * world, [n] * world, ctx.group, "gather_sequence (backward)"
        )
        summed = got.view(world, chunk, *gt.shape[1:]).sum(dim=0)
        return summed.movedim(0, ctx.dim), None, None


def gather_sequence(x: Tensor, group: dist.ProcessGroup | None = None, dim: int = 1) -> Tensor:
    """Concatenate every rank's chunk along ``dim`` (the inverse of :func:`split_sequence`).

    Differentiable: the gradient of this rank's chunk is the sum over ranks of the
    gradients of the gathered tensor's slice ``[p*L, (p+1)*L)`` (a reduce-scatter),
    i.e. the gradient of the sum of all ranks' losses.
    """
    group_rank_and_size(group)
    return _Gather.apply(x, group, dim)
