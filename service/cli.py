"""``captioner serve | caption | batch | batch-merge`` (entry point ``service`` in pyproject)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from captioning.errors import UsageError

SERVE_OPTIONS = {  # flag -> setting
    "host": "host", "port": "port", "workers": "workers", "store": "model_store", "models": "models",
    "data_dir": "data_dir", "log_level": "log_level",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve", help="run the REST service (uvicorn)",
        description="Run the REST service. Every setting comes from CAPTIONER_* environment variables "
        "(docs/service.md); these flags override the most common ones.",
    )
    serve.add_argument("--host", default=None, help="bind address (CAPTIONER_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (CAPTIONER_PORT, default 8000)")
    serve.add_argument("--workers", type=int, default=None, help="uvicorn worker processes (CAPTIONER_WORKERS)")
    serve.add_argument("--store", default=None, help="model store root (CAPTIONER_MODEL_STORE)")
    serve.add_argument("--models", default=None, help="models to serve, comma-separated (CAPTIONER_MODELS)")
    serve.add_argument("--data-dir", default=None, help="jobs database and files (CAPTIONER_DATA_DIR)")
    serve.add_argument("--log-level", default=None, help="debug, info, warning (CAPTIONER_LOG_LEVEL)")
    serve.set_defaults(func=run_serve)

    caption = subparsers.add_parser(
        "caption", help="caption local image files without a server (JSON lines on stdout)",
        description="Caption local files with a captioner from the model store; one JSON line per image.",
    )
    caption.add_argument("images", nargs="+", type=Path, metavar="IMG")
    _model_args(caption)
    caption.set_defaults(func=run_caption)

    batch = subparsers.add_parser(
        "batch", help="caption every image under a folder into a JSONL file (resumable, shardable)",
        description="Caption every image under DIR (by suffix, recursively) into --out, one JSON line each, "
        "in relative-path order. Re-running skips images already in --out. --shard I/N takes a "
        "deterministic, disjoint part (union of all N shards: every image once); join shards with batch-merge.",
    )
    batch.add_argument("dir", type=Path, metavar="DIR")
    batch.add_argument("--out", type=Path, required=True, help="results JSONL (appended to; resumed)")
    batch.add_argument("--shard", default=None, metavar="I/N", help="take shard I of N (0-based), e.g. 2/8")
    batch.add_argument("--strict", action="store_true", help="exit 1 when any image failed")
    _model_args(batch)
    from service.ray_engine import add_ray_args

    add_ray_args(batch)  # --engine local|ray and the Ray engine's flags (service/ray_engine.py, docs/batch.md)
    batch.set_defaults(func=run_batch_cmd)

    merge = subparsers.add_parser(
        "batch-merge", help="join batch shard outputs into one file in single-process order",
        description="Join the JSONL files of `captioner batch --shard I/N` runs into OUT, in the order one "
        "unsharded run writes (relative path). Conflicting duplicates and torn files are refused.",
    )
    merge.add_argument("out", type=Path, metavar="OUT.jsonl")
    merge.add_argument("shards", nargs="+", type=Path, metavar="SHARD.jsonl")
    merge.add_argument("--dir", type=Path, default=None, help="also check that every image under DIR is present")
    merge.set_defaults(func=run_merge)


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="lightcap | ucm | a store name (default: lightcap if present, else ucm)")
    parser.add_argument("--alias", default=None, help="store alias to load (default: CAPTIONER_ALIAS, production)")
    parser.add_argument("--store", type=Path, default=None, help="model store root (default: CAPTIONER_MODEL_STORE)")
    parser.add_argument("--beam-size", type=int, default=None, help="beam width (1: greedy; default: the model's)")
    parser.add_argument("--max-length", type=int, default=None, help="longest caption in tokens")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")


def _settings(**overrides):
    from pydantic import ValidationError

    from service.settings import Settings

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        raise UsageError(f"setting {where}: {err['msg']}") from None


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    for flag, setting in SERVE_OPTIONS.items():
        value = getattr(args, flag)
        if value is not None:  # through the environment, so every uvicorn worker process sees it
            os.environ[f"CAPTIONER_{setting.upper()}"] = str(value)
    settings = _settings()
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
    )
    return 0


def _load(args: argparse.Namespace):
    import torch

    from captioning.store import ModelStore
    from service.offline import load_captioner

    if args.threads:
        torch.set_num_threads(args.threads)
    for name, value in (("--beam-size", args.beam_size), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise UsageError(f"{name} must be at least 1")
    settings = _settings(model_store=args.store)
    store = ModelStore(settings.model_store)
    model = load_captioner(store, args.model, args.alias or settings.alias)
    return settings, model


def run_caption(args: argparse.Namespace) -> int:
    from service.offline import caption_files

    settings, model = _load(args)
    failed = 0
    for outcome in caption_files(model, ((str(p), p) for p in args.images), settings, beam_size=args.beam_size,
                                 max_length=args.max_length, batch_size=args.batch_size):
        print(json.dumps(outcome.line), flush=True)
        failed += not outcome.ok
    return 1 if failed else 0


def run_batch_cmd(args: argparse.Namespace) -> int:
    from service.offline import parse_shard, run_batch
    from service.ray_engine import check_local_args, run_ray

    if args.engine == "ray":
        return run_ray(args)
    check_local_args(args)

    shard = parse_shard(args.shard)
    settings, model = _load(args)
    stats = run_batch(args.dir, args.out, model, settings, shard=shard, beam_size=args.beam_size,
                      max_length=args.max_length, batch_size=args.batch_size)
    print(
        f"{args.out}: {stats['captioned']} captioned, {stats['failed']} failed, {stats['skipped']} already there "
        f"(shard {shard[0]}/{shard[1]}: {stats['images']} images; {model.name}@{model.version}; {stats['seconds']} s)",
        file=sys.stderr,
    )
    return 1 if args.strict and stats["failed"] else 0


def run_merge(args: argparse.Namespace) -> int:
    from service.offline import list_images, merge

    expect = list_images(args.dir) if args.dir else None
    count = merge(args.out, args.shards, expect)
    print(f"{args.out}: {count} results from {len(args.shards)} shard file(s)", file=sys.stderr)
    return 0
