"""``captioner caption``, ``captioner batch`` (shards, resume) and ``captioner batch-merge`` on a random-weight
UCM captioner in a temporary store (the CLI in-process, as the entry point runs it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from captioning.cli import main
from service.offline import list_images, parse_shard, read_results, shard_of
from service.testing import image_bytes, random_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return random_store(tmp_path_factory.mktemp("cli-store") / "store", concepts=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for i in range(14):
        sub = root / ("a" if i % 2 else "b/c")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i:02d}.{'png' if i % 3 else 'jpg'}").write_bytes(image_bytes(40, 30, fmt="PNG" if i % 3 else "JPEG", seed=i))
    (root / "broken.png").write_bytes(image_bytes(80, 80)[:500])
    (root / "dataset.json").write_text("{}")  # not an image by suffix: not listed
    return root


def run(capsys, *argv) -> tuple[int, list[dict], str]:
    status = main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return status, [json.loads(line) for line in out.splitlines() if line.strip()], err


def test_caption_prints_one_json_line_per_file(store, folder, tmp_path, capsys):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    status, lines, _ = run(capsys, "caption", folder / "a/01.png", text, folder / "b/c/00.jpg",
                           "--store", store.root, "--model", "ucm", "--beam-size", "2", "--max-length", "5")
    assert status == 1  # one file failed
    assert [Path(x["path"]).name for x in lines] == ["01.png", "notes.jpg", "00.jpg"]
    assert lines[0]["model"] == "ucm-captioner" and lines[0]["version"] == 1 and lines[0]["caption"]
    assert len(lines[0]["caption"].split()) <= 5
    assert lines[1]["error"]["type"] == "/problems/unsupported-image"


def test_caption_errors_are_clear(store, tmp_path, capsys):
    status = main(["caption", str(tmp_path / "x.png"), "--store", str(tmp_path / "no-store")])
    err = capsys.readouterr().err
    assert status == 2 and "no-store does not exist" in err and "Traceback" not in err
    empty = tmp_path / "empty-store"
    empty.mkdir()
    assert main(["caption", str(tmp_path / "x.png"), "--store", str(empty)]) == 2
    assert "no captioner with alias 'production'" in capsys.readouterr().err
    status = main(["caption", str(tmp_path / "x.png"), "--store", str(store.root), "--model", "lightcap"])
    err = capsys.readouterr().err
    assert status == 2 and "lightcap" in err


def test_shards_are_disjoint_and_complete():
    paths = [f"dir/{i}.png" for i in range(500)]
    for n in (1, 3, 8):
        shards = [{p for p in paths if shard_of(p, n) == i} for i in range(n)]
        assert sum(len(s) for s in shards) == 500 and set().union(*shards) == set(paths)
    assert parse_shard("2/8") == (2, 8) and parse_shard(None) == (0, 1)
    for bad in ("8/8", "-1/2", "x", "1/0"):
        with pytest.raises(Exception, match="--shard"):
            parse_shard(bad)


def test_batch_shards_merge_to_the_single_process_output(store, folder, tmp_path, capsys):
    common = ["--store", store.root, "--batch-size", "1", "--beam-size", "1", "--max-length", "6"]
    status, _, err = run(capsys, "batch", folder, "--out", tmp_path / "all.jsonl", *common)
    assert status == 0 and "14 captioned, 1 failed" in err
    full = (tmp_path / "all.jsonl").read_text()
    paths = [json.loads(x)["path"] for x in full.splitlines()]
    assert paths == list_images(folder) == sorted(paths) and "dataset.json" not in paths
    for i in range(3):
        assert run(capsys, "batch", folder, "--out", tmp_path / f"s{i}.jsonl", "--shard", f"{i}/3", *common)[0] == 0
    shard_sizes = [len((tmp_path / f"s{i}.jsonl").read_text().splitlines()) for i in range(3)]
    assert sum(shard_sizes) == 15 and all(shard_sizes)
    shards = [tmp_path / f"s{i}.jsonl" for i in (2, 0, 1)]
    status, _, err = run(capsys, "batch-merge", tmp_path / "merged.jsonl", *shards, "--dir", folder)
    assert status == 0 and "15 results from 3 shard file(s)" in err
    assert (tmp_path / "merged.jsonl").read_text() == full  # byte for byte what one process wrote

    # a missing shard is noticed, a torn shard and conflicting duplicates are refused
    assert main(["batch-merge", str(tmp_path / "m2.jsonl"), str(shards[0]), "--dir", str(folder)]) == 2
    assert "in no shard" in capsys.readouterr().err
    torn = tmp_path / "torn.jsonl"
    torn.write_text(shards[0].read_text() + '{"path": "x')
    assert main(["batch-merge", str(tmp_path / "m3.jsonl"), str(torn)]) == 2
    assert "last line is incomplete" in capsys.readouterr().err
    line = json.loads(shards[0].read_text().splitlines()[0])
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({**line, "caption": "something else"}) + "\n")
    assert main(["batch-merge", str(tmp_path / "m4.jsonl"), str(shards[0]), str(other)]) == 2
    assert "different result" in capsys.readouterr().err


def test_batch_resumes_after_a_kill(store, folder, tmp_path, capsys):
    common = ["--store", store.root, "--batch-size", "1", "--beam-size", "1", "--max-length", "6"]
    out = tmp_path / "out.jsonl"
    run(capsys, "batch", folder, "--out", out, *common)
    full = out.read_text()
    lines = full.splitlines(keepends=True)
    out.write_text("".join(lines[:6]) + lines[6][:17])  # killed while writing line 7
    status, _, err = run(capsys, "batch", folder, "--out", out, *common)
    assert status == 0 and "6 already there" in err and "8 captioned, 1 failed" in err
    assert out.read_text() == full  # nothing lost, nothing twice, same order
    assert len(read_results(out, repair=False)) == 15
    status, _, err = run(capsys, "batch", folder, "--out", out, *common, "--strict")
    assert status == 0 and "0 captioned, 0 failed, 15 already there" in err


def test_serve_caps_malloc_arenas_for_itself_and_its_workers(monkeypatch):
    import uvicorn

    from service import cli

    started = {}
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.update(kw, app=app))
    args = cli.argparse.Namespace(**{flag: None for flag in cli.SERVE_OPTIONS})
    assert cli.run_serve(args) == 0 and started["app"] == "service.app:create_app"
    assert os.environ["MALLOC_ARENA_MAX"] == str(cli.MALLOC_ARENAS)  # inherited by uvicorn's worker processes
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")  # the operator's setting wins
    assert cli.limit_malloc_arenas() == 4
