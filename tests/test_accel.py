"""captioning.accel: device and precision settings, native-bf16 detection, batch-norm folding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from captioning import accel


# ---------------------------------------------------------------------------------------------- device
def test_resolve_device_cpu_and_auto_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert accel.resolve_device("cpu") == torch.device("cpu")
    assert accel.resolve_device(" CPU ") == torch.device("cpu")
    assert accel.resolve_device("auto") == torch.device("cpu")
    assert accel.resolve_device(None) == torch.device("cpu")


@pytest.mark.parametrize("value", ["cuda", "cuda:0", "CUDA:1"])
def test_cuda_without_a_gpu_is_an_error_naming_the_value(monkeypatch, value):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=repr(value).replace("'", ".")):
        accel.resolve_device(value)


@pytest.mark.parametrize("value", ["gpu", "cuda:x", "cuda:", "mps0", "", "tpu"])
def test_bad_device_values_name_the_value(monkeypatch, value):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    if value == "":  # empty means the default, auto
        assert accel.resolve_device(value) == torch.device("cuda")
        return
    with pytest.raises(ValueError) as info:
        accel.resolve_device(value)
    assert repr(value) in str(info.value)


def test_gpu_index_beyond_the_machine_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert accel.resolve_device("cuda:1") == torch.device("cuda:1")
    assert accel.resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ValueError, match="'cuda:2'.*2 GPU"):
        accel.resolve_device("cuda:2")


# ---------------------------------------------------------------------------------------------- precision
def test_resolve_precision_explicit_and_bad_values():
    assert accel.resolve_precision("fp32", "cpu") == "fp32"
    assert accel.resolve_precision("BF16", "cpu") == "bf16"
    for bad in ("fp16", "float32", "half", "bf-16"):
        with pytest.raises(ValueError) as info:
            accel.resolve_precision(bad, "cpu")
        assert repr(bad) in str(info.value)


def test_auto_precision_follows_the_hardware(monkeypatch):
    assert accel.resolve_precision("auto", torch.device("cuda")) == "bf16"
    monkeypatch.setattr(accel, "cpu_has_native_bf16", lambda: True)
    assert accel.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(accel, "cpu_has_native_bf16", lambda: False)
    assert accel.resolve_precision("auto", "cpu") == "fp32"
    assert accel.resolve_precision(None, "cpu") == "fp32"


def test_compute_dtype_needs_a_resolved_precision():
    assert accel.compute_dtype("fp32") is torch.float32
    assert accel.compute_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="'auto'"):
        accel.compute_dtype("auto")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("fpu sse avx2 avx512f avx512_bf16 avx512_vnni", True),
        ("fpu sse avx2 avx512f amx_bf16 amx_tile", True),
        ("fpu sse avx2 avx512f avx512_vnni", False),
        ("fpu sse avx2", False),
    ],
)
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, flags, expected):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: {flags}\n\n")
    assert accel.cpu_has_native_bf16(info) is expected


def test_native_bf16_without_cpuinfo_asks_torch(tmp_path, monkeypatch):
    monkeypatch.setattr(accel, "_torch_cpu_bf16", lambda: True)
    assert accel.cpu_has_native_bf16(tmp_path / "missing") is True
    monkeypatch.setattr(accel, "_torch_cpu_bf16", lambda: False)
    assert accel.cpu_has_native_bf16(tmp_path / "missing") is False


# ---------------------------------------------------------------------------------------------- BN folding
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.downsample = nn.Sequential(nn.AvgPool2d(1), nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8))

    def forward(self, x):
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + self.downsample(x)


def _random_stats(module):
    g = torch.Generator().manual_seed(3)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))


def test_fold_batch_norms_keeps_the_outputs():
    """Folded vs unfolded: equal to 1e-5 (relative to the output scale), every BN gone."""
    torch.manual_seed(0)
    block = Block()
    _random_stats(block)
    block.eval()
    x = torch.randn(2, 3, 9, 9)
    before = block(x)
    assert accel.fold_batch_norms(block) == 3
    assert accel.count_batch_norms(block) == 0
    after = block(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5 * before.abs().max().item())


def test_fold_batch_norms_refuses_training_mode():
    with pytest.raises(ValueError, match="eval mode"):
        accel.fold_batch_norms(Block().train())


def test_to_device_converts_floats_only():
    x = torch.arange(4)
    assert accel.to_device(x, torch.device("cpu"), torch.bfloat16).dtype == torch.long
    y = accel.to_device(torch.rand(2), torch.device("cpu"), torch.bfloat16)
    assert y.dtype == torch.bfloat16 and y.device.type == "cpu"


# ---------------------------------------------------------------------------------------------- eval CLIs
def test_eval_placement_names_the_flag_or_variable(monkeypatch):
    import argparse

    from captioning.errors import UsageError
    from training.eval_ucm import resolve_placement

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("CAPTIONER_DEVICE", raising=False)
    monkeypatch.delenv("CAPTIONER_PRECISION", raising=False)
    assert resolve_placement(argparse.Namespace(device=None, precision=None)) == ("cpu", "fp32")
    assert resolve_placement(argparse.Namespace(device="cpu", precision="bf16")) == ("cpu", "bf16")
    monkeypatch.setenv("CAPTIONER_PRECISION", "fp8")
    with pytest.raises(UsageError, match="CAPTIONER_PRECISION: precision 'fp8'"):
        resolve_placement(argparse.Namespace(device=None, precision=None))
    with pytest.raises(UsageError, match="--device: device 'cuda'"):
        resolve_placement(argparse.Namespace(device="cuda", precision="fp32"))
    monkeypatch.setenv("CAPTIONER_DEVICE", "gpu0")
    with pytest.raises(UsageError, match="CAPTIONER_DEVICE: device 'gpu0'"):
        resolve_placement(argparse.Namespace(device=None, precision="fp32"))


# --------------------------------------------------------------------------------------- OpenMP spin default
def _probe(code: str, **env: str) -> str:
    import os
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                         timeout=120, check=True)
    return out.stdout.strip().splitlines()[-1]


SPIN_PROBE = "import {module}; import torch; from captioning import accel; print(accel.openmp_spin())"


@pytest.mark.parametrize("module", ["captioning.cli", "service.app", "service.ray_engine", "training.cli"])
def test_every_entry_point_sets_the_openmp_spin_before_torch_loads(module):
    """The service, the CLIs and Ray's workers import ``captioning`` before torch, so libgomp reads the short spin
    (an entry point that loaded torch first would report libgomp's default here)."""
    import captioning

    assert _probe(SPIN_PROBE.format(module=module)) == f"GOMP_SPINCOUNT={captioning.OMP_SPIN_DEFAULT}"


def test_the_openmp_spin_keeps_what_the_environment_says_and_reports_a_late_setting():
    assert _probe(SPIN_PROBE.format(module="captioning"), GOMP_SPINCOUNT="7") == "GOMP_SPINCOUNT=7"
    assert _probe(SPIN_PROBE.format(module="captioning"), OMP_WAIT_POLICY="PASSIVE") == "OMP_WAIT_POLICY=PASSIVE"
    assert _probe("import os, captioning; print(os.environ.get('GOMP_SPINCOUNT'))", OMP_WAIT_POLICY="ACTIVE") == "None"
    late = _probe("import torch, captioning; from captioning import accel; print(accel.openmp_spin())")
    assert late.startswith("libgomp default (torch was loaded before"), late


# --------------------------------------------------------------------------------------- triton kept out on the CPU
TRITON_PROBE = """
import sys
{setup}
import torchvision.ops, torch._dynamo
from torch.utils._triton import has_triton_package
print(repr(sys.modules.get("triton", "absent")), has_triton_package())
"""


def test_a_cpu_server_and_engine_keep_triton_out_and_torchvision_still_works():
    """torchvision.ops imports torch._dynamo, which loads triton (80 MiB) whenever it is installed; the server and
    the offline engine (CLIs, Ray workers) on the CPU mark it absent first, and torch takes it as not installed."""
    app = ("from service.app import create_app; from service.settings import Settings; "
           "create_app(Settings(device='cpu', models='ucm-classifier'))")
    assert _probe(TRITON_PROBE.format(setup=app)) == "None False"
    engine = "from service.offline import Engine; Engine.from_store(tasks='labels', device='cpu')"
    assert _probe(TRITON_PROBE.format(setup=engine)) == "None False"


def test_keep_triton_out_leaves_a_gpu_process_and_an_imported_triton_alone():
    import sys

    from captioning.accel import keep_triton_out

    before = sys.modules.get("triton", "absent")
    assert keep_triton_out("cuda") is (before is None)  # no GPU needed: only the device type is read
    assert sys.modules.get("triton", "absent") is before
    loaded = _probe("import sys, triton\nfrom captioning.accel import keep_triton_out\n"
                    "print(keep_triton_out('cpu'), sys.modules['triton'] is not None)")
    assert loaded == "False True"
    twice = _probe("import sys\nfrom captioning.accel import keep_triton_out\n"
                   "print(keep_triton_out('cpu'), keep_triton_out('cpu'), sys.modules['triton'])")
    assert twice == "True True None"


TRIM_PROBE = """
import ctypes
from captioning.accel import trim_heap
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
def rss():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) // 1024
blocks = [libc.malloc(4096) for _ in range(40000)]  # 160 MiB in blocks below the mmap threshold: on the heap
for block in blocks:
    ctypes.memset(block, 1, 4096)
last = libc.malloc(4096)  # in use above them: free() alone cannot shrink the heap
for block in blocks:
    libc.free(block)
before = rss()
ran = trim_heap()
print(ran, before - rss() > 100)
"""


def test_trim_heap_hands_freed_heap_pages_back():
    """What a load freed stays resident in glibc's heap until trimmed (the server trims after each load)."""
    assert _probe(TRIM_PROBE) == "True True"


def test_the_server_and_the_engine_trim_the_heap_after_loading(monkeypatch):
    from captioning import accel
    from service.offline import Engine
    from service.registry import ModelRegistry
    from service.settings import Settings

    trims = []
    monkeypatch.setattr(accel, "trim_heap", lambda: trims.append(1) or True)
    registry = ModelRegistry(Settings(device="cpu"), store=None, metrics=None, loader=lambda *a, **k: "runtime")
    assert registry.load("any@production") == "runtime" and trims == [1]
    failing = ModelRegistry(Settings(device="cpu"), store=None, metrics=None,
                            loader=lambda *a, **k: (_ for _ in ()).throw(RuntimeError("broken")))
    with pytest.raises(RuntimeError):
        failing.load("any@production")  # what a failed load freed is handed back too
    assert trims == [1, 1]
    Engine.from_store(tasks="labels", device="cpu")
    assert trims == [1, 1, 1]
