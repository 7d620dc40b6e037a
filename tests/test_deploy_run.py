"""The commands the containers run, run here.

* The image's ``CMD ["captioner", "serve"]`` with the image's environment (Dockerfile ``ENV``), as an
  unprivileged user that can write nothing but its data dir and /tmp (as in the container: non-root,
  read-only root filesystem, a read-only store mount): ``/healthz`` through the image's HEALTHCHECK
  script, ``/readyz``, a caption, then the compose ``reload`` step's script swapping to a newly promoted
  version, then SIGTERM (``docker stop``) exiting cleanly.
* The batch Indexed Job (k8s/jobs/batch) for each of its 3 indices (its argv, with Kubernetes' ``$(VAR)``
  expansion, through the ``captioner`` entry point in this process) and the merge Job's script
  (k8s/jobs/batch-merge, bash + ``captioner batch-merge`` in a child process): every image lands in
  exactly one shard and the merged file is byte for byte what one unsharded ``captioner batch`` writes.
* (slow) the compose ``train`` profile's command, publishing into the store a running service uses, and
  its ``reload`` step picking the new versions up.

Models: random-weight UCM models built by ``service.testing`` (real classes, real store, real loaders).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest
import yaml

from service.testing import free_port, image_bytes, publish_ucm, random_store, wait_ready

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NOBODY = 65534
ADMIN_KEY = "deploy-test-admin-key"


# ---------------------------------------------------------------------------------------------- helpers
def image_env() -> dict[str, str]:
    """The ENV of the Dockerfile's runtime stage."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    runtime = text[text.rindex("\nFROM "):]
    env: dict[str, str] = {}
    for line in runtime.splitlines():
        if line.startswith("ENV "):
            for pair in shlex.split(line[4:]):
                name, _, value = pair.partition("=")
                env[name] = value
    return env


def as_unprivileged() -> list[str]:
    """Prefix that runs a command as nobody when we are root (else we already are unprivileged)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if not setpriv:
        pytest.skip("running as root without setpriv: cannot drop privileges to emulate the container user")
    return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def shared_dir(prefix: str) -> Path:
    """A folder the unprivileged user can traverse (pytest's tmp_path is private to its owner)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def give_to_nobody(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(path, NOBODY, NOBODY)
    return path


def container_env(extra: dict[str, str], sandbox: Path) -> dict[str, str]:
    """The image's environment with its paths mapped into ``sandbox``."""
    env = image_env()
    for name, value in list(env.items()):
        if value.startswith("/tmp/"):
            env[name] = str(give_to_nobody(sandbox / "tmp" / value.removeprefix("/tmp/")))
    env["PATH"] = f"{BIN}:/usr/local/bin:/usr/bin:/bin"  # the image: /opt/venv/bin first (after the mapping: a
    # checkout under /tmp must keep its own bin folder)
    env.update(HOME="/nonexistent", TMPDIR=str(give_to_nobody(sandbox / "tmp")), **extra)
    return env


def expand_k8s(word: str, env: dict[str, str]) -> str:
    """Kubernetes' expansion of $(VAR) in command/args ($$ escapes; unknown references stay as they are)."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), word)


def render_job(kustomization: str) -> dict:
    command = ["kustomize", "build"] if shutil.which("kustomize") else ["kubectl", "kustomize"]
    if not shutil.which(command[0]):
        pytest.skip("neither kustomize nor kubectl is installed")
    out = subprocess.run([*command, str(ROOT / "k8s" / kustomization)], capture_output=True, text=True, check=True)
    return next(d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "Job")


def k8s_argv(c: dict, overrides: dict[str, str]) -> list[str]:
    """A container's command + args as the kubelet passes them: $(VAR) expanded from its env."""
    env = {e["name"]: e.get("value", "") for e in c.get("env", [])}
    env.update(overrides)
    return [expand_k8s(w, env) for w in c["command"] + c.get("args", [])]


def run_captioner(argv: list[str], env: dict[str, str]) -> int:
    """``captioner ARGV`` in this process: the console script's own ``main`` (what the container's
    process runs), without paying for a new interpreter and torch import per command."""
    from captioning.cli import main

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return main(argv)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_k8s_container(c: dict, overrides: dict[str, str], *, cwd: Path, timeout: int = 600):
    env = {e["name"]: e.get("value", "") for e in c.get("env", [])}
    env.update(overrides)
    argv = k8s_argv(c, overrides)
    full = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(cwd), "CAPTIONER_NO_PROGRESS": "1",
            "HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **env}
    return subprocess.Popen(argv, env=full, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def sandbox():
    path = shared_dir("captioner-deploy-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def store(sandbox):
    store = random_store(sandbox / "models", concepts=False)
    for path in [store.root, *store.root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return store


# ---------------------------------------------------------------------------------------------- serve
def test_image_command_serves_as_unprivileged_user_and_reloads(store, sandbox):
    port = free_port()
    data_dir = give_to_nobody(sandbox / "serve-data")
    env = container_env({"CAPTIONER_MODEL_STORE": str(store.root), "CAPTIONER_DATA_DIR": str(data_dir),
                         "CAPTIONER_PORT": str(port), "CAPTIONER_TORCH_THREADS": "1",
                         "CAPTIONER_ADMIN_KEY": ADMIN_KEY}, sandbox / "serve")
    assert env["CAPTIONER_HOST"] == "0.0.0.0"
    cmd = json.loads(re.search(r'^CMD (\[.*\])$', (ROOT / "Dockerfile").read_text(), re.M).group(1))
    log = open(sandbox / "serve.log", "w")
    server = subprocess.Popen([*as_unprivileged(), *cmd], env=env, cwd=data_dir, stdout=log,
                              stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout=300)
        # the image's HEALTHCHECK command, as the image's user
        health = subprocess.run([*as_unprivileged(), sys.executable, str(ROOT / "deploy" / "healthcheck.py")],
                                env=env, capture_output=True, text=True, timeout=60)
        assert health.returncode == 0, health.stderr
        assert httpx.get(f"{url}/readyz", timeout=30).status_code == 200
        files = {"files": ("a.png", image_bytes(seed=3), "image/png")}
        caption = httpx.post(f"{url}/v1/caption", files=files, params={"model": "ucm"}, timeout=120)
        assert caption.status_code == 200, caption.text
        assert "captioner_http_requests_total" in httpx.get(f"{url}/metrics", timeout=30).text
        before = httpx.get(f"{url}/v1/models/ucm-captioner", timeout=30).json()

        # training publishes a new version and it is promoted; the compose reload step swaps to it
        published = publish_ucm(store, sandbox / "new-version", seed=1, classifier=False)["ucm-captioner"]
        store.promote("ucm-captioner", published)
        reload = subprocess.run(
            [*as_unprivileged(), sys.executable, str(ROOT / "deploy" / "reload.py"), "--url", url, "--wait", "60",
             "ucm-captioner"], env=env, capture_output=True, text=True, timeout=300)
        assert reload.returncode == 0, reload.stderr
        after = httpx.get(f"{url}/v1/models/ucm-captioner", timeout=30).json()
        assert before["serving_version"] != published and after["serving_version"] == published
        # without the admin key the reload script reports the refusal and fails
        refused = subprocess.run([sys.executable, str(ROOT / "deploy" / "reload.py"), "--url", url, "ucm-captioner"],
                                 env={**env, "CAPTIONER_ADMIN_KEY": ""}, capture_output=True, text=True, timeout=120)
        assert refused.returncode == 1 and "HTTP 401" in refused.stderr

        # the store the service read (read-only to it) is intact
        assert store.verify() == []
    finally:
        server.send_signal(signal.SIGTERM)  # docker stop
        code = server.wait(timeout=120)
        log.close()
    # uvicorn drains, completes the shutdown, then re-raises the SIGTERM it caught (exit 143 in Docker)
    log_text = (sandbox / "serve.log").read_text()
    assert code in (0, -signal.SIGTERM) and "Application shutdown complete" in log_text, log_text[-3000:]
    down = subprocess.run([sys.executable, str(ROOT / "deploy" / "healthcheck.py")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert down.returncode == 1, "the health check fails once the service is gone"


# ---------------------------------------------------------------------------------------------- batch
def test_batch_job_shards_and_merge_reproduce_one_process(store, sandbox):
    work = give_to_nobody(sandbox / "work")
    images = work / "batch" / "input"
    for i in range(14):
        folder = images / ("a" if i % 3 else "b/c")
        folder.mkdir(parents=True, exist_ok=True)
        fmt, suffix = (("PNG", ".png"), ("JPEG", ".jpg"), ("TIFF", ".tif"))[i % 3]
        (folder / f"img{i:02d}{suffix}").write_bytes(image_bytes(width=80 + i, height=64, fmt=fmt, seed=i))
    (images / "notes.txt").write_text("not an image: ignored by the listing")
    output = work / "batch" / "output"

    job = render_job("jobs/batch")
    spec = job["spec"]
    batch = next(c for c in spec["template"]["spec"]["containers"] if c["name"] == "batch")
    common = {"INPUT": str(images), "OUTPUT_DIR": str(output), "CAPTIONER_MODEL_STORE": str(store.root),
              "THREADS": "1"}
    for index in range(spec["completions"]):  # one pod per completion index
        argv = k8s_argv(batch, {**common, "SHARD_INDEX": str(index)})
        assert argv[0] == "captioner"
        assert run_captioner(argv[1:], {"CAPTIONER_MODEL_STORE": str(store.root)}) == 0, argv

    shard_files = sorted(output.glob("shard-*.jsonl"))
    assert len(shard_files) == spec["completions"] == 3
    per_shard = [[json.loads(line)["path"] for line in f.read_text().splitlines()] for f in shard_files]
    every = sorted(p for shard in per_shard for p in shard)
    expected = sorted(p.relative_to(images).as_posix() for p in images.rglob("*") if p.suffix != ".txt" and p.is_file())
    assert every == expected, "every image in exactly one shard"
    assert all(per_shard), "14 images over 3 shards: none is empty"

    merge_job = render_job("jobs/batch-merge")
    merge = merge_job["spec"]["template"]["spec"]["containers"][0]
    merged = run_k8s_container(merge, {"INPUT": str(images), "OUTPUT_DIR": str(output)}, cwd=work)
    code, err = merged.wait(timeout=600), merged.stderr.read()
    assert code == 0, err

    single = ["batch", str(images), "--out", str(work / "single.jsonl"), "--threads", "1", "--store", str(store.root)]
    assert run_captioner(single, {}) == 0
    assert (output / "results.jsonl").read_bytes() == (work / "single.jsonl").read_bytes()

    # the merge step refuses when a shard is missing (a pod that never finished)
    shard_files[1].unlink()
    broken = run_k8s_container(merge, {"INPUT": str(images), "OUTPUT_DIR": str(output)}, cwd=work)
    assert broken.wait(timeout=600) != 0 and "expected 3 shard files" in broken.stderr.read()


# ---------------------------------------------------------------------------------------------- compose train
FAST_UCM = ("--set text_ae.epochs=1 --set classifier.fine_tune_epochs=1 --set classifier.head_epochs=1 "
            "--set distill.epochs=1 --set captioner.epochs=1")


def compose_defaults(service: dict) -> dict[str, str]:
    """A compose service's environment with ${VAR:-default} interpolated as with VAR unset."""
    return {k: re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}", r"\1", str(v))
            for k, v in service.get("environment", {}).items()}


@pytest.mark.slow
def test_compose_train_profile_publishes_and_reload_swaps(sandbox):
    from captioning.store import ModelStore
    from service.testing import ServerProcess

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    train, reload = compose["services"]["train"], compose["services"]["reload"]
    store = random_store(sandbox / "compose-models", concepts=False)  # the shared volume, already in use
    served = {name: store.resolve(f"{name}@production").version for name in ("ucm-captioner", "ucm-classifier")}
    api_env = {"CAPTIONER_MODEL_STORE": str(store.root), "CAPTIONER_DATA_DIR": str(sandbox / "compose-data"),
               "CAPTIONER_TORCH_THREADS": "1", "CAPTIONER_ADMIN_KEY": ADMIN_KEY}
    with ServerProcess(api_env, log_path=sandbox / "compose-api.log") as api:
        # the train service: its command with compose's $$ escape undone, its environment, the volumes here
        command = [word.replace("$$", "$") for word in train["command"]]
        env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", **compose_defaults(train),
               "CAPTIONER_MODEL_STORE": str(store.root), "WORK_DIR": str(sandbox / "train-work"),
               "TRAIN_ARGS": FAST_UCM}
        done = subprocess.run(command, env=env, cwd=sandbox, capture_output=True, text=True, timeout=3600)
        assert done.returncode == 0, done.stderr[-5000:]
        fresh = ModelStore(store.root)
        for name in compose_defaults(train)["TRAIN_STAGES"].split():
            latest = fresh.versions(name)[-1]
            assert fresh.aliases(name)["production"] == latest, f"{name}: not published as production"
            assert fresh.load(f"{name}@{latest}").manifest["extra"]["world_size"] == int(compose_defaults(train)["TRAIN_NPROC"])
        assert not (sandbox / "train-work" / "runs").exists() or not any((sandbox / "train-work" / "runs").iterdir())

        # the reload service: its command against this API
        argv = [sys.executable if w == "python" else w for w in reload["command"]]
        argv = [str(ROOT / "deploy" / "reload.py") if w == "/opt/captioner/reload.py" else w for w in argv]
        argv[argv.index("--url") + 1] = api.url
        swapped = subprocess.run(argv, env={**os.environ, **compose_defaults(reload), "CAPTIONER_ADMIN_KEY": ADMIN_KEY},
                                 capture_output=True, text=True, timeout=600)
        assert swapped.returncode == 0, swapped.stderr
        for name, old in served.items():
            now = httpx.get(f"{api.url}/v1/models/{name}", timeout=30).json()
            assert now["serving_version"] == fresh.versions(name)[-1] > old, now
