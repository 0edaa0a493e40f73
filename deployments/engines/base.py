"""What every encoder adapter is and shares: the `Encoder` interface replicas call, one `Scored`
result per input, and the token arithmetic of HF-style tokenizers. No heavy import here: the GPU
test machine imports this with torch and transformers only, the router side not at all."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Protocol


@dataclasses.dataclass(frozen=True)
class Scored:
    """One scored or embedded input: the value, its token count, whether it was cut to fit."""

    value: float | list[float]
    tokens: int
    truncated: bool


class Encoder(Protocol):
    max_input_tokens: int
    device: str  # where the model runs: "cpu", "cuda", "cuda:1"
    dtype: str  # what its weights are: "float32", "float16", "bfloat16" (vLLM: its model dtype)

    def score_pairs(self, pairs: list[tuple[str, str]]) -> list[Scored]: ...

    def embed(self, texts: list[str]) -> list[Scored]: ...

    def count_tokens(self, texts: list[str]) -> list[int]: ...

    def doc_budget(self, query: str) -> int: ...

    def truncate_text(self, text: str, max_tokens: int) -> str: ...


class TokenBudget:
    """Token arithmetic shared by encoders that hold an HF-style `tokenizer`.

    A cross-encoder sees `[CLS] query [SEP] document [SEP]` in `max_input_tokens`, with the query
    capped at half of it; a bi-encoder embeds the document alone. The replica calls these from
    its own threads beside the batch: a fast tokenizer used from two threads at once can fail
    ("Already borrowed"), so every use holds `tokenizer_lock`.
    """

    tokenizer: Any
    tokenizer_lock: threading.Lock
    max_input_tokens: int
    cross_encoder: bool

    def count_tokens(self, texts: list[str]) -> list[int]:
        with self.tokenizer_lock:
            return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def doc_budget(self, query: str) -> int:
        if not self.cross_encoder:
            return self.max_input_tokens - 2
        q = min(self.count_tokens([query])[0], self.max_input_tokens // 2)
        return self.max_input_tokens - q - 3

    def truncate_text(self, text: str, max_tokens: int) -> str:
        with self.tokenizer_lock:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            return self.tokenizer.decode(ids[:max_tokens])
