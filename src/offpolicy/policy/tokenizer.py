"""Character tokenizer for the built-in tiny model.

One token per character of printable ASCII plus newline, and four specials.
Characters outside the vocabulary map to ``<unk>`` (counted, never silently
dropped: :meth:`CharTokenizer.encode` can be asked to raise instead).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, Sequence

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
DEFAULT_CHARS = "\n" + "".join(chr(c) for c in range(32, 127))


class Tokenizer(Protocol):
    """What the rest of offpolicy needs from a tokenizer (ours or a Hugging Face one)."""

    pad_id: int
    eos_id: int
    bos_id: int | None
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class CharTokenizer:
    """Character-level tokenizer: ``<pad>=0, <bos>=1, <eos>=2, <unk>=3``, then the characters."""

    FILE = "tokenizer.json"

    def __init__(self, chars: str = DEFAULT_CHARS) -> None:
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer: characters must be unique")
        self.chars = chars
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = 0, 1, 2, 3
        self._ids = {c: i + len(SPECIALS) for i, c in enumerate(chars)}
        self._chars = list(SPECIALS) + list(chars)
        self.vocab_size = len(self._chars)

    def encode(self, text: str, *, strict: bool = False) -> list[int]:
        ids = [self._ids.get(c, self.unk_id) for c in text]
        if strict and self.unk_id in ids:
            bad = sorted({c for c in text if c not in self._ids})
            raise ValueError(f"characters outside the tokenizer's vocabulary: {bad!r}")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i >= len(SPECIALS):
                out.append(self._chars[i])
        return "".join(out)

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / self.FILE
        path.write_text(json.dumps({"type": "offpolicy-char", "chars": self.chars}))

    @classmethod
    def load(cls, directory: str | Path) -> "CharTokenizer":
        path = Path(directory) / cls.FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no tokenizer at {path}") from None
        if data.get("type") != "offpolicy-char":
            raise ValueError(f"{path}: not an offpolicy character tokenizer (type={data.get('type')!r})")
        return cls(data["chars"])

