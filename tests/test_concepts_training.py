"""Real training of the concept extractor's three stages on a small synthetic set (slow: minutes on 2 cores).

clip -> concepts-detector -> concepts-align into a temporary store, with shortened schedules; then
``captioner eval concepts`` on a freshly generated set with another seed. The figures asserted are far below the
full-schedule targets (docs/concepts.md) but well above what untrained weights give.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from captioning.cli import main
    from captioning.data.synth import generate

    root = tmp_path_factory.mktemp("concepts-training")
    data = root / "data"
    generate(data, per_class=10, seed=5, size=256, workers=1)
    store = root / "store"
    common = ["--data", str(data), "--profile", "tiny", "--store", str(store), "--threads", "2"]
    assert main(["train", "clip", *common, "--run-dir", str(root / "clip"), "--set", "train.epochs=15"]) == 0
    assert main([
        "train", "concepts-detector", *common, "--run-dir", str(root / "det"), "--set", "detector.train.epochs=4",
        "--set", "detector.train.close_mosaic=1",
    ]) == 0
    assert main(["train", "concepts-align", *common, "--run-dir", str(root / "align"), "--set", "align.epochs=30"]) == 0
    return root, store


def test_three_stages_publish_a_servable_extractor(trained):
    from captioning.inference import load_model
    from captioning.store import ModelStore

    _, store_root = trained
    store = ModelStore(store_root)
    concepts = store.resolve("concepts@production")
    parents = {p["name"]: p["version"] for p in concepts.manifest["parents"]}
    assert parents == {"clip": 1, "concepts-detector": 1}
    clip = store.resolve("clip@1")
    history = clip.manifest["extra"]["history"]
    assert history[-1]["loss"] < history[0]["loss"]  # the contrastive loss went down
    align_history = concepts.manifest["extra"]["history"]
    assert align_history[-1]["loss"] < 0.7 * align_history[0]["loss"]
    metrics = concepts.manifest["metrics"]
    # each ground-truth box of val classified by the aligner: far above the most frequent concept (~27%); on these
    # 168 training pictures the box-only aligner reached 0.53, the tiny profile's larger scene-context one 0.49
    # (on the real 1,680 it is the better one: 0.90 vs 0.88, docs/concepts.md)
    assert metrics["val_gt_box_concept_accuracy"] >= 0.45
    extractor = load_model(store, "concepts")
    assert extractor.version == concepts.version and 0 <= extractor.min_score < 1


def test_eval_on_a_fresh_seed(trained, capsys):
    from captioning.cli import main
    from captioning.data.synth import generate

    root, store = trained
    fresh = root / "fresh"
    generate(fresh, per_class=3, seed=12345, size=256, workers=1)
    assert main(["eval", "concepts", "--data", str(fresh), "--split", "test", "--store", str(store), "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["images"] == 21
    # a YOLOv5n trained from scratch for a few dozen steps proposes nothing yet (its recall on an unseen seed is
    # measured on the full schedule: docs/concepts.md); the aligner, on the ground-truth boxes of pictures it
    # never saw, must already beat the most frequent concept (~27 %)
    assert set(figures) >= {"box_recall@0.5", "concept_f1", "gt_box_concept_accuracy"}
    assert figures["gt_box_concept_accuracy"] > 0.3
