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
* Converted networks are cached on disk as OpenVINO IR (``openvino.save_model``), named by a fingerprint of
  everything the conversion reads: the module's float32 tensors, every submodule's plain attributes, the source
  files of its classes outside torch, the input shape and the openvino and torch versions. A later load of the
  same network (a restart, a CLI call, a hot swap back) reads it (about 0.1 s) instead of converting (about 1 s
  per network: most of the service's start-up). ``CAPTIONER_OV_CACHE_DIR``: the folder (default
  ``$XDG_CACHE_HOME/captioner-openvino``, ``~/.cache/...``, else under the temp dir); ``off`` converts every time.
  A cache that cannot be written or read is skipped with a warning; the network is then converted. A network
  converted and written holds the IR it wrote, as a later load does: the converted graph shares the tensors
  of the float32 copy it was made from and would keep a second copy of the weights alive.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.util
import inspect
import logging
import os
import shutil
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import nn

VISION_RUNTIMES = ("auto", "torch", "openvino")
ENV = "CAPTIONER_VISION_RUNTIME"
OV_PRECISION = {"fp32": "f32", "bf16": "bf16"}
CACHE_ENV = "CAPTIONER_OV_CACHE_DIR"

log = logging.getLogger(__name__)


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
        self._core = ov.Core()
        folder = cache_dir()
        self.cached: Path | None = folder / fingerprint(plain, self.sample_shape) / "model.xml" if folder else None
        self.model = self._read_cached()
        if self.model is None:
            with torch.no_grad(), warnings.catch_warnings():
                # OpenVINO converts through torch.jit.trace, which this torch marks deprecated at every call
                warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
                warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
                self.model = ov.convert_model(plain, example_input=example[:1].float().contiguous(),
                                              input=[(-1, *self.sample_shape)])
            if self._write_cached():  # hold what was written, as a later start will: the converted graph shares
                self.model = self._read_cached() or self.model  # the torch copy's tensors, keeping them alive
        del plain
        self._compiled: dict[int, object] = {}
        self._lock = threading.Lock()
        self._requests: dict[int, tuple] = {}

    def _read_cached(self):
        """The cached IR of this network, or None (not cached, or unreadable: then moved away, converted and
        written again)."""
        if self.cached is None or not self.cached.is_file():
            return None
        try:
            model = self._core.read_model(str(self.cached))
            shape = model.inputs[0].get_partial_shape()
            if len(model.inputs) != 1 or tuple(d.get_length() for d in list(shape)[1:]) != self.sample_shape:
                raise ValueError(f"its input is {shape}, not [?, {', '.join(map(str, self.sample_shape))}]")
            return model
        except Exception as exc:  # noqa: BLE001 - a damaged cache entry is converted again, never fatal
            log.warning("%s: cached OpenVINO network %s unreadable (%s); converting it again", self.name, self.cached, exc)
            entry = self.cached.parent
            with contextlib.suppress(OSError):
                damaged = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".damaged-"))
                os.replace(entry, damaged / entry.name)
                shutil.rmtree(damaged, ignore_errors=True)
            return None

    def _write_cached(self) -> bool:
        """Publish the converted IR as its fingerprint's folder: written in a folder beside it, then renamed into
        place in one step, so a reader finds the whole entry or none and concurrent writers (uvicorn workers
        loading at once) leave one. -> whether the entry is there now."""
        if self.cached is None:
            return False
        import openvino as ov

        entry = self.cached.parent
        staging = None
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".writing-"))
            ov.save_model(self.model, str(staging / self.cached.name), compress_to_fp16=False)
            os.rename(staging, entry)  # fails if another writer published the entry first: theirs stays
        except OSError as exc:
            if not self.cached.is_file():
                log.warning("%s: cannot cache the converted network in %s (%s)", self.name, entry.parent, exc)
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
        return self.cached.is_file()

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


def cache_dir() -> Path | None:
    """Where converted networks are cached (``CAPTIONER_OV_CACHE_DIR``; ``off``: nowhere). The default follows
    the numba kernels' (captioning/search_kernels.py): the user's cache folder when writable, else the temp dir."""
    value = os.environ.get(CACHE_ENV, "").strip()
    if value.lower() == "off":
        return None
    if value:
        return Path(value)
    home_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    base = home_cache if home_cache.is_dir() and os.access(home_cache, os.W_OK) else Path(tempfile.gettempdir())
    return base / "captioner-openvino"


_PLAIN = (bool, int, float, str, type(None), torch.dtype, torch.Size)


def fingerprint(module: nn.Module, sample_shape: tuple[int, ...]) -> str:
    """sha256 (hex, 32 characters) of what ``openvino.convert_model`` reads from ``module`` for inputs
    ``[?, *sample_shape]``: every tensor (name, dtype, shape, bytes), every submodule's class and plain attributes
    (numbers, strings, flags, tuples of them: an export flag changes the graph), the source file of each class
    from outside torch (its forward and the helpers beside it) with its package's version, and the openvino and
    torch versions (which convert the rest)."""
    import openvino as ov

    digest = hashlib.sha256()

    def add(*parts: object) -> None:
        for part in parts:
            digest.update(part if isinstance(part, bytes) else repr(part).encode())

    def add_tensor(name: str, tensor: torch.Tensor) -> None:
        data = tensor.detach().cpu().contiguous().reshape(-1)  # 1-d: a 0-d tensor has no byte view
        add(name, str(tensor.dtype), tuple(tensor.shape), data.view(torch.uint8).numpy().tobytes() if len(data) else b"")

    add(ov.__version__, torch.__version__, sample_shape)
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        add_tensor(name, tensor)
    sources: set[str] = set()
    for name, sub in module.named_modules():
        cls = type(sub)
        public = sorted((k, v) for k, v in vars(sub).items() if not k.startswith("_"))
        add(name, f"{cls.__module__}.{cls.__qualname__}", [(k, v) for k, v in public if _is_plain(v)])
        for key, value in public:  # tensors kept as plain attributes (not buffers), e.g. a detection head's strides
            if isinstance(value, torch.Tensor):
                add_tensor(f"{name}.{key}", value)
        for klass in cls.__mro__:
            if not klass.__module__.startswith(("torch", "builtins")):
                sources.add(klass.__module__)
    for module_name in sorted(sources):
        add(module_name, _package_version(module_name))
        try:
            add(Path(inspect.getsourcefile(sys.modules[module_name]) or "").read_bytes())
        except (KeyError, TypeError, OSError):
            add("no source")
    return digest.hexdigest()[:32]


def _is_plain(value: object) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_is_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def _package_version(module_name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(module_name.split(".")[0])
    except metadata.PackageNotFoundError:
        return "?"
