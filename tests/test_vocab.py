"""Vocabulary: min frequency, specials, stable ids, encode/decode, the JSON file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from captioning.data import Vocabulary
from captioning.errors import DataError

CAPTIONS = [
    ["a", "plane", "on", "the", "runway"],
    ["the", "plane", "is", "white"],
    ["a", "road", "and", "the", "trees"],
    ["zebra"],
]


def test_build_min_freq_specials_and_order():
    vocab = Vocabulary.build(CAPTIONS, min_freq=2)
    # counts: the 3, a 2, plane 2, others 1 -> frequency first, then alphabetical
    assert vocab.itos == ["<pad>", "<bos>", "<eos>", "<unk>", "the", "a", "plane"]
    assert (vocab.pad_id, vocab.bos_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2, 3)
    assert len(vocab) == 7 and "plane" in vocab and "zebra" not in vocab
    assert vocab.counts == [3, 2, 2]
    assert len(Vocabulary.build(CAPTIONS, min_freq=1)) == 4 + 11
    assert Vocabulary.build(CAPTIONS, min_freq=1, max_size=2).words == ["the", "a"]


def test_rebuild_in_any_order_gives_same_ids():
    assert Vocabulary.build(CAPTIONS, 1).itos == Vocabulary.build(list(reversed(CAPTIONS)), 1).itos
    assert Vocabulary.build(CAPTIONS, 1).words[3:] == sorted(Vocabulary.build(CAPTIONS, 1).words[3:])


def test_encode_decode():
    vocab = Vocabulary.build(CAPTIONS, min_freq=2)
    assert vocab.encode(["the", "plane", "flies"]) == [1, 4, 6, 3, 2]
    assert vocab.encode(["a"], bos=False, eos=False) == [5]
    assert vocab.decode([1, 4, 6, 3, 2, 5, 0]) == ["the", "plane", "<unk>"]  # stops at <eos>
    assert vocab.decode([4, 0, 0]) == ["the"]
    assert vocab.decode([1, 4, 2, 5], stop_at_eos=False) == ["the", "a"]
    assert vocab.decode_text([1, 5, 6, 2]) == "a plane"
    with pytest.raises(TypeError, match="tokenize"):
        vocab.encode("a plane")
    with pytest.raises(IndexError, match="token id 99"):
        vocab.decode([99])
    with pytest.raises(ValueError, match="special token"):
        Vocabulary.build([["<unk>"]])
    with pytest.raises(ValueError, match="min_freq"):
        Vocabulary.build(CAPTIONS, min_freq=0)


def test_save_load_round_trip(tmp_path: Path):
    vocab = Vocabulary.build(CAPTIONS, min_freq=1)
    path = vocab.save(tmp_path / "sub" / "vocab.json")
    loaded = Vocabulary.load(path)
    assert (
        loaded == vocab
        and loaded.itos == vocab.itos
        and loaded.counts == vocab.counts
        and loaded.min_freq == 1
    )
    assert loaded.encode(["zebra"]) == vocab.encode(["zebra"])


def test_load_errors_name_the_file(tmp_path: Path):
    with pytest.raises(DataError, match=r"missing\.json: vocabulary file does not exist"):
        Vocabulary.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{\n "format": "captioner-vocab",\n "tokens": [\n')
    with pytest.raises(DataError, match=r"bad\.json: invalid JSON at line 4"):
        Vocabulary.load(bad)
    good = Vocabulary.build(CAPTIONS).to_dict()
    cases = {
        "other": ({**good, "format": "something"}, "not a vocabulary file"),
        "version": ({**good, "version": 7}, "unsupported vocabulary version 7"),
        "specials": ({**good, "specials": ["<pad>", "<unk>"]}, "specials must be"),
        "dup": ({**good, "tokens": ["a", "a"], "counts": None}, "'a' appears twice"),
        "space": ({**good, "tokens": ["a b"], "counts": None}, "not a single non-empty word"),
        "counts": ({**good, "tokens": ["a"], "counts": [1, 2]}, "2 counts for 1 words"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(data))
        with pytest.raises(DataError, match=message) as info:
            Vocabulary.load(path)
        assert str(path) in str(info.value)
