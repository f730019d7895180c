"""Byte-level tokenizer: ids 0-255 are the UTF-8 bytes, then PAD, BOS and EOS.

Nothing to download or train; any text (and any byte string) round-trips.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["ByteTokenizer"]


class ByteTokenizer:
    """Maps text to UTF-8 byte ids plus three special ids.

    >>> tok = ByteTokenizer()
    >>> tok.encode("hi", add_bos=True)
    [257, 104, 105]
    >>> tok.decode([257, 104, 105])
    'hi'
    """

    pad_token_id: int = 256
    bos_token_id: int = 257
    eos_token_id: int = 258
    vocab_size: int = 259

    def encode(
        self, text: str | bytes, *, add_bos: bool = False, add_eos: bool = False
    ) -> list[int]:
        """Token ids of ``text`` (``str`` is UTF-8 encoded first)."""
        if isinstance(text, str):
            data = text.encode("utf-8")
        elif isinstance(text, (bytes, bytearray)):
            data = bytes(text)
        else:
            raise TypeError(f"text must be str or bytes, got {type(text).__name__}")
        ids = list(data)
        if add_bos:
            ids.insert(0, self.bos_token_id)
        if add_eos:
            ids.append(self.eos_token_id)
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of ``ids``; special ids are dropped."""
        out = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                out.append(i)
            elif not 256 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return bytes(out)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special ids dropped, invalid UTF-8 replaced by U+FFFD)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"ByteTokenizer(vocab_size={self.vocab_size}, pad={self.pad_token_id}, "
            f"bos={self.bos_token_id}, eos={self.eos_token_id})"
        )
