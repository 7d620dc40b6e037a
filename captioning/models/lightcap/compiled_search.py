"""LightCap's caption search on the CPU as one compiled loop (numba): every decoder step *and* the search's
bookkeeping of a whole batch in a single call, without the interpreter in between.

Why: on a CPU, LightCap's decoder is bound by per-operator overhead, not arithmetic. A step of the tiny
student is about a hundred torch calls on a few rows (two BERT layers, the three-branch head, the bans, the
top-k and the beam reorder), each costing 5-30 us on these machines, for about 5 MFLOP of work; at batch 1 the
search took half of LightCap's time (docs/performance.md). Compiled once with numba (LLVM), the same
arithmetic runs as plain loops: no dispatcher, no temporaries, the GIL released (``nogil``) so replicas decode
in parallel.

What it computes is exactly ``FastLightCapDecoder`` + ``captioning.decoding`` (``beam_search`` for
``beam_size > 1``, else ``greedy_search``), to float32 rounding (tests/test_compiled_search.py):

* the prefix (visual + concept tokens) runs once per image through ``FastLightCapDecoder.init_state`` (torch:
  a real matrix product of ``P`` rows, which torch does well); its keys / values are shared by the image's beams;
* a step: ``x = LN(word[token] + type + position)``; per layer: fused QKV, attention over the image's prefix
  keys and the row's own caption keys (a preallocated time-major cache), output projection, LN, GELU FFN, LN;
  the ensemble head: per branch ``LN(GELU(W x))``, logits against the tied word embeddings, ``log_softmax``,
  then the log of the branches' mean probability;
* the bans of ``adjust_log_probs`` (min / max length, repetition penalty, runs, repeated n-grams), then for
  beam search the top ``2K`` candidates per image, finished hypotheses (``<eos>`` within the top ``K``), the
  next ``K`` beams, the stop rule (``_is_done``), and the cache reorder; greedy search takes the arg-max.

Scores are summed in float64 like the torch search. Ties between exactly equal candidate scores go to the lower
(beam, token) index; torch's ``topk`` leaves their order unspecified.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import numpy as np
import torch
from numba import njit

from captioning.search_kernels import (
    KERNEL,
    adjust,
    advance,
    beam_select,
    hypotheses,
    length_penalty,
    new_book,
)

# KERNEL: cached, nogil, IEEE divisions (captioning/search_kernels.py). Matrix products and reductions may also
# be reassociated and contracted into FMAs (vectorised); nothing assumes finite values, because the search lives
# on -inf.
_MATH = {**KERNEL, "fastmath": {"reassoc", "contract"}}


# ---------------------------------------------------------------------------------------------- arithmetic
@njit(**_MATH)
def _linear(x, weight, bias, out):
    """out[N,O] = x[N,I] @ weight[O,I].T + bias[O] (torch's layout): dot products over I, four rows at a time
    so each weight row is loaded once per four rows, then one row at a time for the rest."""
    n_rows, n_in = x.shape
    n_out = weight.shape[0]
    r = 0
    while r + 4 <= n_rows:
        for o in range(n_out):
            s0 = np.float32(0.0)
            s1 = np.float32(0.0)
            s2 = np.float32(0.0)
            s3 = np.float32(0.0)
            for i in range(n_in):
                w = weight[o, i]
                s0 += x[r, i] * w
                s1 += x[r + 1, i] * w
                s2 += x[r + 2, i] * w
                s3 += x[r + 3, i] * w
            out[r, o] = s0 + bias[o]
            out[r + 1, o] = s1 + bias[o]
            out[r + 2, o] = s2 + bias[o]
            out[r + 3, o] = s3 + bias[o]
        r += 4
    for rest in range(r, n_rows):  # one row at a time (as fast per row for the 1-3 left: 8.0 vs 8.4 us at 3x128x384)
        for o in range(n_out):
            s0 = np.float32(0.0)
            for i in range(n_in):
                s0 += x[rest, i] * weight[o, i]
            out[rest, o] = s0 + bias[o]


@njit(**_MATH)
def _add(x, y):
    """x += y (same shape, 2-D)."""
    for r in range(x.shape[0]):
        for j in range(x.shape[1]):
            x[r, j] += y[r, j]


@njit(**_MATH)
def _layer_norm_rows(x, gamma, beta, eps):
    """In place over the last axis of x[N,H] (biased variance, as torch)."""
    n_rows, width = x.shape
    for r in range(n_rows):
        mean = 0.0
        for j in range(width):
            mean += x[r, j]
        mean /= width
        var = 0.0
        for j in range(width):
            diff = x[r, j] - mean
            var += diff * diff
        inv = 1.0 / math.sqrt(var / width + eps)
        for j in range(width):
            x[r, j] = (x[r, j] - mean) * inv * gamma[j] + beta[j]


@njit(**_MATH)
def _gelu(x):
    """BERT's exact GELU, ``x/2 (1 + erf(x/sqrt 2))``, in place. erf is the rational approximation Eigen and XLA
    use for float32 (odd degree-13 over even degree-8 polynomial on [-4, 4], +-1 outside): it vectorises, where
    libm's erf is a scalar call per element. Largest error against GELU in float64 over [-10, 10]: 9.3e-7
    (torch's own float32 GELU: 1.1e-6)."""
    flat = x.reshape(-1)
    for j in range(flat.size):
        v = flat[j]
        z = min(max(v * np.float32(0.7071067811865476), np.float32(-4.0)), np.float32(4.0))
        z2 = z * z
        p = z2 * np.float32(-2.72614225801306e-10) + np.float32(2.77068142495902e-08)
        p = z2 * p + np.float32(-2.10102402082508e-06)
        p = z2 * p + np.float32(-5.69250639462346e-05)
        p = z2 * p + np.float32(-7.34990630326855e-04)
        p = z2 * p + np.float32(-2.95459980854025e-03)
        p = z2 * p + np.float32(-1.60960333262415e-02)
        q = z2 * np.float32(-1.45660718464996e-05) + np.float32(-2.13374055278905e-04)
        q = z2 * q + np.float32(-1.68282697438203e-03)
        q = z2 * q + np.float32(-7.37332916720468e-03)
        q = z2 * q + np.float32(-1.42647390514189e-02)
        flat[j] = np.float32(0.5) * v * (np.float32(1.0) + z * p / q)


@njit(**_MATH)
def _step(tokens, rows, t, group, weights, prefix_k, prefix_v, prefix_mask, cache, log_probs):
    """One decoder step for the rows listed in ``rows`` (row r belongs to image r // group; the rows of finished
    images are left out) -> their log_probs[r,V] (float32); tokens[N] the rows' last tokens.

    prefix_k / prefix_v [L,B,h,d,P] (transposed, so both products run along P; keys pre-scaled by 1/sqrt(d)),
    prefix_mask [B,P] (additive),
    cache [T,L,2,N,h,d]: the rows' own caption keys (pre-scaled) / values; slot t is written here."""
    (word, caption_base, emb_norm, qkv_wt, qkv_b, out_wt, out_b, norm1, in_wt, in_b, ffn_wt, ffn_b,
     norm2, branch_wt, branch_b, branch_norm, vocab_bias, eps) = weights
    n_rows = rows.shape[0]  # the computed rows, compacted: c -> row rows[c]
    n_layers, _, heads, head_dim, n_prefix = prefix_k.shape
    hidden = word.shape[1]
    vocab = word.shape[0]
    n_branches = branch_norm.shape[0]
    scale = np.float32(1.0 / math.sqrt(head_dim))
    x = np.empty((n_rows, hidden), np.float32)
    for c in range(n_rows):
        for j in range(hidden):
            x[c, j] = word[tokens[rows[c]], j] + caption_base[t, j]
    _layer_norm_rows(x, emb_norm[0], emb_norm[1], eps[0])
    qkv = np.empty((n_rows, 3 * hidden), np.float32)
    ctx = np.empty((n_rows, hidden), np.float32)
    att = np.empty((n_rows, hidden), np.float32)
    inner = np.empty((n_rows, in_wt.shape[1]), np.float32)
    scores = np.empty(n_prefix + t + 1, np.float32)
    for layer in range(n_layers):
        _linear(x, qkv_wt[layer], qkv_b[layer], qkv)
        for c in range(n_rows):
            r = rows[c]
            for h in range(heads):
                for j in range(head_dim):
                    cache[t, layer, 0, r, h, j] = qkv[c, hidden + h * head_dim + j] * scale
                    cache[t, layer, 1, r, h, j] = qkv[c, 2 * hidden + h * head_dim + j]
        for c in range(n_rows):
            r = rows[c]
            image = r // group
            for h in range(heads):
                q = qkv[c, h * head_dim : (h + 1) * head_dim]
                top = np.float32(-np.inf)
                for p in range(n_prefix):
                    scores[p] = prefix_mask[image, p]
                for j in range(head_dim):
                    qj = q[j]
                    for p in range(n_prefix):
                        scores[p] += qj * prefix_k[layer, image, h, j, p]
                for p in range(n_prefix):
                    top = max(top, scores[p])
                for step in range(t + 1):
                    s = np.float32(0.0)
                    for j in range(head_dim):
                        s += q[j] * cache[step, layer, 0, r, h, j]
                    scores[n_prefix + step] = s
                    top = max(top, s)
                total = np.float32(0.0)
                for p in range(n_prefix + t + 1):
                    e = np.float32(math.exp(scores[p] - top))
                    scores[p] = e
                    total += e
                inv_total = np.float32(1.0) / total
                for p in range(n_prefix + t + 1):
                    scores[p] *= inv_total
                base = h * head_dim
                for j in range(head_dim):
                    acc = np.float32(0.0)
                    for p in range(n_prefix):
                        acc += scores[p] * prefix_v[layer, image, h, j, p]
                    for step in range(t + 1):
                        acc += scores[n_prefix + step] * cache[step, layer, 1, r, h, j]
                    ctx[c, base + j] = acc
        _linear(ctx, out_wt[layer], out_b[layer], att)
        _add(att, x)
        _layer_norm_rows(att, norm1[layer, 0], norm1[layer, 1], eps[1])
        _linear(att, in_wt[layer], in_b[layer], inner)
        _gelu(inner)
        _linear(inner, ffn_wt[layer], ffn_b[layer], x)
        _add(x, att)
        _layer_norm_rows(x, norm2[layer, 0], norm2[layer, 1], eps[1])
    # ensemble head: per branch LN(GELU(W x)) -> logits on the tied embeddings -> log of the mean probability
    branch = np.empty((n_rows, n_branches * hidden), np.float32)
    _linear(x, branch_wt, branch_b, branch)
    _gelu(branch)
    per_branch = branch.reshape(n_rows * n_branches, hidden)
    ones = np.ones(hidden, np.float32)
    zeros = np.zeros(hidden, np.float32)
    _layer_norm_rows(per_branch, ones, zeros, eps[2])
    for c in range(n_rows):
        for k in range(n_branches):
            for j in range(hidden):
                per_branch[c * n_branches + k, j] = per_branch[c * n_branches + k, j] * branch_norm[k, 0, j] \
                    + branch_norm[k, 1, j]
    logits = np.empty((n_rows * n_branches, vocab), np.float32)
    _linear(per_branch, word, vocab_bias, logits)
    branch_lp = np.empty(n_branches, np.float32)
    log_n = np.float32(math.log(n_branches))
    for c in range(n_rows):
        r = rows[c]
        for k in range(n_branches):  # log_softmax of each branch, kept in place
            row = c * n_branches + k
            top = logits[row, 0]
            for v in range(1, vocab):
                top = max(top, logits[row, v])
            total = np.float32(0.0)
            for v in range(vocab):
                total += np.float32(math.exp(logits[row, v] - top))
            shift = top + np.float32(math.log(total))
            for v in range(vocab):
                logits[row, v] -= shift
        for v in range(vocab):  # logsumexp over the branches
            top = -np.inf
            for k in range(n_branches):
                branch_lp[k] = logits[c * n_branches + k, v]
                top = max(top, branch_lp[k])
            if top == -np.inf:
                log_probs[r, v] = -np.inf
                continue
            total = np.float32(0.0)
            for k in range(n_branches):
                total += np.float32(math.exp(branch_lp[k] - top))
            log_probs[r, v] = top + np.float32(math.log(total)) - log_n


# ---------------------------------------------------------------------------------------------- searches
@njit(**KERNEL)
def _beam_search(n_images, beam, max_length, min_length, alpha, ngram, repetition_penalty, max_run, bos, eos,
                 weights, prefix_k, prefix_v, prefix_mask):
    """``captioning.decoding.beam_search`` -> its book (``search_kernels.new_book``: up to K finished hypotheses
    per image, best first)."""
    n_layers, _, heads, head_dim, _ = prefix_k.shape
    vocab = weights[0].shape[0]
    steps = max_length + 1
    n_rows = n_images * beam
    cache = np.empty((steps, n_layers, 2, n_rows, heads, head_dim), np.float32)
    spare = np.empty_like(cache)
    prefix = np.zeros((n_rows, steps), np.int64)
    prefix_spare = np.zeros_like(prefix)
    last = np.full(n_rows, bos, np.int64)
    beam_scores = np.full((n_images, beam), -np.inf)
    beam_scores[:, 0] = 0.0  # the K beams start identical: expand only the first
    book = new_book(n_images, beam, steps, vocab)
    done, next_rows = book[5], book[6]
    log_probs = np.empty((n_rows, vocab), np.float32)
    live_rows = np.empty(n_rows, np.int64)
    for step in range(max_length + 1):
        # only live beams of open images are computed: a dead beam (score -inf: a filler, or one of the K identical
        # beams of step 0) or a finished image has no candidate to offer, so its log-probs are never read
        n_live = 0
        for b in range(n_images):
            if not done[b]:
                for s in range(beam):
                    if beam_scores[b, s] != -np.inf:
                        live_rows[n_live] = b * beam + s
                        n_live += 1
        _step(last, live_rows[:n_live], step, beam, weights, prefix_k, prefix_v, prefix_mask, cache, log_probs)
        adjust(log_probs, prefix, step, min_length, max_length, ngram, repetition_penalty, max_run, eos)
        beam_select(log_probs, step, beam, max_length, alpha, eos, prefix, beam_scores, book)
        if done.all() or step == max_length:
            break
        for r in range(n_rows):  # reorder the rows' caption cache, slots 0..step
            source = next_rows.reshape(-1)[r]
            for t in range(step + 1):
                spare[t, :, :, r] = cache[t, :, :, source]
        advance(prefix, prefix_spare, last, step, book)
        cache, spare = spare, cache
        prefix, prefix_spare = prefix_spare, prefix
        beam_scores[:, :] = book[8]
    return book


@njit(**KERNEL)
def _greedy_search(n_images, max_length, min_length, alpha, ngram, repetition_penalty, max_run, bos, eos,
                   weights, prefix_k, prefix_v, prefix_mask):
    """``captioning.decoding.greedy_search`` -> (tokens [B,T], lengths [B], log_probs [B], scores [B])."""
    n_layers, _, heads, head_dim, _ = prefix_k.shape
    vocab = weights[0].shape[0]
    steps = max_length + 1
    cache = np.empty((steps, n_layers, 2, n_images, heads, head_dim), np.float32)
    prefix = np.zeros((n_images, steps), np.int64)
    last = np.full(n_images, bos, np.int64)
    sum_log_prob = np.zeros(n_images)
    finished = np.zeros(n_images, np.bool_)
    lengths = np.zeros(n_images, np.int64)
    log_probs = np.empty((n_images, vocab), np.float32)
    live_rows = np.empty(n_images, np.int64)
    for step in range(max_length + 1):
        n_live = 0  # finished captions take <eos> without a step
        for r in range(n_images):
            if not finished[r]:
                live_rows[n_live] = r
                n_live += 1
        _step(last, live_rows[:n_live], step, 1, weights, prefix_k, prefix_v, prefix_mask, cache, log_probs)
        adjust(log_probs, prefix, step, min_length, max_length, ngram, repetition_penalty, max_run, eos)
        for r in range(n_images):
            if finished[r]:
                best = eos
            else:
                best = 0
                for v in range(1, vocab):
                    if log_probs[r, v] > log_probs[r, best]:
                        best = v
                sum_log_prob[r] += np.float64(log_probs[r, best])
                if best != eos:
                    lengths[r] += 1
            if best == eos:
                finished[r] = True
            prefix[r, step] = best
            last[r] = best
        if finished.all():
            break
    scores = np.empty(n_images)
    for r in range(n_images):
        scores[r] = sum_log_prob[r] / length_penalty(lengths[r] + 1, alpha)
    return prefix, lengths, sum_log_prob, scores


# ---------------------------------------------------------------------------------------------- the caller
def _array(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().to(device="cpu", dtype=torch.float32).numpy())


_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def step_weights(decoder: Any, caption_base: torch.Tensor) -> tuple:
    """The weights of a ``FastLightCapDecoder`` as the kernel's tuple of contiguous float32 arrays (matrices in
    torch's [out, in] layout, layers stacked); ``caption_base`` [T,H]: token type + positions of the caption slots
    (``init_state``'s, which depend on the prefix length). The rest is packed once per decoder: a caller keeps a
    decoder only for frozen weights (``LightCapCaptioner.generate(kept=...)``), and keeps its packing with it."""
    packed = _PACKED.get(decoder)
    if packed is None:
        packed = _PACKED[decoder] = _pack_weights(decoder)
    return (packed[0], _array(caption_base), *packed[1:])


def _pack_weights(decoder: Any) -> tuple:
    """``step_weights`` without ``caption_base``."""
    layers = decoder.layers

    def stack(key: str) -> np.ndarray:
        return _array(torch.stack([lay[key] for lay in layers]))

    def norms(key: str) -> np.ndarray:
        return _array(torch.stack([torch.stack([lay[key][0], lay[key][1]]) for lay in layers]))

    layer_eps = {float(lay[key][2]) for lay in layers for key in ("norm1", "norm2")}
    if len(layer_eps) != 1:
        raise ValueError(f"the compiled search needs one layer-norm eps across layers, got {sorted(layer_eps)}")
    return (
        _array(decoder.word),
        _array(torch.stack([decoder.emb_norm[0], decoder.emb_norm[1]])),
        stack("qkv_w"), stack("qkv_b"), stack("out_w"), stack("out_b"), norms("norm1"),
        stack("in_w"), stack("in_b"), stack("ffn_w"), stack("ffn_b"), norms("norm2"),
        _array(decoder.branch_w), _array(decoder.branch_b),
        _array(torch.stack([decoder.branch_gamma, decoder.branch_beta], dim=1)),  # [n,2,H]
        _array(decoder.vocab_bias),
        np.array([decoder.emb_norm[2], layer_eps.pop(), decoder.branch_eps], np.float32),
    )


def _run(options: Any, n_images: int, bos_id: int, eos_id: int, weights: tuple, prefix_k: np.ndarray,
         prefix_v: np.ndarray, prefix_mask: np.ndarray):
    """The compiled search ``options`` ask for (greedy for beam size 1) -> its raw arrays."""
    o = options
    args = (o.max_length, o.min_length, float(o.length_penalty), o.no_repeat_ngram_size, float(o.repetition_penalty),
            o.max_repeat_run, int(bos_id), int(eos_id), weights, prefix_k, prefix_v, prefix_mask)
    if o.beam_size == 1:
        return _greedy_search(n_images, *args)
    return _beam_search(n_images, o.beam_size, *args)


def warm_up(decoder: Any) -> None:
    """Compile (or load from the cache) both searches for this decoder's argument types, so that no request pays
    for it: a one-image search on a one-token dummy prefix, beam and greedy."""
    from captioning.decoding import DecodeOptions

    weights = step_weights(decoder, torch.zeros(2, decoder.hidden))
    prefix = np.zeros((len(decoder.layers), 1, decoder.heads, decoder.head_dim, 1), np.float32)
    for beam in (2, 1):
        _run(DecodeOptions(beam_size=beam, max_length=1, min_length=0), 1, 0, 1, weights, prefix, prefix,
             np.zeros((1, 1), np.float32))


def search(decoder: Any, batch: tuple, options: Any, *, bos_id: int, eos_id: int) -> list:
    """``captioning.decoding.decode(decoder, batch, options)`` for a ``FastLightCapDecoder`` on the CPU, run by
    the compiled kernels: one ``Hypothesis`` (the best) per image."""
    from captioning.decoding import Hypothesis

    state = decoder.init_state(batch)  # the prefix, once per image (torch)
    n_images = int(state["B"])
    result = _run(
        options, n_images, bos_id, eos_id, step_weights(decoder, state["caption_base"]),
        _array(torch.stack(state["prefix_k"]).transpose(-1, -2)),  # [L,B,h,d,P], pre-scaled
        _array(torch.stack(state["prefix_v"]).transpose(-1, -2)),  # [L,B,h,d,P]
        _array(state["mask"][:, 0, 0, :]),                         # [B,P]
    )
    if options.beam_size > 1:
        return [beams[0] for beams in hypotheses(result)]
    tokens, lengths, log_probs, scores = result
    return [
        Hypothesis(tokens=tokens[i, : lengths[i]].tolist(), log_prob=float(log_probs[i]), score=float(scores[i]))
        for i in range(n_images)
    ]
