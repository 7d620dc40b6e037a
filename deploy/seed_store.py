"""Seed an empty model store (a fresh Kubernetes volume) with the models embedded in the image.

    python /opt/captioner/seed_store.py SOURCE TARGET

Docker seeds an empty named volume from the image by itself; Kubernetes does not, so the Deployment and
the Jobs run this in an init container with the store's volume mounted at TARGET and the image's embedded
store at SOURCE (``/models``, which the volume does not shadow there).

* Only models that TARGET does not have at all are added; a model already there (seeded before, or
  published by training) is never touched, and nothing is ever overwritten. Every pod that uses the volume
  (serving and the Jobs) seeds first, so a fresh volume is complete before anything trains into it, and an
  image that embeds a new model brings it into an existing volume.
* Each model folder is copied into a hidden staging folder on TARGET's filesystem, hash-verified there
  through ``captioning.store``, and renamed into place; the rename is atomic, so replicas seeding the same
  volume at once are safe (the first rename of a model wins, the others drop their copy) and the service
  never sees a half-copied model.
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from pathlib import Path

from captioning.errors import StoreError
from captioning.store import ModelStore


def seed(source: Path, target: Path, *, log=print) -> list[str]:
    """Copy each model of ``source`` that ``target`` lacks into ``target``; returns the models added."""
    names = ModelStore(source).models() if source.is_dir() else []
    if not names:  # an image without embedded models: the volume must bring its own
        log(f"seed: {source} holds no models; nothing to seed")
        return []
    target.mkdir(parents=True, exist_ok=True)
    added = []
    for name in names:
        if (target / name).exists():
            log(f"seed: {target / name} exists; left unchanged")
            continue
        staging_root = target / f".seed-{uuid.uuid4().hex[:12]}"
        try:
            shutil.copytree(source / name, staging_root / name)
            problems = ModelStore(staging_root).verify(name)
            if problems:
                raise StoreError(f"seed: copy of {name} failed verification: {'; '.join(map(str, problems))}")
            try:
                os.rename(staging_root / name, target / name)
            except OSError:
                if (target / name).is_dir():  # another replica renamed its copy first
                    log(f"seed: {name} was seeded concurrently; keeping that copy")
                    continue
                raise
            added.append(name)
            log(f"seed: {name} -> {target / name}")
        finally:
            shutil.rmtree(staging_root, ignore_errors=True)
    return added


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        seed(Path(argv[0]), Path(argv[1]))
    except StoreError as exc:
        print(f"seed_store: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
