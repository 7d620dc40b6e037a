"""``captioner eval concepts``: the concept extractor on a dataset split.

Figures (all at IoU 0.5, boxes compared in the extractor's ``image_size`` pixels):

* ``box_ap@0.5``: class-agnostic AP of the detector's proposals (confidence >= 0.001, the usual AP protocol);
* ``box_recall@0.5`` / ``box_precision@0.5``: of the proposals the extractor actually uses (``proposal_conf``);
* ``gt_box_concept_accuracy``: each ground-truth box classified by the aligner (is the most similar concept the
  box's own word?), which isolates the alignment from the detector;
* ``concept_precision / recall / f1`` (micro over images): the image's extracted concepts (top K, de-duplicated,
  above ``min_score``) against the set of its true concept words (the words of its boxes);
* ``label_f1`` (+ precision / recall, micro): the same with concepts mapped onto the 17 remote-sensing labels,
  against the labels of the image's boxes; ``label_f1_vs_multilabels``: against its ``multilabels.txt`` row
  (which also has the surface labels (grass, pavement, water ...) that boxes never cover, so it is lower).

Instances (every object, ``ConceptExtractor.extract``; per concept word, against ``boxes.json``):

* ``instance_map@0.5``: mean over the words with true boxes of the per-word AP of the instances (NMS per word,
  no score floor: the whole curve down to ``proposal_conf``); ``instance_recall@0.5`` / ``instance_precision@0.5``
  of the instances as served (with ``instance_min_score`` / ``instance_conf``);
* counting, with the served instances: ``count_mae`` (mean absolute error of a picture's count of a word, over
  the (picture, word) pairs where the word is true or predicted), ``count_mean_true`` (mean true count over
  the same pairs), ``count_relative_error`` = their ratio (sum |error| / sum true count), ``count_exact`` (share
  of those pairs counted exactly); ``per_concept`` holds the same per word with its AP.

``--tune-instances`` (use it on val) searches the instance settings for the lowest relative counting error, on
the proposals cached once (minutes on 2 cores): each word's box size range from the dataset's train split
(``instance_sizes``, kept when it lowers the error), one setting for every word (NMS IoU, instance min score,
instance objectness floor: ``choose_instance_settings``), then per word (``choose_word_settings``) its own IoU and
floors, then its own merge of boxes that cover each other (intersection over the smaller box); a word keeps its
own setting only where it lowers that word's error on both halves of the split (even and odd pictures), so a
rare word's lucky setting does not stay. It prints the settings as ``extract.instance_concepts`` wants them.
``--instance-iou``, ``--instance-min-score``, ``--instance-conf`` and ``--instance-merge-ios`` evaluate other
settings for every word than the model's (``--no-instance-concepts`` drops its per-word settings,
``--no-instance-sizes`` its size ranges).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from captioning.data import LABELS, load_dataset
from captioning.errors import DataError, UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="dataset folder (UCM layout with boxes.json)")
    parser.add_argument("--split", default="test", help="split to evaluate (default test)")
    parser.add_argument("--model", default="concepts", help="store spec (default concepts = its production alias)")
    parser.add_argument("--store", type=Path, default=None, help="model store root (default: settings)")
    parser.add_argument("--top-k", type=int, default=None, help="concepts per image (default: the model's, 20)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--draw", type=Path, default=None, help="write the first images, annotated, to this PNG")
    parser.add_argument("--draw-count", type=int, default=4, help="how many images --draw shows (default 4)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--instance-iou", type=float, default=None, help="per-concept NMS IoU (default: the model's)")
    parser.add_argument("--instance-min-score", type=float, default=None,
                        help="score floor of an instance (default: the model's)")
    parser.add_argument("--instance-conf", type=float, default=None,
                        help="objectness floor of an instance (default: the model's; below proposal_conf is moot)")
    parser.add_argument("--instance-merge-ios", type=float, default=None,
                        help="merge a word's boxes whose intersection over the smaller box is above this")
    parser.add_argument("--no-instance-concepts", action="store_true",
                        help="ignore the model's per-word instance settings (every word: the global ones)")
    parser.add_argument("--no-instance-sizes", action="store_true",
                        help="ignore the model's per-word box size ranges")
    parser.add_argument("--tune-instances", action="store_true",
                        help="search the instance settings for the lowest counting error on this split (use val)")


def run(args: argparse.Namespace) -> int:
    from captioning.inference import load_model
    from captioning.store import ModelStore

    if args.threads:
        torch.set_num_threads(int(args.threads))
    corpus = load_dataset(args.data)
    if not corpus.split(args.split):
        raise UsageError(f"{corpus.root}: no images in split {args.split!r}")
    store = ModelStore(args.store)
    extractor = load_model(store, args.model)
    if getattr(extractor, "vocab", None) is None:
        raise UsageError(f"{args.model}: not a concept extractor (task {extractor.manifest.get('task')!r})")
    # the loaded runtime is shared (captioning.sharing): the settings below, and evaluate_extractor's own, change a copy
    extractor = copy.copy(extractor)
    for attr, value in (("instance_iou", args.instance_iou), ("instance_min_score", args.instance_min_score),
                        ("instance_conf", args.instance_conf), ("instance_merge_ios", args.instance_merge_ios)):
        if value is not None:
            setattr(extractor, attr, float(value))
    if args.no_instance_concepts:
        extractor.instance_concepts = {}
    if args.no_instance_sizes:
        extractor.instance_sizes = {}
    result = evaluate_extractor(
        extractor, corpus, args.split, top_k=args.top_k, batch_size=args.batch_size, tune=args.tune_instances
    )
    figures = {"model": f"{extractor.name}@{extractor.version}", "data": str(corpus.root), "split": args.split, **result}
    if args.draw:
        draw_examples(extractor, corpus, args.split, args.draw, args.draw_count)
        figures["drawing"] = str(args.draw)
    if args.json:
        print(json.dumps(figures, indent=1))
    else:
        for key, value in figures.items():
            if key == "per_concept":
                print(f"{'word':14s} {'AP@0.5':>7s} {'true':>5s} {'found':>5s} {'MAE':>6s} {'mean':>6s} {'rel':>6s} "
                      f"{'exact':>6s}")
                for word, row in value.items():
                    print(f"{word:14s} {_fmt(row['ap@0.5']):>7s} {row['true_boxes']:5d} {row['instances']:5d} "
                          f"{_fmt(row['count_mae']):>6s} {_fmt(row['count_mean_true']):>6s} "
                          f"{_fmt(row['count_relative_error']):>6s} {_fmt(row['count_exact']):>6s}")
            elif key == "tuning":
                for row in value["global"]:
                    print(f"tuning global {row}")
                for name in ("count_relative_error_without_sizes", "count_relative_error_with_sizes",
                             "count_relative_error_global", "count_relative_error_per_word"):
                    if name in value:
                        print(f"tuning {name:36s} {value[name]}")
                print(f"tuning instance_sizes (extract.instance_sizes): {value.get('instance_sizes')}")
                print("tuning instance_concepts (extract.instance_concepts):")
                for word, settings in value["instance_concepts"].items():
                    print(f"  {word}: {settings}")
            else:
                print(f"{key:32s} {value}")
    return 0


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_extractor(
    extractor,
    corpus,
    split: str,
    *,
    top_k: int | None = None,
    batch_size: int = 32,
    candidates: bool = False,
    tune: bool = False,
) -> dict[str, Any]:
    """The figures above for one split. ``candidates=True`` also returns, per image, every de-duplicated concept
    with its score regardless of ``min_score`` (for choosing ``min_score`` on val); ``tune=True`` adds
    ``tuning``: the best instance settings on this split (``choose_instance_settings``)."""
    from captioning.metrics import box_recall_ap, multilabel_prf
    from captioning.models.lightcap.concepts_data import box_split

    if corpus.boxes is None:
        raise DataError("the dataset has no boxes.json: concepts are evaluated against its boxes", path=corpus.root)
    data = box_split(corpus, split, extractor.image_size)
    vocab = extractor.vocab
    unknown = sorted({c for concepts in data.concepts for c in concepts} - set(vocab.words))
    if unknown:
        raise DataError(f"box concepts not in the model's vocabulary: {unknown[:10]}", path=corpus.root)

    low_conf, predicted, gt_hits, gt_total = [], [], 0, 0
    cand: list[list[tuple[int, float]]] = []
    raw: list[tuple[torch.Tensor, ...]] = []  # per image its classified proposals (for the instance figures)
    min_score = extractor.min_score
    for start in range(0, len(data), batch_size):
        images = data.images[start : start + batch_size].float() / 255.0
        grid = extractor.grid(images)
        low_conf.extend(extractor.detector(images, conf=0.001, max_det=max(100, extractor.max_proposals)))
        gt_boxes = data.boxes[start : start + batch_size]
        ids, _ = extractor.classify_boxes(images, gt_boxes, grid=grid)
        for row_ids, words in zip(ids, data.concepts[start : start + batch_size], strict=True):
            gt_hits += sum(int(vocab.words[int(i)] == w) for i, w in zip(row_ids, words, strict=True))
            gt_total += len(words)
        raw.extend(extractor.classified_proposals(images, grid))
        if candidates:
            extractor.min_score = 0.0
        concept_ids, scores, boxes = extractor.extract_tensors(images, top_k, grid=grid)
        extractor.min_score = min_score
        for row_ids, row_scores, row_boxes in zip(concept_ids, scores, boxes, strict=True):
            keep = row_ids >= 0
            cand.append([(int(c), float(s)) for c, s in zip(row_ids[keep], row_scores[keep], strict=True)])
            above = keep & (row_scores >= min_score)
            predicted.append((row_ids[above], row_scores[above], row_boxes[above]))

    # boxes: AP over the full curve, recall/precision of the proposals the extractor uses
    curve = box_recall_ap(low_conf, data.boxes, iou_threshold=0.5)
    used = []
    for boxes, scores in low_conf:
        keep = scores >= extractor.proposal_conf
        used.append((boxes[keep][: extractor.max_proposals], scores[keep][: extractor.max_proposals]))
    operating = box_recall_ap(used, data.boxes, iou_threshold=0.5)

    # concepts: per-image sets as indicator rows over the vocabulary
    n, v = len(data), len(vocab)
    true_concepts = np.zeros((n, v), dtype=np.float32)
    pred_concepts = np.zeros((n, v), dtype=np.float32)
    for i, (words, (ids, _, _)) in enumerate(zip(data.concepts, predicted, strict=True)):
        true_concepts[i, [vocab.index[w] for w in words]] = 1
        pred_concepts[i, ids.tolist()] = 1
    concept_scores = multilabel_prf(true_concepts, pred_concepts, 0.5)

    # labels: concepts mapped onto the 17
    label_index = {label: j for j, label in enumerate(LABELS)}
    concept_label = np.full(v, -1)
    for j, label in enumerate(vocab.labels):
        if label in label_index:
            concept_label[j] = label_index[label]
    pred_labels = np.zeros((n, len(LABELS)), dtype=np.float32)
    true_labels = np.zeros((n, len(LABELS)), dtype=np.float32)
    for i in range(n):
        mapped = concept_label[pred_concepts[i] > 0]
        pred_labels[i, mapped[mapped >= 0]] = 1
        for label in data.labels[i]:
            if label in label_index:
                true_labels[i, label_index[label]] = 1
    label_scores = multilabel_prf(true_labels, pred_labels, 0.5)

    figures: dict[str, Any] = {
        "images": n,
        "boxes": int(curve["n_ground_truth"]),
        "box_ap@0.5": round(curve["AP"], 4),
        "box_recall@0.5": round(operating["recall"], 4),
        "box_precision@0.5": round(operating["precision"], 4),
        "proposals_per_image": round(operating["n_predictions"] / max(1, n), 2),
        "gt_box_concept_accuracy": round(gt_hits / max(1, gt_total), 4),
        "concept_precision": round(concept_scores["precision_micro"], 4),
        "concept_recall": round(concept_scores["recall_micro"], 4),
        "concept_f1": round(concept_scores["f1_micro"], 4),
        "concepts_per_image": round(float(pred_concepts.sum() / max(1, n)), 2),
        "true_concepts_per_image": round(float(true_concepts.sum() / max(1, n)), 2),
        "label_precision": round(label_scores["precision_micro"], 4),
        "label_recall": round(label_scores["recall_micro"], 4),
        "label_f1": round(label_scores["f1_micro"], 4),
    }
    if corpus.labels is not None:
        rows = [corpus.index_of(rec.imgid) for rec in data.records]
        figures["label_f1_vs_multilabels"] = round(multilabel_prf(corpus.labels[rows], pred_labels, 0.5)["f1_micro"], 4)
    figures["top_k"] = int(top_k or extractor.top_k)
    figures["min_score"] = float(extractor.min_score)
    figures.update(instance_figures(raw, data.boxes, data.concepts, vocab.words, **extractor.instance_thresholds()))
    figures["instance_settings"] = {
        "iou": extractor.instance_iou, "min_score": extractor.instance_min_score,
        "min_objectness": extractor.instance_conf, "merge_ios": extractor.instance_merge_ios,
        "instance_concepts": extractor.instance_concepts, "instance_sizes": extractor.instance_sizes,
    }
    if tune:
        figures["tuning"] = tune_instances(raw, data.boxes, data.concepts, vocab.words,
                                           instance_sizes(corpus, extractor.image_size, vocab.words))
    if candidates:
        figures["_candidates"] = cand
        figures["_true_concepts"] = true_concepts
    return figures


def choose_min_score(candidates: list[list[tuple[int, float]]], true_concepts: np.ndarray) -> tuple[float, float]:
    """The score threshold (on a 0.01 grid) with the best concept micro-F1 -> (threshold, F1)."""
    best = (0.0, -1.0)
    total_true = float(true_concepts.sum())
    for threshold in np.round(np.arange(0.0, 1.0, 0.01), 2):
        tp = fp = 0
        for i, row in enumerate(candidates):
            for c, s in row:
                if s >= threshold:
                    if true_concepts[i, c] > 0:
                        tp += 1
                    else:
                        fp += 1
        f1 = 2 * tp / max(1.0, 2 * tp + fp + (total_true - tp))
        if f1 > best[1] + 1e-9:
            best = (float(threshold), f1)
    return best


# ---------------------------------------------------------------------------------------------- instances
Setting = float | torch.Tensor | None  # one value for every word, or a [V] tensor per concept id


def _instances(raw, iou: Setting, min_score: Setting, min_objectness: Setting, merge_ios: Setting = None,
               sizes: torch.Tensor | None = None):
    from captioning.models.lightcap.concepts import select_instances

    return [
        select_instances(*row, iou=iou, min_score=min_score, min_objectness=min_objectness, merge_ios=merge_ios,
                         sizes=sizes)
        for row in raw
    ]


def _count_words(ids: list[int] | list[str], words: list[str] | None = None) -> dict[str, int]:
    tally: dict[str, int] = {}
    for i in ids:
        word = words[i] if words is not None else i
        tally[word] = tally.get(word, 0) + 1
    return tally


def instance_figures(
    raw,
    true_boxes,
    true_words,
    words: list[str],
    *,
    iou: Setting,
    min_score: Setting,
    min_objectness: Setting,
    merge_ios: Setting = None,
    sizes: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Instance AP per word and counting error of one setting (each one value, or a ``[V]`` tensor per concept
    id; ``sizes`` ``[V, 2]``), from the cached ``classified_proposals``. The AP curve is the served instances
    without the floors."""
    from captioning.metrics import count_errors, per_concept_ap

    truth = [{"boxes": b, "labels": list(w)} for b, w in zip(true_boxes, true_words, strict=True)]
    curve = _instances(raw, iou, -float("inf"), -float("inf"), merge_ios, sizes)
    served = _instances(raw, iou, min_score, min_objectness, merge_ios, sizes)
    ap = per_concept_ap(
        [{"boxes": b, "scores": s, "labels": [words[i] for i in ids.tolist()]} for ids, s, b in curve], truth
    )
    operating = per_concept_ap(
        [{"boxes": b, "scores": s, "labels": [words[i] for i in ids.tolist()]} for ids, s, b in served], truth
    )
    tp = sum(v["true_positives"] for v in operating["per_concept"].values())
    n_true = sum(v["n_ground_truth"] for v in operating["per_concept"].values())
    n_served = sum(len(ids) for ids, _, _ in served)
    counted = count_errors(
        [_count_words(ids.tolist(), words) for ids, _, _ in served], [_count_words(w) for w in true_words]
    )
    per_concept: dict[str, Any] = {}
    for word in sorted(set(ap["per_concept"]) | set(counted["per_concept"])):
        a = ap["per_concept"].get(word, {})
        c = counted["per_concept"].get(word)
        served_n = int(operating["per_concept"].get(word, {}).get("n_predictions", 0))
        if not a.get("n_ground_truth") and not served_n:
            continue  # only below the floors, never true: nothing to report
        per_concept[word] = {
            "ap@0.5": None if a.get("AP") is None else round(a["AP"], 4),
            "true_boxes": int(a.get("n_ground_truth", 0)),
            "instances": served_n,
            "count_mae": None if c is None else round(c["mae"], 4),
            "count_mean_true": None if c is None else round(c["mean_true"], 4),
            "count_relative_error": None if c is None or c["relative"] is None else round(c["relative"], 4),
            "count_exact": None if c is None else round(c["exact"], 4),
            "count_pictures": 0 if c is None else c["images"],
        }
    overall = counted["overall"]
    return {
        "instance_map@0.5": round(ap["mAP"], 4),
        "instance_recall@0.5": round(tp / max(1, n_true), 4),
        "instance_precision@0.5": round(tp / max(1, n_served), 4),
        "instances_per_image": round(n_served / max(1, len(served)), 2),
        "true_instances_per_image": round(n_true / max(1, len(served)), 2),
        "count_mae": round(overall["mae"], 4),
        "count_mean_true": round(overall["mean_true"], 4),
        "count_relative_error": round(overall["relative"], 4) if overall["relative"] is not None else None,
        "count_exact": round(overall["exact"], 4),
        "per_concept": per_concept,
    }


INSTANCE_GRID = {
    "iou": (0.3, 0.4, 0.5, 0.6, 0.7),
    "min_score": tuple(round(0.1 + 0.02 * i, 2) for i in range(16)),  # 0.10 .. 0.40
    "min_objectness": tuple(round(0.15 + 0.05 * i, 2) for i in range(8)),  # 0.15 .. 0.50
}
MERGE_GRID = (0.3, 0.5, 0.7)  # intersection over the smaller box above which a word's boxes merge


SIZE_MARGIN = 0.1  # instance_sizes: the smallest / largest true box of a word, widened by this fraction


def instance_sizes(corpus, image_size: int, words: list[str], split: str = "train",
                   margin: float = SIZE_MARGIN) -> dict[str, list[float]]:
    """Each word's plausible box size from a split's ``boxes.json`` (default the train split, what the models
    learnt from): ``[min * (1 - margin), max * (1 + margin)]`` of the longer box side, in ``image_size`` pixels,
    as ``extract.instance_sizes`` wants it. Words without boxes there get none (no limit)."""
    from captioning.models.lightcap.concepts_data import box_split

    if not corpus.split(split):
        return {}
    data = box_split(corpus, split, None)
    sides: dict[str, list[float]] = {}
    for boxes, concepts, (width, height) in zip(data.boxes, data.concepts, data.original_sizes, strict=True):
        if not len(boxes):
            continue
        scale = torch.tensor([image_size / width, image_size / height] * 2)
        long_side = ((boxes * scale)[:, 2:] - (boxes * scale)[:, :2]).max(dim=1).values
        for word, side in zip(concepts, long_side.tolist(), strict=True):
            if word in words:
                sides.setdefault(word, []).append(side)
    return {w: [round(min(v) * (1 - margin), 1), round(max(v) * (1 + margin), 1)] for w, v in sorted(sides.items())}


def tune_instances(raw, true_boxes, true_words, words: list[str], sizes: dict[str, list[float]]) -> dict[str, Any]:
    """``--tune-instances``: the global settings (``choose_instance_settings``), with and without the words' size
    ranges ``sizes`` (kept when they lower the error), then each word's own (``choose_word_settings``)."""
    from captioning.models.lightcap.concepts import fit_sizes

    top = choose_instance_settings(raw, true_boxes, true_words, words)
    out: dict[str, Any] = {"count_relative_error_without_sizes": top[0]["count_relative_error"]}
    if sizes:
        limits = torch.tensor([[0.0, float("inf")]] * len(words))
        for word, (low, high) in sizes.items():
            limits[words.index(word)] = torch.tensor([low, float("inf") if high is None else high])
        sized = [fit_sizes(*row, limits) for row in raw]
        top_sized = choose_instance_settings(sized, true_boxes, true_words, words)
        out["count_relative_error_with_sizes"] = top_sized[0]["count_relative_error"]
        if top_sized[0]["count_relative_error"] < top[0]["count_relative_error"]:
            raw, top = sized, top_sized
            out["instance_sizes"] = sizes
    best = {k: top[0][k] for k in ("iou", "min_score", "min_objectness")}
    return {"global": top, **out, **choose_word_settings(raw, true_words, words, best)}


class _CountTable:
    """The cached proposals after NMS per word at one IoU, flattened over the pictures, so that the count of every
    (picture, word) under any score / objectness floors is one masked ``bincount``."""

    def __init__(self, raw, iou: Setting, n_words: int):
        from captioning.models.lightcap.concepts import nms_per_concept

        picture, ids, scores, objectness = [], [], [], []
        for i, (cid, score, boxes, obj) in enumerate(raw):
            keep = nms_per_concept(cid, boxes, iou)
            picture.append(torch.full((len(keep),), i, dtype=torch.long))
            ids.append(cid[keep])
            scores.append(score[keep].float())
            objectness.append(obj[keep].float())
        self.n_pictures, self.n_words = len(raw), n_words
        self.cell = torch.cat(picture) * n_words + torch.cat(ids) if raw else torch.zeros(0, dtype=torch.long)
        self.ids = torch.cat(ids) if raw else torch.zeros(0, dtype=torch.long)
        self.scores = torch.cat(scores) if raw else torch.zeros(0)
        self.objectness = torch.cat(objectness) if raw else torch.zeros(0)

    def counts(self, min_score: Setting, min_objectness: Setting) -> torch.Tensor:
        """``[pictures, words]`` instance counts under these floors (one value or ``[V]`` per concept id)."""
        ms = min_score.float()[self.ids] if isinstance(min_score, torch.Tensor) else float(min_score)
        mo = min_objectness.float()[self.ids] if isinstance(min_objectness, torch.Tensor) else float(min_objectness)
        kept = (self.scores >= ms) & (self.objectness >= mo)
        size = self.n_pictures * self.n_words
        return torch.bincount(self.cell[kept], minlength=size).reshape(self.n_pictures, self.n_words)


def _true_counts(true_words, words: list[str]) -> torch.Tensor:
    index = {w: j for j, w in enumerate(words)}
    table = torch.zeros(len(true_words), len(words), dtype=torch.long)
    for i, row in enumerate(true_words):
        for word in row:
            table[i, index[word]] += 1
    return table


def _overall(counts: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """(relative counting error, share counted exactly) over the (picture, word) pairs true or found, as
    ``captioning.metrics.count_errors`` pools them."""
    error = (counts - truth).abs()
    pairs = (counts > 0) | (truth > 0)
    return float(error.sum()) / max(1, int(truth.sum())), float(((error == 0) & pairs).sum()) / max(1, int(pairs.sum()))


def choose_instance_settings(raw, true_boxes, true_words, words: list[str], grid: dict | None = None) -> list[dict]:
    """Every setting of ``grid`` (default ``INSTANCE_GRID``), one for every word, by its overall relative counting
    error, best first (ties: the higher share counted exactly); the five best as ``{"iou", "min_score",
    "min_objectness", "count_relative_error", "count_exact"}``. Counted on the cached proposals with one NMS per
    IoU and a masked bincount per floor pair."""
    grid = grid or INSTANCE_GRID
    truth = _true_counts(true_words, words)
    rows = []
    for iou in grid["iou"]:
        table = _CountTable(raw, iou, len(words))
        for min_score in grid["min_score"]:
            for min_objectness in grid["min_objectness"]:
                relative, exact = _overall(table.counts(min_score, min_objectness), truth)
                rows.append({"iou": iou, "min_score": min_score, "min_objectness": min_objectness,
                             "count_relative_error": round(relative, 4), "count_exact": round(exact, 4)})
    rows.sort(key=lambda r: (r["count_relative_error"], -r["count_exact"]))
    return rows[:5]


def choose_word_settings(
    raw, true_words, words: list[str], base: dict[str, float], grid: dict | None = None,
    merge_grid: tuple[float, ...] = MERGE_GRID,
) -> dict[str, Any]:
    """Per word its own instance settings on top of ``base`` (``{"iou", "min_score", "min_objectness"}`` for every
    word). A word's count depends only on its own proposals and settings, so each word is chosen on its own:

    1. its IoU and floors from ``grid`` with the lowest sum of absolute count errors of that word;
    2. then, with those, a merge of its boxes (``merge_grid`` IOS thresholds) where that lowers its error.

    A word keeps a setting of its own only where it lowers the word's error below the base's on both halves of
    the pictures (even and odd positions), so a setting that fits a few pictures by chance is not kept. Returns
    ``instance_concepts`` (``{word: {"iou", "min_score", "conf", "merge_ios"}}``, only the words that differ, in
    the shape of ``extract.instance_concepts``) and the relative counting error with the base and with them."""
    grid = grid or INSTANCE_GRID
    truth = _true_counts(true_words, words)
    halves = [torch.arange(len(raw)) % 2 == h for h in (0, 1)]
    n_words = len(words)

    def word_errors(counts: torch.Tensor) -> torch.Tensor:  # [2 halves, V] sum of absolute count errors
        error = (counts - truth).abs()
        return torch.stack([error[half].sum(dim=0) for half in halves])

    base_table = _CountTable(raw, base["iou"], n_words)
    base_error = word_errors(base_table.counts(base["min_score"], base["min_objectness"]))
    best_error, best = base_error.clone(), [dict(base) for _ in range(n_words)]
    best_total = base_error.sum(dim=0)
    for iou in grid["iou"]:
        table = _CountTable(raw, iou, n_words)
        for min_score in grid["min_score"]:
            for min_objectness in grid["min_objectness"]:
                error = word_errors(table.counts(min_score, min_objectness))
                better = (error.sum(dim=0) < best_total) & (error < base_error).all(dim=0)
                for j in better.nonzero().flatten().tolist():
                    best_total[j] = error[:, j].sum()
                    best_error[:, j] = error[:, j]
                    best[j] = {"iou": iou, "min_score": min_score, "min_objectness": min_objectness}
    settings = {key: torch.tensor([float(b[key]) for b in best]) for key in ("iou", "min_score", "min_objectness")}

    def served_errors(merge: Setting) -> torch.Tensor:
        counts = torch.zeros(len(raw), n_words, dtype=torch.long)
        for i, (ids, _, _) in enumerate(_instances(raw, settings["iou"], settings["min_score"],
                                                   settings["min_objectness"], merge)):
            counts[i] += torch.bincount(ids, minlength=n_words)
        return word_errors(counts)

    merge: list[float | None] = [None] * n_words
    unmerged = served_errors(None)
    merged_total = unmerged.sum(dim=0).clone()
    for threshold in merge_grid:
        error = served_errors(float(threshold))
        better = (error.sum(dim=0) < merged_total) & (error < unmerged).all(dim=0)
        for j in better.nonzero().flatten().tolist():
            merge[j] = float(threshold)
        merged_total[better] = error[:, better].sum(dim=0)

    chosen: dict[str, dict[str, float | None]] = {}
    for j, word in enumerate(words):
        own = {key: best[j][name] for key, name in (("iou", "iou"), ("min_score", "min_score"),
                                                    ("conf", "min_objectness"))
               if best[j][name] != base[name]}
        if merge[j] is not None:
            own["merge_ios"] = merge[j]
        if own:
            chosen[word] = own
    total = float(truth.sum())
    return {
        "base": dict(base),
        "instance_concepts": chosen,
        "count_relative_error_global": round(float(base_error.sum()) / max(1.0, total), 4),
        "count_relative_error_per_word": round(float(merged_total.sum()) / max(1.0, total), 4),
    }


# ---------------------------------------------------------------------------------------------- drawing
def draw_examples(extractor, corpus, split: str, path: Path, count: int = 4) -> Path:
    """The first ``count`` images of the split, each with its extracted concepts drawn, side by side in one PNG."""
    from PIL import Image

    from captioning.data.images import load_image
    from captioning.models.lightcap.concepts import draw_concepts

    records = corpus.split(split)[: max(1, count)]
    originals = [load_image(rec.path) for rec in records]
    batch = torch.stack([extractor.preprocess(im) for im in originals])
    results = extractor.extract(batch)
    scale = max(1, 512 // max(originals[0].size))
    panels = [draw_concepts(im, concepts, extractor.image_size, scale=scale) for im, concepts in zip(originals, results, strict=True)]
    width, height = sum(p.width for p in panels) + 8 * (len(panels) - 1), max(p.height for p in panels)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    x = 0
    for panel in panels:
        sheet.paste(panel, (x, 0))
        x += panel.width + 8
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
