"""Loaders that ``captioning.inference.LOADERS`` points at for LightCap's store models.

``load_concept_extractor(version, store)`` (task ``concepts``): the concepts model's folder holds the aligner and
the concept vocabulary; its manifest lists its parents with exact versions, and they are loaded through the store
(hash-verified): ``clip@N`` (the grid encoder's weights: the ``visual.*`` tensors of ``model.safetensors``) and
``concepts-detector@M`` (``detector.safetensors``, rebuilt from the yaml in its manifest's config).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from captioning.errors import StoreError

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
    from captioning.models.lightcap.concepts_data import load_tensors

    cfg = dict(clip_version.manifest.get("config") or {})
    cfg["checkpoint"] = None  # the published weights, not the file it was trained from
    encoder = GridEncoder.from_config(cfg)
    encoder.load_clip_state_dict(load_tensors(clip_version.file(CLIP_WEIGHTS)), source=clip_version.spec)
    return encoder.freeze()


def load_detector(detector_version: ModelVersion) -> Any:
    from captioning.models.lightcap.concepts_data import load_tensors
    from captioning.models.lightcap.detector import WEIGHTS_FILE, ProposalDetector

    cfg = (detector_version.manifest.get("config") or {}).get("detector")
    if not cfg:
        raise StoreError(f"{detector_version.spec}: manifest config has no 'detector' section")
    detector = ProposalDetector(cfg)
    detector.load_tensors(load_tensors(detector_version.file(WEIGHTS_FILE)), source=detector_version.spec)
    return detector


def _cpu_fp32_only(version: ModelVersion, device: str, precision: str) -> None:
    if str(device) != "cpu" or precision != "fp32":
        raise StoreError(f"{version.spec}: only device cpu / precision fp32 are implemented, not {device} / {precision}")


def load_concept_extractor(version: ModelVersion, store: ModelStore, *, device: str = "cpu",
                           precision: str = "fp32") -> Any:
    _cpu_fp32_only(version, device, precision)
    from captioning.models.lightcap.concepts import (
        ALIGNER_FILE,
        ConceptExtractor,
        ConceptVocabulary,
        RegionAligner,
    )
    from captioning.models.lightcap.concepts_data import load_tensors

    cfg = version.manifest.get("config") or {}
    encoder = load_grid_encoder(parent_version(version, store, "clip"))
    detector = load_detector(parent_version(version, store, "concepts-detector"))
    vocab = ConceptVocabulary.load(version.path)
    aligner = RegionAligner.from_config(encoder.channels, cfg["align"], vocab.dim)
    state = load_tensors(version.file(ALIGNER_FILE))
    try:
        aligner.load_state_dict(state)
    except RuntimeError as exc:
        raise StoreError(f"{version.spec}: {ALIGNER_FILE} does not fit its config ({exc})") from exc
    extractor = ConceptExtractor(encoder, detector, aligner, vocab, cfg)
    extractor.name, extractor.version, extractor.manifest = version.name, version.version, version.manifest
    return extractor.eval()


def load_captioner(version: ModelVersion, store: ModelStore, *, device: str = "cpu", precision: str = "fp32") -> Any:
    _cpu_fp32_only(version, device, precision)
    """Task ``lightcap``: the LightCap captioner (``captioner.safetensors``, ``model.json``, ``tokenizer.json``) with
    the concept extractor it was trained on (its ``concepts`` parent, exact version), as one runtime object:
    ``preprocess(pil)`` and ``caption(images, beam_size=..., max_length=..., ...)`` (captioning/models/lightcap/pipeline.py)."""
    from captioning.models.lightcap.pipeline import load_lightcap

    return load_lightcap(version, store)
