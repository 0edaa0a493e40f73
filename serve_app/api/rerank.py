"""Rerank shapes: Jina/vLLM (`/v1/rerank`, `/rerank`) and Cohere v2 (`/v2/rerank`).

Both are parsed into one `RerankQuery` so the serving code has a single path.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


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
