"""Dilated attention inside Hugging Face ``transformers`` models.

Importing this module registers ``"longnet"`` with transformers'
``AttentionInterface`` (the attention function) and ``AttentionMaskInterface``
(the mask function that turns padding masks into per-row key ranges)::

    import longnet.integrations.transformers as lt
    model = AutoModelForCausalLM.from_pretrained(path)
    lt.enable(model, segment_lengths=[2048, 4096, 8192], dilation_rates=[1, 2, 4])

``enable`` stores the patterns in ``model.config`` (``longnet_segment_lengths``,
``longnet_dilation_rates``; one list for every layer, or one list per layer), so a
saved model comes back with ``from_pretrained(path, attn_implementation="longnet")``
after this module has been imported.

How a call maps onto ``longnet.dilated_attention``:

* query ``(B, H, Nq, D)`` and key/value ``(B, Hk, Nk, D)`` are passed as
  ``transpose(1, 2)`` views (no copies); grouped-query heads are read natively (no
  repeat of k/v); ``scale`` is the module's ``scaling``; attention is causal.
* A padding mask becomes per-row key ranges: row ``b``'s real tokens must be one
  contiguous run (left padding, right padding or both); ``key_start[b]`` is its
  first real token and ``key_end`` the key of the last query (trailing padding is
  never attended by the real tokens before it under the causal rule). Dilated
  segments count from each row's first real token, so a padded row computes what
  the same sequence computes alone. Outputs at padding positions are unspecified
  (as they are for every attention implementation); real positions are exact.
* Decoding against transformers' cache is the operator's ``Nq < Nk`` path (queries
  bottom-right aligned to the last token seen so far, also for static caches).
* ``generate`` on an enabled model uses :class:`DilatedAttentionCache` unless told
  otherwise: per layer it keeps only the keys a later query can read (at most
  ``lcm(segment_lengths) - 1`` tokens plus the current ones), so a decoded token
  costs the same at any context length; the mask then covers every position from 0
  and each layer starts each row a multiple of ``lcm(segment_lengths)`` after its
  first real token (:func:`key_ranges_from_mask`). A long prompt is prefilled in
  chunks with ``generate(..., prefill_chunk_size=4096)``, or by calling the model on
  slices with ``cache=DilatedAttentionCache(model.config)``.
* Packed documents (padding-free batches, e.g. from ``DataCollatorWithFlattening``)
  run through the operator's ``cu_seqlens_q`` / ``cu_seqlens_k``: every document is
  computed as if it were alone (segments restart at its first token). The boundaries
  come, in this order, from the ``cu_seq_lens_q`` / ``cu_seq_lens_k`` keyword
  arguments (``return_flash_attn_kwargs=True``), from transformers' packed-sequence
  mask (built from restarting ``position_ids`` when the forward has no cache), or,
  as transformers' flash-attention path does, from ``position_ids`` that restart
  inside a row of a batch without attention mask (a new document wherever the
  position id does not grow by 1), also when the model made a cache. The model's own
  rotary embedding reads the same ``position_ids``.

What dilated attention cannot express raises ``ValueError`` instead of silently
computing something else: masks that are not causal + padding or packed documents
(holes, custom mask functions, biases), bidirectional attention, sliding-window or
chunked layers, attention dropout > 0, soft-capping, attention sinks, packed
documents together with a padding mask or with cached keys.
"""

from __future__ import annotations

import functools
import math
import types
import weakref
from typing import Any

import torch
import transformers  # a clear ImportError when the extra is missing
from torch import Tensor

if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(
        "longnet.integrations.transformers needs transformers >= 5 (its AttentionInterface "
        f"and mask interface), found {transformers.__version__}: "
        'pip install -e ".[transformers]"'
    )
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function

import longnet
from longnet.integrations.cache import (
    CACHE_KINDS,
    STORAGE_KINDS,
    DilatedAttentionCache,
    DilatedAttentionLayer,
    prepare_cache_for_generation,
)
from longnet.integrations.pattern_cache import (
    PATTERN_LAYER_MARK,
    DilatedPatternLayer,
    pattern_storage_rows,
)
from longnet.integrations.patterns import (
    ATTN_IMPLEMENTATION,
    DILATION_RATES_KEY,
    SEGMENT_LENGTHS_KEY,
    layer_patterns,
    normalize_patterns,
)
from longnet.packing import PackedDocuments, cu_seqlens_from_position_ids

__all__ = [
    "ATTN_IMPLEMENTATION",
    "CACHE_KINDS",
    "DilatedAttentionCache",
    "DilatedAttentionLayer",
    "DilatedPatternLayer",
    "STORAGE_KINDS",
    "enable",
    "pattern_storage_rows",
    "layer_patterns",
    "longnet_attention_forward",
    "longnet_mask",
    "key_ranges_from_mask",
    "document_boundaries",
]


def _check_model_config_supported(config: Any) -> None:
    """Raise ``ValueError`` when the model config has attention that dilated attention
    cannot replace: sliding-window or chunked layers, or a model that is not a causal
    decoder."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        other = sorted({t for t in layer_types if t != "full_attention"})
        if other:
            raise ValueError(
                f'attn_implementation="{ATTN_IMPLEMENTATION}" replaces full causal '
                f"attention only; this config has layers of type {other} "
                f"(layer_types={list(layer_types)}). For sliding-window layers, turn the "
                "window off (e.g. use_sliding_window=False / sliding_window=None) if "
                "dilated attention should replace them."
            )
    if getattr(config, "sliding_window", None) is not None and layer_types is None:
        raise ValueError(
            f'attn_implementation="{ATTN_IMPLEMENTATION}" cannot express a sliding '
            f"window (config.sliding_window={config.sliding_window}); set "
            "config.sliding_window = None if dilated attention should replace it"
        )
    if getattr(config, "attention_chunk_size", None) is not None:
        raise ValueError(
            f'attn_implementation="{ATTN_IMPLEMENTATION}" cannot express chunked attention '
            f"(config.attention_chunk_size={config.attention_chunk_size})"
        )
    if not getattr(config, "is_causal", True) or getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f'attn_implementation="{ATTN_IMPLEMENTATION}" supports causal decoder-only models only'
        )


def enable(model: Any, segment_lengths: Any, dilation_rates: Any, *, cache: str = "dilated") -> Any:
    """Switch a loaded transformers model to dilated attention.

    Args:
        model: a ``PreTrainedModel`` whose attention goes through transformers'
            ``AttentionInterface`` (Llama, Mistral, Qwen2, GPT-NeoX, ...).
        segment_lengths, dilation_rates: one list of ints for every layer, or one
            list per layer (lists of lists).
        cache: the cache ``generate`` makes when none is passed: ``"dilated"``
            (:class:`DilatedAttentionCache`: only the keys later queries can read),
            ``"dilated-int8"`` (the same in int8) or ``"full"`` (transformers' own,
            every key).

    The patterns are stored in ``model.config`` (saved by ``save_pretrained``) and
    ``model.config._attn_implementation`` becomes ``"longnet"``. The cache choice
    belongs to this model object (a model loaded with ``from_pretrained`` keeps every
    key until ``enable`` is called on it or a cache is passed). Returns the model.
    """
    if cache not in CACHE_KINDS:
        raise ValueError(f"cache must be one of {CACHE_KINDS}, got {cache!r}")
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    _check_model_config_supported(text_config)
    num_layers = getattr(text_config, "num_hidden_layers", None)
    ws, rs = normalize_patterns(segment_lengths, dilation_rates, num_layers)
    for cfg in {id(config): config, id(text_config): text_config}.values():
        setattr(cfg, SEGMENT_LENGTHS_KEY, ws)
        setattr(cfg, DILATION_RATES_KEY, rs)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if cache == "full":
        model.__dict__.pop("_prepare_cache_for_generation", None)
    else:
        model._prepare_cache_for_generation = types.MethodType(
            functools.partial(prepare_cache_for_generation, kind=cache), model
        )
    return model


# ----------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------


def _check_one_run(padding: Tensor) -> None:
    """``padding`` (B, W) bool, True = real token: each row's real tokens must be one
    contiguous run."""
    if padding.shape[1] == 0:
        return
    runs = padding[:, 0].to(torch.int64) + (padding[:, 1:] & ~padding[:, :-1]).sum(1)
    bad = runs > 1
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise ValueError(
            f'attn_implementation="{ATTN_IMPLEMENTATION}" accepts padding masks only: '
            "each row's real tokens must be one contiguous run (left and/or right "
            f"padding), but row {b} of the attention mask has {int(runs[b])} separate runs "
            "of real tokens (a hole in the middle). Dilated attention cannot skip "
            "tokens inside a sequence."
        )


def _closure(fn: Any) -> dict[str, Any]:
    code = getattr(fn, "__code__", None)
    cells = getattr(fn, "__closure__", None) or ()
    if code is None:
        return {}
    return {name: cell.cell_contents for name, cell in zip(code.co_freevars, cells)}


def _packed_document_ids(mask_function: Any) -> Tensor | None:
    """The ``(B, N)`` document ids if ``mask_function`` is exactly transformers' causal
    mask restricted to packed documents, ``and_masks(remap_positions_for_packed_sequence(
    causal_mask_function, position_ids), packed_sequence_mask_function(ids))`` (what
    ``create_causal_mask`` builds for restarting position ids); ``None`` for anything
    else. Causal attention on the positions inside each document, within the same
    document, is each document's own causal attention."""
    if getattr(mask_function, "__qualname__", "") != "and_masks.<locals>.and_mask":
        return None
    parts = _closure(mask_function).get("mask_functions")
    if not isinstance(parts, tuple) or len(parts) != 2:
        return None
    remap, packed = parts
    if (
        getattr(remap, "__qualname__", "")
        != "remap_positions_for_packed_sequence.<locals>.inner_mask"
        or _closure(remap).get("mask_function") is not causal_mask_function
        or getattr(packed, "__qualname__", "")
        != "packed_sequence_mask_function.<locals>.inner_mask"
    ):
        return None
    ids = _closure(packed).get("packed_sequence_mask")
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.is_floating_point():
        return None
    return ids


def longnet_mask(
    batch_size: int,
    q_length: int | None = None,
    kv_length: int | None = None,
    q_offset: Any = 0,
    kv_offset: int = 0,
    mask_function: Any = causal_mask_function,
    attention_mask: Tensor | None = None,
    device: Any = "cpu",
    **kwargs: Any,
) -> Tensor | None:
    """transformers mask function for ``"longnet"`` (``AttentionMaskInterface``).

    Instead of a dense 4-D mask it returns the 2-D padding mask ``(B, key_end)``
    (True = real token) over the keys that hold the sequence up to the last query,
    after checking that the requested mask is exactly causal + padding, or ``None``
    when no row is left-padded, the keys end at the last query and the cache has
    dropped no key. A cache that dropped its oldest keys (``kv_offset > 0``, e.g.
    :class:`DilatedAttentionCache`) still gets the mask over every position from 0,
    always: the attention function learns from its width how many keys were dropped.
    For packed documents (the causal mask restricted to documents, which
    transformers builds from restarting position ids) it returns the ``(B, N)`` int64
    document ids of the tokens instead. Memory stays O(B * N).
    """
    if mask_function is not causal_mask_function:
        doc_ids = _packed_document_ids(mask_function)
        if doc_ids is None:
            name = getattr(mask_function, "__qualname__", repr(mask_function))
            raise ValueError(
                f'attn_implementation="{ATTN_IMPLEMENTATION}" supports a causal mask plus '
                f"padding or packed documents only, but the model asked for another mask "
                f"({name}): bidirectional, sliding-window, chunked or custom "
                "(or_/and_mask_function) masks cannot be expressed by dilated attention"
            )
        if attention_mask is not None or int(kv_offset) != 0 or q_length != kv_length:
            raise ValueError(
                f'attn_implementation="{ATTN_IMPLEMENTATION}": packed documents need a '
                "forward without padding mask and without cached keys"
            )
        doc_ids = doc_ids.to(device=device, dtype=torch.int64)
        if doc_ids.shape[0] != batch_size:
            doc_ids = doc_ids.expand(batch_size, -1)
        return doc_ids.contiguous()
    if q_length is None:  # early 5.x releases pass the queries' cache positions instead
        cache_position = kwargs.get("cache_position")
        if cache_position is None:
            raise ValueError("internal: the mask function got neither q_length nor cache_position")
        q_length = int(cache_position.shape[0])
        q_offset = int(cache_position[0]) if q_length > 0 else 0
    if kv_length is None:
        raise ValueError("internal: the mask function got no kv_length")
    dropped = int(kv_offset)
    if dropped < 0:
        raise ValueError(f"internal: negative key/value offset {dropped}")
    key_end = int(q_offset) + int(q_length)
    if key_end > dropped + kv_length:
        raise ValueError(
            f"internal: queries end at key {key_end}, past the {dropped + kv_length} keys available"
        )
    if attention_mask is None:
        if key_end == kv_length and dropped == 0:
            return None
        return torch.ones(batch_size, key_end, dtype=torch.bool, device=device)
    if attention_mask.dim() != 2:
        raise ValueError(
            f"expected a 2-D padding mask (batch, keys), got shape {tuple(attention_mask.shape)}"
        )
    padding = attention_mask.to(device=device, dtype=torch.bool)
    if padding.shape[0] != batch_size:
        padding = padding.expand(batch_size, -1)
    width = padding.shape[1]
    if width < key_end:  # as transformers does: keys past the mask are padding
        padding = torch.nn.functional.pad(padding, (0, key_end - width), value=False)
    padding = padding[:, :key_end]
    _check_one_run(padding)
    if key_end == kv_length and dropped == 0 and (key_end == 0 or bool(padding[:, 0].all())):
        # No left padding: causal attention alone is exact for every real token
        # (right padding comes after them and is never attended by them).
        return None
    return padding.contiguous()


def _causal_allowed(nq: int, nk: int, device: Any) -> Tensor:
    q_pos = torch.arange(nk - nq, nk, device=device)
    return torch.arange(nk, device=device)[None, :] <= q_pos[:, None]


def _padding_from_4d(mask: Tensor, nq: int, nk: int) -> Tensor:
    """A dense 4-D mask (bool: True = attend; float: additive 0 / -inf or dtype min)
    that is exactly causal + padding, as its 2-D padding mask; raise otherwise."""
    if mask.dim() != 4 or mask.shape[-2:] != (nq, nk):
        raise ValueError(
            f'attn_implementation="{ATTN_IMPLEMENTATION}" expected a (B, 1, {nq}, {nk}) '
            f"mask, got shape {tuple(mask.shape)}"
        )
    if mask.dtype == torch.bool:
        allowed = mask
    elif mask.is_floating_point():
        blocked = (mask == -math.inf) | (mask == torch.finfo(mask.dtype).min)
        if not bool(((mask == 0) | blocked).all()):
            raise ValueError(
                f'attn_implementation="{ATTN_IMPLEMENTATION}" cannot add an attention bias: '
                "the float mask holds values other than 0 and -inf"
            )
        allowed = ~blocked
    else:
        raise ValueError(f"attention mask must be bool or float, got {mask.dtype}")
    if not bool((allowed == allowed[:, :1]).all()):
        raise ValueError(
            f'attn_implementation="{ATTN_IMPLEMENTATION}" cannot use a different mask per head'
        )
    allowed = allowed[:, 0]
    padding = allowed[:, -1, :]  # the last query sees every real key
    expected = padding[:, None, :] & _causal_allowed(nq, nk, mask.device)[None]
    if not bool((allowed == expected).all()):
        raise ValueError(
            f'attn_implementation="{ATTN_IMPLEMENTATION}" accepts causal + padding masks '
            "only; this 4-D attention mask is something else (a custom mask cannot be "
            "expressed by dilated attention)"
        )
    _check_one_run(padding)
    return padding


def _padding_of(attention_mask: Tensor | None, batch_size: int, nq: int) -> Tensor | None:
    """The ``(B, W)`` padding mask (True: a real token) over the last ``W`` positions
    from the mask the model passes to its attention function, or ``None``."""
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4:
        padding = _padding_from_4d(attention_mask, nq, attention_mask.shape[-1])
    elif attention_mask.dim() == 2 and attention_mask.dtype == torch.bool:
        padding = attention_mask
    else:
        raise ValueError(
            f'attn_implementation="{ATTN_IMPLEMENTATION}" got an attention mask of shape '
            f"{tuple(attention_mask.shape)} and dtype {attention_mask.dtype}; expected the "
            "2-D padding mask made by its mask function or a 4-D causal + padding mask"
        )
    return padding.expand(batch_size, -1) if padding.shape[0] != batch_size else padding


def key_ranges_from_mask(
    attention_mask: Tensor | None,
    batch_size: int,
    nq: int,
    nk: int,
    device: Any,
    *,
    period: int | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """``(key_start, key_end)`` for ``longnet.dilated_attention`` from the mask the
    model passes to its attention function (``None``, the 2-D padding mask made by
    :func:`longnet_mask`, or a dense causal + padding 4-D mask).

    A 2-D padding mask wider than ``nk`` comes with a cache that dropped its oldest
    keys: the ``nk`` keys are the last ones of the ``W`` positions the mask covers.
    Row ``b`` (first real token ``p_b``) then starts at the first kept key ``s`` with
    ``s - p_b`` a multiple of ``period`` (the layer's ``lcm(segment_lengths)``):
    shifting every position by a multiple of every ``w_i`` keeps each segment
    boundary and head offset, so counting positions from ``s`` computes what
    counting from ``p_b`` computes, on the keys the queries can still read. That
    needs the cache to have kept at least ``period - 1`` keys before the first query
    (what :class:`DilatedAttentionCache` keeps); fewer raise ``ValueError``.
    """
    padding = _padding_of(attention_mask, batch_size, nq)
    if attention_mask is None or padding is None:
        return None, None
    width = padding.shape[1]
    dropped = width - nk if attention_mask.dim() == 2 else 0
    if width < nq or (dropped > 0 and period is None) or (dropped <= 0 and width > nk):
        raise ValueError(
            f"padding mask covers {width} keys; expected between {nq} (queries) and {nk} (keys)"
        )
    if dropped > 0:
        assert period is not None  # checked above
        first_query = width - nq
        if dropped > max(0, first_query - period + 1):
            raise ValueError(
                f"the cache dropped the first {dropped} keys, but a query at position "
                f"{first_query} may read keys from position {first_query - period + 1} on "
                f"(lcm(segment_lengths) = {period}): a cache for dilated attention must "
                "keep at least lcm(segment_lengths) - 1 keys before the first query"
            )
    padding = padding.to(device)
    has_real = padding.any(dim=1)
    first = padding.to(torch.uint8).argmax(dim=1)
    key_start = torch.where(has_real, first, torch.full_like(first, width))
    if dropped > 0:
        assert period is not None  # checked above
        # First kept key a multiple of `period` after the row's first real token.
        behind = (dropped - key_start).clamp(min=0)
        aligned = key_start + (behind + period - 1) // period * period
        key_start = (aligned - dropped).clamp(max=nk)
    key_end = torch.full_like(key_start, nk if dropped > 0 else width)
    return key_start, key_end


# ----------------------------------------------------------------------------------
# Packed documents
# ----------------------------------------------------------------------------------


def _cu_from_document_ids(doc_ids: Tensor) -> Tensor:
    """Boundaries of the rows ``(B, N)`` of document ids flattened into one row: a new
    document at every row start and wherever the id changes."""
    b, n = doc_ids.shape
    starts = torch.ones(b, n, dtype=torch.bool, device=doc_ids.device)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = starts.reshape(-1).nonzero()[:, 0]
    return torch.cat([first, first.new_full((1,), b * n)])


def _cu_from_position_ids(position_ids: Tensor, b: int) -> Tensor | None:
    """Boundaries of the rows of ``position_ids`` flattened into one row, or ``None``
    when every row is one sequence (no position id that fails to grow by 1)."""
    if position_ids.dim() == 1:
        position_ids = position_ids[None]
    if position_ids.shape[0] != b:
        position_ids = position_ids.expand(b, -1)
    if position_ids.shape[1] < 2:
        return None
    restarts = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if not bool(restarts.any()):
        return None
    n = position_ids.shape[1]
    parts = [
        cu_seqlens_from_position_ids(position_ids[i])[:-1].to(torch.int64) + i * n for i in range(b)
    ]
    ends = torch.full((1,), b * n, dtype=torch.int64, device=position_ids.device)
    return torch.cat([*parts, ends])


def document_boundaries(
    attention_mask: Tensor | None, b: int, nq: int, nk: int, kwargs: dict[str, Any]
) -> tuple[Tensor, Tensor] | None:
    """The packed documents of one attention call, as the operator's
    ``cu_seqlens_q`` / ``cu_seqlens_k``.

    Returns ``None`` when the call is not packed. Otherwise returns the pair
    ``(cu_seqlens_q, cu_seqlens_k)``: two 1-D integer tensors of ``S + 1`` cumulative
    offsets (ending at ``b * nq`` and ``b * nk``) of the ``S`` documents in the call's
    ``b`` rows flattened into one row (every row start is a document start); the
    keyword arguments are returned as given, the other sources give int64.
    The documents come, in this order, from the ``cu_seq_lens_q`` /
    ``cu_seq_lens_k`` keyword arguments (flash-attention's convention), from the
    document ids that :func:`longnet_mask` puts in ``attention_mask``, or from
    ``position_ids`` in ``kwargs`` that restart inside a row (only without attention
    mask).

    Raises ``ValueError`` for boundaries that do not fit the call or each other (wrong
    shape or end, ``cu_seq_lens_q`` that disagree with the document ids, packed
    documents with a padding mask, restarting ``position_ids`` with cached keys)."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    doc_ids = None
    if (
        isinstance(attention_mask, Tensor)
        and attention_mask.dim() == 2
        and not attention_mask.is_floating_point()
        and attention_mask.dtype != torch.bool
    ):
        doc_ids = attention_mask
    if cu_q is not None or cu_k is not None:
        cu_q = cu_k if cu_q is None else cu_q
        cu_k = cu_q if cu_k is None else cu_k
        if attention_mask is not None and doc_ids is None:
            raise ValueError(
                f'attn_implementation="{ATTN_IMPLEMENTATION}" cannot combine packed '
                "documents (cu_seq_lens_q/cu_seq_lens_k) with a padding mask"
            )
        for name, cu, total in (("cu_seq_lens_q", cu_q, b * nq), ("cu_seq_lens_k", cu_k, b * nk)):
            if not isinstance(cu, Tensor) or cu.dim() != 1 or cu.shape[0] < 1:
                raise ValueError(f"{name} must be a 1-D tensor (S+1,), got {cu!r}")
            if int(cu[-1]) != total:
                raise ValueError(
                    f"{name} ends at {int(cu[-1])}, but the call has {total} "
                    f"{'queries' if name.endswith('q') else 'keys'} (batch {b} flattened)"
                )
        assert isinstance(cu_q, Tensor) and isinstance(cu_k, Tensor)  # checked above
        if doc_ids is not None:
            # transformers' packed mask (from position_ids) must agree with the
            # boundaries passed alongside it.
            from_ids = _cu_from_document_ids(doc_ids)
            if not torch.equal(from_ids.to(cu_q.device), cu_q.to(torch.int64)):
                raise ValueError(
                    f"cu_seq_lens_q {cu_q.tolist()} disagree with the documents of "
                    f"position_ids {from_ids.tolist()}"
                )
        return cu_q, cu_k
    if doc_ids is not None:
        if doc_ids.shape != (b, nq) or nq != nk:
            raise ValueError(
                f"packed document ids of shape {tuple(doc_ids.shape)} do not fit a call "
                f"with batch {b}, {nq} queries and {nk} keys"
            )
        cu = _cu_from_document_ids(doc_ids)
        return cu, cu
    position_ids = kwargs.get("position_ids")
    if not isinstance(position_ids, Tensor) or position_ids.shape[-1] != nq:
        return None
    if attention_mask is not None:
        # Position ids that restart between two real queries are packed documents,
        # which a causal + padding mask would let attend to each other (generate's
        # left padding restarts only at padding).
        real = attention_mask
        if real.dim() == 4:
            real = _padding_from_4d(real, nq, nk)
        pos = position_ids.reshape(-1, nq)
        mask_2d = real.dim() == 2 and real.dtype == torch.bool and real.shape[1] >= nq
        if mask_2d and pos.shape[0] in (1, b):
            real = real[:, -nq:].to(position_ids.device).expand(b, -1)
            pos = pos.expand(b, -1)
            restarts = (pos[:, 1:] != pos[:, :-1] + 1) & real[:, 1:] & real[:, :-1]
            if bool(restarts.any()):
                raise ValueError(
                    f'attn_implementation="{ATTN_IMPLEMENTATION}" cannot combine packed '
                    "documents (position_ids that restart inside a row) with a padding "
                    "mask: drop the attention mask (packed rows need none) or do not pack"
                )
        return None
    cu = _cu_from_position_ids(position_ids, b)
    if cu is None:
        return None
    if nq != nk:
        raise ValueError(
            f'attn_implementation="{ATTN_IMPLEMENTATION}": position_ids restart inside '
            f"the {nq} queries of a call with {nk} keys (a cache): packed documents "
            "need a forward without cached keys (use_cache=False or no past)"
        )
    return cu, cu


class _BoundariesOfForward:
    """:func:`document_boundaries` computed once per forward: every layer of a
    forward gets the same mask and keyword tensors, so the first layer's answer (as
    :class:`~longnet.packing.PackedDocuments`, read to the host once) serves the
    others, with no read back from the device (no sync on CUDA) in later layers."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._refs: tuple = ()
        self._value: tuple[PackedDocuments, PackedDocuments] | None = None

    @staticmethod
    def _sources(attention_mask: Tensor | None, kwargs: dict[str, Any]) -> tuple:
        return (
            attention_mask,
            kwargs.get("position_ids"),
            kwargs.get("cu_seq_lens_q"),
            kwargs.get("cu_seq_lens_k"),
        )

    def __call__(
        self, attention_mask: Tensor | None, b: int, nq: int, nk: int, kwargs: dict[str, Any]
    ) -> tuple[PackedDocuments, PackedDocuments] | None:
        sources = self._sources(attention_mask, kwargs)
        if not all(t is None or isinstance(t, Tensor) for t in sources):
            return self._compute(attention_mask, b, nq, nk, kwargs)  # odd inputs: no cache
        key = (b, nq, nk) + tuple(None if t is None else (id(t), t._version) for t in sources)
        if key == self._key and all(
            (ref is None) if t is None else (ref is not None and ref() is t)
            for t, ref in zip(sources, self._refs)
        ):
            return self._value
        value = self._compute(attention_mask, b, nq, nk, kwargs)
        self._key = key
        self._refs = tuple(None if t is None else weakref.ref(t) for t in sources)
        self._value = value
        return value

    @staticmethod
    def _compute(
        attention_mask: Tensor | None, b: int, nq: int, nk: int, kwargs: dict[str, Any]
    ) -> tuple[PackedDocuments, PackedDocuments] | None:
        packed = document_boundaries(attention_mask, b, nq, nk, kwargs)
        if packed is None:
            return None
        cu_q, cu_k = packed
        docs_q = PackedDocuments.from_cu_seqlens(cu_q, b * nq, "cu_seq_lens_q")
        docs_k = (
            docs_q
            if cu_k is cu_q
            else PackedDocuments.from_cu_seqlens(cu_k, b * nk, "cu_seq_lens_k")
        )
        return docs_q, docs_k


_boundaries_of_forward = _BoundariesOfForward()


# ----------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------

_UNSUPPORTED_KWARGS = {
    "sliding_window": "a sliding window",
    "softcap": "logit soft-capping",
    "position_bias": "a position bias",
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
}


def longnet_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers attention function for ``"longnet"`` (``AttentionInterface``).

    ``query`` is ``(B, H, Nq, D)``, ``key``/``value`` ``(B, Hk, Nk, D)``; returns
    ``(out, None)`` with ``out`` of shape ``(B, Nq, H, D)``.
    """
    if dropout:
        raise ValueError(
            f'attn_implementation="{ATTN_IMPLEMENTATION}" does not implement attention '
            f"dropout (got dropout={dropout} in training); set the config's "
            "attention_dropout to 0"
        )
    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise ValueError(
                f'attn_implementation="{ATTN_IMPLEMENTATION}" cannot express {what} '
                f"({name}={kwargs[name]!r})"
            )
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not causal:
        raise ValueError(
            f'attn_implementation="{ATTN_IMPLEMENTATION}" supports causal (decoder) attention only'
        )
    config = getattr(module, "config", None)
    ws, rs = layer_patterns(config, getattr(module, "layer_idx", None))

    b, h, nq, d = query.shape
    nk = key.shape[2]
    pattern_layer = getattr(key, PATTERN_LAYER_MARK, None)
    if pattern_layer is not None:  # a DilatedAttentionCache layer with per-pattern storage
        return pattern_layer.attend(
            query, key, value, _padding_of(attention_mask, b, nq), scaling
        ), None
    packed = _boundaries_of_forward(attention_mask, b, nq, nk, kwargs)
    if packed is not None:
        # Rows flattened into one packed row (views for B = 1).
        cu_q, cu_k = (docs.to(query.device) for docs in packed)
        out = longnet.dilated_attention(
            query.transpose(1, 2).reshape(1, b * nq, h, d),
            key.transpose(1, 2).reshape(1, b * nk, key.shape[1], d),
            value.transpose(1, 2).reshape(1, b * nk, value.shape[1], value.shape[3]),
            ws,
            rs,
            is_causal=True,
            scale=scaling,
            cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_k,
        )
        return out.reshape(b, nq, h, value.shape[3]), None
    key_start, key_end = key_ranges_from_mask(
        attention_mask, b, nq, nk, query.device, period=math.lcm(*ws)
    )
    out = longnet.dilated_attention(
        query.transpose(1, 2),  # (B, Nq, H, D) views: no copies
        key.transpose(1, 2),  # (B, Nk, Hk, D): grouped-query heads read natively
        value.transpose(1, 2),
        ws,
        rs,
        is_causal=True,
        scale=scaling,
        key_start=key_start,
        key_end=key_end,
    )
    return out, None


AttentionInterface.register(ATTN_IMPLEMENTATION, longnet_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, longnet_mask)
