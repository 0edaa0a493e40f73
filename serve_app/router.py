"""The router: the only HTTP ingress. It reads as a table of routes; handlers parse, admit,
pick the model's handle, call it with a typed request, and shape the typed result.

No torch and no vllm here (see docs/ARCHITECTURE.md): the router starts in seconds and many
replicas of it are cheap.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from deployments.protocol import EmbedRequest, GenerateRequest, GenerationDelta, RerankRequest, SamplingOptions
from serve_app.admission import Admission, Principal, estimate_tokens
from serve_app.api import openai, rerank
from deployments.engines.vllm_generate import HONOURED_PARAMS as VLLM_PARAMS
from serve_app.config import EngineKind, GatewayConfig, ModelConfig, ModelKind
from serve_app.errors import (
    ApiError, InvalidRequest, MethodNotAllowed, ModelNotFound, NotFound, PayloadTooLarge, ServiceUnavailable,
    UnsupportedParameter, from_exception,
)
from serve_app.fanout import plan_chunks
from serve_app.replica_calls import gather_all, with_deadline
from serve_app.http import json_response, parse_body, request_id, sse_response
from serve_app.middleware import AuthMiddleware, ErrorMiddleware, RequestIdMiddleware

READY_TIMEOUT_S = 5.0
# What each engine declares it honours (generation only: rerank/embed options are handled by the
# replica for every engine). Importing the adapter module loads no engine.
HONOURED_PARAMS: dict[EngineKind, frozenset[str]] = {
    EngineKind.vllm: VLLM_PARAMS,
    EngineKind.transformers: frozenset(),
}


class Router:
    def __init__(self, gateway: GatewayConfig, models: list[ModelConfig], handles: dict[str, DeploymentHandle]) -> None:
        self.gateway = gateway
        self.models = {m.name: m for m in models}
        self.handles = handles
        self.admission = Admission(gateway.all_api_keys())
        self.started = int(time.time())
        self._warm_until: dict[str, float] = {}  # scale-to-zero models: known to have a replica until then

    def __serve_build_asgi_app__(self) -> Starlette:
        """Called by `@serve.ingress()` on each replica after __init__: the route table."""
        return Starlette(
            routes=[
                Route("/health", self.health, methods=["GET"]),
                Route("/ready", self.ready, methods=["GET"]),
                Route("/v1/models", self.list_models, methods=["GET"]),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/embeddings", self.embeddings, methods=["POST"]),
                Route("/v1/rerank", self.rerank_jina, methods=["POST"]),
                Route("/rerank", self.rerank_jina, methods=["POST"]),
                Route("/v2/rerank", self.rerank_cohere, methods=["POST"]),
            ],
            # Inside Starlette's ServerErrorMiddleware, so we shape errors before it answers 500.
            middleware=[
                Middleware(RequestIdMiddleware), Middleware(ErrorMiddleware), Middleware(AuthMiddleware, self.admission),
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
        card = await asyncio.wait_for(self.handles[name].card.remote(), READY_TIMEOUT_S)
        return {"ready": True, "kind": card.kind, "max_input_tokens": card.max_input_tokens, "replica": card.replica.replica_id}

    async def list_models(self, request: Request) -> Response:
        cards = [
            {"id": m.name, "object": "model", "created": self.started, "owned_by": "serve-app",
             "kind": m.kind.value, "engine": m.engine.value}
            for m in self.models.values()
        ]
        return JSONResponse(openai.model_list(cards))

    # --- generation ---
    async def chat_completions(self, request: Request) -> Response:
        body = await parse_body(request, openai.ChatCompletionRequest, self.gateway.max_body_bytes, openai.UNSUPPORTED_CHAT_PARAMS)
        handle = self._handle(body.model, ModelKind.llm, body.engine_params())
        await self._ensure_replica(body.model)
        max_tokens = body.effective_max_tokens()
        self._admit(request, estimate_tokens(*(m.text() for m in body.messages)) + (max_tokens or self.gateway.default_max_tokens))
        rid = request_id(request)
        gen = GenerateRequest(rid, _sampling(body, max_tokens), messages=tuple((m.role, m.text()) for m in body.messages))
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await self._stream(handle, gen, include_usage, _chat_chunks(rid, body.model))
        result = await self._call(handle.generate.remote(gen))
        choices = [
            {"index": c.index, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason, "logprobs": None}
            for c in result.choices
        ]
        use = openai.usage(result.prompt_tokens, result.completion_tokens)
        return json_response(openai.chat_completion(rid, body.model, choices, use), result.replica)

    async def completions(self, request: Request) -> Response:
        body = await parse_body(request, openai.CompletionRequest, self.gateway.max_body_bytes, openai.UNSUPPORTED_COMPLETION_PARAMS)
        handle = self._handle(body.model, ModelKind.llm, body.engine_params())
        await self._ensure_replica(body.model)
        self._admit(request, estimate_tokens(body.prompt) + (body.max_tokens or self.gateway.default_max_tokens))
        rid = request_id(request)
        gen = GenerateRequest(rid, _sampling(body, body.effective_max_tokens()), prompt=body.prompt)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await self._stream(handle, gen, include_usage, _completion_chunks(rid, body.model))
        result = await self._call(handle.generate.remote(gen))
        choices = [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None} for c in result.choices]
        use = openai.usage(result.prompt_tokens, result.completion_tokens)
        return json_response(openai.text_completion(rid, body.model, choices, use), result.replica)

    async def _stream(self, handle: DeploymentHandle, gen: GenerateRequest, include_usage: bool, shape: "_ChunkShaper") -> Response:
        """SSE stream. The first delta is awaited (within the deadline) before answering, so errors
        found before any token get a real 4xx/5xx status, not an SSE event."""
        stream = handle.options(stream=True).generate_stream.remote(gen)
        try:
            first: GenerationDelta = await with_deadline(stream.__anext__(), self.gateway.request_timeout_s)
        except BaseException:
            stream.cancel()
            raise

        async def events() -> AsyncIterator[Any]:
            last = first
            try:
                yield shape.start(first)
                async for delta in _chain(first, stream):
                    last = delta
                    yield shape.delta(delta)
                if include_usage:
                    yield shape.usage(openai.usage(last.prompt_tokens, last.completion_tokens))
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
        handle = self._handle(body.model, ModelKind.embed)
        await self._ensure_replica(body.model)
        self._admit(request, estimate_tokens(*body.input))
        result = await self._call(handle.embed.remote(EmbedRequest(request_id(request), body.input)))
        return json_response(openai.embedding_list(body.model, result.vectors, body.encoding_format, result.prompt_tokens), result.replica)

    async def rerank_jina(self, request: Request) -> Response:
        body = await parse_body(request, rerank.JinaRerankRequest, self.gateway.max_body_bytes)
        return await self._rerank(request, rerank.to_query(body), rerank.jina_response)

    async def rerank_cohere(self, request: Request) -> Response:
        body = await parse_body(request, rerank.CohereRerankRequest, self.gateway.max_body_bytes)
        return await self._rerank(request, rerank.to_query(body), rerank.cohere_response)

    async def _rerank(self, request: Request, q: rerank.RerankQuery, shape: Callable[..., dict[str, Any]]) -> Response:
        """Long lists are split into chunks served concurrently by every replica, then merged."""
        handle = self._handle(q.model, ModelKind.rerank)
        if len(q.documents) > self.gateway.max_documents:
            raise PayloadTooLarge(f"{len(q.documents)} documents exceed the limit of {self.gateway.max_documents} per request", "documents")
        self._admit(request, estimate_tokens(*q.documents) + estimate_tokens(q.query) * len(q.documents))
        await self._ensure_replica(q.model)
        rid = request_id(request)
        model = self.models[q.model]
        # Every chunk is one call in the model's Serve queue: never more than its replicas run at once.
        max_chunks = min(self.gateway.rerank_max_parallel_chunks, model.capacity)
        chunks = plan_chunks(len(q.documents), model.batch.max_batch_size, max_chunks)
        calls = [
            handle.rerank.remote(RerankRequest(rid, q.query, q.documents[a:b], q.truncate, q.max_tokens_per_doc, offset=a))
            for a, b in chunks
        ]
        results = await with_deadline(gather_all(calls), self.gateway.request_timeout_s, lambda: [c.cancel() for c in calls])
        scores = [s for r in results for s in r.scores]
        truncated = sum(r.truncated_documents for r in results)
        out = shape(rid, q, scores, sum(r.prompt_tokens for r in results), truncated)
        response = json_response(out, results[0].replica)
        response.headers["x-served-replica"] = ",".join(dict.fromkeys(r.replica.replica_id for r in results))
        response.headers["x-truncated-documents"] = str(truncated)
        return response

    # --- helpers ---
    async def _ensure_replica(self, name: str) -> None:
        """A model scaled to zero gets a bounded wait for its first replica, then a clear 503,
        instead of a request hanging until the general deadline."""
        model = self.models[name]
        auto = model.deployment.autoscaling_config
        if auto is None or auto.min_replicas > 0 or time.monotonic() < self._warm_until.get(name, 0.0):
            return
        probe = self.handles[name].card.remote()  # queued at the handle, it also triggers the upscale
        try:
            await asyncio.wait_for(_await(probe), self.gateway.cold_start_timeout_s)
        except asyncio.TimeoutError:
            probe.cancel()
            raise ServiceUnavailable(
                f"model '{name}' is scaled to zero and its first replica did not start within "
                f"{self.gateway.cold_start_timeout_s:g}s; retry shortly", retry_after=10,
            ) from None
        # Serve keeps the replica at least for the downscale delay after traffic stops.
        self._warm_until[name] = time.monotonic() + auto.downscale_delay_s

    def _handle(self, name: str, kind: ModelKind, params: set[str] = frozenset()) -> DeploymentHandle:
        model = self.models.get(name)
        if model is None:
            raise ModelNotFound(f"model '{name}' does not exist; GET /v1/models lists the served models", "model")
        if model.kind is not kind:
            raise InvalidRequest(f"model '{name}' is a {model.kind.value} model and cannot serve this endpoint", "model")
        ignored = sorted(params - HONOURED_PARAMS[model.engine])
        if ignored:
            raise UnsupportedParameter(
                f"parameter '{ignored[0]}' is not honoured by engine '{model.engine.value}' of model '{name}'", ignored[0]
            )
        return self.handles[name]

    def _admit(self, request: Request, tokens: int) -> None:
        self.admission.admit(_principal(request), tokens)

    async def _call(self, response: DeploymentResponse) -> Any:
        """Await a replica call within the deadline; if the client goes away, cancel the work."""
        try:
            return await with_deadline(response, self.gateway.request_timeout_s, response.cancel)
        except asyncio.CancelledError:
            response.cancel()
            raise


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


async def _await(response: Any) -> Any:
    return await response


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
    if isinstance(exc, asyncio.TimeoutError):
        return f"no replica answered within {READY_TIMEOUT_S:.0f}s"
    return f"{type(exc).__name__}: {str(exc)[:200]}"
