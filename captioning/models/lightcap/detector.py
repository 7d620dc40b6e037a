"""Class-agnostic foreground detector of LightCap's concept extractor: ultralytics YOLOv5n with one class.

The network is ultralytics' own ``DetectionModel`` built from ``yolov5n.yaml`` with ``nc=1`` (what
``YOLO("yolov5n.yaml")`` builds, then re-headed for one class by ultralytics' trainer). The store keeps only
its tensors (``detector.safetensors``); loading rebuilds the network from the yaml and loads them, so no
pickle is ever read from the store.

``ProposalDetector(detector)``: ``detector`` is the typed ``detector`` section of a concepts config
(``captioning.config_schema.DetectorCfg``)::

    yaml: yolov5n.yaml   # ultralytics model config
    imgsz: 256           # side the network runs at (multiple of 32)
    conf: 0.25           # confidence threshold of a proposal
    iou: 0.6             # NMS IoU threshold
    max_det: 50          # proposals kept per image

``forward(images)``: ``images`` ``[B, 3, H, W]`` RGB in [0, 1] -> list of B ``(boxes [N, 4] xyxy in the
input's pixels, scores [N])``, highest score first. Batched: one network pass for the whole batch.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from pathlib import Path

import torch
from torch import nn

from captioning.config_schema import DetectorCfg, expect_section
from captioning.errors import ConfigError

WEIGHTS_FILE = "detector.safetensors"


def _quiet_ultralytics() -> None:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    keep_pil_open()


def keep_pil_open() -> None:
    """Import ultralytics without its global ``PIL.Image.open`` patch.

    On import, ultralytics replaces ``PIL.Image.open`` process-wide with a wrapper that, on the first file
    Pillow cannot identify, tries to pip-install ``pi-heif`` and then raises ``ModuleNotFoundError`` offline
    instead of ``UnidentifiedImageError``. Our readers and the service's intake rely on the latter to name a
    non-image, and a server must never install packages, so the original function is put back."""
    import ultralytics.utils.patches as patches  # applies the patch on first import
    from PIL import Image

    if Image.open is patches.image_open:
        Image.open = patches._image_open  # the function ultralytics saved before patching


class ProposalDetector(nn.Module):
    def __init__(self, detector: DetectorCfg):
        super().__init__()
        self.cfg = expect_section(detector, DetectorCfg, "ProposalDetector(detector)")
        _quiet_ultralytics()
        from ultralytics.nn.tasks import DetectionModel

        self.imgsz = self.cfg.imgsz
        if self.imgsz % 32:
            raise ConfigError(f"concepts config: detector.imgsz {self.imgsz} must be a multiple of 32")
        self.conf = self.cfg.conf
        self.iou = self.cfg.iou
        self.max_det = self.cfg.max_det
        with contextlib.redirect_stdout(io.StringIO()):
            self.model = DetectionModel(self.cfg.yaml, nc=1, verbose=False)
        self.model.eval()

    # weights ---------------------------------------------------------------------------------------------
    def load_weights(self, path: str | Path) -> None:
        from captioning.weights import load_state

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: detector weights not found")
        self.load_tensors(load_state(path), source=str(path))

    def load_tensors(self, state: dict[str, torch.Tensor], *, source: str) -> None:
        expected = self.model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
        if missing or unexpected or wrong:
            raise ConfigError(
                f"{source}: detector weights do not fit {self.cfg.yaml} with one class "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]})"
            )
        self.model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})

    def save_weights(self, path: str | Path, dtype: torch.dtype = torch.float16) -> Path:
        from captioning.weights import DTYPES, save_state

        names = {d: n for n, d in DTYPES.items()}
        return save_state(self.model.state_dict(), path, names[dtype])

    @staticmethod
    def tensors_from_ultralytics_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
        """The fp32 tensors of an ultralytics training checkpoint (``best.pt``/``last.pt``, EMA preferred).

        Only for files this project's own training just wrote (they are pickles); the store never holds one.
        """
        _quiet_ultralytics()
        ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
        model = ckpt.get("ema") or ckpt.get("model")
        if model is None:
            raise ConfigError(f"{path}: not an ultralytics checkpoint (no 'ema' or 'model')")
        return {k: v.float() if v.is_floating_point() else v for k, v in model.float().state_dict().items()}

    # inference ---------------------------------------------------------------------------------------------
    channels_last = False

    def optimize_for_inference(self, dtype: torch.dtype = torch.float32, *, channels_last: bool = False) -> int:
        """ultralytics' own ``fuse()`` (each Conv's batch norm folded into it, RepConv branches merged), weights
        in ``dtype`` and optionally channels-last. Returns the number of batch norms folded."""
        from captioning.accel import count_batch_norms

        before = count_batch_norms(self.model)
        with contextlib.redirect_stdout(io.StringIO()):
            self.model.fuse(verbose=False)
        self.model.to(dtype=dtype)
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        return before - count_batch_norms(self.model)

    accelerated = None  # an OpenVinoNet running the network (``use_openvino``), else the torch network runs

    def export_network(self) -> nn.Module:
        """A copy of the (fused) network with its Detect head in ultralytics' export mode: one output tensor
        ``[B, 4 + 1, anchors]`` (anchors made for the input's size), the same decoded boxes and scores the
        eval-mode network returns first. What OpenVINO (``use_openvino``) and the bench's runtimes convert."""
        import copy

        from ultralytics.nn.modules import Detect

        network = copy.deepcopy(self.model)
        for module in network.modules():
            if isinstance(module, Detect):
                module.export, module.format, module.dynamic = True, "openvino", True
        return _FirstOutput(network)

    def use_openvino(self, precision: str, *, share: str | None = None) -> None:
        """Run the network (``export_network``) on OpenVINO in ``precision`` for CPU batches at ``imgsz``.
        ``share``: the published version these weights come from; detectors of the same one share one
        converted network."""
        from captioning.ov_runtime import OpenVinoNet
        from captioning.sharing import shared

        def build() -> OpenVinoNet:
            return OpenVinoNet(self.export_network(), torch.zeros(1, 3, self.imgsz, self.imgsz), precision=precision,
                               name="YOLO")

        self.accelerated = build() if share is None else shared(("YOLO", share, precision, self.imgsz), build)

    def train(self, mode: bool = True) -> ProposalDetector:  # inference-only module: the network stays in eval
        super().train(False)
        return self

    @torch.no_grad()
    def forward(
        self, images: torch.Tensor, *, conf: float | None = None, max_det: int | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        from ultralytics.utils.nms import non_max_suppression

        height, width = images.shape[-2:]
        weight = next(self.model.parameters())
        x = images.to(weight.device, non_blocking=True).float()
        if (height, width) != (self.imgsz, self.imgsz):
            x = nn.functional.interpolate(x, size=(self.imgsz, self.imgsz), mode="bilinear", align_corners=False)
        if self.accelerated is not None and self.accelerated.accepts(x):
            prediction = self.accelerated(x)  # [B, 4 + 1, anchors]
        else:
            x = x.to(weight.dtype)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            prediction = self.model(x)  # eval: ([B, 4 + 1, anchors] xywh + score, raw head outputs)
            if isinstance(prediction, (tuple, list)):
                prediction = prediction[0]
        detections = non_max_suppression(
            prediction.float(),
            conf_thres=self.conf if conf is None else float(conf),
            iou_thres=self.iou,
            agnostic=True,
            max_det=self.max_det if max_det is None else int(max_det),
            # no time limit: ultralytics otherwise stops after 2 s + 50 ms per image and returns nothing for the
            # batch's remaining images, so a busy CPU silently lost proposals (and changed every figure)
            max_time_img=math.inf,
        )  # B x [N, 6] (x1, y1, x2, y2, score, class)
        scale = torch.tensor([width / self.imgsz, height / self.imgsz] * 2, dtype=torch.float32, device=x.device)
        out = []
        for det in detections:
            boxes = det[:, :4].float() * scale  # [N,4] in the input's pixels
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
            out.append((boxes, det[:, 4].float()))
        return out


class _FirstOutput(nn.Module):
    """A network whose first output is the prediction (what OpenVINO converts)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.network(x)
        return out[0] if isinstance(out, (tuple, list)) else out
