"""The one inference contract: what a served model is, which tasks exist, how a batch runs and how one result
is written. Routes, batch jobs, scene jobs and the offline CLIs all go through this table (DESIGN.md "One
inference path"); adding a model family is one ``TASKS`` entry plus its runtime.

Runtimes (``load_model(store, spec)``) follow the typed protocols below: a ``Captioner``, a ``Labeler`` or a
``ConceptExtractor``. Each takes a CPU float32 batch ``[B,3,H,W]`` made by its own ``preprocess`` and answers
on the CPU.

A *kind* is what a request asks for (``caption``, ``labels``, ``concepts``); a *task* is what a manifest says a
model does (``lightcap``, ``ucm-captioner``, ``ucm-classifier``, ``concepts``). ``KINDS[kind]`` says:

* ``params``: the request parameters (a frozen pydantic model; unknown names are refused);
* ``resolve(runtime, params, limits) -> options``: the parameters resolved against the chosen model's published
  defaults and validated (``OptionError`` names the parameter and the allowed range) -- done before queueing;
* ``batch_key(options)``: items whose keys are equal may share a batch (equivalent requests batch together);
* ``run(runtime, options, images) -> results``: one batch;
* ``record(result, runtime, options, frame) -> dict``: one result, the same dict wherever it is written.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from captioning.errors import CaptionerError, StoreError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

    from captioning.decoding import DecodeOptions
    from captioning.store import ModelStore, ModelVersion


# ---------------------------------------------------------------------------------------------- results
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


def group_concepts(instances: list[Concept]) -> list[Concept]:
    """Distinct words: each word's best-scoring instance, best first (ties keep the earlier instance)."""
    best: dict[str, Concept] = {}
    for c in instances:
        if c.concept not in best or c.score > best[c.concept].score:
            best[c.concept] = c
    return sorted(best.values(), key=lambda c: -c.score)


def counts(instances: list[Concept]) -> dict[str, int]:
    """Instances per concept word, most frequent first (then alphabetical): ``{"house": 29, "tree": 4}``."""
    tally: dict[str, int] = {}
    for c in instances:
        tally[c.concept] = tally.get(c.concept, 0) + 1
    return dict(sorted(tally.items(), key=lambda kv: (-kv[1], kv[0])))



# ---------------------------------------------------------------------------------------------- runtimes
@runtime_checkable
class Runtime(Protocol):
    name: str  # store name
    version: int
    manifest: dict[str, Any]
    device: torch.device  # where the weights live and batches run
    dtype: torch.dtype  # compute precision: float32 or bfloat16
    preprocessor: Callable[[Image.Image], torch.Tensor]  # picklable, no weights; ``preprocess`` is the same

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> float32 CPU tensor [3,H,W] (a fixed size per model)."""
        ...


@runtime_checkable
class Captioner(Runtime, Protocol):
    decoding: DecodeOptions  # the published decoding
    max_caption_length: int | None  # the longest max_length the model can decode (None: no limit)

    def caption(self, images: torch.Tensor, options: DecodeOptions) -> list[CaptionOut]: ...


@runtime_checkable
class Labeler(Runtime, Protocol):
    labels: list[str]
    threshold: float

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """-> probabilities [B, len(labels)]"""
        ...


@runtime_checkable
class ConceptExtractor(Runtime, Protocol):
    def extract(self, images: torch.Tensor) -> list[list[Concept]]:
        """-> every object instance per image, best first; boxes in the preprocessed image's pixels"""
        ...


# ---------------------------------------------------------------------------------------------- options
class OptionError(CaptionerError):
    """A request parameter that the chosen model cannot take; ``parameter`` names it."""

    def __init__(self, parameter: str, message: str):
        super().__init__(f"parameter {parameter!r}: {message}")
        self.parameter = parameter
        self.message = message


@dataclass(frozen=True)
class Limits:
    """What a deployment allows a request to ask for (service settings; the CLIs pass none)."""

    max_beam_size: int | None = None
    max_length: int | None = None


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CaptionParams(_Params):
    beam_size: int | None = Field(None, ge=1, description="beam width (1: greedy; default: the model's published "
                                  "decoding); at most CAPTIONER_MAX_BEAM_SIZE")
    max_length: int | None = Field(None, ge=1, description="longest caption in tokens (default: the model's); at "
                                   "least the model's min_length, at most CAPTIONER_MAX_LENGTH_LIMIT")


class LabelParams(_Params):
    threshold: float | None = Field(None, ge=0.0, le=1.0, description="override the model's decision threshold")


class ConceptParams(_Params):
    top_k: int | None = Field(None, ge=1, le=1000, description="keep the k highest-scoring entries")
    min_score: float = Field(0.0, ge=0.0, le=1.0, description="drop instances scoring below this")
    group: Literal["instance", "concept"] = Field(
        "instance", description="`instance`: every object found (with per-concept `counts`); `concept`: the "
        "distinct concept words, best box each")


def resolve_caption(runtime: Captioner, params: CaptionParams, limits: Limits) -> DecodeOptions:
    """The model's published decoding with the request's overrides, validated against the model and limits."""
    from captioning.decoding import DecodeOptions

    published = runtime.decoding
    top = limits.max_length
    if runtime.max_caption_length is not None:
        top = runtime.max_caption_length if top is None else min(top, runtime.max_caption_length)
    if params.beam_size is not None and limits.max_beam_size is not None and params.beam_size > limits.max_beam_size:
        raise OptionError("beam_size", f"{params.beam_size} is more than this server allows "
                          f"(1..{limits.max_beam_size}, CAPTIONER_MAX_BEAM_SIZE)")
    if params.max_length is not None:
        low = published.min_length
        if top is not None and params.max_length > top:
            why = ("CAPTIONER_MAX_LENGTH_LIMIT" if top == limits.max_length
                   else f"{runtime.name}'s positions after its prefix")
            raise OptionError("max_length", f"{params.max_length} is more than this server allows "
                              f"({low}..{top}, {why})")
        if params.max_length < low:
            allowed = f"{low}..{top}" if top is not None else f"at least {low}"
            raise OptionError("max_length", f"{params.max_length} is below {runtime.name}'s min_length {low} "
                              f"(allowed: {allowed})")
    try:
        return DecodeOptions.from_dict(published.to_dict(), beam_size=params.beam_size, max_length=params.max_length)
    except ValueError as exc:  # pragma: no cover - the checks above cover what a request can set
        raise OptionError("options", str(exc)) from None


def _no_batch_options(runtime: Any, params: BaseModel, limits: Limits) -> BaseModel:
    return params


def decode_key(options: DecodeOptions) -> Hashable:
    return tuple(sorted(options.to_dict().items()))


# ---------------------------------------------------------------------------------------------- batches
def run_caption(runtime: Captioner, options: DecodeOptions, images: torch.Tensor) -> list[CaptionOut]:
    return runtime.caption(images, options)


def run_labels(runtime: Labeler, options: Any, images: torch.Tensor) -> list[list[float]]:
    return [row.float().tolist() for row in runtime.predict(images)]  # [B][17]


def run_concepts(runtime: ConceptExtractor, options: Any, images: torch.Tensor) -> list[list[Concept]]:
    return runtime.extract(images)


def run_kind_batch(kind: str, runtime: Any, options: Any, payloads: Sequence[torch.Tensor]) -> list[Any]:
    """One batch of a kind, as every caller runs it (the service's pool replicas, the offline Engine): the
    preprocessed CPU float32 tensors stacked ``[B, 3, H, W]``, pinned for a GPU runtime (its host-to-device
    copy is then asynchronous), the kind's batch function under ``torch.inference_mode``."""
    import torch

    images = torch.stack(list(payloads))
    if runtime.device.type == "cuda":
        images = images.pin_memory()
    with torch.inference_mode():
        return KINDS[kind].run(runtime, options, images)


# ---------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Frame:
    """Where an image's results are drawn: its size as uploaded (after EXIF orientation) and the model input's."""

    width: int
    height: int
    input_width: int
    input_height: int


def finite(value: Any, digits: int = 6) -> float | None:
    """A JSON-safe number: rounded, and None for NaN / infinity."""
    value = float(value)
    return round(value, digits) if math.isfinite(value) else None


def _model(runtime: Any) -> dict[str, Any]:
    return {"model": runtime.name, "version": runtime.version}


def caption_record(out: CaptionOut, runtime: Any, options: Any, frame: Frame | None) -> dict[str, Any]:
    record = {"caption": out.text, "score": finite(out.score), "tokens": list(out.tokens)}
    if out.extra:
        record["extra"] = out.extra  # model-specific, e.g. LightCap's concept words
    return {**record, **_model(runtime)}


def labels_record(probs: list[float], runtime: Labeler, options: LabelParams, frame: Frame | None) -> dict[str, Any]:
    names = list(runtime.labels)
    threshold = float(runtime.threshold) if options.threshold is None else float(options.threshold)
    return {
        "labels": {name: finite(p) for name, p in zip(names, probs, strict=True)},
        "predicted": [name for name, p in zip(names, probs, strict=True) if p >= threshold],
        "threshold": threshold,
        **_model(runtime),
    }


def concept_dict(c: Concept, frame: Frame | None) -> dict[str, Any]:
    x1, y1, x2, y2 = (float(v) for v in c.box)
    if frame is not None:  # preprocessing resizes the whole image: the map back is a per-axis scale
        sx, sy = frame.width / frame.input_width, frame.height / frame.input_height
        x1, y1, x2, y2 = x1 * sx, y1 * sy, x2 * sx, y2 * sy
    return {"concept": c.concept, "score": finite(c.score), "box": [round(v, 2) for v in (x1, y1, x2, y2)],
            "label": c.label}


def select_concepts(instances: Sequence[Concept], options: ConceptParams) -> tuple[list[Concept], dict[str, int]]:
    """Instances at least ``min_score``, best first -> (the listed ones, per-concept counts of all kept).

    ``group="concept"`` lists the best instance of each distinct word; ``top_k`` trims the list (not the counts)."""
    kept = [c for c in sorted(instances, key=lambda c: -float(c.score)) if float(c.score) >= options.min_score]
    tally = counts(kept)
    if options.group == "concept":
        kept = group_concepts(kept)
    return (kept[: options.top_k] if options.top_k else kept), tally


def concepts_record(instances: list[Concept], runtime: Any, options: ConceptParams, frame: Frame | None
                    ) -> dict[str, Any]:
    listed, counts = select_concepts(instances, options)
    return {"concepts": [concept_dict(c, frame) for c in listed], "counts": counts, **_model(runtime)}


# ---------------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class KindSpec:
    """What a request kind means: its parameters, how they resolve, how a batch runs, how one result is written."""

    kind: str
    noun: str  # what a model of this kind is called in messages
    params: type[_Params]
    resolve: Callable[[Any, Any, Limits], Any]
    batch_key: Callable[[Any], Hashable]
    run: Callable[[Any, Any, Any], list[Any]]
    record: Callable[[Any, Any, Any, Frame | None], dict[str, Any]]
    protocol: type


@dataclass(frozen=True)
class TaskSpec:
    """A manifest task: which kind it serves, its loader, and the names a request may use for it."""

    task: str
    kind: str
    loader: str  # "module:function(version, store, *, device, precision, vision_runtime) -> runtime"
    request_names: tuple[str, ...] = ()  # besides the store name, e.g. "ucm" for ucm-captioner
    rank: int = 0  # the default model of a kind is the served one with the lowest rank


KINDS: dict[str, KindSpec] = {
    "caption": KindSpec("caption", "captioner", CaptionParams, resolve_caption, decode_key, run_caption, caption_record, Captioner),
    "labels": KindSpec("labels", "label predictor", LabelParams, _no_batch_options, lambda o: None, run_labels, labels_record, Labeler),
    "concepts": KindSpec("concepts", "concept extractor", ConceptParams, _no_batch_options, lambda o: None, run_concepts,
                         concepts_record, ConceptExtractor),
}
KIND_ORDER = tuple(KINDS)  # the first kind of a multi-task record is its primary (its model/version are top level)

TASKS: dict[str, TaskSpec] = {
    "lightcap": TaskSpec("lightcap", "caption", "captioning.models.lightcap.runtime:load_captioner", ("lightcap",), 0),
    "ucm-captioner": TaskSpec("ucm-captioner", "caption", "captioning.models.ucm.runtime:load_captioner", ("ucm",), 1),
    "ucm-classifier": TaskSpec("ucm-classifier", "labels", "captioning.models.ucm.runtime:load_classifier"),
    "concepts": TaskSpec("concepts", "concepts", "captioning.models.lightcap.runtime:load_concept_extractor"),
}


def servable_tasks() -> list[str]:
    return sorted(TASKS)


def task_spec(runtime_or_manifest: Any) -> TaskSpec:
    manifest = runtime_or_manifest if isinstance(runtime_or_manifest, dict) else runtime_or_manifest.manifest
    task = manifest.get("task")
    if task not in TASKS:
        raise StoreError(f"task {task!r} cannot be served (servable: {', '.join(servable_tasks())})")
    return TASKS[task]


def kind_of(runtime: Any) -> str:
    return task_spec(runtime).kind


def parse_kinds(text: str | Sequence[str]) -> list[str]:
    """``"caption,labels"`` -> the kinds in canonical order; an unknown one is an ``OptionError``."""
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    unknown = [n for n in names if n not in KINDS]
    if unknown or not names:
        raise OptionError("tasks", f"{','.join(unknown) or 'nothing'} is not a task (choose from {', '.join(KINDS)})")
    return [k for k in KIND_ORDER if k in names]


def combine_records(records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One record from the per-kind records of one image: the primary kind's fields at the top level, the other
    kinds' fields beside them with their model as ``<kind>_model: {name, version}``."""
    out: dict[str, Any] = {}
    for i, kind in enumerate(k for k in KIND_ORDER if k in records):
        rec = dict(records[kind])
        name, version = rec.pop("model"), rec.pop("version")
        out.update(rec)
        if i == 0:
            out.update(model=name, version=version)
        else:
            out[f"{kind}_model"] = {"name": name, "version": version}
    return out


# ---------------------------------------------------------------------------------------------- loading
def load_model(store: ModelStore, spec: str, *, verify: bool = True, device: str = "cpu",
               precision: str = "fp32", vision_runtime: str | None = None) -> Any:
    """Resolve ``spec`` (``name``, ``name@3``, ``name@alias``), verify its hashes, build its runtime on ``device``
    in ``precision``, its convolutional networks on ``vision_runtime`` (captioning/ov_runtime.py; None:
    ``CAPTIONER_VISION_RUNTIME``, default auto)."""
    version: ModelVersion = store.load(spec, verify=verify)
    try:
        target = task_spec(version.manifest)
    except StoreError as exc:
        raise StoreError(f"{version.name}@{version.version}: {exc}") from None
    module_name, func_name = target.loader.split(":")
    loader = getattr(importlib.import_module(module_name), func_name)
    return loader(version, store, device=device, precision=precision, vision_runtime=vision_runtime)
