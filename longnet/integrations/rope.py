"""RoPE scaling of a loaded ``transformers`` model, for contexts past the trained one.

transformers applies rotary embeddings inside each attention module, before the
attention function (``"longnet"`` or any other) sees the queries and keys, so the
dilated attention of :mod:`longnet.integrations.transformers` computes with whatever
RoPE the model's config holds. :func:`set_rope_scaling` changes that config on a
loaded model (linear position interpolation, YaRN, dynamic NTK) and rebuilds its
rotary embedding; ``None`` restores RoPE as trained::

    from longnet.integrations.rope import set_rope_scaling
    set_rope_scaling(model, {"rope_type": "yarn", "factor": 4.0})   # 8K -> 32K
    set_rope_scaling(model, None)                                    # as trained
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["ROPE_TYPES", "RopeScalingError", "parse_rope_scaling", "set_rope_scaling"]

ROPE_TYPES = ("linear", "yarn", "dynamic")
_AS_TRAINED = "_longnet_rope_as_trained"  # config attribute: the RoPE parameters as loaded


class RopeScalingError(argparse.ArgumentTypeError, ValueError):
    """A RoPE scaling text that does not parse: a ValueError, and an argparse type
    error so that argparse prints its message."""


def parse_rope_scaling(text: str) -> dict[str, Any] | None:
    """``"none"`` -> None; ``"TYPE:FACTOR"`` (``linear:4``, ``yarn:2``, ``dynamic:4``) ->
    ``{"rope_type": TYPE, "factor": FACTOR}``. An argparse type: raises
    :class:`RopeScalingError` (a ``ValueError``) naming what was expected."""
    if text in ("", "none"):
        return None
    kind, _, factor = text.partition(":")
    try:
        value = float(factor)
    except ValueError:
        value = float("nan")
    if kind not in ROPE_TYPES or not value >= 1.0:
        raise RopeScalingError(
            f"RoPE scaling: expected none or TYPE:FACTOR with TYPE one of "
            f"{', '.join(ROPE_TYPES)} and FACTOR >= 1, got {text!r}"
        )
    return {"rope_type": kind, "factor": value}


def set_rope_scaling(model: Any, rope: dict[str, Any] | None) -> Any:
    """Rescale the RoPE of a loaded Llama-family ``model`` in place; returns the model.

    Args:
        model: a transformers causal LM whose decoder (``model.model``, or the base
            model of a ``peft`` wrapper) has a ``rotary_emb`` built from
            ``config.rope_parameters``.
        rope: ``None`` for RoPE as trained, or transformers' RoPE parameters without
            the base, e.g. ``{"rope_type": "yarn", "factor": 4.0}``; the scaled context
            is ``factor`` times ``max_position_embeddings``, which stays the trained
            length (it is YaRN's ``original_max_position_embeddings``).

    The parameters as loaded are kept on the config, so calls do not compound.
    """
    config: Any = getattr(model, "config", None)
    params = getattr(config, "rope_parameters", None)
    decoder: Any = getattr(model, "model", None)
    rotary = getattr(decoder, "rotary_emb", None)
    if not isinstance(params, dict) or rotary is None:
        raise ValueError(
            "model: expected a transformers model with config.rope_parameters and a "
            f"rotary embedding at model.model.rotary_emb, got {type(model).__name__}"
        )
    if rope is not None and (not isinstance(rope, dict) or "rope_type" not in rope):
        raise ValueError(f'rope: expected None or a dict with "rope_type", got {rope!r}')
    trained = dict(getattr(config, _AS_TRAINED, None) or params)
    setattr(config, _AS_TRAINED, trained)
    new = dict(trained)
    if rope is not None:
        new.update(rope, original_max_position_embeddings=config.max_position_embeddings)
    config.rope_parameters = new
    decoder.rotary_emb = type(rotary)(config=config).to(rotary.inv_freq.device)
    return model
