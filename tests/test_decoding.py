import math

import pytest
import torch

from captioning.decoding import (
    DecodeOptions,
    adjust_log_probs,
    beam_search,
    decode,
    greedy_search,
    repeat_run_length,
)

PAD, BOS, EOS = 0, 1, 2


class TableModel:
    """Next-token distributions looked up by prefix: the best sequence is known by hand."""

    def __init__(self, table, vocab=8):
        self.table = table
        self.vocab = vocab

    def init_state(self, batch):
        return [() for _ in range(len(batch))]

    def step(self, last_tokens, state):
        new_state = []
        rows = []
        for token, prefix in zip(last_tokens.tolist(), state, strict=True):
            prefix = prefix if token == BOS else prefix + (token,)
            new_state.append(prefix)
            probs = torch.full((self.vocab,), 1e-9)
            for tok, p in self.table.get(prefix, {EOS: 1.0}).items():
                probs[tok] = p
            rows.append(probs.log())
        return torch.stack(rows), new_state

    def reorder(self, state, indices):
        return [state[i] for i in indices.tolist()]


class RandomGRU(torch.nn.Module):
    """A small random recurrent language model conditioned on a per-input vector."""

    def __init__(self, vocab=12, dim=16, seed=0, repeat_bias=0.0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Parameter(torch.randn(vocab, dim, generator=gen))
        self.cell = torch.nn.GRUCell(dim, dim)
        with torch.no_grad():
            for p in self.cell.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        self.out = torch.nn.Parameter(torch.randn(dim, vocab, generator=gen))
        self.repeat_bias = repeat_bias

    def init_state(self, batch):
        return {"h": batch.clone(), "last": torch.full((len(batch),), -1)}

    def step(self, last_tokens, state):
        h = self.cell(self.embed[last_tokens], state["h"])
        logits = h @ self.out
        if self.repeat_bias:
            logits[torch.arange(len(last_tokens)), last_tokens] += self.repeat_bias
        return logits.log_softmax(-1), {"h": h, "last": last_tokens}

    def reorder(self, state, indices):
        return {k: v.index_select(0, indices) for k, v in state.items()}


def test_beam_finds_the_known_best_sequence_greedy_misses():
    a, b, c, d, e = 3, 4, 5, 6, 7
    table = {
        (): {a: 0.6, b: 0.4},
        (a,): {EOS: 0.3, c: 0.25, d: 0.25, e: 0.2},
        (b,): {EOS: 0.9, c: 0.1},
    }
    model = TableModel(table)
    greedy = greedy_search(model, [0], DecodeOptions(max_length=5), bos_id=BOS, eos_id=EOS)[0]
    assert greedy.tokens == [a]
    assert greedy.log_prob == pytest.approx(math.log(0.6 * 0.3), abs=1e-5)
    beams = beam_search(model, [0], DecodeOptions(beam_size=2, max_length=5), bos_id=BOS, eos_id=EOS)[0]
    assert beams[0].tokens == [b]
    assert beams[0].log_prob == pytest.approx(math.log(0.4 * 0.9), abs=1e-5)
    assert beams[1].tokens == [a]  # the runner-up is also finished and ranked
    assert beams[0].score >= beams[1].score


def test_length_penalty_prefers_the_longer_caption():
    a, b = 3, 4
    table = {(): {EOS: 0.5, a: 0.5}, (a,): {b: 0.99, EOS: 0.01}, (a, b): {EOS: 0.99, a: 0.01}}
    model = TableModel(table)
    short = decode(model, [0], DecodeOptions(beam_size=3, min_length=0, length_penalty=0.0), bos_id=BOS, eos_id=EOS)
    long = decode(model, [0], DecodeOptions(beam_size=3, min_length=0, length_penalty=1.0), bos_id=BOS, eos_id=EOS)
    assert short[0].tokens == []
    assert long[0].tokens == [a, b]
    assert long[0].score == pytest.approx(math.log(0.5 * 0.99 * 0.99) / (8 / 6), abs=1e-5)


@pytest.mark.parametrize(
    "options",
    [
        DecodeOptions(max_length=12),
        DecodeOptions(max_length=12, min_length=4, no_repeat_ngram_size=2, repetition_penalty=1.3, max_repeat_run=2),
    ],
)
def test_beam_size_one_is_greedy(options):
    model = RandomGRU(seed=3)
    batch = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    greedy = greedy_search(model, batch, options, bos_id=BOS, eos_id=EOS)
    beam_options = DecodeOptions(**{**options.to_dict(), "beam_size": 1})
    beams = [h[0] for h in beam_search(model, batch, beam_options, bos_id=BOS, eos_id=EOS)]
    assert [h.tokens for h in greedy] == [h.tokens for h in beams]
    for g, h in zip(greedy, beams, strict=True):
        assert g.log_prob == pytest.approx(h.log_prob, abs=1e-6)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_no_repeat_ngram_and_repeat_guard_hold(beam_size):
    model = RandomGRU(seed=5, repeat_bias=6.0)  # wants to say the last word again
    batch = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    plain = decode(model, batch, DecodeOptions(beam_size=beam_size, max_length=15, min_length=15), bos_id=BOS, eos_id=EOS)
    assert max(repeat_run_length(h.tokens) for h in plain) >= 3  # the model does repeat without the guards

    guarded = decode(
        model, batch, DecodeOptions(beam_size=beam_size, max_length=15, min_length=15, max_repeat_run=2),
        bos_id=BOS, eos_id=EOS,
    )
    assert all(repeat_run_length(h.tokens) <= 2 for h in guarded)

    for n in (2, 3):
        out = decode(
            model, batch, DecodeOptions(beam_size=beam_size, max_length=15, min_length=5, no_repeat_ngram_size=n),
            bos_id=BOS, eos_id=EOS,
        )
        for hyp in out:
            grams = [tuple(hyp.tokens[i : i + n]) for i in range(len(hyp.tokens) - n + 1)]
            assert len(grams) == len(set(grams)), (n, hyp.tokens)


def test_min_and_max_length():
    eager = TableModel({})  # every prefix: <eos> with probability 1
    out = decode(eager, [0, 1], DecodeOptions(min_length=3, max_length=6), bos_id=BOS, eos_id=EOS)
    assert all(len(h.tokens) == 3 for h in out)
    model = RandomGRU(seed=7)
    batch = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    for beam_size in (1, 4):
        out = decode(model, batch, DecodeOptions(beam_size=beam_size, max_length=4), bos_id=BOS, eos_id=EOS)
        assert all(1 <= len(h.tokens) <= 4 and EOS not in h.tokens for h in out)


def test_beam_search_rows_are_independent():
    model = RandomGRU(seed=11)
    batch = torch.randn(4, 16, generator=torch.Generator().manual_seed(4))
    options = DecodeOptions(beam_size=4, max_length=10, length_penalty=0.6, no_repeat_ngram_size=2)
    together = decode(model, batch, options, bos_id=BOS, eos_id=EOS)
    alone = [decode(model, batch[i : i + 1], options, bos_id=BOS, eos_id=EOS)[0] for i in range(4)]
    assert [h.tokens for h in together] == [h.tokens for h in alone]


def test_beam_score_is_at_least_greedy_score():
    model = RandomGRU(seed=13)
    batch = torch.randn(8, 16, generator=torch.Generator().manual_seed(5))
    greedy = decode(model, batch, DecodeOptions(max_length=10), bos_id=BOS, eos_id=EOS)
    beam = decode(model, batch, DecodeOptions(beam_size=5, max_length=10), bos_id=BOS, eos_id=EOS)
    assert all(b.score >= g.score - 1e-9 for b, g in zip(beam, greedy, strict=True))


def test_adjust_log_probs_bans_what_it_should():
    log_probs = torch.zeros(1, 6).log_softmax(-1)
    prefix = torch.tensor([[3, 4, 3]])
    opts = DecodeOptions(no_repeat_ngram_size=2, max_length=10)
    out = adjust_log_probs(log_probs, prefix, 3, opts, EOS)
    assert out[0, 4] == float("-inf") and torch.isfinite(out[0, [0, 1, 2, 3, 5]]).all()
    out = adjust_log_probs(log_probs, torch.tensor([[5, 5]]), 2, DecodeOptions(max_repeat_run=2), EOS)
    assert out[0, 5] == float("-inf")
    out = adjust_log_probs(log_probs, prefix, 3, DecodeOptions(repetition_penalty=2.0), EOS)
    assert out[0, 3] == pytest.approx(2 * log_probs[0, 3]) and out[0, 5] == pytest.approx(log_probs[0, 5])
    with pytest.raises(ValueError, match="unknown decoding option"):
        DecodeOptions.from_dict({"beam": 3})


def test_beam_search_leaves_the_models_log_probs_untouched():
    """The bans work on a copy: a model may hand back a tensor it keeps (here: the one it returns every step)."""

    class KeepsItsOutput:
        def __init__(self):
            self.out = torch.log_softmax(torch.arange(6, dtype=torch.float32), -1).repeat(2, 1)  # [2 rows, V=6]
            self.kept = self.out.clone()

        def init_state(self, batch):
            return {"x": torch.zeros(len(batch))}

        def step(self, last_tokens, state):
            return self.out[: len(last_tokens)], state

        def reorder(self, state, indices):
            return {"x": state["x"][indices]}

    model = KeepsItsOutput()
    options = DecodeOptions(beam_size=2, max_length=4, min_length=2, no_repeat_ngram_size=1)
    beam_search(model, [0.0], options, bos_id=BOS, eos_id=EOS)
    assert torch.equal(model.out, model.kept)
