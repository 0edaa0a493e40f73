"""LLM replica: one vLLM engine (possibly tensor-parallel) serving typed generate calls."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator

from deployments.engines.vllm_generate import VLLMGenerator
from deployments.health import MonitoredReplica
from deployments.protocol import Choice, GenerateRequest, GenerationDelta, GenerationResult, ModelCard, SamplingOptions
from deployments.runtime import replica_info
from serve_app.config import ModelConfig
from serve_app.errors import preparing


class LLMServer(MonitoredReplica):
    def __init__(self, model: ModelConfig, models_dir: str, default_max_tokens: int) -> None:
        self.cfg = model
        self.default_max_tokens = default_max_tokens
        self.engine = VLLMGenerator(model, model.resolved_source(pathlib.Path(models_dir)))
        self.replica = replica_info(model.name)
        self._init_health()

    async def card(self) -> ModelCard:
        return ModelCard(self.cfg.name, "llm", "vllm", self.engine.max_model_len, self.replica,
                         sampling_defaults=self.engine.model_defaults, device=self.engine.device, dtype=self.engine.dtype)

    async def generate(self, req: GenerateRequest) -> GenerationResult:
        prompt_ids, max_tokens = self._prepare(req)
        texts = [""] * req.sampling.n
        reasons: list = [None] * req.sampling.n
        completion = 0
        with self.tracked() as health:
            async for deltas, completion in self.engine.generate(req.request_id, prompt_ids, req.sampling, max_tokens):
                health.progress()
                for d in deltas:
                    texts[d.index] += d.text
                    reasons[d.index] = d.finish_reason or reasons[d.index]
        choices = [Choice(i, texts[i], reasons[i] or "stop") for i in range(req.sampling.n)]
        return GenerationResult(choices, len(prompt_ids), completion, self.replica)

    async def generate_stream(self, req: GenerateRequest) -> AsyncIterator[GenerationDelta]:
        """Streamed through `handle.options(stream=True)`; cancelling it aborts the engine request."""
        prompt_ids, max_tokens = self._prepare(req)
        with self.tracked() as health:
            async for deltas, completion in self.engine.generate(req.request_id, prompt_ids, req.sampling, max_tokens):
                health.progress()
                yield GenerationDelta(deltas, len(prompt_ids), completion, self.replica)

    def _prepare(self, req: GenerateRequest) -> tuple[list[int], int]:
        if req.messages is not None:
            with preparing("the messages (chat template)", "messages"):
                ids = self.engine.encode_chat(req.messages)
        else:
            with preparing("the prompt", "prompt"):
                ids = self.engine.encode_prompt(req.prompt or "")
        return ids, self.engine.plan_max_tokens(len(ids), req.sampling.max_tokens, self.default_max_tokens)

    async def unfinished_requests(self) -> int:
        """Requests the engine still holds: 0 after a client disconnect means the work was freed."""
        return self.engine.unfinished()

    async def _probe(self) -> None:
        """One real token through the engine (the engine's own ping misses stalls)."""
        await self.engine.check_health()
        ids = self.engine.encode_prompt("ping")
        async for _ in self.engine.generate("health-probe", ids, SamplingOptions(max_tokens=1, temperature=0.0), 1):
            pass

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
