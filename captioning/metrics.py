"""Evaluation metrics: captions (through pycocoevalcap), multi-label P/R/F1, class-agnostic boxes, repetition.

* ``caption_metrics(refs, hyps)`` -> ``{"BLEU-1".."BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "METEOR-note"}``.
  pycocoevalcap's scorers do the work (its ``Cider`` is CIDEr-D, reported on its own scale where 1.366 is the
  "136.6" of papers; document frequencies come from the references scored, so say which split it was).
  METEOR runs pycocoevalcap's Java scorer; without a working Java it is ``None`` and ``METEOR-note`` says why.
* ``multilabel_prf(y_true, y_score, threshold)`` and ``choose_threshold`` (maximises micro-F1 on validation).
* ``box_recall_ap(predictions, ground_truth)``: class-agnostic recall and all-point AP at IoU 0.5;
  ``per_concept_ap`` the same per concept (class) and their mean; ``count_errors``: per-concept counting error
  (MAE of the per-image count, relative to the mean true count, share counted exactly).
* ``repetition_stats(captions)``: distinct-1/2, share of captions repeating a word back to back, longest run.
"""

from __future__ import annotations

import atexit
import shutil
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from captioning.data.ucm import tokenize
from captioning.errors import DataError

CAPTION_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")


class MetricInputError(DataError, ValueError):
    """The inputs of a metric do not fit together (ids differ, shapes differ, a value of the wrong kind)."""


# ------------------------------------------------------------------------------------------ captions


def _caption_string(value: Any, what: str, key: Any) -> str:
    if isinstance(value, list | tuple):
        if len(value) != 1:
            raise MetricInputError(
                f"{what} must be one caption string (or a list holding exactly one), got a list of {len(value)}",
                record=f"id {key!r}",
            )
        value = value[0]
    if not isinstance(value, str):
        raise MetricInputError(f"{what} must be a string, got {type(value).__name__}", record=f"id {key!r}")
    return " ".join(tokenize(value))


def _check_caption_inputs(
    refs: Mapping[Any, Sequence[str]], hyps: Mapping[Any, Any]
) -> tuple[dict[Any, list[str]], dict[Any, list[str]]]:
    if not isinstance(refs, Mapping) or not isinstance(hyps, Mapping):
        raise MetricInputError("refs and hyps must be dicts keyed by image id")
    if not refs:
        raise MetricInputError("no images to score (refs is empty)")
    if refs.keys() != hyps.keys():
        missing = [k for k in refs if k not in hyps]
        extra = [k for k in hyps if k not in refs]
        raise MetricInputError(
            "refs and hyps must have the same ids: "
            f"{len(missing)} id(s) have no hypothesis (first: {missing[:3]}), "
            f"{len(extra)} hypothesis id(s) have no references (first: {extra[:3]})"
        )
    gts: dict[Any, list[str]] = {}
    res: dict[Any, list[str]] = {}
    for key in refs:
        references = refs[key]
        if isinstance(references, str) or not isinstance(references, Sequence) or not references:
            raise MetricInputError("references must be a non-empty list of strings", record=f"id {key!r}")
        gts[key] = []
        for j, ref in enumerate(references):
            if not isinstance(ref, str):
                raise MetricInputError(
                    f"reference {j} must be a string, got {type(ref).__name__}", record=f"id {key!r}"
                )
            text = " ".join(tokenize(ref))
            if not text:
                raise MetricInputError(f"reference {j} has no words: {ref!r}", record=f"id {key!r}")
            gts[key].append(text)
        res[key] = [_caption_string(hyps[key], "hypothesis", key)]  # an empty caption is allowed: it scores 0
    return gts, res


class _MeteorUnavailable(Exception):
    pass


_meteor_lock = threading.Lock()
_meteor_scorer: Any = None


def _close_meteor(scorer: Any) -> None:
    proc = scorer.meteor_p
    if scorer.lock.locked():  # a failed compute_score leaves it held, and Meteor.__del__ would then hang
        scorer.lock.release()
    try:
        proc.stdin.close()
    except OSError:
        pass
    proc.kill()
    proc.wait()


@atexit.register
def _shutdown_meteor() -> None:
    global _meteor_scorer
    if _meteor_scorer is not None:
        _close_meteor(_meteor_scorer)
        _meteor_scorer = None


def _meteor(gts: dict[Any, list[str]], res: dict[Any, list[str]], timeout: float) -> float:
    """METEOR 1.5 through pycocoevalcap (one Java process, kept for later calls)."""
    global _meteor_scorer
    if shutil.which("java") is None:
        raise _MeteorUnavailable("java was not found on PATH (METEOR needs a Java runtime)")
    from pycocoevalcap.meteor import meteor as meteor_module

    folder = Path(meteor_module.__file__).parent
    for needed in (meteor_module.METEOR_JAR, "data/paraphrase-en.gz"):
        if not (folder / needed).is_file():
            raise _MeteorUnavailable(f"pycocoevalcap's METEOR file {folder / needed} is missing")
    with _meteor_lock:
        if _meteor_scorer is None:
            try:
                _meteor_scorer = meteor_module.Meteor()
            except OSError as exc:
                raise _MeteorUnavailable(f"cannot start java for METEOR ({exc})") from None
        scorer = _meteor_scorer
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["score"] = float(scorer.compute_score(gts, res)[0])
            except Exception as exc:  # noqa: BLE001 - reported below with Java's own message
                outcome["error"] = exc

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        thread.join(timeout)
        if "score" in outcome:
            return outcome["score"]
        timed_out = thread.is_alive()
        _meteor_scorer = None  # the next call starts a fresh Java process
        _close_meteor(scorer)
        thread.join(5)
        try:
            stderr = scorer.meteor_p.stderr.read()[-400:].decode(errors="replace").strip()
        except (OSError, ValueError):
            stderr = ""
        if timed_out:
            detail = f"no answer within {timeout:g} s"
        else:
            detail = stderr or f"{type(outcome['error']).__name__}: {outcome['error']}"
        raise _MeteorUnavailable(f"the METEOR Java scorer failed: {detail}")


def caption_metrics(
    refs: Mapping[Any, Sequence[str]],
    hyps: Mapping[Any, Any],
    *,
    meteor: bool = True,
    meteor_timeout: float = 600.0,
) -> dict[str, Any]:
    """Score generated captions against references with pycocoevalcap.

    ``refs``: ``{id: [reference, ...]}``; ``hyps``: ``{id: caption}`` (a one-element list is accepted too).
    Both are passed through ``tokenize`` (lower-case, no punctuation), which leaves our tokenised captions
    unchanged. Returns the scores on pycocoevalcap's scale (0-1; CIDEr-D 0-10). ``METEOR`` is None when
    ``meteor=False`` or Java cannot run it; ``METEOR-note`` then says why (None when METEOR was computed).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = _check_caption_inputs(refs, hyps)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    out: dict[str, Any] = {f"BLEU-{n + 1}": float(bleu[n]) for n in range(4)}
    out["METEOR"], out["METEOR-note"] = None, "not requested"
    if meteor:
        try:
            out["METEOR"], out["METEOR-note"] = _meteor(gts, res, meteor_timeout), None
        except _MeteorUnavailable as exc:
            out["METEOR-note"] = str(exc)
    out["ROUGE-L"] = float(rouge)
    out["CIDEr-D"] = float(cider)
    return {key: out[key] for key in (*CAPTION_METRICS, "METEOR-note")}


# ---------------------------------------------------------------------------------------- multi-label


def _as_array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _check_multilabel(y_true: Any, y_score: Any) -> tuple[np.ndarray, np.ndarray]:
    truth, score = _as_array(y_true), _as_array(y_score)
    if truth.ndim != 2 or truth.shape != score.shape:
        raise MetricInputError(f"y_true {truth.shape} and y_score {score.shape} must both be [N, L]")
    if not np.isin(truth, (0.0, 1.0)).all():
        raise MetricInputError("y_true must hold only 0 and 1")
    if not np.isfinite(score).all():
        raise MetricInputError("y_score holds NaN or infinite values")
    return truth.astype(bool), score


def _thresholds(threshold: float | Sequence[float] | np.ndarray, n_labels: int) -> np.ndarray:
    t = _as_array(threshold)
    if t.ndim == 0:
        return np.full(n_labels, float(t))
    if t.shape != (n_labels,):
        raise MetricInputError(
            f"threshold must be a number or one per label ({n_labels}), got shape {t.shape}"
        )
    return t


def _ratio(num: np.ndarray | float, den: np.ndarray | float, zero_division: float) -> np.ndarray:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, zero_division, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def multilabel_prf(
    y_true: Any,
    y_score: Any,
    threshold: float | Sequence[float] | np.ndarray = 0.5,
    *,
    zero_division: float = 0.0,
) -> dict[str, Any]:
    """Precision, recall and F1 of multi-label predictions ``y_score >= threshold``.

    ``y_true``: ``[N, L]`` 0/1; ``y_score``: ``[N, L]`` probabilities (or 0/1 predictions); ``threshold``: a
    number or one per label. Micro: from the counts pooled over all labels. Macro: the unweighted mean over
    labels of each label's precision / recall / F1 (a ratio with a zero denominator counts as
    ``zero_division``, as in scikit-learn). ``per_label`` holds the per-label values and supports.
    """
    truth, score = _check_multilabel(y_true, y_score)
    pred = score >= _thresholds(threshold, truth.shape[1])[None, :]
    tp = (pred & truth).sum(axis=0)
    fp = (pred & ~truth).sum(axis=0)
    fn = (~pred & truth).sum(axis=0)
    precision = _ratio(tp, tp + fp, zero_division)
    recall = _ratio(tp, tp + fn, zero_division)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn, zero_division)
    TP, FP, FN = tp.sum(), fp.sum(), fn.sum()
    return {
        "precision_micro": float(_ratio(TP, TP + FP, zero_division)),
        "recall_micro": float(_ratio(TP, TP + FN, zero_division)),
        "f1_micro": float(_ratio(2 * TP, 2 * TP + FP + FN, zero_division)),
        "precision_macro": float(precision.mean()),
        "recall_macro": float(recall.mean()),
        "f1_macro": float(f1.mean()),
        "per_label": {
            "precision": precision.tolist(),
            "recall": recall.tolist(),
            "f1": f1.tolist(),
            "support": (tp + fn).astype(int).tolist(),
        },
    }


def _best_threshold(truth: np.ndarray, score: np.ndarray) -> tuple[float, float]:
    """Exact sweep over the distinct scores of the best F1 of ``score >= t`` (flattened inputs).

    Returns (threshold, F1). Any t in (next lower score, chosen score] predicts the same; we return the
    midpoint so the choice is not on a validation score itself. Ties go to the highest threshold."""
    order = np.argsort(-score, kind="stable")
    s, t = score[order], truth[order]
    positives = int(t.sum())
    cum_tp = np.cumsum(t)
    last = np.flatnonzero(np.r_[s[1:] != s[:-1], True])  # last index of each run of equal scores
    tp = cum_tp[last]
    predicted = last + 1
    f1 = 2 * tp / (predicted + positives)  # 2TP / (2TP + FP + FN), FP + TP = predicted, FN + TP = positives
    best = int(np.argmax(f1))  # first maximum = highest threshold
    value = s[last[best]]
    if best + 1 < len(last):
        value = (value + s[last[best + 1]]) / 2
    return float(value), float(f1[best])


def choose_threshold(
    y_true: Any, y_score: Any, *, per_label: bool = False, default: float = 0.5
) -> float | np.ndarray:
    """Pick the decision threshold on a validation split.

    Default: the one threshold for all labels that maximises micro-F1 (exact search over the distinct
    scores). ``per_label=True``: one threshold per label maximising that label's F1; a label without a
    positive in ``y_true`` keeps ``default``. Predictions are ``score >= threshold``.
    """
    truth, score = _check_multilabel(y_true, y_score)
    if not per_label:
        if not truth.any():
            raise MetricInputError("y_true has no positive label, so F1 cannot choose a threshold")
        return _best_threshold(truth.ravel(), score.ravel())[0]
    out = np.full(truth.shape[1], float(default))
    for j in range(truth.shape[1]):
        if truth[:, j].any():
            out[j] = _best_threshold(truth[:, j], score[:, j])[0]
    return out


# ---------------------------------------------------------------------------------------------- boxes


def _per_image(items: Any, name: str) -> tuple[list[Any], list[Any]]:
    if isinstance(items, Mapping):
        return list(items.keys()), list(items.values())
    if isinstance(items, Sequence):
        return list(range(len(items))), list(items)
    raise MetricInputError(f"{name} must be a list (one entry per image) or a dict keyed by image id")


def _boxes_tensor(boxes: Any, what: str, key: Any):
    import torch

    t = torch.as_tensor(
        np.asarray(boxes.detach().cpu() if hasattr(boxes, "detach") else boxes, dtype=np.float64)
    )
    t = t.reshape(-1, 4) if t.numel() == 0 else t
    if t.ndim != 2 or t.shape[1] != 4:
        raise MetricInputError(
            f"{what} must be [n, 4] boxes (x1, y1, x2, y2), got shape {tuple(t.shape)}",
            record=f"image {key!r}",
        )
    if not torch.isfinite(t).all() or (t[:, 2] < t[:, 0]).any() or (t[:, 3] < t[:, 1]).any():
        raise MetricInputError(f"{what} must be finite with x2 >= x1 and y2 >= y1", record=f"image {key!r}")
    return t


def box_recall_ap(
    predictions: Sequence[Any] | Mapping[Any, Any],
    ground_truth: Sequence[Any] | Mapping[Any, Any],
    *,
    iou_threshold: float = 0.5,
    max_per_image: int | None = None,
) -> dict[str, float]:
    """Class-agnostic box recall and average precision at one IoU threshold (default 0.5).

    ``predictions``: per image ``(boxes [n,4], scores [n])`` or ``{"boxes", "scores"}``; ``ground_truth``: per
    image ``boxes [m,4]`` or ``{"boxes"}``; both lists in the same image order or dicts with the same keys.
    Boxes are XYXY pixels. Matching is greedy by score: each prediction, highest score first, takes the
    unmatched ground-truth box it overlaps most (IoU from ``torchvision.ops.box_iou``) if that IoU is
    >= ``iou_threshold``, else it is a false positive. AP is the all-point interpolated area under the
    precision-recall curve (PASCAL VOC 2010+); recall counts all (at most ``max_per_image``) predictions.
    """
    import torch
    from torchvision.ops import box_iou

    pred_keys, preds = _per_image(predictions, "predictions")
    gt_keys, gts = _per_image(ground_truth, "ground_truth")
    if pred_keys != gt_keys:
        raise MetricInputError(
            f"predictions ({len(pred_keys)} images) and ground_truth ({len(gt_keys)} images) must cover the same images"
        )
    all_scores: list[np.ndarray] = []
    all_hits: list[np.ndarray] = []
    n_gt = 0
    for key, pred, gt in zip(pred_keys, preds, gts, strict=True):
        if isinstance(pred, Mapping):
            pred_boxes, pred_scores = pred.get("boxes"), pred.get("scores")
        elif isinstance(pred, Sequence) and len(pred) == 2:
            pred_boxes, pred_scores = pred
        else:
            raise MetricInputError(
                "a prediction must be (boxes, scores) or {'boxes', 'scores'}", record=f"image {key!r}"
            )
        gt_boxes = _boxes_tensor(gt["boxes"] if isinstance(gt, Mapping) else gt, "ground-truth boxes", key)
        pred_boxes = _boxes_tensor(pred_boxes, "predicted boxes", key)
        scores = _as_array(pred_scores).reshape(-1)
        if len(scores) != len(pred_boxes):
            raise MetricInputError(
                f"{len(pred_boxes)} predicted boxes but {len(scores)} scores", record=f"image {key!r}"
            )
        order = np.argsort(-scores, kind="stable")[:max_per_image]
        scores, pred_boxes = scores[order], pred_boxes[torch.as_tensor(order, dtype=torch.long)]
        hits = np.zeros(len(scores), dtype=bool)
        if len(gt_boxes) and len(pred_boxes):
            iou = box_iou(pred_boxes, gt_boxes).numpy()  # [n_pred, n_gt]
            taken = np.zeros(len(gt_boxes), dtype=bool)
            for i in range(len(pred_boxes)):
                candidates = np.where(taken, -1.0, iou[i])
                j = int(np.argmax(candidates))
                if candidates[j] >= iou_threshold:
                    taken[j] = hits[i] = True
        n_gt += len(gt_boxes)
        all_scores.append(scores)
        all_hits.append(hits)
    if n_gt == 0:
        raise MetricInputError("there are no ground-truth boxes, so recall and AP are undefined")
    scores = np.concatenate(all_scores) if all_scores else np.zeros(0)
    hits = np.concatenate(all_hits) if all_hits else np.zeros(0, dtype=bool)
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(hits[order])
    recall = tp / n_gt
    precision = tp / np.arange(1, len(tp) + 1)
    # all-point interpolation: precision envelope, summed where recall steps up
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    ap = float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))
    n_tp = int(hits.sum())
    return {
        "recall": n_tp / n_gt,
        "AP": ap,
        "precision": n_tp / len(hits) if len(hits) else 0.0,
        "true_positives": n_tp,
        "n_ground_truth": n_gt,
        "n_predictions": int(len(hits)),
        "iou_threshold": float(iou_threshold),
    }


def _labelled(item: Any, what: str, key: Any, *, scored: bool) -> tuple[Any, np.ndarray, list[Any]]:
    if not isinstance(item, Mapping) or "boxes" not in item or "labels" not in item:
        need = "{'boxes', 'scores', 'labels'}" if scored else "{'boxes', 'labels'}"
        raise MetricInputError(f"{what} must be a dict {need}", record=f"image {key!r}")
    boxes = _boxes_tensor(item["boxes"], f"{what} boxes", key)
    labels = list(item["labels"])
    scores = _as_array(item["scores"]).reshape(-1) if scored else np.zeros(len(labels))
    if not len(boxes) == len(labels) == len(scores):
        raise MetricInputError(
            f"{what}: {len(boxes)} boxes, {len(labels)} labels" + (f", {len(scores)} scores" if scored else ""),
            record=f"image {key!r}",
        )
    return boxes, scores, labels


def per_concept_ap(
    predictions: Sequence[Any] | Mapping[Any, Any],
    ground_truth: Sequence[Any] | Mapping[Any, Any],
    *,
    iou_threshold: float = 0.5,
) -> dict[str, Any]:
    """Box AP per concept (class) at one IoU threshold, and their mean.

    ``predictions``: per image ``{"boxes" [n,4], "scores" [n], "labels" [n]}``; ``ground_truth``: per image
    ``{"boxes" [m,4], "labels" [m]}`` (labels: words or ids; lists in the same image order or dicts with the same
    keys). Each concept is scored by ``box_recall_ap`` on its own boxes (a prediction only matches a ground-truth
    box of its own concept). Returns ``{"per_concept": {label: {"AP", "recall", "precision", "true_positives",
    "n_ground_truth", "n_predictions"}}, "mAP": mean AP over the concepts that have ground-truth boxes}``; a concept that is only
    predicted (no ground truth anywhere) has ``AP`` None and does not enter the mean (the COCO convention).
    """
    pred_keys, preds = _per_image(predictions, "predictions")
    gt_keys, gts = _per_image(ground_truth, "ground_truth")
    if pred_keys != gt_keys:
        raise MetricInputError(
            f"predictions ({len(pred_keys)} images) and ground_truth ({len(gt_keys)} images) must cover the same images"
        )
    pred_rows = [_labelled(p, "prediction", k, scored=True) for k, p in zip(pred_keys, preds, strict=True)]
    gt_rows = [_labelled(g, "ground truth", k, scored=False) for k, g in zip(gt_keys, gts, strict=True)]
    concepts = sorted({lab for _, _, labels in pred_rows + gt_rows for lab in labels}, key=str)
    per_concept: dict[Any, dict[str, Any]] = {}
    for concept in concepts:
        pc, gc = [], []
        for (pb, ps, pl), (gb, _, gl) in zip(pred_rows, gt_rows, strict=True):
            pm = np.array([lab == concept for lab in pl], dtype=bool)
            gm = np.array([lab == concept for lab in gl], dtype=bool)
            pc.append((pb[np.flatnonzero(pm)], ps[pm]))
            gc.append(gb[np.flatnonzero(gm)])
        n_gt = sum(len(g) for g in gc)
        n_pred = sum(len(s) for _, s in pc)
        if n_gt == 0:
            per_concept[concept] = {
                "AP": None, "recall": None, "precision": 0.0, "true_positives": 0, "n_ground_truth": 0,
                "n_predictions": n_pred,
            }
            continue
        r = box_recall_ap(pc, gc, iou_threshold=iou_threshold)
        per_concept[concept] = {
            "AP": r["AP"], "recall": r["recall"], "precision": r["precision"],
            "true_positives": r["true_positives"], "n_ground_truth": n_gt, "n_predictions": n_pred,
        }
    aps = [v["AP"] for v in per_concept.values() if v["AP"] is not None]
    if not aps:
        raise MetricInputError("there are no ground-truth boxes, so AP is undefined")
    return {"per_concept": per_concept, "mAP": float(np.mean(aps)), "iou_threshold": float(iou_threshold)}


def count_errors(
    predicted: Sequence[Mapping[Any, int]] | Mapping[Any, Mapping[Any, int]],
    truth: Sequence[Mapping[Any, int]] | Mapping[Any, Mapping[Any, int]],
) -> dict[str, Any]:
    """Counting error per concept: per image ``{concept: count}`` predicted against true (same image order/keys).

    For each concept the images that count are those where it is true or predicted (an image where it is neither
    is counted right trivially and would only dilute the figures). Per concept: ``mae`` (mean absolute error of
    the count), ``mean_true`` (mean true count), ``relative`` = ``mae / mean_true`` (= sum |error| / sum true,
    so it does not depend on which images with neither count; None without true instances), ``exact`` (share of
    images counted exactly), ``bias`` (mean predicted - true), ``images``. ``overall`` pools every (image,
    concept) pair the same way.
    """
    pred_keys, preds = _per_image(predicted, "predicted")
    true_keys, trues = _per_image(truth, "truth")
    if pred_keys != true_keys:
        raise MetricInputError(
            f"predicted ({len(pred_keys)} images) and truth ({len(true_keys)} images) must cover the same images"
        )
    pairs: dict[Any, list[tuple[int, int]]] = {}
    for key, p, t in zip(pred_keys, preds, trues, strict=True):
        if not isinstance(p, Mapping) or not isinstance(t, Mapping):
            raise MetricInputError("counts must be a dict {concept: count} per image", record=f"image {key!r}")
        for concept in set(p) | set(t):
            n_pred, n_true = p.get(concept, 0), t.get(concept, 0)
            if any(isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0 for n in (n_pred, n_true)):
                raise MetricInputError(
                    f"count of {concept!r} must be a whole number >= 0, got {n_pred!r} / {n_true!r}",
                    record=f"image {key!r}",
                )
            if n_pred or n_true:
                pairs.setdefault(concept, []).append((int(n_pred), int(n_true)))

    def summary(rows: list[tuple[int, int]]) -> dict[str, Any]:
        arr = np.asarray(rows, dtype=np.float64).reshape(-1, 2)
        err = arr[:, 0] - arr[:, 1]
        mae, mean_true = float(np.abs(err).mean()), float(arr[:, 1].mean())
        return {
            "images": len(rows),
            "mae": mae,
            "mean_true": mean_true,
            "relative": mae / mean_true if mean_true > 0 else None,
            "exact": float((err == 0).mean()),
            "bias": float(err.mean()),
        }

    if not pairs:
        raise MetricInputError("nothing to count: no concept is true or predicted in any image")
    per_concept = {c: summary(rows) for c, rows in sorted(pairs.items(), key=lambda kv: str(kv[0]))}
    return {"per_concept": per_concept, "overall": summary([r for rows in pairs.values() for r in rows])}


# ----------------------------------------------------------------------------------------- repetition


def repetition_stats(captions: Sequence[str] | Sequence[Sequence[str]]) -> dict[str, float]:
    """Repetition in generated captions (strings are tokenised; token lists are used as given).

    ``distinct-1`` / ``distinct-2``: distinct unigrams / bigrams over all captions divided by their total
    count; ``consecutive_repeat``: share of captions with a word repeated back to back ("the the");
    ``longest_run``: the longest run of one word in any caption; ``mean_longest_run``: its mean per caption.
    """
    if isinstance(captions, str) or not len(captions):
        raise MetricInputError("captions must be a non-empty list of captions")
    token_lists = [tokenize(c) if isinstance(c, str) else list(c) for c in captions]
    unigrams = [tok for toks in token_lists for tok in toks]
    bigrams = [pair for toks in token_lists for pair in zip(toks, toks[1:], strict=False)]
    runs = []
    for toks in token_lists:
        longest = current = min(len(toks), 1)
        for a, b in zip(toks, toks[1:], strict=False):
            current = current + 1 if a == b else 1
            longest = max(longest, current)
        runs.append(longest)
    return {
        "distinct-1": len(set(unigrams)) / len(unigrams) if unigrams else 0.0,
        "distinct-2": len(set(bigrams)) / len(bigrams) if bigrams else 0.0,
        "consecutive_repeat": float(np.mean([r > 1 for r in runs])),
        "longest_run": int(max(runs)),
        "mean_longest_run": float(np.mean(runs)),
    }
