import subprocess
import sys

import pytest

from captioning.config import apply_overrides, load_config, parse_override
from captioning.errors import ConfigError


def test_override_parsing_types():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=0.5") == (["a"], 0.5)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("name=lstm") == (["name"], "lstm")


def test_override_rejects_unknown_key():
    with pytest.raises(ConfigError, match="unknown key a.c"):
        apply_overrides({"a": {"b": 1}}, ["a.c=2"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])
    assert apply_overrides({"a": {"b": 1}}, ["a.b=2"]) == {"a": {"b": 2}}


def test_unknown_profile_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="no profile 'huge'"):
        load_config("ucm", "huge")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="bad.yaml: top level must be a mapping"):
        load_config("ucm", "tiny", path=bad)


def test_cli_help_lists_commands():
    out = subprocess.run(
        [sys.executable, "-m", "captioning.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "captioner" in out


def test_the_command_line_imports_only_the_chosen_training_module():
    """Parsing the command line imports no training module, no torch: `captioner serve` and `captioner store`
    carry none of training's imports; a training target's module is imported when it runs and parses its own
    arguments, top-level flags kept."""
    probe = (
        "import sys\nfrom captioning.cli import build_parser\nparser = build_parser()\n"
        "args = parser.parse_args(['-v', 'train', 'ucm-text-ae', '--data', 'd', '--seed', '3'])\n"
        "from training.cli import TABLES\n"
        "modules = {module for table in TABLES.values() for module, _ in table.values()}\n"
        "print(sorted(modules & set(sys.modules)), len(modules), 'torch' in sys.modules)\n"
        "print(args.target, args.deferred_args, args.verbose)\n"
    )
    lines = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.splitlines()
    assert lines == ["[] 14 False", "ucm-text-ae ['--data', 'd', '--seed', '3'] True"]

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "captioning.cli", *argv], capture_output=True, text=True)

    shown = run("train", "ucm-text-ae", "--help")
    assert shown.returncode == 0 and shown.stdout.startswith("usage: captioner train ucm-text-ae") and "--data" in shown.stdout
    bad = run("eval", "ucm-classifier", "--data", "d", "--no-such-flag")
    assert bad.returncode == 2 and "captioner eval ucm-classifier: error" in bad.stderr and "--no-such-flag" in bad.stderr
    unknown = run("serve", "--no-such-flag")  # a command that parses its own words still refuses an unknown one
    assert unknown.returncode == 2 and "unrecognized arguments: --no-such-flag" in unknown.stderr


def test_a_training_target_runs_with_its_own_parsed_arguments(monkeypatch):
    import argparse
    import types

    from training import cli as training_cli

    seen = {}
    module = types.SimpleNamespace(
        add_arguments=lambda parser: parser.add_argument("--data", required=True),
        run=lambda args: seen.update(vars(args)) or 0,
    )
    monkeypatch.setitem(sys.modules, "training.fake_stage", module)
    monkeypatch.setitem(training_cli.STAGES, "fake", ("training.fake_stage", "a stage"))
    args = argparse.Namespace(command="train", target="fake", verbose=True, deferred_args=["--data", "x"])
    assert training_cli._run_target("train", "fake", args) == 0
    assert seen == {"data": "x", "command": "train", "target": "fake", "verbose": True}
