"""Admin shapes: the query of `GET /v1/usage` and its answer.

Query parameters are as strict as bodies: unknown or repeated ones are 400s naming the parameter.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
from collections.abc import Iterable
from typing import Any

from serve_app.errors import InvalidRequest

DEFAULT_RANGE_S = 86_400  # no `since`: the last 24 hours
MAX_RANGE_S = 400 * 86_400
LATEST = 253_402_300_799  # 9999-12-31T23:59:59Z, the last time datetime can write
_UNIX = re.compile(r"-?\d{1,20}(\.\d{1,9})?")


@dataclasses.dataclass(frozen=True)
class UsageQuery:
    since: float
    until: float
    key: str | None


def strict_query(params: Iterable[tuple[str, str]], route: str, allowed: tuple[str, ...]) -> dict[str, str]:
    """Query parameters as strict as bodies: an unknown or repeated one is a 400 naming it."""
    takes = ", ".join(allowed[:-1]) + f" and {allowed[-1]}" if len(allowed) > 1 else allowed[0]
    values: dict[str, str] = {}
    for name, value in params:
        if name not in allowed:
            raise InvalidRequest(f"unknown query parameter '{name}'; {route} takes {takes}", name)
        if name in values:
            raise InvalidRequest(f"query parameter '{name}' given more than once", name)
        values[name] = value
    return values


def usage_query(params: Iterable[tuple[str, str]], now: float) -> UsageQuery:
    values = strict_query(params, "/v1/usage", ("since", "until", "key"))
    until = _time("until", values["until"]) if "until" in values else now
    since = _time("since", values["since"]) if "since" in values else until - DEFAULT_RANGE_S
    if since > until:
        raise InvalidRequest("'since' is after 'until'", "since")
    if until - since > MAX_RANGE_S:
        raise InvalidRequest(f"the range is longer than {MAX_RANGE_S // 86_400} days; ask in parts", "since")
    return UsageQuery(since, until, values.get("key"))


def _time(name: str, raw: str) -> float:
    """ISO 8601 (UTC when no offset is given) or unix seconds."""
    try:
        if _UNIX.fullmatch(raw):
            t = float(raw)
        else:
            dt = datetime.datetime.fromisoformat(raw)
            t = (dt if dt.tzinfo else dt.replace(tzinfo=datetime.timezone.utc)).timestamp()
    except (ValueError, OverflowError, OSError):
        t = -1.0
    if not 0 <= t <= LATEST:
        raise InvalidRequest(f"'{name}' must be an ISO 8601 time or unix seconds between 1970 and 9999", name)
    return t


def usage_response(q: UsageQuery, rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "usage", "since": _iso(q.since), "until": _iso(q.until), "key": q.key,
            "resolution_s": 3600, "data": rows}


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat().replace("+00:00", "Z")
