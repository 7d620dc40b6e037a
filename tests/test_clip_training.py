"""`captioner train clip --extra-train DIR`: another dataset's train split joins CLIP's training pairs.

A one-epoch run on two small synthetic sets (64 px images): the number of optimiser steps and the published
manifest show the extra pictures were used, and --data's own record is unchanged; a bad folder is named.
"""

from __future__ import annotations

import json
import math

import pytest


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    from captioning.data.synth import generate

    root = tmp_path_factory.mktemp("clip-extra")
    generate(root / "a", per_class=2, seed=11, size=64, workers=1)
    generate(root / "b", per_class=2, seed=12, size=64, workers=1)
    return root


def _split_count(folder, split):
    images = json.loads((folder / "dataset.json").read_text())["images"]
    return sum(1 for rec in images if rec["split"] == split)


def _train(root, store, run_dir, *extra):
    from captioning.cli import main

    return main([
        "train", "clip", "--data", str(root / "a"), *extra, "--profile", "tiny", "--store", str(store),
        "--run-dir", str(run_dir), "--threads", "1", "--seed", "3",
        "--set", "train.epochs=1", "--set", "train.batch_size=4", "--set", "train.warmup_steps=1",
        "--set", "model.vision_cfg.image_size=64",
    ])


def test_extra_train_split_joins_the_training_pairs(two_sets, tmp_path):
    from captioning.store import ModelStore

    root = two_sets
    n_a, n_b = _split_count(root / "a", "train"), _split_count(root / "b", "train")
    assert _train(root, tmp_path / "store", tmp_path / "run", "--extra-train", str(root / "b")) == 0

    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history[-1]["step"] == math.ceil((n_a + n_b) / 4)  # one epoch over both train splits

    manifest = ModelStore(tmp_path / "store").resolve("clip").manifest
    data = manifest["data"]
    assert data["splits"]["train"] == n_a  # --data's own record is unchanged
    assert [extra["splits"]["train"] for extra in data["extra_train"]] == [n_b]
    assert data["extra_train"][0]["synthetic"]["seed"] == 12


def test_without_extra_train_only_the_data_split_is_used(two_sets, tmp_path):
    root = two_sets
    assert _train(root, tmp_path / "store", tmp_path / "run") == 0
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history[-1]["step"] == math.ceil(_split_count(root / "a", "train") / 4)


def test_extra_train_folder_without_a_dataset_is_named(two_sets, tmp_path, capsys):
    missing = tmp_path / "nothing-here"
    missing.mkdir()
    from captioning.cli import main

    code = main([
        "train", "clip", "--data", str(two_sets / "a"), "--extra-train", str(missing), "--profile", "tiny",
        "--store", str(tmp_path / "store"), "--run-dir", str(tmp_path / "run"), "--threads", "1",
    ])
    assert code != 0
    assert "nothing-here" in capsys.readouterr().err
