"""Loaders that ``captioning.inference.TASKS`` points at for LightCap's store models.

``load_concept_extractor(version, store)`` (task ``concepts``): the concepts model's folder holds the aligner and
the concept vocabulary; its manifest lists its parents with exact versions, and they are loaded through the store
(hash-verified): ``clip@N`` (the grid encoder's weights: the ``visual.*`` tensors of ``model.safetensors``) and
``concepts-detector@M`` (``detector.safetensors``, rebuilt from the yaml in its manifest's config).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from captioning.config import manifest_config
from captioning.config_schema import ClipConfig, ConceptsConfig
from captioning.errors import StoreError
from captioning.weights import load_state

if TYPE_CHECKING:  # pragma: no cover
    from captioning.store import ModelStore, ModelVersion

CLIP_WEIGHTS = "model.safetensors"


def parent_version(version: ModelVersion, store: ModelStore, name: str) -> ModelVersion:
    """The exact parent ``name@N`` listed in ``version``'s manifest, loaded and verified."""
    for parent in version.manifest.get("parents") or []:
        if parent.get("name") == name:
            return store.load(f"{name}@{int(parent['version'])}")
    listed = ", ".join(f"{p.get('name')}@{p.get('version')}" for p in version.manifest.get("parents") or []) or "none"
    raise StoreError(f"{version.spec}: its manifest lists no {name!r} parent (parents: {listed})")


def load_grid_encoder(clip_version: ModelVersion) -> Any:
    """The frozen CLIP grid encoder of a published ``clip`` version."""
    from captioning.models.lightcap.clip_encoder import GridEncoder

    cfg = manifest_config(clip_version, ClipConfig)
    cfg.checkpoint = None  # the published weights, not the file it was trained from
    encoder = GridEncoder.from_config(cfg)
    encoder.load_clip_state_dict(load_state(clip_version.file(CLIP_WEIGHTS)), source=clip_version.spec)
    encoder.source = str(clip_version.path)  # what its converted network is shared by (captioning.sharing)
    return encoder.freeze()


def load_detector(detector_version: ModelVersion) -> Any:
    from captioning.models.lightcap.detector import WEIGHTS_FILE, ProposalDetector

    detector = ProposalDetector(manifest_config(detector_version, ConceptsConfig).detector)
    detector.load_tensors(load_state(detector_version.file(WEIGHTS_FILE)), source=detector_version.spec)
    detector.source = str(detector_version.path)
    return detector


def prepare_extractor(extractor: Any, *, device: Any, dtype: Any, fast: bool = True,
                      vision_runtime: str | None = None) -> Any:
    """Put a ConceptExtractor on ``device`` with the runtime contract's attributes (``device``, ``dtype``,
    ``preprocessor``). ``fast``: batch norms folded (CLIP trunk and YOLO), both trunks channels-last and their
    weights in ``dtype`` (measured, CPU ms/img at batch 8, 1 thread: CLIP 23.9 as trained, 21.3 folded, 16.6
    folded + channels-last, 7.4 in bf16; YOLO bf16 13.1 -> 9.7 with channels-last, fp32 18.4 -> 17.7). The aligner
    stays float32: it is small and its ROI boxes need float32 coordinates. On the CPU the fast path then runs
    both networks on OpenVINO (``vision_runtime``, captioning/ov_runtime.py: chosen by measurement). ``fast=False``
    keeps the reference networks (bf16 then stores their weights in bf16)."""
    import torch

    from captioning.models.lightcap.clip_encoder import PilToTensor
    from captioning.ov_runtime import resolve_vision_runtime

    extractor.to(device)
    if fast:
        extractor.encoder.optimize_for_inference(dtype, channels_last=True)
        extractor.detector.optimize_for_inference(dtype, channels_last=True)
        if resolve_vision_runtime(vision_runtime, device) == "openvino":
            precision = "bf16" if dtype == torch.bfloat16 else "fp32"
            extractor.encoder.use_openvino(precision, extractor.encoder_size,
                                           share=getattr(extractor.encoder, "source", None))
            extractor.detector.use_openvino(precision, share=getattr(extractor.detector, "source", None))
    elif dtype != torch.float32:
        extractor.encoder.to(dtype=dtype)
        extractor.detector.model.to(dtype=dtype)
    extractor.device, extractor.dtype, extractor.fast = torch.device(device), dtype, bool(fast)
    extractor.preprocessor = PilToTensor(extractor.image_size)
    extractor.preprocess = extractor.preprocessor
    return extractor


def load_concept_extractor(
    version: ModelVersion, store: ModelStore, *, device: str = "cpu", precision: str = "fp32", fast: bool = True,
    vision_runtime: str | None = None,
) -> Any:
    """Task ``concepts``, and the extractor of every LightCap captioner trained on ``version``: one runtime object
    per (version, device, precision, ``fast``, vision runtime) while anything holds it (``captioning.sharing``),
    so serving ``concepts`` beside the ``lightcap`` trained on it holds the CLIP trunk, detector and aligner once
    (bench/results/memory.md: the second holder +0.0 MiB; another concepts version, as the defaults serve, +74.5)."""
    from captioning.accel import runtime_placement
    from captioning.ov_runtime import resolve_vision_runtime
    from captioning.sharing import shared

    dev, dtype = runtime_placement(device, precision)
    runtime = resolve_vision_runtime(vision_runtime, dev) if fast else "torch"
    key = ("concept extractor", str(version.path), version.manifest.get("digest"), str(dev), str(dtype), bool(fast),
           runtime)
    return shared(key, lambda: _build_concept_extractor(version, store, dev, dtype, fast, runtime))


def _build_concept_extractor(version: ModelVersion, store: ModelStore, device: Any, dtype: Any, fast: bool,
                             vision_runtime: str) -> Any:
    from captioning.models.lightcap.concepts import (
        ALIGNER_FILE,
        ConceptExtractor,
        ConceptVocabulary,
        RegionAligner,
    )

    cfg = manifest_config(version, ConceptsConfig)
    encoder = load_grid_encoder(parent_version(version, store, "clip"))
    detector = load_detector(parent_version(version, store, "concepts-detector"))
    vocab = ConceptVocabulary.load(version.path)
    aligner = RegionAligner.from_config(encoder.channels, cfg.align, vocab.dim)
    state = load_state(version.file(ALIGNER_FILE))
    try:
        aligner.load_state_dict(state)
    except RuntimeError as exc:
        raise StoreError(f"{version.spec}: {ALIGNER_FILE} does not fit its config ({exc})") from exc
    extractor = ConceptExtractor(encoder, detector, aligner, vocab, cfg)
    extractor.name, extractor.version, extractor.manifest = version.name, version.version, version.manifest
    return prepare_extractor(extractor.eval(), device=device, dtype=dtype, fast=fast, vision_runtime=vision_runtime)


def load_captioner(
    version: ModelVersion, store: ModelStore, *, device: str = "cpu", precision: str = "fp32", fast: bool = True,
    vision_runtime: str | None = None,
) -> Any:
    """Task ``lightcap``: the LightCap captioner (``captioner.safetensors``, ``model.json``, ``tokenizer.json``) with
    the concept extractor it was trained on (its ``concepts`` parent, exact version), as one runtime object:
    ``preprocess(pil)`` and ``caption(images, options)`` (captioning/models/lightcap/pipeline.py)."""
    from captioning.models.lightcap.pipeline import load_lightcap

    return load_lightcap(version, store, device=device, precision=precision, fast=fast, vision_runtime=vision_runtime)
