"""Typed configs (captioning/config_schema.py via captioning.config.load_config): every shipped profile loads
as it is written, a misspelt key or a wrong type in a YAML file is a ConfigError naming the file and the
dotted key, overrides are checked the same way and named, and every manifest of the embedded model store
validates against its family's schema."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from captioning.config import (
    CONFIG_DIR,
    apply_overrides,
    config_path,
    load_config,
    read_yaml,
    validate_manifest_config,
)
from captioning.config_schema import FAMILIES, TASK_FAMILY, LightCapConfig, UCMConfig
from captioning.decoding import DecodeOptions
from captioning.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PROFILES = sorted((p.parent.name, p.stem) for p in CONFIG_DIR.glob("*/*.yaml"))
MANIFESTS = sorted((ROOT / "model_store").glob("*/*/manifest.json"))


def _copy_with(tmp_path: Path, family: str, old: str, new: str, name: str = "tiny.yaml") -> Path:
    text = config_path(family, "tiny").read_text()
    assert text.count(old) == 1, f"{old!r} is not once in the {family} tiny profile"
    path = tmp_path / name
    path.write_text(text.replace(old, new))
    return path


# ---------------------------------------------------------------------------------------------- shipped files
def test_every_family_has_both_profiles():
    assert {f for f, _ in PROFILES} == set(FAMILIES)
    assert all((f, p) in PROFILES for f in FAMILIES for p in ("paper", "tiny"))


@pytest.mark.parametrize(("family", "profile"), PROFILES)
def test_every_shipped_profile_loads_as_written(family, profile):
    config = load_config(family, profile)
    assert isinstance(config, FAMILIES[family])
    assert (config.family, config.profile) == (family, profile)
    written = read_yaml(config_path(family, profile))
    # the manifest dict is the file as written (nothing added but profile and family), values unchanged
    assert config.to_dict() == {**written, "profile": profile, "family": family}


def test_values_are_typed_no_casts_needed():
    config = load_config("lightcap", "tiny")
    assert isinstance(config, LightCapConfig)
    assert type(config.train.batch_size) is int and type(config.train.lr) is float
    assert config.kd.teacher_seeds == [1, 2, 3] and all(type(s) is int for s in config.kd.teacher_seeds)
    assert config.model.fusion.hidden == 128 and config.model.visual_grid is None
    ucm = load_config("ucm", "paper")
    assert isinstance(ucm, UCMConfig) and ucm.image.layers == [3, 4, 6, 3] and ucm.captioner.report_meteor is True
    # a key the file leaves out reads the default the code always used, and is not added to the manifest dict
    assert ucm.image.pretrained is None and load_config("lightcap", "tiny").tokenizer.path is None
    assert "path" not in config.to_dict()["tokenizer"]


# ---------------------------------------------------------------------------------------------- YAML errors
def test_a_misspelt_yaml_key_fails_with_its_name_and_the_file(tmp_path):
    bad = _copy_with(tmp_path, "ucm", "  hidden_dim: 256", "  hiden_dim: 256")
    with pytest.raises(ConfigError) as info:
        load_config("ucm", "tiny", path=bad)
    first = str(info.value).splitlines()[0]
    assert first.startswith(f"{bad}: text.hiden_dim: unknown key (did you mean hidden_dim? known: embed_dim, hidden_dim")


@pytest.mark.parametrize(
    ("family", "old", "new", "key"),
    [
        ("lightcap", "    attention: sdpa      # sdpa", "    atention: sdpa      # sdpa", "model.fusion.atention"),
        ("lightcap", "decoding:", "decodng:", "decodng"),
        ("concepts", "    close_mosaic: 3", "    close_mosiac: 3", "detector.train.close_mosiac"),
        ("clip", "    width: 16", "    widht: 16", "model.vision_cfg.widht"),
    ],
)
def test_misspelt_keys_at_every_level_are_refused(tmp_path, family, old, new, key):
    bad = _copy_with(tmp_path, family, old, new)
    with pytest.raises(ConfigError, match=f"tiny.yaml: {key}: unknown key"):
        load_config(family, "tiny", path=bad)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("  batch_size: 64\n", '  batch_size: "64"\n', r"text_ae\.batch_size: Input should be a valid integer \(got '64'\)"),
        ("  epochs: 12\n", "  epochs: 12.5\n", r"text_ae\.epochs: Input should be a valid integer"),
        ("  loss: mse\n", "  loss: l1\n", r"distill\.loss: Input should be 'mse' or 'cosine' \(got 'l1'\)"),
        ("  augment: true ", "  augment: 1 ", r"image\.augment: Input should be a valid boolean \(got 1\)"),
        ("  layers: [1, 1, 1, 1]", "  layers: [1, 1, 1]", r"image\.layers: List should have at least 4 items"),
        ("weights_dtype: float16", "weights_dtype: int8", r"weights_dtype: Input should be 'float16', 'bfloat16' or"),
        ("  max_length: 22\n", "  max_length: 2\n", r"decoding: min_length must be in \[0, max_length=2\], got 3"),
    ],
)
def test_a_wrong_type_in_a_yaml_file_names_the_file_and_key(tmp_path, old, new, message):
    bad = _copy_with(tmp_path, "ucm", old, new)
    with pytest.raises(ConfigError, match=rf"tiny\.yaml: {message}"):
        load_config("ucm", "tiny", path=bad)


def test_a_missing_required_key_is_named(tmp_path):
    bad = _copy_with(tmp_path, "lightcap", "  samples_per_image: 2 ", "  # samples_per_image: 2 ")
    with pytest.raises(ConfigError, match=r"tiny\.yaml: train\.samples_per_image: missing key"):
        load_config("lightcap", "tiny", path=bad)


def test_the_cli_reports_a_misspelt_key_without_a_traceback(tmp_path):
    bad = _copy_with(tmp_path, "ucm", "  report_meteor: true", "  report_meteo: true")
    proc = subprocess.run(
        [sys.executable, "-m", "captioning.cli", "train", "ucm-text-ae", "--data", str(tmp_path), "--config", str(bad)],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert proc.returncode == 2
    assert f"{bad}: captioner.report_meteo: unknown key (did you mean report_meteor?" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------- overrides
def test_overrides_are_typed_and_reach_the_manifest_dict():
    config = load_config("ucm", "tiny", overrides=["text_ae.epochs=3", "image.pretrained=/weights/r50.pth"])
    assert config.text_ae.epochs == 3 and config.image.pretrained == "/weights/r50.pth"
    assert config.to_dict()["text_ae"]["epochs"] == 3
    # a key with a default that the file leaves out can be set, and then it is in the manifest dict
    config = load_config("lightcap", "tiny", overrides=["tokenizer.path=/bert"])
    assert config.tokenizer.path == "/bert" and config.to_dict()["tokenizer"]["path"] == "/bert"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["text_ae.epocs=3"], r"override 'text_ae\.epocs=3': text_ae\.epocs: unknown key \(did you mean epochs\?"),
        (["txt.hidden_dim=3"], r"override 'txt\.hidden_dim=3': txt: unknown key \(did you mean text\?"),
        (["text_ae.epochs=ten"], r"override 'text_ae\.epochs=ten': text_ae\.epochs: Input should be a valid integer"),
        (["text_ae.epochs.x=1"], r"override 'text_ae\.epochs\.x=1': text_ae\.epochs is not a section"),
        (
            ["text_ae.epochs=3", "decoding.max_length=2"],
            r"^override 'decoding\.max_length=2': decoding: min_length must be in \[0, max_length=2\], got 3$",
        ),
    ],
)
def test_bad_overrides_name_the_override(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("ucm", "tiny", overrides=overrides)


def test_an_override_creating_a_section_is_named_for_what_it_left_out():
    with pytest.raises(ConfigError, match=r"^override 'model\.vision_cfg\.width=8': model\.vision_cfg\.layers: missing"):
        load_config("clip", "paper", overrides=["model.vision_cfg.width=8"])


def test_apply_overrides_with_a_schema_checks_its_fields():
    data = {"profile": "tiny", "family": "ucm"}
    assert apply_overrides(data, ["decoding.beam_size=5"], UCMConfig)["decoding"] == {"beam_size": 5}
    with pytest.raises(ConfigError, match="unknown key"):
        apply_overrides(data, ["decoding.beams=5"], UCMConfig)


# ---------------------------------------------------------------------------------------------- manifests
def test_the_model_store_has_manifests_to_check():
    assert len(MANIFESTS) >= 9
    assert {json.loads(m.read_text())["task"] for m in MANIFESTS} <= set(TASK_FAMILY)


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: f"{p.parent.parent.name}@{p.parent.name}")
def test_every_embedded_manifest_config_validates_against_its_family(manifest):
    record = json.loads(manifest.read_text())
    config = validate_manifest_config(record["config"], task=record["task"], where=str(manifest))
    assert isinstance(config, FAMILIES[TASK_FAMILY[record["task"]]])
    assert config.family == record["config"]["family"] == TASK_FAMILY[record["task"]]
    assert config.to_dict() == record["config"]  # read back exactly as stored


def test_an_older_manifest_without_newer_keys_reads_the_code_defaults():
    # concepts-detector@1 predates align.context / align.input_norm: the aligner code's defaults apply
    record = json.loads((ROOT / "model_store" / "concepts-detector" / "1" / "manifest.json").read_text())
    assert "context" not in record["config"]["align"]
    config = validate_manifest_config(record["config"], task="concepts-detector")
    assert config.align.context is False and config.align.input_norm is False


def test_a_manifest_config_with_an_unknown_key_is_refused():
    record = json.loads((ROOT / "model_store" / "ucm-captioner" / "1" / "manifest.json").read_text())
    bad = {**record["config"], "captioner": {**record["config"]["captioner"], "epoch": 3}}
    with pytest.raises(ConfigError, match=r"^ucm-captioner@1: captioner\.epoch: unknown key"):
        validate_manifest_config(bad, task="ucm-captioner", where="ucm-captioner@1")
    with pytest.raises(ConfigError, match="no config family for task 'toy'"):
        validate_manifest_config(record["config"], task="toy")


# ---------------------------------------------------------------------------------------------- typed constructors
def _constructors():
    """Every model constructor / builder that takes a config section, called with the plain dict of that
    section (what they took before the configs were typed)."""
    from captioning.models.lightcap.captioner import build_arch
    from captioning.models.lightcap.clip_encoder import (
        ClipTokenizer,
        GridEncoder,
        build_clip,
        clip_model_config,
    )
    from captioning.models.lightcap.concepts import RegionAligner, concept_words
    from captioning.models.lightcap.detector import ProposalDetector
    from captioning.models.lightcap.fusion import PrefixLMFusion, bert_config
    from captioning.models.lightcap.pipeline import build_captioner, make_tokenizer
    from captioning.models.ucm.model import (
        Captioner,
        DistillPair,
        ImageEncoder,
        MultiLabelClassifier,
        TextAutoencoder,
    )

    ucm, lightcap = load_config("ucm", "tiny"), load_config("lightcap", "tiny")
    clip, concepts = load_config("clip", "tiny"), load_config("concepts", "tiny")
    text, image = ucm.text.to_dict(), ucm.image.to_dict()
    return {
        "TextAutoencoder(text)": lambda: TextAutoencoder(10, text),
        "DistillPair(text)": lambda: DistillPair(10, text, ucm.image),
        "DistillPair(image)": lambda: DistillPair(10, ucm.text, image),
        "Captioner(text)": lambda: Captioner(10, text, ucm.image),
        "Captioner(image)": lambda: Captioner(10, ucm.text, image),
        "ImageEncoder(image)": lambda: ImageEncoder(image, 8),
        "MultiLabelClassifier(image)": lambda: MultiLabelClassifier(image, 17),
        "bert_config(fusion)": lambda: bert_config(lightcap.model.fusion.to_dict(), 10),
        "PrefixLMFusion(fusion)": lambda: PrefixLMFusion(lightcap.model.fusion.to_dict(), 10),
        "build_arch(model)": lambda: build_arch(lightcap.model.to_dict(), grid_channels=8, concept_dim=8, vocab_size=10),
        "build_captioner(model)": lambda: build_captioner(
            lightcap.model.to_dict(), grid_channels=8, concept_dim=8, tokenizer=None
        ),
        "make_tokenizer(tokenizer)": lambda: make_tokenizer(lightcap.tokenizer.to_dict(), lightcap.model, ["a b"]),
        "clip_model_config(model)": lambda: clip_model_config(clip.model.to_dict()),
        "build_clip(config)": lambda: build_clip(clip.to_dict()),
        "ClipTokenizer.from_config(config)": lambda: ClipTokenizer.from_config(clip.to_dict()),
        "GridEncoder.from_config(config)": lambda: GridEncoder.from_config(clip.to_dict()),
        "GridEncoder(vision)": lambda: GridEncoder(clip.model.vision_cfg.to_dict()),
        "ProposalDetector(detector)": lambda: ProposalDetector(concepts.detector.to_dict()),
        "RegionAligner.from_config(align)": lambda: RegionAligner.from_config(8, concepts.align.to_dict(), 4),
        "concept_words(vocabulary)": lambda: concept_words(concepts.vocabulary.to_dict()),
    }


@pytest.mark.parametrize("name", sorted(_constructors()))
def test_model_constructors_refuse_a_plain_dict_section_naming_themselves(name):
    with pytest.raises(TypeError) as info:
        _constructors()[name]()
    message = str(info.value)
    assert message.startswith(f"{name} takes a ") and "config section (captioning.config_schema), got dict" in message


def test_save_captioner_and_the_pipeline_take_typed_decoding(tmp_path):
    from captioning.models.lightcap.pipeline import LightCapPipeline, save_captioner

    with pytest.raises(TypeError, match=r"save_captioner\(decoding=...\) takes a DecodingConfig"):
        save_captioner(tmp_path, None, None, decoding={"beam_size": 3})
    with pytest.raises(TypeError, match=r"LightCapPipeline\(decoding=...\) takes a DecodeOptions, got dict"):
        LightCapPipeline(None, None, None, decoding={"beam_size": 3})
    config = load_config("lightcap", "tiny")
    assert config.decoding.options() == DecodeOptions.from_dict(config.decoding.to_dict())
    assert config.decoding.options(beam_size=1, max_length=None).beam_size == 1


def test_a_ucm_model_built_from_load_config_equals_one_rebuilt_from_its_published_manifest(tmp_path):
    """A model built from ``load_config`` sections (service.testing.publish_ucm, random weights) is published; the
    runtime's path (the manifest's config read back through the schema) builds the same network, and the
    published weights it loads are the ones built from ``load_config`` (fp16 in the tiny profile)."""
    import torch

    from captioning.config import manifest_config
    from captioning.models.ucm.model import Captioner, MultiLabelClassifier
    from captioning.models.ucm.runtime import load_captioner, load_classifier
    from captioning.store import ModelStore
    from service.testing import publish_ucm

    overrides = ["captioner.attention_dim=8"]
    config = load_config("ucm", "tiny", overrides=overrides)
    for name, loader in (("ucm-captioner", load_captioner), ("ucm-classifier", load_classifier)):
        store = ModelStore(tmp_path / name / "store")
        publish_ucm(store, tmp_path / name / "work", seed=3, overrides=overrides,
                    captioner=name == "ucm-captioner", classifier=name == "ucm-classifier")
        version = store.load(f"{name}@1")
        published = manifest_config(version, UCMConfig)
        assert published == config and published.to_dict() == config.to_dict()
        runtime = loader(version, store, fast=False)  # the network as trained, fp32
        vocab_size = len(runtime.vocab) if name == "ucm-captioner" else 0

        def build(c, name=name, vocab_size=vocab_size):
            if name == "ucm-captioner":
                return Captioner(vocab_size, c.text, c.image, attention_dim=c.captioner.attention_dim)
            return MultiLabelClassifier(c.image, 17)
        torch.manual_seed(3)  # publish_ucm's seed: its model is the first thing built
        ours = build(config).state_dict()
        torch.manual_seed(3)
        theirs = build(published).state_dict()
        stored = runtime.model.state_dict()
        assert ours.keys() == theirs.keys() == stored.keys()
        for key, value in ours.items():
            assert torch.equal(value, theirs[key]), key
            expected = value.half().float() if value.is_floating_point() else value
            assert torch.equal(stored[key], expected), key


@pytest.mark.parametrize("spec", ["lightcap/2", "lightcap/3"])
def test_build_arch_of_a_published_lightcap_config_is_its_stored_architecture(spec):
    """The typed ``model`` section of an embedded LightCap manifest rebuilds exactly the ``arch`` stored in
    its ``model.json`` (what the runtime builds the network from)."""
    from captioning.models.lightcap.captioner import build_arch

    folder = ROOT / "model_store" / spec
    record = json.loads((folder / "manifest.json").read_text())
    stored = json.loads((folder / "model.json").read_text())["arch"]
    config = validate_manifest_config(record["config"], task=record["task"])
    assert isinstance(config, LightCapConfig)
    sized = config.model.model_copy(
        update={"fusion": config.model.fusion.model_validate({**config.model.fusion.to_dict(),
                                                              "vocab_size": stored["vocab_size"]})}
    )
    arch = build_arch(
        sized, grid_channels=stored["grid_channels"], concept_dim=stored["concept_dim"], vocab_size=stored["vocab_size"]
    )
    assert arch == stored and list(arch["fusion"]) == list(stored["fusion"])


def test_a_prerequisite_built_with_other_sizes_is_named_from_its_typed_manifest_config(tmp_path):
    """store_io.check_architecture reads the prerequisite's manifest through the schema (defaults for keys it
    lacks) and names every size that differs from this run's config."""
    from captioning.models.ucm.store_io import check_architecture
    from captioning.store import ModelStore
    from service.testing import publish_ucm

    store = ModelStore(tmp_path / "store")
    publish_ucm(store, tmp_path / "work", classifier=False)
    version = store.load("ucm-captioner@1")
    check_architecture(version, load_config("ucm", "tiny"), "text")
    check_architecture(version, load_config("ucm", "tiny"), "image")
    other = load_config("ucm", "tiny", overrides=["text.hidden_dim=64", "image.input_size=96"])
    with pytest.raises(ConfigError, match=r"ucm-captioner@1 was built with other sizes .*text\.hidden_dim: 256 there, 64"):
        check_architecture(version, other, "text")
    with pytest.raises(ConfigError, match=r"image\.input_size: 128 there, 96 here"):
        check_architecture(version, other, "image")


def test_the_decoding_section_is_decode_options_field_for_field():
    import dataclasses

    from captioning.config_schema import DecodingConfig
    from captioning.decode_options import DecodeOptions

    fields = {f.name: f.default for f in dataclasses.fields(DecodeOptions)}
    assert {name: info.default for name, info in DecodingConfig.model_fields.items()} == fields
    section = DecodingConfig.model_validate({"beam_size": 3, "min_length": 3})
    assert section.options(max_length=9) == DecodeOptions(beam_size=3, min_length=3, max_length=9)
    with pytest.raises(ValidationError, match="min_length must be in"):
        DecodingConfig.model_validate({"min_length": 30})  # DecodeOptions' own range checks
