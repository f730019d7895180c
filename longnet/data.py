"""Byte-level training data: the default corpus, file-level splits and batches.

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

import numpy as np
import torch
from torch import Tensor

from longnet.tokenizer import ByteTokenizer

__all__ = [
    "stdlib_source_files",
    "list_text_files",
    "split_by_file",
    "encode_files",
    "random_batch",
    "eval_batches",
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
    return np.concatenate(parts)


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
