"""Typed wrappers over ``torch.ops.longnet``, their fake kernels and autograd.

The compiled operators are

* ``longnet::dilated_attention_fwd(q, k, v, segment_lengths, dilation_rates,
  is_causal, scale, position_offset=0, key_start=None, key_end=None,
  cu_seqlens_q=None, cu_seqlens_k=None) -> (out, lse)``
* ``longnet::dilated_attention_bwd(grad_out, grad_lse, q, k, v, out, lse,
  segment_lengths, dilation_rates, is_causal, scale, position_offset=0,
  key_start=None, key_end=None, cu_seqlens_q=None, cu_seqlens_k=None) -> (dq, dk, dv)``

and ``dilated_attention`` below is the public, validated entry point; the contract
it computes is ``docs/operator.md``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Literal, overload

import torch
from torch import Tensor

from longnet import engines as _engines
from longnet.packing import PackedDocuments, as_packed_documents, validate_cu_seqlens

__all__ = [
    "dilated_attention",
    "validate_inputs",
    "validate_patterns",
    "validate_position_offset",
    "validate_key_ranges",
    "validate_documents",
    "use_engine",
    "last_engine",
]

use_engine = _engines.use_engine
last_engine = _engines.last_engine

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def validate_patterns(
    segment_lengths: Sequence[int], dilation_rates: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Check the (w, r) pattern lists and return them as tuples of ints.

    Raises:
        ValueError: for empty or unequal lists, non-integral or boolean entries,
            ``w < 1``, ``r < 1`` or ``r > w``.
    """
    ws = _int_tuple(segment_lengths, "segment_lengths")
    rs = _int_tuple(dilation_rates, "dilation_rates")
    if len(ws) == 0:
        raise ValueError("segment_lengths must hold at least one segment length, got []")
    if len(ws) != len(rs):
        raise ValueError(
            "segment_lengths and dilation_rates must have the same length, got "
            f"{len(ws)} ({list(ws)}) and {len(rs)} ({list(rs)})"
        )
    for i, (w, r) in enumerate(zip(ws, rs)):
        if w < 1:
            raise ValueError(f"segment_lengths[{i}] must be >= 1, got {w}")
        if r < 1:
            raise ValueError(f"dilation_rates[{i}] must be >= 1, got {r}")
        if r > w:
            raise ValueError(
                f"dilation_rates[{i}] ({r}) must not exceed segment_lengths[{i}] ({w})"
            )
    return ws, rs


def _as_int(value, name: str) -> int:
    """``value`` as an int when it is integral (Python, NumPy or 0-d torch ints), else
    a ValueError naming ``name``; bools and floats (even 2.0) are refused."""
    if isinstance(value, bool) or (isinstance(value, Tensor) and value.dtype == torch.bool):
        raise ValueError(f"{name} must be an int, got the bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})") from None


def _int_tuple(values: Sequence[int], name: str) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{name} must be a sequence of ints, got {values!r}")
    return tuple(_as_int(x, f"{name}[{i}]") for i, x in enumerate(values))


def validate_position_offset(position_offset: int) -> int:
    """Check ``position_offset`` (an int >= 0) and return it as an int."""
    offset = _as_int(position_offset, "position_offset")
    if offset < 0:
        raise ValueError(f"position_offset must be >= 0, got {offset}")
    return offset


def validate_key_ranges(
    key_start: Tensor | None, key_end: Tensor | None, q: Tensor, nk: int
) -> None:
    """Check the per-row key ranges: int tensors of shape ``(B,)`` on q's device with
    ``0 <= key_start <= key_end <= Nk`` (the values are checked outside
    ``torch.compile``; the kernels check them again)."""
    for name, t in (("key_start", key_start), ("key_end", key_end)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise ValueError(
                f"{name} must be a torch.Tensor of shape (B,) or None, got {type(t).__name__}"
            )
        if t.dim() != 1 or t.shape[0] != q.shape[0]:
            raise ValueError(f"{name} must have shape (B,) = ({q.shape[0]},), got {tuple(t.shape)}")
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be an int32 or int64 tensor, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")
    if torch.compiler.is_compiling():
        return
    if key_start is not None:
        start = key_start
        end = key_end if key_end is not None else torch.full_like(key_start, nk)
    elif key_end is not None:
        start, end = torch.zeros_like(key_end), key_end
    else:
        return
    bad = (start < 0) | (start > end) | (end > nk)
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"key ranges must satisfy 0 <= key_start <= key_end <= Nk ({nk}), got "
            f"key_start[{b}] = {int(start[b])}, key_end[{b}] = {int(end[b])}"
        )


def validate_documents(
    cu_seqlens_q: Tensor | PackedDocuments | None,
    cu_seqlens_k: Tensor | PackedDocuments | None,
    q: Tensor,
    k: Tensor,
    key_start: Tensor | None,
    key_end: Tensor | None,
) -> tuple[Tensor, Tensor] | None:
    """Check packed-document offsets (docs/operator.md, "Packed documents") and return
    ``(cu_seqlens_q, cu_seqlens_k)`` as tensors, the missing one standing for the
    given one, or None when neither is given. Offsets given as tensors have their
    values checked outside ``torch.compile`` (a synchronisation on CUDA; the kernels
    check them again); :class:`~longnet.packing.PackedDocuments` were checked when
    built, and only their totals are compared here (nothing is read back)."""
    if cu_seqlens_q is None and cu_seqlens_k is None:
        return None
    if key_start is not None or key_end is not None:
        raise ValueError(
            "cu_seqlens_q/cu_seqlens_k (packed documents) cannot be combined with "
            "key_start/key_end (per-row key ranges): give one or the other"
        )
    if q.shape[0] != 1:
        raise ValueError(
            "packed documents need q of shape (1, total_q, H, D) and k, v of shape "
            f"(1, total_k, Hk, D); got q of shape {tuple(q.shape)}"
        )
    nq, nk = q.shape[1], k.shape[1]
    if cu_seqlens_q is None or cu_seqlens_k is None:
        given = cu_seqlens_q if cu_seqlens_q is not None else cu_seqlens_k
        assert given is not None
        if nq != nk:
            missing = "cu_seqlens_k" if cu_seqlens_k is None else "cu_seqlens_q"
            raise ValueError(
                f"{missing} may be omitted only when q and k have as many positions "
                f"(got {nq} and {nk}); give both cu_seqlens_q and cu_seqlens_k"
            )
        cu_seqlens_q = cu_seqlens_k = given
    host: dict[str, tuple[int, ...] | None] = {}  # the offsets' values, when read
    for name, t, total in (("cu_seqlens_q", cu_seqlens_q, nq), ("cu_seqlens_k", cu_seqlens_k, nk)):
        if name == "cu_seqlens_k" and cu_seqlens_k is cu_seqlens_q:
            break  # the same offsets, checked as cu_seqlens_q
        if isinstance(t, PackedDocuments):
            host[name] = as_packed_documents(t, total, name).offsets  # totals agree: no read
            continue
        if isinstance(t, Tensor) and t.device not in (q.device, torch.device("cpu")):
            raise ValueError(
                f"{name} must be on the device of q ({q.device}) or the CPU, got {t.device}"
            )
        host[name] = validate_cu_seqlens(t, total, name)  # values outside compile
    # PackedDocuments hand the kernels their host copy: nothing is copied back.
    cu_q, cu_k = (
        t.host_cu_seqlens if isinstance(t, PackedDocuments) else t
        for t in (cu_seqlens_q, cu_seqlens_k)
    )
    if cu_q.shape[0] != cu_k.shape[0]:
        raise ValueError(
            "cu_seqlens_q and cu_seqlens_k must describe as many documents, got shapes "
            f"{tuple(cu_q.shape)} and {tuple(cu_k.shape)}"
        )
    off_q, off_k = host.get("cu_seqlens_q"), host.get("cu_seqlens_k")
    if off_q is not None and off_k is not None:  # two sets of offsets, read
        for i in range(len(off_q) - 1):
            a, b = off_q[i + 1] - off_q[i], off_k[i + 1] - off_k[i]
            if a > b:
                raise ValueError(
                    f"document {i} has more queries ({a}) than keys ({b}); each document "
                    "needs Nq <= Nk"
                )
    return cu_q, cu_k


def validate_inputs(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> float:
    """Check q, k, v against docs/operator.md and return the softmax scale to use.

    Raises:
        ValueError: naming the argument and the expected shape, dtype or device.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            layout = "(B, Nq, H, D)" if name == "q" else "(B, Nk, Hk, D)"
            raise ValueError(f"{name} must have shape {layout}, got {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, float64, bfloat16 or float16, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(
            f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}"
        )
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    b, nq, h, d = q.shape
    _, nk, hk, _ = k.shape
    if k.shape[0] != b:
        raise ValueError(f"k batch size {k.shape[0]} differs from q batch size {b}")
    if k.shape[3] != d:
        raise ValueError(f"k head dim {k.shape[3]} differs from q head dim {d}")
    if nq > nk:
        raise ValueError(f"q has more positions ({nq}) than k ({nk}); Nq <= Nk is required")
    if hk < 1 or h % hk != 0:
        raise ValueError(f"q heads ({h}) must be a multiple of k heads ({hk})")
    if scale is None:
        return 1.0 / math.sqrt(d) if d > 0 else 1.0
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale}")
    return scale


# The return type follows return_lse: out alone, or (out, lse).
@overload
def dilated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    is_causal: bool = ...,
    scale: float | None = ...,
    return_lse: Literal[False] = ...,
    position_offset: int = ...,
    key_start: Tensor | None = ...,
    key_end: Tensor | None = ...,
    cu_seqlens_q: Tensor | PackedDocuments | None = ...,
    cu_seqlens_k: Tensor | PackedDocuments | None = ...,
) -> Tensor: ...
@overload
def dilated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    is_causal: bool = ...,
    scale: float | None = ...,
    return_lse: Literal[True],
    position_offset: int = ...,
    key_start: Tensor | None = ...,
    key_end: Tensor | None = ...,
    cu_seqlens_q: Tensor | PackedDocuments | None = ...,
    cu_seqlens_k: Tensor | PackedDocuments | None = ...,
) -> tuple[Tensor, Tensor]: ...
@overload
def dilated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    is_causal: bool = ...,
    scale: float | None = ...,
    return_lse: bool = ...,
    position_offset: int = ...,
    key_start: Tensor | None = ...,
    key_end: Tensor | None = ...,
    cu_seqlens_q: Tensor | PackedDocuments | None = ...,
    cu_seqlens_k: Tensor | PackedDocuments | None = ...,
) -> Tensor | tuple[Tensor, Tensor]: ...


def dilated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    is_causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
    position_offset: int = 0,
    key_start: Tensor | None = None,
    key_end: Tensor | None = None,
    cu_seqlens_q: Tensor | PackedDocuments | None = None,
    cu_seqlens_k: Tensor | PackedDocuments | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """LongNet dilated attention (Ding et al., 2023), exactly as ``docs/operator.md``
    defines it.

    Args:
        q: queries, ``(B, Nq, H, D)``.
        k: keys, ``(B, Nk, Hk, D)`` with ``Nq <= Nk`` and ``H % Hk == 0``.
        v: values, shaped like ``k``.
        segment_lengths: ``[w_1 .. w_m]``, each ``>= 1``.
        dilation_rates: ``[r_1 .. r_m]``, each ``1 <= r_i <= w_i``.
        is_causal: a key must not come after its query (positions are bottom-right
            aligned: query ``i`` sits at position ``position_offset + Nk - Nq + i``).
        scale: softmax scale, default ``1 / sqrt(D)``.
        return_lse: also return the log-sum-exp of every query row.
        position_offset: absolute position of ``k[:, 0]`` (an int >= 0). Segments are
            ``[s*w, (s+1)*w)`` in absolute positions; 0 gives the plain operator.
        key_start, key_end: optional int tensors of shape ``(B,)`` on q's device:
            row ``b``'s sequence is the keys ``[key_start[b], key_end[b])`` (padding
            outside, never attended), positions counted from ``key_start[b]`` (plus
            ``position_offset``), queries bottom-right aligned to ``key_end[b]``.
            Query rows that fall before ``key_start[b]`` get ``out = 0``,
            ``lse = -inf``.
        cu_seqlens_q, cu_seqlens_k: packed documents (flash-attn's varlen
            convention): int tensors of shape ``(S+1,)`` on q's device or the CPU
            (the kernels read them on the host: on the CPU no copy back), nondecreasing
            from 0 to ``Nq`` (resp. ``Nk``), with ``B = 1``. Document ``i`` is the
            queries ``[cu_seqlens_q[i], cu_seqlens_q[i+1])`` against the keys
            ``[cu_seqlens_k[i], cu_seqlens_k[i+1])``, computed as if run alone: its
            first key at ``position_offset``, its queries bottom-right aligned to its
            keys. One of the two may be omitted when ``Nq == Nk`` (it is then the
            other). Not combinable with ``key_start``/``key_end``. A
            :class:`~longnet.packing.PackedDocuments` may stand for either: its
            offsets were checked when it was built and are not read again here.

    Returns:
        ``out`` of shape ``(B, Nq, H, D)`` in the input dtype, and with
        ``return_lse`` also ``lse`` of shape ``(B, H, Nq)`` (float32, or float64
        for float64 inputs). Rows that reach no key get ``out = 0``, ``lse = -inf``.
    """
    ws, rs = validate_patterns(segment_lengths, dilation_rates)
    scale = validate_inputs(q, k, v, scale)
    position_offset = validate_position_offset(position_offset)
    validate_key_ranges(key_start, key_end, q, k.shape[1])
    docs = validate_documents(cu_seqlens_q, cu_seqlens_k, q, k, key_start, key_end)
    cu_q, cu_k = docs if docs is not None else (None, None)
    out, lse = torch.ops.longnet.dilated_attention_fwd.default(
        q,
        k,
        v,
        list(ws),
        list(rs),
        bool(is_causal),
        scale,
        position_offset,
        key_start,
        key_end,
        cu_q,
        cu_k,
    )
    return (out, lse) if return_lse else out


@torch.library.register_fake("longnet::dilated_attention_fwd")
def _fwd_fake(
    q,
    k,
    v,
    segment_lengths,
    dilation_rates,
    is_causal,
    scale,
    position_offset=0,
    key_start=None,
    key_end=None,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
):
    b, nq, h, _ = q.shape
    out = q.new_empty(q.shape)
    lse = q.new_empty((b, h, nq), dtype=_lse_dtype(q.dtype))
    return out, lse


@torch.library.register_fake("longnet::dilated_attention_bwd")
def _bwd_fake(
    grad_out,
    grad_lse,
    q,
    k,
    v,
    out,
    lse,
    segment_lengths,
    dilation_rates,
    is_causal,
    scale,
    position_offset=0,
    key_start=None,
    key_end=None,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, segment_lengths, dilation_rates, is_causal, scale = inputs[:7]
    defaults = [0, None, None, None, None]
    position_offset, key_start, key_end, cu_q, cu_k = list(inputs[7:]) + defaults[len(inputs) - 7 :]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_start, key_end, cu_q, cu_k)
    # A loss that does not read lse gives grad_lse None (not zeros): the backward then
    # skips the pass for it, and on a GPU never reads a gradient back to decide.
    ctx.set_materialize_grads(False)
    ctx.patterns = (list(segment_lengths), list(dilation_rates))
    ctx.is_causal = is_causal
    ctx.scale = scale
    ctx.position_offset = position_offset
    ctx.engine = _engines._capture()


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, key_start, key_end, cu_q, cu_k = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    with _engines._backward_scope(getattr(ctx, "engine", None)):
        dq, dk, dv = torch.ops.longnet.dilated_attention_bwd.default(
            grad_out,
            grad_lse,
            q,
            k,
            v,
            out,
            lse,
            ctx.patterns[0],
            ctx.patterns[1],
            ctx.is_causal,
            ctx.scale,
            ctx.position_offset,
            key_start,
            key_end,
            cu_q,
            cu_k,
        )
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


torch.library.register_autograd(
    "longnet::dilated_attention_fwd", _backward, setup_context=_setup_context
)


def _backward_of_backward(ctx, grad_dq, grad_dk, grad_dv):
    raise RuntimeError(
        "longnet.dilated_attention does not support double backward (gradients of "
        "its gradients); use longnet.reference.dilated_attention_reference for that"
    )


def _bwd_setup_context(ctx, inputs, output):
    pass


torch.library.register_autograd(
    "longnet::dilated_attention_bwd", _backward_of_backward, setup_context=_bwd_setup_context
)
