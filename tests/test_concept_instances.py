"""Object instances of the concept extractor (issue 15, item 0): every kept proposal with its word, score and box
after NMS per word; the captioner's distinct top-K words derived from them bit for bit as before; counts and
grouping; the drawing of many instances. On the embedded ``concepts`` model and a few generated pictures."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from captioning.inference import Concept, counts, group_concepts, load_model
from captioning.models.lightcap.concepts import (
    _PALETTE,
    draw_concepts,
    select_instances,
    top_concept_rows,
)
from captioning.store import ModelStore


@pytest.fixture(scope="module")
def extractor():
    return load_model(ModelStore(), "concepts")


@pytest.fixture(scope="module")
def pictures(synth_data, extractor):
    """One picture per class of the small synthetic set (seed 0), preprocessed, with their boxes.json entries; the batch
    mixes object-rich classes (dense residential, parking lot, harbour, storage tanks) with empty ones."""
    from captioning.data.images import load_image

    data = json.loads((synth_data / "dataset.json").read_text())
    boxes = {im["imgid"]: im["boxes"] for im in json.loads((synth_data / "boxes.json").read_text())["images"]}
    wanted = ("denseresidential", "mediumresidential", "parkinglot", "harbor", "storagetanks", "mobilehomepark",
              "airplane", "forest", "beach", "tenniscourt")
    chosen = [im for cls in wanted for im in data["images"] if im["class"] == cls][::3]
    images = torch.stack([extractor.preprocess(load_image(synth_data / "imgs" / im["filename"])) for im in chosen])
    return images, [boxes[im["imgid"]] for im in chosen], chosen


def old_extract_tensors(extractor, images, top_k=None, grid=None):
    """The extractor's extract_tensors before instances existed (kept verbatim): one best box per concept over the
    raw proposals, score >= min_score, best first, at most K."""
    k = extractor.top_k if top_k is None else int(top_k)
    proposals = extractor.propose(images)
    boxes = [b for b, _ in proposals]
    concept_ids, probs = extractor.classify_boxes(images, boxes, grid=grid)
    batch = images.shape[0]
    out_ids = torch.full((batch, k), -1, dtype=torch.long)
    out_scores = torch.zeros((batch, k))
    out_boxes = torch.zeros((batch, k, 4))
    for i, ((img_boxes, objectness), ids, prob) in enumerate(zip(proposals, concept_ids, probs, strict=True)):
        score = (objectness * prob).cpu()
        order = torch.argsort(score, descending=True)
        seen: set[int] = set()
        slot = 0
        for j in order.tolist():
            cid = int(ids[j])
            if cid in seen or float(score[j]) < extractor.min_score:
                continue
            seen.add(cid)
            out_ids[i, slot], out_scores[i, slot], out_boxes[i, slot] = cid, score[j], img_boxes[j].cpu()
            slot += 1
            if slot == k:
                break
    return out_ids, out_scores, out_boxes


def _bitwise_equal(a, b):
    return all(x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_captioner_input_is_bit_identical_to_the_trained_algorithm(extractor, pictures):
    images, _, _ = pictures
    with torch.inference_mode():
        grid = extractor.grid(images)
        for top_k in (None, 3, 1):
            assert _bitwise_equal(extractor.extract_tensors(images, top_k), old_extract_tensors(extractor, images, top_k))
        assert _bitwise_equal(extractor.extract_tensors(images, grid=grid), old_extract_tensors(extractor, images, grid=grid))
        # the instance settings play no part in the captioner's input, whatever they are: global floors, a merge
        # of every word's boxes, per-word IoUs, floors and merges
        saved = (extractor.instance_iou, extractor.instance_min_score, extractor.instance_conf,
                 extractor.instance_merge_ios, extractor.instance_concepts, extractor.instance_sizes)
        try:
            extractor.instance_iou, extractor.instance_min_score, extractor.instance_conf = 0.1, 0.9, 0.9
            extractor.instance_merge_ios = 0.05
            assert _bitwise_equal(extractor.extract_tensors(images), old_extract_tensors(extractor, images))
            extractor.instance_concepts = {
                w: {"iou": 0.2 + 0.1 * (i % 7), "min_score": 0.05 * (i % 9), "conf": 0.6, "merge_ios": 0.01}
                for i, w in enumerate(extractor.vocab.words)
            }
            extractor.instance_sizes = {w: (100.0, 101.0) for w in extractor.vocab.words}  # no box fits
            assert _bitwise_equal(extractor.extract_tensors(images), old_extract_tensors(extractor, images))
            assert _bitwise_equal(extractor.extract_tensors(images, grid=grid),
                                  old_extract_tensors(extractor, images, grid=grid))
        finally:
            (extractor.instance_iou, extractor.instance_min_score, extractor.instance_conf,
             extractor.instance_merge_ios, extractor.instance_concepts, extractor.instance_sizes) = saved
        # and at another word floor: min_score 0 keeps more words, still the same ones
        saved_min = extractor.min_score
        try:
            extractor.min_score = 0.0
            new, old = extractor.extract_tensors(images), old_extract_tensors(extractor, images)
            assert _bitwise_equal(new, old) and (new[0] >= 0).sum() > 0
        finally:
            extractor.min_score = saved_min


def test_instances_are_every_object_after_nms_per_word(extractor, pictures):
    images, truth, chosen = pictures
    with torch.inference_mode():
        instances = extractor.extract(images)
        words = extractor.extract_words(images)
        loose = extractor.instance_tensors(images, iou=1.0, min_score=0.0, min_objectness=0.0, merge_ios=None)
    settings = extractor.instance_thresholds()
    index = extractor.vocab.index
    assert len(instances) == len(images)
    for inst, distinct, everything in zip(instances, words, loose, strict=True):
        assert all(isinstance(c, Concept) and c.concept in extractor.vocab.words for c in inst)
        scores = [c.score for c in inst]
        assert scores == sorted(scores, reverse=True)
        assert all(c.score >= float(settings["min_score"][index[c.concept]]) - 1e-6 for c in inst)
        # NMS per word: no two instances of one word overlap more than its IoU (a word that merges its boxes may
        # hold a union box that overlaps another one more)
        for word in {c.concept for c in inst}:
            if not settings["merge_ios"][index[word]].isnan():
                continue
            boxes = torch.tensor([c.box for c in inst if c.concept == word])
            iou = box_iou(boxes, boxes).fill_diagonal_(0)
            assert float(iou.max()) <= float(settings["iou"][index[word]]) + 0.01, word
        assert len(inst) <= len(everything[0])
        assert [c.label for c in inst] == [extractor.vocab.labels[extractor.vocab.index[c.concept]] for c in inst]
        assert distinct == group_concepts(distinct)  # the words are distinct, best first
    # pictures with many objects answer many instances, not one box per word
    residential = [i for i, im in enumerate(chosen) if im["class"] == "denseresidential"]
    for i in residential:
        true_houses = sum(b["concept"] == "house" for b in truth[i])
        found = counts(instances[i]).get("house", 0)
        assert true_houses >= 10 and abs(found - true_houses) <= 0.25 * true_houses, (found, true_houses)
        assert sum(c.concept == "house" for c in words[i]) == 1


def test_nms_per_word_suppresses_only_its_own_word():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [1, 1, 10, 10], [50, 50, 60, 60], [0, 0, 10, 10.0]])
    ids = torch.tensor([3, 3, 5, 3, 3])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.9])  # a later duplicate with the same score goes
    objectness = torch.tensor([0.9, 0.9, 0.9, 0.2, 0.9])
    kept_ids, kept_scores, kept_boxes = select_instances(ids, scores, boxes, objectness, iou=0.5)
    assert kept_ids.tolist() == [3, 5, 3] and kept_scores.tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert kept_boxes[0].tolist() == [0, 0, 10, 10] and kept_boxes[2].tolist() == [50, 50, 60, 60]
    # a looser IoU keeps the shifted box (IoU 0.82) too; the exact duplicate always goes
    assert select_instances(ids, scores, boxes, objectness, iou=0.9)[0].tolist() == [3, 3, 5, 3]
    # floors after NMS: a score floor and an objectness floor
    assert select_instances(ids, scores, boxes, objectness, iou=0.5, min_score=0.65)[0].tolist() == [3, 5]
    assert select_instances(ids, scores, boxes, objectness, iou=0.5, min_objectness=0.5)[0].tolist() == [3, 5]
    empty = select_instances(ids[:0], scores[:0], boxes[:0], objectness[:0], iou=0.5)
    assert [t.shape[0] for t in empty] == [0, 0, 0]


def test_top_k_rows_counts_and_grouping():
    ids = torch.tensor([4, 4, 2, 7, 2, 9])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.5, 0.4, 0.1])
    assert top_concept_rows(ids, scores, 20, 0.0) == [0, 2, 3, 5]
    assert top_concept_rows(ids, scores, 2, 0.0) == [0, 2]
    assert top_concept_rows(ids, scores, 20, 0.45) == [0, 2, 3]
    inst = [Concept("house", 0.9, (0, 0, 1, 1)), Concept("tree", 0.5, (1, 1, 2, 2)), Concept("house", 0.8, (2, 2, 3, 3)),
            Concept("car", 0.7, (3, 3, 4, 4)), Concept("house", 0.3, (4, 4, 5, 5)), Concept("car", 0.2, (5, 5, 6, 6))]
    assert counts(inst) == {"house": 3, "car": 2, "tree": 1}
    assert list(counts(inst)) == ["house", "car", "tree"] and counts([]) == {}
    grouped = group_concepts(inst)
    assert [(c.concept, c.score) for c in grouped] == [("house", 0.9), ("car", 0.7), ("tree", 0.5)]
    assert group_concepts(list(reversed(inst))) == grouped


def test_concept_words_of_instances_equal_the_captioners_words(extractor, pictures):
    images, _, _ = pictures
    saved = extractor.instance_min_score, extractor.instance_conf, extractor.instance_concepts, extractor.instance_sizes
    try:  # floors no higher than the word floors, no sizes or merges: grouping the instances gives the captioner's words
        extractor.instance_min_score, extractor.instance_conf = extractor.min_score, extractor.proposal_conf
        extractor.instance_concepts, extractor.instance_sizes = {}, {}
        with torch.inference_mode():
            instances, words = extractor.extract(images), extractor.extract_words(images)
        assert [extractor.concept_words(i) for i in instances] == words
        assert [extractor.concept_words(i, top_k=1) for i in instances] == [w[:1] for w in words]
    finally:
        extractor.instance_min_score, extractor.instance_conf, extractor.instance_concepts, extractor.instance_sizes = saved


def test_drawing_many_instances_has_a_legend_with_counts_and_keeps_the_size():
    image = Image.new("RGB", (256, 256), (0, 0, 0))
    houses = [Concept("house", 0.9 - 0.01 * i, (8 + 40 * (i % 6), 40 + 36 * (i // 6), 30 + 40 * (i % 6),
                                                   62 + 36 * (i // 6)), "buildings") for i in range(30)]
    cars = [Concept("car", 0.5, (200.0, 230.0, 215.0, 245.0), "cars"), Concept("car", 0.4, (220.0, 230.0, 235.0, 245.0))]
    drawn = draw_concepts(image, houses + cars, 256, scale=2)
    assert drawn.size == (512, 512)
    house_colour, car_colour = _PALETTE[0], _PALETTE[1]  # the best word gets the first colour
    # every box is drawn: the left edge of each house box in its colour
    for c in houses:
        x, y = int(c.box[0] * 2), int(c.box[1] + c.box[3])  # the middle of the left edge, x2 scale
        assert drawn.getpixel((x, y)) == house_colour, c
    assert drawn.getpixel((400, 475)) == car_colour
    # the legend (top-left: no boxes there) sits on a light background, with a swatch per word
    assert drawn.getpixel((1, 1)) == (0, 0, 0) and sum(drawn.getpixel((3, 3))) >= 500
    legend = [drawn.getpixel((x, y)) for x in range(2, 40) for y in range(2, 60)]
    assert house_colour in legend and car_colour in legend
    # many instances: no "word score" labels over the boxes (the inside of a box stays untouched)
    assert drawn.getpixel((int(houses[20].box[0] * 2) + 8, int(houses[20].box[1] * 2) - 6)) == (0, 0, 0)
    # few instances: each gets its label above its box
    few = draw_concepts(image, cars, 256, scale=2)
    above = [few.getpixel((x, y)) for x in range(400, 440) for y in range(440, 458)]
    assert above.count(_PALETTE[0]) > 200  # the label's fill just above the first car (car: the only word now)
    assert draw_concepts(image, [], 256).tobytes() == image.tobytes()
