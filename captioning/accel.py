"""Devices and precision: what ``CAPTIONER_DEVICE`` / ``CAPTIONER_PRECISION`` (and the CLIs' flags) mean.

* ``resolve_device("auto"|"cpu"|"cuda"|"cuda:N") -> torch.device``: auto is the first GPU when one is
  present, else the CPU; asking for a GPU that is not there is an error naming the value.
* ``resolve_precision("auto"|"fp32"|"bf16", device) -> "fp32"|"bf16"``: auto is bf16 on a GPU and on a CPU
  with native bf16 arithmetic (AVX512-BF16 or AMX, read from the CPU's flags, not assumed), else fp32.
"""

from __future__ import annotations

import functools
import re

import torch

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N"
PRECISION_CHOICES = ("auto", "fp32", "bf16")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    return any(flag in cpu_flags() for flag in NATIVE_BF16_FLAGS)


def resolve_device(text: str) -> torch.device:
    value = str(text).strip().lower()
    if value == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    if value == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", value)
    if not match:
        raise ValueError(f"device {text!r} is not one of {DEVICE_CHOICES}")
    index = int(match.group(1) or 0)
    if not torch.cuda.is_available():
        raise ValueError(f"device {text!r}: no CUDA GPU is available on this machine")
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {text!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    return torch.device("cuda", index)


def resolve_precision(text: str, device: torch.device | str = "cpu") -> str:
    value = str(text).strip().lower()
    if value not in PRECISION_CHOICES:
        raise ValueError(f"precision {text!r} is not one of {', '.join(PRECISION_CHOICES)}")
    if value != "auto":
        return value
    device = torch.device(device)
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
        return "bf16"
    return "fp32"
