"""The paper profile of the LightCap captioner: TinyBERT-4 shapes, 30,522-word vocabulary, a training step on
random weights, and loading a local TinyBERT directory (written by the test) with its vocab.txt."""

from __future__ import annotations

import pytest
import torch

from captioning.config import load_config
from captioning.errors import ConfigError
from captioning.models.lightcap.captioner import ConceptPacker, caption_loss
from captioning.models.lightcap.pipeline import build_captioner, make_tokenizer
from captioning.models.lightcap.tokenizer import SPECIALS, CaptionTokenizer

CAPTIONS = ["many planes are parked next to the terminal", "a tennis court is surrounded by green trees"]


def paper_inputs(model, tokenizer, B=2):
    words = ["plane", "tree", "court", "terminal"]
    packer = ConceptPacker(words, torch.randn(4, 1024), tokenizer,
                           max_concepts=model.arch["max_concepts"], max_concept_tokens=model.arch["max_concept_tokens"])
    concepts = packer(torch.tensor([[0, 3, -1], [1, 2, 0]]), torch.tensor([[0.9, 0.5, 0.0], [0.8, 0.7, 0.2]]))
    ids = [tokenizer.encode_caption(c, model.arch["max_caption_length"]) for c in CAPTIONS[:B]]
    T = max(map(len, ids))
    captions = torch.tensor([c + [tokenizer.pad_id] * (T - len(c)) for c in ids])
    return torch.randn(B, 2048, 7, 7), concepts, captions


def train_step(model, grid, concepts, captions, pad_id):
    valid = captions != pad_id
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    out = model(grid, concepts, captions[:, :-1], valid[:, :-1])
    loss = caption_loss(out.branch_logits, captions[:, 1:], valid[:, 1:])
    loss.backward()
    before = model.head.branches[0].dense.weight.detach().clone()
    opt.step()
    return out, loss, before


def test_paper_profile_builds_tinybert4_with_30522_words_and_trains_a_step():
    config = load_config("lightcap", "paper")
    tok = make_tokenizer(config.tokenizer, config.model, CAPTIONS)
    model = build_captioner(config.model, grid_channels=2048, concept_dim=1024, tokenizer=tok)
    bert = model.fusion.bert.config
    assert (bert.num_hidden_layers, bert.hidden_size, bert.num_attention_heads, bert.intermediate_size) == (4, 312, 12, 1200)
    assert bert.vocab_size == 30522 and model.fusion.word_embeddings.weight.shape == (30522, 312)
    assert model.head.num_branches == 3
    assert all(b.dense.weight.shape == (312, 312) for b in model.head.branches)
    assert model.visual_proj.weight.shape == (312, 2048)
    grid, concepts, captions = paper_inputs(model, tok)
    model.train()
    out, loss, before = train_step(model, grid, concepts, captions, tok.pad_id)
    assert out.branch_logits.shape[-1] == 30522 and torch.isfinite(loss)
    assert not torch.equal(before, model.head.branches[0].dense.weight)


def write_tinybert_dir(path):
    """A TinyBERT-4-shaped checkpoint directory (random weights) with a 30,522-line BERT vocab.txt."""
    from transformers import BertConfig, BertModel

    words = [*SPECIALS, *sorted({w for c in CAPTIONS for w in c.split()}), "plane", "##s"]
    words += [f"[unused{i}]" for i in range(30522 - len(words))]
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    cfg = BertConfig(vocab_size=30522, hidden_size=312, num_hidden_layers=4, num_attention_heads=12,
                     intermediate_size=1200, max_position_embeddings=512)
    torch.manual_seed(7)
    bert = BertModel(cfg, add_pooling_layer=False)
    bert.save_pretrained(str(path))
    return bert


def test_paper_profile_loads_a_local_tinybert_directory(tmp_path):
    saved = write_tinybert_dir(tmp_path)
    config = load_config(
        "lightcap", "paper",
        overrides=[f"model.fusion.pretrained={tmp_path}", "tokenizer.type=bert-dir"],
    )
    tok = make_tokenizer(config.tokenizer, config.model, None)
    assert tok.vocab_size == 30522 and tok.decode(tok.encode("many planes")) == "many planes"
    model = build_captioner(config.model, grid_channels=2048, concept_dim=1024, tokenizer=tok)
    torch.testing.assert_close(
        model.fusion.bert.encoder.layer[3].output.dense.weight, saved.encoder.layer[3].output.dense.weight
    )
    assert model.arch["fusion"]["vocab_size"] == 30522 and "pretrained" not in model.arch["fusion"]
    grid, concepts, captions = paper_inputs(model, tok)
    model.train()
    _, loss, _ = train_step(model, grid, concepts, captions, tok.pad_id)
    assert torch.isfinite(loss)


def test_a_pretrained_path_that_is_not_a_bert_directory_is_named(tmp_path):
    config = load_config("lightcap", "paper", overrides=[f"model.fusion.pretrained={tmp_path}"])
    tok = CaptionTokenizer.train(CAPTIONS, vocab_size=100)
    with pytest.raises(ConfigError, match=f"{tmp_path} has no config.json"):
        build_captioner(config.model, grid_channels=2048, concept_dim=1024, tokenizer=tok)
