"""`python -m serve_app trace ID`: a request's story (GET /v1/requests/{id}) for a person, and its
log lines from every node in time order.

The log lines come through Ray's log API (`ray.util.state`: the dashboard asks each node's agent
for its Serve log files), so an operator on a machine of the cluster sees lines of every node. Its
log calls take the cluster's address (`auto`, or the GCS's host:port; RAY_ADDRESS wins), not the
dashboard's URL. Where no dashboard answers (a cluster started without one, as the test cluster
is), the files of this machine's Ray session are read instead, and the output says so.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import pathlib
import re
from collections.abc import Iterable, Iterator
from typing import Any

_TIME = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d[,.]\d{3}")
LOCAL_SESSION = pathlib.Path("/tmp/ray/session_latest/logs")


@dataclasses.dataclass(frozen=True)
class LogLine:
    at: str  # the line's own timestamp ("" when it has none): the sort key
    node: str
    file: str
    text: str


def log_lines(request_id: str, address: str = "auto", local_only: bool = False) -> tuple[list[LogLine], str]:
    """Every Serve log line naming `request_id`, oldest first, and where they were read from.
    `local_only`: this machine's files, without asking Ray (whose client retries an address that
    does not answer for about 40 s)."""
    if local_only:
        return sorted(_from_files(request_id, LOCAL_SESSION), key=lambda line: line.at), f"this machine's Ray session logs ({LOCAL_SESSION})"
    try:
        found = list(_from_log_api(request_id, address))
        where = f"Ray's log API (cluster {address}), every node"
    except Exception as err:  # noqa: BLE001 - no dashboard: this machine's files still tell most of it
        found = list(_from_files(request_id, LOCAL_SESSION))
        where = f"this machine's Ray session logs ({LOCAL_SESSION}); Ray's log API (cluster {address}) did not answer: " \
                f"{type(err).__name__}: {str(err)[:160]}"
    return sorted(found, key=lambda line: line.at), where


def _from_log_api(request_id: str, address: str) -> Iterator[LogLine]:
    from ray.util.state import get_log, list_logs, list_nodes

    for node in list_nodes(address=address, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False):
        files = list_logs(address=address, node_id=node.node_id, glob_filter="serve/*.log")
        for name in (f for group in files.values() for f in group):
            path = name if name.startswith("serve/") else f"serve/{name}"
            chunks = get_log(address=address, node_id=node.node_id, filename=path, tail=-1)
            yield from matching(request_id, _lines(chunks), node.node_ip or node.node_id, path)


def _from_files(request_id: str, logs: pathlib.Path) -> Iterator[LogLine]:
    for path in sorted((logs / "serve").glob("*.log")):
        with path.open(errors="replace") as f:
            yield from matching(request_id, f, "this machine", f"serve/{path.name}")


def _lines(chunks: Iterable[str]) -> Iterator[str]:
    """get_log yields chunks that need not end at line ends."""
    rest = ""
    for chunk in chunks:
        rest += chunk
        *whole, rest = rest.split("\n")
        yield from whole
    if rest:
        yield rest


def matching(request_id: str, lines: Iterable[str], node: str, file: str) -> Iterator[LogLine]:
    """Lines that carry the id: as Serve's JSON `request_id` field, or anywhere in a text line."""
    for raw in lines:
        if request_id not in raw:
            continue
        line = raw.rstrip("\n")
        at = ""
        try:
            record = json.loads(line)
            if isinstance(record, dict):
                if record.get("request_id") != request_id and request_id not in str(record.get("message", "")):
                    continue
                at = str(record.get("asctime") or "")
        except ValueError:
            pass
        if not at:
            stamp = _TIME.search(line)
            at = stamp.group(0) if stamp else ""
        yield LogLine(at.replace("T", " ").replace(".", ","), node, file, line)


def render(story: dict[str, Any], logs: list[LogLine] | None = None, where: str = "") -> str:
    """The story as a person reads it: what happened, in order, then the log lines."""
    head = f"request {story['id']}  {story['method']} {story['path']}"
    if story.get("duration_ms") is None:
        out = [f"{head}  (still running)"]
    else:
        out = [f"{head}  -> {story['status']} ({story['outcome']}) in {story['duration_ms']} ms"]
    router = story.get("router") or {}
    out.append(f"  arrived   {_when(story['arrived_at'])} at router replica {router.get('replica_id')} "
               f"on node {router.get('node_ip')} ({router.get('node_id')})")
    out.append(f"  key       {story.get('key') or '-'}{'  (a batch line)' if story.get('batch') else ''}")
    adm = story.get("admission")
    if adm:
        out.append(f"  admission {adm['decision']} (estimated {adm.get('estimated_tokens')} tokens)"
                   + (f": {adm.get('reason')}" if adm["decision"] != "admitted" else ""))
    if story.get("routing"):
        r = story["routing"]
        out.append(f"  routing   replica {r['replica']}, predicted {r['predicted_cached_tokens']} of {r['prompt_tokens']} "
                   "prompt tokens cached")
    for i, a in enumerate(story.get("attempts") or [], 1):
        where_ = f"replica {a.get('replica') or '?'} on {a.get('node_ip') or a.get('node_id') or '?'}"
        tail = f": {a['error']}" if a.get("error") else ""
        out.append(f"  attempt {i} {a['model']} {where_} at +{a['at_ms']} ms for {a['duration_ms']} ms -> {a['outcome']}{tail}")
    for m in story.get("migrations") or []:
        to = f" on replica {m['to_replica']}" if m.get("to_replica") else ""
        out.append(f"  migration replica {m.get('lost_replica')} lost at completion token {m.get('at_token')}: "
                   f"{m['outcome']}{to} ({m.get('reason')})")
    if story.get("retries") or story.get("fallbacks"):
        out.append(f"  retries   {story.get('retries', 0)}; fallbacks: {', '.join(story.get('fallbacks') or []) or '-'}")
    if story.get("first_token_ms") is not None:
        out.append(f"  first token after {story['first_token_ms']} ms")
    if story.get("engine"):
        e = story["engine"]
        out.append(f"  engine    queued {e.get('queued_ms')} ms, prefill {e.get('prefill_ms')} ms, decode {e.get('decode_ms')} ms, "
                   f"{e.get('cached_tokens')} of {e.get('prompt_tokens')} prompt tokens cached, "
                   f"{e.get('generated_tokens')} generated, finish {e.get('finish_reason')}, preemptions {e.get('preemptions')}")
    if story.get("usage"):
        u = story["usage"]
        out.append(f"  usage     {story.get('model')}: {u['prompt_tokens']} prompt + {u['completion_tokens']} completion tokens")
    if story.get("error"):
        err = story["error"]
        out.append(f"  error     {err['status']} {err.get('code') or err.get('type')}: {err['message']}")
    if story.get("earlier"):
        out.append(f"  ({len(story['earlier'])} earlier request(s) used the same id: --json shows them)")
    if logs is not None:
        out.append(f"log lines ({len(logs)}, from {where}):")
        out += [f"  {line.node} {line.file}: {line.text}" for line in logs]
    return "\n".join(out)


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"
