"""The synthetic aerial-scene generator (`captioner synth`): layout, determinism, round trip through the
reader, captions that agree with the picture, and clear errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioning.cli import main
from captioning.data import LABELS, UCM_CLASSES, load_dataset, tokenize
from captioning.data.synth import (
    ADJECTIVES,
    CONCEPTS,
    COUNT_WORDS,
    GENERATOR_VERSION,
    LABEL_WORDS,
    OBJECT_NOUNS,
    OBJECTS,
    STUFF,
    generate,
    render,
    split_counts,
)
from captioning.data.synth.concepts import COLOURS
from captioning.errors import UsageError

PER_CLASS = 3  # the synth_data fixture (tests/conftest.py)


@pytest.fixture(scope="module")
def fresh():
    """The synth_data pictures rendered again in memory: imgid -> Rendered (what generate wrote)."""
    return {
        ci * PER_CLASS + j: render(scene, 0, ci * PER_CLASS + j, 256)
        for ci, scene in enumerate(UCM_CLASSES)
        for j in range(PER_CLASS)
    }


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _small(tmp_path: Path, name: str, seed: int, workers: int, per_class: int = 1, size: int = 96) -> Path:
    out = tmp_path / name
    generate(out, per_class, seed, size, workers)
    return out


def test_same_seed_gives_identical_files_whatever_the_worker_count(tmp_path):
    a = _files(_small(tmp_path, "a", seed=5, workers=1))
    b = _files(_small(tmp_path, "b", seed=5, workers=2))
    assert a.keys() == b.keys() and len(a) == 21 + 4
    assert [k for k in a if a[k] != b[k]] == []


def test_different_seed_gives_different_images_and_captions(tmp_path):
    a, b = load_dataset(_small(tmp_path, "a", 0, 1)), load_dataset(_small(tmp_path, "b", 1, 1))
    for ra, rb in zip(a.images, b.images, strict=True):
        pa, pb = (np.asarray(Image.open(r.path).convert("RGB"), dtype=np.int16) for r in (ra, rb))
        assert np.abs(pa - pb).mean() > 5, ra.filename
    changed = sum(
        {s.raw for s in ra.sentences} != {s.raw for s in rb.sentences}
        for ra, rb in zip(a.images, b.images, strict=True)
    )
    assert changed >= 18  # a forest may be described alike by chance, most pictures not


def test_split_counts_are_80_10_10_per_class():
    assert split_counts(100) == (80, 10, 10)
    assert split_counts(10) == (8, 1, 1)
    assert split_counts(15) == (11, 2, 2)
    assert split_counts(3) == (1, 1, 1)
    assert split_counts(2) == (2, 0, 0)
    assert split_counts(1) == (1, 0, 0)


def test_layout(synth_data):
    n = 21 * PER_CLASS
    data = json.loads((synth_data / "dataset.json").read_text())
    assert data["dataset"] == "synthetic-ucm"
    assert data["synthetic"] == {
        "seed": 0,
        "per_class": PER_CLASS,
        "size": 256,
        "generator": GENERATOR_VERSION,
        "tiff": "jpeg",
    }
    images = data["images"]
    assert [im["imgid"] for im in images] == list(range(n))
    assert [im["filename"] for im in images] == [f"{i + 1}.tif" for i in range(n)]
    assert sorted(p.name for p in (synth_data / "imgs").iterdir()) == sorted(f"{i + 1}.tif" for i in range(n))
    assert [im["class"] for im in images] == [c for c in UCM_CLASSES for _ in range(PER_CLASS)]
    for ci, cls in enumerate(UCM_CLASSES):
        splits = Counter(im["split"] for im in images[ci * PER_CLASS : (ci + 1) * PER_CLASS])
        assert (splits["train"], splits["val"], splits["test"]) == split_counts(PER_CLASS), cls
    for im in images:
        assert im["sentids"] == [im["imgid"] * 5 + k for k in range(5)]
        assert [s["sentid"] for s in im["sentences"]] == im["sentids"]
        assert len({s["raw"] for s in im["sentences"]}) == 5
        for s in im["sentences"]:
            assert s["imgid"] == im["imgid"] and s["tokens"] == tokenize(s["raw"]) and s["raw"].endswith(" .")
    with Image.open(synth_data / "imgs" / "1.tif") as im:
        assert im.format == "TIFF" and im.size == (256, 256) and im.mode == "RGB"
    lines = (synth_data / "multilabels.txt").read_text().splitlines()
    assert lines[0].split("\t") == ["IMAGE\\LABEL", *LABELS]
    names = [line.split("\t")[0] for line in lines[1:]]
    assert names == [f"{c}{j:02d}" for c in UCM_CLASSES for j in range(PER_CLASS)]
    assert all(len(line.split("\t")) == 18 for line in lines[1:])
    boxes = json.loads((synth_data / "boxes.json").read_text())
    assert [e["imgid"] for e in boxes["images"]] == list(range(n))
    assert boxes["concepts"] == {c: CONCEPTS[c].label for c in OBJECTS}
    with Image.open(synth_data / "gallery.png") as g:
        assert g.format == "PNG" and g.size[0] > 1000


def test_round_trip_through_the_reader_loses_nothing(synth_data, fresh):
    corpus = load_dataset(synth_data)
    assert corpus.name == "synthetic-ucm" and corpus.meta["synthetic"]["seed"] == 0
    assert len(corpus) == 21 * PER_CLASS and corpus.labels.shape == (21 * PER_CLASS, 17)
    for rec in corpus.images:
        made = fresh[rec.imgid]
        assert rec.extra == {"class": made.scene}
        assert [s.raw for s in rec.sentences] == made.captions
        assert [list(s.tokens) for s in rec.sentences] == [tokenize(c) for c in made.captions]
        np.testing.assert_array_equal(corpus.labels[rec.imgid], made.labels.astype(np.float32))
        assert [(b.x1, b.y1, b.x2, b.y2, b.concept, b.label) for b in corpus.boxes[rec.imgid]] == [
            (*b["box"], b["concept"], b["label"]) for b in made.boxes
        ]
        stored = np.asarray(Image.open(rec.path).convert("RGB"), dtype=np.float32)
        assert np.abs(stored - np.asarray(made.image, dtype=np.float32)).mean() < 6.0, (
            rec.filename
        )  # JPEG q85
    # every entry of the raw files made it into the corpus
    raw = json.loads((synth_data / "boxes.json").read_text())
    assert sum(len(e["boxes"]) for e in raw["images"]) == sum(len(v) for v in corpus.boxes.values()) > 100
    assert sum(len(r.sentences) for r in corpus.images) == 5 * len(corpus)


def _count_claims(tokens: list[str]):
    """(count word, concept, colour words) for every 'count [adjectives] noun' phrase of a caption."""
    out = []
    i = 0
    while i < len(tokens):
        word = tokens[i]
        if word in COUNT_WORDS:
            j = i + 1
            if word == "lots":
                assert tokens[j] == "of", tokens
                j += 1
            between = []
            while j < len(tokens) and tokens[j] in ADJECTIVES and tokens[j] not in OBJECT_NOUNS:
                between.append(tokens[j])
                j += 1
            if j < len(tokens) and tokens[j] in OBJECT_NOUNS:
                out.append((word, OBJECT_NOUNS[tokens[j]], between))
        i += 1
    return out


def test_captions_state_facts_true_of_the_picture(synth_data, fresh):
    corpus = load_dataset(synth_data)
    checked = Counter()
    for rec in corpus.images:
        boxes = corpus.boxes[rec.imgid]
        counts = Counter(b.concept for b in boxes)
        labels = {lab for lab, v in zip(LABELS, corpus.labels[rec.imgid], strict=True) if v}
        colours = {}
        for obj in fresh[rec.imgid].facts.cv.objects:
            colours.setdefault(obj.concept, set()).update(obj.colour.split())
        for s in rec.sentences:
            toks = list(s.tokens)
            for word, concept, between in _count_claims(toks):
                lo, hi = COUNT_WORDS[word]
                assert lo <= counts[concept] <= hi, (rec.imgid, s.raw, concept, counts[concept])
                said = {w for w in between if w in {t for name in COLOURS for t in name.split()}}
                assert said <= colours[concept], (rec.imgid, s.raw, concept, colours[concept])
                checked["counts"] += 1
            if "no" in toks and toks[toks.index("no") + 1] == "cars":
                assert counts["car"] == 0, (rec.imgid, s.raw)
            for i, t in enumerate(toks):
                if t in LABEL_WORDS and not (i and toks[i - 1] == "no"):  # "no cars" claims no label
                    assert LABEL_WORDS[t] in labels, (rec.imgid, s.raw, t, sorted(labels))
                    checked["labels"] += 1
    assert checked["counts"] > 150 and checked["labels"] > 300


def test_labels_agree_with_boxes(synth_data):
    corpus = load_dataset(synth_data)
    # labels that only countable things can make present
    object_labels = {CONCEPTS[c].label for c in OBJECTS} - {CONCEPTS[c].label for c in STUFF} - {None}
    assert object_labels == {"airplane", "buildings", "cars", "court", "dock", "mobile-home", "ship", "tanks"}
    for rec in corpus.images:
        labels = {lab for lab, v in zip(LABELS, corpus.labels[rec.imgid], strict=True) if v}
        boxed = {b.label for b in corpus.boxes[rec.imgid]} - {None}
        assert boxed <= labels, rec.imgid  # every boxed thing is visible
        assert labels & object_labels <= boxed, rec.imgid  # an object label needs a boxed object
        assert labels, rec.imgid
    # labels vary within classes: no class is one template
    per_class = corpus.labels.reshape(21, PER_CLASS, 17)
    assert sum(bool((per_class[c] != per_class[c][0]).any()) for c in range(21)) >= 12


def test_boxes_are_sized_and_separate(synth_data):
    corpus = load_dataset(synth_data)
    for imgid, boxes in corpus.boxes.items():
        assert len(boxes) <= 40, imgid
        xy = np.array([b.xyxy for b in boxes]).reshape(-1, 4)
        assert ((xy >= 0) & (xy <= 256)).all()
        assert (np.maximum(xy[:, 2] - xy[:, 0], xy[:, 3] - xy[:, 1]) >= 8).all(), imgid
        for i in range(len(xy)):
            for j in range(i + 1, len(xy)):
                ix = max(0, min(xy[i, 2], xy[j, 2]) - max(xy[i, 0], xy[j, 0]))
                iy = max(0, min(xy[i, 3], xy[j, 3]) - max(xy[i, 1], xy[j, 1]))
                inter = ix * iy
                union = np.prod(xy[i, 2:] - xy[i, :2]) + np.prod(xy[j, 2:] - xy[j, :2]) - inter
                assert inter / union <= 0.5, (imgid, i, j)
        assert {b.concept for b in boxes} <= set(OBJECTS)
        assert all(b.label == CONCEPTS[b.concept].label for b in boxes)


def test_caption_statistics(synth_data):
    corpus = load_dataset(synth_data)
    lengths = [len(s.tokens) for r in corpus.images for s in r.sentences]
    vocab = {t for r in corpus.images for s in r.sentences for t in s.tokens}
    assert 9 <= np.mean(lengths) <= 13
    assert max(lengths) <= 22
    assert len(vocab) >= 250  # 63 pictures; a full set of 2,100 has about 320
    # captions are not a function of the class: pictures of one class are told apart by their captions
    for ci in range(21):
        sets = [
            frozenset(s.raw for s in r.sentences)
            for r in corpus.images[ci * PER_CLASS : (ci + 1) * PER_CLASS]
        ]
        assert len(set(sets)) == PER_CLASS, UCM_CLASSES[ci]


def test_other_sizes_scale_the_same_scene():
    base = render("harbor", 3, 7, 256)
    for size in (128, 384):
        r = render("harbor", 3, 7, size)
        assert r.image.size == (size, size)
        assert [b["concept"] for b in r.boxes] == [b["concept"] for b in base.boxes]
        k = size / 256
        got = np.array([b["box"] for b in r.boxes])
        want = np.array([b["box"] for b in base.boxes]) * k
        np.testing.assert_allclose(got, want, atol=0.1 * k + 0.06)


def test_size_option_writes_that_size(tmp_path):
    out = _small(tmp_path, "s", seed=2, workers=1, size=160)
    corpus = load_dataset(out)
    with Image.open(corpus.images[0].path) as im:
        assert im.size == (160, 160)
    assert all(b.x2 <= 160 and b.y2 <= 160 for v in corpus.boxes.values() for b in v)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"per_class": 0}, "--per-class must be a positive integer"),
        ({"seed": -1}, "--seed must be a non-negative integer"),
        ({"size": 32}, "--size must be an integer from 64 to 1024"),
        ({"workers": 0}, "--workers must be a positive integer"),
    ],
)
def test_bad_arguments_are_named(tmp_path, kwargs, message):
    args = {"per_class": 1, "seed": 0, "size": 96, "workers": 1} | kwargs
    with pytest.raises(UsageError, match=message):
        generate(tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()


def test_output_folder_is_protected(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="exists and is not a folder"):
        generate(tmp_path / "file", 1, 0, 96, 1)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match=r"holds other files \(notes.txt\)"):
        generate(other, 1, 0, 96, 1)
    out = _small(tmp_path, "g", seed=0, workers=1)
    with pytest.raises(UsageError, match="pass --overwrite"):
        generate(out, 1, 0, 96, 1)
    generate(out, 1, 1, 96, 1, overwrite=True)
    assert json.loads((out / "dataset.json").read_text())["synthetic"]["seed"] == 1


def test_cli_prints_the_folder_and_gallery(tmp_path, capsys):
    out = tmp_path / "set"
    assert main(["synth", str(out), "--per-class", "1", "--seed", "4", "--size", "96", "--workers", "1"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-2:] == [str(out), str(out / "gallery.png")]
    assert load_dataset(out).meta["synthetic"] == {
        "seed": 4,
        "per_class": 1,
        "size": 96,
        "generator": GENERATOR_VERSION,
        "tiff": "jpeg",
    }
    assert main(["synth", str(out), "--per-class", "1"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["synth", str(tmp_path / "x"), "--per-class", "-3"]) == 2
    assert "--per-class must be a positive integer, got -3" in capsys.readouterr().err


def test_concept_table():
    assert set(OBJECTS) | set(STUFF) == set(CONCEPTS)
    assert {CONCEPTS[c].label for c in CONCEPTS} - {None} == set(LABELS)
    for word, concept in OBJECT_NOUNS.items():
        assert (
            concept in OBJECTS and word in CONCEPTS[concept].name.split() + CONCEPTS[concept].plural.split()
        )
    assert set(LABEL_WORDS.values()) <= set(LABELS)
