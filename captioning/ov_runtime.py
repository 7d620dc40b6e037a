"""The fast path's convolutional networks on OpenVINO: LightCap's CLIP ResNet trunk and YOLO network, and the
UCM ResNet trunk, each converted at load from the very torch module the runtime would run (batch norms
already folded) and compiled for the CPU in the runtime's precision.

Why OpenVINO: the issue asked for whichever of torch.compile, ONNX Runtime or OpenVINO measurably wins for the
vision part, keeping one. ``bench/inference.py --runtimes openvino,onnxruntime`` measures them against torch
eager in one run (bench/results/, docs/performance.md): OpenVINO is the only one of the three that wins in
both precisions (bf16 is what ``auto`` picks on a CPU with native bf16; ONNX Runtime has no bf16 convolutions
on the CPU, and torch.compile needs a C++ compiler on the serving machine and compiles per batch shape).

* ``resolve_vision_runtime("auto" | "torch" | "openvino" | None, device)``: ``None`` reads
  ``CAPTIONER_VISION_RUNTIME`` (default ``auto``); ``auto`` is ``openvino`` on the CPU when the package is
  installed, else ``torch`` (a GPU keeps torch); an unusable choice is a ValueError naming it.
* ``OpenVinoNet(module, example, precision=...)``: the compiled network, called like the module on a float32
  CPU batch ``[B, ...]`` of the example's per-image shape (any batch size), with torch's thread count of the
  calling thread; callers (pool replicas, runtimes sharing the network) take turns on one infer request. Its
  outputs match the torch module's to float rounding in fp32 (tests/test_ov_runtime.py,
  test_fast_inference.py); in bf16 OpenVINO rounds differently from torch's bf16 kernels, so the captions are
  checked instead (CIDEr-D within 0.02: bench/results/inference-quality.md).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import threading
import warnings

import torch
from torch import nn

VISION_RUNTIMES = ("auto", "torch", "openvino")
ENV = "CAPTIONER_VISION_RUNTIME"
OV_PRECISION = {"fp32": "f32", "bf16": "bf16"}


@functools.lru_cache(maxsize=1)
def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def resolve_vision_runtime(value: str | None, device: torch.device | str = "cpu") -> str:
    """-> ``torch`` or ``openvino`` for networks on ``device`` (ValueError naming an unusable value)."""
    text = value if value is not None else os.environ.get(ENV, "auto")
    choice = (text or "auto").strip().lower()
    if choice not in VISION_RUNTIMES:
        raise ValueError(f"vision runtime {text!r} is not one of {', '.join(VISION_RUNTIMES)}")
    on_cpu = torch.device(device).type == "cpu"
    if choice == "auto":
        return "openvino" if on_cpu and openvino_available() else "torch"
    if choice == "openvino":
        if not on_cpu:
            raise ValueError(f"vision runtime 'openvino' runs the networks on the CPU, not on {device}")
        if not openvino_available():
            raise ValueError("vision runtime 'openvino': the openvino package is not installed")
    return choice


class OpenVinoNet:
    """``module`` (eval, any weight dtype) converted with ``openvino.convert_model`` and compiled for the CPU.

    example: one input batch ``[b, ...]``; the batch dimension stays dynamic, the rest is fixed.
    precision: ``fp32`` | ``bf16`` (OpenVINO's inference precision hint).
    Threads follow torch: a call uses as many inference threads as ``torch.get_num_threads()`` in the calling
    thread (a pool replica sets its own), compiling once per thread count (a fraction of a second). Thread-safe:
    calls take turns on one infer request per thread count."""

    def __init__(self, module: nn.Module, example: torch.Tensor, *, precision: str = "fp32", name: str = "network"):
        import openvino as ov

        if precision not in OV_PRECISION:
            raise ValueError(f"precision {precision!r} is not one of {', '.join(OV_PRECISION)}")
        self.name = name
        self.precision = precision
        self.sample_shape = tuple(example.shape[1:])
        # a float32, channels-first copy: the runtime's own module keeps its layout and dtype
        plain = copy.deepcopy(module).float().to(memory_format=torch.contiguous_format).eval()
        with torch.no_grad(), warnings.catch_warnings():
            # OpenVINO converts through torch.jit.trace, which this torch marks deprecated at every call
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            self.model = ov.convert_model(plain, example_input=example[:1].float().contiguous(),
                                          input=[(-1, *self.sample_shape)])
        self._core = ov.Core()
        self._compiled: dict[int, object] = {}
        self._lock = threading.Lock()
        self._requests: dict[int, tuple] = {}

    def compiled_for(self, threads: int):
        """The network compiled for ``threads`` inference threads (compiled on first use)."""
        with self._lock:
            if threads not in self._compiled:
                self._compiled[threads] = self._core.compile_model(self.model, "CPU", {
                    "INFERENCE_PRECISION_HINT": OV_PRECISION[self.precision],
                    "INFERENCE_NUM_THREADS": int(threads),
                    "PERFORMANCE_HINT": "LATENCY",
                })
            return self._compiled[threads]

    def accepts(self, x: torch.Tensor) -> bool:
        """Whether ``x`` can run here (a CPU batch of the compiled per-image shape)."""
        return x.device.type == "cpu" and tuple(x.shape[1:]) == self.sample_shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, *sample_shape] -> the module's (first) output as a float32 CPU tensor."""
        threads = torch.get_num_threads()
        request, lock = self._requests.get(threads) or self._request_for(threads)
        feed = x.detach().float().contiguous().numpy()
        with lock:  # callers of one network take turns: on a CPU they would only share its cores anyway
            request.infer({0: feed})
            return torch.from_numpy(request.get_output_tensor(0).data.copy())  # the request reuses its buffer

    def _request_for(self, threads: int):
        """One infer request per thread count, shared by every calling thread: OpenVINO keeps a request's
        intermediate buffers (sized for the largest batch it ran) for the request's life, so a request per
        calling thread would hold them once per pool replica and per runtime sharing this network."""
        compiled = self.compiled_for(threads)
        with self._lock:
            if threads not in self._requests:
                self._requests[threads] = (compiled.create_infer_request(), threading.Lock())
            return self._requests[threads]

    def __repr__(self) -> str:
        return f"OpenVinoNet({self.name}, {self.sample_shape}, {self.precision})"
