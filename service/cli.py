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
        "caption", help="caption (and label, find concepts in) local image files without a server (JSON lines)",
        description="Run the model store's models over local files; one JSON line per image, the same record "
        "the service answers (--tasks chooses caption, labels, concepts).",
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

    __import__("service.scene_cli").scene_cli.register(subparsers)  # `captioner scene` (docs/scenes.md)


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", default="caption",
                        help="comma-separated: caption, labels, concepts (one JSON line per image carries them all)")
    parser.add_argument("--model", default=None, help="captioner: lightcap | ucm | a store name (default: lightcap if "
                        "present, else ucm)")
    parser.add_argument("--alias", default=None, help="store alias to load (default: CAPTIONER_ALIAS, production)")
    parser.add_argument("--store", type=Path, default=None, help="model store root (default: CAPTIONER_MODEL_STORE)")
    parser.add_argument("--beam-size", type=int, default=None, help="beam width (1: greedy; default: the model's)")
    parser.add_argument("--max-length", type=int, default=None, help="longest caption in tokens")
    parser.add_argument("--threshold", type=float, default=None, help="labels: decision threshold (default: the model's)")
    parser.add_argument("--min-score", type=float, default=None, help="concepts: drop instances scoring below this")
    parser.add_argument("--group", choices=("instance", "concept"), default=None,
                        help="concepts: every instance (default) or the distinct words")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: CAPTIONER_DEVICE, auto)")
    parser.add_argument("--precision", default=None, help="auto | fp32 | bf16 (default: CAPTIONER_PRECISION, auto)")


MALLOC_ARENAS = 2


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> int | None:
    """Cap glibc's malloc arenas for this process and the worker processes it starts. glibc gives a thread
    that contends for malloc an arena of its own (up to 8 per core), and what the event loop, the decoding
    threads and the pool's replicas free stays cached in theirs: under load the serving process peaked about
    120 MB higher with the default than with 2 arenas, at the same throughput (docs/performance.md).
    ``MALLOC_ARENA_MAX`` set in the environment wins. -> the cap applied here, None where it could not be
    (not glibc)."""
    import ctypes
    import ctypes.util

    arenas = int(os.environ.setdefault("MALLOC_ARENA_MAX", str(arenas)))  # read by glibc in new processes
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return None
    if mallopt is None:
        return None
    M_ARENA_MAX = -8  # glibc malloc.h
    return arenas if mallopt(M_ARENA_MAX, arenas) == 1 else None


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    limit_malloc_arenas()
    for flag, setting in SERVE_OPTIONS.items():
        value = getattr(args, flag)
        if value is not None:  # through the environment, so every uvicorn worker process sees it
            os.environ[f"CAPTIONER_{setting.upper()}"] = str(value)
    from service.offline import _settings

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


def _engine(args: argparse.Namespace):
    import torch

    from service.offline import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    for name, value in (("--beam-size", args.beam_size), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise UsageError(f"{name} must be at least 1")
    options = {"beam_size": args.beam_size, "max_length": args.max_length, "threshold": args.threshold,
               "min_score": args.min_score, "group": args.group}
    try:
        return Engine.from_store(args.store, tasks=args.tasks, model=args.model, alias=args.alias, options=options,
                                 device=args.device, precision=args.precision)
    except ValueError as exc:  # pydantic's range checks of the options
        raise UsageError(str(exc)) from None


def run_caption(args: argparse.Namespace) -> int:
    engine = _engine(args)
    failed = 0
    for record in engine.records(((str(p), p) for p in args.images), batch_size=args.batch_size):
        print(json.dumps(record), flush=True)
        failed += "error" in record
    return 1 if failed else 0


def run_batch_cmd(args: argparse.Namespace) -> int:
    from service.offline import parse_shard, run_batch
    from service.ray_engine import check_local_args, run_ray

    if args.engine == "ray":
        return run_ray(args)
    check_local_args(args)

    shard = parse_shard(args.shard)
    engine = _engine(args)
    stats = run_batch(args.dir, args.out, engine, shard=shard, batch_size=args.batch_size)
    print(
        f"{args.out}: {stats['captioned']} {'captioned' if 'caption' in engine.kinds else 'done'}, {stats['failed']} failed, {stats['skipped']} already there "
        f"(shard {shard[0]}/{shard[1]}: {stats['images']} images; {engine.describe()}; {stats['seconds']} s)",
        file=sys.stderr,
    )
    return 1 if args.strict and stats["failed"] else 0


def run_merge(args: argparse.Namespace) -> int:
    from service.offline import list_images, merge

    expect = list_images(args.dir) if args.dir else None
    count = merge(args.out, args.shards, expect)
    print(f"{args.out}: {count} results from {len(args.shards)} shard file(s)", file=sys.stderr)
    return 0
