"""Metrics on small hand-worked examples, and agreement with pycocoevalcap's own scorers."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

from captioning import metrics
from captioning.metrics import (
    MetricInputError,
    box_recall_ap,
    caption_metrics,
    choose_threshold,
    count_errors,
    multilabel_prf,
    per_concept_ap,
    repetition_stats,
)

HAS_JAVA = shutil.which("java") is not None

# ------------------------------------------------------------------------------------------ captions


def test_bleu_and_rouge_by_hand():
    refs = {1: ["a plane on the runway"]}
    hyps = {1: "a plane on a runway"}
    out = caption_metrics(refs, hyps, meteor=False)
    # clipped n-gram precisions: 1-grams 4/5 ("a" twice, once in the ref), 2-grams 2/4, 3-grams 1/3,
    # 4-grams 0/2; equal lengths so no brevity penalty; BLEU-n is their geometric mean up to n.
    assert out["BLEU-1"] == pytest.approx(4 / 5, abs=1e-6)
    assert out["BLEU-2"] == pytest.approx(math.sqrt(4 / 5 * 2 / 4), abs=1e-6)
    assert out["BLEU-3"] == pytest.approx((4 / 5 * 2 / 4 * 1 / 3) ** (1 / 3), abs=1e-6)
    assert out["BLEU-4"] < 1e-3
    # LCS "a plane on runway" = 4 words: P = R = 4/5, so F(beta=1.2) = 4/5
    assert out["ROUGE-L"] == pytest.approx(0.8)
    # a single image: every n-gram of the references has idf log(1/1) = 0
    assert out["CIDEr-D"] == 0.0
    assert out["METEOR"] is None and out["METEOR-note"] == "not requested"
    assert list(out) == [
        "BLEU-1",
        "BLEU-2",
        "BLEU-3",
        "BLEU-4",
        "METEOR",
        "ROUGE-L",
        "CIDEr-D",
        "METEOR-note",
    ]


def test_cider_d_by_hand():
    refs = {"x": ["a red car"], "y": ["a blue boat"]}
    # x: hypothesis = reference. "a" is in both references (idf 0), every other n-gram has idf log 2;
    # n = 1, 2, 3 give cosine 1 and n = 4 has no n-grams: 10 * (1 + 1 + 1 + 0) / 4 = 7.5.
    # y: "a boat": 1-grams cosine (L*L) / (L * sqrt(2) L) = 1/sqrt(2); its bigram is not in the reference;
    # length 2 vs 3 -> Gaussian penalty exp(-1 / (2 * 6^2)).
    expected_y = 10 * (1 / math.sqrt(2)) * math.exp(-1 / 72) / 4
    out = caption_metrics(refs, {"x": "a red car", "y": "a boat"}, meteor=False)
    assert out["CIDEr-D"] == pytest.approx((7.5 + expected_y) / 2)


REFS = {
    0: [
        "there is an airplane at the airport",
        "a white plane is parked on the runway",
        "a plane near some buildings",
    ],
    1: ["many buildings and some green trees are around a road", "two cars are on the road beside buildings"],
    2: ["lots of boats docked neatly at the harbor", "several ships are beside the dock"],
    3: ["a tennis court is surrounded by green trees", "some trees are around a court"],
    4: ["a river runs through the green forest", "dark green trees beside a river"],
}
HYPS = {
    0: "a white airplane is parked at the airport",
    1: "many buildings and green trees are around a road",
    2: "some boats are at the harbor",
    3: "a court surrounded by trees",
    4: "",  # an empty generated caption scores 0 on it, it is not an error
}


def test_caption_metrics_agree_with_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = REFS, {k: [v] for k, v in HYPS.items()}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    # raw, upper-case, punctuated input is tokenised first and scores the same
    noisy_hyps = {k: (v.capitalize() + " .") for k, v in HYPS.items()}
    noisy_refs = {k: [r.upper() + "." for r in v] for k, v in REFS.items()}
    for out in (
        caption_metrics(REFS, HYPS, meteor=False),
        caption_metrics(noisy_refs, noisy_hyps, meteor=False),
    ):
        assert [out[f"BLEU-{n}"] for n in range(1, 5)] == bleu
        assert out["ROUGE-L"] == rouge and out["CIDEr-D"] == cider
    assert 0 < out["CIDEr-D"] < 10 and 0 < out["BLEU-4"] < out["BLEU-1"] < 1


@pytest.mark.skipif(not HAS_JAVA, reason="METEOR needs Java, which is not installed here")
def test_meteor_with_java_agrees_with_pycocoevalcap():
    from pycocoevalcap.meteor.meteor import Meteor

    direct = Meteor()
    try:
        expected, _ = direct.compute_score(REFS, {k: [v] for k, v in HYPS.items()})
    finally:
        metrics._close_meteor(direct)
    out = caption_metrics(REFS, HYPS)
    assert out["METEOR"] == pytest.approx(expected, abs=1e-9) and 0 < out["METEOR"] < 1
    assert out["METEOR-note"] is None
    again = caption_metrics({1: ["a plane"]}, {1: "a plane"})  # the Java process is reused
    assert again["METEOR"] > 0.5


def test_meteor_absent_is_reported_not_invented(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    out = caption_metrics(REFS, HYPS)
    assert out["METEOR"] is None and "java was not found" in out["METEOR-note"]
    assert out["CIDEr-D"] > 0


@pytest.mark.skipif(not HAS_JAVA, reason="needs Java to start (and fail)")
def test_meteor_java_failure_is_reported(monkeypatch):
    from pycocoevalcap.meteor import meteor as meteor_module

    monkeypatch.setattr(metrics, "_meteor_scorer", None)
    monkeypatch.setattr(meteor_module, "METEOR_JAR", "data/paraphrase-en.gz")  # exists, but is not a jar
    out = caption_metrics(REFS, HYPS, meteor_timeout=120)
    assert out["METEOR"] is None and "METEOR Java scorer failed" in out["METEOR-note"]
    assert "jar" in out["METEOR-note"].lower()


@pytest.mark.parametrize(
    ("refs", "hyps", "message"),
    [
        (
            {1: ["a b"], 2: ["c"]},
            {1: "a b", 3: "c"},
            r"same ids: 1 id\(s\) have no hypothesis \(first: \[2\]\)",
        ),
        ({1: ["a b"]}, {1: []}, "record id 1: hypothesis must be one caption string.*list of 0"),
        ({1: ["a b"]}, {1: ["a", "b"]}, "list of 2"),
        ({1: ["a b"]}, {1: 7}, "hypothesis must be a string, got int"),
        ({1: []}, {1: "a"}, "record id 1: references must be a non-empty list"),
        ({1: "a b"}, {1: "a"}, "references must be a non-empty list"),
        ({1: ["a b", " . "]}, {1: "a"}, "reference 1 has no words"),
        ({}, {}, "no images to score"),
    ],
)
def test_caption_input_errors(refs, hyps, message):
    with pytest.raises(MetricInputError, match=message):
        caption_metrics(refs, hyps, meteor=False)


# ---------------------------------------------------------------------------------------- multi-label

Y_TRUE = np.array([[1, 0, 1], [0, 1, 1], [1, 0, 0], [0, 0, 0]])
Y_SCORE = np.array([[0.9, 0.2, 0.6], [0.4, 0.7, 0.3], [0.6, 0.55, 0.1], [0.2, 0.1, 0.8]])


def test_multilabel_prf_by_hand():
    out = multilabel_prf(Y_TRUE, Y_SCORE, 0.5)
    # predictions at 0.5: [[1,0,1],[0,1,0],[1,1,0],[0,0,1]]
    # label 0: tp 2 fp 0 fn 0; label 1: tp 1 fp 1 fn 0; label 2: tp 1 fp 1 fn 1
    assert out["precision_micro"] == pytest.approx(4 / 6)
    assert out["recall_micro"] == pytest.approx(4 / 5)
    assert out["f1_micro"] == pytest.approx(8 / 11)
    assert out["precision_macro"] == pytest.approx((1 + 1 / 2 + 1 / 2) / 3)
    assert out["recall_macro"] == pytest.approx((1 + 1 + 1 / 2) / 3)
    assert out["f1_macro"] == pytest.approx((1 + 2 / 3 + 1 / 2) / 3)
    assert out["per_label"]["support"] == [2, 1, 2]
    assert out["per_label"]["f1"] == pytest.approx([1, 2 / 3, 1 / 2])
    # per-label thresholds: label 1 becomes exact, label 2 predicts rows 0,1,3 (tp 2 fp 1)
    per = multilabel_prf(torch.tensor(Y_TRUE), torch.tensor(Y_SCORE), [0.5, 0.6, 0.25])
    assert per["f1_micro"] == pytest.approx(10 / 11)
    assert per["per_label"]["f1"] == pytest.approx([1, 1, 0.8])


def test_multilabel_zero_division_and_errors():
    truth = np.array([[1, 0], [0, 0]])
    score = np.array([[0.9, 0.1], [0.2, 0.3]])  # label 1: no positives, none predicted
    assert multilabel_prf(truth, score)["f1_macro"] == pytest.approx(0.5)
    assert multilabel_prf(truth, score, zero_division=1.0)["f1_macro"] == pytest.approx(1.0)
    with pytest.raises(MetricInputError, match="must both be"):
        multilabel_prf(truth, score[:, :1])
    with pytest.raises(MetricInputError, match="only 0 and 1"):
        multilabel_prf(truth * 2, score)
    with pytest.raises(MetricInputError, match="one per label"):
        multilabel_prf(truth, score, [0.5, 0.5, 0.5])


def test_choose_threshold_maximises_micro_f1():
    # flattened scores, best first: .9 T .8 F .7 T .6 T .6 T .55 F .4 F .3 T ...; 5 positives.
    # micro-F1 = 2TP / (predicted + 5): .9 -> 2/6, .8 -> 2/7, .7 -> 4/8, .6 -> 8/10 (best), .55 -> 8/11,
    # .4 -> 8/12, .3 -> 10/13, .2 -> 10/15, .1 -> 10/17. Midpoint of .6 and the next score .55:
    t = choose_threshold(Y_TRUE, Y_SCORE)
    assert t == pytest.approx(0.575)
    assert multilabel_prf(Y_TRUE, Y_SCORE, t)["f1_micro"] == pytest.approx(0.8)
    # per label: label 0 best at .6 (next .4), label 1 at .7 (next .55), label 2 at .3 (F1 .8, next .1)
    per = choose_threshold(Y_TRUE, Y_SCORE, per_label=True)
    assert per == pytest.approx([0.5, 0.625, 0.2])
    no_pos = np.array([[1, 0], [0, 0]])
    assert choose_threshold(
        no_pos, np.array([[0.7, 0.2], [0.1, 0.4]]), per_label=True, default=0.3
    ) == pytest.approx([0.4, 0.3])
    with pytest.raises(MetricInputError, match="no positive"):
        choose_threshold(np.zeros((2, 2)), np.ones((2, 2)))


# ---------------------------------------------------------------------------------------------- boxes


def test_box_recall_ap_by_hand():
    gts = [
        [[0, 0, 10, 10], [20, 20, 30, 30]],
        [[0, 0, 4, 4]],
    ]
    preds = [
        (
            [[0, 0, 10, 10], [0, 0, 10, 9], [50, 50, 60, 60]],  # TP; IoU .9 with a taken box -> FP; FP
            [0.9, 0.8, 0.3],
        ),
        {
            "boxes": torch.tensor([[0.0, 0.0, 4.0, 2.0]]),
            "scores": torch.tensor([0.6]),
        },  # IoU exactly 0.5 -> TP
    ]
    out = box_recall_ap(preds, gts)
    # by score: .9 TP, .8 FP, .6 TP, .3 FP; recall 1/3, 1/3, 2/3, 2/3; precision 1, 1/2, 2/3, 1/2
    # AP = 1/3 * 1 + 1/3 * 2/3 (envelope) = 5/9
    assert out["recall"] == pytest.approx(2 / 3)
    assert out["AP"] == pytest.approx(5 / 9)
    assert out["true_positives"] == 2 and out["n_ground_truth"] == 3 and out["n_predictions"] == 4
    assert out["precision"] == pytest.approx(1 / 2)
    # keeping one box per image: .9 TP, .6 TP -> recall 2/3, AP = 2/3
    top1 = box_recall_ap(preds, gts, max_per_image=1)
    assert top1["recall"] == pytest.approx(2 / 3) and top1["AP"] == pytest.approx(2 / 3)
    # at IoU .95 only the exact box counts
    assert box_recall_ap(preds, gts, iou_threshold=0.95)["recall"] == pytest.approx(1 / 3)


def test_box_matching_takes_best_unmatched_and_dict_inputs():
    # two overlapping ground-truth boxes; the first prediction takes the one it overlaps most, the
    # second prediction (IoU .75 with the taken box, .6 with the other) takes the other one.
    gts = {"a": [[0, 0, 10, 10], [0, 0, 10, 6]], "b": []}
    preds = {"a": ([[0, 0, 10, 10], [0, 0, 10, 7.5]], [0.9, 0.8]), "b": ([[1, 1, 2, 2]], [0.95])}
    out = box_recall_ap(preds, gts)
    # order: .95 FP (b), .9 TP, .8 TP -> precision 0, 1/2, 2/3; recall 0, 1/2, 1 -> AP = 1/2*2/3 + 1/2*2/3
    assert out["recall"] == 1.0 and out["AP"] == pytest.approx(2 / 3)
    with pytest.raises(MetricInputError, match="same images"):
        box_recall_ap({"a": preds["a"]}, gts)
    with pytest.raises(MetricInputError, match="no ground-truth boxes"):
        box_recall_ap([([[0, 0, 1, 1]], [0.5])], [[]])
    with pytest.raises(MetricInputError, match="2 predicted boxes but 1 scores"):
        box_recall_ap([([[0, 0, 1, 1], [0, 0, 2, 2]], [0.5])], [[[0, 0, 1, 1]]])
    with pytest.raises(MetricInputError, match="x2 >= x1"):
        box_recall_ap([([[5, 0, 1, 1]], [0.5])], [[[0, 0, 1, 1]]])


# ----------------------------------------------------------------------------------------- repetition


def test_per_concept_ap_by_hand():
    # image 0: houses A, B and car C; image 1: car D. A car box on house B is a false positive for "car" (a box only
    # matches its own concept), a house box on car D one for "house"; "tree" is only predicted.
    truth = [
        {"boxes": [[0, 0, 10, 10], [20, 0, 30, 10], [50, 50, 60, 60]], "labels": ["house", "house", "car"]},
        {"boxes": [[0, 0, 10, 10]], "labels": ["car"]},
    ]
    preds = [
        {"boxes": [[0, 0, 10, 10], [20, 0, 30, 10], [20, 0, 30, 10], [50, 50, 60, 60]],
         "scores": [0.9, 0.8, 0.7, 0.6], "labels": ["house", "car", "house", "car"]},
        {"boxes": [[0, 0, 10, 10], [80, 80, 90, 90]], "scores": [0.95, 0.5], "labels": ["house", "tree"]},
    ]
    out = per_concept_ap(preds, truth)
    house, car, tree = (out["per_concept"][w] for w in ("house", "car", "tree"))
    # house: FP 0.95, TP 0.9, TP 0.7 of 2 -> precision 2/3 at recall 0.5 and 1.0
    assert house["AP"] == pytest.approx(2 / 3) and house["recall"] == 1.0 and house["true_positives"] == 2
    # car: FP 0.8, TP 0.6 of 2 -> precision 1/2 at recall 0.5
    assert car["AP"] == pytest.approx(0.25) and car["recall"] == 0.5 and car["n_predictions"] == 2
    assert tree == {"AP": None, "recall": None, "precision": 0.0, "true_positives": 0, "n_ground_truth": 0,
                    "n_predictions": 1}
    assert out["mAP"] == pytest.approx((2 / 3 + 0.25) / 2)  # tree has no ground truth: not in the mean
    # every box right: AP 1 per concept; ids work as labels too
    perfect = [{"boxes": t["boxes"], "scores": [1.0] * len(t["labels"]), "labels": t["labels"]} for t in truth]
    assert per_concept_ap(perfect, truth)["mAP"] == 1.0
    ids = [{"boxes": [[0, 0, 10, 10]], "scores": [0.5], "labels": [7]}]
    assert per_concept_ap(ids, [{"boxes": [[0, 0, 10, 10]], "labels": [7]}])["per_concept"][7]["AP"] == 1.0
    with pytest.raises(MetricInputError, match="1 boxes, 2 labels"):
        per_concept_ap([{"boxes": [[0, 0, 1, 1]], "scores": [1.0], "labels": ["a", "b"]}], truth[:1])
    with pytest.raises(MetricInputError, match="must cover the same images"):
        per_concept_ap(preds[:1], truth)
    with pytest.raises(MetricInputError, match="no ground-truth boxes"):
        per_concept_ap([preds[1]], [{"boxes": [], "labels": []}])


def test_count_errors_by_hand():
    predicted = [{"house": 3, "car": 1}, {"house": 1}, {}]
    truth = [{"house": 2, "car": 1}, {"car": 1}, {}]
    out = count_errors(predicted, truth)
    house, car = out["per_concept"]["house"], out["per_concept"]["car"]
    # house: (3 vs 2), (1 vs 0); the third picture has neither word and does not count
    assert house == {"images": 2, "mae": 1.0, "mean_true": 1.0, "relative": 1.0, "exact": 0.0, "bias": 1.0}
    assert car == {"images": 2, "mae": 0.5, "mean_true": 1.0, "relative": 0.5, "exact": 0.5, "bias": -0.5}
    overall = out["overall"]
    assert overall["images"] == 4 and overall["mae"] == 0.75 and overall["relative"] == 0.75
    assert overall["exact"] == 0.25
    # only predicted: no true instances, relative error undefined
    assert count_errors([{"tree": 2}], [{}])["per_concept"]["tree"]["relative"] is None
    with pytest.raises(MetricInputError, match="whole number"):
        count_errors([{"house": 1.5}], [{"house": 1}])
    with pytest.raises(MetricInputError, match="whole number"):
        count_errors([{"house": -1}], [{"house": 1}])
    with pytest.raises(MetricInputError, match="same images"):
        count_errors(predicted[:2], truth)
    with pytest.raises(MetricInputError, match="nothing to count"):
        count_errors([{}], [{}])


def test_repetition_stats_by_hand():
    out = repetition_stats(["a a road", "The the the car.", ["a", "car"]])
    # tokens: [a a road] [the the the car] [a car]: 9 unigrams, 4 distinct; 6 bigrams, 5 distinct
    assert out["distinct-1"] == pytest.approx(4 / 9)
    assert out["distinct-2"] == pytest.approx(5 / 6)
    assert out["consecutive_repeat"] == pytest.approx(2 / 3)
    assert out["longest_run"] == 3 and out["mean_longest_run"] == pytest.approx(2.0)
    assert repetition_stats(["there is a road"])["consecutive_repeat"] == 0.0
    assert repetition_stats([""])["longest_run"] == 0
    with pytest.raises(MetricInputError, match="non-empty list"):
        repetition_stats([])
