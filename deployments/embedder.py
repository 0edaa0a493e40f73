"""Embedding replica: texts from concurrent requests share one forward pass."""

from __future__ import annotations

from deployments.encoder_server import EncoderServer
from deployments.engines.base import Scored
from deployments.protocol import EmbedRequest, EmbedResult


class EmbedderServer(EncoderServer):
    async def embed(self, req: EmbedRequest) -> EmbedResult:
        out = await self._run_all(req.inputs, request_id=req.request_id)
        return EmbedResult(
            vectors=[list(s.value) for s in out],
            prompt_tokens=sum(s.tokens for s in out),
            truncated_inputs=sum(s.truncated for s in out),
            replica=self.replica,
        )

    def _forward(self, texts: list[str]) -> list[Scored]:
        return self.engine.embed(texts)

    def _probe_item(self) -> str:
        return "ping"
