"""Shared shape of encoder replicas (reranker, embedder): one engine, one `@serve.batch` queue.

The batch works on single inputs (a (query, document) pair or a text), not on requests, so a
forward pass is filled from as many requests as are waiting: many small requests and one long
list batch alike. `max_batch_size` / `batch_wait_timeout_s` come from `user_config`: a
`serve deploy` that overrides it in the app's `deployments:` section retunes running replicas in
place (changing `args` instead gives the app a new code version and replaces them).
"""

from __future__ import annotations

import asyncio
import collections
import pathlib
import time
from typing import Any

from ray import serve

from deployments.engines.base import Encoder, Scored
from deployments.engines.build import build_encoder
from deployments.health import POISON_MARKER, MonitoredReplica
from deployments.protocol import ModelCard
from deployments.runtime import replica_info
from serve_app.config import BatchSettings, ModelConfig
from serve_app.errors import InputFailed


class EncoderServer(MonitoredReplica):
    def __init__(self, model: ModelConfig, models_dir: str) -> None:
        born = time.monotonic()
        self.cfg = model
        self.replica = replica_info(model.name)
        # The GPUs Ray assigned decide the device: a replica without any still sees the node's GPUs.
        self.engine: Encoder = build_encoder(model, model.resolved_source(pathlib.Path(models_dir)),
                                             gpu_ids=self.replica.gpu_ids)
        self.largest_batch = 0
        self.forward_passes = 0
        self.recent_batches: collections.deque[int] = collections.deque(maxlen=1024)
        self._init_health()
        self.reconfigure(model.batch.model_dump())
        self.load_s = round(time.monotonic() - born, 1)  # what a cold start of this model waits for

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this on start and on every `user_config` change."""
        batch = BatchSettings.model_validate(user_config)
        self._batched.set_max_batch_size(batch.max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch.batch_wait_timeout_s)
        if hasattr(self.engine, "max_batch_tokens"):  # vLLM schedules its own passes
            self.engine.max_batch_tokens = batch.max_batch_tokens
        self.batching = batch  # Serve exposes no public getter for the live values

    async def card(self) -> ModelCard:
        return ModelCard(self.cfg.name, self.cfg.kind.value, self.cfg.engine.value,
                         self.engine.max_input_tokens, self.replica, self.batching.model_dump(), self.largest_batch,
                         forward_passes=self.forward_passes, device=self.engine.device, dtype=self.engine.dtype)

    async def batch_sizes(self, since: int = 0) -> list[int]:
        """Sizes of the forward passes after the `since`-th (a card's `forward_passes`), the most
        recent 1,024 at most: how full batches really run, for tuning and for tests."""
        count = self.forward_passes - since
        return list(self.recent_batches)[-count:] if count > 0 else []

    async def _run_all(self, items: list[Any], param: str = "input", offset: int = 0,
                       request_id: str | None = None) -> list[Scored]:
        """Every item through the shared batch queue; a failed item names itself as `param.N`."""
        with self.tracked(request_id):
            out = await asyncio.gather(*(self._batched(item) for item in items))
        failed = [(i, r) for i, r in enumerate(out) if isinstance(r, BaseException)]
        if failed:
            i, err = failed[0]
            raise InputFailed(
                f"{param}[{offset + i}] failed in the model while other inputs were served "
                f"({type(err).__name__}: {str(err)[:200]}); {len(failed)} input(s) failed in all", f"{param}.{offset + i}",
            )
        return out

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _batched(self, items: list[Any]) -> list[Scored | BaseException]:
        """One forward pass for the batch. If it fails, each input is run alone so one client's
        poison input fails only its own request; if every input fails alone too, the model is
        what is broken and every request in the batch gets the engine's error."""
        self.largest_batch = max(self.largest_batch, len(items))
        self.forward_passes += 1
        self.recent_batches.append(len(items))
        # The forward pass releases the GIL; a thread keeps the replica's event loop responsive.
        try:
            out: list[Scored | BaseException] = await asyncio.to_thread(self._guarded_forward, items)
        except Exception as batch_error:  # noqa: BLE001 - isolated below
            if len(items) == 1:
                raise
            out = await asyncio.to_thread(self._forward_each, items)
            if all(isinstance(r, BaseException) for r in out):
                raise batch_error
        self.health.progress()
        return out

    def _forward_each(self, items: list[Any]) -> list[Scored | BaseException]:
        out: list[Scored | BaseException] = []
        for item in items:
            try:
                out.extend(self._guarded_forward([item]))
            except Exception as exc:  # noqa: BLE001 - handed to that input's request only
                out.append(exc)
        return out

    def _guarded_forward(self, items: list[Any]) -> list[Scored]:
        while self.fault == "stall":  # injected: work stops progressing, as a wedged engine would
            time.sleep(0.05)
        if self.fault == "poison" and any(POISON_MARKER in str(item) for item in items):
            raise ValueError("injected poison input")
        return self._forward(items)

    async def _probe(self) -> None:
        """A real forward pass, beside the batch queue rather than behind it."""
        await asyncio.to_thread(self._forward, [self._probe_item()])

    def _probe_item(self) -> Any:
        raise NotImplementedError

    def _forward(self, items: list[Any]) -> list[Scored]:
        raise NotImplementedError
