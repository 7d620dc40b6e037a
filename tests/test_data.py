"""Data layer: readers (UCM layout, COCO Karpathy), error messages, image conversion, torch Datasets."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from captioning.data import (
    LABELS,
    UCM_CLASSES,
    CaptionTextDataset,
    ImageBoxDataset,
    ImageCaptionDataset,
    ImageLabelDataset,
    Vocabulary,
    collate_captions,
    collate_image_boxes,
    collate_image_captions,
    load_dataset,
    load_image,
    tokenize,
)
from captioning.errors import DataError, UsageError

CAPTIONS = [
    ["There is an airplane at the airport .", "An airplane is parked on the runway.", "A white plane ."],
    ["Many buildings and some green trees are around a road .", "Two cars, one red."],
    ["Lots of boats docked neatly at the harbor .", "Several ships beside the dock ."],
    ["A tennis court surrounded by trees .", "Green trees around a court ."],
]
SPLITS = ["train", "val", "test", "train"]
SIZES = [(32, 32), (32, 32), (40, 24), (32, 32)]  # image 2 has another size
BOXES = [
    [{"box": [2, 3, 12, 20], "concept": "airplane", "label": "airplane"}],
    [
        {"box": [0, 0, 10, 10], "concept": "building", "label": "buildings"},
        {"box": [20, 20, 32, 32], "concept": "road", "label": None},
    ],
    [{"box": [5, 5, 40, 24], "concept": "ship", "label": "ship"}],
    [],
]


def label_row(i: int) -> list[int]:
    return [int((i + j) % 3 == 0) for j in range(len(LABELS))]


def write_dataset(root: Path, *, image_dir: str = "imgs", boxes: bool = True, labels: bool = True) -> Path:
    """A 4-image dataset in the UCM layout (dataset.json, imgs/, multilabels.txt, boxes.json)."""
    (root / image_dir).mkdir(parents=True)
    images, sentid = [], 0
    for i, (caps, split, size) in enumerate(zip(CAPTIONS, SPLITS, SIZES, strict=True)):
        pixels = np.random.default_rng(i).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / image_dir / f"{i + 1}.tif")
        sentences = []
        for raw in caps:
            # UCM's shipped tokens have typos; the reader must rebuild them from raw
            sentences.append({"raw": raw, "tokens": ["typo"], "imgid": i, "sentid": sentid})
            sentid += 1
        images.append(
            {
                "imgid": i,
                "filename": f"{i + 1}.tif",
                "split": split,
                "sentids": [s["sentid"] for s in sentences],
                "sentences": sentences,
            }
        )
    (root / "dataset.json").write_text(
        json.dumps({"dataset": "tiny", "images": images, "synthetic": True}, indent=1)
    )
    if labels:
        rows = ["IMAGE\\LABEL\t" + "\t".join(LABELS)]
        rows += [f"img{i:02d}\t" + "\t".join(map(str, label_row(i))) for i in range(len(CAPTIONS))]
        (root / "multilabels.txt").write_text("\n".join(rows) + "\n")
    if boxes:
        entries = [{"imgid": i, "filename": f"{i + 1}.tif", "boxes": b} for i, b in enumerate(BOXES)]
        (root / "boxes.json").write_text(json.dumps({"images": entries}, indent=1))
    return root


@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "ds")


# ------------------------------------------------------------------------------------------ readers


def test_tokenize_lowercases_and_strips_punctuation():
    assert tokenize("There is an airplane at the airport .") == [
        "there",
        "is",
        "an",
        "airplane",
        "at",
        "the",
        "airport",
    ]
    assert tokenize("Two cars, one RED.") == ["two", "cars", "one", "red"]
    assert tokenize("It's a black-and-white road,the  end!") == [
        "its",
        "a",
        "black",
        "and",
        "white",
        "road",
        "the",
        "end",
    ]
    assert tokenize(" . , ") == []


def test_constants():
    assert len(LABELS) == 17 and LABELS[0] == "airplane" and LABELS[-1] == "water" and "mobile-home" in LABELS
    assert len(UCM_CLASSES) == 21 and UCM_CLASSES[0] == "agricultural" and UCM_CLASSES[-1] == "tenniscourt"


def test_load_dataset_reads_everything(dataset_dir: Path):
    corpus = load_dataset(dataset_dir)
    assert corpus.name == "tiny" and corpus.root == dataset_dir and corpus.meta == {"synthetic": True}
    assert [r.imgid for r in corpus.images] == [0, 1, 2, 3]
    rec = corpus.images[1]
    assert rec.path == dataset_dir / "imgs" / "2.tif" and rec.split == "val"
    assert [s.tokens for s in rec.sentences] == [
        ("many", "buildings", "and", "some", "green", "trees", "are", "around", "a", "road"),
        ("two", "cars", "one", "red"),
    ]
    assert rec.sentences[1].raw == "Two cars, one red." and rec.sentences[1].sentid == 4
    assert [r.imgid for r in corpus.split("train")] == [0, 3]
    assert corpus.split_indices("test") == [2]
    assert corpus.references("val") == {
        1: ["many buildings and some green trees are around a road", "two cars one red"]
    }
    assert sum(1 for _ in corpus.token_lists()) == sum(len(c) for c in CAPTIONS)
    assert corpus.labels.shape == (4, 17) and corpus.labels.dtype == np.float32
    np.testing.assert_array_equal(corpus.labels, np.array([label_row(i) for i in range(4)], dtype=np.float32))
    assert corpus.label_names == ["img00", "img01", "img02", "img03"]
    assert corpus.boxes[1][1].concept == "road" and corpus.boxes[1][1].label is None
    assert corpus.boxes[0][0].xyxy == (2.0, 3.0, 12.0, 20.0) and corpus.boxes[3] == []
    with pytest.raises(UsageError, match="unknown split 'dev'"):
        corpus.split("dev")
    # the json file itself is accepted too
    assert len(load_dataset(dataset_dir / "dataset.json")) == 4


def test_optional_files_and_images_folder(tmp_path: Path):
    root = write_dataset(tmp_path / "ds", image_dir="images", boxes=False, labels=False)
    corpus = load_dataset(root)
    assert corpus.labels is None and corpus.boxes is None
    assert corpus.images[0].path == root / "images" / "1.tif"


def test_coco_karpathy_layout(tmp_path: Path):
    root = tmp_path / "coco"
    for sub in ("train2014", "val2014"):
        (root / sub).mkdir(parents=True)
    entries = []
    for i, (sub, split) in enumerate([("train2014", "train"), ("val2014", "restval"), ("val2014", "test")]):
        name = f"COCO_{sub}_{i:012d}.jpg"
        Image.new("RGB", (20, 16), (i * 40, 0, 0)).save(root / sub / name)
        entries.append(
            {
                "filepath": sub,
                "filename": name,
                "imgid": i,
                "cocoid": 1000 + i,
                "split": split,
                "sentids": [i],
                "sentences": [{"tokens": ["a"], "raw": "A man riding a horse.", "imgid": i, "sentid": i}],
                "extra_field": [1, 2],
            }
        )
    (root / "dataset_coco.json").write_text(json.dumps({"images": entries, "dataset": "coco"}))
    corpus = load_dataset(root)
    assert corpus.name == "coco" and corpus.source == root / "dataset_coco.json"
    rec = corpus.images[1]
    assert rec.split == "train" and rec.source_split == "restval" and rec.cocoid == 1001
    assert rec.path == root / "val2014" / "COCO_val2014_000000000001.jpg" and rec.filepath == "val2014"
    assert rec.extra == {"extra_field": [1, 2]}
    assert [r.imgid for r in corpus.split("train")] == [0, 1] and [r.imgid for r in corpus.split("test")] == [
        2
    ]
    assert corpus.images[0].sentences[0].tokens == ("a", "man", "riding", "a", "horse")


# ------------------------------------------------------------------------------------------ errors


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=1))


def _edit_lines(path: Path, edit) -> None:
    lines = path.read_text().splitlines()
    edit(lines)
    path.write_text("\n".join(lines) + "\n")


def _set(obj, keys, value):
    for k in keys[:-1]:
        obj = obj[k]
    obj[keys[-1]] = value


def _del(obj, keys):
    for k in keys[:-1]:
        obj = obj[k]
    del obj[keys[-1]]


def _label_field(lines, value):
    fields = lines[2].split("\t")
    fields[3] = value
    lines[2] = "\t".join(fields)


BAD_INPUTS = {
    "missing filename": (
        "dataset.json",
        lambda d: _del(d, ["images", 2, "filename"]),
        "imgid 2",
        "missing field 'filename'",
    ),
    "missing sentences": (
        "dataset.json",
        lambda d: _del(d, ["images", 1, "sentences"]),
        "imgid 1",
        "'sentences'",
    ),
    "missing raw": (
        "dataset.json",
        lambda d: _del(d, ["images", 0, "sentences", 1, "raw"]),
        "imgid 0 sentences[1]",
        "'raw'",
    ),
    "missing imgid": ("dataset.json", lambda d: _del(d, ["images", 3, "imgid"]), "images[3]", "'imgid'"),
    "imgid not int": (
        "dataset.json",
        lambda d: _set(d, ["images", 3, "imgid"], "3"),
        "images[3]",
        "must be int",
    ),
    "duplicate imgid": (
        "dataset.json",
        lambda d: _set(d, ["images", 3, "imgid"], 1),
        "imgid 1",
        "duplicate imgid",
    ),
    "unknown split": (
        "dataset.json",
        lambda d: _set(d, ["images", 2, "split"], "dev"),
        "imgid 2",
        "unknown split 'dev'",
    ),
    "empty caption": (
        "dataset.json",
        lambda d: _set(d, ["images", 0, "sentences", 0, "raw"], " . "),
        "imgid 0 sentences[0]",
        "no words",
    ),
    "duplicate sentid": (
        "dataset.json",
        lambda d: _set(d, ["images", 1, "sentences", 0, "sentid"], 0),
        "imgid 1 sentences[0]",
        "duplicate sentid 0",
    ),
    "sentids mismatch": (
        "dataset.json",
        lambda d: _set(d, ["images", 1, "sentids"], [9, 9]),
        "imgid 1",
        "sentids",
    ),
    "missing image": (
        "dataset.json",
        lambda d: _set(d, ["images", 2, "filename"], "nope.tif"),
        "imgid 2",
        "'nope.tif' not found",
    ),
    "no images list": ("dataset.json", lambda d: _del(d, ["images"]), "top level", "missing field 'images'"),
    "box outside": (
        "boxes.json",
        lambda d: _set(d, ["images", 0, "boxes", 0, "box"], [2, 3, 33, 20]),
        "imgid 0 boxes[0]",
        "outside the 32x32 image",
    ),
    "box x2<=x1": (
        "boxes.json",
        lambda d: _set(d, ["images", 1, "boxes", 1, "box"], [20, 20, 20, 30]),
        "imgid 1 boxes[1]",
        "x2 > x1",
    ),
    "box negative": (
        "boxes.json",
        lambda d: _set(d, ["images", 1, "boxes", 0, "box"], [-1, 0, 5, 5]),
        "imgid 1 boxes[0]",
        "outside",
    ),
    "box 3 numbers": (
        "boxes.json",
        lambda d: _set(d, ["images", 1, "boxes", 0, "box"], [0, 0, 5]),
        "imgid 1 boxes[0]",
        "4 finite numbers",
    ),
    "box bad label": (
        "boxes.json",
        lambda d: _set(d, ["images", 2, "boxes", 0, "label"], "boat"),
        "imgid 2 boxes[0]",
        "'boat'",
    ),
    "box no concept": (
        "boxes.json",
        lambda d: _del(d, ["images", 2, "boxes", 0, "concept"]),
        "imgid 2 boxes[0]",
        "'concept'",
    ),
    "box unknown imgid": (
        "boxes.json",
        lambda d: _set(d, ["images", 3, "imgid"], 7),
        "imgid 7",
        "not in dataset.json",
    ),
    "box image missing": ("boxes.json", lambda d: d["images"].pop(3), None, "first: imgid 3"),
    "box wrong filename": (
        "boxes.json",
        lambda d: _set(d, ["images", 2, "filename"], "9.tif"),
        "imgid 2",
        "differs",
    ),
}
BAD_LABELS = {
    "wrong label count": (lambda lines: lines.__setitem__(2, lines[2] + "\t1"), "line 3", "got 18 labels"),
    "non-binary label": (
        lambda lines: _label_field(lines, "2"),
        "line 3",
        "label 'buildings' must be 0 or 1, got '2'",
    ),
    "non-number label": (lambda lines: _label_field(lines, "yes"), "line 3", "got 'yes'"),
    "too few rows": (lambda lines: lines.pop(), None, "3 label rows for 4 images"),
    "too many rows": (lambda lines: lines.append(lines[-1]), None, "5 label rows for 4 images"),
    "bad header": (
        lambda lines: lines.__setitem__(0, lines[0].replace("bare-soil", "soil")),
        "line 1",
        "header must be",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_malformed_json_names_file_and_record(dataset_dir: Path, case: str):
    filename, edit, record, message = BAD_INPUTS[case]
    _edit_json(dataset_dir / filename, edit)
    with pytest.raises(DataError) as info:
        load_dataset(dataset_dir)
    text = str(info.value)
    assert str(dataset_dir / filename) in text and message in text
    if record is not None:
        assert f"record {record}:" in text


@pytest.mark.parametrize("case", sorted(BAD_LABELS))
def test_malformed_multilabels_names_file_and_line(dataset_dir: Path, case: str):
    edit, record, message = BAD_LABELS[case]
    _edit_lines(dataset_dir / "multilabels.txt", edit)
    with pytest.raises(DataError) as info:
        load_dataset(dataset_dir)
    text = str(info.value)
    assert str(dataset_dir / "multilabels.txt") in text and message in text
    if record is not None:
        assert f"record {record}:" in text


def test_bad_json_reports_line(dataset_dir: Path):
    text = (dataset_dir / "dataset.json").read_text().splitlines()
    text[5] = text[5] + ","  # a trailing comma after a value on line 6 -> error on line 6 or 7
    (dataset_dir / "dataset.json").write_text("\n".join(text))
    with pytest.raises(DataError, match=r"dataset\.json: invalid JSON at line [67] column \d+"):
        load_dataset(dataset_dir)


def test_missing_folder_and_file(tmp_path: Path):
    with pytest.raises(DataError, match="dataset folder does not exist"):
        load_dataset(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no dataset.json or dataset_coco.json"):
        load_dataset(tmp_path / "empty")


def test_labels_require_contiguous_imgids(dataset_dir: Path):
    def renumber(d):
        _set(d, ["images", 3, "imgid"], 10)
        for sent in d["images"][3]["sentences"]:
            sent["imgid"] = 10

    _edit_json(dataset_dir / "dataset.json", renumber)
    _edit_json(dataset_dir / "boxes.json", lambda d: _set(d, ["images", 3, "imgid"], 10))
    with pytest.raises(DataError, match="imgids must be 0..N-1"):
        load_dataset(dataset_dir)
    (dataset_dir / "multilabels.txt").unlink()
    assert [r.imgid for r in load_dataset(dataset_dir).images] == [0, 1, 2, 10]


# ------------------------------------------------------------------------------------------ images


def _encode(image: Image.Image, fmt: str, **kw) -> io.BytesIO:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    buf.seek(0)
    return buf


def _tiff_rgb16(pixels: np.ndarray) -> io.BytesIO:
    """A baseline uncompressed 16-bit-per-sample RGB TIFF (PIL cannot write one)."""
    h, w, _ = pixels.shape
    data = pixels.astype("<u2").tobytes()
    entries = [  # tag, type, count, value
        (256, 4, 1, w), (257, 4, 1, h), (258, 3, 3, None), (259, 3, 1, 1), (262, 3, 1, 2),
        (273, 4, 1, None), (277, 3, 1, 3), (278, 4, 1, h), (279, 4, 1, len(data)), (284, 3, 1, 1),
    ]  # fmt: skip
    ifd_offset = 8
    ifd_size = 2 + 12 * len(entries) + 4
    bits_offset = ifd_offset + ifd_size
    data_offset = bits_offset + 6
    out = io.BytesIO()
    out.write(b"II*\x00" + struct.pack("<I", ifd_offset) + struct.pack("<H", len(entries)))
    for tag, kind, count, value in entries:
        if tag == 258:
            value = bits_offset
        elif tag == 273:
            value = data_offset
        if kind == 3 and count == 1:
            out.write(struct.pack("<HHIHH", tag, kind, count, value, 0))
        else:
            out.write(struct.pack("<HHII", tag, kind, count, value))
    out.write(struct.pack("<I", 0) + struct.pack("<HHH", 16, 16, 16) + data)
    out.seek(0)
    return out


def test_load_image_converts_modes_to_rgb():
    rgb = Image.new("RGB", (8, 6), (10, 200, 30))
    cases = {
        "palette": _encode(rgb.convert("P"), "PNG"),
        "grey": _encode(rgb.convert("L"), "TIFF"),
        "rgba": _encode(rgb.convert("RGBA"), "PNG"),
        "grey+alpha": _encode(rgb.convert("LA"), "PNG"),
        "cmyk": _encode(rgb.convert("CMYK"), "JPEG", quality=100),
        "bilevel": _encode(rgb.convert("1"), "PNG"),
    }
    for name, buf in cases.items():
        image = load_image(buf)
        assert image.mode == "RGB" and image.size == (8, 6), name
    assert np.asarray(load_image(cases["rgba"]))[0, 0].tolist() == [10, 200, 30]
    grey = int(np.asarray(rgb.convert("L"))[0, 0])
    assert np.asarray(load_image(cases["grey"]))[0, 0].tolist() == [grey] * 3


def test_load_image_scales_16_bit():
    grey16 = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)  # -> 0, 1, 255, 128
    image = load_image(_encode(Image.fromarray(grey16), "TIFF"))
    assert np.asarray(image)[0, :, 0].tolist() == [0, 1, 255, 128]
    rgb16 = np.zeros((2, 3, 3), dtype=np.uint16)
    rgb16[..., 0], rgb16[..., 1], rgb16[..., 2] = 65535, 32896, 2570  # -> 255, 128, 10
    image = load_image(_tiff_rgb16(rgb16))
    assert image.mode == "RGB" and image.size == (3, 2)
    assert np.asarray(image)[1, 2].tolist() == [255, 128, 10]


def test_load_image_resizes_and_reports_bad_files(tmp_path: Path):
    path = tmp_path / "a.png"
    Image.new("RGB", (40, 24), (5, 6, 7)).save(path)
    assert load_image(path, 32).size == (32, 32)
    assert load_image(path, (16, 20)).size == (20, 16)  # (height, width)
    assert load_image(path).size == (40, 24)
    (tmp_path / "bad.tif").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"bad\.tif: not an image"):
        load_image(tmp_path / "bad.tif")
    with pytest.raises(DataError, match=r"gone\.tif: image file does not exist"):
        load_image(tmp_path / "gone.tif")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(path.read_bytes()[:60])
    with pytest.raises(DataError, match=r"cut\.png"):
        load_image(truncated)


# ------------------------------------------------------------------------------------------ datasets


@pytest.fixture
def corpus(dataset_dir: Path):
    return load_dataset(dataset_dir)


@pytest.fixture
def vocab(corpus):
    return Vocabulary.build(corpus.token_lists(), min_freq=1)


def test_caption_text_dataset_and_collate(corpus, vocab):
    data = CaptionTextDataset(corpus, vocab, split="train", max_words=4)
    assert len(data) == 3 + 2  # images 0 and 3
    first = data[0]
    assert first.tolist() == vocab.encode(["there", "is", "an", "airplane"])
    assert data.keys[0] == (0, 0)
    ids, lengths = collate_captions([data[2], data[0]])  # "a white plane" (3 words) and 4 words
    assert ids.shape == (2, 6) and lengths.tolist() == [5, 6]
    assert ids[0, -1].item() == vocab.pad_id and ids[0, 4].item() == vocab.eos_id


def test_image_label_dataset(corpus):
    data = ImageLabelDataset(corpus, split="train", image_size=16)
    assert len(data) == 2
    image, labels = data[1]  # imgid 3
    assert (
        image.shape == (3, 16, 16) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    )
    assert labels.tolist() == [float(v) for v in label_row(3)]
    images, labels = next(iter(DataLoader(data, batch_size=2)))
    assert images.shape == (2, 3, 16, 16) and labels.shape == (2, 17)
    full = ImageLabelDataset(corpus, image_size=32)
    assert full[2][0].shape == (3, 32, 32)  # the 40x24 image is resized, not rejected
    no_labels = load_dataset(write_dataset(corpus.root.parent / "nolabels", labels=False))
    with pytest.raises(DataError, match="no multilabels.txt"):
        ImageLabelDataset(no_labels)


def test_image_caption_dataset_modes(corpus, vocab):
    each = ImageCaptionDataset(corpus, vocab, caption_mode="each-sentence", image_size=16)
    assert len(each) == sum(len(c) for c in CAPTIONS)
    item = each[4]  # image 1, second caption
    assert item["imgid"] == 1 and item["sentid"] == 4
    assert vocab.decode(item["caption"].tolist()) == ["two", "cars", "one", "red"]
    assert item["references"] == corpus.images[1].references
    batch = collate_image_captions([each[0], each[4]])
    assert batch["images"].shape == (2, 3, 16, 16) and batch["captions"].shape == (2, 9)
    assert batch["lengths"].tolist() == [9, 6] and batch["imgids"].tolist() == [0, 1]

    rand = ImageCaptionDataset(corpus, vocab, caption_mode="random-per-epoch", image_size=16, seed=3)
    assert len(rand) == 4
    picks = {}
    for epoch in range(6):
        rand.set_epoch(epoch)
        picks[epoch] = [rand.caption_index(i) for i in range(len(rand))]
        assert all(0 <= s < len(CAPTIONS[i]) for i, s in enumerate(picks[epoch]))
    assert len({tuple(p) for p in picks.values()}) > 1  # captions change between epochs
    rand.set_epoch(2)
    again = ImageCaptionDataset(corpus, vocab, caption_mode="random-per-epoch", image_size=16, seed=3)
    again.set_epoch(2)
    assert [again[i]["sentid"] for i in range(4)] == [rand[i]["sentid"] for i in range(4)]

    refs = ImageCaptionDataset(corpus, vocab, split="val", caption_mode="references", image_size=16)
    batch = collate_image_captions([refs[0]])
    assert batch["captions"] is None and batch["references"] == [corpus.images[1].references]
    with pytest.raises(ValueError, match="caption_mode"):
        ImageCaptionDataset(corpus, vocab, caption_mode="all")


def test_image_box_dataset_scales_and_transforms_boxes(corpus):
    data = ImageBoxDataset(corpus, image_size=64, concepts=["airplane", "building", "road", "ship"])
    image, target = data[1]  # a 32x32 image, boxes [0,0,10,10] and [20,20,32,32]
    assert image.shape == (3, 64, 64)
    assert target["boxes"].tolist() == [[0, 0, 20, 20], [40, 40, 64, 64]]
    assert target["labels"].tolist() == [LABELS.index("buildings"), -1]
    assert target["concepts"] == ["building", "road"] and target["concept_ids"].tolist() == [1, 2]
    _, target = data[2]  # 40x24 -> 64x64: x * 1.6, y * 8/3
    assert torch.allclose(target["boxes"], torch.tensor([[8.0, 40 / 3, 64.0, 64.0]]))
    assert data[3][1]["boxes"].shape == (0, 4)
    flip = v2.Compose([v2.ToImage(), v2.RandomHorizontalFlip(p=1.0), v2.ToDtype(torch.float32, scale=True)])
    image, target = ImageBoxDataset(corpus, transform=flip)[0]  # 32x32, box [2,3,12,20]
    assert target["boxes"].tolist() == [[20, 3, 30, 20]]
    images, targets = collate_image_boxes([data[0], data[3]])
    assert images.shape == (2, 3, 64, 64) and len(targets) == 2
    with pytest.raises(DataError, match="concept 'ship' is not in the concept list"):
        ImageBoxDataset(corpus, concepts=["airplane", "building", "road"])
