"""LightCap concept extractor, stage 1: the class-agnostic foreground detector (``captioner train concepts-detector``).

ultralytics YOLOv5n (``YOLO("yolov5n.yaml")``, re-headed by ultralytics for the dataset's single class) trained
fully offline on the dataset's ``boxes.json``: every box becomes class 0 ("object"). The boxes are written as a
YOLO dataset inside the run directory (``yolo_data/``: images linked, one label file per image), ultralytics'
settings and outputs stay in the run directory too (``YOLO_CONFIG_DIR``, ``project=``), ``plots=False``.

Determinism and resuming are ultralytics' own (``seed=``, ``deterministic=True``; ``--resume`` continues its
``last.pt``); the loss history, the loss curve and the published manifest go through ``TrainRun`` like every stage.

Evaluation on the val (and test) split uses the published network exactly as the extractor runs it
(``ProposalDetector``: batched, resize to ``imgsz``, NMS): class-agnostic box recall and AP at IoU 0.5.

Published as ``concepts-detector``: ``detector.safetensors`` (tensors only; the network is rebuilt from the yaml
named in the manifest's config), ``loss_curve.png``, ``metrics.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

from captioning.config import load_config
from captioning.config_schema import DetectorCfg
from captioning.data import load_dataset
from captioning.errors import DataError
from captioning.weights import torch_dtype
from training.runner import TrainRun, add_common_args

STAGE = "concepts-detector"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_args(parser)


def run(args: argparse.Namespace) -> int:
    from captioning.models.lightcap.detector import WEIGHTS_FILE, ProposalDetector

    config = load_config("concepts", args.profile, path=args.config, overrides=args.set)
    det_cfg = config.detector
    corpus = load_dataset(args.data)
    if corpus.boxes is None:
        raise DataError("the dataset has no boxes.json: the detector trains on its boxes", path=corpus.root)
    for split in ("train", "val"):
        if not corpus.split(split):
            raise DataError(f"no images in split {split!r}", path=corpus.root)
    run = TrainRun(STAGE, args, config)
    yolo_root = run.run_dir.resolve()
    data_yaml = write_yolo_dataset(corpus, yolo_root / "yolo_data")

    resumed = run.load_checkpoint()  # loss history; the network and optimiser resume from ultralytics' last.pt
    tensors = train_yolo(run, det_cfg, data_yaml, yolo_root, resume=resumed)

    detector = ProposalDetector(det_cfg)
    detector.load_tensors(tensors, source="trained detector")
    metrics: dict[str, Any] = {"parameters": sum(p.numel() for p in detector.parameters())}
    for split in ("val", "test"):
        if corpus.split(split):
            metrics.update({f"{split}_{k}": v for k, v in evaluate_detector(detector, corpus, split, det_cfg).items()})

    if run.is_main:
        staging = run.staging_dir()
        detector.save_weights(staging / WEIGHTS_FILE, dtype=torch_dtype(config.weights_dtype))
        run.publish_stage(STAGE, staging, task="concepts-detector", metrics=metrics, data=corpus.manifest_record())
    run.close()
    return 0


# ---------------------------------------------------------------------------------------------- YOLO dataset
def write_yolo_dataset(corpus, root: Path) -> Path:
    """``root/images/<split>/<file>`` (symlinks), ``root/labels/<split>/<stem>.txt`` (``0 cx cy w h``, normalised),
    ``root/data.yaml`` (one class). Returns the yaml's path."""
    import yaml
    from PIL import Image

    for split in ("train", "val"):
        image_dir, label_dir = root / "images" / split, root / "labels" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        label_dir.mkdir(parents=True, exist_ok=True)
        for rec in corpus.split(split):
            name = f"{rec.imgid:06d}_{Path(rec.filename).name}"
            link = image_dir / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(Path(rec.path).resolve())
            with Image.open(rec.path) as im:
                width, height = im.size
            lines = []
            for b in corpus.boxes.get(rec.imgid, []):
                x1, y1, x2, y2 = (max(0.0, min(v, lim)) for v, lim in zip(b.xyxy, (width, height, width, height), strict=True))
                if x2 - x1 < 1 or y2 - y1 < 1:
                    continue
                cx, cy, w, h = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height
                lines.append(f"0 {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
            (label_dir / f"{Path(name).stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    data_yaml = root / "data.yaml"
    data_yaml.write_text(
        yaml.safe_dump({"path": str(root), "train": "images/train", "val": "images/val", "names": {0: "object"}})
    )
    return data_yaml


# ---------------------------------------------------------------------------------------------- training
def train_yolo(run: TrainRun, det_cfg: DetectorCfg, data_yaml: Path, root: Path, *, resume: bool) -> dict[str, torch.Tensor]:
    """Train (or resume) with ultralytics; returns the final EMA network's fp32 tensors."""
    from captioning.models.lightcap.detector import ProposalDetector

    if "ultralytics" not in sys.modules:  # its settings file and font cache stay in the run directory
        os.environ["YOLO_CONFIG_DIR"] = str(root / "ultralytics")
    os.environ["YOLO_OFFLINE"] = "1"
    from ultralytics import YOLO

    from captioning.models.lightcap.detector import keep_pil_open

    keep_pil_open()

    train_cfg = det_cfg.train.to_dict()  # the ultralytics train() arguments the config gives
    epochs = train_cfg.pop("epochs")
    batch = train_cfg.pop("batch", det_cfg.train.batch)
    weights_dir = root / "yolo" / "weights"
    last = weights_dir / "last.pt"

    def on_train_start(trainer: Any) -> None:  # a resumed run continues after ultralytics' last saved epoch
        run.history = run.history[: trainer.start_epoch]
        run.epoch = trainer.start_epoch

    def on_epoch_end(trainer: Any) -> None:  # one TrainRun epoch per ultralytics epoch: history + loss curve
        losses = {k.split("/")[-1]: float(v) for k, v in trainer.label_loss_items(trainer.tloss, prefix="train").items()}
        run.log_step(loss=sum(losses.values()))
        run.end_epoch(extra=losses)

    def with_callbacks(model: Any) -> Any:
        model.add_callback("on_train_start", on_train_start)
        model.add_callback("on_train_epoch_end", on_epoch_end)
        return model

    if resume and run.epoch >= epochs and last.is_file():  # all epochs done (e.g. publishing to another store)
        return ProposalDetector.tensors_from_ultralytics_checkpoint(last)
    if resume and last.is_file():
        model = with_callbacks(YOLO(str(last)))
        model.train(resume=True)
    else:
        model = with_callbacks(YOLO(det_cfg.yaml))
        model.train(
            data=str(data_yaml),
            epochs=epochs,
            imgsz=det_cfg.imgsz,
            batch=batch,
            device=_ultralytics_device(run.device),
            workers=int(getattr(run.args, "workers", 0) or 0),
            project=str(root),
            name="yolo",
            exist_ok=True,
            seed=run.seed,
            deterministic=True,
            plots=False,
            val=False,  # validated by evaluate_detector below, as the extractor runs it
            amp=False,
            cache="ram",
            pretrained=det_cfg.pretrained or False,  # a local ultralytics .pt
            verbose=False,
            **train_cfg,
        )
    trainer = getattr(model, "trainer", None)
    if trainer is not None and getattr(trainer, "ema", None) is not None:
        return {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in trainer.ema.ema.state_dict().items()}
    return ProposalDetector.tensors_from_ultralytics_checkpoint(last)


def _ultralytics_device(device: torch.device) -> str:
    return "cpu" if device.type == "cpu" else str(device.index or 0)


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_detector(detector, corpus, split: str, det_cfg: DetectorCfg, batch_size: int = 32) -> dict[str, float]:
    """Class-agnostic box recall / AP at IoU 0.5 on a split, with the detector as the extractor runs it.

    One pass at confidence 0.001 (as detection AP is usually measured, so the precision-recall curve is complete)
    gives ``box_ap@0.5``; recall and precision are those of the proposals above the operating threshold
    ``detector.conf`` (what the concept extractor gets).
    """
    from captioning.metrics import box_recall_ap
    from captioning.models.lightcap.concepts_data import box_split

    size = det_cfg.imgsz
    data = box_split(corpus, split, size)
    predictions = []
    for start in range(0, len(data), batch_size):
        images = data.images[start : start + batch_size].float() / 255.0
        predictions.extend(detector(images, conf=0.001, max_det=max(100, detector.max_det)))
    curve = box_recall_ap(predictions, data.boxes, iou_threshold=0.5)
    kept = []
    for boxes, scores in predictions:
        keep = scores >= detector.conf
        kept.append((boxes[keep][: detector.max_det], scores[keep][: detector.max_det]))
    operating = box_recall_ap(kept, data.boxes, iou_threshold=0.5)
    return {
        "box_ap@0.5": round(curve["AP"], 4),
        "box_recall@0.5": round(operating["recall"], 4),
        "box_precision@0.5": round(operating["precision"], 4),
        "proposals_per_image": round(operating["n_predictions"] / max(1, len(data)), 2),
        "boxes_per_image": round(operating["n_ground_truth"] / max(1, len(data)), 2),
    }
