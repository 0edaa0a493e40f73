"""Sending alerts, off every serving path: one daemon thread drains a bounded queue, each
attempt has a timeout, and a failure is logged and counted, never retried into a storm.

A generic JSON webhook is a plain POST (the alert dict as the body); Slack, Teams, DingTalk,
Feishu/Lark, WeCom, email and the rest go through Apprise (its own URL schemes and timeouts),
not through hand-written clients.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import urllib.request
from typing import Any

from serve_app.alerts.config import AlertTarget

logger = logging.getLogger("ray.serve")
QUEUE_SIZE = 100  # a board that cannot deliver keeps at most this many messages, then drops


class AlertDelivery:
    def __init__(self, targets: list[AlertTarget], timeout_s: float) -> None:
        self.targets, self.timeout_s = targets, timeout_s
        self.stats = {"sent": 0, "failed": 0, "dropped": 0}
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(QUEUE_SIZE)
        self._thread = threading.Thread(target=self._run, name="alert-delivery", daemon=True)
        self._thread.start()

    def submit(self, message: dict[str, Any]) -> None:
        """Never blocks: a full queue drops the message (counted)."""
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            self.stats["dropped"] += 1
            logger.warning("alert dropped (delivery queue full): %s", message.get("text"))

    def close(self, timeout_s: float = 5.0) -> None:
        """Deliver what is queued (bounded by timeout_s), then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while (message := self._queue.get()) is not None:
            for target in self.targets:
                try:
                    (_post_json if target.kind == "webhook" else _apprise)(target.url, message, self.timeout_s)
                    self.stats["sent"] += 1
                except Exception as exc:  # noqa: BLE001 - a target's failure must not stop the others
                    self.stats["failed"] += 1
                    logger.warning("alert delivery to a %s target failed: %s: %s", target.kind, type(exc).__name__,
                                   str(exc)[:200])


def _post_json(url: str, message: dict[str, Any], timeout_s: float) -> None:
    body = json.dumps(message).encode()
    req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310 - operator-configured URL
        resp.read()


def _apprise(url: str, message: dict[str, Any], timeout_s: float) -> None:
    """Apprise bounds each call itself (per URL: `?cto=` connect and `?rto=` read timeouts, 4 s by
    default); timeout_s is for the webhook."""
    import apprise

    notifier = apprise.Apprise()
    if not notifier.add(url):
        raise ValueError("Apprise does not understand this URL (see the Apprise wiki for its schemes)")
    kind = apprise.NotifyType.SUCCESS if message["event"] == "recovery" else apprise.NotifyType.FAILURE
    title = message["text"].split(":", 1)[0]
    if not notifier.notify(body=message["text"], title=title, notify_type=kind):
        raise RuntimeError("Apprise reported a failed notification")
