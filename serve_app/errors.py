"""One error hierarchy for the whole request path, mapped to HTTP status codes in one place.

Replicas raise these too (they pickle through Ray), so a client mistake detected next to the
tokenizer reaches the client as the same 4xx the router would have produced. No starlette here:
replicas import this module. Ray's exceptions are matched by type (`from_exception`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any


class ApiError(Exception):
    status: int = 500
    type: str = "internal_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message, param, retry_after)  # args must mirror __init__ for pickling across Ray
        self.message = message
        self.param = param
        self.retry_after = retry_after  # seconds, sent as Retry-After with 429/503

    def body(self, request_id: str | None) -> dict[str, Any]:
        """OpenAI's error shape, plus the request id so a client report can be traced."""
        err: dict[str, Any] = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        if request_id:
            err["request_id"] = request_id
        return {"error": err}


class InvalidRequest(ApiError):
    status, type, code = 400, "invalid_request_error", "invalid_request"


class UnsupportedParameter(InvalidRequest):
    code = "unsupported_parameter"


class Unauthorized(ApiError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class Forbidden(ApiError):
    status, type, code = 403, "permission_error", "admin_key_required"


class RateLimited(ApiError):
    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"


class RequestTooLarge(RateLimited):
    """Over the key's whole quota: no wait makes it pass (OpenAI answers such a request 429 too), so
    it has its own code and no Retry-After, and a batch line that gets it fails instead of waiting."""

    code = "request_too_large"


class ModelNotFound(ApiError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class NotFound(ApiError):
    status, type, code = 404, "invalid_request_error", "not_found"


class MethodNotAllowed(ApiError):
    status, type, code = 405, "invalid_request_error", "method_not_allowed"


class PayloadTooLarge(ApiError):
    status, type, code = 413, "invalid_request_error", "payload_too_large"


class ServiceUnavailable(ApiError):
    status, type, code = 503, "service_unavailable", "model_unavailable"


class StoreUnavailable(ServiceUnavailable):
    """The usage store (Redis or SQLite) did not answer; the models may be fine."""

    code = "store_unavailable"


class Overloaded(ServiceUnavailable):
    """The model's bounded queue is full: try a fallback, do not retry the same model."""

    code = "model_overloaded"


class ReplicaFailed(ServiceUnavailable):
    """The replica died or vanished mid-request: safe to retry on another replica."""

    code = "replica_failed"
    replica: dict[str, str | None] | None = None  # which one, where Ray's error says (dead_replica)


class ContextLengthExceeded(InvalidRequest):
    """The input does not fit this model's context: a context-window fallback may take it."""

    code = "context_length_exceeded"


class GatewayTimeout(ApiError):
    status, type, code = 504, "timeout_error", "deadline_exceeded"


class EngineFailure(ApiError):
    """The model failed on a valid request: our fault, never the client's."""

    status, type, code = 500, "internal_error", "engine_error"


class InputFailed(InvalidRequest):
    """The model fails on this input while it serves others (and its own probe): the request is
    the cause, so it is the client's 4xx and never counts against the model's circuit."""

    code = "input_failed"


@contextlib.contextmanager
def preparing(what: str, param: str | None = None) -> Iterator[None]:
    """Around a replica's preparation of one request (templating, tokenizing, truncating): what
    fails there fails because of that request, so it is the request's 400, not an engine failure."""
    try:
        yield
    except ApiError:
        raise
    except Exception as exc:  # noqa: BLE001 - the request's own input is the cause
        raise InvalidRequest(f"could not prepare {what} for this model: {type(exc).__name__}: {str(exc)[:200]}", param) from None


def from_exception(exc: BaseException) -> ApiError:
    """Map anything raised on the request path to an ApiError, by type; Ray's wrappers are unwrapped."""
    from ray import exceptions as rx
    from ray.serve import exceptions as sx

    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, rx.RayTaskError) and isinstance(exc.cause, ApiError):
        return exc.cause  # the replica's own typed error
    if isinstance(exc, sx.BackPressureError):
        return Overloaded("the model's queue is full; retry later", retry_after=_retry_after(exc.retry_after_s))
    if isinstance(exc, sx.DeploymentUnavailableError):
        return ServiceUnavailable("the model's deployment is unavailable (it failed to deploy); retry later", retry_after=10)
    if isinstance(exc, (rx.RayActorError, rx.WorkerCrashedError, rx.NodeDiedError, rx.ObjectLostError,
                        sx.ReplicaUnavailableError)):
        # ActorDiedError, ActorUnavailableError are RayActorErrors; OwnerDiedError an ObjectLostError.
        failed = ReplicaFailed("the replica serving this request died; retry")
        failed.replica = dead_replica(str(exc), getattr(exc, "actor_id", None))
        return failed
    cause = exc.cause if isinstance(exc, rx.RayTaskError) else exc
    return EngineFailure(f"internal error ({type(cause).__name__}); see the server logs with this request id")


_ACTOR_NAME = re.compile(r"\bname: (\S+)")
_ACTOR_IP = re.compile(r"\bip: (\S+)")
REPLICA_ACTOR_PREFIX = "SERVE_REPLICA::"  # Serve's replica actors: SERVE_REPLICA::app#deployment#replica_id


def replica_of_actor_name(name: str) -> str | None:
    """The Serve replica id in a replica actor's name, or None for any other actor."""
    if not name.startswith(REPLICA_ACTOR_PREFIX) or name.count("#") < 2:
        return None
    return name.rsplit("#", 1)[-1]


def dead_replica(message: str, actor_id: str | None = None) -> dict[str, str | None] | None:
    """Which Serve replica died, for the request's story: as Ray's ActorDiedError names it ("name:
    SERVE_REPLICA::app#dep#id", "ip: ..."), else its actor id alone (Serve's gRPC path raises
    "actor ... is unavailable"; the story resolves it when read: status.find_story). None when Ray
    said neither (a lost node)."""
    name = _ACTOR_NAME.search(message)
    replica = replica_of_actor_name(name.group(1)) if name else None
    if replica is None:
        return {"actor_id": actor_id} if isinstance(actor_id, str) and actor_id else None
    ip = _ACTOR_IP.search(message)
    return {"replica": replica, "node_ip": ip.group(1) if ip else None}


def _retry_after(seconds: float | None) -> int:
    return max(1, round(seconds)) if seconds else 1
