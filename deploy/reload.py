"""Ask a running captioning service to reload models (``POST /v1/models/{name}/reload``, an admin route).

    python /opt/captioner/reload.py [--url http://api:8000] [--wait 120] NAME [NAME ...]

The service swaps each named model to the version its serving alias points at now, without dropping
in-flight requests, and refuses a version that fails verification (the old one keeps serving). The
admin key comes from ``CAPTIONER_ADMIN_KEY``, the same variable the service reads. ``--wait`` first waits
for ``/readyz``. docker-compose's ``train`` profile runs this after training published; standard library
only, like the health check.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request


def _request(url: str, *, method: str = "GET", key: str | None = None, timeout: float = 60.0) -> tuple[int, str]:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def wait_ready(base: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if _request(f"{base}/readyz", timeout=5)[0] == 200:
                return True
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(1.0)


def reload(base: str, names: list[str], key: str | None) -> int:
    failures = 0
    for name in names:
        try:
            status, body = _request(f"{base}/v1/models/{name}/reload", method="POST", key=key)
        except (urllib.error.URLError, OSError) as exc:
            print(f"reload {name}: {base} unreachable ({getattr(exc, 'reason', exc)})", file=sys.stderr)
            failures += 1
            continue
        try:
            shown = json.dumps(json.loads(body), sort_keys=True)
        except ValueError:
            shown = body.strip()
        ok = 200 <= status < 300
        print(f"reload {name}: HTTP {status} {shown}", file=sys.stdout if ok else sys.stderr)
        failures += not ok
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="+", metavar="NAME", help="served model names to reload")
    parser.add_argument("--url", default=os.environ.get("CAPTIONER_URL", "http://127.0.0.1:8000"),
                        help="service base URL (default $CAPTIONER_URL or http://127.0.0.1:8000)")
    parser.add_argument("--wait", type=float, default=0.0, help="seconds to wait for /readyz first")
    args = parser.parse_args(argv)
    base = args.url.rstrip("/")
    if args.wait and not wait_ready(base, args.wait):
        print(f"reload: {base}/readyz not ready after {args.wait:.0f} s", file=sys.stderr)
        return 1
    return reload(base, args.names, os.environ.get("CAPTIONER_ADMIN_KEY") or None)


if __name__ == "__main__":
    sys.exit(main())
