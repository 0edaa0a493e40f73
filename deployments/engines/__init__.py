"""Engine adapters behind one small interface per model kind.

`Encoder` serves rerank and embed replicas (synchronous: replicas run it in a worker thread
inside a `@serve.batch` call); `VLLMGenerator` serves LLM replicas. Heavy imports (torch,
vllm, transformers) happen inside the adapters, never at module import, so the router can
import the deployment classes without them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol


@dataclasses.dataclass(frozen=True)
class Scored:
    """One scored or embedded input: the value, its token count, whether it was cut to fit."""

    value: float | list[float]
    tokens: int
    truncated: bool


class Encoder(Protocol):
    max_input_tokens: int

    def score_pairs(self, pairs: list[tuple[str, str]]) -> list[Scored]: ...

    def embed(self, texts: list[str]) -> list[Scored]: ...

    def count_tokens(self, texts: list[str]) -> list[int]: ...

    def doc_budget(self, query: str) -> int: ...

    def truncate_text(self, text: str, max_tokens: int) -> str: ...


class TokenBudget:
    """Token arithmetic shared by encoders that hold an HF-style `tokenizer`.

    A cross-encoder sees `[CLS] query [SEP] document [SEP]` in `max_input_tokens`, with the query
    capped at half of it; a bi-encoder embeds the document alone.
    """

    tokenizer: Any
    max_input_tokens: int
    cross_encoder: bool

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def doc_budget(self, query: str) -> int:
        if not self.cross_encoder:
            return self.max_input_tokens - 2
        q = min(self.count_tokens([query])[0], self.max_input_tokens // 2)
        return self.max_input_tokens - q - 3

    def truncate_text(self, text: str, max_tokens: int) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer.decode(ids[:max_tokens])


def build_encoder(cfg, path: str) -> Encoder:  # cfg: serve_app.config.ModelConfig
    from serve_app.config import EngineKind, ModelKind, RerankMode

    if cfg.engine is EngineKind.vllm:
        from deployments.engines.vllm_pooling import VLLMPoolingEncoder

        return VLLMPoolingEncoder(cfg, path)
    from deployments.engines.transformers_encoder import TransformersEncoder

    mode = (cfg.rerank_mode or RerankMode.cross_encoder) if cfg.kind is ModelKind.rerank else RerankMode.bi_encoder
    return TransformersEncoder(cfg, path, mode=mode)
