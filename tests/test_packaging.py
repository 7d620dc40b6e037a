"""Packaging: a wheel installed into a fresh virtual environment serves out of the box.

The wheel carries the embedded default model store as the data package ``captioner_models`` (the
repository's model_store/ mapped in pyproject.toml); installed without ``-e`` the package finds it there,
not in ``site-packages/model_store``. ``CAPTIONER_MODEL_STORE`` still overrides it, and a checkout keeps
using its own model_store/.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

from setuptools import find_packages

from captioning.store import ModelStore, embedded_root
from service.testing import image_bytes

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "captioning", "training", "service", "model_store")


def test_every_package_is_listed_in_pyproject():
    """pyproject.toml lists the packages (the model store is mapped in as one), so a new subpackage must be
    added there; this catches one that is not."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set(find_packages(str(ROOT), include=["captioning*", "training*", "service*"]))
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    assert listed - found == {"captioner_models"}


def test_a_checkout_uses_its_own_model_store():
    assert embedded_root() == ROOT / "model_store"


def test_python_leftovers_in_the_store_are_not_models(tmp_path):
    """Installed, the store is a (namespace) package folder: an ``__init__.py`` or ``__pycache__`` there must
    not read as a model, a problem or garbage to collect."""
    store_root = tmp_path / "store"
    shutil.copytree(ROOT / "model_store" / "ucm-classifier", store_root / "ucm-classifier")
    store = ModelStore(store_root)
    before = ([(v.name, v.version) for v in store.list()], store.models())
    (store_root / "__init__.py").write_text("")
    (store_root / "__pycache__").mkdir()
    (store_root / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"\0")
    assert ([(v.name, v.version) for v in store.list()], store.models()) == before
    assert store.verify() == []
    report = store.gc(keep=1)
    assert (store_root / "__init__.py").is_file() and (store_root / "__pycache__").is_dir()
    assert report.removed == [] and report.removed_temp == []  # one version, no temp files: nothing to collect
    assert [(v.name, v.version) for v in store.list()] == before[0]


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert result.returncode == 0, f"{cmd} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def test_a_wheel_installed_in_a_fresh_venv_captions_out_of_the_box(tmp_path):
    # build from a copy of the sources, so the checkout gets no build/ or egg-info
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", ".*"))
        else:
            shutil.copy2(path, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", str(tmp_path / "dist"), str(src)])
    (wheel,) = (tmp_path / "dist").glob("captioner-*.whl")

    # a new venv outside the checkout; the heavy dependencies (torch, ...) come from this interpreter's
    # site-packages through a .pth line (its own .pth files, e.g. an editable captioner, are not processed)
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)])

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CAPTIONER_MODEL_STORE", "VIRTUAL_ENV")}
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = json.loads(_run([str(python), "-c", (
        "import json, captioning, captioning.store as s; "
        "print(json.dumps([captioning.__file__, str(s.DEFAULT_ROOT), s.ModelStore(s.DEFAULT_ROOT).models()]))"
    )], cwd=work, env=env).stdout)
    assert Path(where[0]).is_relative_to(site), where  # the wheel's code, not the checkout's
    assert where[1] == str((site / "captioner_models").resolve()), where
    assert {"lightcap", "ucm-captioner", "concepts", "ucm-classifier"} <= set(where[2])

    picture = work / "picture.png"
    picture.write_bytes(image_bytes(96, 64, seed=3))
    out = _run([str(venv / "bin" / "captioner"), "caption", "--threads", "1", picture.name], cwd=work, env=env)
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0]["caption"].strip(), out.stdout
    assert lines[0]["model"] == "lightcap", lines[0]  # the embedded default, served from the wheel's store

    # CAPTIONER_MODEL_STORE still overrides the embedded store
    out = subprocess.run([str(venv / "bin" / "captioner"), "caption", picture.name], capture_output=True,
                         text=True, cwd=work, env={**env, "CAPTIONER_MODEL_STORE": str(work / "nowhere")}, timeout=300)
    assert out.returncode != 0 and "nowhere" in out.stderr
