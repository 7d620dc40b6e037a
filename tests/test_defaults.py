"""The embedded default store (model_store/) is what `make serve` serves: every servable model is there with
the serving alias, loads through captioning.inference exactly as the service loads it, and works on
pictures of a seed no default was trained on; the whole store stays inside its 50 MB budget in fp16, and
every version records how it was made."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from captioning.data.synth.concepts import UCM_CLASSES
from captioning.data.synth.generator import render
from captioning.decoding import DecodeOptions
from captioning.inference import load_model, servable_tasks
from captioning.store import ModelStore

ROOT = Path(__file__).resolve().parents[1]
BUDGET_BYTES = 50 * 1024 * 1024
SERVED = ("ucm-classifier", "ucm-captioner", "concepts", "lightcap")
UNSEEN_SEED = 4242  # the defaults were trained on seeds 0 and 1


@pytest.fixture(scope="module")
def store() -> ModelStore:
    return ModelStore(ROOT / "model_store")


@pytest.fixture(scope="module")
def scenes():
    return [render(scene, UNSEEN_SEED, i, 256) for i, scene in enumerate(UCM_CLASSES)]


def test_every_served_model_is_there_with_the_production_alias(store):
    for name in SERVED:
        assert name in store.models(), f"model_store/ lacks {name}"
        version = store.resolve(f"{name}@production")
        assert version.manifest["task"] in servable_tasks()


def test_store_is_within_budget_fp16_and_records_how_each_version_was_made(store):
    total = 0
    for name in store.models():
        for number in store.versions(name):
            version = store.resolve(f"{name}@{number}")
            manifest = version.manifest
            total += sum(f["size"] for f in manifest["files"].values())
            assert manifest["profile"] == "tiny", version.spec
            assert manifest["command"].startswith("captioner "), (version.spec, manifest["command"])
            assert manifest["data"].get("synthetic"), f"{version.spec}: no synthetic data record"
            assert manifest["metrics"], f"{version.spec}: no metrics"
            for parent in manifest.get("parents", []):
                store.resolve(f"{parent['name']}@{parent['version']}")  # parents are in the store too
            for file in Path(version.path).glob("*.safetensors"):
                with safe_open(str(file), "pt") as tensors:
                    for key in tensors.keys():  # noqa: SIM118 (safe_open has no __iter__)
                        dtype = tensors.get_slice(key).get_dtype()
                        assert dtype not in ("F32", "F64", "BF16"), f"{file.name}:{key} is {dtype}, not fp16"
    assert total < BUDGET_BYTES, f"default store holds {total / 2**20:.1f} MB (budget 50 MB)"
    assert store.verify() == []


def test_the_captioners_caption_unseen_pictures_without_triple_repeats(store, scenes):
    for name in ("ucm-captioner", "lightcap"):
        model = load_model(store, f"{name}@production")
        images = torch.stack([model.preprocess(s.image) for s in scenes])
        with torch.inference_mode():
            outs = model.caption(images, DecodeOptions.from_dict(model.decoding.to_dict(), beam_size=3, max_length=20))
        assert len(outs) == len(scenes)
        texts = [o.text for o in outs]
        for text in texts:
            words = text.split()
            assert len(words) >= 3, (name, text)
            assert not any(a == b == c for a, b, c in zip(words, words[1:], words[2:], strict=False)), (name, text)
        assert len(set(texts)) >= len(scenes) // 2, f"{name} says nearly the same thing for every class: {texts}"


def test_the_classifier_recognises_unseen_pictures(store, scenes):
    model = load_model(store, "ucm-classifier@production")
    threshold = model.threshold  # chosen on val at training time, stored with the model
    images = torch.stack([model.preprocess(s.image) for s in scenes])
    with torch.inference_mode():
        probs = model.predict(images).float().numpy()
    predicted = probs >= threshold
    truth = np.stack([s.labels for s in scenes]).astype(bool)
    tp = (predicted & truth).sum()
    f1 = 2 * tp / (predicted.sum() + truth.sum())
    assert f1 >= 0.75, f"micro-F1 {f1:.2f} on 21 unseen pictures"


def test_the_concept_extractor_finds_boxed_concepts_in_unseen_pictures(store, scenes):
    model = load_model(store, "concepts@production")
    images = torch.stack([model.preprocess(s.image) for s in scenes])
    with torch.inference_mode():
        found = model.extract(images)
    side = images.shape[-1]
    hits = 0
    for scene, concepts in zip(scenes, found, strict=True):
        words = {c.concept for c in concepts}
        truth = {b["concept"] for b in scene.boxes}
        hits += bool(words & truth)
        for c in concepts:
            x1, y1, x2, y2 = c.box
            assert -1 <= x1 < x2 <= side + 1 and -1 <= y1 < y2 <= side + 1, c
            assert 0 < c.score <= 1, c
    with_objects = sum(bool(s.boxes) for s in scenes)
    assert hits >= 0.7 * with_objects, f"a true concept in only {hits} of {with_objects} pictures"
