"""``captioner eval lightcap --data DIR --split test [--model SPEC] [--json]``: caption metrics of LightCap.

Scores one stored LightCap captioner (the student ``lightcap``, default its production version, or any
``lightcap-teacher``) on a dataset split with pycocoevalcap (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D; CIDEr-D's
document frequencies come from this split's references), and reports its parameter count and its mean CPU
latency per image.

Latency: end to end from a preprocessed image tensor to the caption text -- CLIP grid, proposals, concepts,
captioner, decoding with the given options -- one image at a time (batch 1) on ``--latency-images`` test
images after 3 warm-up images, with ``torch.set_num_threads(--latency-threads)`` (default: the config's
``eval.latency_threads``, 1 like the paper's single phone core). Image decoding from disk is not timed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from captioning.config import load_config
from captioning.config_schema import LightCapEval
from training.eval_ucm import DECODING_FLAGS, add_placement_arguments, resolve_placement
from training.lightcap import DEFAULT_FEATURES, caption_scores, load_features, open_store

METRIC_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")


def add_arguments(parser: argparse.ArgumentParser, name: str | None = None) -> None:
    parser.add_argument("--data", type=Path, required=True, help="dataset folder (UCM layout)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--model", default="lightcap", help="store spec (default lightcap = its production version)")
    parser.add_argument("--store", type=Path, default=None, help="model store root (default: settings)")
    for flag, kind in DECODING_FLAGS:
        parser.add_argument(f"--{flag.replace('_', '-')}", type=kind, default=None, help="decoding option (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--latency-images", type=int, default=None, help="images timed one by one (0: no timing)")
    parser.add_argument("--latency-threads", type=int, default=None, help="torch threads while timing")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the scoring pass")
    parser.add_argument("--features-cache", type=Path, default=DEFAULT_FEATURES)
    parser.add_argument(
        "--cache-speedup", type=int, default=0, metavar="N",
        help="also time decoding with and without the KV cache on N images (batch 1, same run) and compare tokens",
    )
    parser.add_argument("--no-meteor", action="store_true", help="skip METEOR (it starts Java: several seconds)")
    parser.add_argument("--examples", type=int, default=5, help="captions shown with their references")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_placement_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from captioning.data import load_dataset

    if args.threads:
        torch.set_num_threads(int(args.threads))
    store = open_store(args.store)
    corpus = load_dataset(args.data)
    result = evaluate(
        store, args.model, corpus, args.split, decoding={flag: getattr(args, flag) for flag, _ in DECODING_FLAGS},
        batch_size=args.batch_size, latency_images=args.latency_images, latency_threads=args.latency_threads,
        features_cache=args.features_cache, examples=args.examples, meteor=not args.no_meteor,
        cache_speedup=args.cache_speedup, placement=resolve_placement(args),
    )
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(format_result(result))
    return 0


def evaluate(
    store,
    spec: str,
    corpus,
    split: str,
    *,
    decoding: dict[str, Any] | None = None,
    batch_size: int = 32,
    latency_images: int | None = None,
    latency_threads: int | None = None,
    features_cache: Path | None = DEFAULT_FEATURES,
    examples: int = 5,
    meteor: bool = True,
    cache_speedup: int = 0,
    placement: tuple[str, str] = ("cpu", "fp32"),
) -> dict[str, Any]:
    from captioning.models.lightcap.pipeline import concepts_parent, load_lightcap

    version = store.load(spec)
    device, precision = placement
    pipeline = load_lightcap(version, store, device=device, precision=precision)
    parent = concepts_parent(version)
    concepts_version = store.resolve(f"{parent['name']}@{parent['version']}")
    if features_cache is not None and precision != "fp32":  # bf16 features never stand in for fp32 ones
        features_cache = Path(features_cache) / precision
    features = load_features(corpus, pipeline.extractor, concepts_version, features_cache)
    options = pipeline.decode_options(**(decoding or {}))  # None values keep the model's
    rows = corpus.split_indices(split)
    if not rows:
        from captioning.errors import UsageError

        raise UsageError(f"{corpus.root}: the {split} split is empty")

    texts: list[str] = []
    for start in range(0, len(rows), batch_size):
        idx = torch.tensor(rows[start : start + batch_size])
        outs = pipeline.caption_features(features.grid[idx].float(), features.concept_ids[idx], features.scores[idx], options)
        texts.extend(o.text for o in outs)
    scores = caption_scores(corpus, rows, texts, meteor=meteor)

    # the profile's eval section; a version of another profile reads the schema's defaults
    fields = LightCapEval.model_fields
    if version.profile in ("tiny", "paper"):
        eval_cfg = load_config("lightcap", version.profile).eval
        default_images, default_threads = eval_cfg.latency_images, eval_cfg.latency_threads
    else:
        default_images, default_threads = fields["latency_images"].default, fields["latency_threads"].default
    n_latency = int(default_images if latency_images is None else latency_images)
    threads = int(default_threads if latency_threads is None else latency_threads)
    latency = measure_latency(pipeline, corpus, rows, options, n_latency, threads) if n_latency > 0 else None

    speedup = None
    if cache_speedup > 0:
        speedup = measure_cache_speedup(pipeline, features, rows, options, cache_speedup, threads)

    result: dict[str, Any] = {
        "model": f"{version.name}@{version.version}",
        "profile": version.profile,
        "dataset": corpus.name,
        "split": split,
        "images": len(rows),
        "decoding": options.to_dict(),
        "device": device,
        "precision": precision,
        **{k: scores.get(k) for k in METRIC_KEYS},
        "METEOR-note": scores.get("METEOR-note"),
        "parameters": pipeline.model.num_parameters(),
        "head_branches": pipeline.model.arch["head_branches"],
        "fusion": {k: pipeline.model.arch["fusion"][k] for k in ("layers", "hidden", "heads")},
        "latency": latency,
        "kv_cache": speedup,
        "extractor_parameters": sum(p.numel() for p in pipeline.extractor.parameters()),
        "examples": [
            {"imgid": corpus.images[r].imgid, "caption": t, "references": corpus.images[r].references[:2]}
            for r, t in list(zip(rows, texts, strict=True))[:examples]
        ],
    }
    return result


@torch.no_grad()
def measure_latency(pipeline, corpus, rows: list[int], options, n_images: int, threads: int) -> dict[str, Any]:
    """Mean / median milliseconds per image, batch 1, end to end from the preprocessed tensor."""
    from captioning.data.images import load_image

    chosen = rows[: n_images + 3]
    tensors = [pipeline.preprocess(load_image(corpus.images[r].path))[None] for r in chosen]
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        times = []
        for i in range(3 + n_images):  # 3 warm-up runs; a small split is cycled through
            image = tensors[i % len(tensors)]
            t0 = time.perf_counter()
            pipeline.caption(image, options)
            if i >= 3:
                times.append((time.perf_counter() - t0) * 1000.0)
    finally:
        torch.set_num_threads(previous)
    if not times:
        return None
    return {
        "mean_ms": round(statistics.fmean(times), 2),
        "median_ms": round(statistics.median(times), 2),
        "images": len(times),
        "threads": threads,
        "batch_size": 1,
    }


@torch.no_grad()
def measure_cache_speedup(pipeline, features, rows, options, n_images: int, threads: int) -> dict[str, Any]:
    """Decoding alone (captioner, from cached features), batch 1, with and without the KV cache, alternating
    per image in one run; the uncached path re-runs the whole sequence every step."""
    model, tok = pipeline.model, pipeline.tokenizer
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    timings: dict[bool, list[float]] = {True: [], False: []}
    same = 0
    try:
        chosen = rows[:n_images]
        for i, r in enumerate([chosen[0], *chosen]):  # the first image once more as warm-up
            idx = torch.tensor([r])
            grid = features.grid[idx].float()
            concepts = pipeline.concept_inputs(features.concept_ids[idx], features.scores[idx])
            outs = {}
            for use_cache in (True, False):
                t0 = time.perf_counter()
                outs[use_cache] = model.generate(grid, concepts, options, bos_id=tok.bos_id, eos_id=tok.eos_id,
                                                 use_cache=use_cache)[0].tokens
                if i > 0:
                    timings[use_cache].append((time.perf_counter() - t0) * 1000.0)
            same += int(i > 0 and outs[True] == outs[False])
    finally:
        torch.set_num_threads(previous)
    cached, uncached = statistics.fmean(timings[True]), statistics.fmean(timings[False])
    return {
        "cached_ms": round(cached, 2), "uncached_ms": round(uncached, 2), "speedup": round(uncached / cached, 2),
        "same_tokens": f"{same}/{len(timings[True])}", "images": len(timings[True]), "threads": threads,
        "beam_size": options.beam_size,
    }


def format_result(result: dict[str, Any]) -> str:
    lines = [f"{result['model']} on {result['dataset']} {result['split']} ({result['images']} images, "
             f"beam {result['decoding']['beam_size']})"]
    for key in METRIC_KEYS:
        value = result.get(key)
        lines.append(f"  {key:8s} {'n/a' if value is None or (isinstance(value, float) and math.isnan(value)) else f'{value:.4f}'}")
    if result.get("METEOR-note"):
        lines.append(f"  METEOR: {result['METEOR-note']}")
    lines.append(f"  parameters {result['parameters']:,}")
    lat = result.get("latency")
    if lat:
        lines.append(f"  latency    {lat['mean_ms']:.1f} ms/image mean ({lat['median_ms']:.1f} median, "
                     f"{lat['images']} images, batch 1, {lat['threads']} thread(s))")
    kv = result.get("kv_cache")
    if kv:
        lines.append(f"  KV cache   decoding {kv['cached_ms']:.1f} ms cached vs {kv['uncached_ms']:.1f} ms uncached "
                     f"({kv['speedup']:.2f}x, same tokens {kv['same_tokens']}, beam {kv['beam_size']})")
    for ex in result.get("examples", []):
        lines.append(f"  [{ex['imgid']}] {ex['caption']!r}  refs: {ex['references']}")
    return "\n".join(lines)
