"""What operators and clients ask of the gateway itself: liveness, readiness, the model list (with
a short-lived cache of the replicas' model cards), the status view and page, usage per key, and
the API page.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from deployments.protocol import ModelCard
from serve_app.api import admin, openai
from serve_app.config import ModelKind
from serve_app.errors import ApiError, GatewayTimeout, NotFound, Overloaded
from serve_app.handlers.context import Context
from serve_app.openapi import docs_asset_response, docs_response, schema_response
from serve_app.resilience import call_replica
from serve_app.status import find_story, running_replicas, status_view
from serve_app.status_page import page_response

READY_TIMEOUT_S = 5.0
CARD_TIMEOUT_S, CARD_TTL_S = 2.0, 60.0  # /v1/models: how long to wait for a card, how long to keep it


class AdminHandlers:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.started = int(time.time())
        self._cards: dict[str, tuple[float, ModelCard]] = {}  # (fetched at, card), for /v1/models

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        """Ready when every model answers through its handle, or is saturated: its queue is full
        (or no slot freed within READY_TIMEOUT_S) while Serve runs its replicas. A busy model is
        alive: a load balancer that took the gateway out for it would turn a burst into an outage.
        Per-model details, and which models are saturated, only for admin keys when keys are configured."""
        names = list(self.ctx.models)
        results = await asyncio.gather(*(self._probe(n) for n in names), return_exceptions=True)
        report = {n: (r if isinstance(r, dict) else {"ready": False, "error": _short(r)}) for n, r in zip(names, results)}
        ok = all(r["ready"] for r in report.values())
        body: dict[str, Any] = {"status": "ready" if ok else "not_ready"}
        if self.ctx.tenancy.is_admin(request):
            body["models"] = report
            body["saturated"] = [n for n, r in report.items() if r.get("saturated")]
        return JSONResponse(body, status_code=200 if ok else 503)

    async def _probe(self, name: str) -> dict[str, Any]:
        try:
            card = await call_replica(self.ctx.handles[name].card.remote(), READY_TIMEOUT_S)
        except (Overloaded, GatewayTimeout) as err:
            running = await running_replicas(self.ctx.models[name].deployment_name)
            if not running:
                raise
            return {"ready": True, "saturated": True, "running_replicas": running,
                    "error": f"{err.message} (its {running} running replica(s) have no free slot)"}
        return {"ready": True, "kind": card.kind, "max_input_tokens": card.max_input_tokens, "replica": card.replica.replica_id}

    async def list_models(self, request: Request) -> Response:
        """The served models; where a replica answers its card in time, also its context length
        (`max_model_len`, as vLLM names it), device and dtype (cached for CARD_TTL_S)."""
        ctx = self.ctx
        names = [n for n in (*ctx.models, *ctx.adapters) if ctx.tenancy.allowed(request, n)]
        cards = await asyncio.gather(*(self._card(ctx.base_of(n)) for n in names))
        return JSONResponse(openai.model_list([self._model_entry(n, c) for n, c in zip(names, cards)]))

    async def get_model(self, request: Request) -> Response:
        name = self.ctx.visible_model(request, request.path_params["model"])
        return JSONResponse(self._model_entry(name, await self._card(self.ctx.base_of(name))))

    def _model_entry(self, name: str, card: ModelCard | None) -> dict[str, Any]:
        """A model, or a LoRA adapter with its base as `parent` (as `vllm serve` lists adapters)."""
        base = self.ctx.base_of(name)
        m = self.ctx.models[base]
        entry: dict[str, Any] = {"id": name, "object": "model", "created": self.started, "owned_by": "serve-app",
                                 "kind": m.kind.value, "engine": m.engine.value}
        if base != name:
            entry.update(parent=base, adapter=True)
        elif m.kind is ModelKind.llm and m.serving.aliases:
            entry["aliases"] = list(m.serving.aliases)
        if card is not None:
            entry.update(max_model_len=card.max_input_tokens, device=card.device, dtype=card.dtype)
        return entry

    async def _card(self, name: str) -> ModelCard | None:
        cached = self._cards.get(name)
        if cached and time.monotonic() - cached[0] < CARD_TTL_S:
            return cached[1]
        if self.ctx.cold_start.may_sleep(name):
            return cached[1] if cached else None  # a card call would wake a model scaled to zero
        try:
            card = await call_replica(self.ctx.handles[name].card.remote(), CARD_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - a busy or scaled-to-zero model is still listed
            return cached[1] if cached else None
        self._cards[name] = (time.monotonic(), card)
        return card

    async def status(self, request: Request) -> Response:
        """Every model → every replica, with health, circuit and autoscaling (admin only with keys)."""
        ctx = self.ctx
        ctx.tenancy.require_admin(request)
        view = await status_view(ctx.gateway, ctx.models, ctx.dispatch.breakers, ctx.events,
                                 ctx.dispatch.queue, ctx.cold_start.waited_s)
        view["quota_store"] = ctx.tenancy.admission.store.describe()  # this router replica's view of it
        view["batches"] = await self._batch_progress()
        return JSONResponse(view)

    async def _batch_progress(self) -> dict[str, Any]:
        """Batches running or ended within the hour: progress, rate, ETA (and which store holds them)."""
        store = self.ctx.batch_store
        try:
            rows = await asyncio.to_thread(store.progress, time.time())
        except Exception as err:  # noqa: BLE001 - the status view must answer while the batch store is down
            return {"store": store.where, "error": f"{type(err).__name__}: {str(err)[:200]}", "batches": []}
        return {"store": store.where, "batches": rows}

    async def usage_report(self, request: Request) -> Response:
        """`GET /v1/usage?since=&until=&key=`: requests and tokens per key and model (admin only with keys)."""
        self.ctx.tenancy.require_admin(request)
        q = admin.usage_query(request.query_params.multi_items(), time.time())
        rows = await asyncio.to_thread(self.ctx.tenancy.usage.query, q.since, q.until, q.key)
        return JSONResponse(admin.usage_response(q, rows))

    async def request_story(self, request: Request) -> Response:
        """`GET /v1/requests/{id}`: what happened to a recent request (serve_app/stories.py), from
        whichever router replica took it (admin only with keys). A reused id: the newest story,
        the others under `earlier`."""
        self.ctx.tenancy.require_admin(request)
        rid = request.path_params["request_id"]
        found = await find_story(self.ctx.stories, rid)
        if not found:
            cfg = self.ctx.gateway.stories
            kept = (f"the last {cfg.keep} requests for {cfg.max_age_s:g}s and failed ones for {cfg.failed_max_age_s:g}s"
                    if cfg.enabled else "nothing: gateway.stories.enabled is false")
            raise NotFound(f"no request with id '{rid[:256]}' is kept (this gateway keeps {kept})", "request_id")
        return JSONResponse({**found[0], "earlier": found[1:]})

    async def status_page(self, request: Request) -> Response:
        """`GET /status`: the HTML page over `/v1/status`; it carries no data itself, so it is open
        (AuthMiddleware.OPEN_PATHS) and its script sends the admin key to /v1/status."""
        return page_response()

    async def openapi_schema(self, request: Request) -> Response:
        """`GET /openapi.json`: OpenAPI 3.1 from this route table and our request models (open, as vLLM's)."""
        return schema_response(request.app.routes)

    async def api_docs(self, request: Request) -> Response:
        """`GET /docs`: Swagger UI rendering /openapi.json, its assets from this router (no CDN)."""
        return docs_response()

    async def docs_asset(self, request: Request) -> Response:
        """`GET /docs/static/{name}`: Swagger UI's script, style and icon (a fixed list)."""
        return docs_asset_response(request.path_params["name"])


def _short(exc: BaseException) -> str:
    if isinstance(exc, ApiError):
        return exc.message
    return f"{type(exc).__name__}: {str(exc)[:200]}"
