"""Readers for the UCM-captions layout, which also read COCO Karpathy ``dataset_coco.json``.

A dataset folder (see docs/ARCHITECTURE.md "Data")::

    DIR/dataset.json      {"dataset", "images": [{"imgid", "filename", "split", "sentids",
                            "sentences": [{"raw", "tokens", "imgid", "sentid"}]}]}
    DIR/imgs/<filename>   the images (also accepted: DIR/images/, and COCO's "filepath" sub-folders)
    DIR/multilabels.txt   optional; header "IMAGE\\LABEL" + the 17 LABELS, one 0/1 row per image (row i <-> imgid i)
    DIR/boxes.json        optional; {"images": [{"imgid", "filename", "boxes": [{"box", "concept", "label"}]}]}

``load_dataset(root)`` reads all of it once, checks it, and returns a ``CaptionCorpus``. Tokens are rebuilt
from ``raw`` with ``tokenize`` (the ``tokens`` shipped with UCM-captions contain typos). Every malformed
input raises ``DataError`` naming the file and the record; nothing that is read is silently dropped
(unknown top-level keys go to ``corpus.meta``, unknown per-image keys to ``ImageRecord.extra``).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from captioning.errors import DataError, UsageError

# The 17 multi-label classes of UCM-captions, in the column order of multilabels.txt.
LABELS: tuple[str, ...] = (
    "airplane", "bare-soil", "buildings", "cars", "chaparral", "court", "dock", "field", "grass",
    "mobile-home", "pavement", "sand", "sea", "ship", "tanks", "trees", "water",
)  # fmt: skip

# The 21 scene classes of UC Merced (100 images each in UCM-captions, imgid // 100 in this order).
UCM_CLASSES: tuple[str, ...] = (
    "agricultural", "airplane", "baseballdiamond", "beach", "buildings", "chaparral", "denseresidential",
    "forest", "freeway", "golfcourse", "harbor", "intersection", "mediumresidential", "mobilehomepark",
    "overpass", "parkinglot", "river", "runway", "sparseresidential", "storagetanks", "tenniscourt",
)  # fmt: skip

SPLITS: tuple[str, ...] = ("train", "val", "test")
# Split names as written in the files -> the split we use (COCO Karpathy's "restval" is training data).
SPLIT_ALIASES: dict[str, str] = {"train": "train", "val": "val", "test": "test", "restval": "train"}

DATASET_FILES = ("dataset.json", "dataset_coco.json")
IMAGE_DIRS = ("imgs", "images")
MULTILABELS_FILE = "multilabels.txt"
MULTILABELS_HEADER = "IMAGE\\LABEL"
BOXES_FILE = "boxes.json"

_APOSTROPHES = re.compile(r"['\u2019`]")
_NOT_WORD = re.compile(r"[^\w\s]|_")


def tokenize(raw: str) -> list[str]:
    """Lower-case, strip punctuation, split on white space.

    Apostrophes are deleted (``"it's" -> "its"``); every other punctuation or symbol character separates
    words (``"road,the" -> "road the"``, ``"black-and-white" -> "black and white"``, ``"airport ." ->
    "airport"``). Used for every caption we read, and for generated text before scoring.
    """
    text = _APOSTROPHES.sub("", raw.lower())
    return _NOT_WORD.sub(" ", text).split()


@dataclass(frozen=True)
class Sentence:
    sentid: int
    raw: str
    tokens: tuple[str, ...]  # tokenize(raw)

    @property
    def text(self) -> str:
        """The tokenised caption as one lower-case string (what the metrics compare)."""
        return " ".join(self.tokens)


@dataclass
class ImageRecord:
    imgid: int
    filename: str
    split: str  # train | val | test  (COCO's restval is reported as train; see source_split)
    path: Path  # the image file, checked to exist at load time
    sentences: list[Sentence]
    source_split: str = ""  # the split as written in dataset.json
    cocoid: int | None = None
    filepath: str | None = None  # COCO Karpathy's sub-folder ("train2014", "val2014")
    extra: dict[str, Any] = field(default_factory=dict)  # any other keys of the image entry

    @property
    def references(self) -> list[str]:
        """All captions of this image as tokenised strings (the references for the caption metrics)."""
        return [s.text for s in self.sentences]


@dataclass(frozen=True)
class Box:
    x1: float
    y1: float
    x2: float
    y2: float
    concept: str
    label: str | None  # one of LABELS, or None for concepts outside the 17

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)


@dataclass
class CaptionCorpus:
    name: str
    root: Path
    images: list[ImageRecord]  # sorted by imgid
    labels: np.ndarray | None = None  # [N, 17] float32, row i <-> images[i]; None without multilabels.txt
    label_names: list[str] | None = None  # first column of multilabels.txt ("airplane00", ...)
    boxes: dict[int, list[Box]] | None = None  # imgid -> boxes in the original image's pixels
    meta: dict[str, Any] = field(default_factory=dict)  # other top-level keys of dataset.json
    source: Path | None = None  # the dataset json that was read

    def __post_init__(self) -> None:
        self._index = {rec.imgid: i for i, rec in enumerate(self.images)}

    def __len__(self) -> int:
        return len(self.images)

    def index_of(self, imgid: int) -> int:
        """Position of ``imgid`` in ``images`` (and the row of ``labels``)."""
        try:
            return self._index[imgid]
        except KeyError:
            raise DataError(f"no image with imgid {imgid}", path=self.source) from None

    def record(self, imgid: int) -> ImageRecord:
        return self.images[self.index_of(imgid)]

    def split(self, name: str) -> list[ImageRecord]:
        """The images of one split: ``train`` (includes COCO's restval), ``val`` or ``test``."""
        split = SPLIT_ALIASES.get(name)
        if split is None:
            raise UsageError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return [rec for rec in self.images if rec.split == split]

    def split_indices(self, name: str) -> list[int]:
        """Positions in ``images`` (rows of ``labels``) of one split."""
        split = SPLIT_ALIASES.get(name)
        if split is None:
            raise UsageError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return [i for i, rec in enumerate(self.images) if rec.split == split]

    def token_lists(self, split: str | None = None) -> Iterator[list[str]]:
        """Every caption's tokens (of one split, or all), e.g. for ``Vocabulary.build``."""
        records = self.images if split is None else self.split(split)
        for rec in records:
            for sent in rec.sentences:
                yield list(sent.tokens)

    def manifest_record(self) -> dict[str, Any]:
        """What a model's manifest records about the data it was trained on: name, absolute path, image and
        split counts, and the generator's settings (seed, per_class, ...) for a synthetic set."""
        info: dict[str, Any] = {
            "name": self.name,
            "path": str(Path(self.root).resolve()),
            "images": len(self.images),
            "splits": {s: len(self.split_indices(s)) for s in ("train", "val", "test")},
        }
        if (self.meta or {}).get("synthetic") is not None:
            info["synthetic"] = self.meta["synthetic"]
        return info

    def references(self, split: str | None = None) -> dict[int, list[str]]:
        """``{imgid: [tokenised caption, ...]}``, the refs argument of ``captioning.metrics.caption_metrics``."""
        records = self.images if split is None else self.split(split)
        return {rec.imgid: rec.references for rec in records}


# --------------------------------------------------------------------------------------------- reading


def find_dataset_json(root: str | os.PathLike) -> Path:
    """``root`` may be the dataset folder or the json file itself."""
    root = Path(root)
    if root.is_file():
        return root
    if not root.exists():
        raise DataError("dataset folder does not exist", path=root)
    for name in DATASET_FILES:
        if (root / name).is_file():
            return root / name
    raise DataError(f"no {' or '.join(DATASET_FILES)} in the dataset folder", path=root)


def read_json(path: Path, what: str = "file") -> Any:
    """Parse a JSON file; a missing/unreadable file or bad JSON (with line and column) -> ``DataError``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{what} does not exist", path=path) from None
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", path=path) from None
    except OSError as exc:
        raise DataError(f"cannot read {what} ({exc.strerror})", path=path) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}", path=path
        ) from None


def _field(entry: Any, key: str, kind: type | tuple[type, ...], path: Path, record: str) -> Any:
    if not isinstance(entry, dict):
        raise DataError(f"expected an object, got {type(entry).__name__}", path=path, record=record)
    if key not in entry:
        raise DataError(f"missing field {key!r}", path=path, record=record)
    value = entry[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise DataError(f"field {key!r} must be {names}, got {value!r}", path=path, record=record)
    return value


class _DirListing:
    """Existence checks by listing each image folder once (cheap even for COCO's 123k images)."""

    def __init__(self) -> None:
        self._cache: dict[Path, frozenset[str] | None] = {}

    def names(self, folder: Path) -> frozenset[str] | None:
        if folder not in self._cache:
            try:
                self._cache[folder] = frozenset(os.listdir(folder))
            except (FileNotFoundError, NotADirectoryError):
                self._cache[folder] = None
        return self._cache[folder]

    def find(self, folders: list[Path], filename: str) -> Path | None:
        sub, _, base = filename.rpartition("/")
        for folder in folders:
            target = folder / sub if sub else folder
            names = self.names(target)
            if names is not None and base in names:
                return target / base
        return None


def _image_folders(root: Path, filepath: str | None) -> list[Path]:
    if filepath:
        return [root / filepath, *(root / d / filepath for d in IMAGE_DIRS)]
    return [*(root / d for d in IMAGE_DIRS), root]


def _parse_sentence(entry: Any, imgid: int, path: Path, record: str) -> Sentence:
    sentid = _field(entry, "sentid", int, path, record)
    raw = _field(entry, "raw", str, path, record)
    if "imgid" in entry and entry["imgid"] != imgid:
        raise DataError(
            f"sentence says imgid {entry['imgid']!r} but belongs to imgid {imgid}", path=path, record=record
        )
    tokens = tokenize(raw)
    if not tokens:
        raise DataError(f"caption {raw!r} has no words", path=path, record=record)
    return Sentence(sentid=sentid, raw=raw, tokens=tuple(tokens))


def read_dataset_json(
    path: Path, *, check_images: bool = True
) -> tuple[str, list[ImageRecord], dict[str, Any]]:
    """Parse and check a Karpathy-style dataset json; returns (name, records sorted by imgid, meta)."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"top level must be an object, got {type(data).__name__}", path=path)
    images = _field(data, "images", list, path, "top level")
    name = data.get("dataset", Path(path).parent.name)
    if not isinstance(name, str):
        raise DataError(f"field 'dataset' must be a string, got {name!r}", path=path, record="top level")
    meta = {k: v for k, v in data.items() if k not in ("images", "dataset")}
    root = Path(path).parent
    listing = _DirListing()
    folder_cache: dict[str | None, list[Path]] = {}
    records: list[ImageRecord] = []
    seen_imgids: dict[int, int] = {}
    seen_sentids: dict[int, int] = {}
    for position, entry in enumerate(images):
        where = f"images[{position}]"
        imgid = _field(entry, "imgid", int, path, where)
        where = f"imgid {imgid}"
        if imgid in seen_imgids:
            raise DataError(
                f"duplicate imgid (also at images[{seen_imgids[imgid]}])", path=path, record=where
            )
        seen_imgids[imgid] = position
        filename = _field(entry, "filename", str, path, where)
        if not filename or filename.startswith("/") or ".." in filename.split("/"):
            raise DataError(f"bad filename {filename!r}", path=path, record=where)
        source_split = _field(entry, "split", str, path, where)
        split = SPLIT_ALIASES.get(source_split)
        if split is None:
            raise DataError(
                f"unknown split {source_split!r} (expected one of {', '.join(SPLIT_ALIASES)})",
                path=path,
                record=where,
            )
        filepath = entry.get("filepath")
        if filepath is not None and (not isinstance(filepath, str) or filepath.startswith("/")):
            raise DataError(f"bad filepath {filepath!r}", path=path, record=where)
        cocoid = entry.get("cocoid")
        if cocoid is not None and (isinstance(cocoid, bool) or not isinstance(cocoid, int)):
            raise DataError(f"field 'cocoid' must be int, got {cocoid!r}", path=path, record=where)
        raw_sentences = _field(entry, "sentences", list, path, where)
        sentences = []
        for j, sent in enumerate(raw_sentences):
            s = _parse_sentence(sent, imgid, path, f"imgid {imgid} sentences[{j}]")
            if s.sentid in seen_sentids:
                raise DataError(
                    f"duplicate sentid {s.sentid} (also in imgid {seen_sentids[s.sentid]})",
                    path=path,
                    record=f"imgid {imgid} sentences[{j}]",
                )
            seen_sentids[s.sentid] = imgid
            sentences.append(s)
        if "sentids" in entry:
            sentids = entry["sentids"]
            if not isinstance(sentids, list) or sentids != [s.sentid for s in sentences]:
                raise DataError(
                    f"sentids {sentids!r} do not match the sentences' sentids {[s.sentid for s in sentences]}",
                    path=path,
                    record=where,
                )
        folders = folder_cache.get(filepath)
        if (
            folders is None
        ):  # one list of Paths per sub-folder: building Paths per image dominated COCO's load
            folders = folder_cache[filepath] = _image_folders(root, filepath)
        if check_images:
            image_path = listing.find(folders, filename)
            if image_path is None:
                raise DataError(
                    f"image file {filename!r} not found (looked in {', '.join(str(f) for f in folders)})",
                    path=path,
                    record=where,
                )
        else:
            image_path = folders[0] / filename
        known = {"imgid", "filename", "split", "filepath", "cocoid", "sentences", "sentids"}
        records.append(
            ImageRecord(
                imgid=imgid,
                filename=filename,
                split=split,
                path=image_path,
                sentences=sentences,
                source_split=source_split,
                cocoid=cocoid,
                filepath=filepath,
                extra={k: v for k, v in entry.items() if k not in known},
            )
        )
    records.sort(key=lambda r: r.imgid)
    return name, records, meta


def read_multilabels(path: Path, n_images: int | None = None) -> tuple[np.ndarray, list[str]]:
    """Read multilabels.txt -> (labels [N, 17] float32, row names). Fields are separated by tabs (any white
    space is accepted); the header must name the 17 LABELS in order."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError("file does not exist", path=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read file ({exc})", path=path) from None
    lines = [(n, line.split()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise DataError("file is empty", path=path)
    header_line, header = lines[0]
    expected = [MULTILABELS_HEADER, *LABELS]
    if header != expected:
        raise DataError(
            f"header must be {' '.join(expected)!r} (tab-separated), got {' '.join(header)!r}",
            path=path,
            record=f"line {header_line}",
        )
    rows: list[list[float]] = []
    names: list[str] = []
    for n, fields in lines[1:]:
        where = f"line {n}"
        if len(fields) != len(LABELS) + 1:
            raise DataError(
                f"expected an image name and {len(LABELS)} labels, got {len(fields) - 1} labels",
                path=path,
                record=where,
            )
        values = []
        for label, value in zip(LABELS, fields[1:], strict=True):
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if number not in (0.0, 1.0):
                raise DataError(f"label {label!r} must be 0 or 1, got {value!r}", path=path, record=where)
            values.append(number)
        names.append(fields[0])
        rows.append(values)
    if n_images is not None and len(rows) != n_images:
        raise DataError(
            f"{len(rows)} label rows for {n_images} images in dataset.json (row i must be imgid i)", path=path
        )
    return np.asarray(rows, dtype=np.float32).reshape(len(rows), len(LABELS)), names


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image  # header only: Image.open is lazy

    try:
        with Image.open(path) as im:
            return im.size
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a data problem
        raise DataError(f"cannot read image ({exc})", path=path) from None


def read_boxes(path: Path, records: list[ImageRecord], *, check_images: bool = True) -> dict[int, list[Box]]:
    """Read boxes.json; every image of the corpus must have an entry (an empty box list is fine). Boxes are
    ``[x1, y1, x2, y2]`` in the image's own pixels and must lie inside it with x2 > x1 and y2 > y1."""
    data = read_json(path)
    entries = _field(data, "images", list, path, "top level")
    by_imgid = {rec.imgid: rec for rec in records}
    boxes: dict[int, list[Box]] = {}
    for position, entry in enumerate(entries):
        imgid = _field(entry, "imgid", int, path, f"images[{position}]")
        where = f"imgid {imgid}"
        rec = by_imgid.get(imgid)
        if rec is None:
            raise DataError("imgid is not in dataset.json", path=path, record=where)
        if imgid in boxes:
            raise DataError("duplicate imgid", path=path, record=where)
        if "filename" in entry and entry["filename"] != rec.filename:
            raise DataError(
                f"filename {entry['filename']!r} differs from dataset.json's {rec.filename!r}",
                path=path,
                record=where,
            )
        raw_boxes = _field(entry, "boxes", list, path, where)
        width, height = _image_size(rec.path) if (check_images and raw_boxes) else (math.inf, math.inf)
        parsed = []
        for j, item in enumerate(raw_boxes):
            bwhere = f"imgid {imgid} boxes[{j}]"
            coords = _field(item, "box", list, path, bwhere)
            if len(coords) != 4 or not all(
                isinstance(c, int | float) and not isinstance(c, bool) and math.isfinite(c) for c in coords
            ):
                raise DataError(
                    f"box must be 4 finite numbers [x1, y1, x2, y2], got {coords!r}", path=path, record=bwhere
                )
            x1, y1, x2, y2 = (float(c) for c in coords)
            if x2 <= x1 or y2 <= y1:
                raise DataError(
                    f"box {coords!r} is empty (needs x2 > x1 and y2 > y1)", path=path, record=bwhere
                )
            if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
                raise DataError(
                    f"box {coords!r} lies outside the {width}x{height} image {rec.filename}",
                    path=path,
                    record=bwhere,
                )
            concept = _field(item, "concept", str, path, bwhere)
            if not concept.strip():
                raise DataError("empty concept", path=path, record=bwhere)
            label = item.get("label")
            if label is not None and label not in LABELS:
                raise DataError(
                    f"label {label!r} is not one of the 17 labels (or null)", path=path, record=bwhere
                )
            parsed.append(Box(x1, y1, x2, y2, concept, label))
        boxes[imgid] = parsed
    missing = [rec.imgid for rec in records if rec.imgid not in boxes]
    if missing:
        raise DataError(
            f"{len(missing)} image(s) of dataset.json have no entry (first: imgid {missing[0]})", path=path
        )
    return boxes


def load_dataset(root: str | os.PathLike, *, check_images: bool = True) -> CaptionCorpus:
    """Read a dataset folder (UCM-captions layout or COCO Karpathy) into a checked ``CaptionCorpus``.

    ``root`` is the folder (holding dataset.json or dataset_coco.json) or the json file. multilabels.txt and
    boxes.json are read when present. ``check_images`` verifies that every image file exists (one directory
    listing per folder) and reads image headers for the box bounds check.
    """
    json_path = find_dataset_json(root)
    folder = json_path.parent
    name, records, meta = read_dataset_json(json_path, check_images=check_images)
    labels = label_names = None
    if (folder / MULTILABELS_FILE).is_file():
        labels, label_names = read_multilabels(folder / MULTILABELS_FILE, n_images=len(records))
        if records and [r.imgid for r in records] != list(range(len(records))):
            raise DataError(
                "multilabels.txt rows line up with imgid, so imgids must be 0..N-1",
                path=json_path,
                record=f"imgid {next(r.imgid for i, r in enumerate(records) if r.imgid != i)}",
            )
    boxes = None
    if (folder / BOXES_FILE).is_file():
        boxes = read_boxes(folder / BOXES_FILE, records, check_images=check_images)
    return CaptionCorpus(
        name=name,
        root=folder,
        images=records,
        labels=labels,
        label_names=label_names,
        boxes=boxes,
        meta=meta,
        source=json_path,
    )
