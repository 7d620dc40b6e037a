"""`captioner experiment ucm-distill-lr` end to end on a very small dataset (tiny sizes, 2 epochs a stage)."""

import json

import pytest
from test_ucm_stages import small, write_dataset

from captioning.cli import main
from captioning.store import ModelStore
from training.experiments.ucm_distill_lr import END, START, write_block


def test_write_block_replaces_only_the_marked_block(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n{START}\nold\n{END}\noutro\n")
    write_block(doc, "| new |\n")
    assert doc.read_text() == f"intro\n{START}\n| new |\n{END}\noutro\n"
    fresh = tmp_path / "fresh.md"
    fresh.write_text("# Title\n")
    write_block(fresh, "| t |\n")
    assert fresh.read_text() == f"# Title\n\n{START}\n| t |\n{END}\n"


@pytest.mark.slow  # nine small training runs: about a minute on 2 cores
def test_distill_lr_experiment_writes_one_table(tmp_path, capsys):
    data = write_dataset(tmp_path / "data", per_class=4, classes=8)
    doc = tmp_path / "ucm.md"
    doc.write_text(f"# UCM\n\nbefore\n\n{START}\nold table\n{END}\n\nafter\n")
    work = tmp_path / "work"
    argv = ["experiment", "ucm-distill-lr", "--data", str(data), "--work-dir", str(work), "--doc", str(doc),
            "--attention-dim", "6", *small()]
    assert main(argv) == 0
    printed = capsys.readouterr().out  # the stages' JSON summaries, then the table
    table = printed[printed.index("Data: ") :]
    for label in ("text encoder frozen", "text lr = image lr |", "text lr = image lr / 100", "attention decoder",
                  "nearest-neighbour baseline", "greedy, no guard (seed)", "beam 3 + repeat guard"):
        assert label in table, label
    text = doc.read_text()
    assert "old table" not in text and text.startswith("# UCM\n\nbefore") and text.endswith("after\n")
    assert table.strip().splitlines()[-1] in text

    results = json.loads((work / "results.json").read_text())
    store = ModelStore(work / "store")
    assert store.verify() == []
    assert [v.version for v in store.list("ucm-distill")] == [1, 2, 3]
    ratios = [store.resolve(f"ucm-distill@{v}").manifest["config"]["distill"]["text_lr_ratio"] for v in (1, 2, 3)]
    assert ratios == [0.01, 0.0, 1.0]  # the default recipe runs first
    assert results["variants"]["frozen"]["text_code_drift"] == 0.0  # frozen really is frozen
    assert results["variants"]["same"]["text_code_drift"] > results["variants"]["lower100"]["text_code_drift"] > 0
    command = store.resolve("ucm-distill@3").manifest["command"]
    assert command.startswith("captioner train ucm-distill") and "distill.text_lr_ratio=1.0" in command
    attention = store.resolve(results["attention"]["captioner"]).manifest["config"]["captioner"]["attention_dim"]
    assert attention == 6
    guarded = [r for r in results["decoding"]["lower100"] if r["options"]["max_repeat_run"] == 2]
    assert guarded and all(r["triple_repeat"] == 0.0 for r in guarded)

    # cached: a second run trains nothing new and prints the same table
    assert main(argv) == 0
    assert capsys.readouterr().out == table
    assert len(results["decoding"]["attention"]) == len(results["decoding"]["lower100"])
    assert len(store.list("ucm-captioner")) == 5
    assert results["early"]["epochs"] == 1 and "under-trained" in table


def test_prereq_store_copy_keeps_files_and_records(tmp_path):
    from training.experiments.ucm_distill_lr import copy_version

    source_dir = tmp_path / "files"
    source_dir.mkdir()
    (source_dir / "model.safetensors").write_bytes(b"weights")
    (source_dir / "vocab.json").write_text("{}")
    source, target = ModelStore(tmp_path / "a"), ModelStore(tmp_path / "b")
    source.publish("ucm-text-ae", source_dir, task="ucm-text-ae", profile="tiny", metrics={"test_bleu4": 0.99},
                   config={"profile": "tiny"}, command="captioner train ucm-text-ae --data d", data={"name": "d"},
                   parents=[])
    copied = copy_version(source, target, "ucm-text-ae", "tiny")
    assert copied.spec == "ucm-text-ae@1" and target.verify() == []
    assert copied.manifest["files"] == source.resolve("ucm-text-ae@1").manifest["files"]
    assert copied.manifest["command"] == "captioner train ucm-text-ae --data d"
    assert copied.manifest["extra"]["copied_from"].endswith(":ucm-text-ae@1")
    with pytest.raises(Exception, match="no ucm-classifier model of profile 'tiny'"):
        copy_version(source, target, "ucm-classifier", "tiny")
