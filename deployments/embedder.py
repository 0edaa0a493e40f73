"""Embedding replica: texts from concurrent requests share one forward pass via `@serve.batch`."""

from __future__ import annotations

import asyncio
import pathlib

from ray import serve

from deployments.engines import Scored, build_encoder
from deployments.protocol import EmbedRequest, EmbedResult, ModelCard
from deployments.runtime import replica_info
from serve_app.config import BatchSettings, ModelConfig


class EmbedderServer:
    def __init__(self, model: ModelConfig, models_dir: str) -> None:
        self.cfg = model
        self.engine = build_encoder(model, model.resolved_source(pathlib.Path(models_dir)))
        self.replica = replica_info(model.name)
        self.reconfigure(model.batch.model_dump())

    def reconfigure(self, user_config: dict) -> None:
        batch = BatchSettings.model_validate(user_config)
        self._embed.set_max_batch_size(batch.max_batch_size)
        self._embed.set_batch_wait_timeout_s(batch.batch_wait_timeout_s)

    async def card(self) -> ModelCard:
        return ModelCard(self.cfg.name, "embed", self.cfg.engine.value, self.engine.max_input_tokens, self.replica)

    async def embed(self, req: EmbedRequest) -> EmbedResult:
        out: list[Scored] = await asyncio.gather(*(self._embed(t) for t in req.inputs))
        return EmbedResult(
            vectors=[list(s.value) for s in out],
            prompt_tokens=sum(s.tokens for s in out),
            truncated_inputs=sum(s.truncated for s in out),
            replica=self.replica,
        )

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _embed(self, texts: list[str]) -> list[Scored]:
        return await asyncio.to_thread(self.engine.embed, texts)
