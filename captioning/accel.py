"""Where and in what precision the runtimes compute: device and precision resolution, BN folding, H2D copies.

* ``cpu_has_native_bf16()``: whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16), read from
  the kernel's CPU flags (``/proc/cpuinfo``), else from torch's own probe (``torch.backends.cpu``); never assumed.
* ``resolve_device("auto" | "cpu" | "cuda" | "cuda:N") -> torch.device``: ``auto`` is ``cuda`` when a GPU is
  usable, else ``cpu``; asking for ``cuda`` without one (or for an index that does not exist) is an error.
* ``resolve_precision("auto" | "fp32" | "bf16", device) -> "fp32" | "bf16"``: ``auto`` is bf16 on CUDA and on a
  CPU with native bf16, else fp32.
* ``fold_batch_norms(module)``: every eval-mode ``BatchNorm2d`` that directly follows a ``Conv2d`` (``convN`` /
  ``bnN`` pairs of a ResNet block, or neighbours in an ``nn.Sequential``) is folded into the convolution's weight
  and bias and replaced by ``nn.Identity`` (inference only: the result is not trainable as before).
* ``describe_cpu()`` / ``openmp_spin()``: the CPU and the OpenMP spin setting in effect, for benchmark records.
* ``to_device(tensor, device, dtype)``: a CPU batch onto the runtime's device (pinned + ``non_blocking`` for CUDA).
* ``keep_triton_out(device)``: a process that runs on the CPU never loads triton (see there).
* ``trim_heap()``: hand the C heap's free pages back to the system after loading models (glibc's malloc_trim).
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------- CPU features
def _cpuinfo_flags(path: str | Path = "/proc/cpuinfo") -> set[str] | None:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags") or line.startswith("Features"):  # x86 / arm
            return set(line.split(":", 1)[1].split())
    return None


def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """True when the CPU has native bf16 arithmetic: x86 ``avx512_bf16`` or ``amx_bf16``, arm ``bf16``."""
    flags = _cpuinfo_flags(cpuinfo)
    if flags is not None:
        return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    return _torch_cpu_bf16()


@functools.lru_cache(maxsize=1)
def _torch_cpu_bf16() -> bool:
    """Fallback where /proc/cpuinfo is absent: torch's oneDNN probe of the CPU."""
    probe = getattr(getattr(torch.backends, "mkldnn", None), "is_bf16_supported", None)
    if probe is None:
        return False
    try:
        return bool(probe())
    except Exception:  # noqa: BLE001 - an unknown CPU is not a bf16 CPU
        return False


# ---------------------------------------------------------------------------------------------- settings
def resolve_device(text: str | torch.device | None) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a usable ``torch.device`` (ValueError naming the value)."""
    if isinstance(text, torch.device):
        text = str(text)
    value = (text or "auto").strip().lower()
    if value == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if value == "cpu":
        return torch.device("cpu")
    if value == "cuda" or value.startswith("cuda:"):
        index_text = value[5:] if value.startswith("cuda:") else None
        if index_text is not None and not index_text.isdigit():
            raise ValueError(f"device {text!r}: the GPU index must be a number (cuda:0, cuda:1, ...)")
        if not torch.cuda.is_available():
            raise ValueError(f"device {text!r}: CUDA is not available on this machine (use cpu or auto)")
        if index_text is not None and int(index_text) >= torch.cuda.device_count():
            raise ValueError(f"device {text!r}: this machine has {torch.cuda.device_count()} GPU(s)")
        return torch.device(value)
    raise ValueError(f"device {text!r} is not one of auto, cpu, cuda, cuda:N")


def resolve_precision(text: str | None, device: torch.device | str = "cpu") -> str:
    """``auto`` | ``fp32`` | ``bf16`` -> ``fp32`` or ``bf16`` for ``device`` (ValueError naming the value)."""
    value = (text or "auto").strip().lower()
    if value in PRECISIONS:
        return value
    if value != "auto":
        raise ValueError(f"precision {text!r} is not one of auto, fp32, bf16")
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def compute_dtype(precision: str) -> torch.dtype:
    """``fp32`` -> torch.float32, ``bf16`` -> torch.bfloat16 (already resolved; ``auto`` is an error here)."""
    try:
        return DTYPES[precision]
    except KeyError:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)} (resolve 'auto' first)") from None


def runtime_placement(device: str | torch.device, precision: str) -> tuple[torch.device, torch.dtype]:
    """What a loader gets (``device``, ``precision``) -> (torch.device, compute dtype), validated; ``auto`` is
    resolved here too, so a loader called directly behaves like one called through the settings."""
    dev = resolve_device(device)
    return dev, compute_dtype(resolve_precision(precision, dev))


def keep_triton_out(device: str | torch.device) -> bool:
    """On the CPU, mark triton as not installed in this process (``sys.modules["triton"] = None``: importing it
    raises ImportError, which torch reads as "no triton") -> whether it is now kept out.

    Nothing a CPU process runs uses it: triton compiles GPU kernels for ``torch.compile``. Yet it is loaded all the
    same: ``torchvision.ops`` imports ``torch._dynamo``, whose ``utils`` imports triton whenever the package is
    installed (the CUDA wheel depends on it), and libtriton's start-up costs about 80 MiB resident
    (bench/results/memory.md). Call it before anything imports torchvision. A GPU process, or one that imported
    triton already, is left as it is."""
    if "triton" in sys.modules:  # imported already, or kept out before
        return sys.modules["triton"] is None
    if torch.device(device).type != "cpu":
        return False
    sys.modules["triton"] = None
    return True


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None


def trim_heap() -> bool:
    """Hand the free pages of the C heap back to the system (glibc's ``malloc_trim(0)``) -> whether it ran.

    Loading a model frees most of what it allocated on the way (read buffers, the float32 copies converted to
    OpenVINO, the conversion's own graph), but glibc keeps freed pages in its heap, where they count as resident
    until reused. The server and the offline engine call it after each load (in one process loading the four
    default models and converting their networks it released about 100 MiB, about 25 after reading them back).
    Elsewhere than glibc: nothing to do."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


# ---------------------------------------------------------------------------------------------- tensors
def to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A (CPU) tensor onto ``device``: pinned and copied ``non_blocking`` for CUDA; ``dtype`` converts floats."""
    if tensor.device != device:
        if device.type == "cuda" and tensor.device.type == "cpu":
            tensor = tensor.pin_memory().to(device, non_blocking=True)
        else:
            tensor = tensor.to(device)
    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    return tensor


# ---------------------------------------------------------------------------------------------- BN folding
def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    return fuse_conv_bn_eval(conv.eval(), bn.eval())


def fold_batch_norms(module: nn.Module) -> int:
    """Fold each BatchNorm2d that follows its Conv2d into it, in place; returns how many were folded.

    Pairs: children ``convN`` + ``bnN`` (torchvision's and open_clip's ResNet blocks and stems call them in that
    order, with nothing in between) and consecutive ``Conv2d``, ``BatchNorm2d`` children of an ``nn.Sequential``
    (the downsample branches). The module must be in eval mode (running statistics are what gets folded).
    """
    if module.training:
        raise ValueError("fold_batch_norms needs a module in eval mode (it folds the running statistics)")
    folded = 0
    for parent in list(module.modules()):
        children = dict(parent.named_children())
        if isinstance(parent, nn.Sequential):
            names = list(children)
            for first, second in zip(names, names[1:], strict=False):
                conv, bn = children[first], children[second]
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    setattr(parent, first, _fold(conv, bn))
                    setattr(parent, second, nn.Identity())
                    folded += 1
            continue
        for name, child in children.items():
            if not (name.startswith("conv") and isinstance(child, nn.Conv2d)):
                continue
            bn_name = "bn" + name[len("conv"):]
            bn = children.get(bn_name)
            if isinstance(bn, nn.BatchNorm2d):
                setattr(parent, name, _fold(child, bn))
                setattr(parent, bn_name, nn.Identity())
                folded += 1
    return folded


def count_batch_norms(module: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def describe_cpu() -> dict[str, Any]:
    """CPU model, logical cores and native-bf16 flag (for benchmark records)."""
    import os
    import platform

    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "native_bf16": cpu_has_native_bf16(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "openmp_spin": openmp_spin(),
    }


def openmp_spin() -> str:
    """The OpenMP spin setting torch's threads run with (see ``captioning/__init__``), for benchmark records."""
    import captioning

    policy = os.environ.get("OMP_WAIT_POLICY")
    spin = os.environ.get("GOMP_SPINCOUNT")
    if policy:
        return f"OMP_WAIT_POLICY={policy}" + (f" GOMP_SPINCOUNT={spin}" if spin else "")
    if spin is None:
        return "libgomp default (GOMP_SPINCOUNT unset)"
    if captioning._SPIN_SET_TOO_LATE:
        return "libgomp default (torch was loaded before captioning set GOMP_SPINCOUNT)"
    return f"GOMP_SPINCOUNT={spin}"
