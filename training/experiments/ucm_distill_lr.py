"""``captioner experiment ucm-distill-lr``: seed 000's three-way distillation experiment, one table.

The seed distilled text codes into the image encoder with the text encoder (a) frozen, (b) trained at the
image encoder's learning rate, (c) trained 100x slower, and found (a) high, unstable loss, (b) low loss but
worse captions, (c) low loss and better captions. This command reruns that on a dataset (the synthetic set):

1. ``ucm-text-ae`` and ``ucm-classifier`` once (or copied from ``--prereq-store``);
2. for each variant: ``ucm-distill`` with ``distill.text_lr_ratio`` 0 / 1 / 0.01, then ``ucm-captioner`` on
   it with the profile's decoding; final distillation loss (train, val), val retrieval R@1, test BLEU-4 and
   CIDEr-D, and the nearest-neighbour baseline;
3. the attention decoder (``captioner.attention_dim``) on the 100x-lower distillation;
4. a captioner trained for ``--early-epochs`` only: an under-trained model, where the seed's repeated words
   ("there is a a roads at the the the") show;
5. decoding before/after the repetition fix on these captioners: greedy / beam without guards (the seed's
   decoding) against the guard, no-repeat n-gram and repetition penalty.

Every run is an ordinary stage run (its manifest records the equivalent ``captioner train ...`` command)
publishing into the experiment's own store (``--work-dir``/store), so the default store is never touched.
Results are cached in ``--work-dir``/results.json (``--fresh`` recomputes); the markdown table is printed
and, with ``--doc FILE``, written between ``<!-- ucm-distill-lr:start -->`` and ``<!-- ucm-distill-lr:end -->``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from captioning.errors import UsageError

VARIANTS = (
    # key, label, text_lr_ratio
    ("frozen", "text encoder frozen", 0.0),
    ("same", "text lr = image lr", 1.0),
    ("lower100", "text lr = image lr / 100", 0.01),
)
DECODINGS = (
    # label, overrides of the published decoding
    ("greedy, no guard (seed)", {"beam_size": 1, "max_repeat_run": 0, "no_repeat_ngram_size": 0, "repetition_penalty": 1.0}),
    ("beam 3, no guard", {"beam_size": 3, "max_repeat_run": 0, "no_repeat_ngram_size": 0, "repetition_penalty": 1.0}),
    ("greedy + repeat guard", {"beam_size": 1, "max_repeat_run": 2, "no_repeat_ngram_size": 0, "repetition_penalty": 1.0}),
    ("beam 3 + repeat guard", {"beam_size": 3, "max_repeat_run": 2, "no_repeat_ngram_size": 0, "repetition_penalty": 1.0}),
    ("beam 3 + guard + no-repeat 2-gram", {"beam_size": 3, "max_repeat_run": 2, "no_repeat_ngram_size": 2, "repetition_penalty": 1.0}),
    ("beam 3 + guard + repetition penalty 1.3", {"beam_size": 3, "max_repeat_run": 2, "no_repeat_ngram_size": 0, "repetition_penalty": 1.3}),
)
START, END = "<!-- ucm-distill-lr:start -->", "<!-- ucm-distill-lr:end -->"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="dataset folder (UCM layout)")
    parser.add_argument("--profile", default="tiny", choices=("paper", "tiny"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every run")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/experiments/ucm-distill-lr"))
    parser.add_argument(
        "--prereq-store", type=Path, default=None,
        help="take ucm-text-ae and ucm-classifier (newest of the profile) from this store instead of training them",
    )
    parser.add_argument("--attention-dim", type=int, default=128, help="attention size of the attention variant")
    parser.add_argument(
        "--early-epochs", type=int, default=1, help="epochs of the under-trained captioner of the decoding table"
    )
    parser.add_argument("--doc", type=Path, default=None, help="markdown file whose marked block gets the table")
    parser.add_argument("--fresh", action="store_true", help="ignore cached results in --work-dir")
    parser.add_argument("--threads", type=int, default=None)


def run(args: argparse.Namespace) -> int:
    import torch

    from captioning.store import ModelStore

    if args.threads:
        torch.set_num_threads(int(args.threads))
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    store_root = work / "store"
    results_path = work / "results.json"
    results: dict[str, Any] = {} if args.fresh or not results_path.is_file() else json.loads(results_path.read_text())
    results["setup"] = {"data": str(Path(args.data).resolve()), "profile": args.profile, "seed": args.seed, "set": args.set}

    def save() -> None:
        results_path.write_text(json.dumps(results, indent=1) + "\n")

    common = ["--data", str(args.data), "--profile", args.profile, "--seed", str(args.seed), "--store", str(store_root)]
    common += [x for item in args.set for x in ("--set", item)]
    if args.threads:
        common += ["--threads", str(args.threads)]
    store = ModelStore(store_root)

    # 1. prerequisites
    for stage in ("ucm-text-ae", "ucm-classifier"):
        if store.latest(stage, args.profile) is not None:
            continue
        if args.prereq_store is not None:
            copy_version(ModelStore(args.prereq_store), store, stage, args.profile)
        else:
            train_stage(stage, [*common, "--run-dir", str(work / "runs" / stage)])
    text_ae, classifier = (store.latest(s, args.profile) for s in ("ucm-text-ae", "ucm-classifier"))
    results["prerequisites"] = {
        "ucm-text-ae": {"version": text_ae.spec, "metrics": pick(text_ae.metrics, "test_bleu4", "val_bleu4")},
        "ucm-classifier": {"version": classifier.spec, "metrics": pick(classifier.metrics, "test_micro_f1", "threshold")},
    }
    prereq = ["--text-ae", text_ae.spec, "--classifier", classifier.spec]
    save()

    # 2. the three distillation variants, each followed by a captioner
    variants = results.setdefault("variants", {})
    for key, label, ratio in sorted(VARIANTS, key=lambda v: v[0] != "lower100"):  # the default recipe first
        if key in variants and not args.fresh:
            continue
        started = time.time()
        distill = train_stage(
            "ucm-distill",
            [*common, *prereq, "--run-dir", str(work / "runs" / key / "distill"), "--set", f"distill.text_lr_ratio={ratio}"],
        )
        captioner = train_stage(
            "ucm-captioner", [*common, "--distill", distill.spec, "--run-dir", str(work / "runs" / key / "captioner")]
        )
        variants[key] = summarize(label, ratio, distill, captioner, time.time() - started)
        save()

    # 3. the attention decoder on the 100x-lower distillation
    if "attention" not in results or args.fresh:
        started = time.time()
        distill_spec = results["variants"]["lower100"]["distill"]
        captioner = train_stage(
            "ucm-captioner",
            [*common, "--distill", distill_spec, "--run-dir", str(work / "runs" / "attention" / "captioner"),
             "--set", f"captioner.attention_dim={args.attention_dim}"],
        )
        distill = store.resolve(distill_spec)
        results["attention"] = summarize(
            f"text lr / 100 + attention decoder ({args.attention_dim})", 0.01, distill, captioner, time.time() - started
        )
        save()

    # 4. an under-trained captioner (the seed's repeated words show there) on the 100x-lower distillation
    if "early" not in results or args.fresh:
        captioner = train_stage(
            "ucm-captioner",
            [*common, "--distill", results["variants"]["lower100"]["distill"],
             "--run-dir", str(work / "runs" / "early" / "captioner"), "--set", f"captioner.epochs={args.early_epochs}"],
        )
        results["early"] = {"captioner": captioner.spec, "epochs": args.early_epochs}
        save()

    # 5. decoding before / after the repetition fix, on the test split
    decoding = results.setdefault("decoding", {})
    specs = {
        "lower100": results["variants"]["lower100"]["captioner"],
        "attention": results["attention"]["captioner"],
        "early": results["early"]["captioner"],
    }
    for key, spec in specs.items():
        if key in decoding and not args.fresh:
            continue
        decoding[key] = decode_table(store, spec, args.data)
        save()

    table = markdown(results)
    print(table)
    if args.doc is not None:
        write_block(Path(args.doc), table)
    return 0


# ------------------------------------------------------------------------------------------- running stages
@contextlib.contextmanager
def _argv(argv: list[str]):
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


def train_stage(stage: str, argv: list[str]) -> Any:
    """Run one stage as ``captioner train STAGE ARGV`` would (the manifest records that command)."""
    import importlib

    from captioning.store import ModelStore
    from training.cli import STAGES

    module = importlib.import_module(STAGES[stage][0])
    parser = argparse.ArgumentParser(prog=f"captioner train {stage}")
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    with _argv(["captioner", "train", stage, *argv]):
        status = module.run(args)
    if status:
        raise UsageError(f"experiment: `captioner train {stage}` failed with status {status}")
    return ModelStore(args.store).resolve(f"{stage}@latest")


def copy_version(source: Any, target: Any, name: str, profile: str) -> Any:
    """Publish the newest ``name`` of ``profile`` from ``source`` into ``target`` (same files and records)."""
    from captioning.errors import PrerequisiteError

    version = source.latest(name, profile)
    if version is None:
        raise PrerequisiteError(f"--prereq-store {source.root}: no {name} model of profile {profile!r}")
    import shutil
    import tempfile

    version = source.load(version.spec)
    manifest = version.manifest
    with tempfile.TemporaryDirectory() as tmp:
        for rel in manifest["files"]:  # the version's own files; the store writes the manifest
            (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(version.file(rel), Path(tmp) / rel)
        return target.publish(
            name, Path(tmp), task=manifest["task"], profile=manifest["profile"], metrics=manifest.get("metrics", {}),
            config=manifest.get("config", {}), command=manifest.get("command", ""), data=manifest.get("data", {}),
            parents=[], extra={**(manifest.get("extra") or {}), "copied_from": f"{source.root}:{version.spec}"},
        )


def pick(metrics: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: metrics.get(k) for k in keys}


def summarize(label: str, ratio: float, distill: Any, captioner: Any, seconds: float) -> dict[str, Any]:
    d, c = distill.metrics, captioner.metrics
    return {
        "label": label,
        "text_lr_ratio": ratio,
        "distill": distill.spec,
        "captioner": captioner.spec,
        "distill_train_loss": d.get("final_train_loss"),
        "distill_val_loss": d.get("final_val_loss"),
        "distill_loss_history": [h.get("loss") for h in distill.manifest.get("extra", {}).get("history", [])],
        "text_code_drift": d.get("text_code_drift"),
        "retrieval_r@1": d.get("val_retrieval_r@1"),
        "captioner_val_loss": c.get("final_val_loss"),
        **{k: c.get(f"test_{k}") for k in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "triple_repeat")},
        "nn_BLEU-4": c.get("test_nn_BLEU-4"),
        "nn_CIDEr-D": c.get("test_nn_CIDEr-D"),
        "seconds": round(seconds, 1),
    }


def decode_table(store: Any, spec: str, data: Path) -> list[dict[str, Any]]:
    from captioning.inference import load_model
    from training.eval_ucm import evaluate_captioner

    runtime = load_model(store, spec)
    rows = []
    for label, overrides in DECODINGS:
        metrics = evaluate_captioner(runtime, data, "test", overrides, baseline=False, meteor=False)
        rows.append({"label": label, "options": metrics["decoding"], **pick(
            metrics, "BLEU-4", "CIDEr-D", "ROUGE-L", "triple_repeat", "consecutive_repeat", "distinct-1",
            "distinct-2", "mean_length",
        ), "examples": metrics["examples"][:3]})
    return rows


# ------------------------------------------------------------------------------------------------- output
def _f(value: Any, digits: int = 3) -> str:
    return "-" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))


def markdown(results: dict[str, Any]) -> str:
    setup = results["setup"]
    lines = [
        f"Data: `{setup['data']}` (test split), profile `{setup['profile']}`, seed {setup['seed']}"
        + (f", overrides {', '.join(setup['set'])}" if setup["set"] else "") + ".",
        "Prerequisites: " + ", ".join(
            f"{name} = `{info['version']}` ({', '.join(f'{k} {_f(v)}' for k, v in info['metrics'].items())})"
            for name, info in results["prerequisites"].items()
        ) + ".",
        "",
        "| distillation | text lr / image lr | distill loss train | distill loss val | text code drift | val R@1 "
        "| BLEU-4 | CIDEr-D | caption with a word 3x in a row |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [results["variants"][k] for k, _, _ in VARIANTS if k in results.get("variants", {})]
    if "attention" in results:
        rows.append(results["attention"])
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['text_lr_ratio']:g} | {_f(r['distill_train_loss'])} | {_f(r['distill_val_loss'])} "
            f"| {_f(r['text_code_drift'], 4)} | {_f(r['retrieval_r@1'])} | {_f(r['BLEU-4'])} | {_f(r['CIDEr-D'])} "
            f"| {_f(r['triple_repeat'])} |"
        )
    if rows:
        base = rows[-1]
        lines.append(
            f"| nearest-neighbour baseline (consensus caption of the closest training image) | - | - | - | - | - "
            f"| {_f(base['nn_BLEU-4'])} | {_f(base['nn_CIDEr-D'])} | 0.000 |"
        )
    early = results.get("early", {}).get("epochs")
    titles = (
        ("early", f"captioner after {early} epoch(s), under-trained like the seed's"),
        ("lower100", "text lr / 100"),
        ("attention", "text lr / 100 + attention decoder"),
    )
    for key, title in titles:
        table = results.get("decoding", {}).get(key)
        if not table:
            continue
        lines += [
            "",
            f"Decoding before / after the repetition fix ({title}, test split):",
            "",
            "| decoding | BLEU-4 | CIDEr-D | ROUGE-L | word 3x in a row | word 2x in a row | distinct-1 | distinct-2 | mean length |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in table:
            lines.append(
                f"| {row['label']} | {_f(row['BLEU-4'])} | {_f(row['CIDEr-D'])} | {_f(row['ROUGE-L'])} "
                f"| {_f(row['triple_repeat'])} | {_f(row['consecutive_repeat'])} | {_f(row['distinct-1'])} "
                f"| {_f(row['distinct-2'])} | {_f(row['mean_length'], 1)} |"
            )
    return "\n".join(lines) + "\n"


def write_block(path: Path, table: str) -> None:
    text = path.read_text() if path.is_file() else ""
    block = f"{START}\n{table}{END}"
    if START in text and END in text:
        before, rest = text.split(START, 1)
        _, after = rest.split(END, 1)
        text = before + block + after
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    path.write_text(text)
