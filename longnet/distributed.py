"""Sequence-parallel dilated attention over ``torch.distributed`` (LongNet section 3.1).

A sequence of ``N = P * L`` positions is split over the ``P`` ranks of a process
group: rank ``p`` holds positions ``[p*L, (p+1)*L)`` of q, k and v.
:func:`sequence_parallel_dilated_attention` returns this rank's rows of exactly the
operator of SPEC.md evaluated on the whole sequence.

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
* The partial results are merged by their log-sum-exp, which is exact (SPEC.md:
  one softmax over the multiset of keys of all patterns) and differentiable.

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
summed over ``group`` (e.g. ``torch.distributed.all_reduce``, or DDP over it).
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor

import longnet
from longnet._dist_utils import (
    CommStats,
    all_gather_small,
    all_to_all,
    comm_stats,
    get_timeout,
    group_rank_and_size,
    reset_comm_stats,
    set_timeout,
)
from longnet.ops import validate_inputs, validate_patterns

__all__ = [
    "sequence_parallel_dilated_attention",
    "split_sequence",
    "gather_sequence",
    "comm_stats",
    "reset_comm_stats",
    "CommStats",
    "set_timeout",
    "get_timeout",
]


# --------------------------------------------------------------------------- plan


def _cdiv(a: int, b: int) -> int:
    """Ceiling division that is right for negative ``a`` too."""
    return -((-a) // b)


@dataclass(frozen=True)
class _HeadGroup:
    """Query heads of one cross-rank segment whose offsets give every rank of the
    segment the same number of rows (so one operator call serves them)."""

    heads: Tuple[int, ...]                 # query heads J
    pairs: Tuple[Tuple[int, int], ...]     # (kv head, offset) rows that are exchanged
    head_to_pair: Tuple[int, ...]          # J index -> pairs index
    counts: Tuple[int, ...]                # rows per rank of the segment
    first_t: Tuple[Tuple[int, ...], ...]   # [rank in segment][offset] first sparse index


@dataclass(frozen=True)
class _Segment:
    pattern: int
    index: int
    start: int          # S0
    stop: int           # S1 (exclusive, clipped to N)
    first_rank: int
    last_rank: int
    w: int
    r: int
    groups: Tuple[_HeadGroup, ...]


def _segment_ranks(s: int, w: int, n: int, chunk: int) -> Tuple[int, int, int, int]:
    start, stop = s * w, min((s + 1) * w, n)
    return start, stop, start // chunk, (stop - 1) // chunk


@lru_cache(maxsize=256)
def _segment(pattern: int, s: int, w: int, r: int, n: int, chunk: int,
             num_heads: int, kv_group: int) -> _Segment:
    """Head groups of cross-rank segment ``s`` of pattern ``(w, r)``."""
    start, stop, r0, r1 = _segment_ranks(s, w, n, chunk)
    offsets = range(min(num_heads, r))
    firsts: Dict[int, List[int]] = {}
    sig: Dict[int, Tuple[int, ...]] = {}
    for o in offsets:
        counts, ts = [], []
        for q in range(r0, r1 + 1):
            a = max(start, q * chunk) - start
            e = min(stop, (q + 1) * chunk) - start
            t_lo = max(0, _cdiv(a - o, r))
            t_hi = max(0, _cdiv(e - o, r))
            counts.append(max(0, t_hi - t_lo))
            ts.append(t_lo)
        sig[o] = tuple(counts)
        firsts[o] = ts
    groups = []
    for counts in sorted(set(sig.values()), key=lambda c: min(o for o in offsets if sig[o] == c)):
        if not any(counts):
            continue
        offs = [o for o in offsets if sig[o] == counts]
        heads = tuple(j for j in range(num_heads) if j % r in offs)
        pairs = tuple(sorted({(j // kv_group, j % r) for j in heads}))
        head_to_pair = tuple(pairs.index((j // kv_group, j % r)) for j in heads)
        first_t = tuple(tuple(firsts[o][q] if o in offs else -1 for o in range(max(offs) + 1))
                        for q in range(r1 - r0 + 1))
        groups.append(_HeadGroup(heads, pairs, head_to_pair, counts, first_t))
    return _Segment(pattern, s, start, stop, r0, r1, w, r, tuple(groups))


@dataclass
class _Job:
    """One operator call for the cross-rank rows of a segment on the receiving rank."""

    key: Tuple[int, int, int]      # (pattern, segment, group): exchange order
    seg: _Segment
    group: _HeadGroup
    key_ranks: Tuple[int, ...]     # ranks whose rows form the keys, in position order
    q_rows: Tensor                 # (n_p, |J|) local rows of the queries
    heads: Tensor                  # (|J|,) query heads
    head_map: Optional[Tensor]     # (|J|,) pairs index per head, None when GQA maps it
    local_rows: Tensor             # (n_p, |U|) local rows of this rank's keys
    kv_heads: Tensor               # (|U|,) key/value heads of the pairs


@dataclass
class _Send:
    key: Tuple[int, int, int]
    rows: Tensor                   # (n, |U|) local rows
    kv_heads: Tensor               # (|U|,)


@dataclass
class _RankPlan:
    """Everything one rank does for one configuration (index tensors on CPU)."""

    local_ws: Tuple[int, ...]
    local_rs: Tuple[int, ...]
    partial: Dict[int, Tuple[int, int]]          # pattern -> local [a, b) of own segments
    cross_patterns: Tuple[int, ...]              # patterns with a per-pattern buffer
    jobs: List[_Job]
    sends: List[List[_Send]]                     # per destination rank
    recvs: List[List[Tuple[Tuple[int, int, int], int, int]]]  # per source: (key, n, |U|)
    exchange: bool                               # whether any rank exchanges anything
    _device_cache: Dict = field(default_factory=dict)


def _rows(seg: _Segment, g: _HeadGroup, rank: int, chunk: int, offs: Sequence[int]) -> Tensor:
    """Local rows of ``rank`` for the given offsets: (count, len(offs))."""
    qi = rank - seg.first_rank
    n = g.counts[qi]
    t = torch.arange(n).unsqueeze(1)
    base = torch.tensor([seg.start + o + g.first_t[qi][o] * seg.r - rank * chunk for o in offs])
    return base.unsqueeze(0) + t * seg.r


def _touching(p: int, w: int, chunk: int) -> Tuple[int, int]:
    return (p * chunk) // w, ((p + 1) * chunk - 1) // w


@lru_cache(maxsize=64)
def _plan(world: int, rank: int, chunk: int, num_heads: int, kv_heads: int,
          ws: Tuple[int, ...], rs: Tuple[int, ...], is_causal: bool) -> _RankPlan:
    n = world * chunk
    kv_group = num_heads // kv_heads
    local_ws, local_rs, cross, partial = [], [], [], {}
    jobs: List[_Job] = []
    sends: List[List[_Send]] = [[] for _ in range(world)]
    recvs: List[list] = [[] for _ in range(world)]
    exchange = False
    for i, (w, r) in enumerate(zip(ws, rs)):
        if world > 1 and chunk % w != 0:
            exchange = True
        s_a, s_b = _touching(rank, w, chunk)
        crossing = []
        for s in sorted({s_a, s_b}):
            _, _, r0, r1 = _segment_ranks(s, w, n, chunk)
            if r1 > r0:
                crossing.append(s)
        if not crossing:
            local_ws.append(w)
            local_rs.append(r)
            continue
        cross.append(i)
        lo = s_a + 1 if s_a in crossing else s_a
        hi = s_b - 1 if s_b in crossing else s_b
        if lo <= hi:
            partial[i] = (lo * w - rank * chunk, min((hi + 1) * w, n) - rank * chunk)
        for s in crossing:
            seg = _segment(i, s, w, r, n, chunk, num_heads, kv_group)
            me = rank - seg.first_rank
            for gi, g in enumerate(seg.groups):
                key = (i, s, gi)
                offs_j = [j % r for j in g.heads]
                offs_u = [o for _, o in g.pairs]
                kvh = torch.tensor([h for h, _ in g.pairs])
                # Receiving side: this rank's queries of the group.
                if g.counts[me] > 0:
                    ranks = [q for q in range(seg.first_rank, seg.last_rank + 1)
                             if not is_causal or q <= rank]
                    ratio = len(g.heads) // len(g.pairs)
                    uniform = (len(g.heads) % len(g.pairs) == 0 and all(
                        m == jj // ratio for jj, m in enumerate(g.head_to_pair)))
                    jobs.append(_Job(
                        key, seg, g, tuple(ranks),
                        q_rows=_rows(seg, g, rank, chunk, offs_j),
                        heads=torch.tensor(g.heads),
                        head_map=None if uniform else torch.tensor(g.head_to_pair),
                        local_rows=_rows(seg, g, rank, chunk, offs_u),
                        kv_heads=kvh,
                    ))
                    for q in ranks:
                        nq = g.counts[q - seg.first_rank]
                        if q != rank and nq > 0:
                            recvs[q].append((key, nq, len(g.pairs)))
                # Sending side: this rank's rows go to every later (causal) or other
                # rank of the segment that has queries in the group.
                if g.counts[me] > 0:
                    rows = _rows(seg, g, rank, chunk, offs_u)
                    for d in range(seg.first_rank, seg.last_rank + 1):
                        if d == rank or (is_causal and d < rank):
                            continue
                        if g.counts[d - seg.first_rank] > 0:
                            sends[d].append(_Send(key, rows, kvh))
    for lst in sends:
        lst.sort(key=lambda x: x.key)
    for lst in recvs:
        lst.sort(key=lambda x: x[0])
    jobs.sort(key=lambda j: j.key)
    return _RankPlan(tuple(local_ws), tuple(local_rs), partial, tuple(cross), jobs,
                     sends, recvs, exchange)


def _on(plan: _RankPlan, t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device``, cached per plan."""
    key = (id(t), device)
    hit = plan._device_cache.get(key)
    if hit is None:
        hit = plan._device_cache[key] = t.to(device)
    return hit


# --------------------------------------------------------------------- validation

_DTYPE_CODES = {torch.float32: 1, torch.float64: 2, torch.bfloat16: 3, torch.float16: 4}
_FIELDS = ("batch size", "local sequence length L", "query heads H", "key/value heads Hk",
           "head dim D", "dtype", "is_causal", "segment_lengths/dilation_rates",
           "scale", "return_lse", "requires_grad of q/k/v")
_validated: set = set()


def _grad_flags(q: Tensor, k: Tensor, v: Tensor) -> int:
    if not torch.is_grad_enabled():
        return 0
    return 4 * q.requires_grad + 2 * k.requires_grad + v.requires_grad


def _check_config(group, rank: int, cfg: Tuple, device: torch.device,
                  shown: Dict[str, object]) -> None:
    """All-gather ``cfg`` once per (group, configuration) and raise on a mismatch."""
    key = (id(group if group is not None else dist.group.WORLD), cfg)
    if key in _validated:
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
    _validated.add(key)


# ------------------------------------------------------------------------ merging


def _merge(parts: List[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
    """Exact merge of partial attention results over disjoint key multisets.

    ``out = sum_i exp(lse_i - lse) out_i`` with ``lse = logsumexp_i lse_i``; rows where
    every ``lse_i`` is ``-inf`` get ``out = 0``, ``lse = -inf`` and finite gradients.
    """
    if len(parts) == 1:
        return parts[0]
    lses = torch.stack([lse for _, lse in parts])          # (n, B, H, L)
    m = lses.detach().amax(dim=0)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    weights = torch.exp(lses - m)
    total = weights.sum(dim=0)
    has = total > 0
    total_safe = torch.where(has, total, torch.ones_like(total))
    lse = torch.where(has, m + torch.log(total_safe), torch.full_like(m, -math.inf))
    coef = (weights / total_safe).permute(0, 1, 3, 2).unsqueeze(-1)  # (n, B, L, H, 1)
    out = None
    for i, (o, _) in enumerate(parts):
        term = coef[i] * o.to(coef.dtype)
        out = term if out is None else out + term
    return out.to(parts[0][0].dtype), lse


# ----------------------------------------------------------------------- the op


def sequence_parallel_dilated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    group: Optional[dist.ProcessGroup] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    return_lse: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Dilated attention over a sequence split across the ranks of ``group``.

    Args:
        q: this rank's queries ``(B, L, H, D)``: positions ``[p*L, (p+1)*L)`` of a
            sequence of ``world_size * L`` positions, ``p`` the rank in ``group``.
        k: this rank's keys ``(B, L, Hk, D)``, ``H % Hk == 0``.
        v: this rank's values, shaped like ``k``.
        segment_lengths, dilation_rates: the patterns, as in
            :func:`longnet.dilated_attention` (segments are aligned to absolute
            positions of the whole sequence).
        group: the sequence-parallel process group (default: the world).
        is_causal: no query attends to a later position.
        scale: softmax scale, default ``1 / sqrt(D)``.
        return_lse: also return this rank's log-sum-exp rows.

    Returns:
        ``out`` ``(B, L, H, D)`` (and ``lse`` ``(B, H, L)`` with ``return_lse``): this
        rank's rows of ``longnet.dilated_attention`` on the whole sequence.
        Differentiable; the backward is collective too (every rank must run it).

    Raises:
        ValueError: bad shapes or patterns, or ranks called with different
            configurations.
        RuntimeError: a collective failed or timed out (e.g. a rank died).
    """
    ws, rs = validate_patterns(segment_lengths, dilation_rates)
    scale = validate_inputs(q, k, v, scale)
    if k.shape[1] != q.shape[1]:
        raise ValueError(
            f"k must hold the same positions as q on every rank: q has {q.shape[1]} "
            f"positions, k has {k.shape[1]} (sequence parallelism has no key/value cache)"
        )
    rank, world = group_rank_and_size(group)
    b, chunk, h, d = q.shape
    hk = k.shape[2]
    if world == 1:
        return longnet.dilated_attention(q, k, v, ws, rs, is_causal=is_causal, scale=scale,
                                         return_lse=return_lse)
    cfg = (b, chunk, h, hk, d, _DTYPE_CODES[q.dtype], int(bool(is_causal)),
           zlib.crc32(repr((ws, rs)).encode()) & 0x7FFFFFFF,
           struct.unpack("<q", struct.pack("<d", scale))[0], int(bool(return_lse)),
           _grad_flags(q, k, v))
    _check_config(group, rank, cfg, q.device, {
        "segment_lengths/dilation_rates": f"{list(ws)}/{list(rs)}", "dtype": str(q.dtype),
        "scale": scale})
    if chunk == 0:
        raise ValueError("q must hold at least one position per rank, got L = 0")

    plan = _plan(world, rank, chunk, h, hk, ws, rs, bool(is_causal))
    dev = q.device
    parts: List[Tuple[Tensor, Tensor]] = []
    if plan.local_ws:
        parts.append(longnet.dilated_attention(
            q, k, v, plan.local_ws, plan.local_rs, is_causal=is_causal, scale=scale,
            return_lse=True))

    # One all-to-all carries every cross-rank key/value row of this call.
    received: Dict[Tuple[Tuple[int, int, int], int], Tuple[Tensor, Tensor]] = {}
    if plan.exchange:
        # The empty leading slices keep k and v in the graph on every rank, so every
        # rank runs the backward exchange even when it sends nothing.
        pieces, send_sizes = [k[:0].reshape(-1), v[:0].reshape(-1)], []
        for dst in range(world):
            size = 0
            for snd in plan.sends[dst]:
                rows, heads = _on(plan, snd.rows, dev), _on(plan, snd.kv_heads, dev)
                for t in (k, v):
                    sel = t[:, rows, heads].reshape(-1)
                    pieces.append(sel)
                    size += sel.numel()
            send_sizes.append(size)
        recv_sizes = [sum(2 * b * nq * nu * d for _, nq, nu in lst) for lst in plan.recvs]
        flat = torch.cat(pieces)
        got = all_to_all(flat, send_sizes, recv_sizes, group, "key/value exchange")
        pos = 0
        for src in range(world):
            for key, nq, nu in plan.recvs[src]:
                numel = b * nq * nu * d
                kk = got[pos:pos + numel].view(b, nq, nu, d)
                vv = got[pos + numel:pos + 2 * numel].view(b, nq, nu, d)
                received[(key, src)] = (kk, vv)
                pos += 2 * numel

    buffers: Dict[int, Tuple[Tensor, Tensor]] = {}
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    for i in plan.cross_patterns:
        buffers[i] = (q.new_zeros(b, chunk, h, d),
                      torch.full((b, h, chunk), -math.inf, dtype=lse_dtype, device=dev))
    for i, (lo, hi) in plan.partial.items():
        o_i, l_i = longnet.dilated_attention(
            q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], [ws[i]], [rs[i]], is_causal=is_causal,
            scale=scale, return_lse=True)
        buffers[i][0][:, lo:hi] = o_i
        buffers[i][1][:, :, lo:hi] = l_i
    for job in plan.jobs:
        q_rows, heads = _on(plan, job.q_rows, dev), _on(plan, job.heads, dev)
        ks, vs = [], []
        for src in job.key_ranks:
            if src == rank:
                rows, kvh = _on(plan, job.local_rows, dev), _on(plan, job.kv_heads, dev)
                ks.append(k[:, rows, kvh])
                vs.append(v[:, rows, kvh])
            elif (job.key, src) in received:
                kk, vv = received[(job.key, src)]
                ks.append(kk)
                vs.append(vv)
        kk = torch.cat(ks, dim=1) if len(ks) > 1 else ks[0]
        vv = torch.cat(vs, dim=1) if len(vs) > 1 else vs[0]
        if job.head_map is not None:
            hm = _on(plan, job.head_map, dev)
            kk, vv = kk.index_select(2, hm), vv.index_select(2, hm)
        o_j, l_j = longnet.dilated_attention(
            q[:, q_rows, heads], kk, vv, [kk.shape[1]], [1], is_causal=is_causal,
            scale=scale, return_lse=True)
        out_buf, lse_buf = buffers[job.seg.pattern]
        out_buf[:, q_rows, heads] = o_j
        lse_buf[:, heads.unsqueeze(1), q_rows.t()] = l_j
    parts.extend(buffers[i] for i in plan.cross_patterns)
    out, lse = _merge(parts)
    if plan.exchange and got.requires_grad:
        # Tie the exchange into both outputs (adding an exact zero) so its backward
        # runs on every rank, also on one that received nothing.
        tie = got[:0].sum()
        out = out + tie.to(out.dtype)
        lse = lse + tie.to(lse.dtype)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------- helpers


def split_sequence(x: Tensor, group: Optional[dist.ProcessGroup] = None, dim: int = 1) -> Tensor:
    """This rank's contiguous chunk of ``x`` along ``dim`` (a view, no communication).

    ``x.shape[dim]`` must be a multiple of the group size; rank ``p`` gets
    ``[p*L, (p+1)*L)``. Gradients reach only this rank's part of ``x``.
    """
    rank, world = group_rank_and_size(group)
    n = x.shape[dim]
    if n % world != 0:
        raise ValueError(
            f"x.shape[{dim}] = {n} must be a multiple of the group size {world}")
    chunk = n // world
    return x.narrow(dim, rank * chunk, chunk)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        rank, world = group_rank_and_size(group)
        xt = x.movedim(dim, 0).contiguous()
        n = xt.numel()
        got = all_to_all(xt.reshape(-1).repeat(world), [n] * world, [n] * world, group,
                         "gather_sequence")
        got = got.view(world * xt.shape[0], *xt.shape[1:])
        return got.movedim(0, dim).contiguous()

    @staticmethod
    def backward(ctx, grad):
        # Sum over ranks of the gradient of this rank's chunk (a reduce-scatter).
        rank, world = group_rank_and_size(ctx.group)
        gt = grad.movedim(ctx.dim, 0).contiguous()
        chunk = gt.shape[0] // world
        n = gt.numel() // world
        got = all_to_all(gt.reshape(-1), [n] * world, [n] * world, ctx.group,
                         "gather_sequence (backward)")
        summed = got.view(world, chunk, *gt.shape[1:]).sum(dim=0)
        return summed.movedim(0, ctx.dim), None, None


def gather_sequence(x: Tensor, group: Optional[dist.ProcessGroup] = None, dim: int = 1) -> Tensor:
    """Concatenate every rank's chunk along ``dim`` (the inverse of :func:`split_sequence`).

    Differentiable: the gradient of this rank's chunk is the sum over ranks of the
    gradients of the gathered tensor's slice ``[p*L, (p+1)*L)`` (a reduce-scatter),
    i.e. the gradient of the sum of all ranks' losses.
    """
    group_rank_and_size(group)
    return _Gather.apply(x, group, dim)
