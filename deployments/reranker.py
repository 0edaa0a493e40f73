"""Reranker replica: scores (query, document) pairs gathered from concurrent requests.

`@serve.batch` works on pairs, not requests, so a forward pass is filled from as many
requests as are waiting: many small requests and one long list batch alike.
"""

from __future__ import annotations

import asyncio
import pathlib

from ray import serve

from deployments.engines import Scored, build_encoder
from deployments.protocol import ModelCard, RerankRequest, RerankResult
from deployments.runtime import replica_info
from serve_app.config import BatchSettings, ModelConfig


class RerankerServer:
    def __init__(self, model: ModelConfig, models_dir: str) -> None:
        self.cfg = model
        self.engine = build_encoder(model, model.resolved_source(pathlib.Path(models_dir)))
        self.replica = replica_info(model.name)
        self.reconfigure(model.batch.model_dump())

    def reconfigure(self, user_config: dict) -> None:
        """Serve calls this on start and on every `user_config` change: retune batching in place."""
        batch = BatchSettings.model_validate(user_config)
        self._score.set_max_batch_size(batch.max_batch_size)
        self._score.set_batch_wait_timeout_s(batch.batch_wait_timeout_s)

    async def card(self) -> ModelCard:
        return ModelCard(self.cfg.name, "rerank", self.cfg.engine.value, self.engine.max_input_tokens, self.replica)

    async def batch_settings(self) -> dict:
        return {"max_batch_size": self._score.get_max_batch_size(),
                "batch_wait_timeout_s": self._score.get_batch_wait_timeout_s()}

    async def rerank(self, req: RerankRequest) -> RerankResult:
        scored: list[Scored] = await asyncio.gather(*(self._score((req.query, d)) for d in req.documents))
        return RerankResult(
            scores=[float(s.value) for s in scored],
            prompt_tokens=sum(s.tokens for s in scored),
            truncated_documents=sum(s.truncated for s in scored),
            replica=self.replica,
        )

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _score(self, pairs: list[tuple[str, str]]) -> list[Scored]:
        # The forward pass releases the GIL; a thread keeps the replica's event loop responsive.
        return await asyncio.to_thread(self.engine.score_pairs, pairs)
