"""Typed messages between the router and the replicas.

Plain dataclasses: they cross the DeploymentHandle by pickle on every request, and carry no
HTTP concepts. The router turns them into API shapes; replicas never build responses.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal


@dataclasses.dataclass(frozen=True)
class ReplicaInfo:
    """Where a result was computed: for response headers, logs and the status view."""

    model: str
    replica_id: str
    node_id: str
    node_ip: str
    gpu_ids: tuple[str, ...] = ()  # accelerators Ray assigned to this replica (TP workers use them)


@dataclasses.dataclass(frozen=True)
class OpenAIResponse:
    """An LLM replica's answer: vLLM's own response body (chat, completion, tokenize, ...)."""

    body: dict
    replica: ReplicaInfo
    engine: dict | None = None  # vLLM's timings of this request (EngineLoad.request_stats), for its story


# One handle item of an LLM stream, in builtins: (events, usage), the first item also carrying
# the replica: (events, usage, replica); a stream tracked for continuation (serve_app/migration/)
# carries a fourth element, what its events held: (events, usage, replica or None, (token ids,
# text, finish_reason, (prompt token ids, the chunks' id/created/model) in the first item only)). Events are vLLM's SSE payloads produced since the last
# item (JSON strings, and "[DONE]"); usage comes once vLLM reported it (the router counts it),
# with the engine's timings of the request under "engine" (for its story) where vLLM kept them.
# Ray pickles every item, that is about every token: a tuple of builtins costs 3 µs to dump and
# 0.4 µs to load where the dataclass it replaced cost 14 and 4 (bench: docs/benchmarks.md).
StreamItem = tuple[list[str], "dict | None"] | tuple[list[str], "dict | None", ReplicaInfo] | tuple[Any, ...]


def stream_item(events: list[str], usage: dict | None, replica: ReplicaInfo | None = None, track: Any = None) -> StreamItem:
    if track is not None:
        return (events, usage, replica, track)
    return (events, usage) if replica is None else (events, usage, replica)


@dataclasses.dataclass(frozen=True)
class Resume:
    """What a stream sent before its replica failed: its continuation starts from here."""

    prompt_ids: list[int]  # the rendered prompt, as vLLM tokenized it (the chat template ran once)
    token_ids: list[int]  # generated and sent (their text may be partly held back: continuation.py)
    text: str  # the text the client received for them
    head: dict  # the chunks' id, created, model: the continuation writes under the same


@dataclasses.dataclass(frozen=True)
class OpenAIChunk:
    """The stream item before `stream_item`, kept for one release: in a rolling update the router
    (seconds to replace) is new before the LLM replicas (minutes), and still reads what they send."""

    events: list[str]
    usage: dict | None
    replica: ReplicaInfo


def as_stream_item(item: Any) -> StreamItem:
    return item if isinstance(item, tuple) else (item.events, item.usage, item.replica)


@dataclasses.dataclass(frozen=True)
class RerankRequest:
    request_id: str
    query: str
    documents: list[str]
    truncate: bool = True  # False: an over-long document is a 400 naming it
    max_tokens_per_doc: int | None = None  # Cohere's: cut each document to this many tokens first
    offset: int = 0  # index of documents[0] in the client's list (chunks of a long list)


@dataclasses.dataclass(frozen=True)
class RerankResult:
    scores: list[float]
    prompt_tokens: int
    truncated_documents: int
    replica: ReplicaInfo


@dataclasses.dataclass(frozen=True)
class EmbedRequest:
    request_id: str
    inputs: list[str]


@dataclasses.dataclass(frozen=True)
class EmbedResult:
    vectors: list[list[float]]
    prompt_tokens: int
    truncated_inputs: int
    replica: ReplicaInfo


@dataclasses.dataclass(frozen=True)
class ModelCard:
    """What a replica knows about its model once loaded (the real limits, not the config's guess)."""

    name: str
    kind: str
    engine: str
    max_input_tokens: int
    replica: ReplicaInfo
    batching: dict[str, float] | None = None  # encoders: current max_batch_size / batch_wait_timeout_s
    largest_batch: int = 0  # encoders: the most inputs one forward pass has carried
    forward_passes: int = 0  # encoders: forward passes so far (mark for `batch_sizes(since)`)
    sampling_defaults: dict[str, float] | None = None  # LLMs: what the model's generation_config sets
    device: str | None = None  # where the model runs ("cuda", "cpu")
    dtype: str | None = None  # its weights' dtype ("float16", "float32", ...)
