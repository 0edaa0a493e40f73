"""Generation: chat and completions (JSON or SSE), tokenize and detokenize.

vLLM's own OpenAI layer runs in the replica; the router reads only what it owns of a body (model,
stream, the token estimate for quotas) and passes the body on as the client sent it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response

from deployments.protocol import ReplicaInfo, StreamItem, as_stream_item
from serve_app import stories
from serve_app.api import openai
from serve_app.body import read_object, validate
from serve_app.config import ModelKind
from serve_app.errors import ReplicaFailed, from_exception
from serve_app.handlers.context import Context
from serve_app.http import json_response, request_id, sse_response
from serve_app.llm_routing import registry
from serve_app.metrics import RouterMetrics
from serve_app.middleware import BATCH_SCOPE
from serve_app.migration.eligibility import migration_refusal
from serve_app.migration.track import Track
from serve_app.replica_calls import with_deadline
from serve_app.resilience import call_replica
from serve_app.status import report_migration

logger = logging.getLogger("ray.serve")


class LLMHandlers:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, "chat", openai.ChatEnvelope)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completion", openai.CompletionEnvelope)

    async def tokenize(self, request: Request) -> Response:
        return await self._tokenization(request, "tokenize")

    async def detokenize(self, request: Request) -> Response:
        return await self._tokenization(request, "detokenize")

    async def _generate(self, request: Request, api: str, shape: type[openai.LLMEnvelope]) -> Response:
        """The body goes to the replica as the client sent it (after strict parsing); the router
        checks the fields it needs for routing, quotas and streaming, vLLM validates the rest."""
        ctx = self.ctx
        data = await read_object(request, ctx.gateway.max_body_bytes)
        env = validate(shape, data)
        model = ctx.check_model(request, env.model, ModelKind.llm)
        base = ctx.base_of(model)  # an adapter's requests take its base model's replicas
        await ctx.admit(request, base, env.estimated_tokens(ctx.gateway.default_max_tokens))
        rid = request_id(request)
        if env.stream:
            return await self._stream(request, model, api, data, rid, env.estimated_prompt_tokens(), env.n or 1)
        served, result = await ctx.dispatch.run(base, lambda h, left: call_replica(h.create.remote(api, data, rid), left),
                                                fallbacks=base == model, prompt_tokens=_queued(request, env.estimated_prompt_tokens()))
        use = result.body.get("usage") or {}
        stories.note(engine=getattr(result, "engine", None))  # an older replica (rolling update) sends none
        ctx.tenancy.served(request, _counted_as(model, base, served), use.get("prompt_tokens") or 0,
                           use.get("completion_tokens") or 0)
        return with_routing(json_response(result.body, result.replica), rid, data, ctx.metrics, base)

    async def _stream(self, request: Request, model: str, api: str, data: dict[str, Any], rid: str,
                      prompt_estimate: int, choices: int) -> Response:
        """SSE stream. The first item (it carries the first token) is awaited before answering,
        with retries and fallbacks, so failures before any token get a real status code. A replica
        lost after that is replaced mid-stream where the stream can continue exactly (`_continue`);
        other failures end the stream in-band. Each item holds every event the engine produced
        since the last one, written as one block.

        A stream that ends before vLLM's usage (the client left, or the replica failed) is charged
        and recorded with what was forwarded: the prompt's estimate and one token per event sent
        (`forwarded_tokens`), so leaving early is no way around a quota or /v1/usage."""
        ctx = self.ctx
        base = ctx.base_of(model)
        refusal = migration_refusal(api, data, ctx.models[base])
        track = Track() if refusal is None else None
        extra = {"track": True} if track is not None else {}  # a replica of an older release takes no `track`

        async def open_stream(handle: DeploymentHandle, left: float) -> tuple[Any, StreamItem]:
            try:
                stream = handle.options(stream=True).create_stream.remote(api, data, rid, **extra)
                return stream, await _first_item(stream, left)
            except Exception as exc:
                if not extra or not _takes_no_track(exc):
                    raise
            # A replica of the release before migration (a rolling update): the stream, untracked.
            stream = handle.options(stream=True).create_stream.remote(api, data, rid)
            return stream, await _first_item(stream, left)

        stories.note(stream=True)
        # No fallback model serves an adapter: another model's answer would pass for the fine-tune's.
        answered, (stream, first) = await ctx.dispatch.run(base, open_stream, fallbacks=base == model,
                                                           prompt_tokens=_queued(request, prompt_estimate))
        registry.first_token(rid, data)  # the prefill is done: the cost-aware router stops counting the prompt
        served = _counted_as(model, base, answered)
        if answered != base:  # a fallback's stream continues only on the fallback (its tokenizer, its rules)
            refusal = migration_refusal(api, data, ctx.models[answered])
            track = Track() if refusal is None else None
        started = request.scope["state"].get("started")
        if started is not None:
            first_token_ms = (time.perf_counter() - started) * 1000
            ctx.metrics.first_token(served, first_token_ms)
            stories.note(first_token_ms=round(first_token_ms, 1))

        replica: ReplicaInfo = first[2]
        serving = [replica]  # the replica streaming now (a continuation's replaces it)
        want_usage = bool((data.get("stream_options") or {}).get("include_usage"))

        async def blocks() -> AsyncIterator[bytes]:
            nonlocal stream
            usage, chunk, events = None, first, 0
            try:
                while True:
                    usage = chunk[1] or usage
                    events += len(chunk[0])
                    if track is not None:
                        track.add(chunk)
                    yield "".join(f"data: {e}\n\n" for e in chunk[0]).encode()
                    try:
                        chunk = as_stream_item(await stream.__anext__())
                    except StopAsyncIteration:
                        break
                    except Exception as exc:  # noqa: BLE001 - a lost replica: continue elsewhere, or end in-band
                        err = from_exception(exc)
                        if not isinstance(err, ReplicaFailed):
                            raise err from exc  # an engine error in a live replica may be the input's doing
                        if track is not None and track.finish is not None:  # only the usage chunk and [DONE] were lost
                            tail, usage = track.ending(api, want_usage)
                            yield "".join(f"data: {e}\n\n" for e in tail).encode()
                            break
                        stream.cancel()
                        stream, chunk = await self._continue(answered, api, data, rid, track, refusal, err, serving, events)
            except Exception as exc:  # noqa: BLE001 - mid-stream: report in-band with the request id
                err = from_exception(exc)
                stories.note_error(err, mid_stream=True)
                yield f"data: {json.dumps(err.body(rid))}\n\ndata: [DONE]\n\n".encode()
            finally:
                stream.cancel()  # normal end: no-op; client gone or error: frees the engine's work
                # Settled once, however the stream ended (a client that left ends it here, by GeneratorExit).
                if usage:
                    stories.note(engine=usage.get("engine"))
                    ctx.tenancy.served(request, served, usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0)
                else:
                    ctx.tenancy.served(request, served, prompt_estimate, forwarded_tokens(events, api, choices))

        return with_routing(sse_response(blocks(), replica), rid, data, ctx.metrics, base)

    async def _continue(self, base: str, api: str, data: dict[str, Any], rid: str, track: Track | None,
                        refusal: tuple[str, str] | None, err: ReplicaFailed,
                        serving: list[ReplicaInfo], events: int) -> tuple[Any, StreamItem]:
        """The rest of a stream whose replica was lost after its first token, from another replica
        of the same model (`base`: the one whose replicas streamed it; docs/MIGRATION.md); raises the
        error to send in-band when it cannot. `serving[0]`: the replica that was streaming; replaced
        by the one that continues. `events`: forwarded so far (an untracked stream's measure)."""
        ctx = self.ctx
        lost = serving[0].replica_id
        if track is None or not track.ready:
            reason, words = refusal or ("untracked", "the replica sent no token ids")
            self._migration(base, "refused", reason, rid, lost, events)
            err.message = f"{err.message}; this stream cannot continue on another replica: {words} (docs/MIGRATION.md)"
            raise err
        if track.continued >= ctx.models[base].migration.attempts:
            self._migration(base, "refused", "attempts", rid, lost, len(track.ids))
            err.message = f"{err.message}; this stream was continued {track.continued} time(s) already, the most allowed"
            raise err
        track.continued += 1
        resume = track.resume()

        async def open_resume(handle: DeploymentHandle, left: float) -> tuple[Any, StreamItem]:
            stream = handle.options(stream=True).resume_stream.remote(api, data, rid, resume)
            return stream, await _first_item(stream, left)

        try:
            _, (stream, first) = await ctx.dispatch.run(base, open_resume, fallbacks=False)
        except Exception as exc:  # noqa: BLE001 - no replica took it: the original failure, with why
            failed = from_exception(exc)
            self._migration(base, "failed", "no_replica", rid, lost, len(track.ids))
            err.message = f"{err.message}; continuing the stream on another replica failed: {failed.message}"
            raise err from exc
        to = first[2] if len(first) > 2 else None
        self._migration(base, "continued", "replica_lost", rid, lost, len(track.ids), to)
        if to is not None:
            serving[0] = to
        return stream, first

    def _migration(self, model: str, outcome: str, reason: str, rid: str, lost: str, tokens: int,
                   to: ReplicaInfo | None = None) -> None:
        """One continuation decision: metric, /v1/status count, log line, the request's story, and
        (continued) the status board, whose replica-gone alert names the requests moved off it.
        `tokens`: sent before the loss (an untracked stream: events forwarded, an upper bound)."""
        ctx = self.ctx
        ctx.metrics.migration(model, outcome, reason)
        key = (f"stream_{outcome}", model)
        ctx.events[key] = ctx.events.get(key, 0) + 1
        where = f" on replica {to.replica_id}" if to is not None else ""
        logger.warning("stream %s%s after replica %s was lost at completion token %d (%s)",
                       outcome, where, lost, tokens, reason)
        stories.migrated({"outcome": outcome, "reason": reason, "lost_replica": lost, "at_token": tokens,
                          "to_replica": to.replica_id if to is not None else None})
        if outcome == "continued":
            report_migration(model, lost, rid)

    async def _tokenization(self, request: Request, method: str) -> Response:
        """vLLM's /tokenize and /detokenize, by the model named in the body."""
        ctx = self.ctx
        data = await read_object(request, ctx.gateway.max_body_bytes)
        env = validate(openai.ModelOnly, data)
        model = ctx.check_model(request, env.model, ModelKind.llm)
        base = ctx.base_of(model)
        await ctx.admit(request, base, 0)
        served, result = await ctx.dispatch.run(
            base, lambda h, left: call_replica(getattr(h, method).remote(data), left), fallbacks=False)
        return json_response(result.body, result.replica)


def _queued(request: Request, prompt_tokens: int) -> int:
    """What the request weighs in its model's token queue: its prompt; a batch line nothing (it
    runs on spare capacity and must not make interactive requests wait or be refused)."""
    return 0 if BATCH_SCOPE in request.scope else prompt_tokens


async def _first_item(stream: Any, left: float) -> StreamItem:
    """A stream's first item within the deadline; the stream is cancelled if it does not come."""
    try:
        return as_stream_item(await with_deadline(stream.__anext__(), left))
    except BaseException:
        stream.cancel()
        raise


def _takes_no_track(exc: BaseException) -> bool:
    """The replica's create_stream predates `track` (Ray wraps its TypeError; a local call raises it)."""
    words = "unexpected keyword argument 'track'"
    return words in str(exc) or words in str(exc.__cause__ or "")


def _counted_as(model: str, base: str, served: str) -> str:
    """The name usage is recorded under: the adapter for an adapter's request, else the model
    that served (a fallback's own name)."""
    return model if model != base else served


def with_routing(response: Response, rid: str, data: dict[str, Any], metrics: RouterMetrics | None = None,
                 model: str = "") -> Response:
    """The cost-aware router's decision for this request (serve_app/llm_routing/), if it made one:
    logged under the request id and sent as a header, so a slow answer can be traced to a guess,
    and counted per replica in Prometheus beside vLLM's own prefix-cache counters."""
    decision = registry.pop_decision(rid, data)
    if decision is not None:
        replica, cached, prompt_tokens = decision
        stories.note(routing={"replica": replica, "predicted_cached_tokens": cached, "prompt_tokens": prompt_tokens})
        logger.info("routed to replica %s, predicted cached prompt tokens %d of %d", replica, cached, prompt_tokens)
        response.headers["x-predicted-cached-tokens"] = str(cached)
        if metrics is not None:
            metrics.routed(model, replica, prompt_tokens, cached)
    return response


def forwarded_tokens(events: int, api: str, choices: int = 1) -> int:
    """Tokens generated, as far as the events forwarded tell: vLLM sends one event per engine step
    of a choice (one token), plus a role-only first event per choice in chat. An upper bound where
    the detokenizer held text back; counted only for a stream that ended before vLLM's usage."""
    return max(0, events - (choices if api == "chat" else 0))
