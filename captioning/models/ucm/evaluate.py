"""Evaluation of the UCM stages, on top of ``captioning.metrics`` (pycocoevalcap, multi-label P/R/F1).

* ``reconstruction_scores``: text autoencoder, greedy decoding from each caption's own code, BLEU vs it;
* ``label_scores`` / ``choose_threshold``: the classifier;
* ``code_retrieval``: distillation, image -> caption retrieval by code distance;
* ``evaluate_captions``: the captioner (metrics, repeat statistics) and, given the training split, the
  nearest-neighbour baseline: each test image gets the consensus caption of the training image whose image
  code is closest (cosine) -- the caption among that image's references that agrees most with the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from captioning import metrics as M
from captioning.data.vocab import BOS_ID, EOS_ID, Vocabulary
from captioning.decoding import DecodeOptions, decode, repeat_run_length
from captioning.models.ucm.data import CaptionSplit, caption_batch, normalize


# ----------------------------------------------------------------------------------------- text autoencoder
@torch.no_grad()
def reconstruct(
    model: torch.nn.Module, captions: Sequence[torch.Tensor], device: torch.device, max_length: int, batch_size: int = 256
) -> list[list[int]]:
    """Each caption (<bos> .. <eos> ids) encoded to its code and greedily decoded back to word ids."""
    model.eval()
    out: list[list[int]] = []
    options = DecodeOptions(max_length=max_length, min_length=1)
    for start in range(0, len(captions), batch_size):
        batch = caption_batch(list(captions[start : start + batch_size])).to(device)
        codes = model.encoder(batch.enc_tokens, batch.enc_lengths)
        out.extend(h.tokens for h in decode(model.decoder, codes, options, bos_id=BOS_ID, eos_id=EOS_ID))
    return out


def reconstruction_metrics(
    model: torch.nn.Module,
    vocab: Vocabulary,
    captions: Sequence[torch.Tensor],
    references: Sequence[str],
    device: torch.device,
    max_length: int,
) -> dict[str, float]:
    """BLEU-1..4 and exact match of the reconstructions against ``references`` (each caption's own text
    as tokenised from the data, so words outside the vocabulary count as errors)."""
    decoded = reconstruct(model, captions, device, max_length)
    hyps = {i: " ".join(vocab.decode(ids)) or "<empty>" for i, ids in enumerate(decoded)}
    refs = {i: [ref] for i, ref in enumerate(references)}
    scores = M.caption_metrics(refs, hyps, meteor=False)
    out: dict[str, float] = {f"bleu{n}": scores[f"BLEU-{n}"] for n in range(1, 5)}
    out["exact_match"] = sum(hyps[i] == references[i] for i in hyps) / max(len(hyps), 1)
    out["captions"] = len(hyps)
    return out


# ------------------------------------------------------------------------------------------ classifier
def label_scores(probs: Any, labels: Any, threshold: float) -> dict[str, float]:
    m = M.multilabel_prf(labels, probs, threshold)
    return {
        "micro_f1": m["f1_micro"],
        "micro_precision": m["precision_micro"],
        "micro_recall": m["recall_micro"],
        "macro_f1": m["f1_macro"],
        "macro_precision": m["precision_macro"],
        "macro_recall": m["recall_macro"],
    }


def choose_threshold(probs: Any, labels: Any) -> float:
    """The one threshold (all labels) with the best micro-F1 on these (validation) predictions."""
    return float(M.choose_threshold(labels, probs))


# -------------------------------------------------------------------------------------------- distill
def code_distance(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """[N, D] x [M, D] -> [N, M] distances in the distillation loss's geometry."""
    if kind == "cosine":
        return 1.0 - torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T
    return torch.cdist(a, b) ** 2 / a.shape[1]


def code_retrieval(image_codes: torch.Tensor, text_codes: torch.Tensor, owner: torch.Tensor, kind: str) -> dict[str, float]:
    """Image -> caption retrieval: is one of the image's own captions among the k nearest text codes?"""
    distance = code_distance(image_codes, text_codes, kind)  # [N, M]
    ranked = distance.argsort(dim=1)
    own = owner[ranked] == torch.arange(len(image_codes))[:, None]  # [N, M] hit at each rank
    out = {}
    for k in (1, 5):
        out[f"retrieval_r@{k}"] = float(own[:, :k].any(dim=1).float().mean())
    return out


# -------------------------------------------------------------------------------------------- captioner
@torch.no_grad()
def generate(
    model: torch.nn.Module, images: torch.Tensor, options: DecodeOptions, device: torch.device, batch_size: int = 64
) -> list[list[int]]:
    """uint8 images [N, 3, S, S] -> generated token ids per image (a ``decoding.StepModel`` captioner)."""
    model.eval()
    out: list[list[int]] = []
    for start in range(0, len(images), batch_size):
        batch = normalize(images[start : start + batch_size]).to(device)
        out.extend(h.tokens for h in decode(model, batch, options, bos_id=BOS_ID, eos_id=EOS_ID))
    return out


def caption_report(hyps: Sequence[str], references: Sequence[Sequence[str]], meteor: bool = True) -> dict[str, Any]:
    """Caption metrics + repeat statistics of ``hyps`` (tokenised strings) against their references."""
    refs = {i: list(r) for i, r in enumerate(references)}
    scored = {i: h if h else "<empty>" for i, h in enumerate(hyps)}
    out: dict[str, Any] = dict(M.caption_metrics(refs, scored, meteor=meteor))
    if out.get("METEOR-note") is None:
        out.pop("METEOR-note", None)
    out.update(repeat_report([h.split() for h in hyps]))
    return out


def repeat_report(token_lists: Sequence[Sequence[str]]) -> dict[str, Any]:
    """distinct-n, back-to-back repeats, and the share of captions with a word three times in a row."""
    stats = M.repetition_stats([list(t) for t in token_lists])
    stats["triple_repeat"] = sum(repeat_run_length(list(t)) >= 3 for t in token_lists) / max(len(token_lists), 1)
    stats["mean_length"] = sum(len(t) for t in token_lists) / max(len(token_lists), 1)
    return stats


@torch.no_grad()
def image_codes(encoder: torch.nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 64) -> torch.Tensor:
    encoder.eval()
    return torch.cat(
        [encoder(normalize(images[i : i + batch_size]).to(device))[0].cpu() for i in range(0, len(images), batch_size)]
    )


def consensus_caption(references: Sequence[str]) -> str:
    """The reference that agrees most with the others (mean word-overlap F1); the first on ties."""
    if len(references) == 1:
        return references[0]
    bags = [r.split() for r in references]

    def overlap(a: list[str], b: list[str]) -> float:
        common = sum(min(a.count(w), b.count(w)) for w in set(a))
        return 2 * common / max(len(a) + len(b), 1)

    scores = [sum(overlap(bags[i], bags[j]) for j in range(len(bags)) if j != i) for i in range(len(bags))]
    return references[max(range(len(bags)), key=lambda i: (scores[i], -i))]


def nearest_neighbour_captions(
    encoder: torch.nn.Module, train: CaptionSplit, test: CaptionSplit, device: torch.device
) -> list[str]:
    """For each test image, the consensus caption of the training image with the closest image code."""
    train_codes = torch.nn.functional.normalize(image_codes(encoder, train.images, device), dim=1)
    test_codes = torch.nn.functional.normalize(image_codes(encoder, test.images, device), dim=1)
    nearest = (test_codes @ train_codes.T).argmax(dim=1).tolist()
    return [consensus_caption(train.references[j]) for j in nearest]


def evaluate_captions(
    model: torch.nn.Module,
    vocab: Vocabulary,
    split: CaptionSplit,
    options: DecodeOptions,
    device: torch.device,
    *,
    train: CaptionSplit | None = None,
    meteor: bool = True,
    examples: int = 5,
) -> dict[str, Any]:
    """Metrics of ``model``'s captions on ``split`` (+ ``nn_*`` baseline metrics when ``train`` is given)."""
    hyps = [" ".join(vocab.decode(ids)) for ids in generate(model, split.images, options, device)]
    out = caption_report(hyps, split.references, meteor=meteor)
    out["images"] = len(hyps)
    out["examples"] = [
        {"imgid": split.imgids[i], "caption": hyps[i], "reference": split.references[i][0]}
        for i in range(min(examples, len(hyps)))
    ]
    if train is not None:
        baseline = nearest_neighbour_captions(model.encoder, train, split, device)
        nn_report = caption_report(baseline, split.references, meteor=meteor)
        out.update({f"nn_{k}": v for k, v in nn_report.items() if k in M.CAPTION_METRICS})
    return out
