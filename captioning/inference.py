"""What serving code loads from the model store.

``load_model(store, spec)`` resolves ``spec`` (``name``, ``name@3``, ``name@production``), verifies the
version's hashes, and builds the runtime object named by the manifest's ``task``. The objects follow the
contract in docs/ARCHITECTURE.md ("Inference contract"): ``name``, ``version``, ``manifest``,
``preprocess(pil) -> Tensor[3,H,W]`` and one batch method (``caption`` / ``predict`` / ``extract``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from captioning.errors import StoreError

if TYPE_CHECKING:  # pragma: no cover
    from captioning.store import ModelStore, ModelVersion

# manifest "task" -> "module:function(version, store, *, device, precision) -> runtime object"
LOADERS: dict[str, str] = {
    "ucm-classifier": "captioning.models.ucm.runtime:load_classifier",
    "ucm-captioner": "captioning.models.ucm.runtime:load_captioner",
    "concepts": "captioning.models.lightcap.runtime:load_concept_extractor",
    "lightcap": "captioning.models.lightcap.runtime:load_captioner",
}


@dataclass
class CaptionOut:
    text: str
    tokens: list[str]
    score: float  # mean log-probability per generated token (higher is better)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Concept:
    concept: str
    score: float
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in the preprocessed image's pixels
    label: str | None = None  # the remote-sensing label it maps to, if any


def servable_tasks() -> list[str]:
    return sorted(LOADERS)


def load_model(
    store: ModelStore, spec: str, *, verify: bool = True, device: str = "cpu", precision: str = "fp32"
) -> Any:
    """The runtime of ``spec`` with its weights on ``device`` ("cpu", "cuda", "cuda:1") computing in
    ``precision`` ("fp32" or "bf16"; see ``captioning.accel`` for resolving "auto")."""
    version: ModelVersion = store.load(spec, verify=verify)
    task = version.manifest.get("task")
    target = LOADERS.get(task)
    if target is None:
        raise StoreError(
            f"{version.name}@{version.version}: task {task!r} cannot be served (servable: {', '.join(servable_tasks())})"
        )
    module_name, func_name = target.split(":")
    loader = getattr(importlib.import_module(module_name), func_name)
    return loader(version, store, device=device, precision=precision)
