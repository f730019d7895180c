"""How dilated-attention patterns live in a ``transformers`` config: the attention
implementation's name, the config keys :func:`longnet.integrations.transformers.enable`
writes, and the patterns of one layer (one list for every layer, or one per layer).
Shared by the attention function and the generation cache."""

from __future__ import annotations

from typing import Any, Union

from longnet.ops import validate_patterns

__all__ = [
    "ATTN_IMPLEMENTATION",
    "SEGMENT_LENGTHS_KEY",
    "DILATION_RATES_KEY",
    "Patterns",
    "layer_patterns",
    "normalize_patterns",
]

ATTN_IMPLEMENTATION = "longnet"
"""The name to pass as ``attn_implementation``."""

SEGMENT_LENGTHS_KEY = "longnet_segment_lengths"
DILATION_RATES_KEY = "longnet_dilation_rates"

Patterns = Union[list[int], list[list[int]]]


# ----------------------------------------------------------------------------------
# Patterns in the config
# ----------------------------------------------------------------------------------


def _is_per_layer(values: Any) -> bool:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        return False
    values = list(values)
    return len(values) > 0 and all(
        hasattr(x, "__iter__") and not isinstance(x, (str, bytes)) for x in values
    )


def normalize_patterns(
    segment_lengths: Any, dilation_rates: Any, num_layers: int | None
) -> tuple[Patterns, Patterns]:
    """Validate the patterns: one ``(w, r)`` list pair for every layer, or one pair per
    layer (lists of lists, as many as the model has layers). Returns plain lists (what
    the config stores as JSON)."""
    per_layer_w, per_layer_r = _is_per_layer(segment_lengths), _is_per_layer(dilation_rates)
    if per_layer_w != per_layer_r:
        raise ValueError(
            "segment_lengths and dilation_rates must both be one list of ints (every "
            "layer) or both be one list per layer, got "
            f"{segment_lengths!r} and {dilation_rates!r}"
        )
    if not per_layer_w:
        ws, rs = validate_patterns(segment_lengths, dilation_rates)
        return list(ws), list(rs)
    segment_lengths, dilation_rates = list(segment_lengths), list(dilation_rates)
    if len(segment_lengths) != len(dilation_rates):
        raise ValueError(
            f"per-layer patterns need as many segment_lengths lists ({len(segment_lengths)}) "
            f"as dilation_rates lists ({len(dilation_rates)})"
        )
    if num_layers is not None and len(segment_lengths) != num_layers:
        raise ValueError(
            f"per-layer patterns need one list per layer: the model has {num_layers} "
            f"layers, got {len(segment_lengths)} lists"
        )
    out_w, out_r = [], []
    for i, (w, r) in enumerate(zip(segment_lengths, dilation_rates)):
        try:
            ws, rs = validate_patterns(w, r)
        except ValueError as exc:
            raise ValueError(f"layer {i}: {exc}") from None
        out_w.append(list(ws))
        out_r.append(list(rs))
    return out_w, out_r


def layer_patterns(config: Any, layer_idx: int | None) -> tuple[list[int], list[int]]:
    """The ``(segment_lengths, dilation_rates)`` of layer ``layer_idx`` stored in
    ``config`` by :func:`enable`."""
    ws = getattr(config, SEGMENT_LENGTHS_KEY, None)
    rs = getattr(config, DILATION_RATES_KEY, None)
    if ws is None or rs is None:
        raise ValueError(
            f'attn_implementation="{ATTN_IMPLEMENTATION}" needs dilated attention patterns '
            f"in the model config ({SEGMENT_LENGTHS_KEY}, {DILATION_RATES_KEY}); call "
            "longnet.integrations.transformers.enable(model, segment_lengths, "
            "dilation_rates) first"
        )
    if _is_per_layer(ws):
        if layer_idx is None or not 0 <= int(layer_idx) < len(ws):
            raise ValueError(
                f"per-layer dilated attention patterns ({len(ws)} layers) need the "
                f"attention module's layer_idx, got {layer_idx!r}"
            )
        return list(ws[layer_idx]), list(rs[layer_idx])
    return list(ws), list(rs)
