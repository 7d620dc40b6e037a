"""Serving imports what serving needs: no training-only library (plots, caption metrics, the training
package, Ray, the browser driver) is loaded by the service with every embedded model in place."""

from __future__ import annotations

import json
import subprocess
import sys

TRAINING_ONLY = ("training", "matplotlib", "pycocoevalcap", "ray", "playwright", "schemathesis", "onnxruntime", "onnx")

SCRIPT = """
import json, sys
from captioning.inference import TASKS, load_model
from captioning.store import ModelStore
from service.app import create_app
from service.settings import Settings

create_app(Settings(_env_file=None, data_dir=sys.argv[1]))
store = ModelStore()
for name in TASKS:
    load_model(store, name)
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""


def test_the_serve_path_imports_no_training_only_library(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "data")], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    loaded = set(json.loads(out.splitlines()[-1]))
    assert "torch" in loaded and "captioning" in loaded  # the probe did load the models
    assert not loaded & set(TRAINING_ONLY), sorted(loaded & set(TRAINING_ONLY))
