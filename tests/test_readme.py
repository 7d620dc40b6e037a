"""The README's promises stay true: exactly two commands for a fresh machine, both real Makefile targets (CI
runs the second); every file the README links to exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_quick_start_has_exactly_the_two_commands_and_they_exist():
    section = README.split("## Quick start (fresh machine)")[1]
    block = section.split("```bash\n")[1].split("```")[0]
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["make serve", "make test"], commands
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^serve: setup\n\t\$\(VENV\)/bin/captioner serve$", makefile, re.M)
    assert re.search(r"^test: setup\n\t\$\(VENV\)/bin/pytest -q$", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_linked_files_exist():
    for target in re.findall(r"\]\(((?:docs|bench|model_store)/[^)#]+)\)", README):
        assert (ROOT / target).exists(), target
