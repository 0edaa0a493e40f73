"""Admission by tokens: an LLM's queue bound counts the prompt tokens waiting for their first token.

A request bound alone lets eight 30k-token prompts in as easily as eight short chats; the KV cache
and the time to first token feel the tokens. So each router replica counts, per model, the prompt
tokens of the requests it sent that have not yet had their first token (a stream) or their
answer (a whole reply), and reads what the replicas report as waiting from every router
(`prompt_tokens_waiting` in the cost-aware router's stats, 2 s fresh; models on Serve's default
router have only this router's count). A request that would take the larger of the two over the
model's `queued_tokens_bound` gets a 503 `model_overloaded` (the next model in its fallback chain
may take it) whose Retry-After is the time the excess needs to drain: at the replicas' reported
prefill rate when the count is theirs, else at the rate this router measured prompts leaving its
queue. One request counts at most half the bound, so a request bigger than the bound runs when
nothing waits (a long context is slow, never refused forever) and does not shut out everyone else
while it runs. Batch lines are not counted (the handler sends none): they run on spare capacity.
"""

from __future__ import annotations

import collections
import contextlib
import math
import time
from collections.abc import Callable, Iterator

from serve_app.errors import Overloaded

RATE_WINDOW_S = 30.0  # the drain rate counts prompts that left the queue this recently
MAX_RETRY_AFTER_S = 60
UNKNOWN_RATE_RETRY_S = 2  # no prompt left the queue in the window yet: a short, honest guess


class TokenQueue:
    def __init__(self, bounds: dict[str, int],
                 reported: Callable[[str], tuple[int, float] | None] = lambda model: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`reported(model)`: (prompt tokens waiting, prefill tokens/s) summed over its replicas'
        last reports, every router's requests included (None: no reports here)."""
        self.bounds, self.reported, self.clock = bounds, reported, clock
        self.waiting: collections.Counter[str] = collections.Counter()  # model -> prompt tokens (this router's)
        # model -> (when, prompt tokens drained, seconds the queue was not empty since the last such entry)
        self._drained: dict[str, collections.deque[tuple[float, int, float]]] = {}
        self._since: dict[str, float] = {}  # model -> when its queue was last seen not empty (absent: empty)

    def queued(self, model: str) -> int:
        """Prompt tokens waiting on the model: this router's, or every router's as its replicas last
        reported, whichever is more (the reports miss requests still queued at the handle)."""
        return self._queued(model)[0]

    def _queued(self, model: str) -> tuple[int, float]:
        """(tokens waiting, the rate they drain at)."""
        mine, reported = self.waiting[model], self.reported(model)
        if reported is not None and reported[0] > mine and reported[1] > 0:
            return reported[0], reported[1]
        return mine, self.drain_rate(model)

    def counted(self, model: str, tokens: int) -> int:
        """What one request weighs in the queue: its prompt, at most half the bound."""
        bound = self.bounds.get(model)
        return 0 if bound is None else min(tokens, max(1, bound // 2))

    def enter(self, model: str, tokens: int) -> None:
        bound = self.bounds.get(model)
        if bound is None:
            return
        queued, rate = self._queued(model)
        weight = self.counted(model, tokens)
        if queued and queued + weight > bound:
            excess = queued + weight - bound
            wait = math.ceil(excess / rate) if rate else UNKNOWN_RATE_RETRY_S
            raise Overloaded(
                f"model '{model}' has {queued:,} prompt tokens waiting for their first token; this request's "
                f"~{tokens:,} would pass its bound of {bound:,} (deployment.max_queued_tokens); retry later",
                retry_after=max(1, min(MAX_RETRY_AFTER_S, wait)))
        if not self.waiting[model]:
            self._since[model] = self.clock()
        self.waiting[model] += weight

    def leave(self, model: str, tokens: int, drained: bool) -> None:
        """The request's prompt left the queue: prefilled (`drained`, counted in the rate) or given up."""
        if model not in self.bounds:
            return
        now = self.clock()
        busy = now - self._since.get(model, now)
        self.waiting[model] -= self.counted(model, tokens)
        if self.waiting[model] <= 0:
            del self.waiting[model]
            self._since.pop(model, None)
        else:
            self._since[model] = now
        q = self._drained.setdefault(model, collections.deque())
        q.append((now, tokens if drained else 0, busy))
        while q and now - q[0][0] > RATE_WINDOW_S:
            q.popleft()

    @contextlib.contextmanager
    def held(self, model: str, tokens: int) -> Iterator[None]:
        """Waiting while the block runs (an attempt until its first token or answer); drained if it
        returned, given up if it raised."""
        self.enter(model, tokens)
        ok = False
        try:
            yield
            ok = True
        finally:
            self.leave(model, tokens, ok)

    def drain_rate(self, model: str) -> float:
        """Prompt tokens per second of a non-empty queue that left it prefilled, over the last
        RATE_WINDOW_S (0: none yet). Idle time does not dilute it: it is the rate a queue drains at."""
        now = self.clock()
        recent = [(n, busy) for t, n, busy in self._drained.get(model, ()) if now - t <= RATE_WINDOW_S]
        tokens, busy = sum(n for n, _ in recent), sum(b for _, b in recent)
        return tokens / busy if tokens and busy > 0 else 0.0

    def view(self, model: str) -> dict[str, float | int | None]:
        """For /v1/status: what this router counts, what the replicas report, the bound and the rate."""
        reported = self.reported(model)
        return {"waiting_prompt_tokens": self.waiting[model], "reported_prompt_tokens": reported[0] if reported else None,
                "bound": self.bounds.get(model), "drain_tokens_per_s": round(self.drain_rate(model), 1)}
