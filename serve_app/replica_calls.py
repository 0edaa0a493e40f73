"""Awaiting replica calls: deadlines, cancellation, and Ray's failures turned into ours.

Ray's failures are translated here, at the call, not in middleware: Serve registers its own
Starlette handlers for `BackPressureError`/`DeploymentUnavailableError` on the ingress app,
which would otherwise answer first with a plain-text 503 and no `Retry-After`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from serve_app.errors import ApiError, GatewayTimeout, from_exception

T = TypeVar("T")


async def with_deadline(awaitable: Awaitable[T], timeout_s: float, cancel: Callable[[], Any] | None = None) -> T:
    """Past the deadline: 504, and the replica's work is cancelled. Ray errors become ApiErrors."""
    try:
        return await asyncio.wait_for(_as_coroutine(awaitable), timeout_s)
    except asyncio.TimeoutError:
        if cancel is not None:
            cancel()
        raise GatewayTimeout(f"the model did not answer within {timeout_s:g}s") from None
    except ApiError:
        raise
    except Exception as exc:  # noqa: BLE001 - mapped once, here
        raise from_exception(exc) from exc


async def gather_all(calls: list[Any]) -> list[Any]:
    """Await every call; if one fails (or we are cancelled), cancel the rest so no work leaks."""
    try:
        return await asyncio.gather(*calls)
    except BaseException:
        for call in calls:
            cancel = getattr(call, "cancel", None)
            if cancel is not None:
                cancel()
        raise


async def _as_coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable
