"""Word vocabulary for the LSTM captioners: minimum frequency, special tokens, a JSON file.

Ids: ``<pad>=0 <bos>=1 <eos>=2 <unk>=3``, then the kept words by descending frequency, ties broken
alphabetically, so rebuilding from the same captions gives the same ids whatever their order.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from captioning.data.ucm import read_json
from captioning.errors import DataError

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
FORMAT = "captioner-vocab"
FORMAT_VERSION = 1


class Vocabulary:
    """Token <-> id mapping. ``len(vocab)`` counts the specials."""

    pad_id, bos_id, eos_id, unk_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID

    def __init__(self, words: Sequence[str], counts: Sequence[int] | None = None, min_freq: int = 1):
        """``words``: the non-special tokens in id order (ids start at 4)."""
        itos = [*SPECIALS, *words]
        stoi: dict[str, int] = {}
        for i, tok in enumerate(itos):
            if not isinstance(tok, str) or not tok or tok.split() != [tok]:
                raise ValueError(f"vocabulary token {i} is not a single non-empty word: {tok!r}")
            if tok in stoi:
                raise ValueError(f"vocabulary token {tok!r} appears twice (ids {stoi[tok]} and {i})")
            stoi[tok] = i
        if counts is not None and len(counts) != len(words):
            raise ValueError(f"{len(counts)} counts for {len(words)} words")
        self.itos: list[str] = itos
        self.stoi: dict[str, int] = stoi
        self.counts: list[int] | None = list(counts) if counts is not None else None
        self.min_freq = min_freq

    # ------------------------------------------------------------------------------------------ build

    @classmethod
    def build(
        cls, token_lists: Iterable[Sequence[str]], min_freq: int = 1, max_size: int | None = None
    ) -> Vocabulary:
        """Keep words seen at least ``min_freq`` times (at most ``max_size`` of them, most frequent first)."""
        if min_freq < 1:
            raise ValueError(f"min_freq must be >= 1, got {min_freq}")
        counter: Counter[str] = Counter()
        for tokens in token_lists:
            counter.update(tokens)
        for special in SPECIALS:
            if special in counter:
                raise ValueError(f"captions contain the special token {special!r}")
        kept = sorted(((w, c) for w, c in counter.items() if c >= min_freq), key=lambda wc: (-wc[1], wc[0]))
        if max_size is not None:
            kept = kept[:max_size]
        return cls([w for w, _ in kept], [c for _, c in kept], min_freq=min_freq)

    # ------------------------------------------------------------------------------------ mapping

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: object) -> bool:
        return token in self.stoi

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} tokens, min_freq={self.min_freq})"

    @property
    def words(self) -> list[str]:
        """The non-special tokens in id order."""
        return self.itos[len(SPECIALS) :]

    def token_to_id(self, token: str) -> int:
        return self.stoi.get(token, UNK_ID)

    def id_to_token(self, idx: int) -> str:
        if not 0 <= idx < len(self.itos):
            raise IndexError(f"token id {idx} outside the vocabulary (size {len(self.itos)})")
        return self.itos[idx]

    def encode(self, tokens: Sequence[str], bos: bool = True, eos: bool = True) -> list[int]:
        """Tokens -> ids; unknown words -> ``<unk>``; optional ``<bos>`` / ``<eos>`` around them."""
        if isinstance(tokens, str):
            raise TypeError(
                "encode takes a list of tokens; tokenize the string first (captioning.data.tokenize)"
            )
        ids = [self.stoi.get(tok, UNK_ID) for tok in tokens]
        return [BOS_ID] * bos + ids + [EOS_ID] * eos

    def decode(self, ids: Iterable[int], *, stop_at_eos: bool = True, skip_special: bool = True) -> list[str]:
        """Ids -> tokens. Stops at the first ``<eos>``; drops ``<pad>``/``<bos>`` (``<unk>`` is kept)."""
        out: list[str] = []
        for idx in ids:
            idx = int(idx)
            if stop_at_eos and idx == EOS_ID:
                break
            if skip_special and idx in (PAD_ID, BOS_ID, EOS_ID):
                continue
            out.append(self.id_to_token(idx))
        return out

    def decode_text(self, ids: Iterable[int]) -> str:
        """Ids -> the caption as one space-separated string."""
        return " ".join(self.decode(ids))

    # ---------------------------------------------------------------------------------------- file

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "specials": list(SPECIALS),
            "min_freq": self.min_freq,
            "tokens": self.words,
            "counts": self.counts,
        }

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocabulary:
        path = Path(path)
        data = read_json(path, what="vocabulary file")
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise DataError(f'not a vocabulary file (expected "format": {FORMAT!r})', path=path)
        if data.get("version") != FORMAT_VERSION:
            raise DataError(f"unsupported vocabulary version {data.get('version')!r}", path=path)
        if data.get("specials") != list(SPECIALS):
            raise DataError(f"specials must be {list(SPECIALS)}, got {data.get('specials')!r}", path=path)
        tokens, counts, min_freq = data.get("tokens"), data.get("counts"), data.get("min_freq", 1)
        if not isinstance(tokens, list):
            raise DataError("field 'tokens' must be a list", path=path)
        if counts is not None and not (isinstance(counts, list) and all(isinstance(c, int) for c in counts)):
            raise DataError("field 'counts' must be a list of integers or null", path=path)
        try:
            return cls(tokens, counts, min_freq=min_freq)
        except ValueError as exc:
            raise DataError(str(exc), path=path) from None
