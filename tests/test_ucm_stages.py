"""The four UCM stages, their store outputs, errors, resume and the service loaders, on a very small
dataset in the UCM layout that the tests write themselves (never committed).

Each image is a flat background with a few coloured squares; its captions name the count and colour and
its labels follow them, so every stage has something learnable. Splits per class: 3 train, 1 val, 1 test.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from unittest import mock

import numpy as np
from PIL import Image

from captioning.data import LABELS, UCM_CLASSES

COLOURS = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 60, 200), "white": (235, 235, 235)}
COUNTS = ["one", "two", "three"]


def write_dataset(root: Path, *, per_class: int = 5, size: int = 48, seed: int = 0, classes: int = 21) -> Path:
    rng = random.Random(seed)
    root = Path(root)
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    images, rows = [], []
    sentid = 0
    for c, name in enumerate(UCM_CLASSES[:classes]):
        for k in range(per_class):
            imgid = len(images)
            colour = rng.choice(sorted(COLOURS))
            count = rng.randrange(1, 4)
            pixels = np.full((size, size, 3), (30 + 9 * c, 90, 160 - 5 * c), dtype=np.uint8)
            pixels += np.random.default_rng(seed * 1000 + imgid).integers(0, 20, pixels.shape, dtype=np.uint8)
            side = size // 6
            for j in range(count):
                y, x = 2 + j * (side + 3), rng.randrange(0, size - side)
                pixels[y : y + side, x : x + side] = COLOURS[colour]
            filename = f"{imgid + 1}.tif"
            Image.fromarray(pixels).save(root / "imgs" / filename)
            split = "train" if k < per_class - 2 else ("val" if k == per_class - 2 else "test")
            sentences = []
            for s in range(5):
                raw = (
                    f"There are {COUNTS[count - 1]} {colour} squares in the {name} ."
                    if s % 2 == 0
                    else f"{COUNTS[count - 1].capitalize()} {colour} squares lie on a {name} scene ."
                )
                sentences.append({"raw": raw, "tokens": raw.lower().split(), "imgid": imgid, "sentid": sentid})
                sentid += 1
            images.append(
                {"imgid": imgid, "filename": filename, "split": split,
                 "sentids": [s["sentid"] for s in sentences], "sentences": sentences}
            )
            labels = [0] * len(LABELS)
            labels[c % len(LABELS)] = 1
            labels[list(COLOURS).index(colour) + 3] = 1
            rows.append(f"{name}{k:02d}\t" + "\t".join(map(str, labels)))
    (root / "dataset.json").write_text(json.dumps({"dataset": "ucm-test", "images": images}))
    (root / "multilabels.txt").write_text("IMAGE\\LABEL\t" + "\t".join(LABELS) + "\n" + "\n".join(rows) + "\n")
    return root


# every stage of a test run uses these sizes so prerequisites fit together
SMALL = [
    "text.embed_dim=8",
    "text.hidden_dim=12",
    "text.dropout=0.1",
    "image.input_size=32",
    "text_ae.epochs=2",
    "text_ae.batch_size=32",
    "classifier.fine_tune_epochs=1",
    "classifier.head_epochs=1",
    "classifier.batch_size=16",
    "distill.epochs=2",
    "distill.batch_size=16",
    "captioner.epochs=2",
    "captioner.batch_size=16",
    "captioner.report_meteor=false",
    "decoding.max_length=8",
]


def small(*extra: str) -> list[str]:
    out = []
    for item in [*SMALL, *extra]:
        out += ["--set", item]
    return out


# ------------------------------------------------------------------------------------------------ tests
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from captioning.cli import main  # noqa: E402
from captioning.errors import ConfigError, DataError, PrerequisiteError  # noqa: E402
from captioning.inference import load_model  # noqa: E402
from captioning.store import ModelStore  # noqa: E402

STAGES = ("ucm-text-ae", "ucm-classifier", "ucm-distill", "ucm-captioner")


def train(stage: str, data: Path, store: Path, run_dir: Path, *extra: str) -> int:
    argv = ["train", stage, "--data", str(data), "--profile", "tiny", "--store", str(store),
            "--run-dir", str(run_dir), *small(), *extra]
    with mock.patch.object(sys, "argv", ["captioner", *argv]):  # as if typed: the manifest records it
        return main(argv)


def call(argv: list[str]):
    """Run the stage function itself (not main) so user errors surface as exceptions."""
    from captioning.cli import build_parser

    args = build_parser().parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("ucm-data"))


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> tuple[Path, Path]:
    """All four stages trained once into one store (tiny sizes, 2 epochs each)."""
    work = tmp_path_factory.mktemp("ucm-work")
    store = work / "store"
    for stage in STAGES:
        assert train(stage, data, store, work / "runs" / stage) == 0, stage
    return store, work


def test_every_stage_publishes_its_files_and_lineage(trained):
    store_root, _ = trained
    store = ModelStore(store_root)
    assert store.verify() == []
    for stage in STAGES:
        version = store.resolve(f"{stage}@latest")
        manifest = version.manifest
        assert manifest["profile"] == "tiny" and manifest["task"] == stage
        assert {"model.safetensors", "loss_curve.png", "metrics.json"} <= set(manifest["files"])
        assert f"train {stage}" in manifest["command"] and "--data" in manifest["command"]
        assert len(manifest["extra"]["history"]) >= 2  # one record per epoch
        weights = load_file(str(version.file("model.safetensors")))
        assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float16}
    distill = store.resolve("ucm-distill@latest").manifest
    assert {p["name"] for p in distill["parents"]} == {"ucm-text-ae", "ucm-classifier"}
    captioner = store.resolve("ucm-captioner@latest").manifest
    assert {p["name"] for p in captioner["parents"]} == {"ucm-distill", "ucm-text-ae"}
    assert "test_nn_CIDEr-D" in captioner["metrics"] and "test_CIDEr-D" in captioner["metrics"]
    classifier = store.resolve("ucm-classifier@latest")
    assert 0.0 < classifier.metrics["threshold"] < 1.0
    assert "test_micro_f1" in classifier.metrics


def test_service_loaders_and_eval_cli(trained, data, capsys):
    from PIL import Image

    store = ModelStore(trained[0])
    classifier = load_model(store, "ucm-classifier")
    image = Image.new("L", (70, 50), 128)  # another size and mode than the training images
    batch = torch.stack([classifier.preprocess(image), classifier.preprocess(image.convert("RGB"))])
    assert batch.shape == (2, 3, 32, 32)
    probs = classifier.predict(batch)
    assert probs.shape == (2, 17) and ((probs >= 0) & (probs <= 1)).all()
    assert len(classifier.labels) == 17 and classifier.threshold == store.resolve("ucm-classifier").metrics["threshold"]

    captioner = load_model(store, "ucm-captioner")
    outs = captioner.caption(batch, captioner.options(beam_size=2, max_length=5))
    assert len(outs) == 2 and all(len(o.tokens) <= 5 and o.text == " ".join(o.tokens) for o in outs)
    assert all(o.score <= 0 for o in outs)
    assert captioner.caption(batch, captioner.decoding)[0].tokens  # the published decoding defaults

    assert main(["eval", "ucm-classifier", "--data", str(data), "--store", str(trained[0]), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"].startswith("ucm-classifier@") and 0 <= result["metrics"]["micro_f1"] <= 1
    assert main(["eval", "ucm-captioner", "--data", str(data), "--store", str(trained[0]), "--json", "--no-meteor"]) == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    assert {"BLEU-4", "CIDEr-D", "ROUGE-L", "nn_CIDEr-D", "triple_repeat"} <= set(metrics)
    assert metrics["decoding"]["max_repeat_run"] == 2 and metrics["triple_repeat"] == 0.0


def test_fresh_dataset_with_another_seed_evaluates(trained, tmp_path, capsys):
    fresh = write_dataset(tmp_path / "fresh", seed=99, per_class=3)
    assert main(["eval", "ucm-captioner", "--data", str(fresh), "--store", str(trained[0]), "--json", "--no-meteor",
                 "--beam-size", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metrics"]["images"] == 21 and result["metrics"]["decoding"]["beam_size"] == 1


def _checkpoint_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]


@pytest.mark.parametrize(
    "stage, epochs_key, total",
    [
        ("ucm-text-ae", "text_ae.epochs", 2),
        ("ucm-classifier", "classifier.head_epochs", 1),  # 1 fine-tune + 1 head: resumes across the switch
        ("ucm-distill", "distill.epochs", 2),
        ("ucm-captioner", "captioner.epochs", 2),
    ],
)
def test_interrupted_and_resumed_equals_uninterrupted(stage, epochs_key, total, trained, data, tmp_path):
    store = trained[0]
    extra = ("--set", "captioner.attention_dim=6") if stage == "ucm-captioner" else ()
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert train(stage, data, store, whole, "--no-publish", *extra) == 0
    assert train(stage, data, store, part, "--no-publish", "--set", f"{epochs_key}={total - 1}", *extra) == 0
    first = _checkpoint_state(part)
    assert train(stage, data, store, part, "--no-publish", "--resume", *extra) == 0
    resumed, uninterrupted = _checkpoint_state(part), _checkpoint_state(whole)
    assert resumed.keys() == uninterrupted.keys()
    assert any(not torch.equal(first[k], resumed[k]) for k in first)  # the resumed run did train
    for key in uninterrupted:
        assert torch.equal(resumed[key], uninterrupted[key]), key


def test_same_seed_same_weights_other_seed_differs(data, tmp_path):
    store = tmp_path / "store"
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        assert train("ucm-text-ae", data, store, tmp_path / name, "--no-publish", "--seed", seed) == 0
    a, b, c = (_checkpoint_state(tmp_path / n) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_clear_errors(trained, data, tmp_path):
    store = str(trained[0])
    with pytest.raises(DataError, match="does not exist"):
        call(["train", "ucm-text-ae", "--data", str(tmp_path / "nowhere"), "--store", store])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match="dataset.json"):
        call(["train", "ucm-text-ae", "--data", str(broken), "--store", store])
    nolabels = write_dataset(tmp_path / "nolabels", per_class=3, classes=2)
    (nolabels / "multilabels.txt").unlink()
    with pytest.raises(DataError, match="multilabels.txt"):
        call(["train", "ucm-classifier", "--data", str(nolabels), "--store", store, *small()])
    empty = tmp_path / "empty-store"
    with pytest.raises(PrerequisiteError, match="captioner train ucm-text-ae"):
        call(["train", "ucm-distill", "--data", str(data), "--store", str(empty), *small()])
    with pytest.raises(PrerequisiteError, match="captioner train ucm-distill"):
        call(["train", "ucm-captioner", "--data", str(data), "--store", str(empty), *small()])
    with pytest.raises(PrerequisiteError, match="no ucm-text-ae model of profile 'paper'"):
        call(["train", "ucm-distill", "--data", str(data), "--store", store, "--profile", "paper"])
    with pytest.raises(PrerequisiteError, match="trained in profile 'tiny'"):
        call(["train", "ucm-distill", "--data", str(data), "--store", store, "--profile", "paper",
              "--text-ae", "ucm-text-ae@1"])
    with pytest.raises(ConfigError, match="text.hidden_dim: 12 there, 24 here"):
        call(["train", "ucm-distill", "--data", str(data), "--store", store, *small("text.hidden_dim=24")])
    assert main(["train", "ucm-distill", "--data", str(data), "--store", str(empty), *small()]) == 2  # no traceback


def test_classifier_starts_from_a_local_pretrained_file(data, tmp_path):
    from torchvision.models.resnet import BasicBlock, ResNet

    reference = ResNet(BasicBlock, [1, 1, 1, 1])  # the tiny trunk's architecture, as a torchvision file
    weights = tmp_path / "imagenet-like.pth"
    torch.save(reference.state_dict(), weights)
    store = tmp_path / "store"
    zero = ["--set", "classifier.fine_tune_epochs=0", "--set", "classifier.head_epochs=1"]
    assert train("ucm-classifier", data, store, tmp_path / "run", "--pretrained", str(weights), *zero) == 0
    version = ModelStore(store).resolve("ucm-classifier@latest")
    assert version.manifest["config"]["image"]["pretrained"] == str(weights)
    assert f"--pretrained {weights}" in version.manifest["command"]
    trunk = load_file(str(version.file("model.safetensors")))
    # head-only training leaves the loaded trunk as it was (up to the fp16 of the published file)
    assert torch.equal(trunk["trunk.layer3.0.conv1.weight"].float(), reference.layer3[0].conv1.weight.half().float())
    with pytest.raises(ConfigError, match="missing.pth: pretrained ResNet state dict not found"):
        call(["train", "ucm-classifier", "--data", str(data), "--store", str(store), "--pretrained",
              str(tmp_path / "missing.pth"), *small()])
