"""``captioner experiment lightcap-ablation --data DIR``: LightCap's teachers, KD, ensemble head, concepts and
modulator, as one table on one split.

Rows (each a model trained here with the profile's config plus the overrides shown):

=======================  ======================================================================================
teacher (seed s)         ``captioner train lightcap-teacher --seed s`` for each ``kd.teacher_seeds``
student, no KD           ``kd.token/hidden/attention/sequence=false`` (cross-entropy only)
student, token KD        only ``kd.token`` (KL on the next-token distributions, branch i <- teacher i)
student, all KD          token + hidden + attention + sequence-level KD (the profile's default student)
single head, all KD      all KD with ``model.head_branches=1`` (learns the teachers' mean distribution)
single head, no KD       no KD with ``model.head_branches=1``
no concepts, no KD       ``model.use_concepts=false``, ``model.use_modulator=false`` (grid tokens only)
no modulator, no KD      ``model.use_modulator=false`` (concept tokens kept)
=======================  ======================================================================================

Columns: BLEU-4, METEOR, ROUGE-L, CIDEr-D (pycocoevalcap, on ``--split``), captioner parameters, mean CPU
latency per image (batch 1, end to end incl. the concept extractor; see training/eval_lightcap.py).

Everything is trained into a work store (``--work``/store), seeded with a copy of the concept extractor's
models from ``--store`` (same versions), so the repository's store is never written. A model already in the
work store with the same config, seed and data is reused, so re-running the experiment only evaluates.
The table is printed and written to ``--work``/table.md and table.json, with the paper's claims checked.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
from pathlib import Path
from typing import Any

from captioning.config import load_config
from captioning.errors import UsageError

log = logging.getLogger(__name__)

NO_KD = ["kd.token=false", "kd.hidden=false", "kd.attention=false", "kd.sequence=false"]
TOKEN_KD = ["kd.token=true", "kd.hidden=false", "kd.attention=false", "kd.sequence=false"]
ALL_KD = ["kd.token=true", "kd.hidden=true", "kd.attention=true", "kd.sequence=true"]

# key, label, overrides (students)
STUDENTS: list[tuple[str, str, list[str]]] = [
    ("student-nokd", "student, no KD", NO_KD),
    ("student-tokenkd", "student, token KD", TOKEN_KD),
    ("student-allkd", "student, all KD", ALL_KD),
    ("single-allkd", "single head, all KD", [*ALL_KD, "model.head_branches=1"]),
    ("single-nokd", "single head, no KD", [*NO_KD, "model.head_branches=1"]),
    ("noconcepts-nokd", "no concepts, no KD", [*NO_KD, "model.use_concepts=false", "model.use_modulator=false"]),
    ("nomodulator-nokd", "no modulator, no KD", [*NO_KD, "model.use_modulator=false"]),
]


def uses_kd(overrides: list[str]) -> bool:
    return any(o.startswith("kd.") and o.endswith("=true") for o in overrides)


def add_arguments(parser: argparse.ArgumentParser, name: str | None = None) -> None:
    parser.add_argument("--data", type=Path, required=True, help="dataset folder (UCM layout)")
    parser.add_argument("--split", default="test", choices=("val", "test"), help="split of the table (default test)")
    parser.add_argument("--profile", default="tiny", choices=("paper", "tiny"))
    parser.add_argument("--store", type=Path, default=None, help="store with the concept extractor (default: settings)")
    parser.add_argument("--concepts", default=None, help="concept extractor spec (default: newest of the profile)")
    parser.add_argument("--work", type=Path, default=Path("runs") / "lightcap-ablation",
                        help="work folder: its store/, run folders, table.md/json (default runs/lightcap-ablation)")
    parser.add_argument("--student-seed", type=int, default=0, help="seed of every student (default 0)")
    parser.add_argument("--only", default=None, help="comma-separated row keys to train/evaluate (default all)")
    parser.add_argument("--retrain", action="store_true", help="train again even when the work store has the model")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every row")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for training and scoring")
    parser.add_argument("--latency-images", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--features-cache", type=Path, default=None)
    parser.add_argument("--no-meteor", action="store_true", help="leave METEOR (Java) out of the table")
    parser.add_argument("--json", action="store_true", help="print the table as JSON")


def run(args: argparse.Namespace) -> int:
    import torch

    from captioning.data import load_dataset
    from training.eval_lightcap import evaluate
    from training.lightcap import DEFAULT_FEATURES, open_store, resolve_concepts

    if args.threads:
        torch.set_num_threads(int(args.threads))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    main_store = open_store(args.store)
    work_store_root = work / "store"
    config = load_config("lightcap", args.profile, overrides=args.set)
    concepts_version = resolve_concepts(main_store, args.concepts or config.concepts, args.profile)
    seed_work_store(main_store, work_store_root, concepts_version)
    work_store = open_store(work_store_root)
    concepts_spec = concepts_version.spec
    features_cache = args.features_cache or DEFAULT_FEATURES
    corpus = load_dataset(args.data)
    only = set(args.only.split(",")) if args.only else None
    known = {f"teacher-{s}" for s in config.kd.teacher_seeds} | {k for k, _, _ in STUDENTS}
    if only is not None and only - known:
        raise UsageError(f"--only: unknown row(s) {sorted(only - known)} (known: {', '.join(sorted(known))})")

    def requested(key: str) -> bool:
        return only is None or key in only

    need_teachers = any(requested(k) and uses_kd(o) for k, _, o in STUDENTS)
    rows: list[dict[str, Any]] = []
    teacher_specs = []
    for seed in config.kd.teacher_seeds:
        key = f"teacher-{seed}"
        version = ensure_model(
            args, work_store, "lightcap-teacher", key, seed=int(seed), overrides=[], concepts_spec=concepts_spec,
            features_cache=features_cache, train=requested(key) or need_teachers,
        )
        teacher_specs.append(version.spec if version else None)
        rows.append({"key": key, "label": f"teacher (seed {seed})", "spec": version.spec if version else None,
                     "overrides": []})
    for key, label, overrides in STUDENTS:
        if not requested(key):
            continue
        version = ensure_model(
            args, work_store, "lightcap", key, seed=args.student_seed, overrides=overrides,
            concepts_spec=concepts_spec, features_cache=features_cache, teachers=teacher_specs, train=True,
        )
        rows.append({"key": key, "label": label, "spec": version.spec, "overrides": overrides})

    for row in rows:
        if row["spec"] is None or not requested(row["key"]):
            continue
        log.info("lightcap-ablation: evaluating %s (%s)", row["label"], row["spec"])
        row["result"] = evaluate(
            work_store, row["spec"], corpus, args.split, latency_images=args.latency_images,
            features_cache=features_cache, examples=3, meteor=not args.no_meteor,
        )
    rows = [r for r in rows if "result" in r]
    claims = check_claims({r["key"]: r["result"] for r in rows})
    table = format_table(rows, args.split, corpus.name)
    payload = {"split": args.split, "dataset": corpus.name, "profile": args.profile, "rows": rows, "claims": claims}
    (work / "table.json").write_text(json.dumps(payload, indent=1))
    text = table + "\n\n" + format_claims(claims)
    (work / "table.md").write_text(text + "\n")
    print(json.dumps(payload, indent=1) if args.json else text)
    return 0


# ---------------------------------------------------------------------------------------------- work store
def seed_work_store(main_store, root: Path, concepts_version) -> None:
    """Copy the concept extractor and its parents (whole model folders, same versions) into the work store."""
    root.mkdir(parents=True, exist_ok=True)
    todo = [concepts_version.name]
    seen = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        src = Path(main_store.root) / name
        dst = root / name
        if not dst.exists():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".*"))
        for version in main_store.versions(name):
            todo.extend(p["name"] for p in main_store.resolve(f"{name}@{version}").manifest.get("parents", []))


def stage_config(profile: str, overrides: list[str]) -> dict[str, Any]:
    """The config a row's stage publishes in its manifest (a plain dict, as stored)."""
    return load_config("lightcap", profile, overrides=overrides).to_dict()


def ensure_model(
    args, store, name: str, key: str, *, seed: int, overrides: list[str], concepts_spec: str, features_cache: Path,
    teachers: list[str] | None = None, train: bool = True,
):
    """The work store's version for this row (alias = row key), trained now if missing or stale."""
    all_overrides = [*args.set, *overrides]
    wanted = stage_config(args.profile, all_overrides)
    aliases = store.aliases(name) if name in store.models() else {}
    if key in aliases and not args.retrain:
        version = store.resolve(f"{name}@{key}")
        same = (
            version.manifest.get("config") == json.loads(json.dumps(wanted))
            and (version.manifest.get("extra") or {}).get("seed") == seed
            and Path(version.manifest.get("data", {}).get("path", "")).resolve() == Path(args.data).resolve()
        )
        if same and uses_kd(overrides):  # distilled from the teachers the table shows now
            used = [f"{t['name']}@{t['version']}" for t in (version.manifest.get("extra") or {}).get("teachers", [])]
            same = used == list(teachers or [])
        if same:
            log.info("lightcap-ablation: reusing %s for %s", version.spec, key)
            return version
    if not train:
        return None
    stage = "lightcap-teacher" if name == "lightcap-teacher" else "lightcap"
    argv = [
        "--data", str(args.data), "--profile", args.profile, "--seed", str(seed), "--store", str(store.root),
        "--alias", key, "--concepts", concepts_spec, "--features-cache", str(features_cache),
        "--run-dir", str(Path(args.work) / "runs" / key),
    ]
    for item in all_overrides:
        argv += ["--set", item]
    if stage == "lightcap" and uses_kd(overrides):
        if not teachers or None in teachers:
            raise UsageError(f"{key}: its teachers are not in the work store")
        argv += ["--teachers", ",".join(teachers)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.device:
        argv += ["--device", args.device]
    module = __import__("training.lightcap_teacher" if stage == "lightcap-teacher" else "training.lightcap",
                        fromlist=["run"])
    parser = argparse.ArgumentParser(prog=f"captioner train {stage}")
    module.add_arguments(parser)
    stage_args = parser.parse_args(argv)
    stage_args.command_line = shlex.join(["captioner", "train", stage, *argv])
    log.info("lightcap-ablation: %s", stage_args.command_line)
    module.run(stage_args)
    return store.resolve(f"{name}@{key}")


# ---------------------------------------------------------------------------------------------- table
def _num(value, digits=3):
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_table(rows: list[dict[str, Any]], split: str, dataset: str) -> str:
    lines = [
        f"LightCap ablation on {dataset} / {split} (pycocoevalcap; CIDEr-D on the 0-10 scale; latency: mean "
        f"ms per image, batch 1, end to end incl. the concept extractor)",
        "",
        "| model | store version | BLEU-4 | METEOR | ROUGE-L | CIDEr-D | params | latency ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        r = row["result"]
        lat = r.get("latency") or {}
        lines.append(
            f"| {row['label']} | {r['model']} | {_num(r['BLEU-4'])} | {_num(r['METEOR'])} | {_num(r['ROUGE-L'])} | "
            f"{_num(r['CIDEr-D'])} | {r['parameters']:,} | {_num(lat.get('mean_ms'), 1)} |"
        )
    return "\n".join(lines)


def check_claims(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The paper's claims, in direction, on this table (CIDEr-D). Only claims whose rows exist are checked."""

    def cider(key):
        return results[key]["CIDEr-D"] if key in results else None

    claims = []

    def claim(text, better, worse, *, extra=None):
        a, b = cider(better), cider(worse)
        if a is None or b is None:
            return
        entry = {"claim": text, "with": better, "without": worse, "cider_with": a, "cider_without": b,
                 "delta": a - b, "holds": a > b}
        entry.update(extra or {})
        claims.append(entry)

    claim("concepts help (student without KD)", "student-nokd", "noconcepts-nokd")
    claim("the modulator helps (student without KD)", "student-nokd", "nomodulator-nokd")
    claim("token KD helps", "student-tokenkd", "student-nokd")
    claim("all KD helps", "student-allkd", "student-nokd")
    claim("attention/hidden/sequence KD add to token KD", "student-allkd", "student-tokenkd")
    for kd in ("allkd", "nokd"):
        ens, single = f"student-{kd}", f"single-{kd}"
        if ens in results and single in results:
            extra = {"extra_parameters": results[ens]["parameters"] - results[single]["parameters"],
                     "relative_parameters": results[ens]["parameters"] / results[single]["parameters"] - 1}
            claim(f"the ensemble head helps ({'all KD' if kd == 'allkd' else 'no KD'})", ens, single, extra=extra)
    teachers = {k: v["CIDEr-D"] for k, v in results.items() if k.startswith("teacher-")}
    if teachers and "student-allkd" in results:
        best_key = max(teachers, key=teachers.get)
        best = teachers[best_key]
        student = results["student-allkd"]["CIDEr-D"]
        claims.append({
            "claim": "target: the KD student is within 5% CIDEr-D of the best teacher",
            "with": "student-allkd", "without": best_key, "cider_with": student, "cider_without": best,
            "delta": student - best, "holds": student >= 0.95 * best,
        })
    if "student-allkd" in results and "student-nokd" in results:
        claims.append({
            "claim": "target: the KD student is at least as good as the student without KD",
            "with": "student-allkd", "without": "student-nokd",
            "cider_with": results["student-allkd"]["CIDEr-D"], "cider_without": results["student-nokd"]["CIDEr-D"],
            "delta": results["student-allkd"]["CIDEr-D"] - results["student-nokd"]["CIDEr-D"],
            "holds": results["student-allkd"]["CIDEr-D"] >= results["student-nokd"]["CIDEr-D"],
        })
    return claims


def format_claims(claims: list[dict[str, Any]]) -> str:
    lines = ["| claim (CIDEr-D) | with | without | delta | holds here |", "|---|---:|---:|---:|---|"]
    for c in claims:
        note = ""
        if "extra_parameters" in c:
            note = f" (+{c['extra_parameters']:,} parameters, {100 * c['relative_parameters']:.1f}%)"
        lines.append(
            f"| {c['claim']}{note} | {c['cider_with']:.3f} | {c['cider_without']:.3f} | {c['delta']:+.3f} | "
            f"{'yes' if c['holds'] else '**no**'} |"
        )
    return "\n".join(lines)
