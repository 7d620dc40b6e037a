"""Container health check: exit 0 when the service answers ``GET /healthz`` with 200, else 1.

The image's ``HEALTHCHECK`` runs it (the slim base has no curl). Standard library only, so it starts in
milliseconds; the address comes from the service's own settings variables (``CAPTIONER_PORT``), and
``CAPTIONER_HEALTHCHECK_URL`` overrides it entirely.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def url_from_env(env: dict[str, str] | os._Environ = os.environ) -> str:
    if env.get("CAPTIONER_HEALTHCHECK_URL"):
        return env["CAPTIONER_HEALTHCHECK_URL"]
    port = env.get("CAPTIONER_PORT", "8000")
    return f"http://127.0.0.1:{port}/healthz"


def check(url: str, timeout: float = 4.0) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200, f"{url}: HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return False, f"{url}: HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"{url}: {getattr(exc, 'reason', exc)}"


def main() -> int:
    ok, message = check(url_from_env())
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
