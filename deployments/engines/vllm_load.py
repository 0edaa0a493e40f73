"""What an LLM replica tells the request router about itself, read from vLLM's own scheduler stats.

vLLM hands each stat logger the scheduler's numbers after every engine step (running and waiting
requests, KV-cache use, the prefix cache's queried and hit tokens of that step); this one keeps the
latest and sums the prefix counters, so the replica can report them through Serve's
`record_routing_stats` (serve_app/llm_routing/) and the status view can put vLLM's actual hit
rate beside the router's predicted one.

It also keeps vLLM's own timings of each finished request (queue wait, prefill, decode, cached
tokens, preemptions) for a little while, so the replica can hand them to the router for the
request's story (serve_app/stories.py) when it answers.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase


FINISHED_KEPT = 1024  # timings of finished requests nobody asked for (the probe's, aborted ones) age out
RATE_WINDOW_S = 60.0  # the prefill rate is measured over the engine's busy time in this window
TTFT_WINDOW_S = 15.0  # "recent": the time to first token and the prefill demand
MAX_STEP_S = 5.0  # one engine step is never longer than this: a longer gap was not all work


class EngineLoad(StatLoggerBase):
    """One per engine; vLLM calls `record` on the engine's output loop, the replica reads `snapshot`."""

    def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
        self.cache = vllm_config.cache_config
        self.running = self.waiting = 0
        self.kv_usage = 0.0
        self.prefix_queries = self.prefix_hits = 0
        self._lock = threading.Lock()
        self._work: collections.deque[tuple[float, int, float]] = collections.deque()  # (at, prompt tokens computed, busy s)
        self._ttfts: collections.deque[tuple[float, float]] = collections.deque()  # (at, engine TTFT s)
        self._prefilled: collections.deque[tuple[float, int]] = collections.deque()  # (at, prompt tokens computed)
        self._first_step: float | None = None
        self._last_step: float | None = None
        self._had_work = False  # the last step left requests in the scheduler: the time since was work
        # monotonic: the last engine step that ran requests besides the replica's own health probes
        # (the health check's progress); `probing` counts the probes in the engine now
        self.stepped_at: float | None = None
        self.probing = 0
        self.finished: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0) -> None:
        # Progress: a step with running requests other than the probe's. Not any step: vLLM steps
        # (with stats) every ~1 ms while requests only wait (a grammar compiling, remote KV), and
        # the probe's own steps would hide a stuck request behind a passing probe.
        if scheduler_stats is not None and scheduler_stats.num_running_reqs > self.probing:
            self.stepped_at = time.monotonic()
        for done in getattr(iteration_stats, "finished_requests", None) or ():
            self._finished(done)
        # vLLM makes iteration stats only for steps with outputs: a prefill chunk's step has none
        now = float(getattr(iteration_stats, "iteration_timestamp", 0.0) or 0.0) or time.time()
        self._step(now, iteration_stats)
        if scheduler_stats is None:
            return
        with self._lock:
            self.running, self.waiting = scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs
            self._had_work = self.running + self.waiting > 0
            self.kv_usage = float(scheduler_stats.kv_cache_usage)
            prefix = scheduler_stats.prefix_cache_stats
            if prefix is not None:  # per-step deltas (vLLM resets them each step): summed here
                self.prefix_queries += prefix.queries
                self.prefix_hits += prefix.hits

    def _step(self, now: float, it: Any) -> None:
        """Prompt tokens computed per second of the engine's time spent prefilling (the rate a
        prefill queue drains at: the autoscaler's drain time, serve_app/autoscaling/policy.py), and
        engine-side TTFTs. A step's time counts from the last step while the scheduler held work
        (a step after idle is not measured: its start is unknown here); a step without outputs (a
        chunk of a long prefill) is all prefill, one with outputs is split by its tokens: prompt
        tokens computed vs tokens generated. vLLM reports a prefill's tokens at its last chunk."""
        prompt = getattr(it, "prompt_token_stats", None)
        computed = int(getattr(prompt, "computed", 0) or 0)
        generated = int(getattr(it, "num_generation_tokens", 0) or 0)
        share = 1.0 if it is None else (computed / (computed + generated) if computed + generated else 0.0)
        with self._lock:
            busy = min(MAX_STEP_S, max(0.0, now - self._last_step)) if self._had_work and self._last_step else 0.0
            self._last_step = now
            if self._first_step is None:
                self._first_step = now
            if computed:
                self._prefilled.append((now, computed))
            if busy:
                self._work.append((now, computed, busy * share))
            self._ttfts.extend((now, t) for t in getattr(it, "time_to_first_tokens_iter", None) or ())
            while self._work and now - self._work[0][0] > RATE_WINDOW_S:
                self._work.popleft()
            while self._ttfts and now - self._ttfts[0][0] > TTFT_WINDOW_S:
                self._ttfts.popleft()
            while self._prefilled and now - self._prefilled[0][0] > TTFT_WINDOW_S:
                self._prefilled.popleft()

    def rates(self, now: float) -> dict[str, float]:
        """Prompt tokens prefilled per second of wall clock over the last TTFT_WINDOW_S (the demand
        met, recent enough that a scale-down follows the load's end), per second of prefill work over
        the last RATE_WINDOW_S (the prefill rate; 0: none measured), and the recent TTFT p90."""
        with self._lock:
            work = [(tokens, busy) for at, tokens, busy in self._work if now - at <= RATE_WINDOW_S]
            prefilled = sum(n for at, n in self._prefilled if now - at <= TTFT_WINDOW_S)
            ttfts = sorted(t for at, t in self._ttfts if now - at <= TTFT_WINDOW_S)
            span = min(TTFT_WINDOW_S, max(1.0, now - self._first_step)) if self._first_step is not None else TTFT_WINDOW_S
        tokens, busy = sum(t for t, _ in work), sum(b for _, b in work)
        return {"prompt_tokens_per_s": round(prefilled / span, 1),
                "prefill_tokens_per_s": round(tokens / busy, 1) if tokens and busy > 0 else 0.0,
                "ttft_s": round(ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))], 4) if ttfts else 0.0}

    def _finished(self, done: Any) -> None:
        """vLLM's FinishedRequestStats, under the id the serving layer gave the engine."""
        if done.request_id is None:
            return
        with self._lock:
            self.finished[done.request_id] = {
                "queued_ms": round(done.queued_time * 1000, 1), "prefill_ms": round(done.prefill_time * 1000, 1),
                "decode_ms": round(done.decode_time * 1000, 1), "prompt_tokens": done.num_prompt_tokens,
                "cached_tokens": done.num_cached_tokens, "generated_tokens": done.num_generation_tokens,
                "preemptions": done.num_preemptions, "finish_reason": str(done.finish_reason),
            }
            while len(self.finished) > FINISHED_KEPT:
                self.finished.popitem(last=False)

    def request_stats(self, request_id: str) -> dict[str, Any] | None:
        """The engine's timings of a finished request, once: vLLM's serving layer names a chat
        request `chatcmpl-ID` and a completion's first prompt `cmpl-ID-0`."""
        with self._lock:
            for engine_id in (f"chatcmpl-{request_id}", f"cmpl-{request_id}-0"):
                stats = self.finished.pop(engine_id, None)
                if stats is not None:
                    return stats
        return None

    def log_engine_initialized(self) -> None:
        pass

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "block_size": int(self.cache.block_size or 0), "num_blocks": int(self.cache.num_gpu_blocks or 0),
                "kv_usage": round(self.kv_usage, 4), "running": self.running, "waiting": self.waiting,
                "prefix_queries": self.prefix_queries, "prefix_hits": self.prefix_hits,
            }
