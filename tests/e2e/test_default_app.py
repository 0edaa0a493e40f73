"""The embedded default (serve_config.yaml) on a real cluster: real SmolLM2 on vLLM, real
MiniLM embeddings and reranking, driven through the unmodified openai and cohere clients."""

from __future__ import annotations

import json
import math
import threading

import cohere
import httpx
import openai
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("shared")]  # the shared apps (tests/e2e/conftest.py)
LLM = "smollm2-135m-instruct"
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


@pytest.fixture(scope="module")
def oa(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(stack) -> httpx.Client:
    with httpx.Client(base_url=stack.base, timeout=120) as c:
        yield c


def test_models_lists_every_configured_model(oa):
    assert sorted(m.id for m in oa.models.list()) == ["all-minilm-l6-v2", "all-minilm-l6-v2-rerank", LLM]


def test_chat_answers_the_capital_of_france(oa):
    r = oa.chat.completions.create(
        model=LLM, messages=[SYSTEM, {"role": "user", "content": "What is the capital of France?"}],
        max_tokens=30, temperature=0,
    )
    assert "Paris" in r.choices[0].message.content
    assert r.usage.prompt_tokens > 10 and 0 < r.usage.completion_tokens <= 30


def test_chat_streaming_through_openai_client(oa):
    stream = oa.chat.completions.create(
        model=LLM, messages=[SYSTEM, {"role": "user", "content": "What is the capital of France?"}],
        max_tokens=20, temperature=0, stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert 0 < chunks[-1].usage.completion_tokens <= 20
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_completions_and_sampling_params(oa):
    r = oa.completions.create(model=LLM, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert "Paris" in r.choices[0].text
    r = oa.completions.create(model=LLM, prompt="Once upon a time", max_tokens=6, n=2, seed=7, temperature=1.0, stop=["\n"])
    assert [c.index for c in r.choices] == [0, 1] and r.usage.completion_tokens <= 12


def test_embeddings_are_real(oa):
    r = oa.embeddings.create(model="all-minilm-l6-v2", input=["A cat sits on the mat.", "A kitten is on the rug.", "Stock prices fell sharply."])
    a, b, c = (d.embedding for d in r.data)
    assert len(a) == 384 and math.isclose(sum(x * x for x in a), 1.0, rel_tol=1e-3)
    cos = lambda u, v: sum(x * y for x, y in zip(u, v))  # noqa: E731 - unit vectors
    assert cos(a, b) > cos(a, c) + 0.2


DOCS = [
    "Bananas are rich in potassium.",
    "Paris is the capital and largest city of France.",
    "The stock market closed lower today.",
]


def test_rerank_jina_shape_puts_relevant_document_first(http):
    r = http.post("/v1/rerank", json={"model": "all-minilm-l6-v2-rerank", "query": "What is the capital of France?", "documents": DOCS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["results"][0]["index"] == 1
    assert body["results"][0]["document"]["text"] == DOCS[1]
    assert body["usage"]["total_tokens"] > 0 and r.headers["x-served-model"] == "all-minilm-l6-v2-rerank"


def test_cohere_client_v2_rerank(stack):
    co = cohere.ClientV2(api_key="unused", base_url=stack.base)
    r = co.rerank(model="all-minilm-l6-v2-rerank", query="What is the capital of France?", documents=DOCS, top_n=2)
    assert [x.index for x in r.results][0] == 1 and len(r.results) == 2


def test_long_document_is_truncated_not_crashing(http):
    long_doc = "Paris is lovely in spring. " * 2000  # ~14k tokens, MiniLM takes 256
    r = http.post("/rerank", json={"model": "all-minilm-l6-v2-rerank", "query": "Paris", "documents": [long_doc, "x"]})
    assert r.status_code == 200, r.text
    assert r.headers["x-truncated-documents"] == "1"
    assert http.get("/ready").status_code == 200


def test_errors_reach_the_openai_client_as_4xx(oa, http):
    with pytest.raises(openai.NotFoundError):
        oa.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as e:  # vLLM would only warn about it
        oa.chat.completions.create(model=LLM, messages=[{"role": "user", "content": "hi"}], extra_body={"frobnicate": 1})
    assert "frobnicate" in str(e.value) and e.value.body["param"] == "frobnicate"
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model=LLM, messages=[{"role": "user", "content": "hi"}], max_tokens=100000)
    assert "100000" in str(e.value) and "2048" in str(e.value)
    r = http.post("/v1/chat/completions", json={"model": LLM, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert http.get("/ready").status_code == 200


def test_request_id_round_trip(http):
    r = http.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": "x"}, headers={"x-request-id": "trace-me-42"})
    assert r.headers["x-request-id"] == "trace-me-42"
    # ...and into the JSON logs of the router and the replica that served it, with node and replica.
    import pathlib
    import time

    import ray

    logs = pathlib.Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    deadline = time.time() + 10
    records = []
    want = {"default_router", "default_embed-all-minilm-l6-v2"}  # Serve's JSON logs name app_deployment
    while time.time() < deadline and not want <= {r.get("deployment") for r in records}:
        records = [json.loads(line) for p in logs.glob("replica_default_*.log")
                   for line in p.read_text(errors="replace").splitlines() if "trace-me-42" in line and line.startswith("{")]
        time.sleep(0.5)
    assert want <= {r.get("deployment") for r in records}, records[:2]
    assert all(r.get("request_id") == "trace-me-42" and r.get("replica") and r.get("node_id") for r in records), sorted(records[0])
    r = http.post("/v1/embeddings", json={"model": "nope", "input": "x"}, headers={"x-request-id": "trace-me-43"})
    assert r.status_code == 404 and r.json()["error"]["request_id"] == "trace-me-43"


def test_llm_uses_the_models_own_sampling_defaults(stack):
    from ray import serve

    card = serve.get_deployment_handle(f"llm-{LLM}", app_name="default").card.remote().result()
    # prepared SmolLM2 carries its model card's recommendation in generation_config.json
    assert card.sampling_defaults == {"temperature": 0.2, "top_p": 0.9}


def test_ready_reports_every_model(http):
    r = http.get("/ready")
    assert r.status_code == 200
    models = r.json()["models"]
    assert models[LLM]["max_input_tokens"] == 2048 and models["all-minilm-l6-v2"]["max_input_tokens"] == 256


def test_client_disconnect_mid_stream_frees_the_engine(stack, http):
    """Close a long stream after the first chunk; the engine must then serve new work at once."""
    body = {"model": LLM, "messages": [{"role": "user", "content": "Write a very long story."}],
            "max_tokens": 1500, "stream": True, "temperature": 1.0}
    with httpx.Client(base_url=stack.base, timeout=60) as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                break
    # If the aborted request kept generating, it would hold the engine for ~1500 tokens.
    from ray import serve

    handle = serve.get_deployment_handle(f"llm-{LLM}", app_name="default")
    for _ in range(50):
        if handle.unfinished_requests.remote().result() == 0:
            break
        threading.Event().wait(0.2)
    assert handle.unfinished_requests.remote().result() == 0


def test_concurrent_requests_share_a_batch(stack, http):
    import concurrent.futures as cf

    def one(i):
        return http.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": [f"text {i}"] * 4}).status_code

    from ray import serve

    handle = serve.get_deployment_handle("embed-all-minilm-l6-v2", app_name="default")
    mark = handle.card.remote().result().forward_passes
    with cf.ThreadPoolExecutor(8) as pool:
        assert set(pool.map(one, range(16))) == {200}
    sizes = handle.batch_sizes.remote(mark).result()
    assert sizes and max(sizes) > 4  # this test's own passes: more than one request's inputs in one
    assert sum(sizes) == 16 * 4  # every input of this test went through exactly one pass


# --- vLLM's own OpenAI layer in the replica: what an agent framework sends (issue 10) ---
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
ASK = [SYSTEM, {"role": "user", "content": "What is the weather in Paris?"}]


def _valid_weather_args(arguments: str) -> dict:
    args = json.loads(arguments)
    assert isinstance(args, dict) and isinstance(args["city"], str) and args["unit"] in ("celsius", "fahrenheit"), args
    return args


@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_named_and_required_tool_choice_give_schema_valid_arguments(oa, choice):
    r = oa.chat.completions.create(model=LLM, messages=ASK, tools=[WEATHER], tool_choice=choice, max_tokens=60, temperature=0)
    calls = r.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    _valid_weather_args(calls[0].function.arguments)


def test_a_conversation_with_a_tool_result_is_accepted(oa):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "celsius"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temperature": 18})},
    ]
    r = oa.chat.completions.create(model=LLM, messages=history, tools=[WEATHER], max_tokens=20, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls") and r.usage.prompt_tokens > 40


CITY = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"], "additionalProperties": False}


def test_response_format_json_schema_is_enforced_streaming_and_not(oa):
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}}
    msgs = [SYSTEM, {"role": "user", "content": "Name the capital of France as JSON."}]
    whole = oa.chat.completions.create(model=LLM, messages=msgs, response_format=fmt, max_tokens=60, temperature=0)
    streamed = oa.chat.completions.create(model=LLM, messages=msgs, response_format=fmt, max_tokens=60, temperature=0, stream=True)
    for text in (whole.choices[0].message.content, "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)):
        value = json.loads(text)
        assert set(value) == {"city", "country"} and all(isinstance(v, str) for v in value.values())


def test_openai_parse_with_a_pydantic_model(oa):
    import pydantic

    class City(pydantic.BaseModel):
        city: str
        country: str

    r = oa.chat.completions.parse(model=LLM, messages=[SYSTEM, {"role": "user", "content": "The capital of France?"}],
                                  response_format=City, max_tokens=60, temperature=0)
    assert isinstance(r.choices[0].message.parsed, City)


def test_logprobs_with_top_logprobs(oa):
    r = oa.chat.completions.create(model=LLM, messages=ASK, max_tokens=4, logprobs=True, top_logprobs=3, temperature=0)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content)


def test_n2_streaming_gives_each_choice_its_role_chunk(oa):
    stream = oa.chat.completions.create(model=LLM, messages=ASK, max_tokens=6, n=2, stream=True, temperature=1.0, seed=3)
    roles = [c.choices[0].index for c in stream if c.choices and c.choices[0].delta.role == "assistant"]
    assert sorted(roles) == [0, 1]


def test_tokenize_agrees_with_usage_and_detokenize_inverts_it(http, oa):
    msgs = [SYSTEM, {"role": "user", "content": "What is the capital of France?"}]
    tok = http.post("/tokenize", json={"model": LLM, "messages": msgs, "add_generation_prompt": True}).json()
    r = oa.chat.completions.create(model=LLM, messages=msgs, max_tokens=1, temperature=0)
    assert tok["count"] == r.usage.prompt_tokens and tok["max_model_len"] == 2048
    text = http.post("/detokenize", json={"model": LLM, "tokens": tok["tokens"]}).json()["prompt"]
    assert "capital of France" in text


def test_model_card_says_its_context_length(http):
    one = http.get(f"/v1/models/{LLM}").json()
    assert one["id"] == LLM and one["max_model_len"] == 2048 and one["device"] == "cpu"
    assert http.get("/v1/models/no-such-model").status_code == 404


def test_a_model_with_one_replica_keeps_serves_default_router(http):
    """One replica has nothing to choose between: the LLM keeps Serve's own router (the cost-aware
    one is tests/e2e/test_llm_routing.py's), and no prediction header is sent."""
    model = http.get("/v1/status").json()["models"][LLM]
    assert model["routing_policy"] == "power_of_two"
    r = http.post("/v1/chat/completions", json={"model": LLM, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 200 and "x-predicted-cached-tokens" not in r.headers
