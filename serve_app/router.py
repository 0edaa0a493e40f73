"""The router: the only HTTP ingress, read as a table of contents. It wires the parts one router
replica owns (tenancy, dispatch, the batch store, API and worker, alerts) and maps each route to
its handler: `handlers/llm.py` (generation), `handlers/scoring.py` (embeddings, rerank, score),
`handlers/admin.py` (health, models, status, usage, API page), `batches/routes.py` (files, batches).

No torch and no vllm here (see docs/ARCHITECTURE.md): the router starts in seconds and many
replicas of it are cheap.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from deployments.runtime import replica_info
from serve_app.autoscaling.queue import TokenQueue
from serve_app.batches.routes import BatchApi
from serve_app.batches.store import BatchStore
from serve_app.batches.traffic import Traffic, TrafficMiddleware
from serve_app.batches.worker import Answer, BatchWorker, answer_of, call_app
from serve_app.cold_start import ColdStart
from serve_app.config import GatewayConfig, ModelConfig, ModelKind, RouterSettings, adapter_bases, served_names
from serve_app.errors import ApiError, InvalidRequest, MethodNotAllowed, NotFound
from serve_app.handlers.admin import AdminHandlers
from serve_app.handlers.context import Context
from serve_app.handlers.llm import LLMHandlers
from serve_app.handlers.scoring import ScoringHandlers
from serve_app.llm_routing import registry
from serve_app.metrics import RouterMetrics
from serve_app.middleware import BATCH_SCOPE, AuthMiddleware, ErrorMiddleware, MetricsMiddleware, RequestIdMiddleware
from serve_app.resilience import Dispatcher
from serve_app.serve_context import app_name_or_local, in_serve, replica_id
from serve_app.status import (
    configure_alerts, hand_over_last_stories, hand_over_stories, hand_over_traffic, keep_alerts_configured, report_circuit,
    reported_load_s,
)
from serve_app.stories import Stories, StoryMiddleware
from serve_app.tenancy import Tenancy


class Router:
    def __init__(self, gateway: GatewayConfig, models: list[ModelConfig], handles: dict[str, DeploymentHandle],
                 metrics: RouterMetrics | None = None) -> None:
        self.gateway = gateway
        self.models = {m.name: m for m in models}
        self.aliases = served_names(models)  # aliases and LoRA adapters' names → canonical names
        self.adapters = adapter_bases(models)
        self.metrics = metrics or RouterMetrics()
        app = app_name_or_local()
        self.tenancy = Tenancy(gateway, self.aliases, self.metrics, app)
        self.events: dict[tuple[str, str], int] = {}
        cold_start = ColdStart(gateway, self.models, handles, reported_load_s)
        self.queue = TokenQueue({n: m.queued_tokens_bound for n, m in self.models.items() if m.kind is ModelKind.llm},
                                lambda n: registry.reported_waiting(self.models[n].deployment_name))
        self.dispatch = Dispatcher(gateway, self.models, handles, cold_start.wait, self._event, report_circuit, self.queue)
        # The Batch API (serve_app/batches/): its store, and the worker started with the app below.
        self.batch_store = BatchStore(gateway.batch.store, gateway.data_path, app)
        self.batch_api = BatchApi(self.batch_store, gateway.batch, gateway.max_body_bytes, self._serving_model)
        self.traffic = Traffic()
        self.stories = Stories(gateway.stories, _router_identity()) if gateway.stories.enabled else None
        self.metrics.chart_name = self._serving_model  # /status charts an adapter's answers with its base's
        self.batch_worker: BatchWorker | None = None
        self._worker_task: asyncio.Task | None = None
        ctx = Context(gateway, self.models, self.aliases, self.adapters, handles, self.metrics, self.tenancy, self.dispatch,
                      cold_start, self.traffic, self.batch_store, self.events, self.stories)
        self.admin, self.llm, self.scoring = AdminHandlers(ctx), LLMHandlers(ctx), ScoringHandlers(ctx)
        configure_alerts(gateway, self.models)  # the status board pushes them (deployments/status_board.py)

    def _serving_model(self, name: str) -> str:
        """The model whose replicas a name's requests take (an adapter's: its base's)."""
        canonical = self.aliases.get(name, name)
        return self.adapters.get(canonical, canonical)

    def __serve_build_asgi_app__(self) -> Starlette:
        """Called by `@serve.ingress()` on each replica after __init__ (on the replica's event
        loop): the route table; in a Serve replica, the batch worker starts with it."""
        self.asgi = self._routes()
        # A trailing slash is a 404 in OpenAI's shape, not a 307 to another route (POST bodies do
        # not follow redirects, and `/v1/files/` with an empty id is no file).
        self.asgi.router.redirect_slashes = False
        if in_serve():
            self.start_batch_worker()
            self._alerts_task = asyncio.get_running_loop().create_task(keep_alerts_configured(self.gateway, self.models))
            self._traffic_task = asyncio.get_running_loop().create_task(hand_over_traffic(self.metrics.window))
            if self.stories is not None:
                self._stories_task = asyncio.get_running_loop().create_task(hand_over_stories(self.stories))
        return self.asgi

    def start_batch_worker(self) -> None:
        """Run batch lines through this app (serve_app/batches/worker.py); needs a running loop."""
        self.batch_worker = BatchWorker(self.batch_store, self.gateway.batch, self.models, self.traffic, self._run_line,
                                        worker_id=f"{replica_id()}:{uuid.uuid4().hex[:8]}",
                                        on_line=self.metrics.batch_line, on_pending=self.metrics.batch_pending,
                                        kv_usage=self._kv_usage)
        self._worker_task = asyncio.get_running_loop().create_task(self.batch_worker.run())

    def _kv_usage(self, model: str) -> float | None:
        """An LLM's replicas' mean KV-cache use as they last reported it to this router's request router."""
        m = self.models.get(model)
        return registry.reported_kv_usage(m.deployment_name) if m is not None and m.kind is ModelKind.llm else None

    async def _run_line(self, endpoint: str, body: str, owner: str, rid: str) -> Answer:
        """One batch line through this router's own app, as its owner's key (by name, as stored)."""
        try:
            principal = self.tenancy.admission.principal_named(owner)
        except ApiError as err:  # the key was removed or expired: the line is refused as its request would be
            return Answer(err.status, err.body(rid), rid)
        return answer_of(*await call_app(self.asgi, endpoint, body.encode(), rid, principal), rid)

    def _routes(self) -> Starlette:
        admin, llm, scoring, batch = self.admin, self.llm, self.scoring, self.batch_api
        return Starlette(
            routes=[
                Route("/health", admin.health, methods=["GET"]),
                Route("/ready", admin.ready, methods=["GET"]),
                Route("/v1/models", admin.list_models, methods=["GET"]),
                Route("/v1/models/{model:path}", admin.get_model, methods=["GET"]),
                Route("/v1/status", admin.status, methods=["GET"]),
                Route("/v1/usage", admin.usage_report, methods=["GET"]),
                Route("/v1/requests/{request_id:path}", admin.request_story, methods=["GET"]),
                Route("/v1/chat/completions", llm.chat_completions, methods=["POST"]),
                Route("/v1/completions", llm.completions, methods=["POST"]),
                Route("/tokenize", llm.tokenize, methods=["POST"]),
                Route("/detokenize", llm.detokenize, methods=["POST"]),
                Route("/v1/embeddings", scoring.embeddings, methods=["POST"]),
                Route("/v1/rerank", scoring.rerank_jina, methods=["POST"]),
                Route("/rerank", scoring.rerank_jina, methods=["POST"]),
                Route("/v2/rerank", scoring.rerank_cohere, methods=["POST"]),
                Route("/v1/score", scoring.score, methods=["POST"]),
                Route("/score", scoring.score, methods=["POST"]),
                Route("/v1/files", batch.create_file, methods=["POST"]),
                Route("/v1/files", batch.list_files, methods=["GET"]),
                Route("/v1/files/{file_id}", batch.get_file, methods=["GET"]),
                Route("/v1/files/{file_id}", batch.delete_file, methods=["DELETE"]),
                Route("/v1/files/{file_id}/content", batch.file_content, methods=["GET"]),
                Route("/v1/batches", batch.create_batch, methods=["POST"]),
                Route("/v1/batches", batch.list_batches, methods=["GET"]),
                Route("/v1/batches/{batch_id}", batch.get_batch, methods=["GET"]),
                Route("/v1/batches/{batch_id}/cancel", batch.cancel_batch, methods=["POST"]),
                Route("/status", admin.status_page, methods=["GET"]),
                Route("/openapi.json", admin.openapi_schema, methods=["GET"]),
                Route("/docs", admin.api_docs, methods=["GET"]),
                Route("/docs/static/{name}", admin.docs_asset, methods=["GET"]),
            ],
            # Inside Starlette's ServerErrorMiddleware, so we shape errors before it answers 500.
            middleware=[
                Middleware(RequestIdMiddleware), Middleware(StoryMiddleware, self.stories, BATCH_SCOPE),
                Middleware(MetricsMiddleware, self.metrics), Middleware(ErrorMiddleware),
                Middleware(AuthMiddleware, self.tenancy.admission), Middleware(TrafficMiddleware, self.traffic),
            ],
            exception_handlers={HTTPException: _http_exception},
        )

    def _event(self, event: str, model: str) -> None:
        """The dispatcher's retries, fallbacks, open circuits, poison inputs: counted for /v1/status and metrics."""
        self.events[(event, model)] = self.events.get((event, model), 0) + 1
        self.metrics.event(event, model)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this after __init__ and on every change of the router deployment's
        user_config: a new key list applies to the running replica, nothing restarts."""
        self.tenancy.set_keys(RouterSettings.for_app(user_config, list(self.models.values())).api_keys)

    def __del__(self) -> None:
        """Serve calls this on a graceful shutdown: write the usage not written yet, hand the last
        request stories to the board."""
        stories = getattr(self, "stories", None)
        if stories is not None:
            hand_over_last_stories(stories)
        tenancy = getattr(self, "tenancy", None)
        if tenancy is not None:
            tenancy.close()
        worker = getattr(self, "batch_worker", None)
        if worker is not None:
            worker.give_back()  # lines it runs go back to pending now, not when their lease ends


Ingress = serve.ingress()(Router)


def _router_identity() -> dict[str, str]:
    """Which router replica took a request, and on which node: the first line of its story."""
    me = replica_info("router")
    return {"replica_id": me.replica_id, "node_id": me.node_id, "node_ip": me.node_ip}


async def _http_exception(request: Request, exc: HTTPException) -> Response:
    """Starlette's own 404 / 405 (no route, wrong method) in our error shape."""
    err: ApiError
    if exc.status_code == 404:
        err = NotFound(f"no route for {request.method} {request.url.path}")
    elif exc.status_code == 405:
        err = MethodNotAllowed(f"method {request.method} is not allowed on {request.url.path}")
    else:
        err = InvalidRequest(str(exc.detail))
        err.status = exc.status_code
    return JSONResponse(err.body(request.scope.get("state", {}).get("request_id")), status_code=err.status)
