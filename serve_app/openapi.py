"""The API page: an OpenAPI 3.1 schema built from the router's route table and our pydantic
request models, and `/docs`, one static page rendering it (no CDN, no Swagger bundle).

The route table stays the single list of routes: every route it holds appears here, and the
table below only adds what a route cannot say itself (its body model, query, summary). LLM bodies
are open envelopes: the router reads a few fields and vLLM validates the rest, so the schema
documents those fields and allows the others.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any

from pydantic import BaseModel
from starlette.responses import HTMLResponse, JSONResponse

from serve_app.api import openai, rerank
from serve_app.batches.lines import BatchCreate
from serve_app.status_page import html_response

ERRORS = {"400": "invalid request (names the param)", "401": "missing or unknown API key",
          "403": "key not allowed (admin-only route or model)", "404": "no such model or route",
          "413": "body or list too large", "429": "quota exceeded", "503": "overloaded or no replica (Retry-After)",
          "504": "the model missed the deadline"}
MULTIPART = "multipart"  # POST /v1/files: a file upload, not a JSON body
# "METHOD path" or path -> (summary, body model, query parameters)
ROUTES: dict[str, tuple[str, type[BaseModel] | str | None, tuple[str, ...]]] = {
    "/health": ("liveness of the router", None, ()),
    "/ready": ("200 when every model answers through a replica or is saturated (admins: which), else 503", None, ()),
    "/v1/models": ("served models (OpenAI shape, plus kind, engine, max_model_len, device, dtype)", None, ()),
    "/v1/models/{model}": ("one served model", None, ()),
    "/v1/status": ("every model → replica → node: health, circuit, autoscaling, restarts, batches, alerts (admin)", None, ()),
    "/v1/usage": ("requests and tokens per key name and model, by hour (admin)", None, ("since", "until", "key")),
    "/v1/chat/completions": ("OpenAI chat completions, streaming (SSE) or not", openai.ChatEnvelope, ()),
    "/v1/completions": ("OpenAI completions, streaming (SSE) or not", openai.CompletionEnvelope, ()),
    "/tokenize": ("vLLM's /tokenize", openai.ModelOnly, ()),
    "/detokenize": ("vLLM's /detokenize", openai.ModelOnly, ()),
    "/v1/embeddings": ("OpenAI embeddings", openai.EmbeddingRequest, ()),
    "/v1/rerank": ("rerank, Jina shape", rerank.JinaRerankRequest, ()),
    "/rerank": ("rerank, Jina shape", rerank.JinaRerankRequest, ()),
    "/v2/rerank": ("rerank, Cohere v2 shape", rerank.CohereRerankRequest, ()),
    "/v1/score": ("vLLM's /score: one text against many, or pairwise", rerank.ScoreRequest, ()),
    "/score": ("vLLM's /score", rerank.ScoreRequest, ()),
    "POST /v1/files": ("upload a batch input file (JSONL; multipart: file, purpose=batch)", MULTIPART, ()),
    "GET /v1/files": ("the key's files, newest first unless order=asc (cursor pagination)", None,
                      ("purpose", "limit", "order", "after")),
    "/v1/files/{file_id}": ("a file's object (GET) or delete it (DELETE)", None, ()),
    "/v1/files/{file_id}/content": ("a file's content: the input JSONL, or a batch's output/error lines", None, ()),
    "POST /v1/batches": ("create a batch over an uploaded file; it runs on spare capacity", BatchCreate, ()),
    "GET /v1/batches": ("the key's batches, newest first (cursor pagination)", None, ("after", "limit")),
    "/v1/batches/{batch_id}": ("one batch: status, request_counts, output and error file ids", None, ()),
    "/v1/batches/{batch_id}/cancel": ("cancel: no new line starts, finished results are kept", None, ()),
    "/status": ("the status page (HTML)", None, ()),
    "/openapi.json": ("this schema", None, ()),
    "/docs": ("this API page (HTML)", None, ()),
}
ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
                   "code": {"type": ["string", "null"]}, "request_id": {"type": "string"}}}}}


def schema(routes: list[Any], version: str = "0.1.0") -> dict[str, Any]:
    """routes: the Starlette app's routes (path, methods)."""
    components: dict[str, Any] = {"Error": ERROR_SCHEMA}
    paths: dict[str, Any] = {}
    for route in routes:
        path = route.path.replace("{model:path}", "{model}")
        for method in sorted(m.lower() for m in (route.methods or ()) if m != "HEAD"):
            summary, body, query = ROUTES.get(f"{method.upper()} {path}") or ROUTES.get(path, ("", None, ()))
            op: dict[str, Any] = {"summary": summary, "operationId": f"{method}_{path.strip('/').replace('/', '_') or 'root'}",
                                  "responses": {"200": {"description": "OK"}, **{
                                      code: {"description": text, "content": {"application/json": {
                                          "schema": {"$ref": "#/components/schemas/Error"}}}} for code, text in ERRORS.items()}}}
            params = [{"name": q, "in": "query", "required": False, "schema": {"type": "string"}} for q in query]
            params += [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                       for name in re.findall(r"{(\w+)}", path)]
            if params:
                op["parameters"] = params
            if body == MULTIPART:
                op["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": {
                    "type": "object", "required": ["file", "purpose"], "properties": {
                        "file": {"type": "string", "contentMediaType": "application/octet-stream"},
                        "purpose": {"type": "string", "enum": ["batch"]}}}}}}
            elif body is not None:
                defs = body.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(defs.pop("$defs", {}))
                components[body.__name__] = defs
                op["requestBody"] = {"required": True, "content": {"application/json": {
                    "schema": {"$ref": f"#/components/schemas/{body.__name__}"}}}}
            paths.setdefault(path, {})[method] = op
    return {"openapi": "3.1.0", "info": {"title": "rayserve-llm-stack", "version": version},
            "components": {"schemas": components, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
            "security": [{"bearer": []}, {}], "paths": paths}


DOCS = (pathlib.Path(__file__).parent / "static" / "docs.html").read_text(encoding="utf-8")


def schema_response(routes: list[Any]) -> JSONResponse:
    return JSONResponse(schema(routes))


def docs_response() -> HTMLResponse:
    return html_response(DOCS)
