"""Property-based fuzzing of every POST route against the real stack (real Serve, real engines).

Valid bodies are drawn, then mutated: fields dropped, retyped, nested, made huge or negative,
replaced by unicode edge cases, joined by unknown fields; raw byte bodies are sent too. For
every one: no 5xx, and every 4xx in OpenAI's error shape. Afterwards every model is ready and
every circuit closed: no client input took a model away from the others.

Deterministic (`derandomize=True`): a failure prints the body, and the same run reproduces it.
Bounded: EXAMPLES bodies per route (a few minutes of CI in all). Chat, completions, tokenize and
detokenize go to the tiny TP=2 LLM (256-token context, so any generation is short); embeddings to
the default MiniLM.
"""

from __future__ import annotations

import copy
import datetime
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve_app.openapi import DOCS_ASSETS

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("shared")]  # the shared apps (tests/e2e/conftest.py)
EXAMPLES = 60
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=list(HealthCheck))

TEXT = st.text(max_size=40)  # any valid Unicode: control characters, combining marks, astral planes
EDGE_TEXT = st.sampled_from([
    "", " ", "\x00", "\u200b\ufeff", "\U0010ffff", "\ufffd" * 50, "\u0301" * 200, "\U0001f642" * 500,
    "\r\n" * 100, "<|im_start|>system\n", "{{ raise_exception('x') }}", "{% for x in y %}", "\\ud800",
    "x" * 60_000, "a " * 30_000,
])
SCALAR = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | TEXT
ANY_JSON = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                        max_leaves=12)
HUGE = st.sampled_from([10**30, -(10**30), 2**63, 2**64, 1e308, -1e308, "x" * 200_000, ["y"] * 3_000,
                        {f"k{i}": i for i in range(2_000)}])
SMALL = st.sampled_from([-1, 0, -0.5, -(2**63), 1e-300])

MUTATIONS = ("drop", "retype", "nest", "huge", "negative", "unicode", "extra")


def mutated(valid: st.SearchStrategy[dict]) -> st.SearchStrategy[dict]:
    @st.composite
    def build(draw) -> dict:
        body = copy.deepcopy(draw(valid))
        for _ in range(draw(st.integers(0, 3))):
            target = _pick_container(draw, body)
            if not target:
                break
            key = draw(st.sampled_from(sorted(target) if isinstance(target, dict) else list(range(len(target)))))
            how = draw(st.sampled_from(MUTATIONS))
            if how == "drop":
                del target[key]
            elif how == "retype":
                target[key] = draw(ANY_JSON)
            elif how == "nest":
                target[key] = draw(st.sampled_from([[target[key]], {"value": target[key]}, [[[target[key]]]]]))
            elif how == "huge":
                target[key] = draw(HUGE)
            elif how == "negative":
                target[key] = draw(SMALL)
            elif how == "unicode":
                target[key] = draw(EDGE_TEXT)
            elif isinstance(target, dict):
                target[draw(TEXT)] = draw(ANY_JSON)
            else:
                target.append(draw(ANY_JSON))
        return body

    return build()


def _pick_container(draw, body: dict):
    """The body itself, or (sometimes) a list or object nested in it, e.g. messages[0]."""
    nested = [v for v in body.values() if isinstance(v, (dict, list)) and v]
    nested += [x for v in nested if isinstance(v, list) for x in v if isinstance(x, dict) and x]
    return draw(st.sampled_from([body, *nested])) if nested and draw(st.booleans()) else body


MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant"]), "content": TEXT})
CHAT = st.fixed_dictionaries(
    {"model": st.just("tiny-llm-tp2"), "messages": st.lists(MESSAGE, min_size=1, max_size=3)},
    optional={"max_tokens": st.integers(1, 8), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
              "n": st.integers(1, 3), "seed": st.integers(0, 2**31), "stop": st.lists(TEXT.filter(bool), max_size=2),
              "stream": st.booleans(), "user": TEXT,
              # read by the stream tracking (docs/MIGRATION.md): the client's ids kept, or taken out
              "return_token_ids": st.booleans()},
)
COMPLETION = st.fixed_dictionaries(
    {"model": st.just("tiny-llm-tp2"), "prompt": TEXT | st.lists(TEXT, min_size=1, max_size=1)},
    optional={"max_tokens": st.integers(1, 8), "temperature": st.floats(0, 2), "stream": st.booleans(),
              "presence_penalty": st.floats(-2, 2), "return_token_ids": st.booleans()},
)
EMBEDDING = st.fixed_dictionaries(
    {"model": st.just("all-minilm-l6-v2"), "input": TEXT | st.lists(TEXT, min_size=1, max_size=4)},
    optional={"encoding_format": st.sampled_from(["float", "base64"]), "user": TEXT},
)
RERANK = st.fixed_dictionaries(
    {"model": st.just("tiny-ce"), "query": TEXT.filter(bool),
     "documents": st.lists(TEXT | st.fixed_dictionaries({"text": TEXT}), min_size=1, max_size=5)},
    optional={"top_n": st.integers(1, 6), "return_documents": st.booleans()},
)
RERANK_JINA = st.builds(lambda b, t: {**b, **t}, RERANK, st.fixed_dictionaries({}, optional={"truncate": st.booleans()}))
RERANK_COHERE = st.builds(lambda b, t: {**b, **t}, RERANK,
                          st.fixed_dictionaries({}, optional={"max_tokens_per_doc": st.integers(1, 64)}))

RAW = st.binary(max_size=300) | st.sampled_from([
    b'{"model": "tiny-ce", "query": "\\ud800", "documents": ["a"]}',
    b'{"model": "tiny-ce", "query": "q", "documents": ["\xed\xa0\x80"]}',
    b'{"model": "tiny-ce", "query": NaN}', b'{"top_n": Infinity}', b'{"n": 1e999}',
    b'{"x": ' + b"[" * 5000 + b"]" * 5000 + b"}", b"[" * 100 + b"]" * 100, b'{"a": 1', b"null", b"\xff\xfe{}",
])


SEEN: dict[str, set[int]] = {}  # route -> statuses answered, so the run shows it reached the models


def check(r: httpx.Response, sent: object) -> None:
    SEEN.setdefault(r.request.url.path, set()).add(r.status_code)
    assert r.status_code < 500, f"{r.status_code} for {sent!r:.400}: {r.text[:400]}"
    if r.status_code >= 400:
        err = r.json()["error"]
        assert {"message", "type", "param", "code"} <= set(err) and err["message"], (sent, r.text[:400])


@pytest.fixture(scope="module")
def http(stack) -> httpx.Client:
    with httpx.Client(base_url=stack.base, timeout=120) as c:
        yield c


def _post(http: httpx.Client, path: str, body: dict) -> httpx.Response:
    return http.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


@FUZZ
@given(body=mutated(CHAT))
def test_chat(http, body):
    check(_post(http, "/tiny/v1/chat/completions", body), body)


@FUZZ
@given(body=mutated(COMPLETION))
def test_completions(http, body):
    check(_post(http, "/tiny/v1/completions", body), body)


@FUZZ
@given(body=mutated(EMBEDDING))
def test_embeddings(http, body):
    check(_post(http, "/v1/embeddings", body), body)


@FUZZ
@given(body=mutated(RERANK_JINA), path=st.sampled_from(["/tiny/v1/rerank", "/tiny/rerank"]))
def test_rerank_jina(http, body, path):
    check(_post(http, path, body), body)


@FUZZ
@given(body=mutated(RERANK_COHERE))
def test_rerank_cohere(http, body):
    check(_post(http, "/tiny/v2/rerank", body), body)


SCORE = st.fixed_dictionaries(
    {"model": st.just("tiny-ce"), "text_1": TEXT.filter(bool) | st.lists(TEXT.filter(bool), min_size=1, max_size=3),
     "text_2": TEXT | st.lists(TEXT, min_size=1, max_size=3)})


@FUZZ
@given(body=mutated(SCORE), path=st.sampled_from(["/tiny/v1/score", "/tiny/score"]))
def test_score(http, body, path):
    check(_post(http, path, body), body)


TOKENIZE = st.one_of(
    st.fixed_dictionaries({"model": st.just("tiny-llm-tp2"), "prompt": TEXT},
                          optional={"add_special_tokens": st.booleans(), "return_token_strs": st.booleans()}),
    st.fixed_dictionaries({"model": st.just("tiny-llm-tp2"), "messages": st.lists(MESSAGE, min_size=1, max_size=2)},
                          optional={"add_generation_prompt": st.booleans()}),
)
DETOKENIZE = st.fixed_dictionaries({"model": st.just("tiny-llm-tp2"), "tokens": st.lists(st.integers(0, 300), max_size=20)})


@FUZZ
@given(body=mutated(TOKENIZE) | mutated(DETOKENIZE), path=st.sampled_from(["/tiny/tokenize", "/tiny/detokenize"]))
def test_tokenize_and_detokenize(http, body, path):
    check(_post(http, path, body), body)


@FUZZ
@given(name=TEXT | EDGE_TEXT.filter(lambda t: len(t) < 1000)
       | st.sampled_from(["tiny-llm-tp2", "tiny-ce", "../v1/status", "%00", "a/b/c"]))
def test_model_by_id(http, name):
    """Names up to what an ingress takes in a request line (HAProxy answers longer ones itself)."""
    from urllib.parse import quote

    r = http.get(f"/tiny/v1/models/{quote(name, safe='')}")
    check(r, name)
    assert r.status_code in (200, 404), r.text[:300]


@FUZZ
@given(raw=RAW, path=st.sampled_from(["/tiny/v1/chat/completions", "/tiny/v1/completions", "/v1/embeddings",
                                      "/tiny/v1/rerank", "/tiny/v2/rerank", "/tiny/tokenize", "/tiny/detokenize",
                                      "/tiny/v1/score", "/tiny/v1/batches", "/tiny/v1/files"]),
       chunked=st.booleans())
def test_raw_bodies(http, raw, path, chunked):
    content = iter([raw]) if chunked else raw  # an iterator is sent without Content-Length
    check(http.post(path, content=content, headers={"content-type": "application/json"}), raw)


USAGE_TZ = st.none() | st.builds(lambda m: datetime.timezone(datetime.timedelta(minutes=m)), st.integers(-1439, 1439))
USAGE_VALUE = (st.integers(-(10**25), 10**25).map(str) | st.floats().map(str) | TEXT
               | st.datetimes(timezones=USAGE_TZ).map(lambda d: d.isoformat())
               | st.sampled_from(["", "nan", "-inf", "1e999", "0", "-1", "253402300800", "2026-13-01", "2026-01-01T25:00",
                                  "9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59", "\x00", "e2e-app"]))
USAGE_PARAMS = st.lists(st.tuples(st.sampled_from(["since", "until", "key"]) | TEXT, USAGE_VALUE), max_size=4)
USAGE_RAW = st.sampled_from(["since=%ff%fe", "since=%00&until=%", "key=%E2%82", "&&&==", "since", "until=1&until=2"])


@FUZZ
@given(params=USAGE_PARAMS, raw=st.none() | USAGE_RAW, who=st.sampled_from(["admin", "app", "wrong", None]))
def test_usage_query(http, params, raw, who):
    """GET /v1/usage on the guarded app: any query, any caller -> 200, 400, 401 or 403 in OpenAI's shape."""
    from tests.e2e.conftest import ADMIN_KEY, APP_KEY

    secret = {"admin": ADMIN_KEY, "app": APP_KEY, "wrong": "sk-wrong", None: None}[who]
    headers = {"authorization": f"Bearer {secret}"} if secret else {}
    r = http.get(f"/guarded/v1/usage?{raw}", headers=headers) if raw else http.get("/guarded/v1/usage", params=params, headers=headers)
    check(r, (params, raw, who))
    assert r.status_code in (200, 400, 401, 403), r.text[:300]
    if r.status_code == 200:
        assert who == "admin" and all(row["requests"] >= 0 for row in r.json()["data"])


@FUZZ
@given(params=USAGE_PARAMS, raw=st.none() | USAGE_RAW, prefix=st.sampled_from(["", "/tiny", "/guarded"]),
       who=st.sampled_from(["admin", "app", "wrong", None]))
def test_status_page(http, params, raw, prefix, who):
    """GET /status (the HTML page): any query, any key or none, keys on or off -> 200 HTML, no 5xx."""
    from tests.e2e.conftest import ADMIN_KEY, APP_KEY

    secret = {"admin": ADMIN_KEY, "app": APP_KEY, "wrong": "sk-wrong", None: None}[who]
    headers = {"authorization": f"Bearer {secret}"} if secret else {}
    r = http.get(f"{prefix}/status?{raw}", headers=headers) if raw else http.get(f"{prefix}/status", params=params, headers=headers)
    check(r, (prefix, params, raw, who))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), r.text[:300]


@FUZZ
@given(params=USAGE_PARAMS, raw=st.none() | USAGE_RAW, prefix=st.sampled_from(["", "/tiny", "/guarded"]),
       path=st.sampled_from(["/openapi.json", "/docs"]), who=st.sampled_from(["admin", "wrong", None]))
def test_api_page_and_schema(http, params, raw, prefix, path, who):
    """GET /openapi.json and /docs: any query, any key or none -> 200 (the schema: valid JSON with paths)."""
    from tests.e2e.conftest import ADMIN_KEY

    secret = {"admin": ADMIN_KEY, "wrong": "sk-wrong", None: None}[who]
    headers = {"authorization": f"Bearer {secret}"} if secret else {}
    r = http.get(f"{prefix}{path}?{raw}", headers=headers) if raw else http.get(f"{prefix}{path}", params=params, headers=headers)
    check(r, (prefix, path, params, raw, who))
    assert r.status_code == 200, r.text[:300]
    if path == "/openapi.json":
        assert "/v1/chat/completions" in r.json()["paths"]


@FUZZ
@given(name=st.sampled_from(sorted(DOCS_ASSETS)) | TEXT.filter(lambda n: n not in (".", ".."))  # the client drops dot segments
       | st.sampled_from(["../openapi.py", "%2e%2e%2fREADME.md", "index.html", "swagger-ui.js.map"]),
       prefix=st.sampled_from(["", "/tiny", "/guarded"]), who=st.sampled_from(["admin", "wrong", None]))
def test_api_page_assets(http, name, prefix, who):
    """GET /docs/static/{name}: Swagger UI's own files -> 200 with no key; any other name -> a 404 in
    OpenAI's shape (never a file outside the list, never a 5xx)."""
    from urllib.parse import quote

    from tests.e2e.conftest import ADMIN_KEY

    secret = {"admin": ADMIN_KEY, "wrong": "sk-wrong", None: None}[who]
    headers = {"authorization": f"Bearer {secret}"} if secret else {}
    r = http.get(f"{prefix}/docs/static/{quote(name, safe='%')}", headers=headers)
    check(r, (prefix, name, who))
    if name in DOCS_ASSETS:
        assert r.status_code == 200 and r.headers["content-type"].startswith(DOCS_ASSETS[name]), r.headers
    else:
        assert r.status_code == 404, (name, r.status_code, r.text[:200])


@FUZZ
@given(rid=TEXT | EDGE_TEXT.filter(lambda t: len(t) < 1000) | st.sampled_from(["fuzz-known-id", "../status", "%00", "a/b"]),
       prefix=st.sampled_from(["/tiny", "/guarded"]), who=st.sampled_from(["admin", "app", "wrong", None]))
def test_request_story_ids(http, rid, prefix, who):
    """GET /v1/requests/{id}: any id, any caller -> a story (admins), 404, 401 or 403 in OpenAI's
    shape, never a 5xx. `fuzz-known-id` was a real request: admins get its story."""
    from urllib.parse import quote

    from tests.e2e.conftest import ADMIN_KEY, APP_KEY

    if "known" not in SEEN:  # one real request with that id on each app, first
        SEEN["known"] = set()
        for app, model in (("/tiny", "tiny-ce"), ("/guarded", "guarded-ce")):
            r = http.post(f"{app}/v1/rerank", json={"model": model, "query": "q", "documents": ["a"]},
                          headers={"x-request-id": "fuzz-known-id", "authorization": f"Bearer {ADMIN_KEY}"})
            assert r.status_code == 200, r.text[:300]
    secret = {"admin": ADMIN_KEY, "app": APP_KEY, "wrong": "sk-wrong", None: None}[who]
    headers = {"authorization": f"Bearer {secret}"} if secret else {}
    r = http.get(f"{prefix}/v1/requests/{quote(rid, safe='')}", headers=headers)
    check(r, (prefix, rid, who))
    guarded = prefix == "/guarded"
    allowed = {200, 404} if not guarded else ({200, 404} if who == "admin" else {403} if who == "app" else {401})
    assert r.status_code in allowed, (rid, who, r.status_code, r.text[:300])
    if r.status_code == 200:
        assert r.json()["id"] == rid and r.json()["object"] == "request.story"
    if rid == "fuzz-known-id" and (who == "admin" or not guarded):
        assert r.status_code == 200, r.text[:300]


# --- the Batch API (on the tiny app: its lines rerank with tiny-ce) ---
UPLOADED, BATCH_ID = "<uploaded-file>", "<a-batch>"
FILES: list[str] = []
BATCHES: list[str] = []
BATCH_LINE = st.fixed_dictionaries({"custom_id": TEXT.filter(bool), "method": st.just("POST"), "url": st.just("/v1/rerank"),
                                    "body": RERANK_JINA})


@pytest.fixture(scope="module")
def uploaded(http) -> str:
    lines = [{"custom_id": f"ok-{i}", "method": "POST", "url": "/v1/rerank",
              "body": {"model": "tiny-ce", "query": "q", "documents": ["a", "b"]}} for i in range(3)]
    r = http.post("/tiny/v1/files", files={"file": ("ok.jsonl", "\n".join(json.dumps(x) for x in lines))},
                  data={"purpose": "batch"})
    assert r.status_code == 200, r.text
    FILES.append(r.json()["id"])
    return r.json()["id"]


@FUZZ
@given(lines=st.lists(mutated(BATCH_LINE) | ANY_JSON, min_size=1, max_size=4), raw=st.none() | RAW,
       purpose=st.sampled_from(["batch", "batch", "batch", "fine-tune", "", "x" * 300]),
       field=st.sampled_from(["file", "file", "file", "document"]))
def test_file_upload(http, lines, raw, purpose, field):
    """POST /v1/files: any JSONL (its lines are checked when a batch uses it), any bytes, any purpose."""
    content = raw if raw is not None else "\n".join(json.dumps(x) for x in lines).encode()
    r = http.post("/tiny/v1/files", files={field: ("b.jsonl", content)}, data={"purpose": purpose})
    check(r, (lines, raw, purpose, field))
    if r.status_code == 200:
        FILES.append(r.json()["id"])


BATCH_BODY = st.fixed_dictionaries(
    {"input_file_id": st.sampled_from([UPLOADED, UPLOADED, "file-nope", ""]),
     "endpoint": st.sampled_from(["/v1/rerank", "/v1/rerank", "/v1/embeddings", "/v1/chat/completions", "/v1/x"])},
    optional={"completion_window": st.sampled_from(["24h", "1h", "30m", "0h", "24", "169h"]),
              "metadata": st.dictionaries(TEXT, TEXT, max_size=3)})


@FUZZ
@given(body=mutated(BATCH_BODY), use_any_file=st.booleans())
def test_batch_create(http, uploaded, body, use_any_file):
    """POST /v1/batches over the uploaded file (or any fuzzed upload): its lines run through the router."""
    real = FILES[-1] if use_any_file and FILES else uploaded
    raw = json.dumps(body).replace(UPLOADED, real).encode()
    r = http.post("/tiny/v1/batches", content=raw, headers={"content-type": "application/json"})
    check(r, body)
    if r.status_code == 200:
        BATCHES.append(r.json()["id"])


@FUZZ
@given(route=st.sampled_from(["GET /v1/files/{}", "GET /v1/files/{}/content", "DELETE /v1/files/{}",
                              "GET /v1/batches/{}", "POST /v1/batches/{}/cancel"]),
       ident=st.sampled_from([UPLOADED, BATCH_ID]) | TEXT | EDGE_TEXT.filter(lambda t: len(t) < 1000))
def test_file_and_batch_ids(http, uploaded, route, ident):
    from urllib.parse import quote

    ident = {UPLOADED: uploaded, BATCH_ID: BATCHES[0] if BATCHES else "batch_none"}.get(ident, ident)
    method, path = route.split(" ")
    r = http.request(method, "/tiny" + path.format(quote(ident, safe="")))
    check(r, (route, ident))
    assert r.status_code in (200, 400, 404), r.text[:300]


@FUZZ
@given(route=st.sampled_from(["/v1/batches", "/v1/files"]),
       params=st.lists(st.tuples(st.sampled_from(["after", "limit", "order", "purpose"]) | TEXT,
                                 st.integers(-5, 20_000).map(str) | st.sampled_from(["asc", "desc", "batch", "batch_output"])
                                 | TEXT | st.just(BATCH_ID) | st.just(UPLOADED)), max_size=4),
       raw=st.none() | USAGE_RAW)
def test_batch_and_file_lists(http, uploaded, route, params, raw):
    params = [(k, {BATCH_ID: BATCHES[0] if BATCHES else v, UPLOADED: uploaded}.get(v, v)) for k, v in params]
    r = http.get(f"/tiny{route}?{raw}") if raw else http.get(f"/tiny{route}", params=params)
    check(r, (route, params, raw))
    assert r.status_code in (200, 400), r.text[:300]
    if r.status_code == 200:
        assert r.json()["object"] == "list"


def test_afterwards_every_model_is_ready_and_every_circuit_closed(http):
    """Runs after the fuzzing above (pytest keeps file order)."""
    if not SEEN:
        pytest.skip("checks what the fuzz tests above did; run the module whole")
    # the drawn bodies reached the models (200) and were refused (400) on every route
    served = {path for path, codes in SEEN.items() if 200 in codes and 400 in codes}
    assert served >= {"/tiny/v1/chat/completions", "/tiny/v1/completions", "/v1/embeddings", "/tiny/v2/rerank",
                      "/tiny/tokenize", "/tiny/detokenize"}, SEEN
    assert served & {"/tiny/v1/rerank", "/tiny/rerank"}, SEEN
    assert served >= {"/tiny/v1/files", "/tiny/v1/batches"}, SEEN
    # every fuzzed batch ended, and none of its lines got a 5xx from the router path
    assert BATCHES, "no fuzzed batch was created"
    for batch_id in BATCHES:
        import time

        deadline = time.time() + 180
        while (b := http.get(f"/tiny/v1/batches/{batch_id}").json())["status"] not in ("completed", "failed", "cancelled"):
            assert time.time() < deadline, b
            time.sleep(1)
        for file_id in (b["output_file_id"], b["error_file_id"]):
            for line in http.get(f"/tiny/v1/files/{file_id}/content").text.splitlines() if file_id else []:
                response = json.loads(line)["response"]
                assert response is None or response["status_code"] < 500, line[:400]
    for prefix in ("", "/tiny"):
        ready = http.get(f"{prefix}/ready")
        assert ready.status_code == 200, ready.text[:500]
        models = http.get(f"{prefix}/v1/status").json()["models"]
        assert {n: m["circuit"]["state"] for n, m in models.items()} == {n: "closed" for n in models}
