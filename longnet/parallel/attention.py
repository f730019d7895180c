"""Sequence-parallel dilated attention over ``torch.distributed`` (LongNet section 3.1).

A sequence of ``N = P * L`` positions is split over the ``P`` ranks of a process
group: rank ``p`` holds positions ``[p*L, (p+1)*L)`` of q, k and v (shifted by
``position_offset`` when the sequence itself starts there).
:func:`sequence_parallel_dilated_attention` returns this rank's rows of exactly the
operator of docs/operator.md evaluated on the whole sequence.

How it works:

* Each rank computes every pattern on its own rows in one call of
  :func:`longnet.dilated_attention` (one per document fragment, one packed call for
  the documents inside the rank), with the segment boundaries they have in the whole
  sequence: a segment that spans several ranks is clipped to the rows here, which
  gives each of its queries exactly its keys on this rank.
* The rest of a rank-crossing segment is handled in the dilated frame: for head
  ``j`` its sparse segment is the rows ``s*w + (j mod r) + t*r``. Each rank selects
  its own rows of that sparse segment (``1/r`` of its chunk per head; with
  grouped-query attention each key/value head once per offset its query heads
  need), and the ranks of the segment exchange them with one autograd-aware
  all-to-all (backward: the reverse all-to-all). A rank's queries of the segment
  then attend to the received rows alone, in one operator call with the pattern
  ``([n_keys], [1])`` and no causal mask: under ``is_causal`` a rank receives only
  from the ranks before it, whose rows all precede its queries. Heads whose offsets
  give the same per-rank row counts share one call.
* The received keys' results are merged into the local ones by their log-sum-exp,
  at the rows they reach only, which is exact (docs/operator.md: one softmax over the
  multiset of keys of all patterns) and differentiable.
* Packed documents (``cu_seqlens``): every document is attended alone, its segments
  aligned to its own first token. Documents inside one rank's chunk run in one packed
  call of the operator; a document that crosses a rank boundary is planned as above in
  its own frame (its fragment on each rank is a sequence of its own, at its position
  in the document), so only its segments cross ranks and only its rows are exchanged.
  The memory a rank holds is that of one sequence's: one local result per row, plus
  the rows of the segments that cross its boundaries.

All exchanges of one call go into a single all-to-all (and one in backward). A rank
sends its ``L / r`` selected rows per head to each other rank of a segment it shares
and receives the ``w / r`` rows of its segments: constant in ``N`` for fixed
patterns. :func:`~longnet.parallel.comm_stats` reports the bytes.

Every rank of ``group`` must call with the same configuration (batch size, ``L``,
heads, head dim, dtype, patterns, ``is_causal``, ``scale``). The first time a rank
meets a configuration it checks it against the others and raises a ``ValueError``
on a mismatch. Collectives wait at most :func:`~longnet.parallel.set_timeout`
seconds, so a dead rank makes the others raise a ``RuntimeError`` instead of hanging.

Training: the attention backward returns the gradients of the sum of all ranks'
losses. Parameters replicated over the sequence-parallel ranks need their gradients
summed over ``group`` (e.g. ``torch.distributed.all_reduce``, or DDP over it);
:func:`longnet.parallel.parallelize` does it with FSDP2 over a ``(dp, sp)`` mesh.
"""

from __future__ import annotations

import bisect
import math
import struct
import zlib
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

import longnet
from longnet.ops import validate_inputs, validate_patterns, validate_position_offset
from longnet.packing import PackedDocuments, as_packed_documents
from longnet.parallel.collectives import (
    Pending,
    all_gather_small,
    all_to_all_start,
    group_rank_and_size,
)
from longnet.parallel.layout import spanning_documents
from longnet.parallel.schedule import RankPlan, on_device, plan_rank

__all__ = ["sequence_parallel_dilated_attention"]


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


def _configuration(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ws: tuple[int, ...],
    rs: tuple[int, ...],
    is_causal: bool,
    scale: float,
    return_lse: bool,
    offset: int,
    cu: list[int] | None,
) -> tuple[tuple[int, ...], dict[str, object]]:
    """The call's configuration as ints, one per entry of ``_FIELDS`` (patterns,
    scale and document boundaries as checksums), and how this rank's values of the
    checksummed fields read in an error message."""
    b, chunk, h, d = q.shape
    cfg = (
        b,
        chunk,
        h,
        k.shape[2],
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
    shown = {
        "segment_lengths/dilation_rates": f"{list(ws)}/{list(rs)}",
        "dtype": str(q.dtype),
        "scale": scale,
        "cu_seqlens": "none" if cu is None else f"{len(cu) - 1} documents (checksum)",
    }
    return cfg, shown


def _check_ranks_agree(
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


def _document_offsets_on_host(cu_seqlens: object, total: int, device: torch.device) -> list[int]:
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
    cu_seqlens: Tensor | PackedDocuments | None = None,
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
            Documents may span any number of ranks. A
            :class:`~longnet.packing.PackedDocuments` of the whole sequence may stand
            for it (its host offsets are used; nothing is read back).

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
    b, chunk = q.shape[0], q.shape[1]
    cu: list[int] | None = None
    if cu_seqlens is not None:
        if b != 1:
            raise ValueError(
                f"packed documents (cu_seqlens) need batch size 1 (q of shape (1, L, H, D)), "
                f"got batch size {b}"
            )
        if isinstance(cu_seqlens, PackedDocuments):
            cu = list(as_packed_documents(cu_seqlens, world * chunk).offsets)  # no read
        else:
            cu = _document_offsets_on_host(cu_seqlens, world * chunk, q.device)
    if world == 1:
        cu_t: Tensor | PackedDocuments | None = None
        if isinstance(cu_seqlens, PackedDocuments):
            cu_t = cu_seqlens.to(q.device)
        elif cu is not None:
            cu_t = torch.tensor(cu, dtype=torch.int64)  # on the CPU: read there
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
            cu_seqlens_q=cu_t,
            cu_seqlens_k=cu_t,
        )
    cfg, shown = _configuration(q, k, v, ws, rs, is_causal, scale, return_lse, offset, cu)
    _check_ranks_agree(group, rank, cfg, q.device, shown)
    if chunk == 0:
        raise ValueError("q must hold at least one position per rank, got L = 0")

    docs = None if cu is None else spanning_documents(cu, world, chunk)
    plan = plan_rank(
        world, rank, chunk, q.shape[2], k.shape[2], ws, rs, bool(is_causal), offset, docs
    )
    out, lse = _run_plan(plan, q, k, v, group, rank, cu, is_causal, scale)
    return (out, lse) if return_lse else out


def _run_plan(
    plan: RankPlan,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: dist.ProcessGroup | None,
    rank: int,
    cu: list[int] | None,
    is_causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """This rank's ``(out, lse)``: the exchange started, the local calls computed
    while it is in flight, then the cross-rank calls on the received rows, each
    crossing pattern merged into the local result."""
    k_sel, v_sel, got, pending = _start_exchange(plan, k, v, group)
    base_o, base_l = _local_calls(plan, q, k, v, rank, cu, is_causal, scale)
    if pending is not None:
        assert got is not None  # all_to_all_start returns both
        pending.wait()
        # From here on the backward can start the reverse exchange: the local
        # patterns' backward (created above) then runs while it is in flight.
        b, d = q.shape[0], q.shape[3]
        got = pending.arrived(got).view(-1, 2, b, d).permute(1, 2, 0, 3)  # (2, B, rows, D)
    outs, lses = _cross_rank_calls(plan, q, got, scale)
    out, lse = _merge_patterns(plan, base_o, base_l, outs, lses)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        # Tie q, k, v and the exchange into both outputs (adding an exact zero) so
        # the backward runs, and reaches the exchange, on every rank.
        tie = q[:0].sum() + k_sel[:0].sum() + v_sel[:0].sum()
        if got is not None:
            tie = tie + got[:, :0].sum()
        out = out + tie.to(out.dtype)
        lse = lse + tie.to(lse.dtype)
    return out, lse


def _start_exchange(
    plan: RankPlan, k: Tensor, v: Tensor, group: dist.ProcessGroup | None
) -> tuple[Tensor, Tensor, Tensor | None, Pending | None]:
    """``(k_sel, v_sel, got, pending)``: every key/value row this rank sends (one
    gather per tensor), and their all-to-all, started (``got`` and ``pending`` are
    None when the ranks exchange nothing)."""
    b, chunk, hk, d = k.shape
    kv_index = on_device(plan, plan.kv_index, k.device)
    k_sel = k.reshape(b, chunk * hk, d).index_select(1, kv_index)
    v_sel = v.reshape(b, chunk * hk, d).index_select(1, kv_index)
    if not plan.exchange:
        return k_sel, v_sel, None, None
    # One all-to-all carries every cross-rank row of this call, laid out per row as
    # (k or v, B, D) so that each destination's rows are contiguous. It runs while
    # this rank computes its local patterns.
    flat = torch.stack([k_sel, v_sel]).permute(2, 0, 1, 3)
    unit = 2 * b * d
    got, pending = all_to_all_start(
        flat.reshape(-1),
        [unit * x for x in plan.send_rows],
        [unit * x for x in plan.recv_rows],
        group,
        "key/value exchange",
        free_sent=True,  # flat is this exchange's own copy
    )
    return k_sel, v_sel, got, pending


def _local_calls(
    plan: RankPlan,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rank: int,
    cu: list[int] | None,
    is_causal: bool,
    scale: float,
) -> tuple[list[Tensor], list[Tensor]]:
    """The local calls, in row order (outputs and lse), every pattern on this rank's
    rows: documents inside this rank in one packed call, each sequence or document
    fragment in its own."""
    chunk = q.shape[1]
    base_o, base_l = [], []
    for piece in plan.pieces:
        a, z = piece.a, piece.b
        qa, ka, va = (q, k, v) if (a, z) == (0, chunk) else (q[:, a:z], k[:, a:z], v[:, a:z])
        local_cu = None
        if piece.packed:
            assert cu is not None  # packed pieces exist only with documents
            g0 = rank * chunk + a
            lo_i, hi_i = bisect.bisect_left(cu, g0), bisect.bisect_right(cu, g0 + z - a)
            # On the CPU: the kernels read offsets on the host (no copy to the device).
            local_cu = torch.tensor([x - g0 for x in cu[lo_i:hi_i]], dtype=torch.int64)
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
        base_o.append(o_p)
        base_l.append(l_p)
    return base_o, base_l


def _cross_rank_calls(
    plan: RankPlan, q: Tensor, got: Tensor | None, scale: float
) -> tuple[dict[int, list[Tensor]], dict[int, list[Tensor]]]:
    """Every cross-rank call: its queries attend to the rows it received (``got``,
    ``(2, B, rows, D)``), all of them (no causal mask: under ``is_causal`` they come
    from earlier ranks). Per pattern, the results: flat ``(B, rows * H, D)`` outputs
    and ``(B, rows * H)`` lse, in ``plan.out_index`` order."""
    b, chunk, h, d = q.shape
    outs: dict[int, list[Tensor]] = {i: [] for i in plan.cross_patterns}
    lses: dict[int, list[Tensor]] = {i: [] for i in plan.cross_patterns}
    if not plan.calls:
        return outs, lses
    assert got is not None  # calls exist only after an exchange
    q_sel = q.reshape(b, chunk * h, d).index_select(1, on_device(plan, plan.q_index, q.device))
    for call in plan.calls:
        ks, vs = [], []
        for start, rows in call.pieces:
            size = rows * call.n_pairs
            ks.append(got[0, :, start : start + size].reshape(b, rows, call.n_pairs, d))
            vs.append(got[1, :, start : start + size].reshape(b, rows, call.n_pairs, d))
        kk = torch.cat(ks, dim=1) if len(ks) > 1 else ks[0]
        vv = torch.cat(vs, dim=1) if len(vs) > 1 else vs[0]
        if call.head_map is not None:
            hm = on_device(plan, call.head_map, q.device)
            kk, vv = kk.index_select(2, hm), vv.index_select(2, hm)
        qq = q_sel[:, call.q_start : call.q_start + call.n_q * call.n_heads]
        o_c, l_c = _attend_received(qq.reshape(b, call.n_q, call.n_heads, d), kk, vv, scale)
        outs[call.pattern].append(o_c.reshape(b, -1, d))
        lses[call.pattern].append(l_c.reshape(b, -1))
    return outs, lses


def _attend_received(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Every query of ``q`` ``(B, n, H, D)`` attends to every key of ``k`` ``(B, m, Hk,
    D)``: ``(out (B, n, H, D), lse (B, n, H))``. The operator takes at most as many
    queries as keys, so with ``n > m`` the queries run as ``ceil(n / m)`` batch rows
    of ``m`` (zero-padded), each against the same keys."""
    b, n, h, d = q.shape
    m = k.shape[1]
    blocks = -(-n // m)
    if blocks > 1:
        q = torch.nn.functional.pad(q, (0, 0, 0, 0, 0, blocks * m - n)).reshape(b * blocks, m, h, d)
        k = k.unsqueeze(1).expand(b, blocks, *k.shape[1:]).reshape(b * blocks, *k.shape[1:])
        v = v.unsqueeze(1).expand(b, blocks, *v.shape[1:]).reshape(b * blocks, *v.shape[1:])
    o, lse = longnet.dilated_attention(q, k, v, [m], [1], scale=scale, return_lse=True)
    lse = lse.transpose(1, 2)
    if blocks > 1:
        o = o.reshape(b, blocks * m, h, d)[:, :n]
        lse = lse.reshape(b, blocks * m, h)[:, :n]
    return o, lse


def _merge_patterns(
    plan: RankPlan,
    base_o: list[Tensor],
    base_l: list[Tensor],
    outs: dict[int, list[Tensor]],
    lses: dict[int, list[Tensor]],
) -> tuple[Tensor, Tensor]:
    """The local result (``base_o`` / ``base_l`` in row order) with each cross-rank
    pattern merged in at the entries it reaches only: ``(B, L, H, D)`` and ``(B, H,
    L)``."""
    out = torch.cat(base_o, dim=1) if len(base_o) > 1 else base_o[0]
    lse = torch.cat(base_l, dim=2) if len(base_l) > 1 else base_l[0]
    b, chunk, h, d = out.shape
    out, lse = out.reshape(b, chunk * h, d), lse.reshape(b, h * chunk)
    for i in plan.cross_patterns:
        if not outs[i]:
            continue  # no head of this rank has rows in the pattern's segments here
        o_i = torch.cat(outs[i], dim=1) if len(outs[i]) > 1 else outs[i][0]
        l_i = torch.cat(lses[i], dim=1) if len(lses[i]) > 1 else lses[i][0]
        dev = out.device
        io, il = on_device(plan, plan.out_index[i], dev), on_device(plan, plan.lse_index[i], dev)
        o_m, l_m = _merge(out.index_select(1, io), lse.index_select(1, il), o_i, l_i)
        out, lse = out.index_copy(1, io, o_m), lse.index_copy(1, il, l_m)
    return out.view(b, chunk, h, d), lse.view(b, h, chunk)
