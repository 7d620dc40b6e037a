"""The model store: atomic publish, aliases, promote/rollback, verification, crashes, concurrency, read-only use."""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import captioning.cli
from captioning import store as store_mod
from captioning.errors import StoreError
from captioning.store import ModelStore, manifest_digest, sha256_file

REPO = Path(__file__).resolve().parents[1]


def make_source(folder: Path, payload: bytes = b"weights-v1") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(payload * 1000)
    (folder / "vocab.txt").write_text("<pad>\n<bos>\n<eos>\n<unk>\nfield\n")
    (folder / "tokenizer").mkdir(exist_ok=True)
    (folder / "tokenizer" / "merges.txt").write_text("a b\n")
    return folder


def publish(store: ModelStore, source: Path, name: str = "demo", **overrides):
    kwargs = dict(
        task="ucm-captioner",
        profile="tiny",
        metrics={"bleu4": 0.25},
        config={"profile": "tiny", "decoder": {"hidden": 32}},
        command="captioner train ucm-captioner --data data/syn --profile tiny --seed 0",
        data={"name": "synthetic", "size": 120, "seed": 0},
        parents=[],
    )
    kwargs.update(overrides)
    return store.publish(name, source, **kwargs)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return make_source(tmp_path / "staging")


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store")


def only_store_commands(group: str):
    """The ``captioner`` plugins reduced to this package's ``store``: other packages' commands (which may be
    mid-change in a shared checkout) cannot break these tests, while ``captioning.cli.main`` runs for real."""
    return [ep for ep in entry_points(group=group) if ep.name == "store"]


@pytest.fixture(autouse=True)
def _store_cli_only(monkeypatch):
    monkeypatch.setattr(captioning.cli, "entry_points", only_store_commands)


CLI_SCRIPT = (  # the real `captioner` main in a fresh process, with the same plugin filter
    "import sys, importlib.metadata as m, captioning.cli as c; "
    "c.entry_points = lambda group: [e for e in m.entry_points(group=group) if e.name == 'store']; "
    "sys.exit(c.main())"
)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = captioning.cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------------------------------------- round trip
def test_publish_promote_rollback_round_trip(store, src, tmp_path):
    v1 = publish(store, src, alias="candidate")
    assert (v1.name, v1.version) == ("demo", 1)
    assert store.aliases("demo") == {"candidate": 1, "production": 1}  # production set: the model had none

    src2 = make_source(tmp_path / "staging2", b"weights-v2")
    v2 = publish(store, src2, alias="candidate", metrics={"bleu4": 0.3})
    assert v2.version == 2
    assert store.aliases("demo") == {"candidate": 2, "production": 1}  # production is not moved by a publish
    assert store.resolve("demo").version == 1
    assert store.resolve("demo@production").version == 1
    assert store.resolve("demo@candidate").version == 2
    assert store.resolve("demo@latest").version == 2
    assert store.resolve("demo@1").version == 1

    assert store.promote("demo", 2) == {"name": "demo", "alias": "production", "version": 2, "previous": 1}
    loaded = store.load("demo")
    assert loaded.version == 2
    assert loaded.file("model.safetensors").read_bytes() == b"weights-v2" * 1000
    assert loaded.file("tokenizer/merges.txt").read_text() == "a b\n"

    assert store.rollback("demo") == {"name": "demo", "alias": "production", "version": 1, "previous": 2}
    assert store.load("demo").file("model.safetensors").read_bytes() == b"weights-v1" * 1000
    with pytest.raises(StoreError, match="no earlier version to roll back to"):
        store.rollback("demo")
    # the candidate alias has its own history: 1 -> 2 at the second publish
    assert store.rollback("demo", alias="candidate")["version"] == 1
    assert store.aliases("demo") == {"candidate": 1, "production": 1}
    assert [mv.spec for mv in store.list()] == ["demo@1", "demo@2"]


def test_manifest_records_provenance(store, src):
    parent = publish(store, src, name="ucm-classifier", task="ucm-classifier")
    mv = publish(
        store, src,
        metrics={"bleu4": 0.5, "undefined": math.nan, "path": Path("/x")},
        parents=[{"name": "ucm-classifier", "version": parent.version, "role": "teacher"}],
        extra={"seed": 0, "history": [{"epoch": 1, "loss": float("inf")}]},
    )
    on_disk = json.loads((mv.path / "manifest.json").read_text())
    assert on_disk == mv.manifest
    for key in ("name", "version", "profile", "task", "files", "metrics", "config", "command", "data", "parents",
                "created", "code_revision", "extra", "digest"):
        assert key in on_disk, key
    assert on_disk["command"].startswith("captioner train ucm-captioner")
    assert on_disk["data"] == {"name": "synthetic", "size": 120, "seed": 0}
    assert on_disk["parents"] == [{"name": "ucm-classifier", "version": 1, "role": "teacher"}]
    assert on_disk["created"].endswith("+00:00")
    assert on_disk["code_revision"]
    assert on_disk["metrics"] == {"bleu4": 0.5, "undefined": None, "path": "/x"}  # strict JSON
    assert on_disk["extra"]["history"][0]["loss"] is None
    assert set(on_disk["files"]) == {"model.safetensors", "vocab.txt", "tokenizer/merges.txt"}
    for rel, info in on_disk["files"].items():
        assert info == {"sha256": sha256_file(src / rel), "size": (src / rel).stat().st_size}
    assert on_disk["digest"] == manifest_digest(on_disk)


def test_latest_by_profile(store, src):
    assert store.latest("demo") is None
    publish(store, src, profile="paper")
    publish(store, src, profile="tiny")
    publish(store, src, profile="paper")
    assert store.latest("demo").version == 3
    assert store.latest("demo", profile="tiny").version == 2
    assert store.latest("demo", profile="paper").version == 3
    assert store.latest("demo", profile="other") is None


def test_resolve_errors_name_what_is_missing(store, src):
    publish(store, src, alias="candidate")
    with pytest.raises(StoreError, match="unknown model 'nope'.*models: demo"):
        store.resolve("nope")
    with pytest.raises(StoreError, match="demo has no version 7 \\(versions: 1\\)"):
        store.resolve("demo@7")
    with pytest.raises(StoreError, match="demo has no alias 'staging'.*candidate=1"):
        store.resolve("demo@staging")
    with pytest.raises(StoreError, match="invalid model reference"):
        store.resolve("demo@")
    with pytest.raises(StoreError, match="no file .missing.bin. in its manifest"):
        store.load("demo").file("missing.bin")
    with pytest.raises(StoreError, match="does not exist"):
        ModelStore(store.root / "typo").list()


@pytest.mark.parametrize("name", ["../escape", ".hidden", "a/b", "a@b", "", "x" * 200])
def test_publish_rejects_bad_names(store, src, name):
    with pytest.raises(StoreError, match="invalid model name"):
        publish(store, src, name=name)


def test_publish_validates_inputs(store, src, tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        publish(store, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="is empty"):
        publish(store, tmp_path / "empty")
    with pytest.raises(StoreError, match=r"metrics\.obj: a object cannot be stored"):
        publish(store, src, metrics={"obj": object()})
    with pytest.raises(StoreError, match="parent ucm-classifier@4 is not in the store"):
        publish(store, src, parents=[{"name": "ucm-classifier", "version": 4}])
    with pytest.raises(StoreError, match="invalid alias"):
        publish(store, src, alias="latest")
    with pytest.raises(StoreError, match="data must name the dataset"):
        publish(store, src, data={"size": 3})
    bad = make_source(tmp_path / "with-manifest")
    (bad / "manifest.json").write_text("{}")
    with pytest.raises(StoreError, match="'manifest.json' is written by the store"):
        publish(store, bad)
    assert store.versions("demo") == []  # nothing half-published
    assert list((store.root / ".staging").iterdir()) == []


def test_store_root_from_setting(monkeypatch, tmp_path, src):
    monkeypatch.delenv("CAPTIONER_MODEL_STORE", raising=False)
    assert ModelStore().root == REPO / "model_store"
    monkeypatch.setenv("CAPTIONER_MODEL_STORE", str(tmp_path / "elsewhere"))
    assert ModelStore().root == tmp_path / "elsewhere"
    publish(ModelStore(), src)
    assert (tmp_path / "elsewhere" / "demo" / "1" / "manifest.json").is_file()
    monkeypatch.setenv("CAPTIONER_MODEL_STORE", " ")
    with pytest.raises(StoreError, match="CAPTIONER_MODEL_STORE"):
        ModelStore()


# ---------------------------------------------------------------------------------------------- crashes
CRASH_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from captioning.store import ModelStore
    root, source, patched = sys.argv[1:4]
    # die the hard way (no cleanup, no finally blocks) at the chosen step of publish
    setattr(os, patched, lambda *a, **k: os._exit(17))
    ModelStore(root).publish("demo", source, task="t", profile="tiny", metrics={}, config={},
                             command="crash test", data={"name": "syn"}, parents=[], alias="candidate")
    """
)


def run_crashing_publish(store: ModelStore, source: Path, patched: str) -> None:
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(store.root), str(source), patched],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 17, proc.stderr


def test_crash_before_rename_leaves_no_version(store, src, tmp_path):
    publish(store, src)
    run_crashing_publish(store, make_source(tmp_path / "s2", b"crashed"), "rename")
    leftovers = [p for p in (store.root / ".staging").iterdir() if p.is_dir()]
    assert len(leftovers) == 1 and (leftovers[0] / "manifest.json").is_file()  # died just before the rename
    assert store.versions("demo") == [1]
    assert [mv.spec for mv in store.list()] == ["demo@1"]
    assert store.verify() == []
    assert store.aliases("demo") == {"production": 1}

    assert publish(store, src).version == 2  # the next publish works
    report = store.gc(keep=5)
    assert report.removed == [] and str(leftovers[0]) in report.removed_temp
    assert not leftovers[0].exists()
    assert list((store.root / ".staging").iterdir()) == []


def test_crash_during_first_publish_leaves_no_model(store, src):
    run_crashing_publish(store, src, "rename")
    assert store.list() == [] and store.models() == []
    assert store.latest("demo") is None
    with pytest.raises(StoreError, match="unknown model 'demo'"):
        store.resolve("demo")
    assert store.verify() == []
    report = store.gc(keep=1)
    assert len(report.removed_temp) == 1
    assert sorted(p.name for p in store.root.iterdir()) == [".staging", ".store.lock"]  # empty demo/ removed
    assert publish(store, src).version == 1
    assert store.aliases("demo") == {"production": 1}


def test_crash_while_writing_aliases_keeps_old_aliases_file(store, src):
    publish(store, src)
    run_crashing_publish(store, src, "replace")  # os.replace is only used for aliases.json
    assert store.versions("demo") == [1, 2]  # the version itself was complete
    assert store.aliases("demo") == {"production": 1}  # old file intact, temp file ignored
    temp = [p for p in (store.root / "demo").iterdir() if p.name.endswith(".tmp")]
    assert len(temp) == 1
    assert store.verify() == []
    assert store.gc(keep=5).removed_temp == [str(temp[0])]
    assert not temp[0].exists()


def test_exception_during_publish_cleans_up(store, src, monkeypatch):
    publish(store, src)

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_mod.os, "rename", fail)
    with pytest.raises(StoreError, match="No space left"):
        publish(store, src)
    monkeypatch.undo()
    assert store.versions("demo") == [1]
    assert list((store.root / ".staging").iterdir()) == []
    assert publish(store, src).version == 2


def test_gc_spares_a_publish_in_progress(store, src):
    from filelock import FileLock

    publish(store, src)
    busy = store.root / ".staging" / "demo-busy"
    busy.mkdir()
    with FileLock(str(busy) + ".lock"):
        assert store.gc(keep=1).removed_temp == []
        assert busy.is_dir()
    assert store.gc(keep=1).removed_temp == [str(busy)]


# ---------------------------------------------------------------------------------------------- concurrency
PUBLISHER_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from captioning.store import ModelStore
    root, source, go, tag = sys.argv[1:5]
    store = ModelStore(root)
    while not os.path.exists(go):
        time.sleep(0.005)
    for i in range(3):
        mv = store.publish("demo", source, task="t", profile="tiny", metrics={"by": tag, "i": i}, config={},
                           command="concurrency test", data={"name": "syn"}, parents=[], alias="candidate")
        print(mv.version, flush=True)
    """
)


def test_concurrent_publishers_get_distinct_versions(store, src, tmp_path):
    go = tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, "-c", PUBLISHER_SCRIPT, str(store.root), str(src), str(go), tag],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for tag in ("a", "b")
    ]
    time.sleep(0.5)  # let both import and wait at the barrier
    go.touch()
    versions = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        versions += [int(v) for v in out.split()]
    assert sorted(versions) == [1, 2, 3, 4, 5, 6]
    assert store.versions("demo") == [1, 2, 3, 4, 5, 6]
    assert store.verify() == []
    by = sorted((mv.metrics["by"], mv.metrics["i"]) for mv in store.list())
    assert by == [(t, i) for t in "ab" for i in range(3)]
    assert store.aliases("demo")["production"] == 1
    assert store.aliases("demo")["candidate"] in versions


def test_readers_never_see_a_partial_aliases_file(store, src):
    publish(store, src)
    publish(store, src)
    aliases_file = store.root / "demo" / "aliases.json"
    stop = threading.Event()
    seen: list[object] = []

    def reader():
        while not stop.is_set():
            try:
                seen.append(json.loads(aliases_file.read_text())["aliases"]["production"])
            except Exception as exc:  # noqa: BLE001 - any failure is what this test looks for
                seen.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(60):
            store.promote("demo", 1 + i % 2)
    finally:
        stop.set()
        thread.join()
    errors = [s for s in seen if isinstance(s, Exception)]
    assert not errors, errors[:3]
    assert set(seen) <= {1, 2} and len(seen) > 10


# ---------------------------------------------------------------------------------------------- tampering
def tamper_byte(mv):
    path = mv.path / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01
    path.write_bytes(bytes(data))
    return "model.safetensors is corrupt"


def tamper_delete(mv):
    (mv.path / "vocab.txt").unlink()
    return "vocab.txt is missing"


def tamper_truncate(mv):
    (mv.path / "tokenizer" / "merges.txt").write_text("")
    return "merges.txt has 0 bytes, manifest says 4"


def tamper_manifest_metric(mv):
    manifest = json.loads((mv.path / "manifest.json").read_text())
    manifest["metrics"]["bleu4"] = 0.99
    (mv.path / "manifest.json").write_text(json.dumps(manifest))
    return "manifest.json was edited"


def tamper_manifest_hash(mv):
    manifest = json.loads((mv.path / "manifest.json").read_text())
    manifest["files"]["vocab.txt"]["sha256"] = "0" * 64
    (mv.path / "manifest.json").write_text(json.dumps(manifest))
    return "vocab.txt is corrupt"


def tamper_manifest_json(mv):
    (mv.path / "manifest.json").write_text('{"name": "demo", ')
    return "not valid JSON"


def tamper_manifest_missing(mv):
    (mv.path / "manifest.json").unlink()
    return "manifest missing"


@pytest.mark.parametrize(
    "tamper",
    [tamper_byte, tamper_delete, tamper_truncate, tamper_manifest_metric, tamper_manifest_hash,
     tamper_manifest_json, tamper_manifest_missing],
)
def test_tampering_is_detected(store, src, tamper, capsys):
    publish(store, src)
    mv = publish(store, src, alias="candidate")
    expected = tamper(mv)
    with pytest.raises(StoreError, match=f"demo@2.*{expected}"):
        store.load("demo@candidate")
    assert store.load("demo@1").version == 1  # the others still load
    problems = store.verify()
    assert problems and all(p.version == 2 for p in problems)
    assert any(expected in str(p) for p in problems), problems
    with pytest.raises(StoreError):
        store.promote("demo", 2)  # a corrupt version never becomes production

    rc, out, _ = run_cli(capsys, "store", "verify", "--store", str(store.root))
    assert rc == 1 and expected in out and "demo@2" in out
    rc, out, _ = run_cli(capsys, "store", "verify", "demo", "--json", "--store", str(store.root))
    report = json.loads(out)
    assert rc == 1 and report["ok"] is False
    assert any(expected in p["message"] and p["version"] == 2 for p in report["problems"])
    rc, out, _ = run_cli(capsys, "store", "list", "--json", "--store", str(store.root))
    rows = json.loads(out)["versions"]
    assert rc == 0 and [r["version"] for r in rows] == [1, 2]
    unreadable = tamper in (tamper_manifest_json, tamper_manifest_missing)
    assert ("error" in rows[1]) == unreadable and "error" not in rows[0]  # listed, marked, not hidden


def test_verify_reports_unlisted_files_and_dangling_aliases(store, src):
    mv = publish(store, src)
    (mv.path / "sneaked_in.bin").write_bytes(b"x")
    aliases_file = store.root / "demo" / "aliases.json"
    data = json.loads(aliases_file.read_text())
    data["aliases"]["candidate"] = 9
    aliases_file.write_text(json.dumps(data))
    messages = [str(p) for p in store.verify()]
    assert any("sneaked_in.bin is not in the manifest" in m for m in messages), messages
    assert any("alias 'candidate' points at version 9, which is missing" in m for m in messages), messages
    with pytest.raises(StoreError, match="demo@candidate points at version 9"):
        store.resolve("demo@candidate")


def test_verify_cli_ok_exits_zero(store, src):
    publish(store, src)
    proc = subprocess.run([sys.executable, "-c", CLI_SCRIPT, "store", "verify", "--store", str(store.root)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "ok: 1 version(s) verified" in proc.stdout
    (store.root / "demo" / "1" / "vocab.txt").write_text("changed")
    proc = subprocess.run([sys.executable, "-c", CLI_SCRIPT, "store", "verify", "--store", str(store.root)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "vocab.txt" in proc.stdout


# ---------------------------------------------------------------------------------------------- read-only
def snapshot(root: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in [root, *root.rglob("*")])


def read_everything(root: Path, source: Path) -> dict:
    store = ModelStore(root)
    out = {
        "list": [mv.spec for mv in store.list()],
        "resolve": store.resolve("demo").spec,
        "load": store.load("demo@candidate").file("vocab.txt").read_text(),
        "latest": store.latest("demo", "tiny").spec,
        "verify": [str(p) for p in store.verify()],
    }
    try:
        store.publish("demo", source, task="t", profile="tiny", metrics={}, config={},
                      command="x", data={"name": "syn"}, parents=[])
        out["publish"] = "succeeded"
    except StoreError as exc:
        out["publish"] = str(exc)
    return out


def test_read_only_store_serves(tmp_path):
    # as root, file modes do not stop writes: read as the unprivileged 'nobody' user in a forked child
    base = Path(tempfile.mkdtemp(prefix="ro-store-"))
    try:
        base.chmod(0o755)
        store = ModelStore(base / "store")
        make_source(base / "src")
        publish(store, base / "src")
        publish(store, base / "src", alias="candidate")
        for p in [store.root, *store.root.rglob("*")]:
            p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        before = snapshot(store.root)
        if os.geteuid() == 0:
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:  # child: drop privileges, read, report through the pipe
                try:
                    os.setgid(65534)
                    os.setuid(65534)
                    result = read_everything(store.root, base / "src")
                except BaseException as exc:  # noqa: BLE001
                    result = {"error": repr(exc)}
                os.write(write_fd, json.dumps(result).encode())
                os._exit(0)
            os.close(write_fd)
            with os.fdopen(read_fd) as fh:
                result = json.loads(fh.read())
            os.waitpid(pid, 0)
        else:
            result = read_everything(store.root, base / "src")
        assert result.get("error") is None, result
        assert result["list"] == ["demo@1", "demo@2"]
        assert result["resolve"] == "demo@1"
        assert result["load"].startswith("<pad>")
        assert result["latest"] == "demo@2"
        assert result["verify"] == []
        assert "not writable" in result["publish"]
        assert snapshot(store.root) == before  # reading left no lock or temp file behind
    finally:
        for p in [base, *base.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
        shutil.rmtree(base)


# ---------------------------------------------------------------------------------------------- gc
def test_gc_keeps_newest_aliased_rollback_targets_and_parents(store, src):
    for _ in range(4):
        publish(store, src, name="teacher", task="t")
    store.promote("teacher", 3)
    store.promote("teacher", 4)  # teacher: production=4 (rollback 3); teacher@1 is kept only as a parent
    for _ in range(5):
        publish(store, src, parents=[{"name": "teacher", "version": 1}], alias="candidate")
    store.promote("demo", 2)  # production 1 -> 2: version 1 is production's rollback target
    # demo: production=2 (rollback 1), candidate=5 (rollback 4)
    with pytest.raises(StoreError, match="keep must be at least 1"):
        store.gc(keep=0)
    dry = store.gc(keep=1, dry_run=True)
    assert dry.removed == ["demo@3", "teacher@2"]
    assert store.versions("demo") == [1, 2, 3, 4, 5]
    report = store.gc(keep=1)
    assert report.removed == ["demo@3", "teacher@2"]
    assert store.versions("demo") == [1, 2, 4, 5]
    assert store.versions("teacher") == [1, 3, 4]
    assert store.verify() == []
    assert publish(store, src).version == 6  # numbers are never reused
    assert store.rollback("demo")["version"] == 1


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_json_outputs_parse(store, src, tmp_path, capsys):
    publish(store, src)
    publish(store, make_source(tmp_path / "s2", b"v2"), alias="candidate")
    root = ["--store", str(store.root)]

    rc, out, _ = run_cli(capsys, "store", "list", "--json", *root)
    rows = json.loads(out)["versions"]
    assert rc == 0 and [(r["name"], r["version"], r["aliases"]) for r in rows] == [
        ("demo", 1, ["production"]), ("demo", 2, ["candidate"])]

    rc, out, _ = run_cli(capsys, "store", "show", "demo@candidate", "--verify", "--json", *root)
    shown = json.loads(out)
    assert rc == 0 and shown["version"] == 2 and shown["verified"] is True
    assert shown["manifest"]["files"]["vocab.txt"]["size"] > 0

    rc, out, _ = run_cli(capsys, "store", "promote", "demo", "2", "--json", *root)
    assert rc == 0 and json.loads(out) == {"name": "demo", "alias": "production", "version": 2, "previous": 1}
    rc, out, _ = run_cli(capsys, "store", "rollback", "demo", "--json", *root)
    assert rc == 0 and json.loads(out)["version"] == 1
    rc, out, _ = run_cli(capsys, "store", "verify", "--json", *root)
    assert rc == 0 and json.loads(out)["ok"] is True and json.loads(out)["checked"] == ["demo@1", "demo@2"]
    rc, out, _ = run_cli(capsys, "store", "gc", "--keep", "1", "--json", *root)
    assert rc == 0 and json.loads(out)["removed"] == []

    rc, out, _ = run_cli(capsys, "store", "list", *root)
    assert rc == 0 and "production" in out and "candidate" in out
    rc, out, _ = run_cli(capsys, "store", "show", "demo", *root)
    assert rc == 0 and "demo@1" in out and "vocab.txt" in out


def test_cli_errors_are_messages_not_tracebacks(store, src, capsys):
    publish(store, src)
    root = ["--store", str(store.root)]
    for argv, expected in [
        (["show", "demo@9"], "demo has no version 9"),
        (["show", "nope"], "unknown model 'nope'"),
        (["promote", "demo", "4"], "demo has no version 4"),
        (["rollback", "demo", "--alias", "candidate"], "has no alias 'candidate'"),
        (["gc", "--keep", "0"], "keep must be at least 1"),
        (["verify", "nope"], "unknown model 'nope'"),
    ]:
        rc, out, err = run_cli(capsys, "store", *argv, *root)
        assert rc == 2 and expected in err and "Traceback" not in err, (argv, err)
