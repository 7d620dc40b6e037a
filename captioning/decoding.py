"""Greedy and beam search for any step-wise captioner (UCM's LSTM, LightCap's transformer).

A model plugs in through three methods (``StepModel``), so an LSTM state, a transformer KV cache or a
plain list of prefixes all fit:

* ``init_state(batch) -> state``          the decoder state for B inputs (image features, grids ...);
* ``step(last_tokens [N], state) -> (log_probs [N, V], state)``   one decoding step for N rows;
* ``reorder(state, indices [M]) -> state``  rows of the state picked (and repeated) by ``indices``;
  beam search also uses it to expand B rows into B*K beams (``indices = [0,0,..,1,1,..]``).

Search options (``DecodeOptions``):

* ``max_length``: the most words a caption has (``<eos>`` is forced after that many); ``min_length``: fewest
  words (``<eos>`` is banned before);
* ``beam_size``: 1 is greedy search;
* ``length_penalty``: GNMT's alpha (Wu et al. 2016): a finished hypothesis is ranked by
  ``sum log p / ((5 + |Y|) / 6) ** alpha`` with ``|Y|`` its tokens including ``<eos>``; 0 ranks by the plain
  sum of log-probabilities, 1 is close to per-token length normalisation;
* ``no_repeat_ngram_size``: n > 0 bans any token that would complete an n-gram already in the hypothesis;
* ``repetition_penalty``: CTRL / HF style: the log-probability of a token already generated is multiplied
  by the penalty (> 1 makes it less likely; log-probs are <= 0);
* ``max_repeat_run``: r > 0 bans a token that would make r + 1 equal tokens in a row (r = 2: never a word
  three times in a row) -- the guard against the seed's "at the the the".

Scores handed back are the adjusted log-probabilities the search ranked with (equal to the model's when
no penalty is on): ``Hypothesis.log_prob`` (sum, including ``<eos>``), ``.score`` (ranking score after the
length penalty) and ``.mean_log_prob`` (per token).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from captioning.decode_options import DecodeOptions

NEG_INF = float("-inf")


class StepModel(Protocol):
    def init_state(self, batch: Any) -> Any: ...

    def step(self, last_tokens: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]: ...

    def reorder(self, state: Any, indices: torch.Tensor) -> Any: ...


@dataclass
class Hypothesis:
    tokens: list[int]  # generated ids, without <bos> / <eos>
    log_prob: float  # sum of the (adjusted) log-probabilities, <eos> included when finished
    score: float  # what the search ranked by (log_prob after the length penalty)
    finished: bool = True  # ended with <eos> (always true: <eos> is forced at max_length)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mean_log_prob(self) -> float:
        return self.log_prob / max(1, len(self.tokens) + int(self.finished))


def gnmt_length_penalty(length: int, alpha: float) -> float:
    return ((5.0 + length) / 6.0) ** alpha


# ---------------------------------------------------------------------------------------------- processors
def adjust_log_probs(
    log_probs: torch.Tensor, prefix: torch.Tensor, step: int, options: DecodeOptions, eos_id: int
) -> torch.Tensor:
    """Apply length limits and repetition controls to one step's log-probs.

    log_probs: [N, V] for the next token; prefix: [N, step] the tokens generated so far (no <bos>).
    """
    log_probs = log_probs.float().clone()
    n_rows, vocab = log_probs.shape
    if step < options.min_length:
        log_probs[:, eos_id] = NEG_INF
    if step >= options.max_length:  # only <eos> is left
        keep = log_probs[:, eos_id].clone()
        log_probs.fill_(NEG_INF)
        log_probs[:, eos_id] = keep
        return log_probs
    if step == 0:
        return log_probs
    if options.repetition_penalty != 1.0:
        seen = torch.zeros(n_rows, vocab, dtype=torch.bool, device=log_probs.device)
        seen.scatter_(1, prefix, True)
        log_probs = torch.where(seen, log_probs * options.repetition_penalty, log_probs)
    run = options.max_repeat_run
    if run > 0 and step >= run:
        tail = prefix[:, -run:]  # [N, run]
        same = (tail == tail[:, :1]).all(dim=1)  # the last `run` tokens are one token
        rows = same.nonzero(as_tuple=True)[0]
        log_probs[rows, tail[rows, 0]] = NEG_INF
    n = options.no_repeat_ngram_size
    if n > 0 and step >= n:
        if n == 1:
            banned = torch.zeros(n_rows, vocab, device=log_probs.device)
            banned.scatter_add_(1, prefix, torch.ones_like(prefix, dtype=banned.dtype))
        else:
            ngrams = prefix.unfold(1, n, 1)  # [N, step-n+1, n] every n-gram so far
            context = prefix[:, step - n + 1 :]  # [N, n-1] the tokens a new n-gram would start with
            match = (ngrams[:, :, :-1] == context[:, None, :]).all(dim=2)  # [N, step-n+1]
            banned = torch.zeros(n_rows, vocab, device=log_probs.device)
            banned.scatter_add_(1, ngrams[:, :, -1], match.to(banned.dtype))
        log_probs = log_probs.masked_fill(banned > 0, NEG_INF)
    return log_probs


# ---------------------------------------------------------------------------------------------- searches
def decode(
    model: StepModel,
    batch: Any,
    options: DecodeOptions,
    *,
    bos_id: int,
    eos_id: int,
    batch_size: int | None = None,
    reference: bool = False,
) -> list[Hypothesis]:
    """The best hypothesis for each of the B inputs (greedy when ``beam_size == 1``).

    ``reference``: beam search with the original per-input, per-rank Python loop (``beam_search_reference``),
    kept as what the vectorised ``beam_search`` is tested and benchmarked against."""
    if options.beam_size == 1:
        return greedy_search(model, batch, options, bos_id=bos_id, eos_id=eos_id, batch_size=batch_size)
    search = beam_search_reference if reference else beam_search
    return [beams[0] for beams in search(model, batch, options, bos_id=bos_id, eos_id=eos_id, batch_size=batch_size)]


@torch.no_grad()
def greedy_search(
    model: StepModel,
    batch: Any,
    options: DecodeOptions,
    *,
    bos_id: int,
    eos_id: int,
    batch_size: int | None = None,
) -> list[Hypothesis]:
    n_inputs = len(batch) if batch_size is None else batch_size
    state = model.init_state(batch)
    last = torch.full((n_inputs,), bos_id, dtype=torch.long)
    prefix = torch.zeros(n_inputs, 0, dtype=torch.long)
    sum_log_prob = torch.zeros(n_inputs, dtype=torch.float64)
    finished = torch.zeros(n_inputs, dtype=torch.bool)
    lengths = torch.zeros(n_inputs, dtype=torch.long)  # words before <eos>
    for step in range(options.max_length + 1):
        log_probs, state = model.step(last.to(_device_of(state, last)), state)
        log_probs = adjust_log_probs(log_probs.cpu(), prefix, step, options, eos_id)
        best_lp, best = log_probs.max(dim=1)
        best = torch.where(finished, torch.full_like(best, eos_id), best)
        sum_log_prob += torch.where(finished, torch.zeros_like(best_lp), best_lp).double()
        lengths += (~finished & (best != eos_id)).long()
        finished |= best == eos_id
        prefix = torch.cat([prefix, best[:, None]], dim=1)
        last = best
        if bool(finished.all()):
            break
    out = []
    for i in range(n_inputs):
        tokens = prefix[i, : lengths[i]].tolist()
        log_prob = float(sum_log_prob[i])
        score = log_prob / gnmt_length_penalty(len(tokens) + 1, options.length_penalty)
        out.append(Hypothesis(tokens=tokens, log_prob=log_prob, score=score, finished=True))
    return out


@torch.no_grad()
def beam_search_reference(
    model: StepModel,
    batch: Any,
    options: DecodeOptions,
    *,
    bos_id: int,
    eos_id: int,
    batch_size: int | None = None,
) -> list[list[Hypothesis]]:
    """Up to ``beam_size`` finished hypotheses per input, best first.

    Beams are laid out input-major (row ``b * K + k``). A candidate ending in ``<eos>`` is kept when it
    ranks within the top K of its step (as in HF / fairseq; equal scores rank by beam, then token); an input is
    done when it has K finished hypotheses and no live beam can still beat the worst of them, even with the most
    favourable length.
    """
    n_inputs = len(batch) if batch_size is None else batch_size
    k = options.beam_size
    alpha = options.length_penalty
    state = model.init_state(batch)
    state = model.reorder(state, torch.arange(n_inputs).repeat_interleave(k))
    beam_scores = torch.zeros(n_inputs, k, dtype=torch.float64)
    beam_scores[:, 1:] = NEG_INF  # all K beams start identical: expand only the first
    prefix = torch.zeros(n_inputs * k, 0, dtype=torch.long)
    last = torch.full((n_inputs * k,), bos_id, dtype=torch.long)
    finished: list[list[Hypothesis]] = [[] for _ in range(n_inputs)]
    done = [False] * n_inputs

    for step in range(options.max_length + 1):
        log_probs, state = model.step(last.to(_device_of(state, last)), state)
        log_probs = adjust_log_probs(log_probs.cpu(), prefix, step, options, eos_id)  # [B*K, V]
        vocab = log_probs.shape[1]
        candidates = (beam_scores.view(-1, 1) + log_probs.double()).view(n_inputs, k * vocab)
        # the top 2K, ties to the lower (beam, token) index (a stable sort; torch's topk leaves ties unordered)
        top_scores, top_index = candidates.sort(dim=1, descending=True, stable=True)
        top_scores, top_index = top_scores[:, : 2 * k], top_index[:, : 2 * k]  # [B, 2K]
        top_beam = top_index // vocab
        top_token = top_index % vocab

        next_rows, next_tokens, next_scores = [], [], []
        for b in range(n_inputs):
            chosen = 0
            for rank in range(top_scores.shape[1]):
                score = float(top_scores[b, rank])
                if done[b] or chosen == k:
                    break
                row = b * k + int(top_beam[b, rank])
                token = int(top_token[b, rank])
                if score == NEG_INF:
                    continue
                if token == eos_id:
                    if rank < k:
                        tokens = prefix[row].tolist()
                        ranked = score / gnmt_length_penalty(len(tokens) + 1, alpha)
                        finished[b].append(Hypothesis(tokens=tokens, log_prob=score, score=ranked))
                    continue
                next_rows.append(row)
                next_tokens.append(token)
                next_scores.append(score)
                chosen += 1
            # fill the beam up for done inputs or dead ends so the layout stays B*K
            while chosen < k:
                next_rows.append(b * k)
                next_tokens.append(eos_id)
                next_scores.append(NEG_INF)
                chosen += 1
            finished[b].sort(key=lambda h: h.score, reverse=True)
            del finished[b][k:]
            if not done[b]:
                done[b] = _is_done(finished[b], next_scores[-k:], k, step, options)

        if all(done) or step == options.max_length:
            break
        rows = torch.tensor(next_rows, dtype=torch.long)
        state = model.reorder(state, rows.to(_device_of(state, rows)))
        last = torch.tensor(next_tokens, dtype=torch.long)
        prefix = torch.cat([prefix[rows], last[:, None]], dim=1)
        beam_scores = torch.tensor(next_scores, dtype=torch.float64).view(n_inputs, k)

    for b in range(n_inputs):
        if not finished[b]:  # every path was banned: hand back the empty caption with -inf score
            finished[b].append(Hypothesis(tokens=[], log_prob=NEG_INF, score=NEG_INF))
    return finished


@torch.no_grad()
def beam_search(
    model: StepModel,
    batch: Any,
    options: DecodeOptions,
    *,
    bos_id: int,
    eos_id: int,
    batch_size: int | None = None,
) -> list[list[Hypothesis]]:
    """Up to ``beam_size`` finished hypotheses per input, best first; the same search (and results) as
    ``beam_search_reference``, with each step's bookkeeping for all inputs in one compiled call
    (``captioning.search_kernels``: the bans, the top 2K per input, finished hypotheses, the next beams and the
    stopping rule) instead of per-candidate Python or a few dozen tensor operations. The model's steps and
    reorders stay the model's (torch, on its device); only the log-probabilities come to the CPU."""
    import numpy as np

    from captioning import search_kernels as kernels

    n_inputs = len(batch) if batch_size is None else batch_size
    k = options.beam_size
    steps = options.max_length + 1
    state = model.init_state(batch)
    state = model.reorder(state, torch.arange(n_inputs).repeat_interleave(k))
    beam_scores = np.full((n_inputs, k), NEG_INF)
    beam_scores[:, 0] = 0.0  # all K beams start identical: expand only the first
    prefix = np.zeros((n_inputs * k, steps), np.int64)  # generated tokens, the first `step` columns filled
    prefix_spare = np.zeros_like(prefix)
    last = np.full(n_inputs * k, bos_id, np.int64)
    book = None
    for step in range(steps):
        tokens = torch.from_numpy(last.copy())
        log_probs, state = model.step(tokens.to(_device_of(state, tokens)), state)
        # a float32 copy: the bans edit it in place, and the model's own tensor must stay as it was
        log_probs = np.array(log_probs.detach().to("cpu", torch.float32).numpy(), dtype=np.float32, order="C")
        if book is None:
            book = kernels.new_book(n_inputs, k, steps, log_probs.shape[1])
        kernels.adjust(log_probs, prefix, step, options.min_length, options.max_length,
                       options.no_repeat_ngram_size, float(options.repetition_penalty), options.max_repeat_run, eos_id)
        kernels.beam_select(log_probs, step, k, options.max_length, float(options.length_penalty), eos_id, prefix,
                            beam_scores, book)
        if book[5].all() or step == options.max_length:
            break
        rows = torch.from_numpy(book[6].reshape(-1).copy())
        state = model.reorder(state, rows.to(_device_of(state, rows)))
        kernels.advance(prefix, prefix_spare, last, step, book)
        prefix, prefix_spare = prefix_spare, prefix
        beam_scores[:, :] = book[8]
    return kernels.hypotheses(book)


def _is_done(kept: list[Hypothesis], alive_scores: list[float], k: int, step: int, options: DecodeOptions) -> bool:
    if len(kept) < k:
        return False
    best_alive = max(alive_scores)
    if best_alive == NEG_INF:
        return True
    # live beams have step+1 words; finished they have between step+2 and max_length+1 tokens
    alpha = options.length_penalty
    length = options.max_length + 1 if alpha > 0 else step + 2
    bound = best_alive / gnmt_length_penalty(length, alpha)
    return bound <= kept[-1].score


def _device_of(state: Any, default: torch.Tensor) -> torch.device:
    """The device of the first tensor found in ``state`` (so ``step`` gets its tokens where it computes)."""
    found = _find_tensor(state)
    return found.device if found is not None else default.device


def _find_tensor(state: Any) -> torch.Tensor | None:
    if isinstance(state, torch.Tensor):
        return state
    if isinstance(state, dict):
        state = list(state.values())
    if isinstance(state, (list, tuple)):
        for item in state:
            found = _find_tensor(item)
            if found is not None:
                return found
    return None


def repeat_run_length(tokens: list[Any]) -> int:
    """The longest run of one token repeated in a row (1 for no repeats, 0 for an empty list)."""
    best = run = 0
    previous = object()
    for token in tokens:
        run = run + 1 if token == previous else 1
        previous = token
        best = max(best, run)
    return best
