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
