"""Who may send what, now: API keys and per-key request/token quotas.

Keys are stored as SHA-256 digests and compared with `hmac.compare_digest` against every
configured digest, so neither the lookup nor its timing reveals which key was close. Quotas
use the `limits` library's moving window in this router replica's memory: with N router
replicas a key gets up to N times its quota (use `limits`' Redis storage for a global one).
"""

from __future__ import annotations

import dataclasses
import hmac
import math
import time

from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from serve_app.config import ApiKeyConfig, hash_key
from serve_app.errors import Forbidden, RateLimited, Unauthorized


@dataclasses.dataclass(frozen=True)
class Principal:
    name: str
    admin: bool
    requests_per_minute: int | None
    tokens_per_minute: int | None


class Admission:
    def __init__(self, keys: list[ApiKeyConfig]) -> None:
        self._keys = keys
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def authenticate(self, authorization: str | None) -> Principal | None:
        """None when no keys are configured (open gateway); else the key's principal or 401."""
        if not self._keys:
            return None
        scheme, _, secret = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        digest = hash_key(secret.strip())
        found = None
        for key in self._keys:  # no early exit: same work whichever key matches
            if hmac.compare_digest(key.sha256, digest):
                found = key
        if found is None:
            raise Unauthorized("invalid API key")
        return Principal(found.name, found.admin, found.requests_per_minute, found.tokens_per_minute)

    @staticmethod
    def require_admin(principal: Principal | None, enabled: bool) -> None:
        if enabled and (principal is None or not principal.admin):
            raise Forbidden("this endpoint needs an admin API key")

    def admit(self, principal: Principal | None, tokens: int) -> None:
        """Charge one request and `tokens` (estimated) against the key's quotas, or raise 429."""
        if principal is None:
            return
        checks = []
        if principal.requests_per_minute:
            checks.append((RateLimitItemPerMinute(principal.requests_per_minute), "requests", 1))
        if principal.tokens_per_minute:
            if tokens > principal.tokens_per_minute:
                raise RateLimited(
                    f"this request is estimated at {tokens} tokens, over the key's whole quota of "
                    f"{principal.tokens_per_minute} tokens per minute", retry_after=60,
                )
            checks.append((RateLimitItemPerMinute(principal.tokens_per_minute), "tokens", tokens))
        for item, kind, cost in checks:  # test all first, so a refused request charges nothing
            if not self._limiter.test(item, kind, principal.name, cost=cost):
                reset = self._limiter.get_window_stats(item, kind, principal.name).reset_time
                raise RateLimited(
                    f"{kind} per minute quota of key '{principal.name}' is used up",
                    retry_after=max(1, math.ceil(reset - time.time())),
                )
        for item, kind, cost in checks:
            self._limiter.hit(item, kind, principal.name, cost=cost)


def estimate_tokens(*texts: str) -> int:
    """Cheap, tokenizer-free estimate for quotas (~4 characters per token for English)."""
    return sum(math.ceil(len(t) / 4) for t in texts)
