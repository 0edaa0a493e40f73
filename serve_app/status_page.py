"""The status page: one static HTML file (serve_app/static/status.html) that renders `/v1/status`
in a browser and refreshes itself. No build step and no CDN, so it works on an offline cluster.

The page holds no data: it is served without a key, and its script asks `v1/status` with the
admin key the operator types in (kept in the tab's sessionStorage, sent as a Bearer header), so
the key never appears in a URL, a log line or the browser history.
"""

from __future__ import annotations

import pathlib

from starlette.responses import HTMLResponse

PAGE = (pathlib.Path(__file__).parent / "static" / "status.html").read_text(encoding="utf-8")
# Inline script and style only; it may talk to this origin and nothing else.
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
       "form-action 'none'; frame-ancestors 'none'; base-uri 'none'")


def page_response() -> HTMLResponse:
    return html_response(PAGE)


def html_response(page: str, csp: str = CSP) -> HTMLResponse:
    """A static page of ours: never cached, inline code only (unless `csp` says more), talking to
    this origin only."""
    return HTMLResponse(page, headers={"cache-control": "no-store", "content-security-policy": csp,
                                       "x-content-type-options": "nosniff"})
