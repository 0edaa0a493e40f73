"""OpenAI-compatible shapes the router owns: the envelope it reads of chat and completion bodies
(vLLM's protocol, in the LLM replica, validates the rest), embeddings, and the model list.

Embedding requests forbid unknown fields, and OpenAI fields our encoders do not honour are listed
so the client gets a 400 naming the parameter instead of having it silently dropped.
"""

from __future__ import annotations

import base64
import struct
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from deployments.engines.continuation import COMPLETION_DEFAULT_MAX_TOKENS
from serve_app.admission import estimate_tokens

UNSUPPORTED_EMBEDDING_PARAMS = ("dimensions",)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LLMEnvelope(BaseModel):
    """What the router itself reads of a chat or completion body: the model, streaming, and what
    quotas and protection need. Every other field goes to the replica untouched, where vLLM's own
    protocol validates it and unknown fields are refused by name."""

    model_config = ConfigDict(extra="allow")
    model: str
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(1, ge=1, le=16)  # protection: vLLM would run any n

    def estimated_tokens(self, default_max_tokens: int) -> int:
        """For quotas before the model runs: the prompt's text (~4 characters a token; token-id
        prompts count one each) plus the most it may generate."""
        out = self.max_completion_tokens or self.max_tokens or self.unnamed_budget(default_max_tokens)
        return self.estimated_prompt_tokens() + out * (self.n or 1)

    def unnamed_budget(self, default_max_tokens: int) -> int:
        """What the replica generates at most when the body names no budget (deployments/llm.py)."""
        return default_max_tokens

    def estimated_prompt_tokens(self) -> int:
        texts, ids = _texts(self._prompt())
        return estimate_tokens(*texts) + ids

    def _prompt(self) -> Any:
        raise NotImplementedError


class ChatEnvelope(LLMEnvelope):
    messages: Annotated[list[dict[str, Any]], Field(min_length=1)]

    def _prompt(self) -> Any:
        return [m.get("content") for m in self.messages]


class CompletionEnvelope(LLMEnvelope):
    prompt: str | list[Any]

    def _prompt(self) -> Any:
        return self.prompt

    def unnamed_budget(self, default_max_tokens: int) -> int:
        """A completion without the field gets vLLM's (OpenAI's) 16; an explicit null gets the
        gateway's default, as a chat does."""
        return default_max_tokens if "max_tokens" in self.model_fields_set else COMPLETION_DEFAULT_MAX_TOKENS


def _texts(value: Any) -> tuple[list[str], int]:
    """The strings in a prompt or message contents (text parts included) and how many token ids."""
    texts, ids, stack = [], 0, [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            texts.append(v)
        elif isinstance(v, bool) or v is None:
            continue
        elif isinstance(v, int):
            ids += 1
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(x for k, x in v.items() if k in ("text", "content"))
    return texts, ids


class ModelOnly(BaseModel):
    """/tokenize, /detokenize: the router routes by model; vLLM validates the rest."""

    model_config = ConfigDict(extra="allow")
    model: str


class EmbeddingRequest(_Request):
    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"  # the openai client asks for base64
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _inputs(cls, v: str | list[str]) -> list[str]:
        items = [v] if isinstance(v, str) else v
        if not items:
            raise ValueError("input must not be empty")
        return items


# --- responses (plain dicts are enough; these helpers keep the shapes in one place) ---


def usage(prompt_tokens: int, completion_tokens: int = 0) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def embedding_list(model: str, vectors: list[list[float]], encoding: str, prompt_tokens: int) -> dict[str, Any]:
    """base64 is the vector's little-endian float32 bytes, as OpenAI sends it."""
    def encode(v: list[float]) -> list[float] | str:
        return base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() if encoding == "base64" else v

    data = [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": model, "usage": usage(prompt_tokens)}


def model_list(cards: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": cards}
