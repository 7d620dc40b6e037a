"""OpenVINO for the fast path's convolutional networks (captioning/ov_runtime.py): choosing the runtime, and
converted networks that compute what the torch modules compute."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from captioning.ov_runtime import OpenVinoNet, openvino_available, resolve_vision_runtime

needs_openvino = pytest.mark.skipif(not openvino_available(), reason="openvino is not installed")


def test_the_vision_runtime_is_resolved_and_a_bad_value_is_named(monkeypatch):
    monkeypatch.delenv("CAPTIONER_VISION_RUNTIME", raising=False)
    assert resolve_vision_runtime("torch") == "torch"
    assert resolve_vision_runtime(" AUTO ", "cpu") == ("openvino" if openvino_available() else "torch")
    assert resolve_vision_runtime(None) == resolve_vision_runtime("auto")
    monkeypatch.setenv("CAPTIONER_VISION_RUNTIME", "torch")
    assert resolve_vision_runtime(None) == "torch"
    with pytest.raises(ValueError, match="'onnx' is not one of auto, torch, openvino"):
        resolve_vision_runtime("onnx")
    with pytest.raises(ValueError, match="runs the networks on the CPU"):
        resolve_vision_runtime("openvino", "meta")


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2))

    def forward(self, x):
        return self.body(x)


@needs_openvino
def test_a_converted_network_computes_what_the_module_computes_at_any_batch_size():
    torch.manual_seed(0)
    net = SmallNet().eval()
    ov_net = OpenVinoNet(net, torch.rand(1, 3, 16, 16), precision="fp32", name="small")
    for batch in (1, 3, 8):
        x = torch.rand(batch, 3, 16, 16)
        with torch.no_grad():
            expected = net(x)
        got = ov_net(x)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert ov_net.accepts(torch.rand(2, 3, 16, 16))
    assert not ov_net.accepts(torch.rand(2, 3, 32, 32))  # another size runs on torch, not here
    # the module keeps its own dtype and layout: conversion works on a copy
    assert next(net.parameters()).dtype == torch.float32
    # one infer request per thread: concurrent callers get their own results
    before = torch.get_num_threads()
    inputs = [torch.rand(2, 3, 16, 16) for _ in range(4)]
    outputs: dict[int, torch.Tensor] = {}

    def call(i):
        torch.set_num_threads(1 + i % 2)  # each thread its own count: compiled once per count
        for _ in range(5):
            outputs[i] = ov_net(inputs[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.set_num_threads(before)
    assert set(ov_net._compiled) >= {1, 2}
    for i, x in enumerate(inputs):
        with torch.no_grad():
            torch.testing.assert_close(outputs[i], net(x), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="precision 'fp16'"):
        OpenVinoNet(net, torch.rand(1, 3, 16, 16), precision="fp16")


@needs_openvino
def test_a_converted_network_is_cached_by_what_it_converts_and_read_back(tmp_path, monkeypatch, caplog):
    import openvino as ov

    monkeypatch.setenv("CAPTIONER_OV_CACHE_DIR", str(tmp_path / "ov"))
    torch.manual_seed(0)
    net, example, x = SmallNet().eval(), torch.rand(1, 3, 16, 16), torch.rand(3, 3, 16, 16)
    first = OpenVinoNet(net, example, name="small")
    assert first.cached is not None and first.cached.is_file() and first.cached.with_suffix(".bin").is_file()
    assert first.cached.parent.parent == tmp_path / "ov" and [p.name for p in (tmp_path / "ov").iterdir()] == [
        first.cached.parent.name]  # one entry, no staging folder left

    converted = []
    real_convert = ov.convert_model

    def counting_convert(*args, **kwargs):
        converted.append(1)
        return real_convert(*args, **kwargs)

    monkeypatch.setattr(ov, "convert_model", counting_convert)
    again = OpenVinoNet(net, example, name="small")  # read back: no conversion, the same results
    assert converted == [] and again.cached == first.cached
    with torch.no_grad():
        torch.testing.assert_close(again(x), net(x), atol=1e-5, rtol=1e-4)

    # anything the conversion reads changes the name: a weight, a plain attribute, the input size
    changed = SmallNet().eval()
    changed.load_state_dict(net.state_dict())
    with torch.no_grad():
        changed.body[0].weight[0, 0, 0, 0] += 1e-3
    assert OpenVinoNet(changed, example).cached != first.cached and len(converted) == 1
    flagged = SmallNet().eval()
    flagged.load_state_dict(net.state_dict())
    flagged.body[0].export_mode = True
    assert OpenVinoNet(flagged, example).cached != first.cached and len(converted) == 2
    assert OpenVinoNet(net, torch.rand(1, 3, 24, 24)).cached != first.cached and len(converted) == 3

    # a damaged entry is converted and written again, with a warning
    first.cached.with_suffix(".bin").write_bytes(b"not weights")
    with caplog.at_level("WARNING", logger="captioning.ov_runtime"):
        repaired = OpenVinoNet(net, example, name="small")
    assert len(converted) == 4 and "unreadable" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(repaired(x), net(x), atol=1e-5, rtol=1e-4)
    assert OpenVinoNet(net, example).model is not None and len(converted) == 4  # repaired on disk too
    assert not [p for p in (tmp_path / "ov").iterdir() if p.name.startswith(".")]  # nothing damaged or staged left

    # off: converted every time, nothing written; an unusable folder: converted, a warning, no error
    monkeypatch.setenv("CAPTIONER_OV_CACHE_DIR", "off")
    assert OpenVinoNet(net, example).cached is None and len(converted) == 5
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("CAPTIONER_OV_CACHE_DIR", str(blocker / "ov"))
    caplog.clear()
    with caplog.at_level("WARNING", logger="captioning.ov_runtime"):
        unusable = OpenVinoNet(net, example, name="small")
    assert len(converted) == 6 and "cannot cache" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(unusable(x), net(x), atol=1e-5, rtol=1e-4)

    # two processes converting at once (uvicorn workers loading): the second to publish finds the entry there and
    # leaves it, quietly, with nothing half-written
    monkeypatch.setenv("CAPTIONER_OV_CACHE_DIR", str(tmp_path / "shared"))
    winner = OpenVinoNet(net, example)
    loser = OpenVinoNet(net, example)  # read back; now publish its own conversion as if it had converted too
    published = winner.cached.with_suffix(".bin").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level("WARNING", logger="captioning.ov_runtime"):
        loser._write_cached()
    assert caplog.text == "" and winner.cached.with_suffix(".bin").stat().st_mtime_ns == published
    assert [p.name for p in (tmp_path / "shared").iterdir()] == [winner.cached.parent.name]


@needs_openvino
def test_a_network_converted_into_the_cache_holds_no_second_copy_of_the_weights(tmp_path, monkeypatch):
    """The converted graph shares the tensors of the float32 copy it was converted from; once written to the cache
    the network holds what it wrote (as a later start does), so only the module's own weights stay alive. Without
    a cache the converted graph is kept, and with it the copy."""
    import gc

    def live_weight_tensors(shape: tuple[int, ...]) -> int:
        gc.collect()
        return sum(isinstance(o, torch.Tensor) and tuple(o.shape) == shape for o in gc.get_objects())

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 7, 5), nn.ReLU()).eval()  # a weight shape no other test keeps alive
    example, x = torch.rand(1, 3, 16, 16), torch.rand(2, 3, 16, 16)
    shape = tuple(net[0].weight.shape)
    own = live_weight_tensors(shape)  # the module's (and any other test left for the collector)
    monkeypatch.setenv("CAPTIONER_OV_CACHE_DIR", str(tmp_path / "ov"))
    cached = OpenVinoNet(net, example)
    assert live_weight_tensors(shape) == own
    with torch.no_grad():
        torch.testing.assert_close(cached(x), net(x), atol=1e-5, rtol=1e-4)
    monkeypatch.setenv("CAPTIONER_OV_CACHE_DIR", "off")
    uncached = OpenVinoNet(net, example)
    assert live_weight_tensors(shape) == own + 1
    del uncached
    assert live_weight_tensors(shape) == own


@needs_openvino
def test_lightcap_and_the_concepts_runtime_of_one_version_are_one_object_and_other_versions_share_networks():
    from pathlib import Path

    from captioning.inference import load_model
    from captioning.store import ModelStore

    store = ModelStore(Path(__file__).resolve().parents[1] / "model_store")
    lightcap = load_model(store, "lightcap@production", precision="fp32", vision_runtime="openvino")
    parent = next(p for p in lightcap.manifest["parents"] if p["name"] == "concepts")
    concepts = load_model(store, f"concepts@{parent['version']}", precision="fp32", vision_runtime="openvino")
    assert lightcap.extractor is concepts  # one version, device, precision: one runtime, held once
    newer = load_model(store, "concepts@production", precision="fp32", vision_runtime="openvino")
    assert newer.version != concepts.version  # the defaults serve a newer concepts model than LightCap's
    assert newer is not concepts and newer.encoder.accelerated is concepts.encoder.accelerated  # one CLIP network
    assert newer.detector.accelerated is not concepts.detector.accelerated  # its own detector version
    other = load_model(store, f"concepts@{parent['version']}", precision="bf16", vision_runtime="openvino")
    assert other is not concepts and other.encoder.accelerated is not concepts.encoder.accelerated
    reference = load_model(store, f"concepts@{parent['version']}", precision="fp32", vision_runtime="torch")
    assert reference is not concepts and reference.encoder.accelerated is None


def test_a_shared_object_lives_while_held_and_is_built_again_after():
    import gc

    from captioning.sharing import live_keys, shared

    class Loaded:  # any weak-referenceable object
        pass

    built = []

    def build():
        built.append(Loaded())
        return built[-1]

    key = ("test object", object())  # a key no other test holds
    first = shared(key, build)
    assert shared(key, build) is first and len(built) == 1  # held: the same object, built once
    assert key in live_keys()
    del first, built[:]
    gc.collect()
    assert key not in live_keys()  # freed with its last holder ...
    again = shared(key, build)
    assert len(built) == 1 and again is built[0]  # ... and the next call builds a new one


@needs_openvino
def test_the_converted_clip_network_normalises_its_input_as_the_torch_encoder_does():
    """The CLIP network takes images in [0, 1] and normalises them inside (no batch-sized temporaries on the
    way in); its grid matches the torch encoder's, which normalises first."""
    from pathlib import Path

    from captioning.inference import load_model
    from captioning.store import ModelStore

    store = ModelStore(Path(__file__).resolve().parents[1] / "model_store")
    lightcap = load_model(store, "lightcap@production", precision="fp32", vision_runtime="openvino")
    encoder, size = lightcap.extractor.encoder, lightcap.extractor.encoder_size
    images = torch.rand(3, 3, size, size)
    converted = encoder.accelerated
    assert converted is not None and converted.accepts(images)
    got = encoder(images)
    encoder.accelerated = None  # this encoder only: the converted network stays shared
    try:
        expected = encoder(images)
    finally:
        encoder.accelerated = converted
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
