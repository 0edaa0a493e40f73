"""OpenAI-compatible request and response shapes (chat, completions, embeddings, models).

Requests forbid unknown fields, and fields OpenAI defines that our engines do not honour are
listed so the client gets a 400 naming the parameter instead of having it silently dropped.
"""

from __future__ import annotations

import base64
import struct
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# OpenAI parameters we recognise but do not implement yet. Sent with a non-null value they are
# rejected by name (see UnsupportedParameter) rather than ignored.
UNSUPPORTED_CHAT_PARAMS = (
    "tools", "tool_choice", "functions", "function_call", "logprobs", "top_logprobs",
    "logit_bias", "response_format", "audio", "modalities", "prediction", "parallel_tool_calls",
    "reasoning_effort", "web_search_options", "service_tier", "store", "metadata",
)
UNSUPPORTED_COMPLETION_PARAMS = ("logprobs", "logit_bias", "echo", "best_of", "suffix")
UNSUPPORTED_EMBEDDING_PARAMS = ("dimensions",)
# Fields of SamplingFields that ask the engine to do something; each engine declares which it honours.
ENGINE_PARAMS = (
    "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "n", "seed",
    "presence_penalty", "frequency_penalty",
)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingFields(_Request):
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # a 64-bit signed integer, as vLLM takes it
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stream: bool = False
    stream_options: "StreamOptions | None" = None
    user: str | None = None  # accepted: an opaque end-user id, it changes nothing in generation

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops


class StreamOptions(_Request):
    include_usage: bool = False


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    model: str
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1)

    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def engine_params(self) -> set[str]:
        return {f for f in ENGINE_PARAMS if f in self.model_fields_set and getattr(self, f) is not None}


class CompletionRequest(SamplingFields):
    model: str
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str:
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("exactly one prompt per request is supported")
            v = v[0]
        return v

    def effective_max_tokens(self) -> int | None:
        return self.max_tokens

    def engine_params(self) -> set[str]:
        return {f for f in ENGINE_PARAMS if f in self.model_fields_set and getattr(self, f) is not None}


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


def chat_completion(rid: str, model: str, choices: list[dict[str, Any]], use: dict[str, int]) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{rid}", "object": "chat.completion", "created": int(time.time()),
        "model": model, "choices": choices, "usage": use,
    }


def chat_chunk(rid: str, model: str, choices: list[dict[str, Any]], use: dict[str, int] | None = None) -> dict[str, Any]:
    return _envelope(f"chatcmpl-{rid}", "chat.completion.chunk", model, choices, use)


def text_completion(rid: str, model: str, choices: list[dict[str, Any]], use: dict[str, int] | None) -> dict[str, Any]:
    return _envelope(f"cmpl-{rid}", "text_completion", model, choices, use)


def _envelope(oid: str, obj: str, model: str, choices: list[dict[str, Any]], use: dict[str, int] | None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": oid, "object": obj, "created": int(time.time()), "model": model, "choices": choices}
    if use is not None:
        out["usage"] = use
    return out


def embedding_list(model: str, vectors: list[list[float]], encoding: str, prompt_tokens: int) -> dict[str, Any]:
    """base64 is the vector's little-endian float32 bytes, as OpenAI sends it."""
    def encode(v: list[float]) -> list[float] | str:
        return base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() if encoding == "base64" else v

    data = [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": model, "usage": usage(prompt_tokens)}


def model_list(cards: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": cards}
