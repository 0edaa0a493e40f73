"""LLM replica: one vLLM engine (possibly tensor-parallel) behind vLLM's own OpenAI serving layer.

The router forwards the client's validated body; the replica hands it to the classes `vllm serve`
uses (deployments/engines/vllm_openai.py) and returns vLLM's response or its SSE payloads,
coalesced. So every parameter `vllm serve` honours reaches the engine, and its answer reaches the
client unchanged; the router adds request ids, served-by headers, failover and quotas around it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pathlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from ray.serve.metrics import Gauge

from deployments.engines.continuation import Continuation, Splice, TokenTracker, completion_body, rewound
from deployments.engines.vllm_openai import VLLMOpenAI, coalesce
from deployments.health import MonitoredReplica
from deployments.protocol import ModelCard, OpenAIResponse, Resume, StreamItem, stream_item
from deployments.runtime import replica_info
from serve_app.autoscaling.policy import SIGNALS
from serve_app.config import ModelConfig
from serve_app.errors import EngineFailure, InvalidRequest
from serve_app.llm_routing.cost import outstanding_work
from serve_app.metrics import LLM_PROMPT_TOKENS_WAITING

APIS = ("chat", "completion")
logger = logging.getLogger("ray.serve")


class LLMServer(MonitoredReplica):
    async def __init__(self, model: ModelConfig, models_dir: str, default_max_tokens: int) -> None:
        born = time.monotonic()
        self.cfg = model
        self.default_max_tokens = default_max_tokens
        self.adapter_names = model.adapter_names()  # `sql`, `base:sql` -> `sql`, as vLLM knows it
        self.engine = VLLMOpenAI(model, model.resolved_source(pathlib.Path(models_dir)),
                                 model.resolved_adapters(pathlib.Path(models_dir)))
        await self.engine.start()
        self.replica = replica_info(model.name)
        self.outstanding_tokens = 0  # tokens of the requests it holds still to compute (routing stats; _counted)
        self.prompt_tokens_waiting = 0  # their prompts not yet prefilled (autoscaling stats; _counted)
        # Every prompt's length as the routers estimate it, beside vLLM's count of the same prompts
        # (its prefix-cache queries): how many of the routers' blocks one of vLLM's holds.
        self.estimated_prompt_tokens = 0
        self._init_health()
        load = self.engine.load  # vLLM's steps are progress: a long non-streamed answer is not a stall
        self.health.engine_progress = (lambda: load.stepped_at) if load is not None else (lambda: None)
        # One real token before Serve's first health check: the first request through the serving
        # layer pays lazy start-up costs that a loaded node can stretch past probe_timeout_s.
        # Counted as a served request, so the first check finds a fresh success (health.fresh_s).
        with self.tracked():
            await self._probe()
        self.load_s = round(time.monotonic() - born, 1)  # weights, engine, first token: what a cold start waits

    async def card(self) -> ModelCard:
        return ModelCard(self.cfg.name, "llm", "vllm", self.engine.max_model_len, self.replica,
                         sampling_defaults=self.engine.model_defaults, device=self.engine.device, dtype=self.engine.dtype)

    async def create(self, api: str, body: dict[str, Any], request_id: str) -> OpenAIResponse:
        """A non-streaming chat or completion: vLLM's response body."""
        with self.tracked(request_id), self._counted(api, body):
            result = await self.engine.create(_api(api), self._generation(api, body, stream=False), request_id)
        if not isinstance(result, dict):
            raise EngineFailure("the engine streamed an answer that was asked for whole")
        return OpenAIResponse(result, self.replica, self._engine_stats(request_id))

    async def create_stream(self, api: str, body: dict[str, Any], request_id: str,
                            track: bool = False) -> AsyncIterator[StreamItem]:
        """Streamed through `handle.options(stream=True)`; cancelling it aborts the engine request.
        The first item carries the first token (errors before it are raised, not streamed).
        `track`: each item also carries the token ids its events held (serve_app/migration/), so
        the router can continue the stream on another replica if this one fails."""
        own = self._generation(api, body, stream=True)
        tracker = None
        if track:
            own["return_token_ids"] = True
            tracker = TokenTracker(api, keep_ids=bool(body.get("return_token_ids")))
        async for item in self._streamed(api, api, body, own, request_id, tracker):
            yield item

    async def resume_stream(self, api: str, body: dict[str, Any], request_id: str, resume: Resume) -> AsyncIterator[StreamItem]:
        """The rest of a stream another replica started (its replica failed after `resume.token_ids`):
        a completion over prompt + generated ids with the same sampling, in the original's shape."""
        tokenizer = self.engine.engine.get_tokenizer()
        skip = body.get("skip_special_tokens", True)
        ids, text = rewound(tokenizer, resume, skip)
        held = ""
        if text.startswith(resume.text):
            held = text[len(resume.text):]
        else:
            logger.warning("continuation: the text sent (%d chars) is not a prefix of the ids' text (%d chars); "
                           "held-back text not resent", len(resume.text), len(text))
        resume = Resume(resume.prompt_ids, ids, resume.text, resume.head)
        stops = body.get("stop") or []
        splice = Splice(resume.text, held, [stops] if isinstance(stops, str) else list(stops),
                        bool(body.get("include_stop_str_in_output")))
        writer = Continuation(api, resume, splice, bool(body.get("return_token_ids")))
        own = completion_body(api, body, resume, self._own(body)["model"], self._unnamed_budget())
        if own is None:  # the budget was spent when the replica failed: only the stream's end was lost
            want_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            yield stream_item(writer.ending("length", want_usage), writer.usage(), self.replica, writer.tracker.take())
            return
        async for item in self._streamed("completion", api, body, own, request_id, writer, writer.tracker):
            yield item

    async def _streamed(self, engine_api: str, api: str, body: dict[str, Any], own: dict[str, Any], request_id: str,
                        payloads: Any, tracker: TokenTracker | None = None) -> AsyncIterator[StreamItem]:
        """The engine's SSE as handle items; `api`/`body` are the client's (what the load counts),
        `engine_api`/`own` what the engine runs (a continuation is a completion over token ids)."""
        want_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        own["stream_options"] = {**(own.get("stream_options") or {}), "include_usage": True}
        tracker = tracker if tracker is not None else payloads
        with self.tracked(request_id) as health, self._counted(api, body) as prefilled:
            sse = await self.engine.create(_api(engine_api), own, request_id)
            if isinstance(sse, dict):
                raise EngineFailure("the engine answered whole a request asked as a stream")
            replica = self.replica  # in the first item only
            stats: dict[str, Any] | None = None
            async for events, usage in coalesce(sse, want_usage, payloads):
                health.progress()
                if usage is not None:  # vLLM reports usage as the request ends: its timings are kept by now
                    if stats is None:
                        stats = self._engine_stats(request_id) or {}
                    usage = {**usage, "engine": stats} if stats else usage
                prefilled()  # the first item carries the first token (the router counts it there too)
                yield stream_item(events, usage, replica, tracker.take() if tracker is not None else None)
                replica = None

    def _engine_stats(self, request_id: str) -> dict[str, Any] | None:
        load = self.engine.load
        return load.request_stats(request_id) if load is not None else None

    async def tokenize(self, body: dict[str, Any]) -> OpenAIResponse:
        return OpenAIResponse(await self.engine.tokenize(self._own(body)), self.replica)

    async def detokenize(self, body: dict[str, Any]) -> OpenAIResponse:
        return OpenAIResponse(await self.engine.detokenize(self._own(body)), self.replica)

    def _generation(self, api: str, body: dict[str, Any], **extra: Any) -> dict[str, Any]:
        """`_own(body)` for the engine to generate: a chat that names no output budget gets the
        gateway's `default_max_tokens`, which vLLM clamps to the room left in the context as it
        clamps any. A completion without `max_tokens` keeps vLLM's (OpenAI's) 16; one with
        `"max_tokens": null` gets the default too (vLLM would generate to the end of the context,
        and a continuation would not know that budget)."""
        own = self._own(body, **extra)
        unnamed = own.get("max_tokens") is None and own.get("max_completion_tokens") is None
        if unnamed and (api == "chat" or "max_tokens" in own):
            own["max_tokens"] = self._unnamed_budget()
        return own

    def _unnamed_budget(self) -> int:
        """The budget of a request that names none, here and in a continued stream alike: the
        gateway's default, but never over max_model_len (vLLM rejects that; it clamps a budget over
        the room left)."""
        return min(self.default_max_tokens, self.engine.max_model_len)

    def _own(self, body: dict[str, Any], **extra: Any) -> dict[str, Any]:
        """The body as this model's: a fallback model answers under its own name (vLLM checks it);
        an adapter's request keeps the adapter's name (vLLM picks the LoRA by it)."""
        name = body.get("model")
        return {**body, "model": self.adapter_names.get(name, self.cfg.name) if isinstance(name, str) else self.cfg.name, **extra}

    @contextlib.contextmanager
    def _counted(self, api: str, body: dict[str, Any]) -> Iterator[Callable[[], None]]:
        """The request's work in `outstanding_tokens` (reported to the routers): its prompt until
        `prefilled()` (a stream's first token; a whole answer never says), its output until it ends."""
        prompt, output = outstanding_work(api, body, self.cfg.routing.chars_per_token)
        held = [prompt + output, prompt]  # outstanding, waiting to prefill
        self.outstanding_tokens += held[0]
        self.prompt_tokens_waiting += prompt
        self.estimated_prompt_tokens += prompt

        def prefilled() -> None:
            if held[0] > output:
                self.outstanding_tokens -= held[0] - output
                self.prompt_tokens_waiting -= held[1]
                held[0], held[1] = output, 0

        try:
            yield prefilled
        finally:
            self.outstanding_tokens -= held[0]
            self.prompt_tokens_waiting -= held[1]

    async def record_routing_stats(self) -> dict[str, Any]:
        """Serve polls this every `routing.stats_period_s` and hands it to each router replica's
        request router (serve_app/llm_routing/): the engine's load, KV cache and prefix-cache
        counters (vLLM's own), the work this replica holds from every router, and the LoRA
        adapters vLLM holds loaded."""
        stats = self._load()
        engine = getattr(self, "engine", None)
        cfg = getattr(self, "cfg", None)
        if cfg is not None and cfg.lora is not None and engine is not None and engine.models is not None:
            try:
                stats["adapters"] = await engine.loaded_adapters()
            except Exception:  # noqa: BLE001 - a dead engine fails its health check; the load still reports
                logger.warning("could not list the engine's loaded LoRA adapters", exc_info=True)
        return stats

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics, polled by the replica and averaged over the look-back
        window for the token policy in the controller (serve_app/autoscaling/): vLLM's KV-cache use
        and scheduler queue, the prompt tokens this replica holds not yet prefilled, the prefill
        rate it measured, and its recent engine-side time to first token."""
        stats = self._autoscaling(self._load())
        if stats:
            _waiting_gauge().set(stats["prompt_tokens_waiting"], tags={"model": self.cfg.name})
        return stats

    def _load(self) -> dict[str, Any]:
        """The engine's load (vLLM's scheduler and prefix-cache counters, the rates it measured) and
        the work this replica holds: what the routers, the autoscaler and the status board read."""
        engine = getattr(self, "engine", None)  # a status report may come before the engine exists
        now = time.time()
        load = {**engine.load.snapshot(), **engine.load.rates(now)} if engine is not None and engine.load is not None else {}
        return {**load, "outstanding_tokens": getattr(self, "outstanding_tokens", 0),
                "estimated_prompt_tokens": getattr(self, "estimated_prompt_tokens", 0),
                "prompt_tokens_waiting": max(0, getattr(self, "prompt_tokens_waiting", 0)), "reported_at": now}

    @staticmethod
    def _autoscaling(stats: dict[str, Any]) -> dict[str, float]:
        """The token policy's signals out of `_load()` (none before the engine reports)."""
        return {k: float(stats[k]) for k in SIGNALS} if "kv_usage" in stats else {}

    def _snapshot(self) -> dict[str, Any]:
        """The status board's row for this replica, with vLLM's actual prefix-cache hit rate."""
        stats = self._load()
        queries, hits = stats.get("prefix_queries", 0), stats.get("prefix_hits", 0)
        return {**super()._snapshot(), "kv_usage": stats.get("kv_usage"),
                "autoscaling": self._autoscaling(stats),
                "prefix_cache": {"queried_tokens": queries, "hit_tokens": hits,
                                 "hit_rate": round(hits / queries, 4) if queries else None}}

    async def unfinished_requests(self) -> int:
        """Requests the engine still holds: 0 after a client disconnect means the work was freed."""
        return self.engine.unfinished()

    async def _probe(self) -> None:
        """One real token through the same path as real work (the engine's own ping misses stalls).
        Its engine steps are not counted as the in-flight requests' progress (EngineLoad.probing)."""
        await self.engine.check_health()
        load = self.engine.load
        if load is not None:
            load.probing += 1
        try:
            await self.engine.create("completion", {"model": self.cfg.name, "prompt": "ping", "max_tokens": 1,
                                                    "temperature": 0.0}, "health-probe")
        finally:
            if load is not None:
                load.probing -= 1

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


_GAUGE: list[Gauge] = []


def _waiting_gauge() -> Gauge:
    """Made on first use, in the replica (Serve's own Gauge adds the deployment, replica and app tags)."""
    if not _GAUGE:
        _GAUGE.append(Gauge(LLM_PROMPT_TOKENS_WAITING, tag_keys=("model",),
                            description="prompt tokens an LLM replica holds not yet prefilled (the autoscaler's drain time)"))
    return _GAUGE[0]


def _api(api: str) -> str:
    if api not in APIS:
        raise InvalidRequest(f"unknown API {api!r}")
    return api
