"""Reranker replica: scores (query, document) pairs gathered from concurrent requests."""

from __future__ import annotations

from deployments.encoder_server import EncoderServer
from deployments.engines import Scored
from deployments.protocol import RerankRequest, RerankResult


class RerankerServer(EncoderServer):
    async def rerank(self, req: RerankRequest) -> RerankResult:
        scored = await self._run_all([(req.query, d) for d in req.documents])
        return RerankResult(
            scores=[float(s.value) for s in scored],
            prompt_tokens=sum(s.tokens for s in scored),
            truncated_documents=sum(s.truncated for s in scored),
            replica=self.replica,
        )

    def _forward(self, pairs: list[tuple[str, str]]) -> list[Scored]:
        return self.engine.score_pairs(pairs)
