"""Packed documents: many sequences back to back in one row (the varlen layout).

A packed batch holds ``S`` documents in one row of ``total`` tokens, described by
``cu_seqlens``, an int tensor of shape ``(S+1,)`` with ``cu_seqlens[0] = 0``,
nondecreasing entries and ``cu_seqlens[S] = total`` (flash-attn's convention):
document ``i`` is the tokens ``[cu_seqlens[i], cu_seqlens[i+1])``.
``longnet.dilated_attention(..., cu_seqlens_q=, cu_seqlens_k=)`` attends each document
as if it were alone (docs/operator.md, "Packed documents").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "cu_seqlens_from_lengths",
    "cu_seqlens_from_position_ids",
    "document_positions",
    "document_ids",
    "validate_cu_seqlens",
]


def cu_seqlens_from_lengths(
    lengths: Sequence[int] | Tensor, device: torch.device | str | None = None
) -> Tensor:
    """``cu_seqlens`` (int64, ``(S+1,)``) of documents of the given lengths (each >= 0)."""
    lens = torch.as_tensor(lengths, dtype=torch.int64, device=device).reshape(-1)
    if bool((lens < 0).any()):
        raise ValueError(f"document lengths must be >= 0, got {lens.tolist()}")
    return torch.cat([lens.new_zeros(1), torch.cumsum(lens, 0)])


def cu_seqlens_from_position_ids(position_ids: Tensor) -> Tensor:
    """``cu_seqlens`` (int64) of a packed row from its position ids, ``(N,)`` or ``(1, N)``.

    A document starts at token 0 and wherever the position id is 0 or does not
    increase by one (transformers' ``DataCollatorWithFlattening`` convention).
    """
    if position_ids.dim() == 2:
        if position_ids.shape[0] != 1:
            raise ValueError(
                "position_ids must have shape (N,) or (1, N) for a packed row, got "
                f"{tuple(position_ids.shape)}"
            )
        position_ids = position_ids[0]
    if position_ids.dim() != 1:
        raise ValueError(f"position_ids must have shape (N,) or (1, N), got {position_ids.dim()}-d")
    n = position_ids.shape[0]
    pos = position_ids.to(torch.int64)
    starts = torch.ones(n, dtype=torch.bool, device=pos.device)
    if n > 1:
        starts[1:] = (pos[1:] == 0) | (pos[1:] != pos[:-1] + 1)
    idx = starts.nonzero().reshape(-1)
    return torch.cat([idx, torch.tensor([n], dtype=torch.int64, device=pos.device)])


def validate_cu_seqlens(cu_seqlens: Tensor, total: int, name: str = "cu_seqlens") -> None:
    """Check a ``cu_seqlens`` tensor against a row of ``total`` tokens; ValueError
    naming ``name`` otherwise (the values are read, so this synchronises on CUDA;
    under ``torch.compile`` only the dtype and shape are checked here and the values
    by the operator)."""
    if not isinstance(cu_seqlens, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (S+1,), got {type(cu_seqlens)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be an int32 or int64 tensor, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(
            f"{name} must have shape (S+1,) with S >= 0, got {tuple(cu_seqlens.shape)}"
        )
    if torch.compiler.is_compiling():
        return
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {cu[0]}")
    for i in range(len(cu) - 1):
        if cu[i + 1] < cu[i]:
            raise ValueError(
                f"{name} must be nondecreasing, got {name}[{i}] = {cu[i]} > "
                f"{name}[{i + 1}] = {cu[i + 1]}"
            )
    if cu[-1] != total:
        raise ValueError(
            f"{name}[-1] must equal the number of packed tokens ({total}), got {cu[-1]}"
        )


def _lengths(cu_seqlens: Tensor, total: int) -> Tensor:
    validate_cu_seqlens(cu_seqlens, total)
    return (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)


def document_ids(cu_seqlens: Tensor, total: int) -> Tensor:
    """Index of the document of every token, int64 ``(total,)``."""
    lengths = _lengths(cu_seqlens, total)
    ids = torch.arange(lengths.shape[0], device=cu_seqlens.device)
    return torch.repeat_interleave(ids, lengths, output_size=total)


def document_positions(cu_seqlens: Tensor, total: int) -> Tensor:
    """Position of every token inside its own document, int64 ``(total,)``."""
    ids = document_ids(cu_seqlens, total)
    starts = cu_seqlens.to(torch.int64)[:-1]
    return torch.arange(total, device=cu_seqlens.device) - starts[ids]
