"""Rerank shapes: Jina/vLLM (`/v1/rerank`, `/rerank`) and Cohere v2 (`/v2/rerank`).

Both are parsed into one `RerankQuery` so the serving code has a single path.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TextDocument(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str


class _RerankBase(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    query: str = Field(min_length=1)
    documents: list[str | TextDocument] = Field(min_length=1)
    top_n: int | None = Field(None, ge=1)

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class JinaRerankRequest(_RerankBase):
    return_documents: bool = True
    truncate: bool = Field(True, description="false: an over-long document is a 400, not cut")


class CohereRerankRequest(_RerankBase):
    max_tokens_per_doc: int | None = Field(None, ge=1, description="cut each document to this many tokens")
    return_documents: bool = False  # Cohere v2 dropped it; accepted for older clients
    truncate: bool = True
    rank_fields: None = None


class ScoreRequest(BaseModel):
    """vLLM's `/score` and `/v1/score`: `text_1` against `text_2` (or `queries` against
    `documents`): one left text against many right ones, or pairwise when both are lists of the
    same length. Scores come back in `text_2`'s order."""

    model_config = ConfigDict(extra="forbid")
    model: str
    text_1: str | list[str] | None = None
    text_2: str | list[str] | None = None
    queries: str | list[str] | None = None
    documents: str | list[str] | None = None
    truncate_prompt_tokens: None = None  # accepted as null only: our replicas cut by the model's limit

    @model_validator(mode="after")
    def _one_pair(self) -> "ScoreRequest":
        text = self.text_1 is not None or self.text_2 is not None
        named = self.queries is not None or self.documents is not None
        if text == named or (text and (self.text_1 is None or self.text_2 is None)) or \
                (named and (self.queries is None or self.documents is None)):
            raise ValueError("send text_1 and text_2, or queries and documents")
        left, right = self._sides()
        if not right or any(not q for q in left):
            raise ValueError("the right side must hold at least one text and every left text must be non-empty")
        if len(left) != 1 and len(left) != len(right):
            raise ValueError(f"{len(left)} left texts for {len(right)} right ones: send one, or as many as the right")
        return self

    def _sides(self) -> tuple[list[str], list[str]]:
        left = self.text_1 if self.text_1 is not None else self.queries
        right = self.text_2 if self.text_2 is not None else self.documents
        return ([left] if isinstance(left, str) else list(left)), ([right] if isinstance(right, str) else list(right))

    def groups(self) -> dict[str, list[tuple[int, str]]]:
        """Each distinct left text with its (index, right text) pairs."""
        left, right = self._sides()
        out: dict[str, list[tuple[int, str]]] = {}
        for i, text in enumerate(right):
            out.setdefault(left[0] if len(left) == 1 else left[i], []).append((i, text))
        return out


def score_response(rid: str, model: str, scores: list[float], prompt_tokens: int) -> dict[str, Any]:
    return {"id": f"score-{rid}", "object": "list", "created": int(time.time()), "model": model,
            "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


@dataclasses.dataclass(frozen=True)
class RerankQuery:
    model: str
    query: str
    documents: list[str]
    top_n: int | None
    return_documents: bool
    truncate: bool = True
    max_tokens_per_doc: int | None = None


def to_query(req: _RerankBase) -> RerankQuery:
    return RerankQuery(
        model=req.model, query=req.query, documents=req.texts(), top_n=req.top_n,
        return_documents=getattr(req, "return_documents", False), truncate=getattr(req, "truncate", True),
        max_tokens_per_doc=getattr(req, "max_tokens_per_doc", None),
    )


def ranked(q: RerankQuery, scores: list[float]) -> list[dict[str, Any]]:
    order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
    if q.top_n is not None:
        order = order[: q.top_n]
    results = []
    for i in order:
        r: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
        if q.return_documents:
            r["document"] = {"text": q.documents[i]}
        results.append(r)
    return results


def jina_response(rid: str, q: RerankQuery, scores: list[float], prompt_tokens: int, truncated: int) -> dict[str, Any]:
    return {
        "id": f"rerank-{rid}", "model": q.model, "results": ranked(q, scores),
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        "truncated_documents": truncated,
    }


def cohere_response(rid: str, q: RerankQuery, scores: list[float], prompt_tokens: int, truncated: int) -> dict[str, Any]:
    meta: dict[str, Any] = {"api_version": {"version": "2"}, "billed_units": {"search_units": 1},
                            "tokens": {"input_tokens": prompt_tokens, "output_tokens": 0}}
    if truncated:
        meta["warnings"] = [f"{truncated} document(s) were truncated to fit the model"]
    return {"id": rid, "results": ranked(q, scores), "meta": meta, "truncated_documents": truncated}
