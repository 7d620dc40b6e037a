"""LightCap end to end on the tiny profile, on a few hand-made images (fast): a concept extractor with random
weights is published into a temporary store; a teacher and a distilled student (all KD losses on) are trained
through the CLI for one short epoch, published, evaluated with ``captioner eval lightcap --json``, loaded
through ``captioning.inference.load_model`` and asked to caption images; ``--resume`` repeats the weights."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from captioning.cli import main
from captioning.config import load_config
from captioning.errors import PrerequisiteError
from captioning.inference import CaptionOut, load_model
from captioning.store import ModelStore

CAPTIONS = {
    "green": ["a green field with many trees", "many green trees are in the field", "it is a green field"],
    "gray": ["a gray parking lot with many cars", "many cars are parked in the lot", "it is a gray parking lot"],
    "blue": ["the blue sea is next to the beach", "blue water is near the white sand", "it is a blue sea"],
}
COLOURS = {"green": (40, 140, 50), "gray": (120, 120, 125), "blue": (30, 70, 160)}
SPLITS = ["train", "train", "val", "test"]


def make_dataset(root):
    """12 images (3 kinds x 4), UCM layout: dataset.json + imgs/."""
    (root / "imgs").mkdir(parents=True)
    images, imgid, sentid = [], 0, 0
    for kind, colour in COLOURS.items():
        for j, split in enumerate(SPLITS):
            name = f"{imgid + 1}.tif"
            im = Image.new("RGB", (64, 64), colour)
            im.paste((250, 250, 250), (8 * j, 8, 8 * j + 16, 24))
            im.save(root / "imgs" / name)
            sents = []
            for raw in CAPTIONS[kind]:
                sents.append({"raw": raw, "tokens": raw.split(), "imgid": imgid, "sentid": sentid})
                sentid += 1
            images.append({"imgid": imgid, "filename": name, "split": split,
                           "sentids": [s["sentid"] for s in sents], "sentences": sents})
            imgid += 1
    (root / "dataset.json").write_text(json.dumps({"dataset": "tiny-hand", "images": images}))
    return root


def publish_random_concepts(store: ModelStore, root, image_size: int | None = 64):
    """clip / concepts-detector / concepts with random weights (the concept extractor's own store layout).

    ``image_size`` 64 (a 2x2 grid) keeps the test fast; None keeps the tiny profile's sizes."""
    from captioning.config_schema import ClipConfig
    from captioning.models.lightcap.clip_encoder import ClipTokenizer, build_clip, clip_model_config
    from captioning.models.lightcap.concepts import (
        ALIGNER_FILE,
        ConceptVocabulary,
        RegionAligner,
        concept_words,
        embed_concepts,
    )
    from captioning.models.lightcap.detector import WEIGHTS_FILE, ProposalDetector
    from captioning.weights import save_state

    def publish(name, folder, config, parents=()):  # a typed config, stored as its plain dict
        return store.publish(name, folder, task=name, profile="tiny", metrics={}, config=config.to_dict(),
                             command="pytest", data={"name": "none"}, parents=list(parents))

    torch.manual_seed(0)
    clip_cfg, cfg = load_config("clip", "tiny"), load_config("concepts", "tiny")
    words, labels = concept_words(cfg.vocabulary)
    tokenizer = ClipTokenizer.train_word_level([f"a photo of a {w}" for w in words], 32)
    model_cfg = clip_model_config(clip_cfg.model)
    model_cfg["text_cfg"].update(tokenizer.text_cfg_overrides())
    if image_size:
        model_cfg["vision_cfg"]["image_size"] = image_size
    clip_cfg = ClipConfig.model_validate({**clip_cfg.to_dict(), "model": model_cfg})
    clip = build_clip(clip_cfg)
    for name in ("clip", "det", "concepts"):
        (root / name).mkdir()
    save_state(clip.state_dict(), root / "clip" / "model.safetensors", "float16")
    tokenizer.save(root / "clip")
    clip_v = publish("clip", root / "clip", clip_cfg)
    if image_size:
        cfg.detector.imgsz = image_size
    ProposalDetector(cfg.detector).save_weights(root / "det" / WEIGHTS_FILE)
    det_v = publish("concepts-detector", root / "det", cfg)
    vocab = ConceptVocabulary(words, labels, embed_concepts(clip, tokenizer, words))
    aligner = RegionAligner.from_config(
        clip.visual.layer4[-1].conv3.out_channels if hasattr(clip.visual, "layer4") else 512, cfg.align, vocab.dim
    )
    save_state(aligner.state_dict(), root / "concepts" / ALIGNER_FILE, "float16")
    vocab.save(root / "concepts")
    if image_size:
        cfg.image_size = image_size
    cfg.extract.proposal_conf, cfg.extract.min_score = 0.0, 0.0
    parents = [{"name": "clip", "version": clip_v.version}, {"name": "concepts-detector", "version": det_v.version}]
    return publish("concepts", root / "concepts", cfg, parents)


SMALL = [  # shrink the tiny profile further so the test trains in seconds
    "--set", "train.epochs=1", "--set", "train.batch_size=4", "--set", "train.warmup_steps=2",
    "--set", "model.fusion.layers=1", "--set", "model.fusion.hidden=32", "--set", "model.fusion.heads=2",
    "--set", "model.fusion.intermediate=64", "--set", "teacher.fusion.layers=2", "--set", "teacher.fusion.hidden=48",
    "--set", "teacher.fusion.heads=2", "--set", "teacher.fusion.intermediate=96", "--set", "decoding.max_length=8",
    "--set", "kd.teacher_seeds=[1]", "--set", "eval.latency_images=2", "--set", "eval.meteor=false",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("lightcap")
    data = make_dataset(root / "data")
    store = ModelStore(root / "store")
    publish_random_concepts(store, root)
    common = ["--data", str(data), "--store", str(store.root), "--features-cache", str(root / "features"), *SMALL]
    assert main(["train", "lightcap-teacher", "--seed", "1", "--run-dir", str(root / "runs" / "t1"), *common]) == 0
    assert main(["train", "lightcap", "--seed", "0", "--run-dir", str(root / "runs" / "s0"), *common]) == 0
    return root, data, store, common


def test_teacher_and_student_are_published_with_their_parents(trained):
    _, _, store, _ = trained
    teacher = store.resolve("lightcap-teacher@latest")
    student = store.resolve("lightcap@production")
    assert teacher.manifest["extra"]["seed"] == 1 and teacher.manifest["extra"]["role"] == "teacher"
    parents = {(p["name"], p["version"]) for p in student.manifest["parents"]}
    assert ("concepts", 1) in parents and ("lightcap-teacher", teacher.version) in parents
    assert [t["version"] for t in student.manifest["extra"]["teachers"]] == [teacher.version]
    seq = student.manifest["extra"]["sequence_kd"]
    assert seq["teacher_captions"] == 6  # one per training image per teacher
    history = student.manifest["extra"]["history"]
    assert len(history) == 1 and history[0]["loss"] > 0
    metrics = student.manifest["metrics"]
    assert {"test_BLEU-4", "test_CIDEr-D", "val_ROUGE-L", "parameters"} <= set(metrics)
    assert {"captioner.safetensors", "model.json", "tokenizer.json", "loss_curve.png"} <= set(student.files)
    assert student.manifest["config"]["kd"]["hidden"] is True
    # the student took the teacher's tokenizer (token KD compares the same vocabulary)
    assert teacher.file("tokenizer.json").read_text() == student.file("tokenizer.json").read_text()


def test_runtime_loader_captions_images(trained):
    _, _, store, _ = trained
    captioner = load_model(store, "lightcap")
    assert captioner.name == "lightcap" and captioner.version == 1
    images = torch.stack([captioner.preprocess(Image.new("RGB", (90, 70), c)) for c in COLOURS.values()])
    outs = captioner.caption(images, captioner.decode_options(beam_size=2, max_length=6))
    assert len(outs) == 3 and all(isinstance(o, CaptionOut) for o in outs)
    assert all(len(o.tokens) <= 6 and o.text == " ".join(o.tokens) for o in outs)
    greedy = captioner.caption(images[:1], captioner.decode_options(beam_size=1))
    assert greedy[0].score <= 0.0
    # a whole DecodeOptions replaces the model's decoding (what `eval lightcap` times with)
    whole = captioner.decode_options(beam_size=1, max_length=2, min_length=2)
    outs = captioner.caption(images, whole)
    assert all(len(o.tokens) == 2 for o in outs)


def test_eval_cli_prints_metrics_params_and_latency(trained, capsys):
    _, data, store, common = trained
    capsys.readouterr()
    assert main(["eval", "lightcap", "--data", str(data), "--split", "test", "--store", str(store.root),
                 "--features-cache", str(trained[0] / "features"), "--latency-images", "1", "--no-meteor",
                 "--cache-speedup", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "lightcap@1" and result["images"] == 3
    for key in ("BLEU-4", "ROUGE-L", "CIDEr-D"):
        assert 0.0 <= result[key] <= 10.0
    assert result["parameters"] > 0 and result["latency"]["mean_ms"] > 0 and result["latency"]["batch_size"] == 1
    assert result["kv_cache"]["same_tokens"] == "2/2" and result["kv_cache"]["cached_ms"] > 0


def test_eval_cli_decoding_flags_override_the_model_s(trained, capsys):
    _, data, store, _ = trained
    base = ["eval", "lightcap", "--data", str(data), "--split", "test", "--store", str(store.root),
            "--features-cache", str(trained[0] / "features"), "--latency-images", "0", "--no-meteor", "--json"]
    capsys.readouterr()
    assert main([*base, "--length-penalty", "1.5", "--no-repeat-ngram-size", "2", "--beam-size", "2"]) == 0
    decoding = json.loads(capsys.readouterr().out)["decoding"]
    assert (decoding["length_penalty"], decoding["no_repeat_ngram_size"], decoding["beam_size"]) == (1.5, 2, 2)
    assert main(base) == 0
    own = store.load("lightcap@1").manifest["config"]["decoding"]["length_penalty"]
    assert own != 1.5 and json.loads(capsys.readouterr().out)["decoding"]["length_penalty"] == own


def test_resume_gives_the_same_weights(trained, monkeypatch):
    from safetensors.torch import load_file

    from training.runner import TrainRun

    root, _, _, common = trained
    two = [*common, "--set", "train.epochs=2", "--no-publish"]
    straight_dir, resumed_dir = root / "runs" / "straight", root / "runs" / "resumed"
    assert main(["train", "lightcap-teacher", "--seed", "1", "--run-dir", str(straight_dir), *two]) == 0
    # the same run, interrupted after its first epoch (checkpoint written), then resumed
    end_epoch = TrainRun.end_epoch

    def interrupt_after_first(self, *a, **kw):
        record = end_epoch(self, *a, **kw)
        if self.epoch == 1:
            raise KeyboardInterrupt
        return record

    monkeypatch.setattr(TrainRun, "end_epoch", interrupt_after_first)
    assert main(["train", "lightcap-teacher", "--seed", "1", "--run-dir", str(resumed_dir), *two]) == 130
    monkeypatch.setattr(TrainRun, "end_epoch", end_epoch)
    assert not (resumed_dir / "export").exists()
    assert main(["train", "lightcap-teacher", "--seed", "1", "--run-dir", str(resumed_dir), *two, "--resume"]) == 0
    straight = load_file(str(straight_dir / "export" / "captioner.safetensors"))
    resumed = load_file(str(resumed_dir / "export" / "captioner.safetensors"))
    assert straight.keys() == resumed.keys()
    for k in straight:
        torch.testing.assert_close(straight[k], resumed[k], rtol=0, atol=0)


def test_student_without_teachers_names_the_stage_to_run(trained, tmp_path):
    _, data, _, common = trained
    empty = ModelStore(tmp_path / "empty")
    publish_random_concepts(empty, tmp_path)
    args = ["--data", str(data), "--store", str(empty.root), "--run-dir", str(tmp_path / "run"),
            "--features-cache", str(tmp_path / "features"), *SMALL]
    import argparse

    from training.lightcap import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(PrerequisiteError, match="captioner train lightcap-teacher --profile tiny --seed 1"):
        run(parser.parse_args(args))


def test_ablation_experiment_makes_one_table_and_reuses_its_models(trained, capsys):
    root, data, store, _ = trained
    work = root / "ablation"
    sets = [x for x in SMALL if x != "--set"]
    argv = ["experiment", "lightcap-ablation", "--data", str(data), "--store", str(store.root), "--work", str(work),
            "--features-cache", str(root / "features"), "--latency-images", "1", "--no-meteor",
            "--json"]
    for item in sets:
        argv += ["--set", item]
    only = ["--only", "teacher-1,student-nokd,student-allkd,noconcepts-nokd"]
    capsys.readouterr()
    assert main([*argv, *only]) == 0
    table = json.loads(capsys.readouterr().out)
    assert [r["key"] for r in table["rows"]] == ["teacher-1", "student-nokd", "student-allkd", "noconcepts-nokd"]
    assert all(r["result"]["split"] == "test" and r["result"]["latency"]["mean_ms"] > 0 for r in table["rows"])
    claims = {c["claim"]: c for c in table["claims"]}
    assert "concepts help (student without KD)" in claims and "all KD helps" in claims
    assert all(isinstance(c["holds"], bool) for c in table["claims"])
    md = (work / "table.md").read_text()
    assert "| student, all KD |" in md and "CIDEr-D" in md
    # the repository's store is untouched; the work store holds a copy of the extractor and the new models
    assert "lightcap-teacher" not in store.models() or store.versions("lightcap-teacher") == [1]
    work_store = ModelStore(work / "store")
    assert work_store.versions("concepts") == store.versions("concepts")
    n_versions = len(work_store.versions("lightcap"))
    allkd = work_store.resolve("lightcap@student-allkd")
    assert [t["name"] for t in allkd.manifest["extra"]["teachers"]] == ["lightcap-teacher"]
    # a second run trains nothing
    assert main([*argv, *only]) == 0
    assert len(work_store.versions("lightcap")) == n_versions
    assert main([*argv, "--only", "student-nokd,nonsense"]) == 2
