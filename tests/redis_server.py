"""A real, throw-away `redis-server` on a free loopback port, in a temp dir, for tests.

`.ci/run` (through scripts/install.sh) installs the Debian package when it is missing; where it
still is, `make test` fails and a run by hand skips (tests/local_servers.py).
"""

from __future__ import annotations

import pathlib
import shutil
import socket
import subprocess
import tempfile
import time

from tests.local_servers import free_port, missing_tool

BINARY = shutil.which("redis-server") or ("/usr/bin/redis-server" if pathlib.Path("/usr/bin/redis-server").exists() else None)


class RedisServer:
    def __init__(self) -> None:
        if BINARY is None:
            missing_tool("redis-server is not installed (apt-get install -y redis-server; scripts/install.sh does it as root)")
        self.dir = tempfile.mkdtemp(prefix="redis-test-")
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (again, on the same port: a restarted store)."""
        self.proc = subprocess.Popen(
            [BINARY, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir, "--save", "",
             "--appendonly", "no", "--protected-mode", "yes", "--enable-debug-command", "local"],  # DEBUG SLEEP: a slow Redis
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within 10 s")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
