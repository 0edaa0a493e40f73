"""Encoders: embeddings, rerank (Jina and Cohere shapes) and vLLM's /score.

Long rerank lists are split into chunks (serve_app/fanout.py) served concurrently by every replica
of the model, then merged; one model scores every document of a request, since scores of two
models are not comparable.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from deployments.protocol import EmbedRequest, RerankRequest
from serve_app.admission import estimate_tokens
from serve_app.api import openai, rerank
from serve_app.body import parse_body
from serve_app.config import ModelKind
from serve_app.errors import PayloadTooLarge
from serve_app.fanout import plan_chunks
from serve_app.handlers.context import Context
from serve_app.http import json_response, request_id
from serve_app.replica_calls import gather_all
from serve_app.resilience import call_replica


class ScoringHandlers:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def embeddings(self, request: Request) -> Response:
        ctx = self.ctx
        body = await parse_body(request, openai.EmbeddingRequest, ctx.gateway.max_body_bytes, openai.UNSUPPORTED_EMBEDDING_PARAMS)
        model = ctx.check_model(request, body.model, ModelKind.embed)
        if len(body.input) > ctx.gateway.max_documents:
            raise PayloadTooLarge(f"{len(body.input)} inputs exceed the limit of {ctx.gateway.max_documents} per request", "input")
        await ctx.admit(request, model, estimate_tokens(*body.input))
        req = EmbedRequest(request_id(request), body.input)
        served, result = await ctx.dispatch.run(body.model, lambda h, left: call_replica(h.embed.remote(req), left))
        ctx.tenancy.served(request, served, result.prompt_tokens, truncated=result.truncated_inputs)
        return json_response(openai.embedding_list(served, result.vectors, body.encoding_format, result.prompt_tokens), result.replica)

    async def rerank_jina(self, request: Request) -> Response:
        body = await parse_body(request, rerank.JinaRerankRequest, self.ctx.gateway.max_body_bytes)
        return await self._rerank(request, rerank.to_query(body), rerank.jina_response)

    async def rerank_cohere(self, request: Request) -> Response:
        body = await parse_body(request, rerank.CohereRerankRequest, self.ctx.gateway.max_body_bytes)
        return await self._rerank(request, rerank.to_query(body), rerank.cohere_response)

    async def _rerank(self, request: Request, q: rerank.RerankQuery, shape: Callable[..., dict[str, Any]]) -> Response:
        ctx = self.ctx
        model = ctx.check_model(request, q.model, ModelKind.rerank)
        if len(q.documents) > ctx.gateway.max_documents:
            raise PayloadTooLarge(f"{len(q.documents)} documents exceed the limit of {ctx.gateway.max_documents} per request", "documents")
        await ctx.admit(request, model, estimate_tokens(*q.documents) + estimate_tokens(q.query) * len(q.documents))
        rid = request_id(request)
        served, results = await self._score(q, rid, fallbacks=True)
        q = dataclasses.replace(q, model=served)
        scores = [s for r in results for s in r.scores]
        truncated = sum(r.truncated_documents for r in results)
        prompt_tokens = sum(r.prompt_tokens for r in results)
        ctx.tenancy.served(request, q.model, prompt_tokens, truncated=truncated)
        return _scored_response(shape(rid, q, scores, prompt_tokens, truncated), results, truncated)

    async def score(self, request: Request) -> Response:
        """vLLM's /score shape: one text against many, or pairwise; each distinct left text is one
        rerank of its right texts through the same path as /v1/rerank."""
        ctx = self.ctx
        body = await parse_body(request, rerank.ScoreRequest, ctx.gateway.max_body_bytes)
        groups = body.groups()
        model = ctx.check_model(request, body.model, ModelKind.rerank)
        pairs = sum(len(g) for g in groups.values())
        if pairs > ctx.gateway.max_documents:
            raise PayloadTooLarge(f"{pairs} pairs exceed the limit of {ctx.gateway.max_documents} per request", "text_2")
        await ctx.admit(request, model, sum(estimate_tokens(t) + estimate_tokens(q) for q, g in groups.items() for _, t in g))
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
        ctx.tenancy.served(request, served, prompt_tokens, truncated=truncated)
        return _scored_response(rerank.score_response(rid, served, [scores[i] for i in sorted(scores)], prompt_tokens),
                                results, truncated)

    async def _score(self, q: rerank.RerankQuery, rid: str, fallbacks: bool) -> tuple[str, list[Any]]:
        """(model that scored, its RerankResults in document order) for one query's documents."""
        model = self.ctx.models[q.model]
        # Every chunk is one call in the model's Serve queue: never more than its replicas run at once.
        max_chunks = min(self.ctx.gateway.rerank_max_parallel_chunks, model.capacity)
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
            asyncio.ensure_future(self.ctx.dispatch.run(model, lambda h, left, r=r: call_replica(h.rerank.remote(r), left), fallbacks))
            for r in requests
        ]
        return await gather_all(calls)


def _scored_response(body: dict[str, Any], results: list[Any], truncated: int) -> Response:
    """Served-by headers naming every replica that scored a chunk, and how many documents were cut."""
    response = json_response(body, results[0].replica)
    response.headers["x-served-replica"] = ",".join(dict.fromkeys(r.replica.replica_id for r in results))
    response.headers["x-truncated-documents"] = str(truncated)
    return response
