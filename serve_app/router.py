"""The router: the only HTTP ingress. It reads as a table of routes; handlers parse, admit,
pick the model's handle, call it with a typed request, and shape the typed result.

No torch and no vllm here (see docs/ARCHITECTURE.md): the router starts in seconds and many
replicas of it are cheap.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
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

from deployments.protocol import EmbedRequest, ModelCard, OpenAIChunk, RerankRequest
from serve_app.admission import Admission, estimate_tokens
from serve_app.api import admin, openai, rerank
from serve_app.batches.routes import BatchApi
from serve_app.batches.store import BatchStore
from serve_app.batches.traffic import Traffic, TrafficMiddleware
from serve_app.batches.worker import Answer, BatchWorker, answer_of, call_app
from serve_app.config import GatewayConfig, ModelConfig, ModelKind, RouterSettings
from serve_app.errors import (
    ApiError, GatewayTimeout, InvalidRequest, MethodNotAllowed, ModelNotFound, NotFound, PayloadTooLarge, ServiceUnavailable,
    from_exception,
)
from serve_app.fanout import plan_chunks
from serve_app.body import parse_body, read_object, validate
from serve_app.http import json_response, principal_of, request_id, sse_response
from serve_app.metrics import RouterMetrics
from serve_app.middleware import BATCH_SCOPE, AuthMiddleware, ErrorMiddleware, MetricsMiddleware, RequestIdMiddleware
from serve_app.quota_store import QuotaStore
from serve_app.openapi import docs_response, schema_response
from serve_app.replica_calls import gather_all, with_deadline
from serve_app.resilience import Dispatcher, call_replica
from serve_app.status import configure_alerts, status_view
from serve_app.status_page import page_response
from serve_app.usage import RedisUsage, SqliteUsage, UsageRecorder

logger = logging.getLogger("ray.serve")
READY_TIMEOUT_S = 5.0
CARD_TIMEOUT_S, CARD_TTL_S = 2.0, 60.0  # /v1/models: how long to wait for a card, how long to keep it


class Router:
    def __init__(self, gateway: GatewayConfig, models: list[ModelConfig], handles: dict[str, DeploymentHandle],
                 metrics: RouterMetrics | None = None) -> None:
        self.gateway = gateway
        self.models = {m.name: m for m in models}
        self.aliases = {alias: m.name for m in models for alias in m.serving.aliases}
        self.handles = handles
        self.metrics = metrics or RouterMetrics()
        app = _app_name()
        store = QuotaStore(gateway.limits_store, gateway.limits_store_timeout_s, f"serve_app:{app}", self._store_error)
        self._env_keys = gateway.env_api_keys()  # read once, at start
        self.admission = Admission(gateway.api_keys + self._env_keys, store)
        self.usage = UsageRecorder(
            RedisUsage(store.redis, f"serve_app:{app}") if store.redis is not None
            else SqliteUsage(gateway.data_path / f"usage-{app}.sqlite3"),
            self._store_error,
        )
        self.started = int(time.time())
        self._cards: dict[str, tuple[float, ModelCard]] = {}  # (fetched at, card), for /v1/models
        self._warm_until: dict[str, float] = {}  # scale-to-zero models: known to have a replica until then
        self.events: dict[tuple[str, str], int] = {}
        self.dispatch = Dispatcher(gateway, self.models, handles, self._ensure_replica, self._event, self._circuit_changed)
        # The Batch API (serve_app/batches/): its store, and the worker started with the app below.
        self.batch_store = BatchStore(gateway.batch.store, gateway.data_path, app)
        self.batch_api = BatchApi(self.batch_store, gateway.batch, gateway.max_body_bytes, lambda n: self.aliases.get(n, n))
        self.traffic = Traffic()
        self.batch_worker: BatchWorker | None = None
        self._worker_task: asyncio.Task | None = None
        configure_alerts(gateway, self.models)  # the status board pushes them (deployments/status_board.py)

    def __serve_build_asgi_app__(self) -> Starlette:
        """Called by `@serve.ingress()` on each replica after __init__ (on the replica's event
        loop): the route table; in a Serve replica, the batch worker starts with it."""
        self.asgi = self._routes()
        # A trailing slash is a 404 in OpenAI's shape, not a 307 to another route (POST bodies do
        # not follow redirects, and `/v1/files/` with an empty id is no file).
        self.asgi.router.redirect_slashes = False
        if _in_serve():
            self.start_batch_worker()
        return self.asgi

    def start_batch_worker(self) -> None:
        """Run batch lines through this app (serve_app/batches/worker.py); needs a running loop."""
        self.batch_worker = BatchWorker(self.batch_store, self.gateway.batch, self.models, self.traffic, self._run_line,
                                        worker_id=f"{_replica_id()}:{uuid.uuid4().hex[:8]}",
                                        on_line=self.metrics.batch_line, on_pending=self.metrics.batch_pending)
        self._worker_task = asyncio.get_running_loop().create_task(self.batch_worker.run())

    async def _run_line(self, endpoint: str, body: str, owner: str, rid: str) -> Answer:
        """One batch line through this router's own app, as its owner's key (by name, as stored)."""
        try:
            principal = self.admission.principal_named(owner)
        except ApiError as err:  # the key was removed or expired: the line is refused as its request would be
            return Answer(err.status, err.body(rid), rid)
        return answer_of(*await call_app(self.asgi, endpoint, body.encode(), rid, principal), rid)

    def _routes(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/health", self.health, methods=["GET"]),
                Route("/ready", self.ready, methods=["GET"]),
                Route("/v1/models", self.list_models, methods=["GET"]),
                Route("/v1/models/{model:path}", self.get_model, methods=["GET"]),
                Route("/v1/status", self.status, methods=["GET"]),
                Route("/v1/usage", self.usage_report, methods=["GET"]),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/tokenize", self.tokenize, methods=["POST"]),
                Route("/detokenize", self.detokenize, methods=["POST"]),
                Route("/v1/embeddings", self.embeddings, methods=["POST"]),
                Route("/v1/rerank", self.rerank_jina, methods=["POST"]),
                Route("/rerank", self.rerank_jina, methods=["POST"]),
                Route("/v2/rerank", self.rerank_cohere, methods=["POST"]),
                Route("/v1/score", self.score, methods=["POST"]),
                Route("/score", self.score, methods=["POST"]),
                Route("/v1/files", self.batch_api.create_file, methods=["POST"]),
                Route("/v1/files/{file_id}", self.batch_api.get_file, methods=["GET"]),
                Route("/v1/files/{file_id}", self.batch_api.delete_file, methods=["DELETE"]),
                Route("/v1/files/{file_id}/content", self.batch_api.file_content, methods=["GET"]),
                Route("/v1/batches", self.batch_api.create_batch, methods=["POST"]),
                Route("/v1/batches", self.batch_api.list_batches, methods=["GET"]),
                Route("/v1/batches/{batch_id}", self.batch_api.get_batch, methods=["GET"]),
                Route("/v1/batches/{batch_id}/cancel", self.batch_api.cancel_batch, methods=["POST"]),
                Route("/status", self.status_page, methods=["GET"]),
                Route("/openapi.json", self.openapi_schema, methods=["GET"]),
                Route("/docs", self.api_docs, methods=["GET"]),
            ],
            # Inside Starlette's ServerErrorMiddleware, so we shape errors before it answers 500.
            middleware=[
                Middleware(RequestIdMiddleware), Middleware(MetricsMiddleware, self.metrics), Middleware(ErrorMiddleware),
                Middleware(AuthMiddleware, self.admission), Middleware(TrafficMiddleware, self.traffic),
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
        principal = principal_of(request)
        if not self.admission.enabled or (principal is not None and principal.admin):
            body["models"] = report
        return JSONResponse(body, status_code=200 if ok else 503)

    async def _probe(self, name: str) -> dict[str, Any]:
        card = await call_replica(self.handles[name].card.remote(), READY_TIMEOUT_S)
        return {"ready": True, "kind": card.kind, "max_input_tokens": card.max_input_tokens, "replica": card.replica.replica_id}

    async def list_models(self, request: Request) -> Response:
        """The served models; where a replica answers its card in time, also its context length
        (`max_model_len`, as vLLM names it), device and dtype (cached for CARD_TTL_S)."""
        names = [n for n in self.models if self._allowed(request, n)]
        cards = await asyncio.gather(*(self._card(n) for n in names))
        return JSONResponse(openai.model_list([self._model_entry(n, c) for n, c in zip(names, cards)]))

    async def get_model(self, request: Request) -> Response:
        name = self.aliases.get(request.path_params["model"], request.path_params["model"])
        if name not in self.models or not self._allowed(request, name):
            raise ModelNotFound(f"model '{name}' does not exist; GET /v1/models lists the served models", "model")
        return JSONResponse(self._model_entry(name, await self._card(name)))

    def _model_entry(self, name: str, card: ModelCard | None) -> dict[str, Any]:
        m = self.models[name]
        entry: dict[str, Any] = {"id": m.name, "object": "model", "created": self.started, "owned_by": "serve-app",
                                 "kind": m.kind.value, "engine": m.engine.value}
        if m.kind is ModelKind.llm and m.serving.aliases:
            entry["aliases"] = list(m.serving.aliases)
        if card is not None:
            entry.update(max_model_len=card.max_input_tokens, device=card.device, dtype=card.dtype)
        return entry

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
        Admission.require_admin(principal_of(request), self.admission.enabled)
        view = await status_view(self.gateway, self.models, self.dispatch.breakers, self.events)
        view["quota_store"] = self.admission.store.describe()  # this router replica's view of it
        view["batches"] = await self._batch_progress()
        return JSONResponse(view)

    async def _batch_progress(self) -> dict[str, Any]:
        """Batches running or ended within the hour: progress, rate, ETA (and which store holds them)."""
        try:
            rows = await asyncio.to_thread(self.batch_store.progress, time.time())
        except Exception as err:  # noqa: BLE001 - the status view must answer while the batch store is down
            return {"store": self.batch_store.where, "error": f"{type(err).__name__}: {str(err)[:200]}", "batches": []}
        return {"store": self.batch_store.where, "batches": rows}

    # --- generation: vLLM's own OpenAI layer in the replica; the router reads only what it owns ---
    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, "chat", openai.ChatEnvelope)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completion", openai.CompletionEnvelope)

    async def _generate(self, request: Request, api: str, shape: type[openai.LLMEnvelope]) -> Response:
        """The body goes to the replica as the client sent it (after strict parsing); the router
        checks the fields it needs for routing, quotas and streaming, vLLM validates the rest."""
        data = await read_object(request, self.gateway.max_body_bytes)
        env = validate(shape, data)
        model = self._check_model(request, env.model, ModelKind.llm)
        self._admit(request, env.estimated_tokens(self.gateway.default_max_tokens))
        rid = request_id(request)
        if env.stream:
            return await self._stream(request, model, api, data, rid)
        served, result = await self.dispatch.run(model, lambda h, left: call_replica(h.create.remote(api, data, rid), left))
        use = result.body.get("usage") or {}
        self._served(request, served, use.get("prompt_tokens") or 0, use.get("completion_tokens") or 0)
        return json_response(result.body, result.replica)

    async def _stream(self, request: Request, model: str, api: str, data: dict[str, Any], rid: str) -> Response:
        """SSE stream. The first item (it carries the first token) is awaited before answering,
        with retries and fallbacks, so failures before any token get a real status code; later
        ones end the stream in-band. Each item holds every event the engine produced since the
        last one, written as one block."""

        async def open_stream(handle: DeploymentHandle, left: float) -> tuple[Any, OpenAIChunk]:
            stream = handle.options(stream=True).create_stream.remote(api, data, rid)
            try:
                return stream, await with_deadline(stream.__anext__(), left)
            except BaseException:
                stream.cancel()
                raise

        served, (stream, first) = await self.dispatch.run(model, open_stream)
        started = request.scope["state"].get("started")
        if started is not None:
            self.metrics.ttft.observe((time.perf_counter() - started) * 1000, {"model": served})

        async def blocks() -> AsyncIterator[bytes]:
            usage, chunk = None, first
            try:
                while True:
                    usage = chunk.usage or usage
                    yield "".join(f"data: {e}\n\n" for e in chunk.events).encode()
                    try:
                        chunk = await stream.__anext__()
                    except StopAsyncIteration:
                        break
                self._served(request, served, (usage or {}).get("prompt_tokens") or 0, (usage or {}).get("completion_tokens") or 0)
            except Exception as exc:  # noqa: BLE001 - mid-stream: report in-band with the request id
                yield f"data: {json.dumps(from_exception(exc).body(rid))}\n\ndata: [DONE]\n\n".encode()
            finally:
                stream.cancel()  # normal end: no-op; client gone or error: frees the engine's work

        return sse_response(blocks(), first.replica)

    async def tokenize(self, request: Request) -> Response:
        return await self._tokenization(request, "tokenize")

    async def detokenize(self, request: Request) -> Response:
        return await self._tokenization(request, "detokenize")

    async def _tokenization(self, request: Request, method: str) -> Response:
        """vLLM's /tokenize and /detokenize, by the model named in the body."""
        data = await read_object(request, self.gateway.max_body_bytes)
        env = validate(openai.ModelOnly, data)
        model = self._check_model(request, env.model, ModelKind.llm)
        self._admit(request, 0)
        served, result = await self.dispatch.run(
            model, lambda h, left: call_replica(getattr(h, method).remote(data), left), fallbacks=False)
        return json_response(result.body, result.replica)

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
        served, results = await self._score(q, rid, fallbacks=True)
        q = dataclasses.replace(q, model=served)
        scores = [s for r in results for s in r.scores]
        truncated = sum(r.truncated_documents for r in results)
        prompt_tokens = sum(r.prompt_tokens for r in results)
        self._served(request, q.model, prompt_tokens, truncated=truncated)
        return _scored_response(shape(rid, q, scores, prompt_tokens, truncated), results, truncated)

    async def score(self, request: Request) -> Response:
        """vLLM's /score shape: one text against many, or pairwise; each distinct left text is one
        rerank of its right texts through the same path as /v1/rerank."""
        body = await parse_body(request, rerank.ScoreRequest, self.gateway.max_body_bytes)
        groups = body.groups()
        self._check_model(request, body.model, ModelKind.rerank)
        pairs = sum(len(g) for g in groups.values())
        if pairs > self.gateway.max_documents:
            raise PayloadTooLarge(f"{pairs} pairs exceed the limit of {self.gateway.max_documents} per request", "text_2")
        self._admit(request, sum(estimate_tokens(t) + estimate_tokens(q) for q, g in groups.items() for _, t in g))
        rid = request_id(request)
        queries = [rerank.RerankQuery(body.model, q, [t for _, t in g], None, False) for q, g in groups.items()]
        # One model must score every pair (scores of two models are not comparable): with several
        # left texts, no fallbacks.
        answers = await gather_all([asyncio.ensure_future(self._score(q, rid, fallbacks=len(queries) == 1)) for q in queries])
        scores: dict[int, float] = {}
        results = [r for _, rs in answers for r in rs]
        for (q, g), (_, rs) in zip(groups.items(), answers):
            for (index, _), value in zip(g, (v for r in rs for v in r.scores)):
                scores[index] = value
        prompt_tokens, truncated = sum(r.prompt_tokens for r in results), sum(r.truncated_documents for r in results)
        served = answers[0][0]
        self._served(request, served, prompt_tokens, truncated=truncated)
        return _scored_response(rerank.score_response(rid, served, [scores[i] for i in sorted(scores)], prompt_tokens),
                                results, truncated)

    async def _score(self, q: rerank.RerankQuery, rid: str, fallbacks: bool) -> tuple[str, list[Any]]:
        """(model that scored, its RerankResults in document order) for one query's documents."""
        model = self.models[q.model]
        # Every chunk is one call in the model's Serve queue: never more than its replicas run at once.
        max_chunks = min(self.gateway.rerank_max_parallel_chunks, model.capacity)
        chunks = plan_chunks(len(q.documents), model.batch.max_batch_size, max_chunks)
        requests = [RerankRequest(rid, q.query, q.documents[a:b], q.truncate, q.max_tokens_per_doc, offset=a) for a, b in chunks]
        answers = await self._rerank_chunks(q.model, requests, fallbacks=fallbacks)
        served = {m for m, _ in answers}
        if len(served) > 1:
            # Some chunks fell back: scores of two models are not comparable, so one model scores all.
            answers = await self._rerank_chunks(next(m for m in served if m != q.model), requests, fallbacks=False)
        return answers[0][0], [r for _, r in answers]

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

    def _check_model(self, request: Request, name: str, kind: ModelKind) -> str:
        """The model's canonical name (clients may use an alias), or a 404 / 400. A model outside
        the key's allow-list is answered exactly as one that does not exist."""
        canonical = self.aliases.get(name, name)
        model = self.models.get(canonical)
        if model is None or not self._allowed(request, canonical):
            raise ModelNotFound(f"model '{name}' does not exist; GET /v1/models lists the served models", "model")
        name = canonical
        state = request.scope["state"]
        state["model"] = name  # metrics label: only names we serve
        if TrafficMiddleware.KEY not in state and BATCH_SCOPE not in request.scope:
            state[TrafficMiddleware.KEY] = name  # interactive: batch lines yield to it; the middleware ends it
            self.traffic.begin(name)
        if model.kind is not kind:
            raise InvalidRequest(f"model '{name}' is a {model.kind.value} model and cannot serve this endpoint", "model")
        return name

    def _admit(self, request: Request, tokens: int) -> None:
        """Charge the estimate (or 429); `_served` corrects it, AuthMiddleware releases the slot."""
        request.scope["state"]["quota"] = self.admission.admit(principal_of(request), tokens)

    def _circuit_changed(self, model: str, snapshot: dict[str, Any]) -> None:
        """Tell the status board (it pushes the alert, one for all router replicas); best effort."""
        try:
            ctx = serve.get_replica_context()
        except Exception:  # noqa: BLE001 - outside Serve (unit tests): no board
            return
        try:
            from deployments.status_board import board

            state = "closed" if snapshot["state"] == "closed" else "open"
            board(ctx.app_name).circuit.remote(model, ctx.replica_id.unique_id, {
                "state": state, "since": time.time(), "last_error": snapshot.get("last_error")})
        except Exception:  # noqa: BLE001 - alerting never fails a request
            logger.warning("could not report the circuit of %s to the status board", model, exc_info=True)

    def _event(self, event: str, model: str) -> None:
        self.events[(event, model)] = self.events.get((event, model), 0) + 1
        self.metrics.event(event, model)

    def _served(self, request: Request, model: str, prompt_tokens: int, completion_tokens: int = 0, truncated: int = 0) -> None:
        """The request was served with this real usage: metrics, the quota's correction, usage per key."""
        state = request.scope["state"]
        state["model"] = model
        if prompt_tokens:  # Ray counters refuse 0
            self.metrics.tokens.inc(prompt_tokens, {"model": model, "type": "prompt"})
        if completion_tokens:
            self.metrics.tokens.inc(completion_tokens, {"model": model, "type": "completion"})
        if truncated:
            self.metrics.truncations.inc(truncated, {"model": model})
        self.admission.settle(state.get("quota"), prompt_tokens + completion_tokens)
        principal = principal_of(request)
        key = principal.name if principal is not None else "-"
        self.metrics.served_for(key, model, prompt_tokens, completion_tokens)
        self.usage.record(key, model, prompt_tokens, completion_tokens, time.time())

    # --- live settings and tenancy (issue 14) ---
    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this after __init__ and on every change of the router deployment's
        user_config: a new key list applies to the running replica, nothing restarts."""
        settings = RouterSettings.for_app(user_config, list(self.models.values()))
        keys = settings.api_keys + self._env_keys
        if self.admission.enabled and not keys:
            logger.warning("the router's user_config has no API keys: authentication is now OFF")
        self.admission.set_keys(keys)
        logger.info("API keys applied in place: %d (names: %s)", len(keys), ", ".join(sorted({k.name for k in keys})) or "-")

    async def usage_report(self, request: Request) -> Response:
        """`GET /v1/usage?since=&until=&key=`: requests and tokens per key and model (admin only with keys)."""
        Admission.require_admin(principal_of(request), self.admission.enabled)
        q = admin.usage_query(request.query_params.multi_items(), time.time())
        rows = await asyncio.to_thread(self.usage.query, q.since, q.until, q.key)
        return JSONResponse(admin.usage_response(q, rows))

    def _allowed(self, request: Request, canonical: str) -> bool:
        """Whether the request's key may use this model (allow-lists may name aliases)."""
        principal = principal_of(request)
        if principal is None or principal.models is None:
            return True
        return canonical in {self.aliases.get(n, n) for n in principal.models}

    def _store_error(self, op: str) -> None:
        self.metrics.store_errors.inc(1, {"op": op})

    def __del__(self) -> None:
        """Serve calls this on a graceful shutdown: write the usage not written yet."""
        usage = getattr(self, "usage", None)
        if usage is not None:
            usage.close()
        worker = getattr(self, "batch_worker", None)
        if worker is not None:
            worker.give_back()  # lines it runs go back to pending now, not when their lease ends

    # --- the status page (issue 15) ---
    async def status_page(self, request: Request) -> Response:
        """`GET /status`: the HTML page over `/v1/status`; it carries no data itself, so it is open
        (AuthMiddleware.OPEN_PATHS) and its script sends the admin key to /v1/status."""
        return page_response()

    async def openapi_schema(self, request: Request) -> Response:
        """`GET /openapi.json`: OpenAPI 3.1 from this route table and our request models (open, as vLLM's)."""
        return schema_response(request.app.routes)

    async def api_docs(self, request: Request) -> Response:
        """`GET /docs`: a static page rendering /openapi.json, no CDN."""
        return docs_response()


Ingress = serve.ingress()(Router)


def _scored_response(body: dict[str, Any], results: list[Any], truncated: int) -> Response:
    response = json_response(body, results[0].replica)
    response.headers["x-served-replica"] = ",".join(dict.fromkeys(r.replica.replica_id for r in results))
    response.headers["x-truncated-documents"] = str(truncated)
    return response


def _replica_id() -> str:
    """This router replica's Serve id (names the batch worker: operators see who ran a line)."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside Serve
        return "local"


def _in_serve() -> bool:
    try:
        serve.get_replica_context()
        return True
    except Exception:  # noqa: BLE001 - unit tests build the app outside Serve: no worker
        return False


def _app_name() -> str:
    """The Serve application's name (quota keys and usage files are per app); 'local' outside Serve."""
    try:
        return serve.get_replica_context().app_name or "local"
    except Exception:  # noqa: BLE001 - not in a Serve replica (unit tests)
        return "local"


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
