"""``nn.Module`` wrappers around ``longnet.dilated_attention``.

* :class:`DilatedAttention`: the bare operator with its pattern as module state.
* :class:`MultiheadDilatedAttention`: batch-first multi-head attention layer with
  q/k/v/out projections, grouped-query attention, rotary or xPos position encoding at
  absolute positions, optional Sub-LN (MAGNETO), packed documents (``cu_seqlens``),
  an incremental-decoding cache and a sequence-parallel mode.
* :class:`KVCache`: the per-layer key/value cache used for incremental decoding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longnet.ops import dilated_attention, validate_patterns, validate_position_offset
from longnet.packing import PackedDocuments, as_packed_documents, validate_cu_seqlens

__all__ = [
    "DilatedAttention",
    "MultiheadDilatedAttention",
    "KVCache",
    "RotaryEmbedding",
    "validate_cu_seqlens",
]

_POSITION_ENCODINGS = ("rotary", "xpos", None)


class DilatedAttention(nn.Module):
    """Dilated attention over already projected heads (no parameters).

    Args:
        segment_lengths: ``[w_1 .. w_m]``.
        dilation_rates: ``[r_1 .. r_m]`` with ``1 <= r_i <= w_i``.
        is_causal: default causality of :meth:`forward`.
        scale: softmax scale, default ``1 / sqrt(head_dim)``.

    Shapes: ``q`` ``(B, Nq, H, D)``, ``k``/``v`` ``(B, Nk, Hk, D)`` as in
    :func:`longnet.dilated_attention`. Packed documents: ``q`` ``(1, total_q, H, D)``,
    ``k``/``v`` ``(1, total_k, Hk, D)`` with ``cu_seqlens_q`` / ``cu_seqlens_k`` (int
    ``(S+1,)``); document ``i`` is attended as if it were run alone
    (docs/operator.md).
    """

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        is_causal: bool = False,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        ws, rs = validate_patterns(segment_lengths, dilation_rates)
        self.segment_lengths: tuple[int, ...] = ws
        self.dilation_rates: tuple[int, ...] = rs
        self.is_causal = bool(is_causal)
        if scale is not None and not math.isfinite(float(scale)):
            raise ValueError(f"scale must be a finite number or None, got {scale}")
        self.scale = None if scale is None else float(scale)

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        is_causal: bool | None = None,
        return_lse: bool = False,
        position_offset: int = 0,
        cu_seqlens_q: Tensor | PackedDocuments | None = None,
        cu_seqlens_k: Tensor | PackedDocuments | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attend ``q`` to ``k``/``v``; ``is_causal=None`` uses the module default.

        ``position_offset`` is the absolute position of ``k[:, 0]``, or with
        ``cu_seqlens_q`` / ``cu_seqlens_k`` (packed documents, batch 1; one of them
        alone stands for both) of every document's first key (docs/operator.md)."""
        return dilated_attention(
            q,
            k,
            v,
            self.segment_lengths,
            self.dilation_rates,
            is_causal=self.is_causal if is_causal is None else bool(is_causal),
            scale=self.scale,
            return_lse=return_lse,
            position_offset=position_offset,
            cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k,
        )

    def extra_repr(self) -> str:
        s = (
            f"segment_lengths={list(self.segment_lengths)}, "
            f"dilation_rates={list(self.dilation_rates)}, is_causal={self.is_causal}"
        )
        if self.scale is not None:
            s += f", scale={self.scale:g}"
        return s


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE), optionally with xPos scaling.

    Rotations use absolute positions, so the same token gets the same rotation in a
    full forward, in incremental decoding and on any sequence-parallel rank.

    xPos (Sun et al., 2022) additionally multiplies queries by ``zeta**((n - c) / b)``
    and keys by ``zeta**(-(n - c) / b)`` (``b = scale_base``). The products only depend
    on the distance between query and key, so the centre ``c`` is free; callers pass
    the same ``c`` for all queries and keys of one attention call. Far from ``c`` the
    factors overflow float32 after roughly ``70 * scale_base`` positions: use plain
    rotary for very long sequences.
    """

    def __init__(
        self,
        head_dim: int,
        *,
        base: float = 10000.0,
        xpos: bool = False,
        xpos_scale_base: float = 512.0,
        xpos_gamma: float = 0.4,
    ) -> None:
        super().__init__()
        if head_dim < 2 or head_dim % 2 != 0:
            raise ValueError(f"rotary embeddings need an even head_dim >= 2, got {head_dim}")
        self.head_dim = head_dim
        self.base = float(base)
        self.xpos = bool(xpos)
        self.xpos_scale_base = float(xpos_scale_base)
        self.xpos_gamma = float(xpos_gamma)

    def _freqs(self, device: torch.device) -> tuple[Tensor, Tensor]:
        # Built per call in float64 (tiny), so module dtype casts never round them.
        half = self.head_dim // 2
        idx = torch.arange(half, dtype=torch.float64, device=device) / half
        inv_freq = torch.pow(self.base, -idx)
        log_zeta = torch.log((idx + self.xpos_gamma) / (1.0 + self.xpos_gamma))
        return inv_freq, log_zeta

    def _angles(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        inv_freq, _ = self._freqs(positions.device)
        ang = positions.to(torch.float64)[:, None] * inv_freq[None, :]
        return ang.cos(), ang.sin()

    def rotate(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate ``x`` ``(B, N, H, D)`` by the angles of ``positions`` ``(N,)``."""
        cos, sin = self._angles(positions)
        cos = cos.to(x.dtype)[None, :, None, :]
        sin = sin.to(x.dtype)[None, :, None, :]
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)

    def xpos_scale(
        self, positions: Tensor, center: int | Tensor, sign: float, dtype: torch.dtype
    ) -> Tensor:
        """xPos factors ``(1, N, 1, D)``: ``zeta ** (sign * (n - center) / scale_base)``."""
        _, log_zeta = self._freqs(positions.device)
        rel = (positions.to(torch.float64) - center) * (sign / self.xpos_scale_base)
        scale = torch.exp(rel[:, None] * log_zeta[None, :])
        return torch.cat((scale, scale), dim=-1).to(dtype)[None, :, None, :]

    def extra_repr(self) -> str:
        s = f"head_dim={self.head_dim}, base={self.base:g}"
        if self.xpos:
            s += f", xpos=True, xpos_scale_base={self.xpos_scale_base:g}"
        return s


class KVCache:
    """Key/value cache of one attention layer for incremental decoding.

    Holds the rotated keys and the values of the absolute positions ``[start, end)``
    and hands them to the operator with ``position_offset=start``, so every pattern
    keeps its absolute segment boundaries whatever ``start`` is. A query at position
    ``p`` reads, in pattern ``i``, only keys of its own segment, which begins at
    ``floor(p / w_i) * w_i``; before new tokens at ``[end, end + n)`` are appended,
    the keys before ``min_i floor(end / w_i) * w_i`` are dropped because neither
    these queries nor any later one can reach them. The cache therefore never holds
    more than ``max(segment_lengths) - 1 + n`` keys, whatever
    ``lcm(segment_lengths)`` is.

    Args:
        segment_lengths: the layer's ``[w_1 .. w_m]`` (an int stands for ``[w]``).
        trim: drop unreachable keys (``False`` keeps every key, for checking).
        start: absolute position of the first token that will be appended.
    """

    def __init__(
        self, segment_lengths: int | Sequence[int], *, trim: bool = True, start: int = 0
    ) -> None:
        if isinstance(segment_lengths, bool):
            raise ValueError(f"segment_lengths must be ints >= 1, got {segment_lengths!r}")
        if isinstance(segment_lengths, int):
            segment_lengths = (segment_lengths,)
        ws = tuple(int(w) for w in segment_lengths)
        if len(ws) == 0 or min(ws) < 1:
            raise ValueError(f"segment_lengths must be ints >= 1, got {list(ws)}")
        self.segment_lengths: tuple[int, ...] = ws
        self.trim = bool(trim)
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.start = int(start)
        self.end = int(start)
        if self.start < 0:
            raise ValueError(f"start must be >= 0, got {start}")

    def __len__(self) -> int:
        return self.end - self.start

    def reachable_from(self, position: int) -> int:
        """First key position that a query at ``position`` (or later) can read:
        ``min_i floor(position / w_i) * w_i``."""
        return min((position // w) * w for w in self.segment_lengths)

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append keys/values ``(B, n, Hk, D)`` at positions ``[end, end + n)``.

        Returns the cached keys and values that the new queries may reach; the first
        of them sits at absolute position ``start`` (the operator's
        ``position_offset``).
        """
        if self.k is None or self.v is None:
            self.k, self.v = k, v
        else:
            if self.trim:
                keep_from = self.reachable_from(self.end)
                if keep_from > self.start:
                    drop = keep_from - self.start
                    self.k, self.v = self.k[:, drop:], self.v[:, drop:]
                    self.start = keep_from
            self.k = torch.cat((self.k, k), dim=1)
            self.v = torch.cat((self.v, v), dim=1)
        self.end += k.shape[1]
        return self.k, self.v

    def reorder(self, index: Tensor) -> None:
        """Keep only batch rows ``index`` (e.g. for beam search or finished rows)."""
        if self.k is not None and self.v is not None:
            self.k, self.v = self.k[index], self.v[index]

    def __repr__(self) -> str:
        return (
            f"KVCache(start={self.start}, end={self.end}, "
            f"segment_lengths={list(self.segment_lengths)}, trim={self.trim})"
        )


def _sequence_parallel_attention() -> Any:
    try:
        from longnet.parallel import sequence_parallel_dilated_attention
    except ImportError as exc:  # pragma: no cover - depends on the checkout
        raise ImportError(
            "sequence parallelism needs longnet.parallel."
            "sequence_parallel_dilated_attention, which could not be imported: "
            f"{exc}"
        ) from exc
    return sequence_parallel_dilated_attention


class MultiheadDilatedAttention(nn.Module):
    """Multi-head dilated attention layer (LongNet), batch first: ``(B, N, E)``.

    Args:
        embed_dim: model width ``E``.
        num_heads: query heads ``H``; ``E`` must be divisible by ``H``.
        segment_lengths, dilation_rates: the dilated pattern (see docs/operator.md).
        num_kv_heads: key/value heads for grouped-query attention (default ``H``).
        dropout: dropout on the attention output before the output projection (the
            operator has no attention-probability dropout).
        bias: biases in the projections.
        is_causal: causal attention (a decoder).
        position_encoding: ``"rotary"``, ``"xpos"`` or ``None``.
        sub_ln: MAGNETO Sub-LN: a LayerNorm before the output projection.
        sequence_parallel_group: a ``torch.distributed`` group; when given, every rank
            holds one contiguous chunk of each sequence (rank order) and attention runs
            through ``longnet.parallel.sequence_parallel_dilated_attention``.
        rope_base, xpos_scale_base, layer_norm_eps: encoding and norm settings.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        num_kv_heads: int | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        is_causal: bool = True,
        position_encoding: str | None = "rotary",
        sub_ln: bool = False,
        sequence_parallel_group: Any = None,
        rope_base: float = 10000.0,
        xpos_scale_base: float = 512.0,
        layer_norm_eps: float = 1e-5,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        if embed_dim < 1 or num_heads < 1 or embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})"
            )
        num_kv_heads = num_heads if num_kv_heads is None else int(num_kv_heads)
        if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        if position_encoding not in _POSITION_ENCODINGS:
            raise ValueError(
                f"position_encoding must be 'rotary', 'xpos' or None, got {position_encoding!r}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.is_causal = bool(is_causal)
        self.position_encoding = position_encoding
        self.dropout = float(dropout)
        self.sequence_parallel_group = sequence_parallel_group
        self.attention = DilatedAttention(segment_lengths, dilation_rates, is_causal=is_causal)
        kv_dim = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.inner_norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps, **factory) if sub_ln else None
        self.rotary = (
            None
            if position_encoding is None
            else RotaryEmbedding(
                self.head_dim,
                base=rope_base,
                xpos=position_encoding == "xpos",
                xpos_scale_base=xpos_scale_base,
            )
        )
        self.reset_parameters()

    @property
    def segment_lengths(self) -> tuple[int, ...]:
        return self.attention.segment_lengths

    @property
    def dilation_rates(self) -> tuple[int, ...]:
        return self.attention.dilation_rates

    def reset_parameters(self) -> None:
        """Xavier-uniform projections, zero biases."""
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(proj.weight)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    def new_cache(self, *, trim: bool = True, start: int = 0) -> KVCache:
        """An empty :class:`KVCache` for this layer's pattern whose first token will
        sit at absolute position ``start``."""
        return KVCache(self.segment_lengths, trim=trim, start=start)

    def _sp_rank_world(self) -> tuple[int, int]:
        import torch.distributed as dist

        group = self.sequence_parallel_group
        return dist.get_rank(group), dist.get_world_size(group)

    def forward(
        self,
        x: Tensor,
        *,
        cache: KVCache | None = None,
        position_offset: int | None = None,
        cu_seqlens: Tensor | PackedDocuments | None = None,
    ) -> Tensor:
        """Self-attention over ``x`` ``(B, N, E)``; returns ``(B, N, E)``.

        Args:
            x: input sequence (this rank's chunk under sequence parallelism).
            cache: a :class:`KVCache` for incremental decoding; the tokens of ``x``
                sit at positions ``[cache.end, cache.end + N)`` and are appended.
            position_offset: absolute position of ``x[:, 0]`` (default 0), used by
                rotary/xPos and by the operator's segments (``[s*w, (s+1)*w)`` in
                absolute positions), so a chunk of a longer sequence gets the
                attention pattern it has there. With a cache it may only restate
                ``cache.end`` (an empty cache then starts at that position); any
                other value raises. Under sequence parallelism it is the position
                of rank 0's first token (each rank adds ``rank * N``). With
                ``cu_seqlens`` it is the position of every document's first token.
            cu_seqlens: packed documents: ``x`` is ``(1, N, E)``, several documents
                back to back, and ``cu_seqlens`` (int32/int64, shape ``(S+1,)``,
                ``0 = c_0 <= ... <= c_S = N``; empty documents allowed) says that
                document ``i`` is tokens ``[c_i, c_{i+1})``. Each document is
                computed as if it were run alone: its rotary/xPos positions and its
                segments restart at its first token, and it attends to no other
                document. Under sequence parallelism ``x`` is this rank's chunk and
                ``cu_seqlens`` the boundaries of the whole sequence (the same tensor
                on every rank). Not combinable with a cache (incremental decoding
                runs one sequence per row). A :class:`~longnet.packing.PackedDocuments`
                (built once per forward) may stand for it: nothing is read back then.
        """
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must have shape (B, N, {self.embed_dim}), got {tuple(x.shape)}")
        b, n, _ = x.shape
        sp = self.sequence_parallel_group is not None
        if position_offset is not None:
            position_offset = validate_position_offset(position_offset)
        if cu_seqlens is not None:
            if cache is not None:
                raise ValueError(
                    "cu_seqlens (packed documents) cannot be combined with a KV cache: "
                    "incremental decoding runs one sequence per batch row"
                )
            return self._forward_packed(x, cu_seqlens, position_offset or 0)
        if cache is not None:
            if sp:
                raise ValueError("a KV cache cannot be combined with sequence parallelism")
            if not self.is_causal:
                raise ValueError("a KV cache needs a causal layer (is_causal=True)")
            if position_offset is not None and position_offset != cache.end:
                if len(cache) != 0 or cache.k is not None:
                    raise ValueError(
                        f"position_offset ({position_offset}) must equal the cache's next "
                        f"position ({cache.end}) or be left out when a cache is given"
                    )
                cache.start = cache.end = position_offset  # an empty cache starts there
            first = cache.end
        elif sp:
            base = 0 if position_offset is None else position_offset
            rank, world = self._sp_rank_world()
            first = base + rank * n
        else:
            first = 0 if position_offset is None else position_offset

        q, k, v = self._project(x)
        if self.rotary is not None:
            pos = torch.arange(first, first + n, device=x.device)
            q = self.rotary.rotate(q, pos)
            k = self.rotary.rotate(k, pos)
        if cache is not None:
            k, v = cache.update(k, v)
        if self.rotary is not None and self.rotary.xpos:
            # One centre per call: the middle of the queries, or of the whole
            # sequence under sequence parallelism (shared by all ranks).
            if sp:
                center = base + (world * n) // 2
            else:
                center = first + n // 2
            k_first = first + n - k.shape[1]
            k_pos = torch.arange(k_first, k_first + k.shape[1], device=x.device)
            q = q * self.rotary.xpos_scale(pos, center, 1.0, q.dtype)
            k = k * self.rotary.xpos_scale(k_pos, center, -1.0, k.dtype)

        if sp:
            out = _sequence_parallel_attention()(
                q,
                k,
                v,
                self.segment_lengths,
                self.dilation_rates,
                group=self.sequence_parallel_group,
                is_causal=self.is_causal,
                scale=self.attention.scale,
                position_offset=base,
            )
        else:
            # k[:, 0] sits at `first` without a cache, at cache.start with one.
            out = self.attention(q, k, v, position_offset=first + n - k.shape[1])
        return self._output(out, b, n)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim)
        return q, k, v

    def _output(self, out: Tensor, b: int, n: int) -> Tensor:
        out = out.reshape(b, n, self.embed_dim)
        out = F.dropout(out, p=self.dropout, training=self.training)
        if self.inner_norm is not None:
            out = self.inner_norm(out)
        return self.out_proj(out)

    def _forward_packed(
        self, x: Tensor, cu_seqlens: Tensor | PackedDocuments, offset: int
    ) -> Tensor:
        """:meth:`forward` for packed documents (``cache`` is None)."""
        b, n, _ = x.shape
        if b != 1:
            raise ValueError(
                f"packed documents (cu_seqlens) need x of shape (1, N, E), got {tuple(x.shape)}"
            )
        sp = self.sequence_parallel_group is not None
        if sp:
            spda = _sequence_parallel_attention()
            rank, world = self._sp_rank_world()
            total, first = world * n, rank * n
        else:
            total, first = n, 0
        docs = as_packed_documents(cu_seqlens, total).to(x.device)
        q, k, v = self._project(x)
        if self.rotary is not None:
            # Positions restart at every document (this rank's slice of them).
            pos = offset + docs.positions()[first : first + n]
            q = self.rotary.rotate(q, pos)
            k = self.rotary.rotate(k, pos)
            if self.rotary.xpos:
                # Each document's own centre, as when it runs alone (the products
                # depend on distances only; the centre sets the rounding).
                half = docs.document_lengths() // 2
                center = offset + half[docs.document_ids()[first : first + n]]
                q = q * self.rotary.xpos_scale(pos, center, 1.0, q.dtype)
                k = k * self.rotary.xpos_scale(pos, center, -1.0, k.dtype)
        if sp:
            out = spda(
                q,
                k,
                v,
                self.segment_lengths,
                self.dilation_rates,
                group=self.sequence_parallel_group,
                is_causal=self.is_causal,
                scale=self.attention.scale,
                position_offset=offset,
                cu_seqlens=docs,
            )
        else:
            out = self.attention(
                q, k, v, position_offset=offset, cu_seqlens_q=docs, cu_seqlens_k=docs
            )
        return self._output(out, b, n)

    def extra_repr(self) -> str:
        s = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}"
        if self.num_kv_heads != self.num_heads:
            s += f", num_kv_heads={self.num_kv_heads}"
        s += (
            f", segment_lengths={list(self.segment_lengths)}, "
            f"dilation_rates={list(self.dilation_rates)}, is_causal={self.is_causal}, "
            f"position_encoding={self.position_encoding!r}"
        )
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.sequence_parallel_group is not None:
            s += ", sequence_parallel=True"
        return s
