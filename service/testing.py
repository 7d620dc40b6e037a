"""Running the real app on a loopback port, for tests and the benchmark.

* :class:`LiveServer`: uvicorn in a background thread of this process (``with LiveServer(app) as url``);
* :class:`ServerProcess`: ``captioner serve`` in a child process (restart / kill / graceful-shutdown tests,
  and the benchmark, which measures the server's own memory).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn


class LiveServer:
    def __init__(self, app, *, host: str = "127.0.0.1", graceful_timeout: float = 10.0):
        config = uvicorn.Config(
            app, host=host, port=0, log_level="warning", lifespan="on", timeout_graceful_shutdown=graceful_timeout,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="live-server", daemon=True)
        self.url = ""

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread exited during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not start within 60 s")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_ready(url: str, timeout: float = 120.0, headers: dict | None = None) -> dict:
    """Poll ``/readyz`` until 200; -> its body. Raises with the last answer on timeout."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/readyz", timeout=5, headers=headers)
            if r.status_code == 200:
                return r.json()
            last = r.text
        except httpx.TransportError as exc:
            last = repr(exc)
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout} s: {last}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m captioning.cli serve`` with ``env`` (CAPTIONER_* settings) on a free loopback port."""

    def __init__(self, env: dict[str, str], *, log_path: Path | None = None, cwd: Path | None = None):
        self.port = free_port()
        self.env = {**os.environ, **env, "CAPTIONER_HOST": "127.0.0.1", "CAPTIONER_PORT": str(self.port)}
        self.log_path = log_path
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, ready_timeout: float = 180.0) -> ServerProcess:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "captioning.cli", "serve"], env=self.env, stdout=out, stderr=subprocess.STDOUT,
            cwd=self.cwd,
        )
        try:
            wait_ready(self.url, ready_timeout)
        except TimeoutError:
            self.kill()
            raise
        return self

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM (graceful: drains) and wait; -> exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: no drain, no cleanup (a crash)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                self.terminate(30)
            except subprocess.TimeoutExpired:
                self.kill()
