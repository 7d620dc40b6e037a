"""CLIP grid encoder, checkpoints and tokenizers of LightCap (random weights; no training)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from captioning.config import load_config
from captioning.config_schema import ClipConfig
from captioning.errors import ConfigError
from captioning.models.lightcap.clip_encoder import (
    ClipTokenizer,
    GridEncoder,
    build_clip,
    clip_model_config,
    read_clip_state_dict,
)


def _tiny_clip(texts=("there are three red cars", "a photo of a tree")):
    cfg = load_config("clip", "tiny")
    tokenizer = ClipTokenizer.train_word_level(texts, cfg.tokenizer.context_length)
    model = cfg.model.to_dict()
    model["text_cfg"].update(tokenizer.text_cfg_overrides())
    cfg = ClipConfig.model_validate({**cfg.to_dict(), "model": model})
    return cfg, tokenizer, build_clip(cfg)


def test_tiny_grid_encoder_is_clip_trunk_without_pooler():
    torch.manual_seed(0)
    cfg, _, clip = _tiny_clip()
    encoder = GridEncoder.from_clip(clip, cfg).freeze()
    assert encoder.trunk.attnpool is None and encoder.channels == 512
    images = torch.rand(2, 3, 224, 224)
    grid = encoder(images)
    assert grid.shape == (2, 512, 7, 7)
    # the same numbers as CLIP's own visual tower up to (not including) its attention pooler
    clip.eval()
    normalised = (images - encoder.pixel_mean) / encoder.pixel_std
    expected = clip.visual.forward_intermediates(normalised, indices=1, intermediates_only=True)["image_intermediates"][-1]
    torch.testing.assert_close(grid, expected)
    # frozen: no gradients, BatchNorm stays in eval mode
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training and not encoder.trunk.bn1.training
    # fully convolutional: another input size gives another grid size
    assert encoder(torch.rand(1, 3, 256, 256)).shape == (1, 512, 8, 8)


def test_paper_grid_encoder_is_rn50_and_loads_a_checkpoint_file(tmp_path):
    from open_clip.modified_resnet import ModifiedResNet

    cfg = load_config("clip", "paper")
    assert clip_model_config(cfg.model)["vision_cfg"]["layers"] == [3, 4, 6, 3]
    # an OpenAI-style RN50 checkpoint: the visual tower with its attention pooler, metadata entries, fp16
    torch.manual_seed(1)
    source = ModifiedResNet(layers=[3, 4, 6, 3], output_dim=1024, heads=32, image_size=224, width=64)
    for module in source.modules():  # non-trivial BatchNorm statistics
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    state = {f"visual.{k}": v.half() if v.is_floating_point() else v for k, v in source.state_dict().items()}
    state.update(input_resolution=224, context_length=77, vocab_size=49408)
    path = tmp_path / "RN50.pt"
    torch.save(state, path)

    cfg.checkpoint = str(path)
    encoder = GridEncoder.from_config(cfg).freeze()
    loaded = encoder.trunk.state_dict()
    for key, value in source.state_dict().items():
        if not key.startswith("attnpool."):
            torch.testing.assert_close(loaded[key], value.half().float() if value.is_floating_point() else value)
    grid = encoder(torch.rand(1, 3, 224, 224))
    assert grid.shape == (1, 2048, 7, 7) and torch.isfinite(grid).all()


def test_checkpoint_that_does_not_fit_names_the_file(tmp_path):
    cfg, _, clip = _tiny_clip()
    path = tmp_path / "tiny.pt"
    torch.save(clip.state_dict(), path)
    paper = load_config("clip", "paper")
    paper.checkpoint = str(path)
    with pytest.raises(ConfigError, match=r"tiny\.pt.*(wrong shape|missing)"):
        GridEncoder.from_config(paper)
    with pytest.raises(ConfigError, match="not found"):
        read_clip_state_dict(tmp_path / "absent.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"junk\.pt: cannot read"):
        read_clip_state_dict(tmp_path / "junk.pt")


def test_full_clip_checkpoint_formats_roundtrip(tmp_path):
    torch.manual_seed(2)
    cfg, _, clip = _tiny_clip()
    # a DDP-prefixed state dict under "state_dict" (open_clip training checkpoints look like this)
    path = tmp_path / "epoch_3.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in clip.state_dict().items()}, "epoch": 3}, path)
    torch.manual_seed(3)
    other = build_clip(cfg.model_copy(update={"checkpoint": str(path)}))
    for key, value in clip.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], value)

    # a TorchScript archive (the format of OpenAI's own RN50.pt): traced module whose tensors are visual.*
    class Wrapper(nn.Module):
        def __init__(self, visual):
            super().__init__()
            self.visual = visual

        def forward(self, x):
            return self.visual.stem(x)

    traced = torch.jit.trace(Wrapper(clip.visual).eval(), torch.rand(1, 3, 64, 64))
    jit_path = tmp_path / "RN-tiny-jit.pt"
    traced.save(str(jit_path))
    state = read_clip_state_dict(jit_path)
    encoder = GridEncoder.from_config(cfg)
    encoder.load_clip_state_dict(state, source=str(jit_path))
    torch.testing.assert_close(encoder.trunk.conv1.weight, clip.visual.conv1.weight)


def test_word_level_tokenizer_roundtrip_and_eos_pooling(tmp_path):
    cfg, tokenizer, clip = _tiny_clip()
    ids = tokenizer(["there are three red cars", "a photo of a zebra"])
    assert ids.shape == (2, 32)
    eot = tokenizer.eot_id
    assert ids[0, 0] == tokenizer._tok.token_to_id("<sot>") and ids[0, 6] == eot and (ids[0, 7:] == 0).all()
    assert tokenizer.unknown_words("a photo of a zebra") == ["zebra"]
    tokenizer.save(tmp_path)
    again = ClipTokenizer.from_config(cfg, tmp_path)
    assert torch.equal(again(["there are three red cars"]), ids[:1])
    # the text tower pools at <eot>: what follows it (padding) does not change the embedding
    clip.eval()
    padded = ids[:1].clone()
    changed = padded.clone()
    changed[0, 8] = 5
    torch.testing.assert_close(clip.encode_text(padded), clip.encode_text(changed))
    with pytest.raises(ConfigError, match="tokenizer.json"):
        ClipTokenizer.from_config(cfg, tmp_path / "elsewhere")


def test_openai_bpe_tokenizer_puts_eot_last_for_argmax_pooling():
    tokenizer = ClipTokenizer.openai_bpe(77)
    ids = tokenizer(["a photo of a baseball diamond"])
    assert ids.shape == (1, 77)
    assert int(ids[0].argmax()) == int((ids[0] == tokenizer.eot_id).nonzero()[0])
    assert tokenizer.vocab_size == 49408 and tokenizer.unknown_words("anything at all") == []
