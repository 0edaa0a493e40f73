"""Tiny random-weight models on real engines: tensor parallelism and its placement, both
rerank engines on the same cross-encoder, batching retuned in place."""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import pytest
from ray import serve

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("shared")]  # the shared apps (tests/e2e/conftest.py)


@pytest.fixture(scope="module")
def http(stack) -> httpx.Client:
    with httpx.Client(base_url=stack.tiny, timeout=120) as c:
        yield c


def test_tp2_replica_holds_two_gpus_on_one_node_and_serves(stack, http):
    card = serve.get_deployment_handle("llm-tiny-llm-tp2", app_name="tiny").card.remote().result()
    # The head node has 1 GPU and the worker 2: a TP=2 replica can only fit on the worker,
    # and it must hold both GPUs itself so vLLM's TP workers (forked by it) can use them.
    assert card.replica.node_id == stack.gpu_node_id
    assert len(card.replica.gpu_ids) == 2
    r = http.post("/v1/chat/completions", json={
        "model": "tiny-llm-tp2", "messages": [{"role": "user", "content": "the capital of france"}],
        "max_tokens": 5, "temperature": 0, "seed": 1,
    })
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] > 0
    _story_has_the_engines_timings(http, r, card, stream=False)
    r = http.post("/v1/completions", json={"model": "tiny-llm-tp2", "prompt": "paris is", "max_tokens": 4, "stream": True})
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    _story_has_the_engines_timings(http, r, card, stream=True)


def _story_has_the_engines_timings(http, r, card, stream: bool) -> None:
    """GET /v1/requests/{id} of an LLM request: the replica that served it and vLLM's own timings
    of it (queue wait, prefill, decode, tokens), which match what the client was charged."""
    story = http.get(f"/v1/requests/{r.headers['x-request-id']}").json()
    assert story["stream"] is stream and story["status"] == 200 and story["outcome"] == "ok", story
    (attempt,) = story["attempts"]
    assert attempt["replica"] == card.replica.replica_id and attempt["node_id"] == card.replica.node_id
    engine, usage = story["engine"], story["usage"]
    assert engine is not None, story
    assert engine["queued_ms"] >= 0 and engine["prefill_ms"] > 0 and engine["finish_reason"] in ("length", "stop")
    assert engine["prompt_tokens"] == usage["prompt_tokens"] and engine["generated_tokens"] == usage["completion_tokens"]
    assert (story["first_token_ms"] is not None) is stream


def test_cross_encoder_scores_agree_across_engines(http):
    body = {"query": "capital of france", "documents": ["paris is the capital city", "green apple", "blue sky sea"]}
    hf = http.post("/v1/rerank", json={**body, "model": "tiny-ce"}).json()["results"]
    vl = http.post("/v1/rerank", json={**body, "model": "tiny-ce-vllm"}).json()["results"]
    by_index = lambda rs: {r["index"]: r["relevance_score"] for r in rs}  # noqa: E731
    h, v = by_index(hf), by_index(vl)
    assert set(h) == {0, 1, 2}
    for i in h:
        assert 0.0 < h[i] < 1.0
        assert h[i] == pytest.approx(v[i], abs=1e-3)  # same weights, two engines


def test_qwen3_reranker_conversion_agrees_across_engines(http):
    """vLLM serves the causal LM only through the preset's hf_overrides conversion; transformers
    scores it from the yes/no logits. Same weights, same template: the same scores."""
    body = {"query": "capital of france", "documents": ["paris is the capital city", "green apple", "paris " * 600]}
    hf = http.post("/v1/rerank", json={**body, "model": "tiny-qwen3-hf"})
    vl = http.post("/v1/rerank", json={**body, "model": "tiny-qwen3-vllm"})
    assert hf.status_code == 200 and vl.status_code == 200, (hf.text, vl.text)
    by_index = lambda rs: {r["index"]: r["relevance_score"] for r in rs}  # noqa: E731
    h, v = by_index(hf.json()["results"]), by_index(vl.json()["results"])
    assert set(h) == {0, 1, 2} and len(set(h.values())) == 3
    for i in h:
        assert h[i] == pytest.approx(v[i], abs=2e-3)
    assert hf.json()["truncated_documents"] == vl.json()["truncated_documents"] == 1


def test_cross_encoder_truncates_over_long_pairs_on_both_engines(http):
    long_doc = "paris " * 500  # the tiny model has 64 positions
    for model in ("tiny-ce", "tiny-ce-vllm"):
        r = http.post("/v1/rerank", json={"model": model, "query": "paris", "documents": [long_doc, "apple"]})
        assert r.status_code == 200, (model, r.text)
        assert r.headers["x-truncated-documents"] == "1"


def test_pairs_from_concurrent_requests_share_forward_passes(http):
    def one(i):
        return http.post("/v1/rerank", json={"model": "tiny-ce", "query": "q", "documents": [f"doc {i}", "a"]}).status_code

    handle = serve.get_deployment_handle("rerank-tiny-ce", app_name="tiny")
    mark = handle.card.remote().result().forward_passes
    with cf.ThreadPoolExecutor(8) as pool:
        assert set(pool.map(one, range(24))) == {200}
    sizes = handle.batch_sizes.remote(mark).result()
    assert sum(sizes) == 24 * 2  # exactly this test's pairs (no other traffic reaches tiny-ce now)
    assert max(sizes) > 2  # one request has 2 pairs; more means requests were merged


def test_batching_is_retuned_in_place_through_user_config(stack):
    from tests.e2e.conftest import deploy, kept_apps

    handle = serve.get_deployment_handle("rerank-tiny-ce", app_name="tiny")
    before = handle.card.remote().result()
    assert before.batching == {"max_batch_size": 8, "batch_wait_timeout_s": 0.05, "max_batch_tokens": 32768}
    want = {"max_batch_size": 4, "batch_wait_timeout_s": 0.01, "max_batch_tokens": 4096}
    # Same args (same code version), new user_config for one deployment: what an operator puts
    # in serve_config.yaml's `deployments:` section before `serve deploy`.
    deploy(kept_apps(stack), overrides={"tiny": [{"name": "rerank-tiny-ce", "user_config": want}]})
    for _ in range(60):  # the app may still read RUNNING before the controller applies the update
        after = handle.card.remote().result()
        if after.batching == want:
            break
        time.sleep(0.5)
    assert after.batching == want
    assert after.replica.replica_id == before.replica.replica_id  # same process: updated in place


def test_status_charts_count_the_answers_of_the_last_minutes(http):
    """/v1/status's history (the charts on /status): the router counts each model's answers and
    hands them to the app's status board every 10 s; replicas add their in-flight count."""
    from tests.e2e.conftest import wait_for

    def history(model: str) -> list[dict]:
        return http.get("/v1/status").json()["models"][model]["history"]

    # Only this test's buckets: it starts at a 10 s boundary, so an earlier test's answers are all in
    # buckets before it (a bucket is shown once filled, when its windows have arrived).
    started = (time.time() // 10 + 1) * 10
    time.sleep(started - time.time() + 0.3)

    def since_start(model: str) -> list[dict]:
        return [p for p in history(model) if p["t"] >= started]

    before = sum(p["requests"] for p in since_start("tiny-ce"))
    assert before == 0, since_start("tiny-ce")
    for i in range(20):
        assert http.post("/v1/rerank", json={"model": "tiny-ce", "query": "q", "documents": [f"d{i}"]}).status_code == 200
    r = http.post("/v1/completions", json={"model": "tiny-llm-tp2", "prompt": "paris is", "max_tokens": 4, "stream": True})
    assert r.status_code == 200
    # 20, or more if a batch line of an earlier module still runs on tiny-ce.
    wait_for(lambda: sum(p["requests"] for p in since_start("tiny-ce")) >= before + 20, 40, "the rerank answers on /v1/status")
    ce = since_start("tiny-ce")
    assert any(p["p50_ms"] and p["rps"] > 0 for p in ce) and any(p["in_flight"] is not None for p in ce), ce[-3:]
    llm = wait_for(lambda: [p for p in since_start("tiny-llm-tp2") if p["ttft_p50_ms"] is not None], 40, "a TTFT point")
    assert llm[-1]["ttft_p50_ms"] > 0 and any(p["tokens_per_s"] > 0 for p in since_start("tiny-llm-tp2")), llm[-3:]
