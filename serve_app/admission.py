"""Who may send what, now: API keys, their expiry, and per-key quotas and in-flight limits.

Keys are stored as SHA-256 digests and compared with `hmac.compare_digest` against every
configured digest, so neither the lookup nor its timing reveals which key was close. The key
list is swapped whole by `set_keys` when Serve hands the router a new user_config.

A request is charged on admission with an estimate (one request, its estimated tokens, one
in-flight slot) and corrected when it was served: real tokens above the estimate are charged
too (up to what is left in the window: a quota cannot go below zero), tokens below it are not
refunded, as OpenAI counts max_tokens against its own token limits. Counters live in the
`QuotaStore` (memory, or Redis shared by every router replica).
"""

from __future__ import annotations

import dataclasses
import hmac
import math
import time

from limits import RateLimitItemPerMinute as _LimitsPerMinute

from serve_app.config import ApiKeyConfig, hash_key
from serve_app.errors import Forbidden, RateLimited, RequestTooLarge, Unauthorized
from serve_app.quota_store import Limiters, MemorySlots, QuotaStore, RedisSlots


class RateLimitItemPerMinute(_LimitsPerMinute):
    """A per-minute limit whose counter is named by the key alone. `limits` puts the amount in the
    counter's name, so a changed quota would start a fresh window (a way to reset one) and two
    entries of one name with different limits would count apart; here one name is one counter."""

    def key_for(self, *identifiers: str) -> str:
        return "/".join([self.namespace, *identifiers, self.GRANULARITY.name])


@dataclasses.dataclass(frozen=True)
class Principal:
    name: str
    admin: bool
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    models: frozenset[str] | None = None  # as configured: names or aliases
    max_concurrent_requests: int | None = None

    @classmethod
    def of(cls, key: ApiKeyConfig) -> "Principal":
        return cls(key.name, key.admin, key.requests_per_minute, key.tokens_per_minute,
                   None if key.models is None else frozenset(key.models), key.max_concurrent_requests)


@dataclasses.dataclass
class Reservation:
    """What admission charged for one request, so its end can correct and release it."""

    principal: Principal
    estimate: int
    slot: tuple[MemorySlots | RedisSlots, str] | None = None
    settled: bool = False


class Admission:
    def __init__(self, keys: list[ApiKeyConfig], store: QuotaStore | None = None) -> None:
        self.store = store or QuotaStore()
        self.set_keys(keys)

    def set_keys(self, keys: list[ApiKeyConfig]) -> None:
        """Replace the key list (one assignment: a request sees the old list or the new one).
        Counters stay: they are per key name, so a rotated key keeps its budget and usage."""
        self._keys = tuple(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def authenticate(self, authorization: str | None) -> Principal | None:
        """None when no keys are configured (open gateway); else the key's principal or 401."""
        keys = self._keys
        if not keys:
            return None
        scheme, _, secret = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        digest = hash_key(secret.strip())
        found = None
        for key in keys:  # no early exit: same work whichever key matches
            if hmac.compare_digest(key.sha256, digest):
                found = key
        if found is None:
            raise Unauthorized("invalid API key")
        if found.expired(time.time()):
            raise Unauthorized(f"API key expired at {found.expires_at.isoformat()}")
        return Principal.of(found)

    def principal_named(self, name: str) -> Principal | None:
        """The principal of the key called `name` now (batch lines run as their owner's key, which
        is stored by name, never as the key). None with keys off; 401 if it was removed or expired."""
        keys = self._keys
        if not keys:
            return None
        found = next((k for k in keys if k.name == name), None)
        if found is None:
            raise Unauthorized(f"API key '{name}' that owns this batch no longer exists")
        if found.expired(time.time()):
            raise Unauthorized(f"API key '{name}' that owns this batch expired at {found.expires_at.isoformat()}")
        return Principal.of(found)

    @staticmethod
    def require_admin(principal: Principal | None, enabled: bool) -> None:
        if enabled and (principal is None or not principal.admin):
            raise Forbidden("this endpoint needs an admin API key")

    def admit(self, principal: Principal | None, tokens: int) -> Reservation | None:
        """Take an in-flight slot, then charge one request and `tokens` (estimated), or raise 429."""
        if principal is None:
            return None
        if principal.tokens_per_minute and tokens > principal.tokens_per_minute:
            raise RequestTooLarge(
                f"this request is estimated at {tokens} tokens, over the key's whole quota of "
                f"{principal.tokens_per_minute} tokens per minute: it cannot pass; send less (or lower max_tokens)",
            )
        res = Reservation(principal, tokens)
        limit = principal.max_concurrent_requests
        if limit:
            slots, token = self.store.run("admit", lambda lim: (lim.slots, lim.slots.acquire(principal.name, limit)))
            if token is None:
                raise RateLimited(f"key '{principal.name}' already has {limit} requests in flight", retry_after=1)
            res.slot = (slots, token)
        try:
            self.store.run("admit", lambda lim: _charge(lim, principal, tokens))
        except RateLimited:
            self.release(res)
            raise
        return res

    def settle(self, res: Reservation | None, used_tokens: int) -> None:
        """Charge the real tokens the estimate missed (once per request)."""
        if res is None or res.settled:
            return
        res.settled = True
        p, shortfall = res.principal, used_tokens - res.estimate
        if not p.tokens_per_minute or shortfall <= 0:
            return
        item = RateLimitItemPerMinute(p.tokens_per_minute)

        def charge(lim: Limiters) -> None:
            left = lim.tokens.get_window_stats(item, "tokens", p.name).remaining
            if left > 0:
                lim.tokens.hit(item, "tokens", p.name, cost=min(shortfall, left))

        self.store.run("settle", charge)

    def release(self, res: Reservation | None) -> None:
        """Give the in-flight slot back (the response ended, however it ended)."""
        if res is None or res.slot is None:
            return
        (slots, token), res.slot = res.slot, None
        self.store.quietly("release", lambda: slots.release(res.principal.name, token))


def _charge(lim: Limiters, principal: Principal, tokens: int) -> None:
    """One round trip per check: a hit is an atomic test-and-charge, so only the checks after
    the first are tested beforehand (a request refused by any of them charges nothing)."""
    checks = []
    if principal.requests_per_minute:
        checks.append((lim.requests, RateLimitItemPerMinute(principal.requests_per_minute), "requests", 1))
    if principal.tokens_per_minute and tokens:
        checks.append((lim.tokens, RateLimitItemPerMinute(principal.tokens_per_minute), "tokens", tokens))
    for i, (limiter, item, kind, cost) in enumerate(checks):
        if i == 0 or limiter.test(item, kind, principal.name, cost=cost):
            continue
        _refuse(limiter, item, kind, principal.name)
    for limiter, item, kind, cost in checks:
        if not limiter.hit(item, kind, principal.name, cost=cost):  # used up, or another router took the rest
            _refuse(limiter, item, kind, principal.name)


def _refuse(limiter, item, kind: str, name: str) -> None:
    reset = limiter.get_window_stats(item, kind, name).reset_time
    raise RateLimited(f"{kind} per minute quota of key '{name}' is used up", retry_after=max(1, math.ceil(reset - time.time())))


def estimate_tokens(*texts: str) -> int:
    """Cheap, tokenizer-free estimate for quotas (~4 characters per token for English)."""
    return sum(math.ceil(len(t) / 4) for t in texts)
