"""The cost model of one sequence-parallel attention layer: per rank, the key/value
bytes sent and received forward and backward, the FLOPs, the activation memory and,
with a device and a link speed, the compute and communication time
(:func:`plan_run` -> :class:`RunPlan` of :class:`RankCost`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from longnet.ops import validate_patterns
from longnet.plan.counting import RankCount, attention_memory, count_ranks, index_bytes
from longnet.plan.documents import check_doc_lengths, cumulative, spanning
from longnet.plan.units import DTYPE_BYTES, format_bytes

__all__ = ["BWD_FLOP_FACTOR", "RankCost", "RunPlan", "plan_run"]

BWD_FLOP_FACTOR = 2.5  # backward: QK^T again, dP, dV, dQ, dK = 5 products vs 2


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


_SUMMARY_FIELDS = (
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
)


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

    def _spanning_documents(self) -> tuple[tuple[int, int], ...]:
        """The packed documents ``(start, end)`` that cross a rank boundary."""
        return spanning(self.doc_lengths, self.ranks, self.tokens_per_rank)

    def summary(self) -> dict[str, Any]:
        """Worst-rank (and mean) numbers per layer, as plain values."""
        out = {
            "tokens": self.tokens,
            "ranks": self.ranks,
            "tokens_per_rank": self.tokens_per_rank,
            "patterns": len(self.segment_lengths),
            "crossing_patterns": len(self.crossing_patterns),
        }
        for name in _SUMMARY_FIELDS:
            out[f"max_{name}"] = self.worst(name)
            out[f"mean_{name}"] = self.mean(name)
        out["memory_per_rank_bytes"] = self.memory_per_rank_bytes
        return out

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("per_rank", "doc_lengths")}
        if self.doc_lengths is not None:
            d["documents"] = len(self.doc_lengths)
            d["spanning_documents"] = len(self._spanning_documents())
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
            f"sent {format_bytes(self.worst('bytes_sent_fwd'))} fwd / "
            f"{format_bytes(self.worst('bytes_sent_bwd'))} bwd, "
            f"{self.worst('flops_fwd') / 1e12:.3g} TFLOP fwd, activations "
            f"{format_bytes(self.worst('activation_bytes'))})"
        )

    def table(self, every_rank: bool | None = None) -> str:
        """A text table: the configuration, then one line per rank (or, for more than
        16 ranks unless ``every_rank``, the ranks that are worst in some column)."""
        if every_rank is None:
            every_rank = self.ranks <= 16
        lines = self._table_header()
        timed = self.tflops is not None and self.link_gbs is not None
        head = (
            f"{'rank':>5} {'sent fwd':>10} {'recv fwd':>10} {'sent bwd':>10} "
            f"{'recv bwd':>10} {'GFLOP fwd':>10} {'GFLOP bwd':>10} {'act. mem':>10}"
        )
        if timed:
            head += f" {'compute ms':>10} {'comm ms':>8} {'comm/comp':>9}"
        lines.append(head)
        rows = self.per_rank
        if not every_rank:
            keep = {0, self.ranks - 1}
            for name in ("bytes_sent_fwd", "bytes_received_fwd", "flops_fwd", "activation_bytes"):
                keep.add(max(rows, key=lambda c: getattr(c, name)).rank)
            rows = [rows[p] for p in sorted(keep)]
        lines.extend(_rank_line(c) for c in rows)
        if not every_rank:
            lines.append(
                f"(ranks shown: first, last and the worst in some column; "
                f"--per-rank or --json for all {self.ranks})"
            )
        lines.extend(self._table_footer(timed))
        return "\n".join(lines)

    def _table_header(self) -> list[str]:
        """The table's lines above the per-rank columns: the configuration, the
        documents and the patterns."""
        pats = ", ".join(f"({w}, {r})" for w, r in zip(self.segment_lengths, self.dilation_rates))
        lines = [
            f"N = {self.tokens:,} tokens on P = {self.ranks} ranks (L = "
            f"{self.tokens_per_rank:,} per rank), B = {self.batch}, H = {self.heads}, "
            f"Hk = {self.kv_heads}, D = {self.head_dim}, {self.dtype}, "
            f"{'causal' if self.causal else 'not causal'}, {self.layers} layers"
            + (f", first position {self.position_offset:,}" if self.position_offset else "")
        ]
        if self.doc_lengths is not None:
            lines.append(
                f"packed documents: {len(self.doc_lengths):,} (mean "
                f"{self.tokens / max(1, len(self.doc_lengths)):,.0f}, longest "
                f"{max(self.doc_lengths, default=0):,} tokens; each attended alone, "
                f"{len(self._spanning_documents())} cross a rank boundary)"
            )
        lines += [
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
        return lines

    def _table_footer(self, timed: bool) -> list[str]:
        """The table's lines below the per-rank columns: the worst rank's totals and,
        when ``timed``, its times."""
        f = format_bytes
        lines = [
            f"worst rank per layer: sent {f(self.worst('bytes_sent_fwd'))} fwd + "
            f"{f(self.worst('bytes_sent_bwd'))} bwd, received "
            f"{f(self.worst('bytes_received_fwd'))} fwd + "
            f"{f(self.worst('bytes_received_bwd'))} bwd, "
            f"{self.worst('flops_fwd') / 1e12:.4g} + {self.worst('flops_bwd') / 1e12:.4g} "
            f"TFLOP, activations {f(self.worst('activation_bytes'))} (forward "
            f"peak {f(self.worst('peak_bytes'))}; "
            f"{f(self.memory_per_rank_bytes)} for {self.layers} layers)"
        ]
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
        return lines


def _rank_line(c: RankCost) -> str:
    """One rank's line of :meth:`RunPlan.table`."""
    f = format_bytes
    line = (
        f"{c.rank:>5} {f(c.bytes_sent_fwd):>10} "
        f"{f(c.bytes_received_fwd):>10} {f(c.bytes_sent_bwd):>10} "
        f"{f(c.bytes_received_bwd):>10} {c.flops_fwd / 1e9:>10.4g} "
        f"{c.flops_bwd / 1e9:>10.4g} {f(c.activation_bytes):>10}"
    )
    if c.compute_s is not None and c.comm_s is not None:  # timed
        line += f" {1e3 * c.compute_s:>10.4g} {1e3 * c.comm_s:>8.4g} {c.comm_to_compute:>9.3g}"
    return line


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
    position_offset,
):
    """The checked patterns ``(ws, rs)``; a ValueError names the first argument out
    of range."""
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
    patterns = validate_patterns(segment_lengths, dilation_rates)
    if (
        isinstance(position_offset, bool)
        or not isinstance(position_offset, int)
        or position_offset < 0
    ):
        raise ValueError(f"position_offset must be an int >= 0, got {position_offset!r}")
    return patterns


def _rank_cost(
    p: int,
    rc: RankCount,
    *,
    ranks: int,
    chunk: int,
    batch: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    item: int,
    exchange: bool,
    tflops: float | None,
    link_gbs: float | None,
) -> RankCost:
    """Rank ``p``'s :class:`RankCost` from its counts ``rc``."""
    unit = 2 * batch * head_dim * item  # one row of k and one of v
    held, peak = attention_memory(rc, ranks, chunk, batch, heads, kv_heads, head_dim, item)
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
        flops_bwd=BWD_FLOP_FACTOR * fwd,
        activation_bytes=held,
        peak_bytes=peak,
        index_bytes=index_bytes(rc, chunk, heads),
    )
    if tflops is not None and link_gbs is not None:
        rate, link = tflops * 1e12, link_gbs * 1e9
        cost.compute_s = (cost.flops_fwd + cost.flops_bwd) / rate
        cost.comm_s = (
            max(cost.bytes_sent_fwd, cost.bytes_received_fwd)
            + max(cost.bytes_sent_bwd, cost.bytes_received_bwd)
        ) / link
        cost.overlap_s = 4.0 * batch * head_dim * rc.local_pairs / rate
    return cost


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
    of :func:`longnet.parallel.sequence_parallel_dilated_attention` for ``tokens``
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
            :func:`longnet.parallel.sequence_parallel_dilated_attention`.
        doc_lengths: packed documents: the lengths (ints >= 0, in order, summing to
            ``tokens``) of the documents the row holds, each attended alone (its
            first token at ``position_offset``), as ``sequence_parallel_dilated_attention``
            with ``cu_seqlens``; ``batch`` must be 1. See :func:`document_lengths`.

    Returns:
        A :class:`RunPlan`; ``per_rank[p]`` holds rank ``p``'s :class:`RankCost`.
        Bytes are those :func:`longnet.parallel.comm_stats` counts (forward plus
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
        position_offset,
    )
    cu = None
    if doc_lengths is not None:
        doc_lengths = check_doc_lengths(doc_lengths, tokens)
        if batch != 1:
            raise ValueError(f"doc_lengths (packed documents) need batch = 1, got {batch}")
        cu = cumulative(doc_lengths)
    chunk = tokens // ranks
    counts = count_ranks(ranks, chunk, heads, kv_heads, ws, rs, bool(causal), position_offset, cu)
    crossing = sorted({i for rc in counts for i in rc.crossing})
    per_rank = [
        _rank_cost(
            p,
            rc,
            ranks=ranks,
            chunk=chunk,
            batch=batch,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            item=DTYPE_BYTES[dtype],
            exchange=bool(crossing),
            tflops=tflops,
            link_gbs=link_gbs,
        )
        for p, rc in enumerate(counts)
    ]
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
