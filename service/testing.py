"""Running the real app on a loopback port, for tests and the benchmark.

* :class:`LiveServer`: uvicorn in a background thread of this process (``with LiveServer(app) as url``);
* :class:`ServerProcess`: ``captioner serve`` in a child process (restart / kill / graceful-shutdown tests,
  and the benchmark, which measures the server's own memory).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn


class LiveServer:
    def __init__(self, app, *, host: str = "127.0.0.1", graceful_timeout: float = 10.0):
        config = uvicorn.Config(
            app, host=host, port=0, log_level="warning", lifespan="on", timeout_graceful_shutdown=graceful_timeout,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="live-server", daemon=True)
        self.url = ""

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread exited during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not start within 60 s")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_ready(url: str, timeout: float = 120.0, headers: dict | None = None) -> dict:
    """Poll ``/readyz`` until 200; -> its body. Raises with the last answer on timeout."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/readyz", timeout=5, headers=headers)
            if r.status_code == 200:
                return r.json()
            last = r.text
        except httpx.TransportError as exc:
            last = repr(exc)
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout} s: {last}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m captioning.cli serve`` with ``env`` (CAPTIONER_* settings) on a free loopback port."""

    def __init__(self, env: dict[str, str], *, log_path: Path | None = None, cwd: Path | None = None):
        self.port = free_port()
        self.env = {**os.environ, **env, "CAPTIONER_HOST": "127.0.0.1", "CAPTIONER_PORT": str(self.port)}
        self.log_path = log_path
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, ready_timeout: float = 180.0) -> ServerProcess:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "captioning.cli", "serve"], env=self.env, stdout=out, stderr=subprocess.STDOUT,
            cwd=self.cwd,
        )
        try:
            wait_ready(self.url, ready_timeout)
        except TimeoutError:
            self.kill()
            raise
        return self

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM (graceful: drains) and wait; -> exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: no drain, no cleanup (a crash)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                self.terminate(30)
            except subprocess.TimeoutExpired:
                self.kill()


# --- freshly built models for tests and examples (random weights, real classes, real store) ----------
SAMPLE_CAPTIONS = [
    "there is an airplane at the airport",
    "many buildings and some green trees are around a road",
    "lots of boats docked neatly at the harbor",
    "a river runs through the green forest",
    "some cars are parked in the parking lot",
]


def _publish(store, name: str, folder: Path, task: str, config, parents=()):
    """Publish ``folder``; ``config`` is a typed config (``captioning.config_schema``), stored as its dict."""
    return store.publish(
        name, folder, task=task, profile=config.profile, metrics={"note": "random weights"},
        config=config.to_dict(), command="service.testing (random weights)", data={"name": "none (random weights)"},
        parents=list(parents),
    )


def publish_ucm(store, workdir: Path, *, seed: int = 0, overrides: list[str] | None = None,
                classifier: bool = True, captioner: bool = True) -> dict[str, int]:
    """Publish random-weight ``ucm-captioner`` and ``ucm-classifier`` versions built from the tiny profile
    (``overrides`` shrink it further for tests); -> {name: version}."""
    import json

    import torch

    from captioning.config import load_config
    from captioning.data import LABELS, tokenize
    from captioning.data.vocab import Vocabulary
    from captioning.models.ucm.model import Captioner, MultiLabelClassifier
    from captioning.models.ucm.store_io import VOCAB, WEIGHTS
    from captioning.weights import save_state

    torch.manual_seed(seed)
    config = load_config("ucm", "tiny", overrides=overrides)
    out = {}
    if captioner:
        folder = Path(workdir) / f"ucm-captioner-{seed}"
        folder.mkdir(parents=True)
        vocab = Vocabulary.build([tokenize(c) for c in SAMPLE_CAPTIONS])
        vocab.save(folder / VOCAB)
        model = Captioner(len(vocab), config.text, config.image, attention_dim=config.captioner.attention_dim)
        save_state(model.state_dict(), folder / WEIGHTS, config.weights_dtype)
        out["ucm-captioner"] = _publish(store, "ucm-captioner", folder, "ucm-captioner", config).version
    if classifier:
        folder = Path(workdir) / f"ucm-classifier-{seed}"
        folder.mkdir(parents=True)
        model = MultiLabelClassifier(config.image, len(LABELS))
        save_state(model.state_dict(), folder / WEIGHTS, config.weights_dtype)
        (folder / "classifier.json").write_text(json.dumps({"labels": list(LABELS), "threshold": 0.5}))
        out["ucm-classifier"] = _publish(store, "ucm-classifier", folder, "ucm-classifier", config).version
    return out


def publish_concepts(store, workdir: Path, *, seed: int = 0) -> dict[str, int]:
    """Publish random-weight ``clip``, ``concepts-detector`` and ``concepts`` versions (tiny profiles)."""
    import torch

    from captioning.config import load_config
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

    torch.manual_seed(seed)
    workdir = Path(workdir)
    clip_cfg = load_config("clip", "tiny")
    cfg = load_config("concepts", "tiny")
    words, labels = concept_words(cfg.vocabulary)
    tokenizer = ClipTokenizer.train_word_level([f"a photo of a {w}" for w in words], 32)
    model_cfg = clip_model_config(clip_cfg.model)
    model_cfg["text_cfg"].update(tokenizer.text_cfg_overrides())
    clip_cfg = ClipConfig.model_validate({**clip_cfg.to_dict(), "model": model_cfg})
    clip = build_clip(clip_cfg)
    folder = workdir / f"clip-{seed}"
    folder.mkdir(parents=True)
    save_state(clip.state_dict(), folder / "model.safetensors", "float16")
    tokenizer.save(folder)
    clip_v = _publish(store, "clip", folder, "clip", clip_cfg)
    detector = ProposalDetector(cfg.detector)
    folder = workdir / f"det-{seed}"
    folder.mkdir(parents=True)
    detector.save_weights(folder / WEIGHTS_FILE)
    det_v = _publish(store, "concepts-detector", folder, "concepts-detector", cfg)
    vocab = ConceptVocabulary(words, labels, embed_concepts(clip, tokenizer, words))
    aligner = RegionAligner.from_config(512, cfg.align, vocab.dim)
    folder = workdir / f"concepts-{seed}"
    folder.mkdir(parents=True)
    save_state(aligner.state_dict(), folder / ALIGNER_FILE, "float16")
    vocab.save(folder)
    cfg.extract.proposal_conf, cfg.extract.min_score = 0.0, 0.0  # random weights: keep every proposal
    parents = [{"name": "clip", "version": clip_v.version}, {"name": "concepts-detector", "version": det_v.version}]
    return {"clip": clip_v.version, "concepts-detector": det_v.version,
            "concepts": _publish(store, "concepts", folder, "concepts", cfg, parents).version}


def publish_lightcap(store, workdir: Path, *, seed: int = 0, concepts: str = "concepts@production") -> dict[str, int]:
    """Publish a random-weight ``lightcap`` captioner (tiny profile) on top of the store's concept extractor."""
    import torch

    from captioning.config import load_config
    from captioning.inference import load_model
    from captioning.models.lightcap.pipeline import build_captioner, make_tokenizer, save_captioner

    torch.manual_seed(seed)
    config = load_config("lightcap", "tiny")
    extractor = load_model(store, concepts)
    tokenizer = make_tokenizer(config.tokenizer, config.model, SAMPLE_CAPTIONS)
    model = build_captioner(config.model, grid_channels=extractor.encoder.channels,
                            concept_dim=extractor.vocab.dim, tokenizer=tokenizer)
    folder = Path(workdir) / f"lightcap-{seed}"
    save_captioner(folder, model, tokenizer, dtype=config.weights_dtype, decoding=config.decoding)
    parent = {"name": extractor.name, "version": extractor.version}
    version = store.publish(
        "lightcap", folder, task="lightcap", profile="tiny", metrics={"note": "random weights"}, config=config.to_dict(),
        command="service.testing (random weights)", data={"name": "none (random weights)"}, parents=[parent],
        extra={"concepts": parent, "role": "student"},
    )
    return {"lightcap": version.version}


_BUILT: dict[tuple, Path] = {}


def random_store(dest: Path, *, concepts: bool = True, lightcap: bool = False, overrides: tuple[str, ...] = ()):
    """A model store at ``dest`` holding random-weight UCM models (and the concept extractor, and LightCap on
    it). Built once per process and copied, so every test module gets its own store to modify cheaply."""
    import atexit
    import shutil
    import tempfile

    from captioning.store import ModelStore

    key = (concepts, lightcap, overrides)
    if key not in _BUILT:
        root = Path(tempfile.mkdtemp(prefix="captioner-random-store-"))
        atexit.register(shutil.rmtree, root, True)
        store = ModelStore(root / "store")
        publish_ucm(store, root / "work", overrides=list(overrides) or None)
        if concepts or lightcap:
            publish_concepts(store, root / "work")
        if lightcap:
            publish_lightcap(store, root / "work")
        _BUILT[key] = root / "store"
    shutil.copytree(_BUILT[key], dest)
    return ModelStore(dest)


# --- helpers for HTTP tests -------------------------------------------------------------------------
def image_bytes(width=96, height=64, fmt="PNG", seed=0, **kw) -> bytes:
    """A random RGB image encoded as ``fmt``."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_bomb(width=60_000, height=60_000) -> bytes:
    """A valid PNG header claiming ``width x height`` pixels, with a few kilobytes of compressed rows."""
    import zlib

    def chunk(kind, payload):
        body = kind + payload
        return len(payload).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    idat = zlib.compress(b"\x00" * (width + 1) * 16, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def metric(url: str, name: str, labels: dict[str, str] | None = None) -> float:
    """The sum of ``name``'s samples matching ``labels`` in the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics").text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                total += sample.value
    return total


def assert_problem(response: httpx.Response, status: int, slug: str) -> dict:
    """The response is problem+json of type ``/problems/<slug>`` with ``status``, and leaks no traceback."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["type"] == f"/problems/{slug}", body
    assert body["status"] == status and body["title"] and body["detail"]
    assert "Traceback" not in response.text and 'File "' not in response.text
    return body
