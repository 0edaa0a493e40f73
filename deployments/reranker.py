"""Reranker replica: scores (query, document) pairs gathered from concurrent requests.

Token budgets are enforced here, next to the tokenizer: by default an over-long document is cut
by the engine (and counted); `truncate=False` turns that into a 400 naming the document, and
`max_tokens_per_doc` cuts every document to that many tokens first.
"""

from __future__ import annotations

import asyncio

from deployments.encoder_server import EncoderServer
from deployments.engines import Scored
from deployments.protocol import RerankRequest, RerankResult
from serve_app.errors import InvalidRequest


class RerankerServer(EncoderServer):
    async def rerank(self, req: RerankRequest) -> RerankResult:
        docs, pre_cut = await asyncio.to_thread(self._apply_budget, req)
        scored = await self._run_all([(req.query, d) for d in docs])
        return RerankResult(
            scores=[float(s.value) for s in scored],
            prompt_tokens=sum(s.tokens for s in scored),
            truncated_documents=sum(s.truncated or i in pre_cut for i, s in enumerate(scored)),
            replica=self.replica,
        )

    def _apply_budget(self, req: RerankRequest) -> tuple[list[str], set[int]]:
        docs, cut = list(req.documents), set()
        if req.truncate and not req.max_tokens_per_doc:
            return docs, cut
        counts = self.engine.count_tokens(docs)
        if not req.truncate:
            budget = self.engine.doc_budget(req.query)
            for i, n in enumerate(counts):
                if n > budget:
                    idx = req.offset + i
                    raise InvalidRequest(
                        f"documents[{idx}] has {n} tokens; with this query the model takes at most {budget} "
                        f"document tokens ({self.engine.max_input_tokens} in all), and truncate is false",
                        f"documents.{idx}",
                    )
        if req.max_tokens_per_doc:
            for i, n in enumerate(counts):
                if n > req.max_tokens_per_doc:
                    docs[i] = self.engine.truncate_text(docs[i], req.max_tokens_per_doc)
                    cut.add(i)
        return docs, cut

    def _forward(self, pairs: list[tuple[str, str]]) -> list[Scored]:
        return self.engine.score_pairs(pairs)
