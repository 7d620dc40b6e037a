"""Importing the detector (hence ultralytics) must leave PIL.Image.open alone: ultralytics' global patch
turns a non-image into a pip install attempt and a ModuleNotFoundError, which would hide our 'not an image'
errors in the data readers and the service's intake."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from captioning.data.images import load_image
from captioning.errors import DataError


def test_detector_import_keeps_pil_open_and_non_images_stay_named(tmp_path: Path):
    from captioning.config_schema import DetectorCfg, DetectorTrain
    from captioning.models.lightcap.detector import ProposalDetector

    ProposalDetector(DetectorCfg(yaml="yolov5n.yaml", imgsz=64, train=DetectorTrain(epochs=1)))
    assert Image.open.__module__.startswith("PIL"), Image.open.__module__
    (tmp_path / "junk.tif").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"junk\.tif: not an image"):
        load_image(tmp_path / "junk.tif")
