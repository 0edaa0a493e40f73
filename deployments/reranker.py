"""Reranker replica: scores (query, document) pairs gathered from concurrent requests.

Token budgets are enforced here, next to the tokenizer: by default an over-long document is cut
by the engine (and counted); `truncate=False` turns that into a 400 naming the document, and
`max_tokens_per_doc` cuts every document to that many tokens first. Models with prompt templates
(Qwen3-Reranker) get documents cut *before* wrapping, so the template's suffix is never cut off.
"""

from __future__ import annotations

import asyncio

from deployments.encoder_server import EncoderServer
from deployments.engines.base import Scored
from deployments.protocol import RerankRequest, RerankResult
from serve_app.errors import InvalidRequest, preparing


class RerankerServer(EncoderServer):
    async def rerank(self, req: RerankRequest) -> RerankResult:
        with preparing("the query and documents", "documents"):
            query, docs, pre_cut = await asyncio.to_thread(self._fit, req)
        scored = await self._run_all([(query, d) for d in docs], "documents", req.offset, req.request_id)
        return RerankResult(
            scores=[float(s.value) for s in scored],
            prompt_tokens=sum(s.tokens for s in scored),
            truncated_documents=sum(s.truncated or i in pre_cut for i, s in enumerate(scored)),
            replica=self.replica,
        )

    def _fit(self, req: RerankRequest) -> tuple[str, list[str], set[int]]:
        q_tmpl, d_tmpl = self.cfg.query_template, self.cfg.document_template
        query = q_tmpl.format(query=req.query) if q_tmpl else req.query
        docs, cut = list(req.documents), set()
        if req.truncate and not req.max_tokens_per_doc and not d_tmpl:
            return query, docs, cut  # the engine cuts and counts
        counts = self.engine.count_tokens(docs)
        overhead = self.engine.count_tokens([d_tmpl.format(document="")])[0] if d_tmpl else 0
        budget = self.engine.doc_budget(query) - overhead
        if not req.truncate:
            for i, n in enumerate(counts):
                if n > budget:
                    idx = req.offset + i
                    raise InvalidRequest(
                        f"documents[{idx}] has {n} tokens; with this query the model takes at most {budget} "
                        f"document tokens ({self.engine.max_input_tokens} in all), and truncate is false",
                        f"documents.{idx}",
                    )
        limit = min(budget, req.max_tokens_per_doc or budget)
        for i, n in enumerate(counts):
            if n > limit:
                docs[i] = self.engine.truncate_text(docs[i], limit)
                cut.add(i)
        if d_tmpl:
            docs = [d_tmpl.format(document=d) for d in docs]
        return query, docs, cut

    def _forward(self, pairs: list[tuple[str, str]]) -> list[Scored]:
        return self.engine.score_pairs(pairs)

    def _probe_item(self) -> tuple[str, str]:
        return ("ping", "pong")
