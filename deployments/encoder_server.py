"""Shared shape of encoder replicas (reranker, embedder): one engine, one `@serve.batch` queue.

The batch works on single inputs (a (query, document) pair or a text), not on requests, so a
forward pass is filled from as many requests as are waiting: many small requests and one long
list batch alike. `max_batch_size` / `batch_wait_timeout_s` come from `user_config`: a
`serve deploy` that overrides it in the app's `deployments:` section retunes running replicas in
place (changing `args` instead gives the app a new code version and replaces them).
"""

from __future__ import annotations

import asyncio
import pathlib
import time
from typing import Any

from ray import serve

from deployments.engines import Encoder, Scored, build_encoder
from deployments.health import MonitoredReplica
from deployments.protocol import ModelCard
from deployments.runtime import replica_info
from serve_app.config import BatchSettings, ModelConfig


class EncoderServer(MonitoredReplica):
    def __init__(self, model: ModelConfig, models_dir: str) -> None:
        self.cfg = model
        self.engine: Encoder = build_encoder(model, model.resolved_source(pathlib.Path(models_dir)))
        self.replica = replica_info(model.name)
        self.largest_batch = 0
        self._init_health()
        self.reconfigure(model.batch.model_dump())

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this on start and on every `user_config` change."""
        batch = BatchSettings.model_validate(user_config)
        self._batched.set_max_batch_size(batch.max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch.batch_wait_timeout_s)
        self.batching = batch  # Serve exposes no public getter for the live values

    async def card(self) -> ModelCard:
        return ModelCard(self.cfg.name, self.cfg.kind.value, self.cfg.engine.value,
                         self.engine.max_input_tokens, self.replica, self.batching.model_dump(), self.largest_batch)

    async def _run_all(self, items: list[Any]) -> list[Scored]:
        with self.tracked():
            return await asyncio.gather(*(self._batched(item) for item in items))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _batched(self, items: list[Any]) -> list[Scored]:
        self.largest_batch = max(self.largest_batch, len(items))
        # The forward pass releases the GIL; a thread keeps the replica's event loop responsive.
        out = await asyncio.to_thread(self._guarded_forward, items)
        self.health.progress()
        return out

    def _guarded_forward(self, items: list[Any]) -> list[Scored]:
        while self.fault == "stall":  # injected: work stops progressing, as a wedged engine would
            time.sleep(0.05)
        return self._forward(items)

    async def _probe(self) -> None:
        """A real forward pass, beside the batch queue rather than behind it."""
        await asyncio.to_thread(self._forward, [self._probe_item()])

    def _probe_item(self) -> Any:
        raise NotImplementedError

    def _forward(self, items: list[Any]) -> list[Scored]:
        raise NotImplementedError
