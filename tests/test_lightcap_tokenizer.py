"""The LightCap caption tokenizer: domain WordPiece training, BERT vocab.txt directories, round trips."""

from __future__ import annotations

import pytest

from captioning.errors import ConfigError
from captioning.models.lightcap.tokenizer import SPECIALS, CaptionTokenizer

CAPTIONS = [
    "there are two airplanes on the runway",
    "many green trees are around a white building",
    "a tennis court is next to some houses",
    "lots of boats are docked at the harbor",
]


def test_trained_tokenizer_round_trips_captions(tmp_path):
    tok = CaptionTokenizer.train(CAPTIONS, vocab_size=200)
    assert tok.get_vocab()["[PAD]"] == 0
    ids = tok.encode_caption("There are two airplanes on the runway.", max_length=30)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids[1:]) == "there are two airplanes on the runway"  # "." was never seen: [UNK], dropped
    assert tok.words(ids[1:] + [tok.pad_id, 7]) == "there are two airplanes on the runway".split()
    # truncation keeps [CLS] ... [SEP] within max_length
    short = tok.encode_caption(CAPTIONS[1], max_length=5)
    assert len(short) == 5 and short[-1] == tok.eos_id
    path = tok.save(tmp_path / "tokenizer.json")
    again = CaptionTokenizer.load(path)
    assert again.same_vocab(tok) and again.encode(CAPTIONS[2]) == tok.encode(CAPTIONS[2])


def test_word_level_vocabulary_is_deterministic_and_frequency_ordered():
    corpus = CAPTIONS * 2 + ["the the the a a a"]  # the: 7, a: 7, are: 6
    tok = CaptionTokenizer.train(corpus, vocab_size=200)
    vocab = tok.get_vocab()
    assert [w for w, _ in sorted(vocab.items(), key=lambda kv: kv[1])][:8] == [*SPECIALS, "a", "the", "are"]
    for _ in range(3):  # tokenizers' own trainers break ties differently per run; ours must not
        assert CaptionTokenizer.train(corpus, vocab_size=200).get_vocab() == vocab
    capped = CaptionTokenizer.train(CAPTIONS, vocab_size=8)
    assert capped.vocab_size == 8
    assert tok.encode("zebra runway") == [tok.unk_id, vocab["runway"]]
    assert CaptionTokenizer.train(CAPTIONS + ["zebra"], vocab_size=200, min_frequency=2).encode("zebra") == [tok.unk_id]


def test_bert_vocab_directory(tmp_path):
    words = [*SPECIALS, "a", "plane", "on", "the", "runway", "##s", "two"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = CaptionTokenizer.from_bert_dir(tmp_path)
    assert tok.vocab_size == len(words)
    assert tok.decode(tok.encode("Two planes on the runway")) == "two planes on the runway"
    assert tok.encode_caption("a plane", 10) == [words.index("[CLS]"), 5, 6, words.index("[SEP]")]


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ConfigError, match="no tokenizer.json or vocab.txt"):
        CaptionTokenizer.from_bert_dir(tmp_path)
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(ConfigError, match="missing special tokens"):
        CaptionTokenizer.from_bert_dir(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="tokenizer.json"):
        CaptionTokenizer.load(bad)
