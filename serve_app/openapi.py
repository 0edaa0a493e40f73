"""The API page: an OpenAPI 3.1 schema built from the router's route table and our pydantic
request models, and `/docs`, Swagger UI rendering it, so a person can send a request from the page.
Swagger UI's assets come from the swagger-ui-py package and are served by the router itself
(`/docs/static/NAME`, a fixed list): no CDN, so the page works on an offline cluster.

The route table stays the single list of routes: every route it holds appears here, and the
table below only adds what a route cannot say itself (its body model, query, summary). LLM bodies
are open envelopes: the router reads a few fields and vLLM validates the rest, so the schema
documents those fields and allows the others.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any, NamedTuple

from pydantic import BaseModel
from starlette.responses import FileResponse, HTMLResponse, JSONResponse

from serve_app.api import openai, rerank
from serve_app.batches.lines import BatchCreate
from serve_app.errors import NotFound
from serve_app.status_page import html_response

ERRORS = {"400": "invalid request (names the param)", "401": "missing or unknown API key (when keys are on)",
          "403": "key not allowed (admin-only route, or a model outside the key's allow-list)",
          "404": "no such model, file, batch or asset", "413": "body, file or list too large",
          "429": "quota exceeded (Retry-After)", "503": "overloaded, no ready replica, or the store did not answer (Retry-After)",
          "500": "the engine failed on a valid request (ours, never the client's: see the logs by request id)",
          "504": "the model missed the deadline"}
# What each family of routes can answer itself, besides 200 (Serve's proxy in front may add a 503
# under backpressure or a 408 on its own timeout to any route). Codes only, described by ERRORS.
MODEL_ERRORS = ("400", "401", "403", "404", "413", "429", "500", "503", "504")  # body, key, allow-list, quota, engine, replicas, deadline
STORE_ERRORS = ("400", "401", "404", "503")  # the Batch API: every call goes to its store (refused value, NUL id, down)
MULTIPART = "multipart"  # POST /v1/files: a file upload, not a JSON body


class Doc(NamedTuple):
    summary: str
    body: type[BaseModel] | str | None = None
    query: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()


# "METHOD path" or path (then GET, or POST where it takes a body) -> what a route cannot say itself;
# also what `make up` prints
ROUTES: dict[str, Doc] = {
    "/health": Doc("liveness of the router"),
    "/ready": Doc("200 when every model answers through a replica or is saturated (admins: which), else 503", errors=("503",)),
    "/v1/models": Doc("served models (OpenAI shape, plus kind, engine, max_model_len, device, dtype)", errors=("401",)),
    "/v1/models/{model}": Doc("one served model", errors=("401", "404")),
    "/v1/status": Doc("every model → replica → node: health, circuit, autoscaling, restarts, batches, alerts (admin)",
                      errors=("401", "403")),
    "/v1/usage": Doc("requests and tokens per key name and model, by hour (admin)", None, ("since", "until", "key"),
                     ("400", "401", "403", "503")),  # 503: the usage store did not answer
    "/v1/requests/{request_id}": Doc("a recent request's story by its id: router, key, admission, attempts (replica, node, "
                                     "outcome), retries, fallbacks, engine timings, final status (admin)",
                                     errors=("401", "403", "404")),
    "/v1/chat/completions": Doc("OpenAI chat completions, streaming (SSE) or not", openai.ChatEnvelope, errors=MODEL_ERRORS),
    "/v1/completions": Doc("OpenAI completions, streaming (SSE) or not", openai.CompletionEnvelope, errors=MODEL_ERRORS),
    "/tokenize": Doc("vLLM's /tokenize", openai.ModelOnly, errors=MODEL_ERRORS),
    "/detokenize": Doc("vLLM's /detokenize", openai.ModelOnly, errors=MODEL_ERRORS),
    "/v1/embeddings": Doc("OpenAI embeddings", openai.EmbeddingRequest, errors=MODEL_ERRORS),
    "/v1/rerank": Doc("rerank, Jina shape", rerank.JinaRerankRequest, errors=MODEL_ERRORS),
    "/rerank": Doc("rerank, Jina shape", rerank.JinaRerankRequest, errors=MODEL_ERRORS),
    "/v2/rerank": Doc("rerank, Cohere v2 shape", rerank.CohereRerankRequest, errors=MODEL_ERRORS),
    "/v1/score": Doc("vLLM's /score: one text against many, or pairwise", rerank.ScoreRequest, errors=MODEL_ERRORS),
    "/score": Doc("vLLM's /score", rerank.ScoreRequest, errors=MODEL_ERRORS),
    "POST /v1/files": Doc("upload a batch input file (JSONL; multipart: file, purpose=batch)", MULTIPART,
                          errors=(*STORE_ERRORS, "413")),
    "GET /v1/files": Doc("the key's files, newest first unless order=asc (cursor pagination)", None,
                         ("purpose", "limit", "order", "after"), STORE_ERRORS),
    "GET /v1/files/{file_id}": Doc("a file's object", errors=STORE_ERRORS),
    "DELETE /v1/files/{file_id}": Doc("delete a file", errors=STORE_ERRORS),
    "/v1/files/{file_id}/content": Doc("a file's content: the input JSONL, or a batch's output/error lines", errors=STORE_ERRORS),
    "POST /v1/batches": Doc("create a batch over an uploaded file; it runs on spare capacity", BatchCreate,
                            errors=(*STORE_ERRORS, "413")),
    "GET /v1/batches": Doc("the key's batches, newest first (cursor pagination)", None, ("after", "limit"), STORE_ERRORS),
    "/v1/batches/{batch_id}": Doc("one batch: status, request_counts, output and error file ids", errors=STORE_ERRORS),
    "POST /v1/batches/{batch_id}/cancel": Doc("cancel: no new line starts, finished results are kept", errors=STORE_ERRORS),
    "/status": Doc("the status page (HTML)"),
    "/openapi.json": Doc("this schema"),
    "/docs": Doc("this API page (HTML, Swagger UI)"),
    "/docs/static/{name}": Doc("the API page's Swagger UI assets (from the swagger-ui-py package)", errors=("404",)),
}
# The assets /docs loads, and nothing else from the package's folder.
DOCS_ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon-32x32.png": "image/png"}
# The docs page loads Swagger UI's script and style from this origin; Swagger UI sets inline styles
# and draws its icons as data: images, and "Try it out" talks to this origin only.
DOCS_CSP = ("default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")
ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
                   "code": {"type": ["string", "null"]}, "request_id": {"type": "string"}}}}}


def openapi_path(path: str) -> str:
    """A Starlette route path as OpenAPI writes it: `{name:path}` (a converter) is `{name}`."""
    return re.sub(r"{(\w+):\w+}", r"{\1}", path)


def schema(routes: list[Any], version: str = "0.1.0") -> dict[str, Any]:
    """routes: the Starlette app's routes (path, methods)."""
    components: dict[str, Any] = {"Error": ERROR_SCHEMA}
    paths: dict[str, Any] = {}
    for route in routes:
        path = openapi_path(route.path)
        for method in sorted(m.lower() for m in (route.methods or ()) if m != "HEAD"):
            summary, body, query, errors = ROUTES.get(f"{method.upper()} {path}") or ROUTES.get(path, Doc(""))
            op: dict[str, Any] = {"summary": summary, "operationId": f"{method}_{path.strip('/').replace('/', '_') or 'root'}",
                                  "responses": {"200": {"description": "OK"}, **{
                                      code: {"description": ERRORS[code], "content": {"application/json": {
                                          "schema": {"$ref": "#/components/schemas/Error"}}}} for code in sorted(errors)}}}
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
    return html_response(DOCS, DOCS_CSP)


def docs_asset_response(name: str) -> FileResponse:
    """One of DOCS_ASSETS from swagger-ui-py's folder; any other name is a 404 (no path reaches the disk)."""
    media = DOCS_ASSETS.get(name)
    if media is None:
        raise NotFound(f"no API page asset '{name[:64]}'", "name")
    import swagger_ui

    path = pathlib.Path(swagger_ui.__file__).parent / "static" / name
    # Versioned with the installed package: a day's caching saves the 1.5 MB bundle on every visit.
    return FileResponse(path, media_type=media, headers={"cache-control": "public, max-age=86400",
                                                          "x-content-type-options": "nosniff"})
