"""The caption tokenizer of the LightCap fusion module (a `tokenizers` tokenizer: word-level or BERT WordPiece).

Two ways to get one, same class:

* ``CaptionTokenizer.train(captions, vocab_size=...)`` builds a domain word-level vocabulary from the training
  captions (tiny profile), BERT-style normalisation (lower case, punctuation split), deterministic ids;
* ``CaptionTokenizer.from_bert_dir(path)`` reads a local (Tiny)BERT checkpoint directory's ``tokenizer.json`` or
  ``vocab.txt`` (paper profile: the 30,522-word uncased BERT vocabulary).

It is saved as one ``tokenizer.json`` next to the weights. Special tokens are BERT's: ``[CLS]`` starts a caption
(bos), ``[SEP]`` ends it (eos), ``[PAD]`` pads, ``[UNK]`` is unknown, ``[MASK]`` is reserved.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from captioning.errors import ConfigError, DataError

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIALS = (PAD, UNK, CLS, SEP, MASK)
TOKENIZER_FILE = "tokenizer.json"


class CaptionTokenizer:
    def __init__(self, tokenizer, *, source: str = "") -> None:
        self._tok = tokenizer
        self.source = source
        vocab = tokenizer.get_vocab()
        missing = [s for s in SPECIALS if s not in vocab]
        if missing:
            raise ConfigError(f"{source or 'tokenizer'}: missing special tokens {missing} (BERT-style vocab expected)")
        self.pad_id = vocab[PAD]
        self.unk_id = vocab[UNK]
        self.bos_id = vocab[CLS]
        self.eos_id = vocab[SEP]
        self.mask_id = vocab[MASK]
        self.special_ids = {vocab[s] for s in SPECIALS}

    # ------------------------------------------------------------------ construction
    @classmethod
    def train(cls, captions: Iterable[str], *, vocab_size: int, min_frequency: int = 1) -> CaptionTokenizer:
        """A word-level vocabulary of the training captions (BERT normalisation and punctuation split).

        The words are chosen and numbered here -- most frequent first, ties alphabetical, at most ``vocab_size``
        entries with the specials -- so the same captions always give the same ids (``tokenizers``' own trainers
        break frequency ties differently from run to run, which would make training irreproducible).
        Unseen words map to ``[UNK]``.
        """
        from collections import Counter

        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

        normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
        pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        counts: Counter[str] = Counter()
        n_captions = 0
        for caption in captions:
            n_captions += 1
            counts.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(caption)))
        if not n_captions:
            raise DataError("no training captions to learn a tokenizer from")
        words = sorted((w for w, n in counts.items() if n >= int(min_frequency) and w not in SPECIALS),
                       key=lambda w: (-counts[w], w))
        words = words[: max(0, int(vocab_size) - len(SPECIALS))]
        vocab = {w: i for i, w in enumerate([*SPECIALS, *words])}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
        tok.normalizer = normalizer
        tok.pre_tokenizer = pre_tokenizer
        return cls(tok, source="word-level vocabulary of the training captions")

    @classmethod
    def from_bert_dir(cls, path: str | Path) -> CaptionTokenizer:
        """A (Tiny)BERT checkpoint directory's tokenizer: ``tokenizer.json`` if present, else ``vocab.txt``."""
        path = Path(path)
        if (path / TOKENIZER_FILE).is_file():
            return cls.load(path / TOKENIZER_FILE)
        vocab_file = path / "vocab.txt"
        if not vocab_file.is_file():
            raise ConfigError(f"{path}: no tokenizer.json or vocab.txt in this BERT directory")
        from tokenizers.implementations import BertWordPieceTokenizer

        listed = set(vocab_file.read_text(encoding="utf-8").splitlines())
        missing = [s for s in SPECIALS if s not in listed]
        if missing:
            raise ConfigError(f"{vocab_file}: missing special tokens {missing} (BERT-style vocab expected)")
        wrapper = BertWordPieceTokenizer(str(vocab_file), lowercase=True)
        tok = wrapper._tokenizer
        tok.post_processor = None  # captions get [CLS]/[SEP] from encode_caption, not from the tokenizer
        return cls(tok, source=str(vocab_file))

    @classmethod
    def load(cls, path: str | Path) -> CaptionTokenizer:
        from tokenizers import Tokenizer

        path = Path(path)
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for bad files
            raise ConfigError(f"{path}: not a readable tokenizers file ({exc})") from exc
        return cls(tok, source=str(path))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        self._tok.save(str(path))
        return path

    # ------------------------------------------------------------------ use
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab()

    def encode(self, text: str) -> list[int]:
        """Word-piece ids of ``text``, without specials."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_caption(self, text: str, max_length: int) -> list[int]:
        """``[CLS] pieces [SEP]``, the pieces truncated so the whole fits ``max_length``."""
        ids = self.encode(text)[: max(0, int(max_length) - 2)]
        return [self.bos_id, *ids, self.eos_id]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of generated ids: stops at the first ``[SEP]``, drops specials, merges ``##`` pieces."""
        kept: list[int] = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in self.special_ids:
                continue
            kept.append(i)
        return self._tok.decode(kept, skip_special_tokens=True).strip()

    def words(self, ids: Iterable[int]) -> list[str]:
        return self.decode(ids).split()

    def same_vocab(self, other: CaptionTokenizer) -> bool:
        return self.get_vocab() == other.get_vocab()
