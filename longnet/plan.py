"""Plan a long sequence-parallel run: per-rank memory, traffic and time for N tokens
on P devices, without running anything.

:func:`plan_run` answers, for a model's attention configuration (heads, key/value
heads, head dim, dtype, patterns, layers, causal, position offset) and a sequence of
``N`` tokens on ``P`` ranks, per rank and per layer:

* the key/value bytes sent and received by
  :func:`longnet.distributed.sequence_parallel_dilated_attention`, forward and
  backward (the numbers :func:`longnet.distributed.comm_stats` counts in a real run);
* the attention's activation memory: what one layer's attention keeps from forward
  to backward (q, k, v, outputs, log-sum-exps, the gathered dilated key/value rows,
  the per-pattern partial results and their merge);
* the FLOPs the patterns need (``4 * D`` per attended query/key pair forward, 2.5x
  that backward);
* with a device speed and a link speed, the estimated compute and communication
  time and their ratio.

Packed rows (``doc_lengths``, ``--doc-lengths`` / ``--doc-length-dist``) are planned
as ``cu_seqlens`` runs them: each document alone, those that cross a rank boundary
segment by segment.

It follows the sequence-parallel planner itself (``longnet.distributed``'s head
groups of every rank-crossing segment) but visits each crossing segment once for all
of its ranks and counts rows instead of building index tensors, so its work grows
with the number of ranks and patterns, not with the sequence's length: a billion
tokens on 1024 ranks plan in about a second.

Command line (``python -m longnet.plan --help``)::

    python -m longnet.plan --tokens 1G --ranks 1024 --heads 12 --head-dim 64 \\
        --dtype bfloat16 --first-w 2048 --first-r 1 --factor 2 --layers 12 --causal \\
        --tflops 400 --link-gbs 50
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "RankCost",
    "RunPlan",
    "TrainingPlan",
    "plan_training",
    "layer_activation_bytes",
    "fsdp_shard_elements",
    "plan_run",
    "geometric_patterns",
    "parse_count",
    "scaling_sweep",
    "document_lengths",
    "main",
]

DTYPE_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}
_BWD_FLOP_FACTOR = 2.5  # backward: QK^T again, dP, dV, dQ, dK = 5 products vs 2


# ------------------------------------------------------------------ arguments


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


# -------------------------------------------------------------------- results


@dataclass
class RankCost:
    """One rank's cost for one layer's attention (batch included)."""

    rank: int
    kv_rows_sent: int  # (position, kv head) rows of k and of v sent, forward
    kv_rows_received: int
    bytes_sent_fwd: int  # k and v rows sent in the forward all-to-all
    bytes_received_fwd: int
    bytes_sent_bwd: int  # their gradients, sent back in the backward all-to-all
    bytes_received_bwd: int
    collectives: int  # all-to-alls per layer, forward + backward
    pairs: int  # attended (query, key) pairs over all heads and patterns
    local_pairs: int  # of those, computed while the exchange is in flight
    flops_fwd: float
    flops_bwd: float
    activation_bytes: int  # kept from forward to backward
    peak_bytes: int  # the forward's peak (activations and short-lived buffers)
    index_bytes: int  # the plan's index tensors (once for all layers)
    compute_s: float | None = None  # forward + backward, at the given TFLOP/s
    comm_s: float | None = None  # forward + backward, at the given GB/s
    overlap_s: float | None = None  # compute the forward exchange runs behind

    @property
    def bytes_sent(self) -> int:
        """Forward + backward: what ``comm_stats().bytes_sent`` counts per layer."""
        return self.bytes_sent_fwd + self.bytes_sent_bwd

    @property
    def bytes_received(self) -> int:
        return self.bytes_received_fwd + self.bytes_received_bwd

    @property
    def comm_to_compute(self) -> float | None:
        if self.comm_s is None or self.compute_s is None:
            return None
        return self.comm_s / self.compute_s if self.compute_s > 0 else math.inf


@dataclass
class RunPlan:
    """The plan of one configuration: its inputs, patterns and per-rank costs."""

    tokens: int
    ranks: int
    tokens_per_rank: int
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    layers: int
    causal: bool
    segment_lengths: list[int]
    dilation_rates: list[int]
    crossing_patterns: list[int]  # indices of patterns with a segment over two ranks
    tflops: float | None
    link_gbs: float | None
    per_rank: list[RankCost] = field(repr=False)
    position_offset: int = 0  # absolute position of the sequence's (each document's) first token
    doc_lengths: list[int] | None = field(default=None, repr=False)  # packed documents

    @property
    def documents(self) -> int | None:
        """How many packed documents the row holds (None: one sequence)."""
        return None if self.doc_lengths is None else len(self.doc_lengths)

    # -- summaries over ranks
    def worst(self, name: str):
        """The largest value of a :class:`RankCost` field over the ranks."""
        values = [getattr(c, name) for c in self.per_rank]
        values = [v for v in values if v is not None]
        return max(values) if values else None

    def mean(self, name: str):
        values = [getattr(c, name) for c in self.per_rank]
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    @property
    def memory_per_rank_bytes(self) -> int:
        """Attention memory of a training step on the busiest rank: every layer's
        activations held for backward, plus one layer's short-lived forward buffers."""
        return max(
            self.layers * c.activation_bytes + c.peak_bytes - c.activation_bytes
            for c in self.per_rank
        )

    def summary(self) -> dict[str, Any]:
        """Worst-rank (and mean) numbers per layer, as plain values."""
        out = {
            "tokens": self.tokens,
            "ranks": self.ranks,
            "tokens_per_rank": self.tokens_per_rank,
            "patterns": len(self.segment_lengths),
            "crossing_patterns": len(self.crossing_patterns),
        }
        for name in (
            "bytes_sent_fwd",
            "bytes_received_fwd",
            "bytes_sent_bwd",
            "bytes_received_bwd",
            "flops_fwd",
            "flops_bwd",
            "activation_bytes",
            "peak_bytes",
            "compute_s",
            "comm_s",
            "overlap_s",
            "comm_to_compute",
        ):
            out[f"max_{name}"] = self.worst(name)
            out[f"mean_{name}"] = self.mean(name)
        out["memory_per_rank_bytes"] = self.memory_per_rank_bytes
        return out

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("per_rank", "doc_lengths")}
        if self.doc_lengths is not None:
            d["documents"] = len(self.doc_lengths)
            d["spanning_documents"] = len(_spanning(self))
        d["summary"] = self.summary()
        d["per_rank"] = []
        for c in self.per_rank:
            row = asdict(c)
            row["bytes_sent"], row["bytes_received"] = c.bytes_sent, c.bytes_received
            row["comm_to_compute"] = c.comm_to_compute
            d["per_rank"].append(row)
        return d

    def __repr__(self) -> str:
        return (
            f"RunPlan(N={self.tokens}, P={self.ranks}, L={self.tokens_per_rank}, "
            f"B={self.batch}, H={self.heads}, Hk={self.kv_heads}, D={self.head_dim}, "
            f"{self.dtype}, causal={self.causal}, {len(self.segment_lengths)} patterns "
            f"({len(self.crossing_patterns)} cross ranks), per layer on the worst rank: "
            f"sent {_fmt_bytes(self.worst('bytes_sent_fwd'))} fwd / "
            f"{_fmt_bytes(self.worst('bytes_sent_bwd'))} bwd, "
            f"{self.worst('flops_fwd') / 1e12:.3g} TFLOP fwd, activations "
            f"{_fmt_bytes(self.worst('activation_bytes'))})"
        )

    def table(self, every_rank: bool | None = None) -> str:
        """A text table: the configuration, then one line per rank (or, for more than
        16 ranks unless ``every_rank``, the ranks that are worst in some column)."""
        pats = ", ".join(f"({w}, {r})" for w, r in zip(self.segment_lengths, self.dilation_rates))
        lines = [
            f"N = {self.tokens:,} tokens on P = {self.ranks} ranks (L = "
            f"{self.tokens_per_rank:,} per rank), B = {self.batch}, H = {self.heads}, "
            f"Hk = {self.kv_heads}, D = {self.head_dim}, {self.dtype}, "
            f"{'causal' if self.causal else 'not causal'}, {self.layers} layers"
            + (f", first position {self.position_offset:,}" if self.position_offset else ""),
            *(
                [
                    f"packed documents: {len(self.doc_lengths):,} (mean "
                    f"{self.tokens / max(1, len(self.doc_lengths)):,.0f}, longest "
                    f"{max(self.doc_lengths, default=0):,} tokens; each attended alone, "
                    f"{len(_spanning(self))} cross a rank boundary)"
                ]
                if self.doc_lengths is not None
                else []
            ),
            f"patterns (w, r): {pats}",
            f"rank-crossing patterns: {len(self.crossing_patterns)} of "
            f"{len(self.segment_lengths)}"
            + (
                f" (w = {[self.segment_lengths[i] for i in self.crossing_patterns]})"
                if self.crossing_patterns
                else ""
            ),
            "per layer, per rank (bytes: k and v rows forward, their gradients backward):",
        ]
        timed = self.tflops is not None and self.link_gbs is not None
        head = (
            f"{'rank':>5} {'sent fwd':>10} {'recv fwd':>10} {'sent bwd':>10} "
            f"{'recv bwd':>10} {'GFLOP fwd':>10} {'GFLOP bwd':>10} {'act. mem':>10}"
        )
        if timed:
            head += f" {'compute ms':>10} {'comm ms':>8} {'comm/comp':>9}"
        lines.append(head)
        rows = self.per_rank
        if every_rank is None:
            every_rank = self.ranks <= 16
        if not every_rank:
            keep = {0, self.ranks - 1}
            for name in ("bytes_sent_fwd", "bytes_received_fwd", "flops_fwd", "activation_bytes"):
                keep.add(max(rows, key=lambda c: getattr(c, name)).rank)
            rows = [rows[p] for p in sorted(keep)]
        for c in rows:
            line = (
                f"{c.rank:>5} {_fmt_bytes(c.bytes_sent_fwd):>10} "
                f"{_fmt_bytes(c.bytes_received_fwd):>10} {_fmt_bytes(c.bytes_sent_bwd):>10} "
                f"{_fmt_bytes(c.bytes_received_bwd):>10} {c.flops_fwd / 1e9:>10.4g} "
                f"{c.flops_bwd / 1e9:>10.4g} {_fmt_bytes(c.activation_bytes):>10}"
            )
            if c.compute_s is not None and c.comm_s is not None:  # timed
                line += (
                    f" {1e3 * c.compute_s:>10.4g} {1e3 * c.comm_s:>8.4g} {c.comm_to_compute:>9.3g}"
                )
            lines.append(line)
        if not every_rank:
            lines.append(
                f"(ranks shown: first, last and the worst in some column; "
                f"--per-rank or --json for all {self.ranks})"
            )
        lines.append(
            f"worst rank per layer: sent {_fmt_bytes(self.worst('bytes_sent_fwd'))} fwd + "
            f"{_fmt_bytes(self.worst('bytes_sent_bwd'))} bwd, received "
            f"{_fmt_bytes(self.worst('bytes_received_fwd'))} fwd + "
            f"{_fmt_bytes(self.worst('bytes_received_bwd'))} bwd, "
            f"{self.worst('flops_fwd') / 1e12:.4g} + {self.worst('flops_bwd') / 1e12:.4g} "
            f"TFLOP, activations {_fmt_bytes(self.worst('activation_bytes'))} (forward "
            f"peak {_fmt_bytes(self.worst('peak_bytes'))}; "
            f"{_fmt_bytes(self.memory_per_rank_bytes)} for {self.layers} layers)"
        )
        if timed:
            lines.append(
                f"at {self.tflops:g} TFLOP/s and {self.link_gbs:g} GB/s per device: compute "
                f"{1e3 * self.worst('compute_s'):.4g} ms, communication "
                f"{1e3 * self.worst('comm_s'):.4g} ms per layer (worst ranks), "
                f"comm/compute up to {self.worst('comm_to_compute'):.3g}; the forward "
                f"exchange runs behind the local patterns "
                f"({1e3 * min(c.overlap_s or 0.0 for c in self.per_rank):.4g} ms on the rank "
                f"with the least); the backward exchange starts once the received rows' "
                f"gradients are complete, before the local patterns' backward"
            )
        return "\n".join(lines)


def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.4g} {unit}"
        n /= 1024
    return f"{n:.4g} TiB"  # pragma: no cover


# ------------------------------------------------------------- the counting


def _heads_with_offset(num_heads: int, r: int, o: int) -> int:
    """How many heads j < num_heads have j % r == o."""
    return max(0, _ceil(num_heads - o, r))


def _ceil(a: int, b: int) -> int:
    return -((-a) // b)


def _part_pairs(seg_start: int, lo: int, hi: int, r: int, num_heads: int, causal: bool) -> int:
    """Attended pairs, all heads, of the positions ``[lo, hi)`` of the segment that
    starts at ``seg_start`` (head j's rows: ``seg_start + j % r + t*r``)."""
    total = 0
    for o in range(min(num_heads, r)):
        n = max(0, _ceil(hi - seg_start - o, r)) - max(0, _ceil(lo - seg_start - o, r))
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


@dataclass
class _Call:
    """One operator call of a rank for the cross-rank rows of a head group."""

    pattern: int
    n_q: int  # query rows per head on this rank
    n_heads: int
    n_pairs: int  # exchanged (kv head, offset) pairs
    n_keys: int  # key rows per pair (own and received)
    pieces: int  # key pieces (own rows, each sending rank)
    head_map: bool  # whether the heads are mapped to pairs by an index


@dataclass
class _RankCount:
    send: int = 0  # kv entries (row, kv head) sent
    recv: int = 0
    own: int = 0  # kv entries this rank selects for itself
    calls: list[_Call] = field(default_factory=list)
    cross: list[int] = field(default_factory=list)  # crossing pattern indices
    partial: dict[int, int] = field(default_factory=dict)  # pattern -> local positions
    partial_calls: dict[int, int] = field(default_factory=dict)  # pattern -> calls
    local_pairs: int = 0
    cross_pairs: int = 0
    pieces: int = 0  # local calls (and all-crossing fragments) in row order
    local_rows: int = 0  # rows of the local calls that run the operator


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
    from longnet.parallel.layout import segment_ranks

    ranks_of = segment_ranks(s, w, lo, hi, base, chunk)
    return ranks_of[3] > ranks_of[2]


def _count(
    world: int,
    chunk: int,
    num_heads: int,
    kv_heads: int,
    ws: Sequence[int],
    rs: Sequence[int],
    causal: bool,
    offset: int = 0,
    cu_seqlens: Sequence[int] | None = None,
) -> list[_RankCount]:
    """Per-rank rows, calls and pairs, as ``longnet.distributed._plan`` would plan them
    on every rank, visiting each crossing segment once. Without ``cu_seqlens`` the
    sequence occupies the absolute positions ``[offset, offset + world * chunk)``;
    with it, each document (first token at ``offset``) is planned alone."""
    from longnet.parallel.layout import segment as cached_segment
    from longnet.parallel.layout import spanning_documents

    segment = getattr(cached_segment, "__wrapped__", cached_segment)  # leave the op's cache alone
    n = world * chunk
    kv_group = num_heads // kv_heads
    ranks = [_RankCount() for _ in range(world)]
    cu = None if cu_seqlens is None else list(cu_seqlens)
    spans = ((0, n),) if cu is None else spanning_documents(cu, world, chunk)
    for c, e in spans:
        lo, hi, base = offset, offset + e - c, offset - c  # the document's frame
        holders = range(c // chunk, (e - 1) // chunk + 1)
        for p in holders:
            ranks[p].pieces += 1
        n_local = dict.fromkeys(holders, 0)  # patterns wholly local to p's fragment
        for i, (w, r) in enumerate(zip(ws, rs)):
            crossing = _crossing_segments(w, chunk, world, offset, c, e)
            touched = set()
            for s in crossing:
                seg = segment(i, s, w, r, lo, hi, base, chunk, num_heads, kv_group)
                m = seg.last_rank - seg.first_rank + 1
                for q in range(seg.first_rank, seg.last_rank + 1):
                    touched.add(q)
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
                        rc.calls.append(_Call(i, cnt[a], nheads, npairs, keys, pieces, not uniform))
                        pairs = (
                            cnt[a] * keys
                            if not causal
                            else cnt[a] * (keys - cnt[a]) + cnt[a] * (cnt[a] + 1) // 2
                        )
                        rc.cross_pairs += nheads * pairs

            for p in holders:
                rc = ranks[p]
                a_abs = base + max(c, p * chunk)  # the fragment's absolute positions
                b_abs = base + min(e, (p + 1) * chunk)
                if p not in touched:
                    # Every segment of the pattern touching p's fragment lies inside it.
                    rc.local_pairs += _region_pairs(a_abs, b_abs, w, r, num_heads, causal)
                    n_local[p] += 1
                    continue
                if i not in rc.cross:
                    rc.cross.append(i)
                s_a, s_b = a_abs // w, (b_abs - 1) // w
                s_lo = s_a + 1 if _spans_ranks(s_a, w, lo, hi, base, chunk) else s_a
                s_hi = s_b - 1 if _spans_ranks(s_b, w, lo, hi, base, chunk) else s_b
                if s_lo <= s_hi:
                    pa, pb = max(s_lo * w, a_abs), min((s_hi + 1) * w, b_abs)
                    rc.partial[i] = rc.partial.get(i, 0) + pb - pa
                    rc.partial_calls[i] = rc.partial_calls.get(i, 0) + 1
                    rc.local_pairs += _region_pairs(pa, pb, w, r, num_heads, causal)
        for p in holders:
            if n_local[p]:  # the fragment's call of its local patterns
                ranks[p].local_rows += min(e, (p + 1) * chunk) - max(c, p * chunk)
    if cu is not None:
        # Documents inside one rank: one packed call per rank, each document alone.
        alone: dict[int, int] = {}
        inside = [0] * world
        spanning = set(spans)
        for c, e in zip(cu[:-1], cu[1:]):
            if e == c or (c, e) in spanning:
                continue
            if e - c not in alone:
                alone[e - c] = sum(
                    _region_pairs(offset, offset + e - c, w, r, num_heads, causal)
                    for w, r in zip(ws, rs)
                )
            ranks[c // chunk].local_pairs += alone[e - c]
            inside[c // chunk] += e - c
        for p in range(world):
            ranks[p].local_rows += inside[p]
            ranks[p].pieces += 1 if inside[p] else 0
    # Calls in the planner's order: by pattern (segment, group order is kept).
    for rc in ranks:
        rc.calls.sort(key=lambda c: c.pattern)
        rc.cross.sort()
    return ranks


# ----------------------------------------------------------------- memory


def _memory(
    rc: _RankCount,
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
    tensors, held once per configuration for all layers, are :func:`_index_bytes`."""
    b, d, h = batch, head_dim, num_heads
    lse_item = 8 if item == 8 else 4
    acc_item = lse_item  # the merge runs in the lse dtype
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
    kv_len = rc.send + rc.own
    q_len = sum(c.n_q * c.n_heads for c in rc.calls)
    if q_len:
        total += b * q_len * d * item  # q_sel
    keeps_k_sel = False
    by_pattern: dict[int, list[_Call]] = {}
    for c in rc.calls:
        by_pattern.setdefault(c.pattern, []).append(c)
        rows_q = c.n_q * c.n_heads
        total += b * rows_q * (d * item + lse_item)  # the call's out, lse
        if c.head_map:
            total += 2 * b * c.n_keys * c.n_heads * d * item  # k, v per head
        elif c.pieces > 1:
            total += 2 * b * c.n_keys * c.n_pairs * d * item  # gathered k, v
        else:
            keeps_k_sel = True  # views of k_sel, v_sel
    if keeps_k_sel:
        total += 2 * b * kv_len * d * item
    else:
        temp += 2 * b * kv_len * d * item  # k_sel, v_sel
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
            total += b * part_rows * (d * item + lse_item)
        pieces = len(calls) + rc.partial_calls.get(i, 0)
        # the merge: exp(a), exp(b), total, a/total, b/total (lse dtype), where mask
        total += b * rows * (5 * lse_item + 1)
        total += b * rows * d * acc_item  # o_a (in the lse dtype)
        total += b * rows * (d * item + lse_item)  # merged rows (index_copy)
        if item != acc_item:
            total += b * rows * d * acc_item  # o_b in the lse dtype
        elif pieces > 1:
            total += b * rows * d * item  # o_b, concatenated
        if pieces > 1:
            temp += b * rows * lse_item + (b * rows * d * item if item != acc_item else 0)
    if merged:
        temp += b * chunk * h * (d * item + lse_item)  # out, lse before the tie
    return total, total + temp


def _index_bytes(rc: _RankCount, chunk: int, num_heads: int) -> int:
    """Bytes of the int64 index tensors of a rank's plan (kv, q, output and lse rows,
    head maps), cached with the plan and shared by every layer."""
    if not rc.cross:
        return 0
    q_len = sum(c.n_q * c.n_heads for c in rc.calls)
    rows = sum(rc.partial.get(i, 0) * num_heads for i in rc.cross) + q_len
    maps = sum(c.n_heads for c in rc.calls if c.head_map)
    return 8 * (rc.send + rc.own + q_len + 2 * rows + maps)


# ------------------------------------------------------------------- the plan


def _validate(
    tokens,
    ranks,
    batch,
    heads,
    kv_heads,
    head_dim,
    dtype,
    layers,
    segment_lengths,
    dilation_rates,
    tflops,
    link_gbs,
):
    for name, value in (
        ("tokens", tokens),
        ("ranks", ranks),
        ("batch", batch),
        ("heads", heads),
        ("kv_heads", kv_heads),
        ("head_dim", head_dim),
        ("layers", layers),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if tokens % ranks:
        raise ValueError(
            f"tokens ({tokens}) must be a multiple of ranks ({ranks}): every "
            "rank holds the same number of positions"
        )
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    for name, value in (("tflops", tflops), ("link_gbs", link_gbs)):
        if value is not None and not (
            isinstance(value, (int, float)) and value > 0 and math.isfinite(value)
        ):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    from longnet.ops import validate_patterns

    return validate_patterns(segment_lengths, dilation_rates)


def plan_run(
    tokens: int,
    ranks: int,
    *,
    heads: int,
    head_dim: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    kv_heads: int | None = None,
    dtype: str = "bfloat16",
    batch: int = 1,
    layers: int = 1,
    causal: bool = False,
    tflops: float | None = None,
    link_gbs: float | None = None,
    position_offset: int = 0,
    doc_lengths: Sequence[int] | None = None,
) -> RunPlan:
    """Per-rank traffic, FLOPs, activation memory (and time) of one attention layer
    of :func:`longnet.distributed.sequence_parallel_dilated_attention` for ``tokens``
    positions split over ``ranks`` ranks.

    Args:
        tokens: sequence length ``N`` (a multiple of ``ranks``).
        ranks: sequence-parallel ranks ``P``; each holds ``N / P`` positions.
        heads, kv_heads, head_dim: ``H``, ``Hk`` (default ``H``), ``D``.
        segment_lengths, dilation_rates: the patterns (see :func:`geometric_patterns`).
        dtype: ``"bfloat16"``, ``"float16"``, ``"float32"`` or ``"float64"``.
        batch: sequences per step (every number scales with it).
        layers: layers of the model (only :attr:`RunPlan.memory_per_rank_bytes` uses it).
        causal: causal attention.
        tflops: the attention FLOP/s a device sustains, in TFLOP/s (for times).
        link_gbs: a device's link bandwidth, in GB/s (1e9 bytes/s, for times).
        position_offset: absolute position of the sequence's first token, as in
            :func:`longnet.distributed.sequence_parallel_dilated_attention`.
        doc_lengths: packed documents: the lengths (ints >= 0, in order, summing to
            ``tokens``) of the documents the row holds, each attended alone (its
            first token at ``position_offset``), as ``sequence_parallel_dilated_attention``
            with ``cu_seqlens``; ``batch`` must be 1. See :func:`document_lengths`.

    Returns:
        A :class:`RunPlan`; ``per_rank[p]`` holds rank ``p``'s :class:`RankCost`.
        Bytes are those :func:`longnet.distributed.comm_stats` counts (forward plus
        backward sums to its ``bytes_sent`` / ``bytes_received`` per layer).

    Raises:
        ValueError: naming the argument that is out of range.
    """
    kv_heads = heads if kv_heads is None else kv_heads
    ws, rs = _validate(
        tokens,
        ranks,
        batch,
        heads,
        kv_heads,
        head_dim,
        dtype,
        layers,
        segment_lengths,
        dilation_rates,
        tflops,
        link_gbs,
    )
    if (
        isinstance(position_offset, bool)
        or not isinstance(position_offset, int)
        or position_offset < 0
    ):
        raise ValueError(f"position_offset must be an int >= 0, got {position_offset!r}")
    cu = None
    if doc_lengths is not None:
        doc_lengths = _check_lengths(doc_lengths, tokens)
        if batch != 1:
            raise ValueError(f"doc_lengths (packed documents) need batch = 1, got {batch}")
        cu = [0]
        for x in doc_lengths:
            cu.append(cu[-1] + x)
    chunk = tokens // ranks
    item = DTYPE_BYTES[dtype]
    counts = _count(ranks, chunk, heads, kv_heads, ws, rs, bool(causal), position_offset, cu)
    crossing = sorted({i for rc in counts for i in rc.cross})
    exchange = bool(crossing)
    unit = 2 * batch * head_dim * item  # one row of k and one of v
    per_rank = []
    for p, rc in enumerate(counts):
        held, peak = _memory(rc, ranks, chunk, batch, heads, kv_heads, head_dim, item)
        pairs = rc.local_pairs + rc.cross_pairs
        fwd = 4.0 * batch * head_dim * pairs
        cost = RankCost(
            rank=p,
            kv_rows_sent=rc.send,
            kv_rows_received=rc.recv,
            bytes_sent_fwd=unit * rc.send,
            bytes_received_fwd=unit * rc.recv,
            bytes_sent_bwd=unit * rc.recv,
            bytes_received_bwd=unit * rc.send,
            collectives=2 if exchange else 0,
            pairs=pairs,
            local_pairs=rc.local_pairs,
            flops_fwd=fwd,
            flops_bwd=_BWD_FLOP_FACTOR * fwd,
            activation_bytes=held,
            peak_bytes=peak,
            index_bytes=_index_bytes(rc, chunk, heads),
        )
        if tflops is not None and link_gbs is not None:
            rate, link = tflops * 1e12, link_gbs * 1e9
            cost.compute_s = (cost.flops_fwd + cost.flops_bwd) / rate
            cost.comm_s = (
                max(cost.bytes_sent_fwd, cost.bytes_received_fwd)
                + max(cost.bytes_sent_bwd, cost.bytes_received_bwd)
            ) / link
            cost.overlap_s = 4.0 * batch * head_dim * rc.local_pairs / rate
        per_rank.append(cost)
    return RunPlan(
        tokens,
        ranks,
        chunk,
        batch,
        heads,
        kv_heads,
        head_dim,
        dtype,
        layers,
        bool(causal),
        list(ws),
        list(rs),
        crossing,
        tflops if link_gbs is not None else None,
        link_gbs if tflops is not None else None,
        per_rank,
        position_offset=position_offset,
        doc_lengths=None if doc_lengths is None else list(doc_lengths),
    )


def _spanning(plan: RunPlan) -> tuple[tuple[int, int], ...]:
    from longnet.parallel.layout import spanning_documents

    if plan.doc_lengths is None:
        return ()
    cu = [0]
    for x in plan.doc_lengths:
        cu.append(cu[-1] + x)
    return spanning_documents(cu, plan.ranks, plan.tokens_per_rank)


def _check_lengths(doc_lengths: Sequence[int], tokens: int) -> list[int]:
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


_DISTRIBUTIONS = ("fixed:LEN", "uniform:LO,HI", "lognormal:MEAN,SIGMA")


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
    import random

    if (lengths is None) == (distribution is None):
        raise ValueError("give the document lengths either as a list or as a distribution")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens must be a positive int, got {tokens!r}")
    if lengths is not None:
        fixed = [parse_count(x) for x in lengths]
        if not fixed or not any(fixed) or min(fixed) < 0:
            raise ValueError(f"document lengths must be >= 0, not all 0, got {list(lengths)}")
        draw = iter(fixed[i % len(fixed)] for i in range(tokens + len(fixed))).__next__
    else:
        assert distribution is not None
        name, _, args = distribution.partition(":")
        vals = args.split(",") if args else []
        rnd = random.Random(seed)
        try:
            if name == "fixed" and len(vals) == 1:
                n = parse_count(vals[0])
                if n < 1:
                    raise ValueError
                draw = lambda: n  # noqa: E731
            elif name == "uniform" and len(vals) == 2:
                lo, hi = parse_count(vals[0]), parse_count(vals[1])
                if not 0 <= lo <= hi or hi < 1:
                    raise ValueError
                draw = lambda: rnd.randint(lo, hi)  # noqa: E731
            elif name == "lognormal" and len(vals) == 2:
                mean, sigma = float(parse_count(vals[0])), float(vals[1])
                if mean < 1 or not sigma >= 0:
                    raise ValueError
                mu = math.log(mean) - sigma * sigma / 2  # the mean of exp(N(mu, sigma^2))
                draw = lambda: max(1, round(rnd.lognormvariate(mu, sigma)))  # noqa: E731
            else:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"document length distribution {distribution!r}: use one of "
                f"{', '.join(_DISTRIBUTIONS)} (lengths >= 1, LO <= HI, SIGMA >= 0)"
            ) from None
    out, total = [], 0
    while total < tokens:
        x = min(draw(), tokens - total)
        out.append(x)
        total += x
    return out


# ------------------------------------------------------ training on a mesh


@dataclass
class TrainingPlan:
    """Per-rank memory and traffic of a LongNetLM training step on a ``(dp, sp)`` mesh
    with FSDP2 over all ``dp * sp`` ranks (:func:`plan_training`)."""

    dp: int
    sp: int
    batch: int  # global batch (sequences per step)
    seq_len: int
    dtype: str
    activation_checkpointing: bool
    parameters: int
    param_bytes_per_rank: int  # FSDP2 shards (dim 0 split over dp * sp), busiest rank
    grad_bytes_per_rank: int
    optimizer_bytes_per_rank: int  # AdamW exp_avg and exp_avg_sq
    unsharded_bytes: int  # full parameters alive at once: root + 2 layers (0 on 1 rank)
    layer_activation_bytes: int  # one decoder layer, kept from forward to backward
    layer_activation_bytes_plain: int  # the same without checkpointing
    other_activation_bytes: int  # embedding, final norm, logits and log-softmax
    activation_bytes: int  # everything kept for backward on a rank
    peak_bytes: int  # states + activations + backward's transient peak
    fsdp_bytes_per_step: int  # sent per rank: all-gathers (fwd, bwd) + reduce-scatter
    sp_bytes_per_step: int  # sent per rank: dilated key/value exchange, all layers
    ring_bytes_per_step: int  # ring attention would send for the same run
    ulysses_bytes_per_step: int  # all-to-all head parallelism would send
    attention: RunPlan = field(repr=False)
    chunk_size: int | None = None  # feed-forward and LM head + loss in chunks (None: off)

    def to_dict(self) -> dict[str, object]:
        d = {k: v for k, v in asdict(self).items() if k != "attention"}
        d["attention_summary"] = self.attention.summary()
        return d

    def table(self) -> str:
        w = self.dp * self.sp
        f = _fmt_bytes
        rows = [
            f"mesh dp {self.dp} x sp {self.sp} ({w} ranks, FSDP2 over all), global batch "
            f"{self.batch} x {self.seq_len:,} tokens ({self.batch // self.dp} x "
            f"{self.seq_len // self.sp:,} per rank), {self.parameters:,} parameters "
            f"({self.dtype}), activation checkpointing "
            f"{'on' if self.activation_checkpointing else 'off'}"
            + (
                f", feed-forward and loss in chunks of {self.chunk_size:,} positions"
                if self.chunk_size
                else ""
            ),
            "per rank:",
            f"  parameters {f(self.param_bytes_per_rank)}, gradients "
            f"{f(self.grad_bytes_per_rank)}, AdamW state {f(self.optimizer_bytes_per_rank)}"
            f" (sharded); full parameters in use {f(self.unsharded_bytes)}",
            f"  activations {f(self.activation_bytes)} (per layer "
            f"{f(self.layer_activation_bytes)}; without checkpointing "
            f"{f(self.layer_activation_bytes_plain)}; outside the layers "
            f"{f(self.other_activation_bytes)})",
            f"  peak about {f(self.peak_bytes)}",
            "traffic sent per rank and step:",
            f"  FSDP2 all-gathers + reduce-scatter {f(self.fsdp_bytes_per_step)}",
            f"  dilated sequence-parallel exchange {f(self.sp_bytes_per_step)}"
            + (
                " (with the repeated forward exchange)"
                if self.activation_checkpointing and self.sp > 1
                else ""
            ),
            f"  for comparison, same run: ring attention {f(self.ring_bytes_per_step)}, "
            f"all-to-all head parallelism (Ulysses) {f(self.ulysses_bytes_per_step)}",
        ]
        return "\n".join(rows)


def _param_shapes(cfg) -> tuple[list[tuple[int, ...]], list[list[tuple[int, ...]]]]:
    """Shapes of the root's own parameters and of each decoder layer's (LongNetLM)."""
    e, f, h = cfg.embed_dim, cfg.ffn_dim, cfg.num_heads
    kv = (cfg.num_kv_heads or h) * (e // h)
    bias = cfg.bias

    def lin(i, o):
        return [(o, i)] + ([(o,)] if bias else [])

    def ln(n):
        return [(n,), (n,)]

    layer = ln(e) + lin(e, e) + lin(e, kv) + lin(e, kv) + lin(e, e) + ln(e) + lin(e, f) + lin(f, e)
    if cfg.norm_style == "subln":
        layer += ln(e) + ln(f)
    root = [(cfg.vocab_size, e)] + ln(e)
    if not cfg.tie_embeddings:
        root.append((cfg.vocab_size, e))
    return root, [layer] * cfg.num_layers


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for x in shape:
        n *= x
    return n


def _shard_elements(shape: tuple[int, ...], world: int, rank: int) -> int:
    """Elements of ``rank``'s FSDP2 shard (dim 0 split in ceil-sized chunks)."""
    rows = _ceil(shape[0], world)
    mine = max(0, min(rows, shape[0] - rank * rows))
    return mine * (_numel(shape) // shape[0])


def fsdp_shard_elements(config, world: int, rank: int) -> int:
    """Parameter elements FSDP2 keeps on ``rank`` of ``world`` for a LongNetLM config."""
    root, layers = _param_shapes(config)
    return sum(
        _shard_elements(s, world, rank) for s in root + [x for layer in layers for x in layer]
    )


def layer_activation_bytes(
    config,
    batch: int,
    tokens: int,
    *,
    dtype: str = "float32",
    attention: RankCost | None = None,
    activation_checkpointing: bool = False,
    chunked_ffn: bool = False,
) -> int:
    """Bytes one LongNetDecoderLayer keeps from forward to backward on a rank holding
    ``batch x tokens`` positions (dropout off), storage by storage: its input, the two
    LayerNorm outputs and the residual sum (4 ``(B, T, E)``), the LayerNorms' mean and
    rstd (4 ``(B, T)``), the FFN's ``fc1`` and GELU outputs (2 ``(B, T, F)``), the
    rotary cos/sin of q and k (``2 T D``), plus the attention's own (q, k, v, output,
    lse and, under sequence parallelism, what its exchange keeps: ``attention``'s
    ``activation_bytes``, default the one-process operator). Sub-LN adds its two
    LayerNorms' inputs. With checkpointing only the input stays. With
    ``chunked_ffn`` (``LongNetLM.set_chunk_size``) the feed-forward and its LayerNorm
    keep only their input, the residual sum: no FFN LayerNorm output or statistics,
    no ``(B, T, F)`` tensors, no Sub-LN FFN norm input."""
    item = DTYPE_BYTES[dtype]
    e, f, d = config.embed_dim, config.ffn_dim, config.embed_dim // config.num_heads
    bt = batch * tokens
    if activation_checkpointing:
        return bt * e * item
    if chunked_ffn:
        total = item * (3 * bt * e + 2 * bt)
    else:
        total = item * (4 * bt * e + 4 * bt + 2 * bt * f)
    if config.position_encoding is not None:
        total += item * 2 * tokens * d
    if config.norm_style == "subln":
        total += item * (bt * e + 2 * bt) if chunked_ffn else item * (bt * e + bt * f + 4 * bt)
    if attention is None:
        h, hk = config.num_heads, config.num_kv_heads or config.num_heads
        lse_item = 8 if item == 8 else 4
        attn = bt * (h + 2 * hk) * d * item + bt * h * (d * item + lse_item)
    else:
        attn = attention.activation_bytes
    return total + attn


def plan_training(
    config,
    *,
    batch: int,
    seq_len: int,
    dp: int = 1,
    sp: int = 1,
    dtype: str = "float32",
    activation_checkpointing: bool = False,
    position_offset: int = 0,
    chunk_size: int | None = None,
) -> TrainingPlan:
    """Per-rank memory and traffic of one training step of a LongNetLM ``config``
    (a :class:`~longnet.model.LongNetConfig`) on a ``(dp, sp)`` mesh as
    ``longnet.parallel.parallelize`` sets it up, with AdamW in ``dtype``.

    ``batch`` is the global batch (split over ``dp``), ``seq_len`` the sequence length
    (split over ``sp``). Memory: FSDP2 shards of parameters, gradients and AdamW state
    (busiest rank), the full parameters in use (root plus the running and the
    prefetched layer), activations kept for backward with or without checkpointing
    (:func:`layer_activation_bytes`; the attention part from :func:`plan_run`), and a
    peak: the larger of backward's two peaks, at the loss (everything kept plus the
    logits' gradient) and, with checkpointing, in the last layer (the layer inputs and
    that layer's recomputed activations). Traffic (bytes sent per rank and step):
    FSDP2's two all-gathers and reduce-scatter; the dilated exchange of every layer
    (again in the recomputed forward with checkpointing); and, for the same run, ring
    attention (every rank passes all keys/values of its group on: ``(sp - 1)`` chunks
    of k and v forward, twice that backward for k, v and their gradients) and
    DeepSpeed-Ulysses all-to-all head parallelism (q, k, v in and the output back,
    ``(sp - 1) / sp`` of each rank's chunk, the same backward).

    ``chunk_size``: the run computes the feed-forward and the LM head with the loss in
    chunks of that many positions (``LongNetLM.set_chunk_size`` and ``forward(...,
    return_logits=False)``): no FFN hidden activations kept, no ``(B, T, vocab)``
    logits; one chunk's of each live in backward instead.
    """
    for name, value in (("batch", batch), ("seq_len", seq_len), ("dp", dp), ("sp", sp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if batch % dp:
        raise ValueError(f"batch ({batch}) must be divisible by dp ({dp})")
    if seq_len % sp:
        raise ValueError(f"seq_len ({seq_len}) must be divisible by sp ({sp})")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    item = DTYPE_BYTES[dtype]
    world, b, t = dp * sp, batch // dp, seq_len // sp
    h, hk, d = config.num_heads, config.num_kv_heads or config.num_heads, config.head_dim
    e, layers = config.embed_dim, config.num_layers
    attn = plan_run(
        seq_len,
        sp,
        heads=h,
        kv_heads=hk,
        head_dim=d,
        segment_lengths=config.segment_lengths,
        dilation_rates=config.dilation_rates,
        dtype=dtype,
        batch=b,
        layers=layers,
        causal=True,
        position_offset=position_offset,
    )
    root, layer_shapes = _param_shapes(config)
    params = sum(_numel(s) for s in root + [x for layer in layer_shapes for x in layer])
    shard = max(fsdp_shard_elements(config, world, r) for r in range(world)) * item
    full_layer = sum(_numel(s) for s in layer_shapes[0]) * item
    # One process trains without FSDP2: no gathered copies.
    unsharded = (
        0 if world == 1 else (sum(_numel(s) for s in root) * item + min(2, layers) * full_layer)
    )
    worst = max(attn.per_rank, key=lambda c: c.activation_bytes)
    chunked = chunk_size is not None
    plain = layer_activation_bytes(config, b, t, dtype=dtype, attention=worst, chunked_ffn=chunked)
    per_layer = layer_activation_bytes(
        config,
        b,
        t,
        dtype=dtype,
        attention=worst,
        activation_checkpointing=activation_checkpointing,
        chunked_ffn=chunked,
    )
    bt = b * t
    lse_item = 8 if item == 8 else 4
    v = config.vocab_size
    # final norm input + stats, the LM head's input, float32 logits and log-softmax.
    other = item * (2 * bt * e + 2 * bt) + (0 if chunked else 2 * bt * v * lse_item)
    activations = layers * per_layer + other
    grads = 3 * bt * e * item  # gradients flowing through the residual stream
    if chunked:
        assert chunk_size is not None
        bc = b * min(chunk_size, t)
        # One chunk's logits, their log-softmax and gradient; the logits are not
        # returned. One chunk's FFN recomputed: LayerNorm, fc1, GELU and gradients.
        head, returned = 3 * bc * v * lse_item, 0
        ffn_chunk = item * bc * (2 * e + 4 * config.ffn_dim)
    else:
        head, returned, ffn_chunk = bt * v * lse_item, bt * v * item, 0
    # Backward's two peaks: at the loss, everything kept plus the head's transient;
    # in the last layer, with checkpointing, the layer inputs and that layer
    # recomputed (what is outside the layers is freed by then, but the returned logits
    # stay with the caller).
    at_loss = activations + head + grads
    at_layer = layers * per_layer + (plain if activation_checkpointing else 0) + returned
    at_layer += grads + ffn_chunk
    peak = 4 * shard + unsharded + max(at_loss, at_layer)  # params, grads, 2 AdamW
    fsdp = 3 * params * item * (world - 1) // world if world > 1 else 0
    # The busiest rank (forward and backward peak on different ranks when causal).
    sp_layer = max(
        c.bytes_sent_fwd * (2 if activation_checkpointing else 1) + c.bytes_sent_bwd
        for c in attn.per_rank
    )
    kv_chunk = b * t * hk * d * item
    ring = layers * 3 * 2 * kv_chunk * (sp - 1)
    ulysses = layers * 2 * b * t * (2 * h + 2 * hk) * d * item * (sp - 1) // sp
    return TrainingPlan(
        dp=dp,
        sp=sp,
        batch=batch,
        seq_len=seq_len,
        dtype=dtype,
        activation_checkpointing=bool(activation_checkpointing),
        parameters=params,
        param_bytes_per_rank=shard,
        grad_bytes_per_rank=shard,
        optimizer_bytes_per_rank=2 * shard,
        unsharded_bytes=unsharded,
        layer_activation_bytes=per_layer,
        layer_activation_bytes_plain=plain,
        other_activation_bytes=other,
        activation_bytes=activations,
        peak_bytes=peak,
        fsdp_bytes_per_step=fsdp,
        sp_bytes_per_step=layers * sp_layer,
        ring_bytes_per_step=ring,
        ulysses_bytes_per_step=ulysses,
        attention=attn,
        chunk_size=chunk_size,
    )


# ------------------------------------------------------- sweeps and fitting


def _patterns_for(tokens, segment_lengths, dilation_rates, first_w, first_r, w_factor, r_factor):
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
        ws, rs = _patterns_for(
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
    small, large = [], []
    d = 1
    while d * d <= tokens:
        if tokens % d == 0:
            small.append(d)
            if d * d != tokens:
                large.append(tokens // d)
        d += 1
    for p in small + large[::-1]:
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


# --------------------------------------------------------------------- CLI


def _compare_table(packed: RunPlan, single: RunPlan, every_rank: bool | None = None) -> str:
    """Per-rank traffic (forward + backward, sent + received) and FLOPs of a packed
    row against the same row as one sequence."""
    lines = [
        "the same row as one sequence (no documents), per layer: k/v bytes sent + "
        "received, forward + backward (what comm_stats() counts), and FLOPs",
        f"{'rank':>5} {'traffic docs':>13} {'no docs':>11} {'ratio':>7} "
        f"{'GFLOP docs':>11} {'no docs':>9}",
    ]
    pairs = list(zip(packed.per_rank, single.per_rank))
    if every_rank is None:
        every_rank = packed.ranks <= 16
    traffic = lambda c: c.bytes_sent + c.bytes_received  # noqa: E731
    if not every_rank:
        keep = {0, packed.ranks - 1}
        keep.add(max(range(len(pairs)), key=lambda p: traffic(pairs[p][0])))
        keep.add(max(range(len(pairs)), key=lambda p: traffic(pairs[p][0]) - traffic(pairs[p][1])))
        pairs = [pairs[p] for p in sorted(keep)]
    for a, b in pairs:
        t_a, t_b = traffic(a), traffic(b)
        ratio = f"{t_a / t_b:.3g}" if t_b else ("-" if not t_a else "inf")
        lines.append(
            f"{a.rank:>5} {_fmt_bytes(t_a):>13} {_fmt_bytes(t_b):>11} {ratio:>7} "
            f"{(a.flops_fwd + a.flops_bwd) / 1e9:>11.4g} "
            f"{(b.flops_fwd + b.flops_bwd) / 1e9:>9.4g}"
        )
    worst_a = max(traffic(c) for c in packed.per_rank)
    worst_b = max(traffic(c) for c in single.per_rank)
    more = [a.rank for a, b in zip(packed.per_rank, single.per_rank) if traffic(a) > traffic(b)]
    lines.append(
        f"worst rank: {_fmt_bytes(worst_a)} with documents, {_fmt_bytes(worst_b)} without"
        + (f" ({worst_a / worst_b:.3g}x)" if worst_b else "")
        + "; "
        + (
            "no rank exchanges more with documents (they cut the segments that cross ranks)"
            if not more
            else f"{len(more)} of {packed.ranks} ranks exchange more with documents (a "
            "document that starts off a segment boundary moves the segments of a short "
            "pattern onto a rank boundary; documents only shorten the long patterns' "
            "segments)"
        )
    )
    return "\n".join(lines)


def _sweep_table(rows: list[dict[str, Any]], timed: bool) -> str:
    head = (
        f"{'N':>14} {'P':>5} {'patterns':>8} {'crossing':>8} {'sent MiB':>9} "
        f"{'recv MiB':>9} {'TFLOP':>8} {'act. GiB':>8}"
    )
    if timed:
        head += f" {'compute ms':>10} {'comm ms':>8} {'comm/comp':>9}"
    lines = [head]
    for r in rows:
        line = (
            f"{r['tokens']:>14,} {r['ranks']:>5} {r['patterns']:>8} "
            f"{r['crossing_patterns']:>8} {r['max_bytes_sent_fwd'] / 2**20:>9.2f} "
            f"{r['max_bytes_received_fwd'] / 2**20:>9.2f} "
            f"{(r['max_flops_fwd'] + r['max_flops_bwd']) / 1e12:>8.2f} "
            f"{r['max_activation_bytes'] / 2**30:>8.3f}"
        )
        if timed:
            line += (
                f" {1e3 * r['max_compute_s']:>10.2f} {1e3 * r['max_comm_s']:>8.3f} "
                f"{r['max_comm_to_compute']:>9.4f}"
            )
        lines.append(line)
    lines.append(
        "per layer, worst rank: k/v MiB sent and received forward (backward swaps "
        "them), TFLOP forward+backward, attention activations kept for backward"
        + ("; times forward+backward" if timed else "")
    )
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["tokens"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    ax = axes[0]
    ax.plot(
        ns,
        [(r["max_bytes_sent_fwd"] + r["max_bytes_sent_bwd"]) / 2**20 for r in rows],
        "o-",
        label="sent, worst rank",
    )
    ax.plot(
        ns,
        [(r["mean_bytes_sent_fwd"] + r["mean_bytes_sent_bwd"]) / 2**20 for r in rows],
        "s--",
        label="sent, mean over ranks",
    )
    ax.set_ylabel("k/v MiB per rank per layer (fwd + bwd)")
    ax2 = ax.twinx()
    ax2.step(
        ns,
        [r["crossing_patterns"] for r in rows],
        where="mid",
        color="gray",
        alpha=0.5,
        label="rank-crossing patterns",
    )
    ax2.set_ylabel("rank-crossing patterns", color="gray")
    ax.legend(fontsize=8, loc="upper left")
    ax = axes[1]
    ax.plot(
        ns,
        [(r["max_flops_fwd"] + r["max_flops_bwd"]) / 1e12 for r in rows],
        "o-",
        label="fwd + bwd, worst rank",
    )
    ax.plot(ns, [r["max_flops_fwd"] / 1e12 for r in rows], "s--", label="fwd, worst rank")
    ax.set_ylabel("TFLOP per rank per layer")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="lower right")
    ax = axes[2]
    ax.plot(
        ns,
        [r["max_activation_bytes"] / 2**30 for r in rows],
        "o-",
        label="attention activations, worst rank",
    )
    ax.set_ylabel("GiB per rank per layer")
    if rows[0].get("max_compute_s") is not None:
        ax3 = ax.twinx()
        ax3.plot(
            ns, [r["max_comm_to_compute"] for r in rows], "^:", color="C3", label="comm / compute"
        )
        ax3.set_ylabel("comm / compute time", color="C3")
        ax3.set_ylim(bottom=0)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="lower right")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"N (P = N / {rows[0]['tokens_per_rank']} ranks)")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m longnet.plan",
        description="Plan a sequence-parallel LongNet run: per rank and per layer, the "
        "key/value bytes sent and received (forward and backward), the "
        "attention's activation memory, its FLOPs and, with --tflops and "
        "--link-gbs, compute and communication time. Nothing is run: it "
        "counts what longnet.distributed's planner would do.",
        epilog="Counts take binary suffixes: 64K, 1M, 1G (= 1B = 2^30). Example, the paper's "
        "setting on 1024 ranks: python -m longnet.plan --tokens 1G --ranks 1024 "
        "--heads 12 --head-dim 64 --first-w 2048 --factor 2 --layers 12 --causal "
        "--tflops 400 --link-gbs 50 --sweep",
    )
    p.add_argument("--tokens", required=True, help="sequence length N")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--ranks", help="sequence-parallel ranks P (default 1)")
    how.add_argument("--tokens-per-rank", help="tokens per rank L (P = N / L)")
    how.add_argument(
        "--fit-memory",
        type=float,
        metavar="GIB",
        help="pick the fewest ranks whose attention memory in a training "
        "step (all layers' activations and one layer's forward "
        "buffers) fits in this many GiB per device",
    )
    p.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    p.add_argument("--heads", type=int, required=True, help="query heads H")
    p.add_argument("--kv-heads", type=int, help="key/value heads Hk (default H)")
    p.add_argument("--head-dim", type=int, required=True, help="head dim D")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES))
    p.add_argument("--layers", type=int, default=1, help="layers (for the memory total)")
    p.add_argument("--causal", action="store_true")
    p.add_argument(
        "--position-offset",
        type=int,
        default=0,
        help="absolute position of the sequence's first token (default 0)",
    )
    docs = p.add_argument_group(
        "packed documents (batch 1): the row holds documents back to back, each attended "
        "alone (segments restart at its first token, which sits at --position-offset), as "
        "sequence_parallel_dilated_attention with cu_seqlens; the output adds the same row "
        "without documents for comparison"
    )
    how_docs = docs.add_mutually_exclusive_group()
    how_docs.add_argument(
        "--doc-lengths",
        metavar="LIST",
        help="comma-separated document lengths (e.g. 4096,8192,1K), repeated in order "
        "until --tokens are filled (the last document is cut)",
    )
    how_docs.add_argument(
        "--doc-length-dist",
        metavar="SPEC",
        help="document lengths drawn until --tokens are filled: fixed:LEN, uniform:LO,HI "
        "or lognormal:MEAN,SIGMA (mean MEAN tokens, log-space deviation SIGMA)",
    )
    docs.add_argument(
        "--doc-seed", type=int, default=0, help="seed of --doc-length-dist's draws (0)"
    )
    g = p.add_argument_group("patterns: a list, or the geometric rule")
    g.add_argument("--segment-lengths", nargs="+", help="w_1 .. w_m")
    g.add_argument("--dilation-rates", nargs="+", help="r_1 .. r_m")
    g.add_argument("--first-w", help="geometric: first segment length")
    g.add_argument("--first-r", type=int, default=1, help="geometric: first rate (1)")
    g.add_argument(
        "--factor",
        type=int,
        default=2,
        help="geometric: w_{i+1} = factor * w_i up to the first w >= N (2)",
    )
    g.add_argument(
        "--r-factor",
        type=int,
        help="geometric: r_{i+1} = r-factor * r_i (default --factor: w/r fixed)",
    )
    m = p.add_argument_group(
        "training on a (dp, sp) mesh (with --embed-dim: --ranks is sp, --batch the global "
        "batch, --layers the model's; adds FSDP2 memory, all activations and traffic)"
    )
    m.add_argument("--embed-dim", type=int, help="model width E (turns the training plan on)")
    m.add_argument("--ffn-dim", type=int, help="feed-forward width (default 4 E)")
    m.add_argument("--vocab-size", type=int, default=259, help="vocabulary (259)")
    m.add_argument("--dp", type=int, default=1, help="data-parallel degree (1)")
    m.add_argument("--activation-checkpointing", action="store_true")
    m.add_argument(
        "--chunk-size",
        type=int,
        help="feed-forward and LM head + loss over this many positions at a time "
        "(LongNetLM.set_chunk_size, train_lm.py --chunk-size; default off)",
    )
    t = p.add_argument_group("time (both needed)")
    t.add_argument("--tflops", type=float, help="TFLOP/s the attention sustains per device")
    t.add_argument("--link-gbs", type=float, help="GB/s per device for the all-to-alls")
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print the plan as JSON")
    o.add_argument("--per-rank", action="store_true", help="print every rank")
    o.add_argument(
        "--sweep",
        action="store_true",
        help="also plan P = 1, 2, 4, ... up to P with L fixed (N and P grow "
        "together; geometric patterns follow N)",
    )
    o.add_argument(
        "--plot",
        metavar="PATH",
        help="plot the sweep (per-rank traffic, FLOPs, memory) to PATH, its "
        "numbers to PATH with .json",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        tokens = parse_count(args.tokens)
        ws = [parse_count(x) for x in args.segment_lengths] if args.segment_lengths else None
        rs = [parse_count(x) for x in args.dilation_rates] if args.dilation_rates else None
        first_w = parse_count(args.first_w) if args.first_w else None
        if first_w is None and ws is None:
            raise ValueError(
                "give the patterns: --segment-lengths with --dilation-rates, "
                "or --first-w (with --first-r, --factor) for geometric ones"
            )
        if (args.tflops is None) != (args.link_gbs is None):
            raise ValueError("--tflops and --link-gbs go together")
        pattern_kw = dict(
            segment_lengths=ws,
            dilation_rates=rs,
            first_w=first_w,
            first_r=args.first_r,
            w_factor=args.factor,
            r_factor=args.r_factor,
        )
        ws, rs = _patterns_for(tokens, **pattern_kw)
        kw = dict(
            heads=args.heads,
            kv_heads=args.kv_heads,
            head_dim=args.head_dim,
            dtype=args.dtype,
            batch=args.batch,
            layers=args.layers,
            causal=args.causal,
            position_offset=args.position_offset,
        )
        packed = args.doc_lengths is not None or args.doc_length_dist is not None
        if packed:
            if args.sweep or args.plot or args.embed_dim is not None:
                raise ValueError(
                    "--sweep, --plot and --embed-dim plan one sequence per row: not with "
                    "--doc-lengths or --doc-length-dist"
                )
            if args.batch != 1:
                raise ValueError(f"packed documents need --batch 1, got {args.batch}")
            kw["doc_lengths"] = document_lengths(
                tokens,
                lengths=args.doc_lengths.split(",") if args.doc_lengths else None,
                distribution=args.doc_length_dist,
                seed=args.doc_seed,
            )
        if args.fit_memory is not None:
            ranks = fit_ranks(
                tokens, args.fit_memory * 2**30, segment_lengths=ws, dilation_rates=rs, **kw
            )
        elif args.tokens_per_rank is not None:
            per = parse_count(args.tokens_per_rank)
            if per < 1 or tokens % per:
                raise ValueError(f"--tokens-per-rank ({per}) must divide --tokens ({tokens})")
            ranks = tokens // per
        else:
            ranks = parse_count(args.ranks) if args.ranks is not None else 1
        run_kw = dict(
            segment_lengths=ws, dilation_rates=rs, tflops=args.tflops, link_gbs=args.link_gbs
        )
        plan = plan_run(tokens, ranks, **run_kw, **kw)
        rows = None
        if args.sweep or args.plot:
            counts = [1 << e for e in range(ranks.bit_length()) if (1 << e) < ranks] + [ranks]
            counts = [c for c in counts if tokens // ranks * c > 0]
            sweep_kw = dict(kw)
            del sweep_kw["heads"], sweep_kw["head_dim"]
            rows = scaling_sweep(
                tokens // ranks,
                counts,
                heads=args.heads,
                head_dim=args.head_dim,
                tflops=args.tflops,
                link_gbs=args.link_gbs,
                **pattern_kw,
                **sweep_kw,
            )
        unpacked = None
        if packed:
            unpacked = plan_run(
                tokens, ranks, **run_kw, **{k: v for k, v in kw.items() if k != "doc_lengths"}
            )
        training = None
        if args.embed_dim is not None:
            from longnet.model import LongNetConfig

            cfg = LongNetConfig(
                vocab_size=args.vocab_size,
                num_layers=args.layers,
                embed_dim=args.embed_dim,
                num_heads=args.heads,
                num_kv_heads=args.kv_heads,
                ffn_dim=args.ffn_dim,
                segment_lengths=ws,
                dilation_rates=rs,
            )
            if cfg.head_dim != args.head_dim:
                raise ValueError(
                    f"--embed-dim / --heads = {cfg.head_dim} but --head-dim is {args.head_dim}"
                )
            training = plan_training(
                cfg,
                batch=args.batch * args.dp,
                seq_len=tokens,
                dp=args.dp,
                sp=ranks,
                dtype=args.dtype,
                activation_checkpointing=args.activation_checkpointing,
                position_offset=args.position_offset,
                chunk_size=args.chunk_size,
            )
    except ValueError as exc:
        parser.error(str(exc))
    timed = args.tflops is not None
    if args.json:
        out = plan.to_dict()
        if rows is not None:
            out["sweep"] = rows
        if training is not None:
            out["training"] = training.to_dict()
        if unpacked is not None:
            out["without_documents"] = unpacked.to_dict()
        json.dump(out, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        if args.fit_memory is not None:
            print(
                f"fewest ranks within {args.fit_memory:g} GiB of attention memory per "
                f"device: {ranks}"
            )
        print(plan.table(every_rank=True if args.per_rank else None))
        if unpacked is not None:
            print("\n" + _compare_table(plan, unpacked, every_rank=True if args.per_rank else None))
        if rows is not None:
            print(
                f"\nN and P grow together (L = {tokens // ranks:,} tokens per rank"
                + (", patterns geometric in N" if args.first_w else ", patterns fixed")
                + "):"
            )
            print(_sweep_table(rows, timed))
        if training is not None:
            print("\ntraining step:")
            print(training.table())
    if args.plot and rows is not None:  # --plot always runs the sweep
        title = (
            f"longnet.plan: L = {tokens // ranks:,} tokens per rank, H = {args.heads}, "
            f"Hk = {args.kv_heads or args.heads}, D = {args.head_dim}, {args.dtype}, "
            f"{'causal' if args.causal else 'not causal'}, "
            + (
                f"w_0 = {first_w}, r_0 = {args.first_r}, factor {args.factor}"
                if first_w
                else f"w = {ws}, r = {rs}"
            )
        )
        _plot(rows, args.plot, title)
        stem = os.path.splitext(args.plot)[0]
        with open(stem + ".json", "w") as f:
            json.dump(
                {
                    "command": "python -m longnet.plan "
                    + " ".join(argv if argv is not None else sys.argv[1:]),
                    "rows": rows,
                },
                f,
                indent=1,
            )
        if not args.json:
            print(f"saved {args.plot} and {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
