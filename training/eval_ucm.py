"""``captioner eval ucm-captioner|ucm-classifier --data DIR --split test [--json] [--model SPEC]``.

Loads the model exactly as the service does (``captioning.inference.load_model``: store resolve, hash
check, runtime object) and scores it on one split of any dataset in the UCM layout, e.g. a fresh synthetic
set made with a seed never used in training.

* ucm-classifier: micro / macro F1, precision and recall at the stored threshold (and per label);
* ucm-captioner: BLEU-1..4, METEOR (when Java runs), ROUGE-L, CIDEr-D (document frequencies from this
  split's references), repeat statistics, and the nearest-neighbour baseline (``nn_*``): the consensus
  caption of the dataset's closest *training* image by the captioner's image code.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from captioning.errors import UsageError

DECODING_FLAGS = (
    ("beam_size", int),
    ("max_length", int),
    ("min_length", int),
    ("length_penalty", float),
    ("no_repeat_ngram_size", int),
    ("repetition_penalty", float),
    ("max_repeat_run", int),
)


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default=None,
        help="auto | cpu | cuda | cuda:N (default: $CAPTIONER_DEVICE, else cpu)",
    )
    parser.add_argument(
        "--precision", default=None,
        help="auto | fp32 | bf16 (default: $CAPTIONER_PRECISION, else fp32); auto: bf16 on a GPU or a CPU with native bf16",
    )


def resolve_placement(args: argparse.Namespace) -> tuple[str, str]:
    """(device, precision) from ``--device``/``--precision``, else the CAPTIONER_* variables; a bad value is a
    UsageError naming the flag or variable."""
    import os

    from captioning.accel import resolve_device, resolve_precision

    chosen = {}
    for flag, variable, default in (("device", "CAPTIONER_DEVICE", "cpu"), ("precision", "CAPTIONER_PRECISION", "fp32")):
        value = getattr(args, flag, None)
        source = f"--{flag}"
        if value is None:
            value, source = os.environ.get(variable), variable
        chosen[flag] = (value or default, source)
    try:
        device = resolve_device(chosen["device"][0])
    except ValueError as exc:
        raise UsageError(f"{chosen['device'][1]}: {exc}") from None
    try:
        precision = resolve_precision(chosen["precision"][0], device)
    except ValueError as exc:
        raise UsageError(f"{chosen['precision'][1]}: {exc}") from None
    return str(device), precision


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--data", type=Path, required=True, help="dataset folder (UCM layout)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"), help="split to score (default test)")
    parser.add_argument("--model", default=None, metavar="SPEC", help=f"store spec (default: {name}, its production alias)")
    parser.add_argument("--store", type=Path, default=None, help="model store root (default: settings)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_placement_arguments(parser)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--batch-size", type=int, default=64)
    if name == "ucm-captioner":
        for flag, kind in DECODING_FLAGS:
            parser.add_argument(f"--{flag.replace('_', '-')}", type=kind, default=None, help="decoding option (default: the model's)")
        parser.add_argument("--no-baseline", action="store_true", help="skip the nearest-neighbour baseline")
        parser.add_argument("--no-meteor", action="store_true", help="skip METEOR (Java)")


def run(args: argparse.Namespace) -> int:
    from captioning.inference import load_model
    from captioning.store import ModelStore

    if args.threads:
        torch.set_num_threads(int(args.threads))
    store = ModelStore(args.store)
    spec = args.model or args.target
    device, precision = resolve_placement(args)
    runtime = load_model(store, spec, device=device, precision=precision)
    if runtime.manifest.get("task") != args.target:
        raise UsageError(f"{spec} is a {runtime.manifest.get('task')} model; `captioner eval {args.target}` needs a {args.target} model")
    if args.target == "ucm-classifier":
        metrics = evaluate_classifier(runtime, args.data, args.split, args.batch_size)
    else:
        overrides = {flag: getattr(args, flag) for flag, _ in DECODING_FLAGS}
        metrics = evaluate_captioner(
            runtime, args.data, args.split, overrides, batch_size=args.batch_size,
            baseline=not args.no_baseline, meteor=not args.no_meteor,
        )
    result = {
        "model": f"{runtime.name}@{runtime.version}",
        "profile": runtime.manifest.get("profile"),
        "data": str(Path(args.data).resolve()),
        "split": args.split,
        "device": device,
        "precision": precision,
        "metrics": metrics,
    }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"{result['model']} on {result['data']} ({args.split})")
        for key, value in metrics.items():
            if isinstance(value, float):
                print(f"  {key:28s} {value:.4f}")
            elif not isinstance(value, (list, dict)):
                print(f"  {key:28s} {value}")
    return 0


@torch.no_grad()
def evaluate_classifier(runtime: Any, data: Path, split: str, batch_size: int = 64) -> dict[str, Any]:
    from captioning.models.ucm.data import label_split, normalize, open_dataset
    from captioning.models.ucm.evaluate import label_scores

    corpus = open_dataset(data, need_labels=True, splits=(split,))
    images, labels = label_split(corpus, split, runtime.input_size)
    probs = torch.cat([runtime.predict(normalize(images[i : i + batch_size])) for i in range(0, len(images), batch_size)])
    metrics: dict[str, Any] = {"threshold": runtime.threshold, "images": len(images)}
    metrics.update(label_scores(probs, labels, runtime.threshold))
    from captioning.metrics import multilabel_prf

    per_label = multilabel_prf(labels, probs, runtime.threshold)["per_label"]
    metrics["per_label_f1"] = dict(zip(runtime.labels, per_label["f1"], strict=True))
    return metrics


@torch.no_grad()
def evaluate_captioner(
    runtime: Any,
    data: Path,
    split: str,
    overrides: dict[str, Any] | None = None,
    *,
    batch_size: int = 64,
    baseline: bool = True,
    meteor: bool = True,
) -> dict[str, Any]:
    from captioning.config import manifest_config
    from captioning.config_schema import UCMConfig
    from captioning.models.ucm.data import caption_split, normalize, open_dataset
    from captioning.models.ucm.evaluate import caption_report, nearest_neighbour_captions

    corpus = open_dataset(data, splits=(split,))
    max_words = manifest_config(runtime, UCMConfig).text.max_words
    target = caption_split(corpus, runtime.vocab, split, runtime.input_size, max_words)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    options = runtime.decode_options(**overrides)
    captions = []
    for i in range(0, len(target), batch_size):
        captions.extend(c.text for c in runtime.caption(normalize(target.images[i : i + batch_size]), options))
    metrics: dict[str, Any] = {"decoding": options.to_dict(), "images": len(captions)}
    metrics.update(caption_report(captions, target.references, meteor=meteor))
    metrics["examples"] = [
        {"imgid": target.imgids[i], "caption": captions[i], "reference": target.references[i][0]}
        for i in range(min(5, len(captions)))
    ]
    if baseline and split != "train" and corpus.split("train"):
        train = caption_split(corpus, runtime.vocab, "train", runtime.input_size, max_words)
        nn = nearest_neighbour_captions(runtime.model.encoder, train, target, torch.device("cpu"))
        report = caption_report(nn, target.references, meteor=meteor)
        metrics.update({f"nn_{k}": v for k, v in report.items() if not k.startswith("METEOR-note")})
    return metrics
