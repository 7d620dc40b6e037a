"""``captioner store list | show | promote | rollback | verify | gc`` (each with ``--json`` and ``--store DIR``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from captioning.errors import StoreError
from captioning.store import PRODUCTION, ModelStore, ModelVersion


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", type=Path, default=None, metavar="DIR",
                        help="model store root (default: $CAPTIONER_MODEL_STORE or the repository's model_store/)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("store", help="list, inspect, promote, roll back, verify and clean the model store",
                                   description="The versioned model store (docs/store.md).")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
    inner = parser.add_subparsers(dest="store_command", metavar="ACTION")

    p = inner.add_parser("list", help="every model version with its aliases")
    p.add_argument("name", nargs="?", help="only this model")
    _common(p)
    p.set_defaults(func=cmd_list)

    p = inner.add_parser("show", help="one version's manifest: NAME (production), NAME@VERSION, NAME@ALIAS, NAME@latest")
    p.add_argument("spec", metavar="NAME[@VERSION|@ALIAS]")
    p.add_argument("--verify", action="store_true", help="also check every file's sha256")
    _common(p)
    p.set_defaults(func=cmd_show)

    p = inner.add_parser("promote", help="point an alias (default production) at a version, after verifying it")
    p.add_argument("name")
    p.add_argument("version", type=int)
    p.add_argument("--alias", default=PRODUCTION, help="alias to move (default production)")
    _common(p)
    p.set_defaults(func=cmd_promote)

    p = inner.add_parser("rollback", help="move an alias back to the version it pointed at before")
    p.add_argument("name")
    p.add_argument("--alias", default=PRODUCTION, help="alias to move back (default production)")
    _common(p)
    p.set_defaults(func=cmd_rollback)

    p = inner.add_parser("verify", help="check manifests and hashes; exit status 1 when anything is wrong")
    p.add_argument("name", nargs="?", help="only this model")
    _common(p)
    p.set_defaults(func=cmd_verify)

    p = inner.add_parser("gc", help="remove old versions (keeps the N newest, aliased ones, rollback targets, parents)")
    p.add_argument("--keep", type=int, default=3, help="newest versions to keep per model (default 3)")
    p.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    _common(p)
    p.set_defaults(func=cmd_gc)


def _emit(args: argparse.Namespace, payload: Any, text: str) -> None:
    if args.json:
        json.dump(payload, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(text)


def _aliases_by_version(store: ModelStore, name: str) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for alias, version in sorted(store.aliases(name).items()):
        out.setdefault(version, []).append(alias)
    return out


def _summary(mv: ModelVersion, aliases: list[str]) -> dict[str, Any]:
    row = {
        "name": mv.name,
        "version": mv.version,
        "aliases": aliases,
        "path": str(mv.path),
        "profile": mv.profile,
        "task": mv.task,
        "created": mv.manifest.get("created"),
        "size": mv.size if not mv.error else None,
        "metrics": mv.metrics,
    }
    if mv.error:
        row["error"] = mv.error
    return row


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_list(args: argparse.Namespace) -> int:
    store = ModelStore(args.store)
    rows = []
    alias_cache: dict[str, dict[int, list[str]]] = {}
    for mv in store.list(args.name):
        if mv.name not in alias_cache:
            alias_cache[mv.name] = _aliases_by_version(store, mv.name)
        rows.append(_summary(mv, alias_cache[mv.name].get(mv.version, [])))
    header = ("MODEL", "VERSION", "ALIASES", "PROFILE", "TASK", "SIZE", "CREATED")
    table = [header] + [
        (r["name"], str(r["version"]), ",".join(r["aliases"]) or "-", r["profile"] or "-", r["task"] or "-",
         _size(r["size"]), r["created"] or ("BROKEN: " + r["error"] if r.get("error") else "-"))
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table)
    if not rows:
        text = f"no models in {store.root}"
    _emit(args, {"store": str(store.root), "versions": rows}, text)
    return 0


def _parents(manifest: dict[str, Any]) -> str:
    return ", ".join(f"{p.get('name')}@{p.get('version')}" for p in manifest.get("parents", [])) or "none"


def cmd_show(args: argparse.Namespace) -> int:
    store = ModelStore(args.store)
    mv = store.load(args.spec, verify=True) if args.verify else store.resolve(args.spec)
    aliases = _aliases_by_version(store, mv.name).get(mv.version, [])
    m = mv.manifest
    payload = {**mv.to_dict(), "aliases": aliases, "verified": bool(args.verify)}
    lines = [
        f"{mv.spec}  ({', '.join(aliases) or 'no alias'})  {mv.path}",
        f"  task {m.get('task')}, profile {m.get('profile')}, created {m.get('created')}, code {m.get('code_revision')}",
        f"  command: {m.get('command')}",
        f"  data: {json.dumps(m.get('data'))}",
        f"  parents: {_parents(m)}",
        f"  metrics: {json.dumps(m.get('metrics'))}",
        f"  files ({_size(mv.size)}{', sha256 verified' if args.verify else ''}):",
        *(f"    {rel}  {_size(info['size'])}  {info['sha256'][:16]}" for rel, info in sorted(mv.files.items())),
    ]
    _emit(args, payload, "\n".join(lines))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    result = ModelStore(args.store).promote(args.name, args.version, alias=args.alias)
    _emit(args, result, f"{result['name']}: {result['alias']} {result['previous'] or '-'} -> {result['version']}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    result = ModelStore(args.store).rollback(args.name, alias=args.alias)
    _emit(args, result, f"{result['name']}: {result['alias']} {result['previous']} -> {result['version']} (rolled back)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    store = ModelStore(args.store)
    problems = store.verify(args.name)
    try:
        checked = [mv.spec for mv in store.list(args.name)]
    except StoreError:
        checked = []  # a model with an aliases file but no versions: verify has reported it
    payload = {"store": str(store.root), "ok": not problems, "checked": checked,
               "problems": [p.to_dict() for p in problems]}
    if problems:
        text = "\n".join(f"PROBLEM {p}" for p in problems) + f"\n{len(problems)} problem(s) in {store.root}"
    else:
        text = f"ok: {len(checked)} version(s) verified in {store.root}"
    _emit(args, payload, text)
    return 1 if problems else 0


def cmd_gc(args: argparse.Namespace) -> int:
    report = ModelStore(args.store).gc(keep=args.keep, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    lines = [f"{verb} {spec}" for spec in report.removed] + [f"{verb} leftover {p}" for p in report.removed_temp]
    lines.append(f"kept {len(report.kept)} version(s), {verb} {len(report.removed)}")
    _emit(args, report.to_dict(), "\n".join(lines))
    return 0
