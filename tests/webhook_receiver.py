"""A real HTTP server on loopback that records the JSON alerts posted to it (unit and e2e tests)."""

from __future__ import annotations

import http.server
import json
import threading
import time


class Receiver:
    """A real HTTP server on loopback that records every JSON body (optionally slow)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.bodies: list[dict] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                time.sleep(delay_s)
                outer.bodies.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
