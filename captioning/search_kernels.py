"""The bookkeeping of a caption search, compiled (numba): the bans, and one step of beam search for all inputs.

``captioning.decoding.beam_search`` drives any ``StepModel`` (UCM's LSTM, LightCap's torch decoder on a GPU)
with these, one call per step instead of some forty tensor operations; LightCap's CPU search
(``captioning.models.lightcap.compiled_search``) calls the same functions inside its own compiled loop. What
they compute is ``adjust_log_probs`` and ``beam_search_reference`` exactly (tests/test_fast_inference.py:
equal hypotheses, scores to the bit, on 120 random searches).

Beam layout: input-major rows ``b * K + k``. The search's arrays (``new_book``): finished hypotheses per input,
kept sorted by score, best first (``tokens [B,K,T]``, ``length``, ``log_prob``, ``score``, ``kept [B]``), ``done
[B]``, and the next step's beams (``rows``, ``tokens``, ``scores`` [B,K]).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numba
import numpy as np
from numba import njit


def _cache_dir() -> None:
    """Compiled kernels are cached on disk (``cache=True``: about 12 s to compile, 1 s to load). Numba caches next
    to this file or under ``~/.cache``; where neither is writable (a read-only install, a container user without
    a home) it would refuse to import, so ``NUMBA_CACHE_DIR`` then defaults to a directory under the temp dir.
    Called at import, before this module defines its kernels; numba reads the setting when a kernel is defined."""
    if os.environ.get("NUMBA_CACHE_DIR") or os.access(Path(__file__).parent, os.W_OK):
        return
    home_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    writable = home_cache if home_cache.is_dir() and os.access(home_cache, os.W_OK) else Path(tempfile.gettempdir())
    os.environ["NUMBA_CACHE_DIR"] = numba.config.CACHE_DIR = str(writable / "captioner-numba")


_cache_dir()

# error_model="numpy": a float division is IEEE (no ZeroDivisionError check), which is what lets LLVM vectorise
# the loops that divide (GELU, softmax).
KERNEL = {"cache": True, "nogil": True, "error_model": "numpy"}


# ---------------------------------------------------------------------------------------------- the bans
@njit(**KERNEL)
def adjust(log_probs, prefix, step, min_length, max_length, ngram, repetition_penalty, max_run, eos):
    """``captioning.decoding.adjust_log_probs`` in place on log_probs[N,V]; prefix[N, >=step] (generated)."""
    n_rows, vocab = log_probs.shape
    if step < min_length:
        for r in range(n_rows):
            log_probs[r, eos] = -np.inf
    if step >= max_length:  # only <eos> is left
        for r in range(n_rows):
            keep = log_probs[r, eos]
            log_probs[r, :] = -np.inf
            log_probs[r, eos] = keep
        return
    if step == 0:
        return
    for r in range(n_rows):
        if repetition_penalty != 1.0:
            seen = np.zeros(vocab, np.bool_)
            for j in range(step):
                seen[prefix[r, j]] = True
            for v in range(vocab):
                if seen[v]:
                    log_probs[r, v] = log_probs[r, v] * np.float32(repetition_penalty)
        if max_run > 0 and step >= max_run:
            same = True
            for j in range(step - max_run + 1, step):
                if prefix[r, j] != prefix[r, step - max_run]:
                    same = False
            if same:
                log_probs[r, prefix[r, step - max_run]] = -np.inf
        if ngram > 0 and step >= ngram:
            for j in range(step - ngram + 1):  # every n-gram so far whose first n-1 match the last n-1 tokens
                match = True
                for i in range(ngram - 1):
                    if prefix[r, j + i] != prefix[r, step - ngram + 1 + i]:
                        match = False
                        break
                if match:
                    log_probs[r, prefix[r, j + ngram - 1]] = -np.inf


@njit(**KERNEL)
def length_penalty(length, alpha):
    return ((5.0 + length) / 6.0) ** alpha


# ---------------------------------------------------------------------------------------------- beam search
@njit(**KERNEL)
def new_book(n_inputs, beam, steps, vocab):
    """The arrays of a beam search over ``n_inputs`` inputs (see the module's docstring), as one tuple."""
    width = 2 * beam if 2 * beam < beam * vocab else beam * vocab
    return (
        np.zeros((n_inputs, beam, steps), np.int64),   # 0 finished hypotheses' tokens
        np.zeros((n_inputs, beam), np.int64),          # 1 their lengths
        np.full((n_inputs, beam), -np.inf),            # 2 their log-probabilities
        np.full((n_inputs, beam), -np.inf),            # 3 their ranking scores
        np.zeros(n_inputs, np.int64),                  # 4 how many are kept
        np.zeros(n_inputs, np.bool_),                  # 5 done
        np.empty((n_inputs, beam), np.int64),          # 6 next beams: source rows
        np.empty((n_inputs, beam), np.int64),          # 7 next beams: tokens
        np.empty((n_inputs, beam)),                    # 8 next beams: scores
        np.empty(width),                               # 9 scratch: top-2K scores
        np.empty(width, np.int64),                     # 10 scratch: top-2K candidates
    )


@njit(**KERNEL)
def beam_select(log_probs, step, beam, max_length, alpha, eos, prefix, beam_scores, book):
    """One step of beam search for every open input, after ``adjust``: of each input's top 2K candidates (beam
    score + log-prob, float64), the first K (by rank) that are finite and not ``<eos>`` become its next beams
    (padded with dead beams: row b*K, ``<eos>``, -inf); an ``<eos>`` candidate within the top K finishes a
    hypothesis; an input is done when it has K finished and no live beam can still beat the worst of them.
    log_probs [B*K,V] (rows of dead beams and done inputs are not read), prefix [B*K, >=step], beam_scores [B,K]."""
    hyp_tokens, hyp_length, hyp_log_prob, hyp_score, kept, done, next_rows, next_tokens, next_scores, \
        top_scores, top_index = book
    n_images = beam_scores.shape[0]
    vocab = log_probs.shape[1]
    width = top_scores.shape[0]
    for b in range(n_images):
        for s in range(beam):  # dead fillers unless live candidates take the slot
            next_rows[b, s] = b * beam
            next_tokens[b, s] = eos
            next_scores[b, s] = -np.inf
        if done[b]:
            continue
        # the top 2K of the live beams' candidates (sorted, descending; ties keep the lower index); a dead
        # beam's candidates are all -inf, which torch's top-k may list but the search skips
        filled = 0
        for s in range(beam):
            base = beam_scores[b, s]
            if base == -np.inf:
                continue
            for v in range(vocab):
                score = base + np.float64(log_probs[b * beam + s, v])
                if filled == width:
                    if not score > top_scores[width - 1]:
                        continue
                    pos = width - 1
                else:
                    pos = filled
                    filled += 1
                while pos > 0 and score > top_scores[pos - 1]:
                    top_scores[pos] = top_scores[pos - 1]
                    top_index[pos] = top_index[pos - 1]
                    pos -= 1
                top_scores[pos] = score
                top_index[pos] = s * vocab + v
        chosen = 0
        for rank in range(filled):
            if chosen == beam:
                break
            score = top_scores[rank]
            if score == -np.inf:
                continue
            row = b * beam + top_index[rank] // vocab
            token = top_index[rank] % vocab
            if token == eos:
                if rank < beam:  # a finished hypothesis: insert by score (stable), keep the best K
                    ranked = score / length_penalty(step + 1, alpha)
                    pos = kept[b]
                    while pos > 0 and hyp_score[b, pos - 1] < ranked:
                        pos -= 1
                    if pos < beam:
                        last_slot = kept[b] if kept[b] < beam else beam - 1
                        for s in range(last_slot, pos, -1):
                            hyp_tokens[b, s] = hyp_tokens[b, s - 1]
                            hyp_length[b, s] = hyp_length[b, s - 1]
                            hyp_log_prob[b, s] = hyp_log_prob[b, s - 1]
                            hyp_score[b, s] = hyp_score[b, s - 1]
                        hyp_tokens[b, pos, :step] = prefix[row, :step]
                        hyp_length[b, pos] = step
                        hyp_log_prob[b, pos] = score
                        hyp_score[b, pos] = ranked
                        if kept[b] < beam:
                            kept[b] += 1
                continue
            next_rows[b, chosen] = row
            next_tokens[b, chosen] = token
            next_scores[b, chosen] = score
            chosen += 1
        # done: K finished and no live beam can still beat the worst of them
        best_alive = next_scores[b].max()
        length = max_length + 1 if alpha > 0 else step + 2
        bound = best_alive / length_penalty(length, alpha)
        if kept[b] >= beam and (best_alive == -np.inf or bound <= hyp_score[b, beam - 1]):
            done[b] = True


@njit(**KERNEL)
def advance(prefix, prefix_spare, last, step, book):
    """The next beams' generated tokens: prefix_spare[r, :step+1] = prefix[next row of r, :step] + next token of r;
    ``last`` gets the next tokens."""
    next_rows, next_tokens = book[6], book[7]
    n_rows = last.shape[0]
    for r in range(n_rows):
        source = next_rows.reshape(-1)[r]
        prefix_spare[r, :step] = prefix[source, :step]
        prefix_spare[r, step] = next_tokens.reshape(-1)[r]
        last[r] = next_tokens.reshape(-1)[r]


def warm_up() -> None:
    """Compile (or load from the cache) the kernels for the argument types ``decoding.beam_search`` passes, so
    that a runtime's first request does not pay for it."""
    log_probs = np.zeros((2, 4), np.float32)
    prefix = np.zeros((2, 2), np.int64)
    book = new_book(1, 2, 2, 4)
    adjust(log_probs, prefix, 1, 0, 1, 2, 1.0, 1, 1)
    beam_select(log_probs, 1, 2, 1, 0.0, 1, prefix, np.zeros((1, 2)), book)
    advance(prefix, np.zeros_like(prefix), np.zeros(2, np.int64), 0, book)


def hypotheses(book) -> list:
    """The book's finished hypotheses as ``captioning.decoding.Hypothesis`` lists, best first; an input whose every
    path was banned gets the empty caption with score -inf."""
    from captioning.decoding import Hypothesis

    tokens, lengths, log_probs, scores, kept = book[:5]
    out = []
    for b in range(kept.shape[0]):
        if kept[b] == 0:
            out.append([Hypothesis(tokens=[], log_prob=float("-inf"), score=float("-inf"))])
            continue
        out.append([
            Hypothesis(tokens=tokens[b, i, : lengths[b, i]].tolist(), log_prob=float(log_probs[b, i]),
                       score=float(scores[b, i]))
            for i in range(kept[b])
        ])
    return out
