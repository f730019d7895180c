"""The training-memory model: per-rank memory and traffic of a LongNetLM training
step on a ``(dp, sp)`` mesh with FSDP2 over all ranks (:func:`plan_training` ->
:class:`TrainingPlan`).

Parameter counts and shapes come from the model itself: a
:class:`~longnet.model.LongNetLM` built on the ``meta`` device (no storage, no
initialization cost), its parameters summed per decoder layer and for the rest (the
embedding, the final norm and an untied LM head)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from longnet.model import LongNetConfig, LongNetLM
from longnet.parallel.layout import cdiv
from longnet.plan.cost import RankCost, RunPlan, plan_run
from longnet.plan.units import DTYPE_BYTES, format_bytes, lse_bytes

__all__ = ["TrainingPlan", "fsdp_shard_elements", "layer_activation_bytes", "plan_training"]


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
        f = format_bytes
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


# ----------------------------------------------------------------- parameters


@dataclass(frozen=True)
class _Parameters:
    """The parameter shapes of a LongNetLM: the root's own (embedding, final norm,
    untied LM head) and each decoder layer's."""

    root: tuple[torch.Size, ...]
    layers: tuple[tuple[torch.Size, ...], ...]

    @classmethod
    def of(cls, config: LongNetConfig) -> _Parameters:
        """Read from a LongNetLM of ``config`` built on the meta device."""
        model = LongNetLM(config, device="meta")
        layers = list(model.decoder.layers)
        inside = {id(p) for layer in layers for p in layer.parameters()}
        root = tuple(p.shape for p in model.parameters() if id(p) not in inside)
        return cls(root, tuple(tuple(p.shape for p in layer.parameters()) for layer in layers))

    def shapes(self) -> list[torch.Size]:
        return [*self.root, *(s for layer in self.layers for s in layer)]

    @property
    def total(self) -> int:
        """Elements of all parameters."""
        return sum(s.numel() for s in self.shapes())

    @property
    def root_elements(self) -> int:
        """Elements of the parameters outside the decoder layers."""
        return sum(s.numel() for s in self.root)

    def layer_elements(self, layer: int) -> int:
        """Elements of decoder layer ``layer``'s parameters."""
        return sum(s.numel() for s in self.layers[layer])

    def shard_elements(self, world: int, rank: int) -> int:
        """Elements of ``rank``'s FSDP2 shards (each parameter's dim 0 split in
        ceil-sized chunks over ``world`` ranks)."""
        total = 0
        for shape in self.shapes():
            rows = cdiv(shape[0], world)
            mine = max(0, min(rows, shape[0] - rank * rows))
            total += mine * (shape.numel() // shape[0])
        return total


def fsdp_shard_elements(config: LongNetConfig, world: int, rank: int) -> int:
    """Parameter elements FSDP2 keeps on ``rank`` of ``world`` for a LongNetLM config."""
    return _Parameters.of(config).shard_elements(world, rank)


# ---------------------------------------------------------------- activations


def layer_activation_bytes(
    config: LongNetConfig,
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
    assert f is not None  # LongNetConfig fills it in
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
        attn = bt * (h + 2 * hk) * d * item + bt * h * (d * item + lse_bytes(item))
    else:
        attn = attention.activation_bytes
    return total + attn


# --------------------------------------------------------------- the plan


def _check_training_args(
    batch: int, seq_len: int, dp: int, sp: int, dtype: str, chunk_size: int | None
) -> None:
    """A ValueError naming the first argument of :func:`plan_training` out of range."""
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


@dataclass(frozen=True)
class _Activations:
    """What a rank keeps for backward and backward's peak over the model states."""

    per_layer: int  # one decoder layer's kept activations (as the run checkpoints)
    plain: int  # the same without checkpointing
    other: int  # outside the layers: final norm, LM head input, logits, log-softmax
    total: int  # all layers' and the rest
    peak: int  # backward's larger peak, without parameters, gradients, AdamW state


def _activations(
    config: LongNetConfig,
    worst: RankCost,
    b: int,
    t: int,
    dtype: str,
    activation_checkpointing: bool,
    chunk_size: int | None,
) -> _Activations:
    """Activations of a rank holding ``b x t`` positions whose attention keeps
    ``worst``'s, and backward's two peaks: at the loss (everything kept plus the
    head's transient) and, with checkpointing, in the last layer (the layer inputs and
    that layer recomputed; what is outside the layers is freed by then, but the
    returned logits stay with the caller)."""
    item = DTYPE_BYTES[dtype]
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
    e, v, layers, bt = config.embed_dim, config.vocab_size, config.num_layers, b * t
    assert config.ffn_dim is not None  # LongNetConfig fills it in
    lse_item = lse_bytes(item)
    # final norm input + stats, the LM head's input, float32 logits and log-softmax.
    other = item * (2 * bt * e + 2 * bt) + (0 if chunked else 2 * bt * v * lse_item)
    activations = layers * per_layer + other
    grads = 3 * bt * e * item  # gradients flowing through the residual stream
    if chunk_size is not None:
        bc = b * min(chunk_size, t)
        # One chunk's logits, their log-softmax and gradient; the logits are not
        # returned. One chunk's FFN recomputed: LayerNorm, fc1, GELU and gradients.
        head, returned = 3 * bc * v * lse_item, 0
        ffn_chunk = item * bc * (2 * e + 4 * config.ffn_dim)
    else:
        head, returned, ffn_chunk = bt * v * lse_item, bt * v * item, 0
    at_loss = activations + head + grads
    at_layer = layers * per_layer + (plain if activation_checkpointing else 0) + returned
    at_layer += grads + ffn_chunk
    return _Activations(per_layer, plain, other, activations, max(at_loss, at_layer))


def plan_training(
    config: LongNetConfig,
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
    _check_training_args(batch, seq_len, dp, sp, dtype, chunk_size)
    item = DTYPE_BYTES[dtype]
    world, b, t = dp * sp, batch // dp, seq_len // sp
    h, hk, d = config.num_heads, config.num_kv_heads or config.num_heads, config.head_dim
    layers = config.num_layers
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
    params = _Parameters.of(config)
    shard = max(params.shard_elements(world, r) for r in range(world)) * item
    # One process trains without FSDP2: no gathered copies. With it: the root's
    # parameters and those of the running and the prefetched layer.
    unsharded = (
        0
        if world == 1
        else (params.root_elements + min(2, layers) * params.layer_elements(0)) * item
    )
    worst = max(attn.per_rank, key=lambda c: c.activation_bytes)
    act = _activations(config, worst, b, t, dtype, activation_checkpointing, chunk_size)
    # The busiest rank (forward and backward peak on different ranks when causal).
    sp_layer = max(
        c.bytes_sent_fwd * (2 if activation_checkpointing else 1) + c.bytes_sent_bwd
        for c in attn.per_rank
    )
    kv_chunk = b * t * hk * d * item
    return TrainingPlan(
        dp=dp,
        sp=sp,
        batch=batch,
        seq_len=seq_len,
        dtype=dtype,
        activation_checkpointing=bool(activation_checkpointing),
        parameters=params.total,
        param_bytes_per_rank=shard,
        grad_bytes_per_rank=shard,
        optimizer_bytes_per_rank=2 * shard,
        unsharded_bytes=unsharded,
        layer_activation_bytes=act.per_layer,
        layer_activation_bytes_plain=act.plain,
        other_activation_bytes=act.other,
        activation_bytes=act.total,
        peak_bytes=4 * shard + unsharded + act.peak,  # params, grads, 2 AdamW
        fsdp_bytes_per_step=3 * params.total * item * (world - 1) // world if world > 1 else 0,
        sp_bytes_per_step=layers * sp_layer,
        ring_bytes_per_step=layers * 3 * 2 * kv_chunk * (sp - 1),
        ulysses_bytes_per_step=layers * 2 * b * t * (2 * h + 2 * hk) * d * item * (sp - 1) // sp,
        attention=attn,
        chunk_size=chunk_size,
    )
