"""UCM model pieces on random tensors: shapes, code sizes, decoder paths agreeing, both profiles."""

import pytest
import torch
import torchvision

from captioning.config import load_config
from captioning.config_schema import UCMText
from captioning.decoding import DecodeOptions, decode
from captioning.errors import ConfigError
from captioning.models.ucm.model import (
    BOS_ID,
    EOS_ID,
    Captioner,
    ImageEncoder,
    MultiLabelClassifier,
    TextAutoencoder,
    TextDecoder,
    caption_loss,
    code_dim,
    distill_loss,
)

V = 30


def _captions(batch=4, length=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    words = torch.randint(4, V, (batch, length), generator=gen)
    lengths = torch.randint(3, length + 1, (batch,), generator=gen)
    tokens = torch.zeros(batch, length + 1, dtype=torch.long)  # words + <eos>
    inputs = torch.zeros(batch, length + 1, dtype=torch.long)  # <bos> + words
    for i, n in enumerate(lengths.tolist()):
        tokens[i, :n] = words[i, :n]
        tokens[i, n] = EOS_ID
        inputs[i, 0] = BOS_ID
        inputs[i, 1 : n + 1] = words[i, :n]
    return tokens, lengths + 1, inputs


def test_configs_match_code_sizes():
    paper, tiny = load_config("ucm", "paper"), load_config("ucm", "tiny")
    assert code_dim(paper.text) == 2048 == ImageEncoder(paper.image, 2048).feature_dim
    assert paper.text.embed_dim == 300 and paper.text.num_layers == 2
    assert code_dim(tiny.text) < code_dim(paper.text)


def test_text_autoencoder_shapes_and_padding_invariance():
    text_cfg = UCMText(embed_dim=16, hidden_dim=24, num_layers=2, dropout=0.0, min_freq=1, max_words=20)
    torch.manual_seed(0)
    model = TextAutoencoder(V, text_cfg).eval()
    tokens, lengths, inputs = _captions()
    code = model.encoder(tokens, lengths)
    assert code.shape == (4, 48)
    padded = torch.cat([tokens, torch.zeros(4, 5, dtype=torch.long)], dim=1)
    assert torch.allclose(model.encoder(padded, lengths), code, atol=1e-6)  # pad never read
    logits = model(tokens, lengths, inputs)
    assert logits.shape == (4, inputs.shape[1], V)
    # the step-by-step path (used by decoding and scheduled teacher forcing) equals the packed one
    stepped = model.decoder(code, inputs, teacher_forcing=0.999999)
    torch.manual_seed(1)
    assert torch.allclose(model.decoder(code, inputs), logits, atol=1e-5)
    state = model.decoder.init_state(code)
    for t in range(inputs.shape[1]):
        step_logp, state = model.decoder.step(inputs[:, t], state)
        assert torch.allclose(step_logp, logits[:, t].log_softmax(-1), atol=1e-5)
    assert stepped.shape == logits.shape
    own = model.decoder(code, inputs, teacher_forcing=0.0)  # feeds its own predictions after step 0
    assert torch.allclose(own[:, 0], logits[:, 0], atol=1e-5) and not torch.allclose(own, logits, atol=1e-3)
    loss = caption_loss(logits, tokens)
    loss.backward()
    assert torch.isfinite(loss) and model.encoder.embed.weight.grad is not None


def test_attention_decoder_starts_as_the_plain_one():
    torch.manual_seed(0)
    plain = TextDecoder(V, 16, 24, 2)
    attn = TextDecoder(V, 16, 24, 2, attention_dim=12, feature_dim=20)
    missing, unexpected = attn.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("attention.", "context_proj.")) for k in missing)
    code = torch.randn(3, 48)
    grid = torch.randn(3, 9, 20)
    _, _, inputs = _captions(3)
    assert torch.allclose(attn(code, inputs, grid=grid), plain(code, inputs), atol=1e-5)
    # after a training step the context matters
    loss = attn(code, inputs, grid=grid).logsumexp(-1).mean()
    loss.backward()
    assert attn.context_proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        attn.context_proj.weight.normal_()
    assert not torch.allclose(attn(code, inputs, grid=grid), plain(code, inputs), atol=1e-3)


@pytest.mark.parametrize("attention_dim", [0, 16])
def test_tiny_captioner_decodes(attention_dim):
    cfg = load_config("ucm", "tiny")
    torch.manual_seed(0)
    model = Captioner(V, cfg.text, cfg.image, attention_dim=attention_dim).eval()
    images = torch.randn(2, 3, cfg.image.input_size, cfg.image.input_size)
    code, grid = model.encoder(images)
    assert code.shape == (2, code_dim(cfg.text))
    assert grid.shape == (2, (cfg.image.input_size // 16) ** 2, model.encoder.feature_dim)
    _, _, inputs = _captions(2)
    assert model(images, inputs).shape == (2, inputs.shape[1], V)
    greedy = decode(model, images, DecodeOptions(max_length=6), bos_id=BOS_ID, eos_id=EOS_ID)
    beam1 = decode(model, images, DecodeOptions(beam_size=1, max_length=6), bos_id=BOS_ID, eos_id=EOS_ID)
    beam = decode(model, images, DecodeOptions(beam_size=3, max_length=6), bos_id=BOS_ID, eos_id=EOS_ID)
    assert [h.tokens for h in greedy] == [h.tokens for h in beam1]
    assert all(len(h.tokens) <= 6 for h in beam) and all(b.score >= g.score - 1e-6 for b, g in zip(beam, greedy, strict=True))


def test_classifier_tiny_shapes():
    cfg = load_config("ucm", "tiny")
    model = MultiLabelClassifier(cfg.image, 17)
    logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 17)
    assert model.trunk.feature_dim == 256


def test_paper_profile_loads_resnet50_trains_and_runs(tmp_path):
    cfg = load_config("ucm", "paper")
    reference = torchvision.models.resnet50(weights=None)  # stands in for the ImageNet file
    path = tmp_path / "resnet50.pth"
    torch.save(reference.state_dict(), path)

    classifier = MultiLabelClassifier(cfg.image, 17)
    ignored = classifier.trunk.load_pretrained(path)
    assert ignored == ["fc.bias", "fc.weight"]
    assert torch.equal(classifier.trunk.layer4[2].conv3.weight, reference.layer4[2].conv3.weight)
    assert classifier.trunk.feature_dim == 2048

    # one training step at 224x224
    classifier.train()
    opt = torch.optim.Adam(classifier.parameters(), lr=cfg.classifier.fine_tune_lr)
    images = torch.randn(2, 3, 224, 224)
    targets = torch.randint(0, 2, (2, 17)).float()
    before = classifier.head.weight.detach().clone()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(classifier(images), targets)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, classifier.head.weight)

    # the paper captioner: 2048-d code from ResNet-50, 2 x 1024 LSTM, one forward + a short decode
    captioner = Captioner(V, cfg.text, cfg.image).eval()
    captioner.encoder.trunk.load_state_dict(classifier.trunk.state_dict())
    with torch.no_grad():
        code, grid = captioner.encoder(images)
        assert code.shape == (2, 2048) and grid.shape == (2, 49, 2048)
        out = decode(captioner, images, DecodeOptions(beam_size=2, max_length=3), bos_id=BOS_ID, eos_id=EOS_ID)
    assert len(out) == 2


def test_pretrained_file_errors_name_the_file(tmp_path):
    cfg = load_config("ucm", "paper")
    trunk = MultiLabelClassifier(cfg.image, 17).trunk
    wrong = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), wrong)
    with pytest.raises(ConfigError, match="resnet18.pth"):
        trunk.load_pretrained(wrong)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="junk.pth: not a readable"):
        trunk.load_pretrained(junk)
    with pytest.raises(ConfigError, match="not found"):
        trunk.load_pretrained(tmp_path / "missing.pth")


def test_distill_losses():
    image = torch.randn(3, 8)
    text = torch.randn(3, 5, 8)
    mask = torch.ones(3, 5)
    mask[0, 3:] = 0
    mse = distill_loss(image, text, mask, "mse")
    manual = torch.stack(
        [((text[b, s] - image[b]) ** 2).mean() for b in range(3) for s in range(5) if mask[b, s]]
    ).mean()
    assert mse == pytest.approx(float(manual), rel=1e-5)
    assert distill_loss(text[:, 0], text[:, :1], mask[:, :1], "cosine") == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ConfigError, match="distill.loss"):
        distill_loss(image, text, mask, "l1")
