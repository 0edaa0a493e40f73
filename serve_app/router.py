"""The router: the only HTTP ingress. It reads as a table of routes; handlers parse, admit,
pick the model's handle, call it with a typed request, and shape the typed result.

No torch and no vllm here (see docs/ARCHITECTURE.md): the router starts in seconds and many
replicas of it are cheap.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from deployments.engines.vllm_generate import HONOURED_PARAMS as VLLM_PARAMS
from deployments.protocol import EmbedRequest, GenerateRequest, GenerationDelta, ModelCard, RerankRequest, SamplingOptions
from serve_app.admission import Admission, Principal, estimate_tokens
from serve_app.api import openai, rerank
from serve_app.config import EngineKind, GatewayConfig, ModelConfig, ModelKind
from serve_app.errors import (
    ApiError, GatewayTimeout, InvalidRequest, MethodNotAllowed, ModelNotFound, NotFound, PayloadTooLarge, ServiceUnavailable,
    UnsupportedParameter, from_exception,
)
from serve_app.fanout import plan_chunks
from serve_app.body import parse_body
from serve_app.http import json_response, request_id, sse_response
from serve_app.metrics import RouterMetrics
from serve_app.middleware import AuthMiddleware, ErrorMiddleware, MetricsMiddleware, RequestIdMiddleware
from serve_app.replica_calls import gather_all, with_deadline
from serve_app.resilience import Dispatcher, call_replica
from serve_app.status import status_view

READY_TIMEOUT_S = 5.0
CARD_TIMEOUT_S, CARD_TTL_S = 2.0, 60.0  # /v1/models: how long to wait for a card, how long to keep it
# What each engine declares it honours (generation only: rerank/embed options are handled by the
# replica for every engine). Importing the adapter module loads no engine.
HONOURED_PARAMS: dict[EngineKind, frozenset[str]] = {
    EngineKind.vllm: VLLM_PARAMS,
    EngineKind.transformers: frozenset(),
}


class Router:
    def __init__(self, gateway: GatewayConfig, models: list[ModelConfig], handles: dict[str, DeploymentHandle],
                 metrics: RouterMetrics | None = None) -> None:
        self.gateway = gateway
        self.models = {m.name: m for m in models}
        self.handles = handles
        self.admission = Admission(gateway.all_api_keys())
        self.started = int(time.time())
        self._cards: dict[str, tuple[float, ModelCard]] = {}  # (fetched at, card), for /v1/models
        self._warm_until: dict[str, float] = {}  # scale-to-zero models: known to have a replica until then
        self.events: dict[tuple[str, str], int] = {}
        self.metrics = metrics or RouterMetrics()
        self.dispatch = Dispatcher(gateway, self.models, handles, self._ensure_replica, self._event)

    def __serve_build_asgi_app__(self) -> Starlette:
        """Called by `@serve.ingress()` on each replica after __init__: the route table."""
        return Starlette(
            routes=[
                Route("/health", self.health, methods=["GET"]),
                Route("/ready", self.ready, methods=["GET"]),
                Route("/v1/models", self.list_models, methods=["GET"]),
                Route("/v1/status", self.status, methods=["GET"]),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/embeddings", self.embeddings, methods=["POST"]),
                Route("/v1/rerank", self.rerank_jina, methods=["POST"]),
                Route("/rerank", self.rerank_jina, methods=["POST"]),
                Route("/v2/rerank", self.rerank_cohere, methods=["POST"]),
            ],
            # Inside Starlette's ServerErrorMiddleware, so we shape errors before it answers 500.
            middleware=[
                Middleware(RequestIdMiddleware), Middleware(MetricsMiddleware, self.metrics), Middleware(ErrorMiddleware),
                Middleware(AuthMiddleware, self.admission),
            ],
            exception_handlers={HTTPException: _http_exception},
        )

    # --- liveness, readiness, models ---
    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        """Ready when every model answers through its handle: at least one live replica each.
        Per-model details only for admin keys when keys are configured."""
        names = list(self.models)
        results = await asyncio.gather(*(self._probe(n) for n in names), return_exceptions=True)
        report = {n: (r if isinstance(r, dict) else {"ready": False, "error": _short(r)}) for n, r in zip(names, results)}
        ok = all(r["ready"] for r in report.values())
        body: dict[str, Any] = {"status": "ready" if ok else "not_ready"}
        principal = _principal(request)
        if not self.admission.enabled or (principal is not None and principal.admin):
            body["models"] = report
        return JSONResponse(body, status_code=200 if ok else 503)

    async def _probe(self, name: str) -> dict[str, Any]:
        card = await call_replica(self.handles[name].card.remote(), READY_TIMEOUT_S)
        return {"ready": True, "kind": card.kind, "max_input_tokens": card.max_input_tokens, "replica": card.replica.replica_id}

    async def list_models(self, request: Request) -> Response:
        """The served models; where a replica answers its card in time, also its context length
        (`max_model_len`, as vLLM names it), device and dtype (cached for CARD_TTL_S)."""
        names = list(self.models)
        cards = await asyncio.gather(*(self._card(n) for n in names))
        data = []
        for name, card in zip(names, cards):
            m = self.models[name]
            entry = {"id": m.name, "object": "model", "created": self.started, "owned_by": "serve-app",
                     "kind": m.kind.value, "engine": m.engine.value}
            if card is not None:
                entry.update(max_model_len=card.max_input_tokens, device=card.device, dtype=card.dtype)
            data.append(entry)
        return JSONResponse(openai.model_list(data))

    async def _card(self, name: str) -> ModelCard | None:
        cached = self._cards.get(name)
        if cached and time.monotonic() - cached[0] < CARD_TTL_S:
            return cached[1]
        auto = self.models[name].deployment.autoscaling_config
        if auto and auto.min_replicas == 0 and time.monotonic() >= self._warm_until.get(name, 0.0):
            return cached[1] if cached else None  # a card call would wake a model scaled to zero
        try:
            card = await call_replica(self.handles[name].card.remote(), CARD_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - a busy or scaled-to-zero model is still listed
            return cached[1] if cached else None
        self._cards[name] = (time.monotonic(), card)
        return card

    async def status(self, request: Request) -> Response:
        """Every model → every replica, with health, circuit and autoscaling (admin only with keys)."""
        Admission.require_admin(_principal(request), self.admission.enabled)
        return JSONResponse(await status_view(self.gateway, self.models, self.dispatch.breakers, self.events))

    # --- generation ---
    async def chat_completions(self, request: Request) -> Response:
        body = await parse_body(request, openai.ChatCompletionRequest, self.gateway.max_body_bytes, openai.UNSUPPORTED_CHAT_PARAMS)
        self._check_model(request, body.model, ModelKind.llm, body.engine_params())
        max_tokens = body.effective_max_tokens()
        self._admit(request, estimate_tokens(*(m.text() for m in body.messages)) + (max_tokens or self.gateway.default_max_tokens))
        rid = request_id(request)
        gen = GenerateRequest(rid, _sampling(body, max_tokens), messages=tuple((m.role, m.text()) for m in body.messages))
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await self._stream(request, body.model, gen, include_usage, _chat_chunks)
        served, result = await self.dispatch.run(body.model, lambda h, left: call_replica(h.generate.remote(gen), left))
        choices = [
            {"index": c.index, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason, "logprobs": None}
            for c in result.choices
        ]
        use = openai.usage(result.prompt_tokens, result.completion_tokens)
        self._served(request, served, result.prompt_tokens, result.completion_tokens)
        return json_response(openai.chat_completion(rid, served, choices, use), result.replica)

    async def completions(self, request: Request) -> Response:
        body = await parse_body(request, openai.CompletionRequest, self.gateway.max_body_bytes, openai.UNSUPPORTED_COMPLETION_PARAMS)
        self._check_model(request, body.model, ModelKind.llm, body.engine_params())
        self._admit(request, estimate_tokens(body.prompt) + (body.max_tokens or self.gateway.default_max_tokens))
        rid = request_id(request)
        gen = GenerateRequest(rid, _sampling(body, body.effective_max_tokens()), prompt=body.prompt)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await self._stream(request, body.model, gen, include_usage, _completion_chunks)
        served, result = await self.dispatch.run(body.model, lambda h, left: call_replica(h.generate.remote(gen), left))
        choices = [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None} for c in result.choices]
        use = openai.usage(result.prompt_tokens, result.completion_tokens)
        self._served(request, served, result.prompt_tokens, result.completion_tokens)
        return json_response(openai.text_completion(rid, served, choices, use), result.replica)

    async def _stream(self, request: Request, model: str, gen: GenerateRequest, include_usage: bool, shaper: Callable[[str, str], "_ChunkShaper"]) -> Response:
        """SSE stream. The first delta is awaited before answering, with retries and fallbacks, so
        failures before any token get a real status code; later ones end the stream in-band."""

        async def open_stream(handle: DeploymentHandle, left: float) -> tuple[Any, GenerationDelta]:
            stream = handle.options(stream=True).generate_stream.remote(gen)
            try:
                return stream, await with_deadline(stream.__anext__(), left)
            except BaseException:
                stream.cancel()
                raise

        served, (stream, first) = await self.dispatch.run(model, open_stream)
        started = request.scope["state"].get("started")
        if started is not None:
            self.metrics.ttft.observe((time.perf_counter() - started) * 1000, {"model": served})
        shape = shaper(gen.request_id, served)

        async def events() -> AsyncIterator[Any]:
            last = first
            try:
                yield shape.start(first)
                async for delta in _chain(first, stream):
                    last = delta
                    yield shape.delta(delta)
                if include_usage:
                    yield shape.usage(openai.usage(last.prompt_tokens, last.completion_tokens))
                self._served(request, served, last.prompt_tokens, last.completion_tokens)
                yield "[DONE]"
            except Exception as exc:  # noqa: BLE001 - mid-stream: report in-band with the request id
                yield from_exception(exc).body(gen.request_id)
                yield "[DONE]"
            finally:
                stream.cancel()  # normal end: no-op; client gone or error: frees the engine's work

        return sse_response(_skip_none(events()), first.replica)

    # --- embeddings and rerank ---
    async def embeddings(self, request: Request) -> Response:
        body = await parse_body(request, openai.EmbeddingRequest, self.gateway.max_body_bytes, openai.UNSUPPORTED_EMBEDDING_PARAMS)
        self._check_model(request, body.model, ModelKind.embed)
        if len(body.input) > self.gateway.max_documents:
            raise PayloadTooLarge(f"{len(body.input)} inputs exceed the limit of {self.gateway.max_documents} per request", "input")
        self._admit(request, estimate_tokens(*body.input))
        req = EmbedRequest(request_id(request), body.input)
        served, result = await self.dispatch.run(body.model, lambda h, left: call_replica(h.embed.remote(req), left))
        self._served(request, served, result.prompt_tokens, truncated=result.truncated_inputs)
        return json_response(openai.embedding_list(served, result.vectors, body.encoding_format, result.prompt_tokens), result.replica)

    async def rerank_jina(self, request: Request) -> Response:
        body = await parse_body(request, rerank.JinaRerankRequest, self.gateway.max_body_bytes)
        return await self._rerank(request, rerank.to_query(body), rerank.jina_response)

    async def rerank_cohere(self, request: Request) -> Response:
        body = await parse_body(request, rerank.CohereRerankRequest, self.gateway.max_body_bytes)
        return await self._rerank(request, rerank.to_query(body), rerank.cohere_response)

    async def _rerank(self, request: Request, q: rerank.RerankQuery, shape: Callable[..., dict[str, Any]]) -> Response:
        """Long lists are split into chunks served concurrently by every replica, then merged."""
        self._check_model(request, q.model, ModelKind.rerank)
        if len(q.documents) > self.gateway.max_documents:
            raise PayloadTooLarge(f"{len(q.documents)} documents exceed the limit of {self.gateway.max_documents} per request", "documents")
        self._admit(request, estimate_tokens(*q.documents) + estimate_tokens(q.query) * len(q.documents))
        rid = request_id(request)
        model = self.models[q.model]
        # Every chunk is one call in the model's Serve queue: never more than its replicas run at once.
        max_chunks = min(self.gateway.rerank_max_parallel_chunks, model.capacity)
        chunks = plan_chunks(len(q.documents), model.batch.max_batch_size, max_chunks)
        requests = [RerankRequest(rid, q.query, q.documents[a:b], q.truncate, q.max_tokens_per_doc, offset=a) for a, b in chunks]
        answers = await self._rerank_chunks(q.model, requests, fallbacks=True)
        served = {m for m, _ in answers}
        if len(served) > 1:
            # Some chunks fell back: scores of two models are not comparable, so one model scores all.
            answers = await self._rerank_chunks(next(m for m in served if m != q.model), requests, fallbacks=False)
        results = [r for _, r in answers]
        q = dataclasses.replace(q, model=answers[0][0])
        scores = [s for r in results for s in r.scores]
        truncated = sum(r.truncated_documents for r in results)
        prompt_tokens = sum(r.prompt_tokens for r in results)
        self._served(request, q.model, prompt_tokens, truncated=truncated)
        out = shape(rid, q, scores, prompt_tokens, truncated)
        response = json_response(out, results[0].replica)
        response.headers["x-served-replica"] = ",".join(dict.fromkeys(r.replica.replica_id for r in results))
        response.headers["x-truncated-documents"] = str(truncated)
        return response

    async def _rerank_chunks(self, model: str, requests: list[RerankRequest], fallbacks: bool) -> list[tuple[str, Any]]:
        """Each chunk retries (and may fall back) on its own; one failing for good cancels the others."""
        calls = [
            asyncio.ensure_future(self.dispatch.run(model, lambda h, left, r=r: call_replica(h.rerank.remote(r), left), fallbacks))
            for r in requests
        ]
        return await gather_all(calls)

    # --- helpers ---
    async def _ensure_replica(self, name: str, seconds_left: float) -> None:
        """A model scaled to zero gets a bounded wait for its first replica, then a clear 503,
        instead of a request hanging until the general deadline."""
        model = self.models[name]
        auto = model.deployment.autoscaling_config
        if auto is None or auto.min_replicas > 0 or time.monotonic() < self._warm_until.get(name, 0.0):
            return
        probe = self.handles[name].card.remote()  # queued at the handle, it also triggers the upscale
        try:
            await with_deadline(probe, min(self.gateway.cold_start_timeout_s, seconds_left), probe.cancel)
        except GatewayTimeout:
            raise ServiceUnavailable(
                f"model '{name}' is scaled to zero and its first replica did not start within "
                f"{self.gateway.cold_start_timeout_s:g}s; retry shortly", retry_after=10,
            ) from None
        # Serve keeps the replica at least for the downscale delay after traffic stops.
        self._warm_until[name] = time.monotonic() + auto.downscale_delay_s

    def _check_model(self, request: Request, name: str, kind: ModelKind, params: set[str] = frozenset()) -> None:
        model = self.models.get(name)
        if model is None:
            raise ModelNotFound(f"model '{name}' does not exist; GET /v1/models lists the served models", "model")
        request.scope["state"]["model"] = name  # metrics label: only names we serve
        if model.kind is not kind:
            raise InvalidRequest(f"model '{name}' is a {model.kind.value} model and cannot serve this endpoint", "model")
        ignored = sorted(params - HONOURED_PARAMS[model.engine])
        if ignored:
            raise UnsupportedParameter(
                f"parameter '{ignored[0]}' is not honoured by engine '{model.engine.value}' of model '{name}'", ignored[0]
            )

    def _admit(self, request: Request, tokens: int) -> None:
        self.admission.admit(_principal(request), tokens)

    def _event(self, event: str, model: str) -> None:
        self.events[(event, model)] = self.events.get((event, model), 0) + 1
        self.metrics.event(event, model)

    def _served(self, request: Request, model: str, prompt_tokens: int, completion_tokens: int = 0, truncated: int = 0) -> None:
        request.scope["state"]["model"] = model
        self.metrics.tokens.inc(prompt_tokens, {"model": model, "type": "prompt"})
        if completion_tokens:
            self.metrics.tokens.inc(completion_tokens, {"model": model, "type": "completion"})
        if truncated:
            self.metrics.truncations.inc(truncated, {"model": model})


Ingress = serve.ingress()(Router)


class _ChunkShaper:
    """Turns typed deltas into one API's SSE chunks (chat and completions differ in shape)."""

    def __init__(self, start: Callable, delta: Callable, usage: Callable) -> None:
        self.start, self.delta, self.usage = start, delta, usage


def _chat_chunks(rid: str, model: str) -> _ChunkShaper:
    def start(first: GenerationDelta) -> dict[str, Any]:
        return openai.chat_chunk(rid, model, [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])

    def delta(d: GenerationDelta) -> dict[str, Any]:
        choices = [{"index": c.index, "delta": {"content": c.text} if c.text else {}, "finish_reason": c.finish_reason} for c in d.choices]
        return openai.chat_chunk(rid, model, choices)

    return _ChunkShaper(start, delta, lambda use: openai.chat_chunk(rid, model, [], use))


def _completion_chunks(rid: str, model: str) -> _ChunkShaper:
    def delta(d: GenerationDelta) -> dict[str, Any]:
        choices = [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None} for c in d.choices]
        return openai.text_completion(rid, model, choices, None)

    return _ChunkShaper(lambda first: None, delta, lambda use: openai.text_completion(rid, model, [], use))


def _sampling(body: openai.SamplingFields, max_tokens: int | None) -> SamplingOptions:
    return SamplingOptions(
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, stop=tuple(body.stop or ()),
        n=body.n, seed=body.seed, presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
    )


def _principal(request: Request) -> Principal | None:
    return request.scope.get("state", {}).get("principal")


async def _chain(first: GenerationDelta, rest: AsyncIterator[GenerationDelta]) -> AsyncIterator[GenerationDelta]:
    yield first
    async for item in rest:
        yield item


async def _skip_none(events: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for e in events:
        if e is not None:
            yield e


async def _http_exception(request: Request, exc: HTTPException) -> Response:
    err: ApiError
    if exc.status_code == 404:
        err = NotFound(f"no route for {request.method} {request.url.path}")
    elif exc.status_code == 405:
        err = MethodNotAllowed(f"method {request.method} is not allowed on {request.url.path}")
    else:
        err = InvalidRequest(str(exc.detail))
        err.status = exc.status_code
    return JSONResponse(err.body(request.scope.get("state", {}).get("request_id")), status_code=err.status)


def _short(exc: BaseException) -> str:
    if isinstance(exc, ApiError):
        return exc.message
    return f"{type(exc).__name__}: {str(exc)[:200]}"
