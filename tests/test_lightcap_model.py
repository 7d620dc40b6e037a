"""LightCap captioner pieces on random tensors: modulator, prefix-LM mask, ensemble head, cached decoding, KD."""

from __future__ import annotations

import pytest
import torch

from captioning.decoding import DecodeOptions
from captioning.models.lightcap.captioner import (
    ConceptInputs,
    ConceptPacker,
    LightCapCaptioner,
    caption_loss,
)
from captioning.models.lightcap.distill import (
    RepresentationDistiller,
    branch_token_kd_loss,
    layer_map,
    token_kd_loss,
)
from captioning.models.lightcap.fusion import prefix_lm_mask
from captioning.models.lightcap.head import EnsembleHead
from captioning.models.lightcap.modulator import ConceptModulator
from captioning.models.lightcap.tokenizer import CaptionTokenizer

C, D, V = 24, 16, 40


def make_arch(**changes):
    arch = dict(
        grid_channels=C, concept_dim=D, vocab_size=V,
        fusion=dict(layers=2, hidden=32, heads=4, intermediate=64, dropout=0.0, attention_dropout=0.0),
        use_concepts=True, use_modulator=True, modulator_hidden=16, head_branches=3,
        max_concepts=4, max_concept_tokens=6, max_caption_length=12, visual_grid=None,
    )
    arch.update(changes)
    return arch


def make_model(seed=0, std=0.3, **changes) -> LightCapCaptioner:
    """Random weights, large enough that outputs depend on the input (BERT's 0.02 init gives near-constant ones)."""
    torch.manual_seed(seed)
    model = LightCapCaptioner(make_arch(**changes)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, std)
    return model


def make_inputs(B=5, seed=1, h=3):
    g = torch.Generator().manual_seed(seed)
    grid = torch.rand(B, C, h, h, generator=g) * 2
    concepts = ConceptInputs(
        embeds=torch.randn(B, 4, D, generator=g),
        scores=torch.rand(B, 4, generator=g),
        token_ids=torch.randint(5, V, (B, 6), generator=g),
        token_valid=torch.rand(B, 6, generator=g) > 0.3,
    )
    return grid, concepts


# ---------------------------------------------------------------------------------------------- modulator
def test_modulator_starts_as_identity_then_gates_channels():
    mod = ConceptModulator(D, C, 8)
    grid, concepts = make_inputs()
    assert torch.equal(mod(grid, concepts.embeds, concepts.scores), grid)
    torch.nn.init.normal_(mod.fc2.weight)
    out = mod(grid, concepts.embeds, concepts.scores)
    gate = mod.gate(concepts.embeds, concepts.scores)  # [B,C]
    assert gate.shape == (5, C) and bool(((gate > 0) & (gate < 2)).all())
    torch.testing.assert_close(out, grid * gate[:, :, None, None])
    # the gate follows the concepts: other concepts, other gate
    other = mod.gate(concepts.embeds.flip(0), concepts.scores.flip(0))
    assert not torch.allclose(gate, other)
    # padded concepts (score 0) do not count
    padded_embeds = torch.cat([concepts.embeds, torch.randn(5, 2, D)], 1)
    padded_scores = torch.cat([concepts.scores, torch.zeros(5, 2)], 1)
    torch.testing.assert_close(mod.gate(padded_embeds, padded_scores), gate)


def test_modulator_switch_off_removes_it():
    on, off = make_model(use_modulator=True), make_model(use_modulator=False)
    assert off.modulator is None
    n_mod = sum(p.numel() for p in on.modulator.parameters())
    assert on.num_parameters() - off.num_parameters() == n_mod


# ---------------------------------------------------------------------------------------------- prefix LM
def test_prefix_lm_mask_shape_and_rules():
    prefix_valid = torch.tensor([[True, True, False]])
    caption_valid = torch.tensor([[True, True, True, False]])
    allowed = prefix_lm_mask(prefix_valid, caption_valid, torch.float32)[0, 0] == 0  # [7,7]
    P = 3
    for q in range(7):
        for k in range(7):
            key_ok = bool(torch.cat([prefix_valid, caption_valid], 1)[0, k])
            rule = k < P or (q >= P and k <= q)
            assert bool(allowed[q, k]) == (rule and key_ok), (q, k)


def test_caption_tokens_attend_causally_and_prefix_ignores_caption():
    model = make_model()
    grid, concepts = make_inputs()
    ids = torch.randint(5, V, (5, 8))
    valid = torch.ones(5, 8, dtype=torch.bool)
    base = model(grid, concepts, ids, valid, output_hidden_states=True)
    changed = ids.clone()
    changed[:, 5] = (changed[:, 5] + 1) % V
    out = model(grid, concepts, changed, valid, output_hidden_states=True)
    P = base.prefix_length
    # positions before 5 are unchanged, 5 and after change
    torch.testing.assert_close(out.branch_logits[:, :, :5], base.branch_logits[:, :, :5])
    assert not torch.allclose(out.branch_logits[:, :, 5:], base.branch_logits[:, :, 5:])
    # the prefix's hidden states do not depend on the caption at all
    torch.testing.assert_close(out.hidden_states[-1][:, :P], base.hidden_states[-1][:, :P])
    # ... but the caption depends on the prefix (concept tokens and grid)
    other_grid = model(grid.flip(0), concepts, ids, valid)
    assert not torch.allclose(other_grid.branch_logits, base.branch_logits)


def test_padded_concept_tokens_are_ignored():
    model = make_model()
    grid, concepts = make_inputs()
    ids = torch.randint(5, V, (5, 7))
    valid = torch.ones_like(ids, dtype=torch.bool)
    scrambled = ConceptInputs(
        concepts.embeds, concepts.scores,
        torch.where(concepts.token_valid, concepts.token_ids, torch.randint(5, V, concepts.token_ids.shape)),
        concepts.token_valid,
    )
    torch.testing.assert_close(
        model(grid, scrambled, ids, valid).branch_logits, model(grid, concepts, ids, valid).branch_logits
    )


def test_without_concepts_the_prefix_is_the_grid_only():
    model = make_model(use_concepts=False, use_modulator=False)
    grid, _ = make_inputs()
    embeds, valid = model.prefix(grid, None)
    assert embeds.shape == (5, 9, 32) and bool(valid.all())


def test_visual_grid_pools_the_visual_tokens():
    model = make_model(visual_grid=2)
    grid, concepts = make_inputs(h=5)
    embeds, valid = model.prefix(grid, concepts)
    assert embeds.shape == (5, 4 + 6, 32)  # 2x2 pooled grid + 6 concept token slots
    assert valid[:, 4:].equal(concepts.token_valid)


# ---------------------------------------------------------------------------------------------- ensemble head
def test_ensemble_head_shares_tied_embedding_and_averages_probabilities():
    model = make_model()
    head = model.head
    assert head.word_embeddings is model.fusion.word_embeddings  # tied to the input embedding, one matrix
    assert sum(1 for n, _ in model.named_parameters() if "word_embeddings" in n) == 1
    h = torch.randn(2, 3, 32)
    branch = head.branch_logits(h)  # [3,2,3,V]
    assert branch.shape == (3, 2, 3, V)
    expected = branch.softmax(-1).mean(0).log()
    torch.testing.assert_close(head(h), expected)
    # branches differ (own projections), so the ensemble is not one branch
    assert not torch.allclose(branch[0], branch[1])


def test_ensemble_costs_only_the_branch_projections():
    three, one = make_model(head_branches=3), make_model(head_branches=1)
    H = 32
    per_branch = H * H + H + 2 * H  # dense weight + bias, LayerNorm weight + bias
    assert three.num_parameters() - one.num_parameters() == 2 * per_branch
    with pytest.raises(ValueError):
        EnsembleHead(torch.nn.Embedding(5, 4), 0)


def test_caption_loss_is_cross_entropy_per_branch():
    logits = torch.randn(3, 2, 4, V)
    targets = torch.randint(0, V, (2, 4))
    valid = torch.tensor([[True, True, True, False], [True, True, False, False]])
    expected = torch.stack(
        [torch.nn.functional.cross_entropy(logits[i][valid], targets[valid]) for i in range(3)]
    ).mean()
    torch.testing.assert_close(caption_loss(logits, targets, valid), expected)


# ---------------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("beam_size", [1, 3])
def test_cached_decoding_gives_exactly_the_uncached_tokens(beam_size):
    model = make_model(seed=3)
    grid, concepts = make_inputs(B=6, seed=4)
    options = DecodeOptions(beam_size=beam_size, max_length=10, min_length=2, no_repeat_ngram_size=2)
    cached = model.generate(grid, concepts, options, bos_id=2, eos_id=3, use_cache=True)
    uncached = model.generate(grid, concepts, options, bos_id=2, eos_id=3, use_cache=False)
    assert [h.tokens for h in cached] == [h.tokens for h in uncached]
    for a, b in zip(cached, uncached, strict=True):
        assert a.log_prob == pytest.approx(b.log_prob, abs=1e-4)
    # and the captions really depend on the image (a cache that ignored the prefix would not show it)
    assert len({tuple(h.tokens) for h in cached}) > 1


def test_cached_steps_match_the_full_forward():
    model = make_model(seed=5)
    grid, concepts = make_inputs(B=3, seed=6)
    ids = torch.cat([torch.full((3, 1), 2), torch.randint(5, V, (3, 6))], 1)
    full = model.head.ensemble_log_probs(model(grid, concepts, ids, torch.ones_like(ids, dtype=torch.bool)).branch_logits)
    decoder = model.decoder(use_cache=True)
    state = decoder.init_state((grid, concepts))
    for t in range(ids.shape[1]):
        log_probs, state = decoder.step(ids[:, t], state)
        torch.testing.assert_close(log_probs, full[:, t], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- concepts
def test_concept_packer_orders_pads_and_truncates():
    tok = CaptionTokenizer.train(["a tennis court near a house", "many trees and a pool", "a tree"], vocab_size=60)
    words = ["tree", "court", "house", "pool"]
    emb = torch.arange(8.0).view(4, 2)
    pack = ConceptPacker(words, emb, tok, max_concepts=3, max_concept_tokens=4)
    ids = torch.tensor([[0, 1, 2, 3], [3, -1, -1, -1]])
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.7, 0.0, 0.0, 0.0]])
    out = pack(ids, scores)
    torch.testing.assert_close(out.scores, torch.tensor([[0.9, 0.5, 0.3], [0.7, 0.0, 0.0]]))
    torch.testing.assert_close(out.embeds[0], emb[[1, 2, 3]])
    torch.testing.assert_close(out.embeds[1, 1:], torch.zeros(2, 2))
    first = tok.encode("court") + tok.encode("house") + tok.encode("pool")
    assert out.token_ids[0][out.token_valid[0]].tolist() == first[:4]
    assert out.token_ids[1][out.token_valid[1]].tolist() == tok.encode("pool")


# ---------------------------------------------------------------------------------------------- KD losses
def test_token_kd_is_zero_for_the_teacher_itself_and_pulls_towards_it():
    torch.manual_seed(0)
    teacher = torch.randn(2, 5, V)
    valid = torch.ones(2, 5, dtype=torch.bool)
    soft = (teacher / 2.0).softmax(-1)
    assert float(token_kd_loss(teacher, soft, valid, 2.0)) == pytest.approx(0.0, abs=1e-5)
    student = torch.zeros(2, 5, V, requires_grad=True)
    loss = token_kd_loss(student, soft, valid, 2.0)
    assert float(loss.detach()) > 0
    loss.backward()
    # descending the gradient raises the student's probabilities where the teacher's are high
    step = -student.grad
    assert torch.corrcoef(torch.stack([step.flatten(), soft.flatten()]))[0, 1] > 0.99
    assert float(token_kd_loss(student.detach() + step, soft, valid, 2.0)) < float(loss.detach())


def test_each_branch_learns_from_its_own_teacher():
    torch.manual_seed(1)
    teachers = [torch.randn(2, 4, V) * 3 for _ in range(3)]
    valid = torch.ones(2, 4, dtype=torch.bool)
    matched = torch.stack(teachers)  # branch i == teacher i
    assert float(branch_token_kd_loss(matched, teachers, valid, 1.0)) == pytest.approx(0.0, abs=1e-4)
    swapped = torch.stack([teachers[1], teachers[0], teachers[2]])
    assert float(branch_token_kd_loss(swapped, teachers, valid, 1.0)) > 0.1
    # a single head learns the teachers' mean distribution
    mean_probs = torch.stack([t.softmax(-1) for t in teachers]).mean(0)
    single = mean_probs.log()[None]
    assert float(branch_token_kd_loss(single, teachers, valid, 1.0)) == pytest.approx(0.0, abs=1e-4)


def test_layer_map_and_representation_losses():
    assert layer_map(2, 4) == [0, 2, 4]
    assert layer_map(4, 4) == [0, 1, 2, 3, 4]
    student = make_model(seed=1)
    teacher = make_model(seed=2, fusion=dict(layers=4, hidden=48, heads=6, intermediate=96, dropout=0.0, attention_dropout=0.0), head_branches=1)
    grid, concepts = make_inputs()
    ids = torch.randint(5, V, (5, 6))
    valid = torch.ones_like(ids, dtype=torch.bool)
    s = student(grid, concepts, ids, valid, output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        t = teacher(grid, concepts, ids, valid, output_hidden_states=True, output_attentions=True)
    distiller = RepresentationDistiller(32, 2, [(48, 4)])
    assert isinstance(distiller.projections[0], torch.nn.Linear)
    hidden = distiller.hidden_loss(s.hidden_states, [t.hidden_states], s.sequence_valid)
    attn = distiller.attention_loss(s.attentions, [t.attentions], s.sequence_valid)
    assert float(hidden.detach()) > 0 and float(attn.detach()) > 0
    (hidden + attn).backward()
    assert student.fusion.bert.encoder.layer[0].attention.self.query.weight.grad is not None
    assert distiller.projections[0].weight.grad is not None
    # a student compared with itself (same width: identity projection) has zero loss
    same = RepresentationDistiller(32, 2, [(32, 2)])
    hs = [h.detach() for h in s.hidden_states]
    at = [a.detach() for a in s.attentions]
    assert float(same.hidden_loss(hs, [hs], s.sequence_valid)) == pytest.approx(0.0, abs=1e-6)
    assert float(same.attention_loss(at, [at], s.sequence_valid)) == pytest.approx(0.0, abs=1e-5)
