"""Slow, obviously-correct dilated attention in plain PyTorch (docs/operator.md).

It builds, for every head, the dense count matrix ``c[j, p, t]`` (in how many
patterns query ``p`` and key ``t`` share a sparse segment, after the causal rule)
and evaluates one softmax over ``scale * q k^T + log c``. Memory is O(Nq * Nk) per
head: use it for tests on short sequences only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["pattern_counts", "dilated_attention_reference"]


def pattern_counts(
    nq: int,
    nk: int,
    num_heads: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    is_causal: bool,
    device: torch.device | None = None,
    *,
    position_offset: int = 0,
    key_start: int | None = None,
    key_end: int | None = None,
) -> Tensor:
    """Count matrix ``c`` of shape ``(H, Nq, Nk)`` (int64), as docs/operator.md defines it.

    The sequence is the keys ``[key_start, key_end)`` (default: all ``nk``), key
    ``key_start`` at absolute position ``position_offset``; queries are bottom-right
    aligned to ``key_end``. Pairs outside the sequence count 0.
    """
    start = 0 if key_start is None else int(key_start)
    end = nk if key_end is None else int(key_end)
    key_index = torch.arange(nk, device=device)
    query_index = torch.arange(end - nq, end, device=device)  # as key indices
    k_pos = key_index - start + position_offset
    q_pos = query_index - start + position_offset
    k_real = (key_index >= start) & (key_index < end)
    q_real = query_index >= start
    counts = torch.zeros(num_heads, nq, nk, dtype=torch.int64, device=device)
    for w, r in zip(segment_lengths, dilation_rates):
        same_segment = (q_pos[:, None] // w) == (k_pos[None, :] // w)
        for j in range(num_heads):
            o = j % r
            q_in = ((q_pos % w) % r == o) & q_real
            k_in = ((k_pos % w) % r == o) & k_real
            counts[j] += (same_segment & q_in[:, None] & k_in[None, :]).long()
    if is_causal:
        counts = counts * (k_pos[None, :] <= q_pos[:, None]).long()
    return counts


def dilated_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    is_causal: bool = False,
    scale: float | None = None,
    position_offset: int = 0,
    key_start: Tensor | None = None,
    key_end: Tensor | None = None,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Return ``(out, lse)`` of dilated attention, computed densely.

    Arguments as ``longnet.dilated_attention``; differentiable through both outputs.
    The computation runs in the input dtype (use float64 for a ground truth).
    Packed documents (``cu_seqlens_q``/``cu_seqlens_k``) are run one by one.
    """
    if cu_seqlens_q is not None or cu_seqlens_k is not None:
        given_q = cu_seqlens_q if cu_seqlens_q is not None else cu_seqlens_k
        given_k = cu_seqlens_k if cu_seqlens_k is not None else cu_seqlens_q
        assert given_q is not None and given_k is not None
        cu_q, cu_k = given_q.tolist(), given_k.tolist()
        outs, lses = [], []
        for i in range(len(cu_q) - 1):
            o, lse = dilated_attention_reference(
                q[:, cu_q[i] : cu_q[i + 1]],
                k[:, cu_k[i] : cu_k[i + 1]],
                v[:, cu_k[i] : cu_k[i + 1]],
                segment_lengths,
                dilation_rates,
                is_causal=is_causal,
                scale=scale,
                position_offset=position_offset,
            )
            outs.append(o)
            lses.append(lse)
        return torch.cat(outs, dim=1), torch.cat(lses, dim=2)
    b, nq, h, d = q.shape
    nk, hk = k.shape[1], k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    group = h // hk
    kh = k.repeat_interleave(group, dim=2) if group > 1 else k
    vh = v.repeat_interleave(group, dim=2) if group > 1 else v
    if key_start is None and key_end is None:
        counts = pattern_counts(
            nq,
            nk,
            h,
            segment_lengths,
            dilation_rates,
            is_causal,
            q.device,
            position_offset=position_offset,
        )[None]
    else:
        starts = [0] * b if key_start is None else key_start.tolist()
        ends = [nk] * b if key_end is None else key_end.tolist()
        counts = torch.stack(
            [
                pattern_counts(
                    nq,
                    nk,
                    h,
                    segment_lengths,
                    dilation_rates,
                    is_causal,
                    q.device,
                    position_offset=position_offset,
                    key_start=s,
                    key_end=e,
                )
                for s, e in zip(starts, ends)
            ]
        )  # (B, H, Nq, Nk)
    log_c = torch.log(counts.to(q.dtype))  # -inf where no pattern links p and t
    logits = torch.einsum("bqhd,bkhd->bhqk", q, kh) * scale + log_c
    # Rows that reach no key get lse = -inf and out = 0 with finite gradients: run
    # the softmax on a zero row there and overwrite it afterwards.
    has_key = (counts > 0).any(dim=-1)  # (B or 1, H, Nq)
    logits = torch.where(has_key[..., None], logits, torch.zeros_like(logits))
    lse_all = torch.logsumexp(logits, dim=-1)  # (B, H, Nq)
    probs = torch.exp(logits - lse_all[..., None]) * has_key[..., None]
    lse = torch.where(has_key, lse_all, torch.full_like(lse_all, -math.inf))
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vh)
    return out, lse
