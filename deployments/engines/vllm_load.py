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
from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase


FINISHED_KEPT = 1024  # timings of finished requests nobody asked for (the probe's, aborted ones) age out


class EngineLoad(StatLoggerBase):
    """One per engine; vLLM calls `record` on the engine's output loop, the replica reads `snapshot`."""

    def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
        self.cache = vllm_config.cache_config
        self.running = self.waiting = 0
        self.kv_usage = 0.0
        self.prefix_queries = self.prefix_hits = 0
        self._lock = threading.Lock()
        self.finished: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0) -> None:
        for done in getattr(iteration_stats, "finished_requests", None) or ():
            self._finished(done)
        if scheduler_stats is None:
            return
        with self._lock:
            self.running, self.waiting = scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs
            self.kv_usage = float(scheduler_stats.kv_cache_usage)
            prefix = scheduler_stats.prefix_cache_stats
            if prefix is not None:  # per-step deltas (vLLM resets them each step): summed here
                self.prefix_queries += prefix.queries
                self.prefix_hits += prefix.hits

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
