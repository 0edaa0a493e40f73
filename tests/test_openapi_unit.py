"""The API page: /openapi.json is valid OpenAPI 3.1 (checked by openapi-spec-validator), lists every
route of the route table with its body model and only the errors it can return, and /docs renders
it as Swagger UI in headless Chromium from this router's own files, with no console error, and a
person can authorize with a key and send GET /v1/models from it."""

from __future__ import annotations

import re

import pytest
from starlette.routing import Route
from starlette.testclient import TestClient

from serve_app.config import hash_key, parse_app_config
from serve_app.openapi import DOCS_ASSETS, MODEL_ERRORS, openapi_path, schema
from serve_app.router import Router
from tests.browser import browser_page, needs_chromium
from tests.local_servers import ThreadedServer


def client(keys: bool = True) -> TestClient:
    api_keys = [{"name": "ops", "sha256": hash_key("sk-ops"), "admin": True}] if keys else []
    cfg = parse_app_config({"gateway": {"api_keys": api_keys},
                            "models": [{"name": "chat", "kind": "llm", "engine": "vllm", "source": "org/chat"}]})
    return TestClient(Router(cfg.gateway, cfg.models, {}).__serve_build_asgi_app__(), raise_server_exceptions=False)


BODILESS_POSTS = {"/v1/batches/{batch_id}/cancel"}  # a POST that takes no body


def undocumented(spec: dict) -> list[tuple[str, str]]:
    """Operations with no summary, or POSTs with no request body: routes missing from openapi.ROUTES."""
    return sorted((m, p) for p, ops in spec["paths"].items() for m, op in ops.items()
                  if not op["summary"] or (m == "post" and p not in BODILESS_POSTS and "requestBody" not in op))


def test_the_schema_is_valid_openapi_3_1_and_lists_every_route_with_its_body_and_errors():
    from openapi_spec_validator import validate
    from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

    c = client()
    spec = c.get("/openapi.json").json()  # open, as vLLM's, even with keys on
    validate(spec)
    table = {(openapi_path(r.path), m.lower()) for r in c.app.routes for m in r.methods if m != "HEAD"}
    assert {(p, m) for p, ops in spec["paths"].items() for m in ops} == table
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    body = spec["components"]["schemas"][chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].split("/")[-1]]
    assert {"model", "messages", "stream", "max_tokens"} <= set(body["properties"]) and "messages" in body["required"]
    assert set(chat["responses"]) == {"200", *MODEL_ERRORS}
    # each route lists only what it can return: /health nothing, an asset only 404, the status view 401/403
    assert set(spec["paths"]["/health"]["get"]["responses"]) == {"200"}
    assert set(spec["paths"]["/docs/static/{name}"]["get"]["responses"]) == {"200", "404"}
    assert set(spec["paths"]["/v1/status"]["get"]["responses"]) == {"200", "401", "403"}
    assert set(spec["paths"]["/v1/usage"]["get"]["responses"]) == {"200", "400", "401", "403", "503"}  # its store can be down
    assert "504" not in spec["paths"]["/v1/batches"]["post"]["responses"]
    assert [p["name"] for p in spec["paths"]["/v1/usage"]["get"]["parameters"]] == ["since", "until", "key"]
    assert undocumented(spec) == []
    # A route added to the table but not to openapi.ROUTES has no summary and no body: caught.
    extra = Route("/v1/new-thing", lambda request: None, methods=["POST"])
    assert undocumented(schema([*c.app.routes, extra])) == [("post", "/v1/new-thing")]
    dup = {**spec["paths"]["/health"]["get"], "operationId": spec["paths"]["/ready"]["get"]["operationId"]}
    broken = {**spec, "paths": {**spec["paths"], "/health": {"get": dup}}}
    with pytest.raises(OpenAPIValidationError):  # the validator does catch a broken schema (duplicate operationId)
        validate(broken)


def test_docs_and_its_assets_are_served_without_a_key_from_this_router_only():
    c = client()
    page = c.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert refs and all(not re.match(r"(\w+:)?//", ref) for ref in refs), refs  # relative: no CDN, any route_prefix
    for name, media in DOCS_ASSETS.items():
        r = c.get(f"/docs/static/{name}")  # no key: the page's own files
        assert r.status_code == 200 and r.headers["content-type"].startswith(media) and len(r.content) > 100, name
    bundle = c.get("/docs/static/swagger-ui-bundle.js").text
    assert "SwaggerUIBundle" in bundle
    for name in ("index.html", "..%2F..%2Fopenapi.py", "swagger-ui.js.map", "x" * 300):
        r = c.get(f"/docs/static/{name}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (name, r.text)  # OpenAI's shape, no file


@needs_chromium
def test_docs_is_swagger_ui_in_a_real_browser_and_sends_an_authorized_request(tmp_path):
    """Swagger UI renders the schema from this router's files only; Authorize with a key, then
    "Try it out" on GET /v1/models: the call goes out with the key and the page shows its 200."""
    server = ThreadedServer(client(keys=True).app)
    try:
        with browser_page() as (page, requested, errors):
            page.goto(f"{server.url}/docs")
            page.wait_for_selector("#operations-default-get_v1_models")
            assert page.locator(".opblock").count() >= 25  # every operation of the route table
            page.click("button.authorize")
            page.fill(".auth-container input", "sk-ops")
            page.click(".auth-btn-wrapper button.authorize")
            page.click(".auth-btn-wrapper button.btn-done")
            page.wait_for_selector(".dialog-ux", state="detached")  # the modal no longer covers the page
            page.click("#operations-default-get_v1_models .opblock-summary")
            page.click("#operations-default-get_v1_models button.try-out__btn")
            page.click("#operations-default-get_v1_models button.execute")
            status = page.wait_for_selector("#operations-default-get_v1_models .live-responses-table tr.response td.response-col_status",
                                            timeout=20000)
            assert status.inner_text().strip().startswith("200"), status.inner_text()
            assert "chat" in page.inner_text("#operations-default-get_v1_models .live-responses-table")
            assert errors == [], errors
            assert requested and all(url.startswith(server.url) for url in requested), requested
    finally:
        server.close()


def test_make_up_prints_every_route_of_the_route_table_with_its_method(capsys):
    from serve_app.cli import _print_endpoints

    _print_endpoints("http://127.0.0.1:8000", [], {"default": "/", "other": "/other"})
    out = capsys.readouterr().out
    assert "default at http://127.0.0.1:8000," in out and "other at http://127.0.0.1:8000/other" in out
    table = {(m, openapi_path(r.path)) for r in client().app.routes for m in r.methods if m != "HEAD"}
    printed = set(re.findall(r"^  ([A-Z]+) +(/\S*) ", out, re.M))
    assert printed == table, printed ^ table
