"""Render one synthetic scene, or write a whole dataset in the UCM-captions layout (``captioner synth``).

Determinism: picture ``imgid`` of a set made with ``seed`` is drawn from ``np.random.default_rng([seed,
imgid])`` (its captions from ``[seed, imgid, 7]``), so the output depends on (seed, imgid, size) only -
not on the number of worker processes or the order they finish in.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from captioning.data.synth.canvas import Canvas
from captioning.data.synth.captions import Facts, captions
from captioning.data.synth.concepts import CONCEPTS, LABELS, UCM_CLASSES
from captioning.data.synth.scenes import COMPOSERS
from captioning.data.ucm import tokenize
from captioning.errors import UsageError

log = logging.getLogger(__name__)

GENERATOR_VERSION = "synthetic-ucm/1"
DATASET_NAME = "synthetic-ucm"
TIFF_OPTIONS = {"compression": "jpeg", "quality": 85}  # JPEG-in-TIFF: small and fast to decode
MIN_SIZE, MAX_SIZE = 64, 1024
OUTPUT_NAMES = ("imgs", "dataset.json", "multilabels.txt", "boxes.json", "gallery.png")
SENTENCES_PER_IMAGE = 5


@dataclass
class Rendered:
    scene: str
    image: Image.Image
    labels: np.ndarray  # [17] uint8
    boxes: list[dict]  # {"box": [x1, y1, x2, y2], "concept", "label"}
    captions: list[str]
    facts: Facts


def render(scene: str, seed: int, imgid: int, size: int = 256) -> Rendered:
    """Compose, render and caption picture ``imgid`` of class ``scene`` for ``seed``."""
    if scene not in COMPOSERS:
        raise UsageError(f"unknown scene class {scene!r}; expected one of {', '.join(UCM_CLASSES)}")
    rng = np.random.default_rng([seed, imgid])
    cv = Canvas(size, rng)
    COMPOSERS[scene](cv)
    image, labels, visible = cv.render()
    facts = Facts(scene, cv, visible, np.random.default_rng([seed, imgid, 7]))
    boxes = [
        {"box": list(o.box), "concept": o.concept, "label": CONCEPTS[o.concept].label} for o in cv.objects
    ]
    return Rendered(scene, image, labels, boxes, captions(scene, facts, SENTENCES_PER_IMAGE), facts)


def split_counts(per_class: int) -> tuple[int, int, int]:
    """(train, val, test) images per class: 80/10/10, with at least one val and test image from 3 up."""
    tenth = math.floor(per_class / 10 + 0.5)
    if per_class >= 3:
        tenth = max(1, tenth)
    return per_class - 2 * tenth, tenth, tenth


def _check_args(per_class: int, seed: int, size: int, workers: int) -> None:
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise UsageError(f"--per-class must be a positive integer, got {per_class!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UsageError(f"--seed must be a non-negative integer, got {seed!r}")
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise UsageError(f"--size must be an integer from {MIN_SIZE} to {MAX_SIZE} pixels, got {size!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UsageError(f"--workers must be a positive integer, got {workers!r}")


def _prepare(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        ours = [n for n in OUTPUT_NAMES if (out / n).exists()]
        others = sorted(p.name for p in out.iterdir() if p.name not in OUTPUT_NAMES)
        if not overwrite or others:
            what = f"holds other files ({', '.join(others[:3])})" if others else "already holds a dataset"
            hint = "choose an empty or new folder" if others else "pass --overwrite to replace it"
            raise UsageError(f"{out}: {what}; {hint}")
        for name in ours:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    (out / "imgs").mkdir(parents=True, exist_ok=True)


def _work(job: tuple[str, int, int, int, str]) -> tuple[int, list[int], list[dict], list[str]]:
    """Worker: render one picture, write its TIFF, return what goes into the json/txt files."""
    scene, seed, imgid, size, path = job
    r = render(scene, seed, imgid, size)
    r.image.save(path, format="TIFF", **TIFF_OPTIONS)
    return imgid, r.labels.tolist(), r.boxes, r.captions


def _progress(iterable, total: int):
    if os.environ.get("CAPTIONER_NO_PROGRESS"):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc="synth", unit="img")


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, not the host's count, inside containers)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass
class Summary:
    out: Path
    images: int
    seconds: float
    gallery: Path


def generate(
    out: str | os.PathLike,
    per_class: int,
    seed: int,
    size: int = 256,
    workers: int | None = None,
    *,
    overwrite: bool = False,
    gallery: bool = True,
) -> Summary:
    """Write a synthetic UCM-layout dataset to ``out`` (see docs/synthetic.md) and return a summary."""
    workers = workers if workers is not None else available_cores()
    _check_args(per_class, seed, size, workers)
    out = Path(out)
    _prepare(out, overwrite)
    start = time.perf_counter()
    jobs = []
    for ci, scene in enumerate(UCM_CLASSES):
        for j in range(per_class):
            imgid = ci * per_class + j
            jobs.append((scene, seed, imgid, size, str(out / "imgs" / f"{imgid + 1}.tif")))
    results: dict[int, tuple] = {}
    if workers == 1:
        for job in _progress(jobs, len(jobs)):
            r = _work(job)
            results[r[0]] = r
    else:
        ctx = multiprocessing.get_context(
            "fork" if "fork" in multiprocessing.get_all_start_methods() else None
        )
        chunk = max(1, min(16, len(jobs) // (workers * 8)))
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            for r in _progress(pool.map(_work, jobs, chunksize=chunk), len(jobs)):
                results[r[0]] = r
    _write_tables(out, per_class, seed, size, results)
    gallery_path = out / "gallery.png"
    if gallery:
        make_gallery(out, per_class, results, gallery_path)
    return Summary(out, len(jobs), time.perf_counter() - start, gallery_path)


def _write_tables(out: Path, per_class: int, seed: int, size: int, results: dict[int, tuple]) -> None:
    n_train, n_val, _ = split_counts(per_class)
    images, label_rows, box_entries = [], [], []
    width = max(2, len(str(per_class - 1)))
    for ci, scene in enumerate(UCM_CLASSES):
        order = np.random.default_rng([seed, ci, 99, 99]).permutation(per_class)
        split_of = {}
        for rank, j in enumerate(order):
            split_of[int(j)] = "train" if rank < n_train else ("val" if rank < n_train + n_val else "test")
        for j in range(per_class):
            imgid = ci * per_class + j
            _, labels, boxes, caps = results[imgid]
            filename = f"{imgid + 1}.tif"
            sentids = [imgid * SENTENCES_PER_IMAGE + k for k in range(SENTENCES_PER_IMAGE)]
            images.append({
                "filename": filename,
                "imgid": imgid,
                "split": split_of[j],
                "class": scene,
                "sentids": sentids,
                "sentences": [
                    {"tokens": tokenize(raw), "raw": raw, "imgid": imgid, "sentid": sid}
                    for sid, raw in zip(sentids, caps, strict=True)
                ],
            })  # fmt: skip
            label_rows.append(f"{scene}{j:0{width}d}\t" + "\t".join(str(v) for v in labels))
            box_entries.append({"imgid": imgid, "filename": filename, "boxes": boxes})
    dataset = {
        "dataset": DATASET_NAME,
        "synthetic": {
            "seed": seed,
            "per_class": per_class,
            "size": size,
            "generator": GENERATOR_VERSION,
            "tiff": TIFF_OPTIONS["compression"],
        },
        "images": images,
    }
    (out / "dataset.json").write_text(json.dumps(dataset, separators=(",", ":")) + "\n", encoding="utf-8")
    header = "IMAGE\\LABEL\t" + "\t".join(LABELS)
    (out / "multilabels.txt").write_text("\n".join([header, *label_rows]) + "\n", encoding="utf-8")
    boxes_doc = {
        "concepts": {c.name: c.label for c in CONCEPTS.values() if c.boxed},
        "images": box_entries,
    }
    (out / "boxes.json").write_text(json.dumps(boxes_doc, separators=(",", ":")) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------ gallery


def _font(px: int):
    try:
        return ImageFont.load_default(size=px)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _wrap(text: str, font, width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    return lines + ([line] if line else [])


def make_gallery(
    out: Path, per_class: int, results: dict[int, tuple], path: Path, cols: int = 7, thumb: int = 200
) -> Path:
    """A grid with the first picture of every class and its first caption under it."""
    font = _font(13)
    pad, text_h = 8, 52
    rows = math.ceil(len(UCM_CLASSES) / cols)
    sheet = Image.new(
        "RGB", (cols * (thumb + pad) + pad, rows * (thumb + text_h + pad) + pad), (250, 250, 248)
    )
    draw = ImageDraw.Draw(sheet)
    for ci in range(len(UCM_CLASSES)):
        imgid = ci * per_class
        r, c = divmod(ci, cols)
        x, y = pad + c * (thumb + pad), pad + r * (thumb + text_h + pad)
        with Image.open(out / "imgs" / f"{imgid + 1}.tif") as im:
            sheet.paste(im.convert("RGB").resize((thumb, thumb), Image.BICUBIC), (x, y))
        caption = results[imgid][3][0].removesuffix(" .") + "."
        for k, line in enumerate(_wrap(caption, font, thumb, draw)[:3]):
            draw.text((x, y + thumb + 3 + k * 16), line, fill=(20, 20, 20), font=font)
    # a 256-colour palette keeps the preview small (about 0.4 MB instead of 1.5 MB) at no visible cost
    sheet.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(path, optimize=True)
    return path
