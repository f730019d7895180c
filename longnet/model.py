"""LongNet decoder language model (Ding et al., 2023) built on dilated attention.

* :class:`LongNetConfig`: the hyper-parameters, saved as ``config.json``.
* :class:`LongNetDecoderLayer`: pre-LN (or MAGNETO Sub-LN) transformer block.
* :class:`LongNetDecoder`: the layer stack with a final LayerNorm.
* :class:`LongNetLM`: token embedding, decoder, LM head, loss, KV-cached
  :meth:`~LongNetLM.generate` and ``save_pretrained`` / ``from_pretrained``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from longnet.modules import KVCache, MultiheadDilatedAttention
from longnet.ops import validate_patterns
from longnet.packing import PackedDocuments

__all__ = ["LongNetConfig", "LongNetDecoderLayer", "LongNetDecoder", "LongNetLM"]

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
TORCH_WEIGHTS_NAME = "model.pt"


@dataclass
class LongNetConfig:
    """Hyper-parameters of :class:`LongNetLM`.

    Attributes:
        vocab_size: number of token ids (259 for :class:`longnet.ByteTokenizer`).
        num_layers: decoder layers.
        embed_dim: model width.
        num_heads: query heads per layer.
        num_kv_heads: key/value heads (grouped-query attention); ``None`` = num_heads.
        ffn_dim: feed-forward width; ``None`` = ``4 * embed_dim``.
        segment_lengths, dilation_rates: the dilated attention pattern.
        norm_style: ``"pre"`` (pre-LayerNorm) or ``"subln"`` (MAGNETO: pre-LN plus a
            LayerNorm before each block's output projection and scaled init).
        dropout: residual and feed-forward dropout.
        attention_dropout: dropout on the attention output before its projection.
        tie_embeddings: share the token embedding with the LM head.
        position_encoding: ``"rotary"``, ``"xpos"`` or ``None``.
        rope_base, xpos_scale_base: position-encoding constants.
        bias: biases in the linear layers.
        layer_norm_eps: LayerNorm epsilon.
        pad_token_id, bos_token_id, eos_token_id: special ids (byte tokenizer layout).
    """

    vocab_size: int = 259
    num_layers: int = 4
    embed_dim: int = 256
    num_heads: int = 4
    num_kv_heads: int | None = None
    ffn_dim: int | None = None
    segment_lengths: list[int] = field(default_factory=lambda: [128, 256, 512])
    dilation_rates: list[int] = field(default_factory=lambda: [1, 2, 4])
    norm_style: str = "pre"
    dropout: float = 0.0
    attention_dropout: float = 0.0
    tie_embeddings: bool = True
    position_encoding: str | None = "rotary"
    rope_base: float = 10000.0
    xpos_scale_base: float = 512.0
    bias: bool = True
    layer_norm_eps: float = 1e-5
    pad_token_id: int | None = 256
    bos_token_id: int | None = 257
    eos_token_id: int | None = 258

    def __post_init__(self) -> None:
        ws, rs = validate_patterns(self.segment_lengths, self.dilation_rates)
        self.segment_lengths, self.dilation_rates = list(ws), list(rs)
        if self.ffn_dim is None:
            self.ffn_dim = 4 * self.embed_dim
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        for name in (
            "vocab_size",
            "num_layers",
            "embed_dim",
            "num_heads",
            "num_kv_heads",
            "ffn_dim",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(
                f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.norm_style not in ("pre", "subln"):
            raise ValueError(f"norm_style must be 'pre' or 'subln', got {self.norm_style!r}")
        if self.position_encoding not in ("rotary", "xpos", None):
            raise ValueError(
                "position_encoding must be 'rotary', 'xpos' or None, got "
                f"{self.position_encoding!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LongNetConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LongNetConfig fields: {unknown}")
        return cls(**data)


class FeedForward(nn.Module):
    """``fc2(dropout(subln(gelu(fc1(x)))))``; Sub-LN only for MAGNETO."""

    def __init__(
        self,
        embed_dim: int,
        ffn_dim: int,
        *,
        dropout: float = 0.0,
        sub_ln: bool = False,
        bias: bool = True,
        layer_norm_eps: float = 1e-5,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(embed_dim, ffn_dim, bias=bias, **factory)
        self.fc2 = nn.Linear(ffn_dim, embed_dim, bias=bias, **factory)
        self.norm = nn.LayerNorm(ffn_dim, eps=layer_norm_eps, **factory) if sub_ln else None
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.fc1(x))
        h = F.dropout(h, p=self.dropout, training=self.training)
        if self.norm is not None:
            h = self.norm(h)
        return self.fc2(h)


class LongNetDecoderLayer(nn.Module):
    """One decoder block: ``x + attn(LN(x))`` then ``x + ffn(LN(x))``.

    With :attr:`activation_checkpointing` set, a training forward (grad enabled, no
    cache) keeps only the block's input for backward and runs the block again there
    (``torch.utils.checkpoint``, non-reentrant, RNG state restored so dropout draws
    the same masks). Under sequence parallelism the recomputed forward repeats its
    key/value exchange: the exchange is deterministic, so the recomputation gets the
    rows it got the first time, and the exchanged rows are few (``w / r`` per
    crossing segment, constant in the sequence length), so repeating it costs one
    more forward exchange per layer instead of holding received rows across the
    step. Every rank of the group recomputes its layers in the same (backward)
    order, so the repeated collectives line up.
    """

    def __init__(
        self, config: LongNetConfig, *, sequence_parallel_group: Any = None, device=None, dtype=None
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        sub_ln = config.norm_style == "subln"
        self.attn_norm = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps, **factory)
        self.self_attn = MultiheadDilatedAttention(
            config.embed_dim,
            config.num_heads,
            config.segment_lengths,
            config.dilation_rates,
            num_kv_heads=config.num_kv_heads,
            dropout=config.attention_dropout,
            bias=config.bias,
            is_causal=True,
            position_encoding=config.position_encoding,
            sub_ln=sub_ln,
            sequence_parallel_group=sequence_parallel_group,
            rope_base=config.rope_base,
            xpos_scale_base=config.xpos_scale_base,
            layer_norm_eps=config.layer_norm_eps,
            **factory,
        )
        self.ffn_norm = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps, **factory)
        assert config.ffn_dim is not None  # LongNetConfig.__post_init__ sets it
        self.ffn = FeedForward(
            config.embed_dim,
            config.ffn_dim,
            dropout=config.dropout,
            sub_ln=sub_ln,
            bias=config.bias,
            layer_norm_eps=config.layer_norm_eps,
            **factory,
        )
        self.dropout = config.dropout
        self.activation_checkpointing = False
        self.chunk_size: int | None = None

    def forward(
        self,
        x: Tensor,
        *,
        cache: KVCache | None = None,
        position_offset: int | None = None,
        cu_seqlens: Tensor | PackedDocuments | None = None,
    ) -> Tensor:
        if self.activation_checkpointing and cache is None and torch.is_grad_enabled():
            # The hooks of the module call (FSDP's unshard, for one) stay outside the
            # recomputed function: the backward re-runs _block alone.
            return torch.utils.checkpoint.checkpoint(
                self._block, x, None, position_offset, cu_seqlens, use_reentrant=False
            )
        return self._block(x, cache, position_offset, cu_seqlens)

    def _block(
        self,
        x: Tensor,
        cache: KVCache | None,
        position_offset: int | None,
        cu_seqlens: Tensor | PackedDocuments | None = None,
    ) -> Tensor:
        h = self.self_attn(
            self.attn_norm(x), cache=cache, position_offset=position_offset, cu_seqlens=cu_seqlens
        )
        x = x + F.dropout(h, p=self.dropout, training=self.training)
        if self.chunk_size is None:
            h = self._ffn(x)
        else:
            # In training each chunk is recomputed in backward; without grad
            # (evaluation) or with a cache (generation's prefill) nothing needs it.
            recompute = cache is None and torch.is_grad_enabled()
            h = self._ffn_in_chunks(x, self.chunk_size, recompute)
        return x + F.dropout(h, p=self.dropout, training=self.training)

    def _ffn(self, x: Tensor) -> Tensor:
        return self.ffn(self.ffn_norm(x))

    def _ffn_in_chunks(self, x: Tensor, chunk: int, recompute: bool) -> Tensor:
        """The feed-forward (and its LayerNorm) over ``chunk`` positions at a time, so
        the ``(B, N, ffn_dim)`` hidden activations never all live. With ``recompute``
        each chunk runs again in backward (only the input, which the residual keeps
        anyway, stays); without, one chunk's hidden activations live at a time."""

        def run(part: Tensor) -> Tensor:
            if recompute:
                return torch.utils.checkpoint.checkpoint(self._ffn, part, use_reentrant=False)
            return self._ffn(part)

        n = x.shape[1]
        if n <= chunk:
            return run(x)
        return torch.cat([run(x[:, s : s + chunk]) for s in range(0, n, chunk)], dim=1)


class LongNetDecoder(nn.Module):
    """Stack of :class:`LongNetDecoderLayer` with a final LayerNorm: ``(B, N, E)``."""

    def __init__(
        self, config: LongNetConfig, *, sequence_parallel_group: Any = None, device=None, dtype=None
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            LongNetDecoderLayer(
                config, sequence_parallel_group=sequence_parallel_group, device=device, dtype=dtype
            )
            for _ in range(config.num_layers)
        )
        self.final_norm = nn.LayerNorm(
            config.embed_dim, eps=config.layer_norm_eps, device=device, dtype=dtype
        )

    def new_cache(self) -> list[KVCache]:
        """One empty :class:`KVCache` per layer."""
        layers = cast(Iterable[LongNetDecoderLayer], self.layers)  # ModuleList: Modules
        return [layer.self_attn.new_cache() for layer in layers]

    def forward(
        self,
        x: Tensor,
        *,
        cache: list[KVCache] | None = None,
        position_offset: int | None = None,
        cu_seqlens: Tensor | PackedDocuments | None = None,
    ) -> Tensor:
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"cache must hold {len(self.layers)} layer caches, got {len(cache)}")
        for i, layer in enumerate(self.layers):
            x = layer(
                x,
                cache=None if cache is None else cache[i],
                position_offset=position_offset,
                cu_seqlens=cu_seqlens,
            )
        return self.final_norm(x)


LOSS_CHUNK_SIZE = 8192
"""Positions per chunk of the LM head and loss of ``LongNetLM.forward(...,
return_logits=False)`` unless :meth:`LongNetLM.set_chunk_size` says otherwise."""


def _chunk_loss_sum(x: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    logits = F.linear(x, weight)
    wide = logits if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(
        wide.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )


LOSS_REDUCTIONS = ("mean", "sum")


def _check_reduction(reduction: str) -> None:
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def chunked_lm_loss(
    x: Tensor, weight: Tensor, targets: Tensor, chunk: int, reduction: str = "mean"
) -> Tensor:
    """Mean cross-entropy of ``F.linear(x, weight)`` ``(B, N, V)`` against ``targets``
    ``(B, N)`` (``-100`` ignored), ``chunk`` positions at a time: each chunk's logits
    (float32 at least, as in the full loss) live only while its loss sum is computed
    and again while its backward runs (``torch.utils.checkpoint``), so memory holds
    ``B * chunk * V`` logits instead of ``B * N * V``. The result is the full loss up
    to the order of the sums (chunk sums, then the division by the target count).
    ``reduction="sum"``: the sum of the per-token losses instead of their mean (0
    when no target counts). Without grad (evaluation) the chunks are computed once,
    with nothing kept."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    _check_reduction(reduction)
    n = x.shape[1]
    total: Tensor | None = None
    for s in range(0, n, chunk):
        part = torch.utils.checkpoint.checkpoint(
            _chunk_loss_sum,
            x[:, s : s + chunk],
            weight,
            targets[:, s : s + chunk],
            use_reentrant=False,
        )
        total = part if total is None else total + part
    assert total is not None  # n >= 1
    if reduction == "sum":
        return total
    count = (targets != -100).sum()
    return total / count.to(total.dtype)


class LongNetLM(nn.Module):
    """Causal language model: embedding, :class:`LongNetDecoder`, LM head.

    Args:
        config: a :class:`LongNetConfig`.
        sequence_parallel_group: optional ``torch.distributed`` group; each rank then
            feeds its contiguous chunk of every sequence (see
            :class:`~longnet.modules.MultiheadDilatedAttention`).

    Example::

        model = LongNetLM(LongNetConfig(num_layers=2, embed_dim=128))
        logits = model(torch.randint(0, 256, (1, 1024)))            # (1, 1024, 259)
        out = model.generate(prompt_ids, max_new_tokens=100, top_k=20)
    """

    def __init__(
        self, config: LongNetConfig, *, sequence_parallel_group: Any = None, device=None, dtype=None
    ) -> None:
        super().__init__()
        self.config = config
        factory = {"device": device, "dtype": dtype}
        self.embed_tokens = nn.Embedding(config.vocab_size, config.embed_dim, **factory)
        self.dropout = config.dropout
        self.decoder = LongNetDecoder(
            config, sequence_parallel_group=sequence_parallel_group, **factory
        )
        if config.tie_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(config.embed_dim, config.vocab_size, bias=False, **factory)
        self.chunk_size: int | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, 0.02) embeddings and head; MAGNETO scaling for ``"subln"``."""
        nn.init.normal_(self.embed_tokens.weight, std=0.02)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=0.02)
        if self.config.norm_style == "subln":
            # MAGNETO: scale v/out projections and the FFN by sqrt(log(2L)).
            gain = math.sqrt(math.log(2 * self.config.num_layers))
            with torch.no_grad():
                for layer in cast(Iterable[LongNetDecoderLayer], self.decoder.layers):
                    for lin in (
                        layer.self_attn.v_proj,
                        layer.self_attn.out_proj,
                        layer.ffn.fc1,
                        layer.ffn.fc2,
                    ):
                        lin.weight.mul_(gain)

    @property
    def sequence_parallel_group(self) -> Any:
        return cast(LongNetDecoderLayer, self.decoder.layers[0]).self_attn.sequence_parallel_group

    def set_sequence_parallel_group(self, group: Any) -> None:
        """Switch every attention layer to (``group``) or from (``None``) sequence parallelism."""
        for layer in cast(Iterable[LongNetDecoderLayer], self.decoder.layers):
            layer.self_attn.sequence_parallel_group = group

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute every decoder layer in backward instead of keeping its
        activations (see :class:`LongNetDecoderLayer`); a training setting, not saved
        with the model. Off by default."""
        for layer in cast(Iterable[LongNetDecoderLayer], self.decoder.layers):
            layer.activation_checkpointing = bool(enabled)

    @property
    def activation_checkpointing(self) -> bool:
        return any(layer.activation_checkpointing for layer in self.decoder.layers)

    def set_chunk_size(self, tokens: int | None) -> None:
        """Compute every decoder layer's feed-forward over sequence chunks of
        ``tokens`` positions, and use ``tokens`` as the chunk of the LM head and loss
        of ``forward(..., return_logits=False)`` (default :data:`LOSS_CHUNK_SIZE`).
        In training each chunk is recomputed in backward (the ``(B, N, ffn_dim)``
        hidden activations never all live; one more feed-forward per layer); without
        grad (evaluation) and with a cache (the prefill of :meth:`generate`) the
        chunks run once, one chunk's hidden activations alive at a time. ``None``:
        whole sequences (the default). A setting of the run, not saved with the
        model."""
        if tokens is not None and (isinstance(tokens, bool) or int(tokens) != tokens or tokens < 1):
            raise ValueError(f"tokens must be a positive int or None, got {tokens!r}")
        self.chunk_size = None if tokens is None else int(tokens)
        for layer in cast(Iterable[LongNetDecoderLayer], self.decoder.layers):
            layer.chunk_size = self.chunk_size

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_cache(self) -> list[KVCache]:
        """Empty per-layer KV caches for :meth:`forward` / :meth:`generate`."""
        return self.decoder.new_cache()

    def forward(
        self,
        input_ids: Tensor,
        targets: Tensor | None = None,
        *,
        cache: list[KVCache] | None = None,
        position_offset: int | None = None,
        cu_seqlens: Tensor | PackedDocuments | None = None,
        return_logits: bool = True,
        reduction: str = "mean",
    ) -> Tensor | tuple[Tensor | None, Tensor]:
        """Logits ``(B, N, vocab)``; with ``targets`` ``(B, N)`` also the mean loss.

        Args:
            input_ids: token ids ``(B, N)`` (int64).
            targets: next-token ids aligned with ``input_ids``; entries equal to
                ``-100`` or to ``config.pad_token_id`` are ignored (the loss is the
                mean over the other targets).
            cache: per-layer caches from :meth:`new_cache`; the tokens are appended.
            position_offset: absolute position of the first token (default 0): it
                sets the rotary/xPos positions and where the attention segments fall
                (see :class:`~longnet.modules.MultiheadDilatedAttention`). With a
                cache it may only restate the cache's next position (an empty cache
                then starts there). With ``cu_seqlens`` every document starts there.
            cu_seqlens: packed documents: ``input_ids`` is one row ``(1, N)`` of
                documents back to back, document ``i`` the tokens
                ``[cu_seqlens[i], cu_seqlens[i+1])`` (int32/int64 ``(S+1,)``, from 0
                to ``N``, nondecreasing; empty documents allowed). Every document is
                computed as if it were alone (positions and segments restart at its
                first token; it attends to no other document). Targets stay the
                caller's: a document's last target (the next document's first
                token) counts unless it is ``-100``. Not combinable with ``cache``.
                Under sequence parallelism: the boundaries of the whole sequence.
                The offsets are read once per forward (or never, given a
                :class:`~longnet.packing.PackedDocuments`).
            return_logits: with ``targets``, ``False`` returns ``(None, loss)`` and
                computes the LM head and the loss over chunks of positions (the
                model's :meth:`set_chunk_size`, default :data:`LOSS_CHUNK_SIZE`), each
                recomputed in backward, so the ``(B, N, vocab)`` logits and their
                gradient never all live. The loss and gradients are those of the
                full computation up to the order of the sums.
            reduction: ``"mean"`` (the default): the loss is the mean over the
                counted targets (NaN when none counts); ``"sum"``: their sum (0 when
                none counts). With :meth:`count_targets`, ``"sum"`` gives a mean over
                any set of batches, rows or sequence shards that is weighted by tokens
                (see :func:`longnet.parallel.token_mean_loss`).
        """
        _check_reduction(reduction)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (B, N), got {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
        x = self.embed_tokens(input_ids)
        x = F.dropout(x, p=self.dropout, training=self.training)
        if cu_seqlens is not None and input_ids.shape[0] != 1:
            raise ValueError(
                "packed documents (cu_seqlens) need input_ids of shape (1, N), got "
                f"{tuple(input_ids.shape)}"
            )
        if isinstance(cu_seqlens, Tensor):
            # Read and checked once here; every layer (and its recompute under
            # activation checkpointing) reuses the host offsets.
            cu_seqlens = PackedDocuments.from_cu_seqlens(cu_seqlens).to(x.device)
        x = self.decoder(x, cache=cache, position_offset=position_offset, cu_seqlens=cu_seqlens)
        weight = self._head_weight()
        if not return_logits:
            if targets is None:
                raise ValueError("return_logits=False needs targets (it returns only the loss)")
            self._check_targets(input_ids, targets)
            return None, chunked_lm_loss(
                x,
                weight,
                self._loss_targets(targets),
                self.chunk_size or LOSS_CHUNK_SIZE,
                reduction,
            )
        logits = F.linear(x, weight)
        if targets is None:
            return logits
        self._check_targets(input_ids, targets)
        targets = self._loss_targets(targets)
        # float32 at least (float64 models keep float64).
        wide = logits if logits.dtype == torch.float64 else logits.float()
        loss = F.cross_entropy(
            wide.reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=-100,
            reduction=reduction,
        )
        return logits, loss

    def count_targets(self, targets: Tensor) -> Tensor:
        """The number of targets that count in the loss (not ``-100``, not
        ``config.pad_token_id``): the denominator of ``forward``'s mean loss, an int64
        scalar on ``targets``' device."""
        return (self._loss_targets(targets) != -100).sum()

    @staticmethod
    def _check_targets(input_ids: Tensor, targets: Tensor) -> None:
        if targets.shape != input_ids.shape:
            raise ValueError(
                f"targets must have the shape of input_ids {tuple(input_ids.shape)}"
                f", got {tuple(targets.shape)}"
            )

    def _loss_targets(self, targets: Tensor) -> Tensor:
        targets = targets.long()
        if self.config.pad_token_id is not None:
            # Padding is not text: predicting it must not count in the loss.
            targets = targets.masked_fill(targets == self.config.pad_token_id, -100)
        return targets

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        greedy: bool = False,
        *,
        eos_token_id: int | None = None,
        ignore_eos: bool = False,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Continue ``input_ids`` ``(B, N)`` by up to ``max_new_tokens`` tokens.

        Args:
            temperature: softmax temperature (> 0) for sampling.
            top_k: sample only among the ``top_k`` most likely tokens.
            greedy: take the arg-max instead of sampling.
            eos_token_id: rows stop after emitting it (later positions repeat it);
                generation ends once every row has. ``None`` (the default) uses
                ``config.eos_token_id``.
            ignore_eos: never stop early: always generate ``max_new_tokens`` tokens.
            use_cache: decode incrementally with KV caches (the default); ``False``
                reruns the full prefix each step (slow, for checking).
            generator: random generator for reproducible sampling.

        Returns:
            ``(B, N + T)`` ids, prompt included, ``T <= max_new_tokens``.
        """
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ValueError(
                f"input_ids must have shape (B, N) with N >= 1, got {tuple(input_ids.shape)}"
            )
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if not greedy and not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        if self.sequence_parallel_group is not None:
            raise ValueError(
                "generate() does not run under sequence parallelism; "
                "call set_sequence_parallel_group(None) first"
            )
        if ignore_eos:
            eos_token_id = None
        elif eos_token_id is None:
            eos_token_id = self.config.eos_token_id
        was_training = self.training
        self.eval()
        try:
            ids = input_ids
            done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
            cache = self.new_cache() if use_cache else None
            step_input = ids
            for _ in range(max_new_tokens):
                logits = self._last_logits(step_input, cache).float()
                nxt = self._pick(logits, temperature, top_k, greedy, generator)
                if eos_token_id is not None:
                    nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                    done = done | (nxt == eos_token_id)
                ids = torch.cat((ids, nxt[:, None]), dim=1)
                step_input = nxt[:, None] if use_cache else ids
                if eos_token_id is not None and bool(done.all()):
                    break
            return ids
        finally:
            self.train(was_training)

    def _last_logits(self, input_ids: Tensor, cache: list[KVCache] | None) -> Tensor:
        """Logits ``(B, vocab)`` of the last position of ``input_ids`` (in eval mode):
        the LM head runs on that position alone, so a long prompt's prefill never
        holds ``(B, N, vocab)`` logits."""
        x = self.decoder(self.embed_tokens(input_ids), cache=cache)
        return F.linear(x[:, -1], self._head_weight())

    def _head_weight(self) -> Tensor:
        """The LM head's weight (the token embedding's when tied)."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @staticmethod
    def _pick(
        logits: Tensor,
        temperature: float,
        top_k: int | None,
        greedy: bool,
        generator: torch.Generator | None,
    ) -> Tensor:
        if greedy:
            return logits.argmax(dim=-1)
        logits = logits / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    # ---------------------------------------------------------------- persistence

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` and the weights (safetensors when installed, else torch)."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump(self.config.to_dict(), f, indent=2)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        try:
            from safetensors.torch import save_file
        except ImportError:
            torch.save(state, os.path.join(directory, TORCH_WEIGHTS_NAME))
            stale = os.path.join(directory, SAFETENSORS_NAME)
        else:
            save_file(state, os.path.join(directory, SAFETENSORS_NAME))
            stale = os.path.join(directory, TORCH_WEIGHTS_NAME)
        if os.path.exists(stale):
            os.remove(stale)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        *,
        map_location: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> LongNetLM:
        """Load a model written by :meth:`save_pretrained`."""
        cfg_path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!r}")
        with open(cfg_path) as f:
            config = LongNetConfig.from_dict(json.load(f))
        st_path = os.path.join(directory, SAFETENSORS_NAME)
        pt_path = os.path.join(directory, TORCH_WEIGHTS_NAME)
        if os.path.isfile(st_path):
            try:
                from safetensors.torch import load_file
            except ImportError as exc:
                raise ImportError(
                    f"{st_path} needs the safetensors package (pip install safetensors)"
                ) from exc
            state = load_file(st_path, device=str(map_location))
        elif os.path.isfile(pt_path):
            state = torch.load(pt_path, map_location=map_location, weights_only=True)
        else:
            raise FileNotFoundError(
                f"no {SAFETENSORS_NAME} or {TORCH_WEIGHTS_NAME} in {directory!r}"
            )
        model = cls(config, device=map_location)
        model.load_state_dict(state)
        if dtype is not None:
            model.to(dtype)
        return model

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"vocab_size={c.vocab_size}, num_layers={c.num_layers}, "
            f"embed_dim={c.embed_dim}, norm_style={c.norm_style!r}, "
            f"tie_embeddings={c.tie_embeddings}"
        )
