"""What the tests start on this machine: free loopback ports, an ASGI app served by uvicorn in a
thread, and the rule for a missing system tool (redis-server, PostgreSQL, Chromium, promtool).

Under `make test` (and so `.ci/run`) REQUIRE_TEST_TOOLS=1: scripts/install.sh installs those tools,
so one still missing is a failure, never a silent skip. Run by hand without it, a test that needs
a missing tool skips and says how to get it.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

import pytest

REQUIRED = os.environ.get("REQUIRE_TEST_TOOLS") == "1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_tool(reason: str) -> None:
    """Fail (under `make test`) or skip (by hand) a test whose real tool is not here."""
    if REQUIRED:
        pytest.fail(f"{reason} (REQUIRE_TEST_TOOLS=1: `make test` needs it)", pytrace=False)
    pytest.skip(reason)


def needs(present: bool, reason: str) -> pytest.MarkDecorator:
    """A marker for tests that need a tool: skipped by hand, failed under `make test`."""
    return pytest.mark.skipif(not present and not REQUIRED, reason=reason)


def require(present: bool, reason: str) -> None:
    """Inside a test guarded by `needs`: under `make test` a missing tool fails it here."""
    if not present:
        missing_tool(reason)


class ThreadedServer:
    """An ASGI app on a free loopback port, uvicorn in a daemon thread; `close()` stops it."""

    def __init__(self, app: Any, log_level: str = "warning") -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level=log_level))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError(f"uvicorn did not start on port {self.port} within 10 s")
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
