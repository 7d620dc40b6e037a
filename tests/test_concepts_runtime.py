"""The concept extractor through the model store, on random weights (fast): publish clip, concepts-detector and
concepts versions into a temporary store, load through ``captioning.inference.load_model``, extract from a few
images; plus the training helpers that move boxes (augmentation, jitter) and choose the score threshold."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from captioning.config import load_config
from captioning.errors import StoreError
from captioning.inference import Concept, load_model
from captioning.models.lightcap.concepts_data import augment_views
from captioning.store import ModelStore
from training.concepts_align import jitter_boxes
from training.eval_concepts import choose_instance_settings, choose_min_score, instance_figures


def _publish(store, name, folder, task, config, parents=()):
    """``config``: a typed config, stored as its plain dict."""
    return store.publish(
        name, folder, task=task, profile="tiny", metrics={}, config=config.to_dict(), command="pytest",
        data={"name": "none"}, parents=list(parents),
    )


@pytest.fixture(scope="module")
def random_store(tmp_path_factory):
    from captioning.config_schema import ClipConfig
    from captioning.models.lightcap.clip_encoder import ClipTokenizer, build_clip, clip_model_config
    from captioning.models.lightcap.concepts import (
        ALIGNER_FILE,
        ConceptVocabulary,
        RegionAligner,
        concept_words,
        embed_concepts,
    )
    from captioning.models.lightcap.detector import WEIGHTS_FILE, ProposalDetector
    from captioning.weights import save_state

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("store")
    store = ModelStore(root / "store")
    # clip: a random tiny open_clip CLIP + its word-level tokenizer
    clip_cfg = load_config("clip", "tiny")
    cfg_concepts = load_config("concepts", "tiny")
    words, labels = concept_words(cfg_concepts.vocabulary)
    tokenizer = ClipTokenizer.train_word_level([f"a photo of a {w}" for w in words], 32)
    model_cfg = clip_model_config(clip_cfg.model)
    model_cfg["text_cfg"].update(tokenizer.text_cfg_overrides())
    clip_cfg = ClipConfig.model_validate({**clip_cfg.to_dict(), "model": model_cfg})
    clip = build_clip(clip_cfg)
    folder = root / "clip"
    folder.mkdir()
    save_state(clip.state_dict(), folder / "model.safetensors", "float16")
    tokenizer.save(folder)
    clip_v = _publish(store, "clip", folder, "clip", clip_cfg)
    # detector: random YOLOv5n, one class
    detector = ProposalDetector(cfg_concepts.detector)
    folder = root / "det"
    folder.mkdir()
    detector.save_weights(folder / WEIGHTS_FILE)
    det_v = _publish(store, "concepts-detector", folder, "concepts-detector", cfg_concepts)
    # concepts: vocabulary embedded with the clip text tower + a random aligner
    vocab = ConceptVocabulary(words, labels, embed_concepts(clip, tokenizer, words))
    aligner = RegionAligner.from_config(512, cfg_concepts.align, vocab.dim)
    folder = root / "concepts"
    folder.mkdir()
    save_state(aligner.state_dict(), folder / ALIGNER_FILE, "float16")
    vocab.save(folder)
    cfg_concepts.extract.proposal_conf, cfg_concepts.extract.min_score = 0.0, 0.0
    parents = [{"name": "clip", "version": clip_v.version}, {"name": "concepts-detector", "version": det_v.version}]
    _publish(store, "concepts", folder, "concepts", cfg_concepts, parents)
    return store, clip


def test_extractor_loads_through_the_store_and_extracts_a_batch(random_store):
    store, clip = random_store
    extractor = load_model(store, "concepts@production")
    assert extractor.name == "concepts" and extractor.version == 1
    assert [p["name"] for p in extractor.manifest["parents"]] == ["clip", "concepts-detector"]
    # the grid encoder is the published clip's visual trunk (fp16 in the store)
    torch.testing.assert_close(
        extractor.encoder.trunk.conv1.weight, clip.visual.conv1.weight.half().float()
    )
    images = [Image.new("RGB", (256, 256), (40, 120, 40)), Image.new("RGB", (300, 200), (90, 90, 90))]
    batch = torch.stack([extractor.preprocess(im) for im in images])
    assert batch.shape == (2, 3, 256, 256)
    results = extractor.extract(batch)  # instances: a word may repeat
    words = extractor.extract_words(batch)  # the captioner's distinct top-K words
    assert len(results) == len(words) == 2
    for concepts, distinct in zip(results, words, strict=True):
        assert 0 < len(distinct) <= 20 and len(concepts) >= len(distinct)
        assert all(isinstance(c, Concept) and c.concept in extractor.vocab.words for c in concepts)
        assert len({c.concept for c in distinct}) == len(distinct)
        assert extractor.concept_words(concepts) == distinct  # min_score 0: nothing the words need is filtered
    # no text is encoded at request time: the vocabulary is a stored tensor
    assert extractor.vocab_embeddings.shape == (len(extractor.vocab), 128)


def test_missing_parent_is_a_clear_store_error(random_store, tmp_path):
    store, _ = random_store
    concepts = store.resolve("concepts@1")
    broken = tmp_path / "broken"
    broken.mkdir()
    for rel in concepts.files:
        (broken / rel).write_bytes(concepts.file(rel).read_bytes())
    store.publish(
        "concepts", broken, task="concepts", profile="tiny", metrics={}, config=concepts.manifest["config"],
        command="pytest", data={"name": "none"}, parents=[{"name": "clip", "version": 1}],
    )
    with pytest.raises(StoreError, match="no 'concepts-detector' parent"):
        load_model(store, "concepts@2")


def test_augment_views_moves_boxes_with_the_pixels():
    gen = torch.Generator().manual_seed(0)
    images = torch.zeros(8, 3, 64, 64, dtype=torch.uint8)
    boxes = []
    for i in range(8):
        x1, y1 = 4 + i, 10 + 2 * i
        images[i, :, y1:y1 + 9, x1:x1 + 20] = 255  # a 20 x 9 bright box
        boxes.append(torch.tensor([[x1, y1, x1 + 20, y1 + 9]], dtype=torch.float32))
    out, moved = augment_views(images, gen, boxes)
    for img, b in zip(out, moved, strict=True):
        ys, xs = torch.nonzero(img[0] > 0, as_tuple=True)
        assert b[0].tolist() == [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def test_jitter_boxes_stays_near_and_inside():
    gen = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[10.0, 10.0, 50.0, 30.0], [0.0, 0.0, 256.0, 256.0]])
    out = jitter_boxes(boxes, 0.1, 256, gen)
    assert (out >= 0).all() and (out <= 256).all()
    assert ((out[0] - boxes[0]).abs() <= torch.tensor([4.0, 2.0, 4.0, 2.0]) + 1e-5).all()
    assert (out[:, 2:] > out[:, :2]).all()
    assert torch.equal(jitter_boxes(boxes, 0.0, 256, gen), boxes)


def test_choose_min_score_separates_right_from_wrong_concepts():
    truth = np.array([[1, 0, 1, 0], [0, 1, 0, 0]], dtype=np.float32)
    candidates = [[(0, 0.9), (2, 0.7), (3, 0.3)], [(1, 0.8), (0, 0.2)]]
    threshold, f1 = choose_min_score(candidates, truth)
    assert 0.3 < threshold <= 0.7 and f1 == pytest.approx(1.0)


def test_instance_settings_are_chosen_for_the_count():
    # one picture with two true houses; the proposals hold a duplicate of the first house (IoU 0.82) and a weak
    # false house: the right count needs an NMS IoU below 0.82 and a score floor between 0.3 and 0.7
    words = ["house", "tree"]
    raw = [(
        torch.tensor([0, 0, 0, 0]),
        torch.tensor([0.9, 0.8, 0.7, 0.3]),
        torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [40, 40, 50, 50], [80, 80, 90, 90.0]]),
        torch.tensor([0.9, 0.9, 0.9, 0.9]),
    )]
    true_boxes = [torch.tensor([[0, 0, 10, 10], [40, 40, 50, 50.0]])]
    true_words = [["house", "house"]]
    grid = {"iou": (0.5, 0.9), "min_score": (0.0, 0.5), "min_objectness": (0.0,)}
    best = choose_instance_settings(raw, true_boxes, true_words, words, grid)
    assert (best[0]["iou"], best[0]["min_score"], best[0]["count_relative_error"]) == (0.5, 0.5, 0.0)
    assert [r["count_relative_error"] for r in best] == sorted(r["count_relative_error"] for r in best)
    worst = instance_figures(raw, true_boxes, true_words, words, iou=0.9, min_score=0.0, min_objectness=0.0)
    assert worst["count_mae"] == 2.0 and worst["per_concept"]["house"]["instances"] == 4
    assert worst["instance_recall@0.5"] == 1.0 and worst["instance_precision@0.5"] == 0.5
    right = instance_figures(raw, true_boxes, true_words, words, iou=0.5, min_score=0.5, min_objectness=0.0)
    assert right["count_exact"] == 1.0 and right["instance_map@0.5"] == 1.0


def test_eval_cli_reports_figures_and_draws(random_store, synth_data, tmp_path, capsys):
    import json

    from captioning.cli import main
    from captioning.inference import load_model

    store, _ = random_store
    drawing = tmp_path / "example.png"
    held = load_model(store, "concepts@1")  # the runtime the CLI loads too (captioning.sharing): served, say
    settings = (held.instance_iou, dict(held.instance_concepts), held.min_score)
    status = main([
        "eval", "concepts", "--data", str(synth_data), "--split", "test", "--store", str(store.root),
        "--model", "concepts@1", "--json", "--draw", str(drawing), "--draw-count", "2",
        "--instance-iou", "0.35", "--no-instance-concepts",
    ])
    assert status == 0
    assert load_model(store, "concepts@1") is held  # one runtime for the version ...
    assert (held.instance_iou, held.instance_concepts, held.min_score) == settings  # ... which the CLI left as it was
    assert settings[0] != 0.35
    figures = json.loads(capsys.readouterr().out)
    # the ground truth it counted is the test split of boxes.json
    data = json.loads((synth_data / "dataset.json").read_text())
    test_ids = {im["imgid"] for im in data["images"] if im["split"] == "test"}
    boxes = [im["boxes"] for im in json.loads((synth_data / "boxes.json").read_text())["images"] if im["imgid"] in test_ids]
    assert figures["images"] == len(test_ids) and figures["boxes"] == sum(len(b) for b in boxes)
    assert figures["true_concepts_per_image"] == pytest.approx(
        sum(len({x["concept"] for x in b}) for b in boxes) / len(boxes), abs=0.01
    )
    for key in ("box_ap@0.5", "box_recall@0.5", "gt_box_concept_accuracy", "concept_precision", "concept_recall",
                "concept_f1", "label_f1", "label_f1_vs_multilabels"):
        assert 0.0 <= figures[key] <= 1.0, key
    assert figures["model"] == "concepts@1" and figures["top_k"] == 20
    assert 0 < figures["concepts_per_image"] <= 20  # min_score 0: every image gets concepts
    # instances: per word AP and counting error against the same boxes
    per_word = figures["per_concept"]
    assert sum(row["true_boxes"] for row in per_word.values()) == figures["boxes"]
    assert figures["true_instances_per_image"] == pytest.approx(figures["boxes"] / figures["images"], abs=0.01)
    assert figures["instances_per_image"] >= figures["concepts_per_image"]  # every instance, not one per word
    assert 0.0 <= figures["instance_map@0.5"] <= 1.0 and 0.0 <= figures["count_exact"] <= 1.0
    assert figures["count_relative_error"] == pytest.approx(figures["count_mae"] / figures["count_mean_true"], abs=1e-3)
    assert set(figures["instance_settings"]) == {"iou", "min_score", "min_objectness", "merge_ios", "instance_concepts",
                                              "instance_sizes"}
    with Image.open(drawing) as sheet:
        assert sheet.width == 2 * 512 + 8 and sheet.height == 512
