"""Dilated attention the way the official LongNet code computes it: gather, SDPA, merge.

This is the baseline the benchmarks compare ``longnet.dilated_attention`` against. It
computes exactly the function of docs/operator.md (multiset softmax over all patterns, head
offset ``j mod r``, grouped-query attention, causal, ``Nq <= Nk`` bottom-right
aligned, rows with no key give ``out = 0`` and ``lse = -inf``) with plain PyTorch:

1. For every pattern ``(w, r)`` (``w`` clipped to the sequence length), cut the
   sequence into segments of ``w`` rows (the full ones as one batch, a shorter last
   one as a second batch), and copy out, for every head offset ``o``, rows ``o::r``
   of heads ``o::r`` (the sparse segments; one ``index_select`` per tensor and
   pattern): gathered ``(B * S, w / r, H / r, D)`` tensors.
2. Run PyTorch's CPU flash attention on the gathered segments, batched over
   segments and heads (``aten::_scaled_dot_product_flash_attention_for_cpu``, the
   kernel ``torch.nn.functional.scaled_dot_product_attention`` dispatches to on CPU;
   it also returns the per-row log-sum-exp).
3. Scatter outputs and log-sum-exps back to their positions.
4. Merge the patterns by log-sum-exp: ``lse = logsumexp_i lse_i`` and
   ``out = sum_i exp(lse_i - lse) * out_i``.

Unlike the official code, the mixing weights are not detached: gradients flow through
every ``lse_i``. PyTorch's flash backward has no input for an incoming log-sum-exp
gradient, so ``_SegmentAttention`` folds it in with one extra head-dim column (see its
docstring). Queries of a decoding call (``Nq < Nk``) are padded with zero rows up to
the first segment that holds a query; their results are dropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from longnet.ops import validate_inputs, validate_patterns

__all__ = ["gather_sdpa_dilated_attention"]

_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


class _SegmentAttention(torch.autograd.Function):
    """Softmax attention on a batch of gathered segments, returning ``(out, lse)``.

    Inputs are ``(B', L, H', D)`` contiguous tensors (all heads of one call share the
    segment rows); ``out`` is ``(B', L, H', D)`` and ``lse`` is ``(B', H', L)``. Both
    outputs are differentiable.

    The flash backward computes ``dS = P * (dP - Delta)`` with
    ``Delta = rowsum(dout * out)``. An incoming ``dlse`` adds ``dlse * P`` to ``dS``,
    i.e. replaces ``Delta`` by ``Delta - dlse``. Appending a zero column to q, k, v,
    a ``-dlse`` column to ``out`` and a ones column to ``dout`` does exactly that and
    leaves ``q k^T``, ``dP`` and the first ``D`` columns of every gradient unchanged.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, is_causal: bool, scale: float):
        out, lse = _flash_fwd(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            0.0,
            is_causal,
            scale=scale,
        )
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.is_causal = is_causal
        ctx.scale = scale
        return out.transpose(1, 2), lse

    @staticmethod
    def backward(ctx, grad_out: Tensor, grad_lse: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        gout = grad_out.transpose(1, 2)
        if not bool(grad_lse.ne(0).any()):
            dq, dk, dv = _flash_bwd(gout, qt, kt, vt, out, lse, 0.0, ctx.is_causal, scale=ctx.scale)
            return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None, None
        zero = qt.new_zeros(qt.shape[:-1] + (1,))
        aug = lambda t, col: torch.cat([t, col], dim=-1)  # noqa: E731
        dq, dk, dv = _flash_bwd(
            aug(gout, torch.ones_like(zero)),
            aug(qt, zero),
            aug(kt, zero),
            aug(vt, zero),
            aug(out, -grad_lse.unsqueeze(-1).to(out.dtype)),
            lse,
            0.0,
            ctx.is_causal,
            scale=ctx.scale,
        )
        d = q.shape[-1]
        return (
            dq[..., :d].transpose(1, 2),
            dk[..., :d].transpose(1, 2),
            dv[..., :d].transpose(1, 2),
            None,
            None,
        )


class _GatherRows(torch.autograd.Function):
    """``x.index_select(0, index)`` for indices without repeats.

    Autograd's own backward of ``index_select`` accumulates (``index_add``), which
    is slow on CPU; distinct indices allow a plain ``index_copy`` instead.
    """

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        ctx.rows = x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        full = grad.new_zeros((ctx.rows,) + tuple(grad.shape[1:]))
        return full.index_copy_(0, index, grad), None


def _pattern_chunks(n: int, w: int, r: int, h: int) -> list[tuple[int, int, int, int]]:
    """Batches of one pattern: ``(first row, segments, row offset o, rows per segment)``.

    The full segments form one batch per head offset, a shorter last segment another.
    """
    nfull = n // w
    pieces = [(0, nfull, w)] if nfull else []
    if n > nfull * w:
        pieces.append((nfull * w, 1, n - nfull * w))
    return [
        (row0, nseg, o, -(-(seg - o) // r))
        for row0, nseg, seg in pieces
        for o in range(min(r, h, seg))
    ]


def _gather_index(
    b: int,
    n: int,
    heads: int,
    chunk: tuple[int, int, int, int],
    w: int,
    r: int,
    h: int,
    group: int,
    device: torch.device,
) -> Tensor:
    """Row indices into a ``(B * n * heads, D)`` view for one batch of sparse segments.

    Ordered ``(batch, segment, row, head)`` so the gathered rows reshape to
    ``(B * S, L, H', D)``; ``group`` maps query heads to key/value heads.
    """
    row0, nseg, o, rows = chunk
    bi = torch.arange(b, device=device).view(b, 1, 1, 1)
    pos = (row0 + torch.arange(nseg, device=device) * w).view(1, nseg, 1, 1) + (
        o + torch.arange(rows, device=device) * r
    ).view(1, 1, rows, 1)
    head = (torch.arange(o, h, r, device=device) // group).view(1, 1, 1, -1)
    return ((bi * n + pos) * heads + head).reshape(-1)


def _one_pattern(
    q: Tensor, k: Tensor, v: Tensor, w: int, r: int, is_causal: bool, scale: float
) -> tuple[Tensor, Tensor]:
    """Output ``(B, Nq, H, D)`` and lse ``(B, H, Nq)`` (-inf off-pattern) of one pattern.

    One ``index_select`` per tensor gathers every sparse segment of the pattern and one
    ``index_copy`` scatters the results back, so autograd also does one scatter (or
    gather) per tensor and pattern in backward.
    """
    b, nq, h, d = q.shape
    nk, hk = k.shape[1], k.shape[2]
    group = h // hk
    w = min(w, nk)  # a segment longer than the sequence is the whole sequence
    start = ((nk - nq) // w) * w  # first segment that holds a query
    lead = nk - nq - start  # key positions of that segment before the first query
    if lead:
        q = torch.cat([q.new_zeros(b, lead, h, d), q], dim=1)
    k, v = k[:, start:], v[:, start:]
    n = nk - start
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32

    chunks = _pattern_chunks(n, w, r, h)
    idx_q = torch.cat([_gather_index(b, n, h, c, w, r, h, 1, q.device) for c in chunks])
    idx_kv = torch.cat([_gather_index(b, n, hk, c, w, r, h, group, q.device) for c in chunks])
    sizes = [b * c[1] * c[3] * len(range(c[2], h, r)) for c in chunks]
    gq = _GatherRows.apply(q.reshape(b * n * h, d), idx_q).split(sizes)
    if group == 1:
        gk = _GatherRows.apply(k.reshape(b * n * hk, d), idx_kv).split(sizes)
        gv = _GatherRows.apply(v.reshape(b * n * hk, d), idx_kv).split(sizes)
    else:  # query heads of a group read the same key/value rows: gradients add up
        gk = k.reshape(b * n * hk, d).index_select(0, idx_kv).split(sizes)
        gv = v.reshape(b * n * hk, d).index_select(0, idx_kv).split(sizes)

    outs, lses = [], []
    for (_, nseg, o, rows), qc, kc, vc in zip(chunks, gq, gk, gv):
        shape = (b * nseg, rows, len(range(o, h, r)), d)
        oc, lc = _SegmentAttention.apply(
            qc.view(shape), kc.view(shape), vc.view(shape), is_causal, scale
        )
        outs.append(oc.reshape(-1, d))
        lses.append(lc.transpose(1, 2).reshape(-1))  # (B', H', L) -> rows in idx order
    out = q.new_zeros(b * n * h, d).index_copy(0, idx_q, torch.cat(outs))
    lse = torch.full((b * n * h,), -math.inf, dtype=lse_dtype, device=q.device)
    lse = lse.index_copy(0, idx_q, torch.cat(lses).to(lse_dtype))
    out = out.view(b, n, h, d)[:, lead:]
    lse = lse.view(b, n, h)[:, lead:].permute(0, 2, 1)
    return out, lse


def _merge(outs: list[Tensor], lses: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Combine per-pattern ``(out_i, lse_i)`` into one softmax; -inf rows give 0 / -inf."""
    if len(outs) == 1:
        return outs[0], lses[0]
    lse_all = torch.stack(lses)  # (m, B, H, Nq)
    top = lse_all.amax(dim=0).detach()  # the shift cancels: detaching it is exact
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.exp(lse_all - top)  # exactly 0 where lse_i = -inf
    total = weights.sum(dim=0)
    has_key = total > 0
    safe_total = torch.where(has_key, total, torch.ones_like(total))
    lse = torch.where(has_key, top + torch.log(safe_total), torch.full_like(total, -math.inf))
    weights = (weights / safe_total).permute(0, 1, 3, 2).unsqueeze(-1)  # (m, B, Nq, H, 1)
    out = (weights * torch.stack(outs).to(weights.dtype)).sum(dim=0)
    return out.to(outs[0].dtype), lse


def gather_sdpa_dilated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    is_causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Dilated attention by gathering sparse segments and calling SDPA on them.

    Same arguments, results and gradients as ``longnet.dilated_attention`` (docs/operator.md),
    on CPU tensors. Extra memory is what the gathers, the per-pattern outputs and
    the merge hold: O(m * B * N * H * D) for m patterns, saved for backward.
    """
    ws, rs = validate_patterns(segment_lengths, dilation_rates)
    scale = validate_inputs(q, k, v, scale)
    if q.device.type != "cpu":
        raise ValueError(f"gather_sdpa_dilated_attention runs on CPU tensors, got {q.device}")
    outs, lses = [], []
    for w, r in zip(ws, rs):
        out_i, lse_i = _one_pattern(q, k, v, w, r, bool(is_causal), scale)
        outs.append(out_i)
        lses.append(lse_i)
    out, lse = _merge(outs, lses)
    return (out, lse) if return_lse else out
