"""What every handler shares with the router: the config, the models' handles and the parts the
router wires once per replica. Handlers get this, not the router, so each family's module shows
everything it can touch.

Model resolution lives here because every family does it the same way, and it is where a request
first names a model: aliases, the key's allow-list, the metrics label and interactive traffic.
"""

from __future__ import annotations

import dataclasses

from ray.serve.handle import DeploymentHandle
from starlette.requests import Request

from serve_app import stories
from serve_app.batches.store import BatchStore
from serve_app.batches.traffic import Traffic, TrafficMiddleware
from serve_app.cold_start import ColdStart
from serve_app.config import GatewayConfig, ModelConfig, ModelKind
from serve_app.errors import ApiError, InvalidRequest, ModelNotFound
from serve_app.metrics import RouterMetrics
from serve_app.middleware import BATCH_SCOPE
from serve_app.resilience import Dispatcher
from serve_app.stories import Stories
from serve_app.tenancy import Tenancy


@dataclasses.dataclass
class Context:
    gateway: GatewayConfig
    models: dict[str, ModelConfig]
    aliases: dict[str, str]  # any name a client may use → canonical name (config.served_names)
    adapters: dict[str, str]  # LoRA adapter → the model whose replicas serve it
    handles: dict[str, DeploymentHandle]
    metrics: RouterMetrics
    tenancy: Tenancy
    dispatch: Dispatcher
    cold_start: ColdStart
    traffic: Traffic
    batch_store: BatchStore
    events: dict[tuple[str, str], int]  # (retry | fallback | ..., model) → count, for the status view
    stories: Stories | None = None  # this router replica's request stories (None: turned off)

    def visible_model(self, request: Request, name: str) -> str:
        """The canonical name of a model this request's key may use, or a 404. A model outside
        the key's allow-list is answered exactly as one that does not exist."""
        canonical = self.aliases.get(name, name)
        known = canonical in self.models or canonical in self.adapters
        if not known or not self.tenancy.allowed(request, canonical):
            raise ModelNotFound(f"model '{name}' does not exist; GET /v1/models lists the served models", "model")
        return canonical

    def check_model(self, request: Request, name: str, kind: ModelKind) -> str:
        """The model a request will be served by (clients may use an alias), or a 404 / 400;
        from here on the request is counted against that model. An adapter's request is counted
        against the adapter (its name is returned) and served by `base_of` it."""
        name = self.visible_model(request, name)
        request.scope["state"]["model"] = name  # metrics label: only names we serve
        model = self.models[self.base_of(name)]
        if model.kind is not kind:
            raise InvalidRequest(f"model '{name}' is a {model.kind.value} model and cannot serve this endpoint", "model")
        return name

    def base_of(self, name: str) -> str:
        """The model whose replicas serve `name` (canonical): itself, or an adapter's base."""
        return self.adapters.get(name, name)

    async def admit(self, request: Request, model: str, tokens: int) -> None:
        """Admit the request (or 429); only then is it interactive traffic on its model, which
        batch lines yield to: a request refused before it reaches a model (400, 401, 404, 413,
        429) never pauses batches."""
        try:
            await self.tenancy.admit(request, tokens)
        except ApiError as err:
            stories.note(admission={"decision": "refused", "estimated_tokens": tokens, "code": err.code, "reason": err.message[:300]})
            raise
        stories.note(admission={"decision": "admitted", "estimated_tokens": tokens})
        state = request.scope["state"]
        if TrafficMiddleware.KEY not in state and BATCH_SCOPE not in request.scope:
            state[TrafficMiddleware.KEY] = model  # the middleware ends it with the response
            self.traffic.begin(model)
