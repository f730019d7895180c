"""Packed documents: many sequences back to back in one row (the varlen layout).

A packed batch holds ``S`` documents in one row of ``total`` tokens, described by
``cu_seqlens``, an int tensor of shape ``(S+1,)`` with ``cu_seqlens[0] = 0``,
nondecreasing entries and ``cu_seqlens[S] = total`` (flash-attn's convention):
document ``i`` is the tokens ``[cu_seqlens[i], cu_seqlens[i+1])``.
``longnet.dilated_attention(..., cu_seqlens_q=, cu_seqlens_k=)`` attends each document
as if it were alone (docs/operator.md, "Packed documents").

:class:`PackedDocuments` is those boundaries checked once: the offsets on the data's
device and on the host, with the lengths, the longest document and each token's
position. Build it once per forward (``PackedDocuments.from_cu_seqlens``,
``from_lengths``, ``from_position_ids``) and hand it to the modules, the LM, the
operator and sequence parallelism in place of ``cu_seqlens``: none of them reads the
offsets back from the device again (flash-attn's ``max_seqlen`` arrives the same way).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "PackedDocuments",
    "as_packed_documents",
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


def _check_offsets_tensor(cu_seqlens: object, name: str) -> None:
    """dtype and shape of an offsets tensor (no value is read)."""
    if not isinstance(cu_seqlens, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (S+1,), got {type(cu_seqlens)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be an int32 or int64 tensor, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(
            f"{name} must have shape (S+1,) with S >= 0, got {tuple(cu_seqlens.shape)}"
        )


def _check_offsets(cu: Sequence[int], total: int, name: str) -> None:
    """The values of offsets ``cu`` (host ints) against a row of ``total`` tokens."""
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


class PackedDocuments:
    """The document boundaries of one packed row, checked once.

    Attributes:
        cu_seqlens: int64 ``(S+1,)`` offsets on the data's device.
        host_cu_seqlens: the same offsets as a CPU tensor (what the operator's kernels
            read, so a CUDA call never copies them back).
        offsets: the same values on the host (a tuple of ints).
        total: tokens in the row (``offsets[-1]``).
        max_seqlen: the longest document's length (0 without documents).

    Build it with :meth:`from_cu_seqlens` (reads the offsets once), :meth:`from_lengths`
    or :meth:`from_position_ids`; everything that takes ``cu_seqlens`` in longnet also
    takes this object and then reads nothing back from the device.
    """

    __slots__ = (
        "cu_seqlens",
        "host_cu_seqlens",
        "offsets",
        "total",
        "max_seqlen",
        "_positions",
        "_ids",
    )

    def __init__(self, offsets: Sequence[int], device: torch.device | str | None = None) -> None:
        """From host offsets ``0 = c_0 <= ... <= c_S`` (checked; ValueError otherwise)."""
        cu = tuple(int(x) for x in offsets)
        if not cu:
            raise ValueError("offsets must hold at least one value (0), got none")
        _check_offsets(cu, cu[-1], "cu_seqlens")
        host = torch.tensor(cu, dtype=torch.int64)
        self._fill(cu, host.to(device), host)

    def _fill(self, offsets: tuple[int, ...], cu_seqlens: Tensor, host: Tensor) -> None:
        """Set every field from checked offsets and their device and host tensors."""
        self.offsets = offsets
        self.total = offsets[-1]
        self.max_seqlen = max((b - a for a, b in zip(offsets[:-1], offsets[1:])), default=0)
        self.cu_seqlens = cu_seqlens
        self.host_cu_seqlens = host
        self._positions: Tensor | None = None
        self._ids: Tensor | None = None

    @classmethod
    def from_cu_seqlens(
        cls, cu_seqlens: Tensor, total: int | None = None, name: str = "cu_seqlens"
    ) -> PackedDocuments:
        """From an offsets tensor (int32/int64 ``(S+1,)``): its values are read to the
        host once here (a synchronisation on CUDA) and checked against ``total``
        tokens when given; the device copy is kept (as int64)."""
        _check_offsets_tensor(cu_seqlens, name)
        cu = tuple(int(x) for x in cu_seqlens.tolist())
        _check_offsets(cu, cu[-1] if total is None else total, name)
        docs = cls.__new__(cls)
        docs._fill(cu, cu_seqlens.to(torch.int64), torch.tensor(cu, dtype=torch.int64))
        return docs

    @classmethod
    def from_lengths(
        cls, lengths: Sequence[int], device: torch.device | str | None = None
    ) -> PackedDocuments:
        """From document lengths (host ints, each >= 0)."""
        lens = [int(x) for x in lengths]
        if any(n < 0 for n in lens):
            raise ValueError(f"document lengths must be >= 0, got {lens}")
        return cls([0, *itertools.accumulate(lens)], device)

    @classmethod
    def from_position_ids(cls, position_ids: Tensor) -> PackedDocuments:
        """From a packed row's position ids (``(N,)`` or ``(1, N)``): a document starts
        at token 0 and wherever the id is 0 or does not increase by one."""
        return cls.from_cu_seqlens(cu_seqlens_from_position_ids(position_ids))

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.offsets[:-1], self.offsets[1:]))

    @property
    def device(self) -> torch.device:
        return self.cu_seqlens.device

    def to(self, device: torch.device | str) -> PackedDocuments:
        """The same boundaries with the device tensors on ``device`` (self if there)."""
        if torch.device(device) == self.device:
            return self
        docs = PackedDocuments.__new__(PackedDocuments)
        docs._fill(self.offsets, self.cu_seqlens.to(device), self.host_cu_seqlens)
        return docs

    def document_ids(self) -> Tensor:
        """Index of every token's document, int64 ``(total,)`` on the device (cached;
        computed there from ``cu_seqlens``: no copy between host and device)."""
        if self._ids is None:
            tokens = torch.arange(self.total, device=self.device)
            self._ids = torch.searchsorted(self.cu_seqlens[1:], tokens, right=True)
        return self._ids

    def positions(self) -> Tensor:
        """Every token's position inside its document, int64 ``(total,)`` (cached)."""
        if self._positions is None:
            tokens = torch.arange(self.total, device=self.device)
            self._positions = tokens - self.cu_seqlens[self.document_ids()]
        return self._positions

    def document_lengths(self) -> Tensor:
        """The documents' lengths, int64 ``(S,)`` on the device."""
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    def __len__(self) -> int:
        return self.num_documents

    def __repr__(self) -> str:
        return (
            f"PackedDocuments({self.num_documents} documents, {self.total} tokens, "
            f"max_seqlen={self.max_seqlen}, device={self.device})"
        )


def as_packed_documents(
    docs: PackedDocuments | Tensor, total: int, name: str = "cu_seqlens"
) -> PackedDocuments:
    """``docs`` as :class:`PackedDocuments` for a row of ``total`` tokens: an offsets
    tensor is read and checked once; an object is checked against ``total`` (no read)."""
    if isinstance(docs, PackedDocuments):
        if docs.total != total:
            raise ValueError(
                f"{name}[-1] must equal the number of packed tokens ({total}), got {docs.total}"
            )
        return docs
    return PackedDocuments.from_cu_seqlens(docs, total, name)


def validate_cu_seqlens(
    cu_seqlens: Tensor, total: int, name: str = "cu_seqlens"
) -> tuple[int, ...] | None:
    """Check a ``cu_seqlens`` tensor against a row of ``total`` tokens; ValueError
    naming ``name`` otherwise. Returns the values, read to the host (a synchronisation
    on CUDA); under ``torch.compile`` only the dtype and shape are checked here (the
    operator checks the values) and None is returned."""
    _check_offsets_tensor(cu_seqlens, name)
    if torch.compiler.is_compiling():
        return None
    cu = tuple(int(x) for x in cu_seqlens.tolist())
    _check_offsets(cu, total, name)
    return cu


def document_ids(cu_seqlens: Tensor, total: int) -> Tensor:
    """Index of the document of every token, int64 ``(total,)``
    (:meth:`PackedDocuments.document_ids`)."""
    return PackedDocuments.from_cu_seqlens(cu_seqlens, total).document_ids()


def document_positions(cu_seqlens: Tensor, total: int) -> Tensor:
    """Position of every token inside its own document, int64 ``(total,)``
    (:meth:`PackedDocuments.positions`)."""
    return PackedDocuments.from_cu_seqlens(cu_seqlens, total).positions()
