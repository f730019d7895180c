"""Byte-level training data: the default corpus, file-level splits and batches.

Packed documents: :func:`encode_documents` keeps where each file starts in the token
stream, :func:`pack_documents` cuts the stream into fixed-length rows with the
document boundaries of each row (``cu_seqlens``), and :func:`packed_batch` joins
rows into one ``(1, B * seq_len)`` row for ``LongNetLM(..., cu_seqlens=...)``.

The default corpus is the Python standard library's own ``.py`` sources on this
machine (``sysconfig.get_paths()["stdlib"]``, without ``site-packages``): several
megabytes of real, long-range-structured text that needs no download. Files are
split into train and validation by a hash of their relative path, so the split is
deterministic and no file contributes to both.
"""

from __future__ import annotations

import os
import sysconfig
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from longnet.tokenizer import ByteTokenizer

__all__ = [
    "stdlib_source_files",
    "list_text_files",
    "split_by_file",
    "encode_files",
    "encode_documents",
    "random_batch",
    "eval_batches",
    "PackedRows",
    "pack_documents",
    "packed_batch",
    "random_packed_batch",
]

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def list_text_files(root: str, extensions: Sequence[str] = (".py",)) -> list[str]:
    """Sorted paths of files under ``root`` (or ``[root]`` for a file) with ``extensions``."""
    if os.path.isfile(root):
        return [root]
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data path {root!r} is neither a file nor a directory")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in filenames:
            if name.endswith(tuple(extensions)):
                found.append(os.path.join(dirpath, name))
    return sorted(found)


def stdlib_source_files() -> tuple[str, list[str]]:
    """``(stdlib_dir, files)``: the standard library's ``.py`` files on this machine."""
    root = sysconfig.get_paths()["stdlib"]
    files = list_text_files(root, (".py",))
    if not files:
        raise FileNotFoundError(f"no .py files found under the standard library {root!r}")
    return root, files


def split_by_file(
    files: Sequence[str], root: str, val_fraction: float = 0.05
) -> tuple[list[str], list[str]]:
    """Split ``files`` into ``(train, validation)`` by a CRC32 of each path relative to
    ``root``: deterministic on every machine, and a file is in exactly one split."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    train: list[str] = []
    val: list[str] = []
    threshold = int(val_fraction * 10_000)
    for path in files:
        rel = os.path.relpath(path, root) if os.path.isdir(root) else os.path.basename(path)
        bucket = zlib.crc32(rel.replace(os.sep, "/").encode("utf-8")) % 10_000
        (val if bucket < threshold else train).append(path)
    if not train or not val:
        # Too few files for a hash split: hold out the last file (or nothing to spare).
        ordered = sorted(files)
        if len(ordered) < 2:
            raise ValueError(f"need at least two files to split by file, got {len(ordered)}")
        train, val = ordered[:-1], ordered[-1:]
    return train, val


def encode_files(
    files: Sequence[str], tokenizer: ByteTokenizer | None = None, max_bytes: int | None = None
) -> np.ndarray:
    """One ``uint16`` token stream: ``BOS file EOS`` for each file, in order.

    ``max_bytes`` stops after about that many bytes (whole files).
    """
    return encode_documents(files, tokenizer, max_bytes)[0]


def encode_documents(
    files: Sequence[str], tokenizer: ByteTokenizer | None = None, max_bytes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`encode_files` and the documents' offsets: ``(tokens, offsets)`` with
    file ``i`` (``BOS file EOS``) at ``tokens[offsets[i]:offsets[i + 1]]``
    (``offsets`` int64, ``(S+1,)``, from 0 to ``tokens.size``)."""
    tok = tokenizer or ByteTokenizer()
    parts: list[np.ndarray] = []
    total = 0
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        arr = np.empty(len(data) + 2, dtype=np.uint16)
        arr[0] = tok.bos_token_id
        arr[1:-1] = np.frombuffer(data, dtype=np.uint8)
        arr[-1] = tok.eos_token_id
        parts.append(arr)
        total += arr.size
        if max_bytes is not None and total >= max_bytes:
            break
    if not parts:
        raise ValueError("no files to encode")
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum([p.size for p in parts], out=offsets[1:])
    return np.concatenate(parts), offsets


def random_batch(
    tokens: np.ndarray, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``batch_size`` random windows: inputs and next-token targets, each ``(B, seq_len)``."""
    if tokens.size < seq_len + 2:
        raise ValueError(f"corpus of {tokens.size} tokens is too short for seq_len={seq_len}")
    starts = torch.randint(0, tokens.size - seq_len - 1, (batch_size,), generator=generator)
    idx = starts.numpy()[:, None] + np.arange(seq_len + 1)[None, :]
    window = torch.from_numpy(tokens[idx].astype(np.int64))
    return window[:, :-1], window[:, 1:]


def eval_batches(
    tokens: np.ndarray, seq_len: int, num_windows: int, batch_size: int
) -> list[tuple[Tensor, Tensor]]:
    """A fixed list of evenly spaced validation windows, batched."""
    if tokens.size < seq_len + 2:
        raise ValueError(
            f"validation corpus of {tokens.size} tokens is too short for seq_len={seq_len}"
        )
    span = tokens.size - seq_len - 1
    starts = np.linspace(0, span, num=max(1, num_windows)).astype(np.int64)
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    window = torch.from_numpy(tokens[idx].astype(np.int64))
    return [
        (window[i : i + batch_size, :-1], window[i : i + batch_size, 1:])
        for i in range(0, window.shape[0], batch_size)
    ]


@dataclass
class PackedRows:
    """Fixed-length rows cut from a stream of documents (see :func:`pack_documents`).

    Attributes:
        inputs: ``(R, seq_len)`` int64 token ids.
        targets: ``(R, seq_len)`` int64 next-token ids; ``-100`` where the next token
            is in another document (or there is none) and on padding.
        cu_seqlens: one int64 tensor ``(S_r + 1,)`` per row: the row's document
            pieces (and trailing padding, a piece of its own), from 0 to ``seq_len``.
        filler_tokens: pad tokens put before documents to align them (``align``).
    """

    inputs: Tensor
    targets: Tensor
    cu_seqlens: list[Tensor]
    filler_tokens: int = 0

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


def _with_fillers(
    tokens: np.ndarray, offsets: np.ndarray, seq_len: int, every: int, align: int, pad: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The stream with a filler document of ``pad`` before every document that would
    cross a cut (a multiple of ``every`` that is not a row start) at a distance from
    its start that is not a multiple of ``align``; returns the new tokens, offsets and
    the filler tokens' mask."""
    parts, new_offsets, fill = [], [0], []
    pos = 0
    for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        length = b - a
        cut = (pos // every + 1) * every  # the first cut after the document's start
        if length and cut < pos + length and cut % seq_len and (cut - pos) % align:
            gap = (cut - pos) % align
            parts.append(np.full(gap, pad, dtype=tokens.dtype))
            fill.append(np.ones(gap, dtype=bool))
            pos += gap
            new_offsets.append(pos)
        parts.append(tokens[a:b])
        fill.append(np.zeros(length, dtype=bool))
        pos += length
        new_offsets.append(pos)
    return (
        np.concatenate(parts) if parts else tokens[:0],
        np.asarray(new_offsets, dtype=np.int64),
        np.concatenate(fill) if fill else np.zeros(0, dtype=bool),
    )


def pack_documents(
    tokens: np.ndarray,
    offsets: np.ndarray,
    seq_len: int,
    pad_token_id: int,
    *,
    boundary_every: int | None = None,
    align: int = 1,
) -> PackedRows:
    """Cut a document stream into rows of ``seq_len`` tokens, each row with its
    document boundaries.

    Row ``r`` holds the stream's tokens ``[r * seq_len, (r + 1) * seq_len)``, so every
    token is in exactly one row; the last row is filled up with ``pad_token_id``. A
    document that crosses a row boundary continues as the first piece of the next
    row. Each token's target is the next token of its own document (the first token
    of the next document is never a target of the previous one), ``-100`` otherwise.

    Args:
        tokens: the stream (e.g. from :func:`encode_documents`).
        offsets: the documents' offsets in it (int, ``(S+1,)``, 0 to ``tokens.size``,
            nondecreasing).
        seq_len: tokens per row.
        pad_token_id: id that fills the last row.
        boundary_every, align: where sequence parallelism cuts a row (every
            ``boundary_every`` tokens, a divisor of ``seq_len``), a document that would
            cross a cut starts a multiple of ``align`` tokens before it (a divisor of
            ``boundary_every``): a filler of ``pad_token_id`` with no targets, a piece
            of its own, goes before it. Its segments of every pattern with ``w``
            dividing ``align`` then end at the cut, so only longer patterns exchange
            rows there (``benchmarks/plan_document_alignment.py``: a 16K grid costs
            under 1% filler and halves the worst rank's traffic). Default: no filler.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if boundary_every is not None:
        if boundary_every < 1 or seq_len % boundary_every:
            raise ValueError(
                f"boundary_every must be a positive divisor of seq_len ({seq_len}), "
                f"got {boundary_every}"
            )
        if align < 1 or boundary_every % align:
            raise ValueError(
                f"align must be a positive divisor of boundary_every ({boundary_every}), "
                f"got {align}"
            )
    offsets = np.asarray(offsets, dtype=np.int64)
    n = int(tokens.size)
    if offsets.ndim != 1 or offsets.size < 1 or offsets[0] != 0 or offsets[-1] != n:
        raise ValueError(
            f"offsets must be a 1-D array from 0 to the stream's {n} tokens, got "
            f"{offsets[:3].tolist()}...{offsets[-1:].tolist()}"
        )
    if np.any(np.diff(offsets) < 0):
        raise ValueError("offsets must be nondecreasing")
    if n == 0:
        raise ValueError("no tokens to pack")
    filler = None
    if boundary_every is not None and align > 1:
        tokens, offsets, filler = _with_fillers(
            tokens, offsets, seq_len, boundary_every, align, pad_token_id
        )
        n = int(tokens.size)
    rows = -(-n // seq_len)
    width = rows * seq_len
    ids = np.full(width, pad_token_id, dtype=np.int64)
    ids[:n] = tokens
    # The next token is a target only inside one document: the last token of each
    # document (and the padding) predicts nothing.
    targets = np.full(width, -100, dtype=np.int64)
    targets[: n - 1] = tokens[1:]
    ends = offsets[1:][np.diff(offsets) > 0]  # ends of the non-empty documents
    targets[ends - 1] = -100
    if filler is not None:
        targets[:n][filler] = -100
    # Boundaries inside the padded stream: the documents' starts, every row start,
    # and the start of the padding.
    cuts = np.unique(np.concatenate([offsets, np.arange(0, width + 1, seq_len), [n]]))
    cu_rows = []
    for r in range(rows):
        lo, hi = r * seq_len, (r + 1) * seq_len
        inside = cuts[(cuts >= lo) & (cuts <= hi)] - lo
        cu_rows.append(torch.from_numpy(inside.astype(np.int64)))
    return PackedRows(
        torch.from_numpy(ids.reshape(rows, seq_len)),
        torch.from_numpy(targets.reshape(rows, seq_len)),
        cu_rows,
        int(filler.sum()) if filler is not None else 0,
    )


def packed_batch(rows: PackedRows, index: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Rows ``index`` of ``rows`` joined into one packed row: ``(inputs, targets,
    cu_seqlens)`` of shapes ``(1, B * seq_len)``, ``(1, B * seq_len)`` and
    ``(S + 1,)``; the rows' boundaries are document boundaries too."""
    index = [int(i) for i in index]
    if not index:
        raise ValueError("packed_batch needs at least one row")
    seq_len = rows.inputs.shape[1]
    parts = [rows.cu_seqlens[index[0]]]
    for j, i in enumerate(index[1:], start=1):
        parts.append(rows.cu_seqlens[i][1:] + j * seq_len)
    return (
        rows.inputs[index].reshape(1, -1),
        rows.targets[index].reshape(1, -1),
        torch.cat(parts),
    )


def random_packed_batch(
    rows: PackedRows, batch_size: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`packed_batch` of ``batch_size`` rows drawn at random (with replacement)."""
    index = torch.randint(0, len(rows), (batch_size,), generator=generator)
    return packed_batch(rows, index.tolist())
