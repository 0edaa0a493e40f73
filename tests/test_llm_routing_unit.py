"""The LLM cost model (serve_app/llm_routing/) against a simulated engine: each replica an LRU
cache of prompt blocks, as vLLM's prefix cache is, and requests finishing a few arrivals later."""

from __future__ import annotations

import collections
import random

import pytest

from serve_app.llm_routing.config import RoutingConfig
from serve_app.llm_routing.cost import CostModel, ReplicaLoad
from serve_app.llm_routing.prefix import block_hashes, render

SYSTEM = "You are a careful assistant for ACME's support desk. " * 60  # ~800 tokens, shared by all
DOCS = ["Document %d: " % i + ("facts about product %d. " % i) * 120 for i in range(6)]  # ~700 tokens each


def chat(*turns: str, system: str = SYSTEM, model: str = "m", max_tokens: int = 32) -> dict:
    messages = [{"role": "system", "content": system}]
    for i, t in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
    return {"model": model, "messages": messages, "max_tokens": max_tokens}


class Sim:
    """N replicas of one model behind one router's cost model. A replica's real cache is an LRU of
    block hashes (capacity `blocks`); `hits` counts the tokens it really had cached, as vLLM would."""

    def __init__(self, n: int = 2, blocks: int = 10_000, concurrency: int = 1, seed: int = 0, **cfg) -> None:
        self.model = CostModel(RoutingConfig(**cfg), rng=random.Random(seed))
        self.replicas = [f"r{i}" for i in range(n)]
        self.model.update({r: ReplicaLoad(block_size=16, num_blocks=blocks) for r in self.replicas})
        self.cache = {r: collections.OrderedDict() for r in self.replicas}
        self.blocks, self.concurrency = blocks, concurrency
        self.inflight: collections.deque[str] = collections.deque()
        self.served: collections.Counter[str] = collections.Counter()
        self.hits = self.queries = 0
        self.n = 0

    def send(self, body: dict, api: str = "chat", request_id: str | None = None) -> str:
        prompt = self.model.prompt(api, body)
        best = self.model.rank(prompt, list(self.replicas), request_id)[0]
        self.n += 1
        handle_id = f"h{self.n}"
        self.model.routed(handle_id, request_id, best.replica, prompt, best)
        self._engine(best.replica, prompt.hashes, prompt.block_size)
        self.served[best.replica] += 1
        self.inflight.append(handle_id)
        while len(self.inflight) > self.concurrency - 1:
            self.model.completed(self.inflight.popleft())
        return best.replica

    def _engine(self, replica: str, hashes: list[bytes], block_size: int) -> None:
        cache = self.cache[replica]
        hit = 0
        for h in hashes:
            if h not in cache:
                break
            hit += 1
        self.hits += hit * block_size
        self.queries += len(hashes) * block_size
        for h in reversed(hashes):  # vLLM frees a request's blocks tail first
            cache[h] = None
            cache.move_to_end(h)
        while len(cache) > self.blocks:
            cache.popitem(last=False)


def test_a_conversations_turns_land_where_its_prefix_is():
    sim = Sim(n=3)
    firsts = {doc: sim.send(chat(doc + " Question 1?")) for doc in DOCS}
    for turn in range(2, 5):
        for doc, replica in firsts.items():
            turns = [doc + " Question 1?"] + [f"answer {t}" if t % 2 else f"Question {t}?" for t in range(1, 2 * turn - 1)]
            assert sim.send(chat(*turns)) == replica
    assert sim.hits / sim.queries > 0.6


def test_a_prefix_every_request_shares_spreads_over_the_replicas_under_load():
    sim = Sim(n=2, concurrency=8)
    for i in range(200):
        sim.send(chat(f"Unique question number {i} about order {i * 7919 % 1000}?"))
    assert max(sim.served.values()) / 200 <= 0.65, sim.served
    assert sim.hits / sim.queries > 0.5  # both hold the system prompt: still mostly cached


def test_load_overrides_affinity():
    sim = Sim(n=2)
    home = sim.send(chat(DOCS[0] + " Question 1?"))
    other = next(r for r in sim.replicas if r != home)
    # the home replica reports a long queue of work from other routers: the prefix is not worth it
    sim.model.observe({home: ReplicaLoad(block_size=16, num_blocks=10_000, outstanding_tokens=50_000, reported_at=1.0)})
    assert sim.send(chat(DOCS[0] + " Question 1?", "answer", "Question 2?")) == other


def test_a_full_kv_cache_costs_more_than_an_empty_one():
    model = CostModel(RoutingConfig(), rng=random.Random(1))
    model.update({"full": ReplicaLoad(kv_usage=0.97), "empty": ReplicaLoad(kv_usage=0.05)})
    prompt = model.prompt("chat", chat("hello"))
    assert [c.replica for c in model.rank(prompt, ["full", "empty"])] == ["empty", "full"]


def test_an_adapter_and_its_base_share_no_blocks():
    base = block_hashes(render("chat", chat("Question?", model="smollm2")), 64)
    adapter = block_hashes(render("chat", chat("Question?", model="smollm2-sql")), 64)
    assert base and adapter and not set(base) & set(adapter)
    sim = Sim(n=2)
    home = sim.send(chat(DOCS[1] + " Question?", model="base"))
    prompt = sim.model.prompt("chat", chat(DOCS[1] + " Question?", model="adapter"))
    assert all(c.cached_tokens == 0 for c in sim.model.costs(prompt, sim.replicas)), home


def test_roles_tools_and_order_are_part_of_the_prefix():
    a = render("chat", {"model": "m", "messages": [{"role": "user", "content": "x" * 400}]})
    b = render("chat", {"model": "m", "messages": [{"role": "system", "content": "x" * 400}]})
    c = render("chat", {"model": "m", "tools": [{"type": "function", "function": {"name": "f"}}],
                        "messages": [{"role": "user", "content": "x" * 400}]})
    assert len({block_hashes(t, 64)[0] for t in (a, b, c)}) == 3
    longer = render("chat", {"model": "m", "messages": [{"role": "user", "content": "x" * 400}, {"role": "assistant", "content": "y"}]})
    assert block_hashes(longer, 64)[: len(block_hashes(a, 64)) - 1] == block_hashes(a, 64)[:-1]


def test_a_retry_tries_another_replica_first():
    sim = Sim(n=2)
    first = sim.send(chat(DOCS[2] + " Question?"), request_id="req-1")
    prompt = sim.model.prompt("chat", chat(DOCS[2] + " Question?"))
    assert sim.model.rank(prompt, sim.replicas, "req-1")[0].replica != first  # the retry of req-1
    assert sim.model.rank(prompt, sim.replicas, "req-2")[0].replica == first  # anyone else: affinity


def test_two_routers_see_one_load_through_the_replicas_reports():
    """Load counted per router would be 1/N of it: the replicas' own outstanding count is used."""
    a, b = CostModel(rng=random.Random(0)), CostModel(rng=random.Random(0))
    for m in (a, b):
        m.update({"r0": ReplicaLoad(outstanding_tokens=0), "r1": ReplicaLoad(outstanding_tokens=0)})
    prompt = a.prompt("chat", chat("hi"))
    for i in range(6):  # router a sends six requests to r0 and none finish
        a.routed(f"h{i}", None, "r0", prompt, None)
    reported = sum(prompt_tokens + output for _, prompt_tokens, output in a.inflight.values())
    b.update({"r0": ReplicaLoad(outstanding_tokens=reported), "r1": ReplicaLoad(outstanding_tokens=0)})
    assert b.rank(b.prompt("chat", chat("hi")), ["r0", "r1"])[0].replica == "r1"


def test_a_report_taken_while_this_routers_request_ran_does_not_outlive_that_request():
    """A conversation's next turn comes as soon as the last one is answered, before the replica's
    next report: the report that still counts the finished turn must not push the turn elsewhere
    (it did, in CI: the home replica looked busy by exactly the turn it had just served)."""
    now = [100.0]
    sim = Sim(n=2)
    sim.model.clock = lambda: now[0]
    first = chat(DOCS[0] + " Question 1?", max_tokens=8)
    home = sim.send(first)  # Sim ends it at once (concurrency 1)
    prompt = sim.model.prompt("chat", first)
    turn = lambda i: chat(DOCS[0] + " Question 1?", "answer", f"Question {i}?", max_tokens=8)  # noqa: E731
    for arrives_after_the_end in (False, True):  # the report reaches the router before / after the turn ended
        sim.model.routed("h-next", None, home, prompt, None)  # the turn in flight when the replica reports
        held = sim.model.outstanding[home]
        report = ReplicaLoad(block_size=16, num_blocks=10_000, outstanding_tokens=held, reported_at=now[0])
        if not arrives_after_the_end:
            sim.model.observe({home: report})
        now[0] += 0.5
        sim.model.completed("h-next")
        if arrives_after_the_end:
            sim.model.observe({home: report})
        assert sim.model.others[home] == 0
        assert sim.send(turn(int(arrives_after_the_end))) == home
        sim.model.observe({home: report})  # the same report again (Serve hands it with every routing)
        assert sim.model.others[home] == 0
        now[0] += 60


def test_work_that_ended_long_before_a_report_is_not_taken_off_other_routers_share():
    now = [0.0]
    model = CostModel(rng=random.Random(0))
    model.clock = lambda: now[0]
    model.update({"r0": ReplicaLoad()})
    prompt = model.prompt("chat", chat("hi"))
    model.routed("mine", None, "r0", prompt, None)
    model.completed("mine")
    now[0] += model.report_transit_s + 1
    model.observe({"r0": ReplicaLoad(outstanding_tokens=700, reported_at=9.0)})
    assert model.others["r0"] == 700


def test_other_routers_work_counts_once_beside_this_routers_own():
    model = CostModel(rng=random.Random(0))
    model.update({"r0": ReplicaLoad(), "r1": ReplicaLoad()})
    prompt = model.prompt("chat", chat("hi"))
    model.routed("mine", None, "r0", prompt, None)
    mine = model.outstanding["r0"]
    model.observe({"r0": ReplicaLoad(outstanding_tokens=mine + 500, reported_at=1.0)})  # 500 from another router
    assert model.costs(prompt, ["r0"])[0].outstanding_tokens == mine + 500
    model.completed("mine")
    assert model.costs(prompt, ["r0"])[0].outstanding_tokens == 500
    model.update({"r1": ReplicaLoad()})  # r0 gone: its report and share are forgotten
    assert "r0" not in model.others and "r0" not in model.loads


def test_the_cache_index_forgets_as_the_replicas_cache_would():
    sim = Sim(n=1, blocks=40)
    sim.send(chat(DOCS[3] + " Q?"))  # ~90 blocks: the first 40 are kept (a prefix counts from its start)
    assert sim.model.index.size("r0") == 40  # capped to the replica's reported cache size, in blocks
    prompt = sim.model.prompt("chat", chat(DOCS[3] + " Q?"))
    assert sim.model.costs(prompt, ["r0"])[0].cached_tokens == 40 * 16
    sim.send(chat(DOCS[4] + " Q?", system="Another system prompt entirely. " * 60))
    assert sim.model.costs(prompt, ["r0"])[0].cached_tokens == 0  # evicted by the newer prompt


@pytest.mark.parametrize("stats", [None, {}, {"kv_usage": "full"}, {"running": True, "block_size": 128, "extra": 1}])
def test_reports_missing_or_odd_keys_are_read_without_failing(stats):
    load = ReplicaLoad.from_stats(stats)
    assert load.kv_usage == 0.0 and load.block_size in (16, 128)


def test_the_serve_adapter_counts_only_the_accepted_attempt_until_its_own_result_ends():
    """Serve fires on_request_completed for a rejected attempt too (same id, maybe after the retry
    was accepted) and may report a short request routed after it ended: the adapter counts the
    accepted attempt from its own result's completion instead."""
    import asyncio
    from types import SimpleNamespace

    from serve_app.llm_routing import registry
    from serve_app.llm_routing.request_router import CostAwareRouter

    async def scenario():
        router = CostAwareRouter.__new__(CostAwareRouter)  # Serve's constructor needs a cluster
        router._deployment_id, router._lazily_fetched_loop = SimpleNamespace(name="llm-unit"), None
        router.initialize_state({"load_weight": 1.0})
        replicas = [SimpleNamespace(replica_id=SimpleNamespace(unique_id=r), routing_stats={"block_size": 16}) for r in ("a", "b")]
        body = chat(DOCS[0] + " Q?")
        pending = SimpleNamespace(args=["chat", body, "rid-1"], routing_context=SimpleNamespace(should_backoff=False),
                                  metadata=SimpleNamespace(call_method="create", internal_request_id="h1"))
        first = (await router.choose_replicas(replicas, pending))[0][0]
        router.on_request_completed(first.replica_id, "h1")  # the first attempt was rejected
        ranks = await router.choose_replicas(replicas, pending)  # Serve asks again, same request
        assert pending.routing_context.should_backoff and [len(r) for r in ranks] == [1, 1]
        done = []
        result = SimpleNamespace(add_done_callback=done.append)
        router.on_request_routed(pending, ranks[0][0].replica_id, result)
        chosen = ranks[0][0].replica_id.unique_id
        assert router.model.outstanding[chosen] > 0  # the accepted attempt is counted
        decision = registry.pop_decision("rid-1", body)
        assert decision[:2] == (chosen, 0) and decision[2] == router.model.prompt("chat", body).prompt_tokens
        assert registry.pop_decision("rid-1", dict(body)) is None  # another body with the same id: not this one
        router.on_request_completed(ranks[0][0].replica_id, "h1")  # Serve's own notice changes nothing
        assert router.model.outstanding[chosen] > 0
        done[0](None)  # the accepted attempt's result ends
        await asyncio.sleep(0)
        assert router.model.outstanding[chosen] == 0
        # a card call is not costed: every replica in one rank, as Serve's default
        card = SimpleNamespace(args=[], routing_context=SimpleNamespace(should_backoff=False),
                               metadata=SimpleNamespace(call_method="card", internal_request_id="h2"))
        assert await router.choose_replicas(replicas, card) == [replicas]

    asyncio.run(scenario())


def test_the_handlers_first_token_reaches_the_cost_model_of_the_accepted_stream_on_the_routers_loop():
    import asyncio
    from types import SimpleNamespace

    from serve_app.llm_routing import registry
    from serve_app.llm_routing.request_router import CostAwareRouter

    async def scenario():
        router = CostAwareRouter.__new__(CostAwareRouter)
        router._deployment_id, router._lazily_fetched_loop = SimpleNamespace(name="llm-unit-stream"), None
        router.initialize_state({"load_weight": 1.0})
        replicas = [SimpleNamespace(replica_id=SimpleNamespace(unique_id=r), routing_stats={"block_size": 16}) for r in ("a", "b")]
        body = chat(DOCS[2] + " Q?", max_tokens=16)
        pending = SimpleNamespace(args=["chat", body, "rid-s"], routing_context=SimpleNamespace(should_backoff=False),
                                  metadata=SimpleNamespace(call_method="create_stream", internal_request_id="hs"))
        chosen = (await router.choose_replicas(replicas, pending))[0][0]
        router.on_request_routed(pending, chosen.replica_id, SimpleNamespace(add_done_callback=lambda _: None))
        replica = chosen.replica_id.unique_id
        prompt = router.model.prompt("chat", body)
        assert router.model.outstanding[replica] == prompt.prompt_tokens + prompt.output_tokens
        registry.first_token("rid-s", dict(body))  # another body object: not this request
        registry.first_token("rid-s", body)
        await asyncio.sleep(0)  # it runs on the request router's loop (here: this one)
        assert router.model.outstanding[replica] == prompt.output_tokens
        registry.first_token("rid-s", body)  # once only
        await asyncio.sleep(0)
        assert router.model.outstanding[replica] == prompt.output_tokens

    asyncio.run(scenario())


def test_a_huge_max_tokens_claims_a_bounded_share_of_a_replicas_load():
    model = CostModel(rng=random.Random(0))
    assert model.prompt("chat", chat("hi", max_tokens=10**18)).output_tokens == 32_768
    assert model.prompt("chat", {**chat("hi"), "n": 10**9}).output_tokens == 32 * 16


def test_without_the_load_term_a_shared_system_prompt_pins_every_request_to_one_replica():
    """The counter-case of the spreading test: it is the load term that spreads."""
    sim = Sim(n=2, concurrency=8, load_weight=0.0)
    for i in range(200):
        sim.send(chat(f"Unique question number {i} about order {i * 7919 % 1000}?"))
    assert sorted(sim.served.values()) == [200]


def _llm(**extra) -> "ModelConfig":  # noqa: F821 - imported inside: the config package is heavy
    from serve_app.config import ModelConfig

    return ModelConfig.model_validate({"name": "m", "kind": "llm", "engine": "vllm", "source": "/models/m", **extra})


@pytest.mark.parametrize("extra,policy", [
    ({}, "power_of_two"),  # one replica: nothing to choose
    ({"deployment": {"num_replicas": 2}}, "cache_aware"),
    ({"deployment": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 3}}}, "cache_aware"),
    ({"deployment": {"num_replicas": 2}, "routing": {"policy": "power_of_two"}}, "power_of_two"),
])
def test_cache_aware_routing_is_the_default_for_a_model_that_may_run_two_replicas(extra, policy):
    from serve_app.app import model_deployment

    model = _llm(**extra)
    assert model.routing_policy == policy
    router = model_deployment(model)._deployment_config.request_router_config
    custom = router.request_router_class == "serve_app.llm_routing.request_router.CostAwareRouter"
    assert custom == (policy == "cache_aware")
    if custom:
        assert router.request_routing_stats_period_s == model.routing.stats_period_s
        assert router.request_router_kwargs == {
            "routing": {"load_weight": 1.0, "kv_penalty_tokens": 2048, "adapter_load_tokens": 512, "chars_per_token": 4.0,
                        "stats_period_s": model.routing.stats_period_s},
            "adapter_names": {}, "adapters_resident": 0}


def test_routing_is_refused_on_encoders_and_bad_weights_name_their_field():
    from pydantic import ValidationError

    from serve_app.config import ModelConfig

    with pytest.raises(ValidationError, match="routing applies to llm models only"):
        ModelConfig.model_validate({"name": "e", "kind": "embed", "engine": "transformers", "source": "/models/e",
                                    "routing": {"policy": "cache_aware"}})
    with pytest.raises(ValidationError, match="routing.policy"):
        _llm(routing={"policy": "round_robin"})
    with pytest.raises(ValidationError, match="routing.load_weight"):
        _llm(routing={"load_weight": -1})


def test_the_engine_load_sums_vllms_per_step_prefix_counters():
    from types import SimpleNamespace

    from deployments.engines.vllm_load import EngineLoad

    cfg = SimpleNamespace(cache_config=SimpleNamespace(block_size=128, num_gpu_blocks=64))
    load = EngineLoad(cfg)
    for queries, hits in ((300, 0), (300, 256), (0, 0)):
        step = SimpleNamespace(num_running_reqs=2, num_waiting_reqs=1, kv_cache_usage=0.25,
                               prefix_cache_stats=SimpleNamespace(queries=queries, hits=hits))
        load.record(step, None)
    load.record(None, None)  # a step with no scheduler stats changes nothing
    snap = load.snapshot()
    assert snap == {"block_size": 128, "num_blocks": 64, "kv_usage": 0.25, "running": 2, "waiting": 1,
                    "prefix_queries": 600, "prefix_hits": 256}
    assert ReplicaLoad.from_stats({**snap, "outstanding_tokens": 40}).num_blocks == 64


def test_any_json_body_is_costed_without_raising():
    """The router costs bodies before vLLM validates them: whatever a client sent (the router's
    envelope checks only model, stream, n and max_tokens), costing must not fail."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalar = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
    anything = st.recursive(scalar, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                            max_leaves=20)
    body = st.dictionaries(st.sampled_from(["model", "messages", "prompt", "tools", "max_tokens", "n",
                                            "max_completion_tokens", "chat_template_kwargs"]), anything, max_size=6)
    model = CostModel(rng=random.Random(0))
    model.update({"r0": ReplicaLoad(num_blocks=4), "r1": ReplicaLoad(kv_usage=0.5)})

    @settings(max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(api=st.sampled_from(["chat", "completion"]), body=body)
    def check(api, body):
        prompt = model.prompt(api, body)
        best = model.rank(prompt, ["r0", "r1"], "rid")[0]
        model.routed("h", "rid", best.replica, prompt, best)
        model.completed("h")

    check()


def test_each_decision_is_logged_sent_as_a_header_and_counted_per_replica_for_prometheus():
    from starlette.responses import Response

    from serve_app.handlers.llm import with_routing
    from serve_app.llm_routing import registry
    from serve_app.metrics import RouterMetrics

    counted: dict[tuple[str, tuple], float] = collections.Counter()

    class Mem:
        def __init__(self, name):
            self.name = name

        def inc(self, value=1.0, tags=None):
            counted[(self.name, tuple(sorted((tags or {}).items())))] += value

        def observe(self, value, tags=None): ...

        def set(self, value, tags=None): ...

    metrics = RouterMetrics(factory=lambda kind, name, desc, tags: Mem(name))
    body = chat("hi")
    registry.record_decision(("rid-9", id(body)), "replica-a", 96, 130)
    r = with_routing(Response(), "rid-9", body, metrics, "m")
    assert r.headers["x-predicted-cached-tokens"] == "96"
    tags = (("model", "m"), ("replica", "replica-a"))
    assert counted[("serve_app_routed_prompt_tokens", tags)] == 130
    assert counted[("serve_app_routed_predicted_cached_tokens", tags)] == 96
    assert "x-predicted-cached-tokens" not in with_routing(Response(), "rid-9", body, metrics, "m").headers  # read once


def test_a_replica_only_decoding_keeps_the_prefix_it_holds():
    """Load is work not yet computed: once a request's first token is out, its prompt no longer
    weighs on its replica. The next turn of a conversation whose earlier turn is still decoding
    there stays home; counted with its whole prompt, that turn looked like ~700 tokens of queue
    and the turn went to the replica without the prefix (and paid its prefill)."""
    for first_token_seen, stays in ((False, False), (True, True)):
        sim = Sim(n=2, concurrency=2)  # the first turn is still in flight when the next comes
        home = sim.send(chat(DOCS[3] + " Question 1?", max_tokens=16))
        if first_token_seen:
            sim.model.prefilled(sim.inflight[-1])
        nxt = sim.model.prompt("chat", chat(DOCS[3] + " Question 1?", "answer", "Question 2?", max_tokens=16))
        assert (sim.model.rank(nxt, sim.replicas)[0].replica == home) is stays, first_token_seen


def test_a_prefilled_requests_prompt_leaves_the_count_once_and_a_stale_report_does_not_put_it_back():
    now = [50.0]
    m = CostModel(rng=random.Random(0))
    m.clock = lambda: now[0]
    m.update({"r0": ReplicaLoad(), "r1": ReplicaLoad()})
    prompt = m.prompt("chat", chat(DOCS[0] + " Question?", max_tokens=16))
    m.routed("h1", None, "r0", prompt, None)
    full = m.outstanding["r0"]
    assert full == prompt.prompt_tokens + prompt.output_tokens
    m.prefilled("h1")
    m.prefilled("h1")  # said twice (a retry's first token): counted once
    assert m.outstanding["r0"] == prompt.output_tokens
    # The replica's report from before its first token still holds the whole request: no other
    # router's work is read into it (the prompt left this router's count within the transit time).
    m.observe({"r0": ReplicaLoad(outstanding_tokens=full, reported_at=1.0), "r1": ReplicaLoad()})
    assert m.others.get("r0", 0) == 0
    m.completed("h1")
    assert "r0" not in m.outstanding and m.inflight == {}
    now[0] += m.report_transit_s + 1  # long after: a report that still says `full` is other routers' work
    m.observe({"r0": ReplicaLoad(outstanding_tokens=full, reported_at=2.0), "r1": ReplicaLoad()})
    assert m.others["r0"] == full


def test_the_replica_reports_a_streams_prompt_until_its_first_token_and_its_output_until_the_end():
    from deployments.llm import LLMServer
    from serve_app.config import ModelConfig

    server = LLMServer.__new__(LLMServer)
    server.cfg = ModelConfig.model_validate({"name": "m", "kind": "llm", "engine": "vllm", "source": "org/m"})
    server.outstanding_tokens = server.prompt_tokens_waiting = server.estimated_prompt_tokens = 0
    body = chat(DOCS[1] + " Question?", max_tokens=16)
    with server._counted("chat", body) as prefilled:
        whole = server.outstanding_tokens
        assert whole > 16
        assert server.prompt_tokens_waiting == whole - 16  # the autoscaler's waiting prompt tokens
        prefilled()
        prefilled()
        assert server.outstanding_tokens == 16  # the output still to come
        assert server.prompt_tokens_waiting == 0
    assert server.outstanding_tokens == 0 and server.prompt_tokens_waiting == 0
    with server._counted("chat", body):  # a whole answer never says: its prompt counts to the end
        assert server.outstanding_tokens == whole
        assert server.prompt_tokens_waiting == whole - 16
    assert server.outstanding_tokens == 0 and server.prompt_tokens_waiting == 0
    assert server.estimated_prompt_tokens == 2 * (whole - 16)  # every prompt, for the routers' block scale


def test_the_index_holds_what_vllms_blocks_hold_by_the_replicas_ratio_of_estimate_to_tokens():
    """Prose of whole words runs ~7 characters a token, the estimate 4: each of vLLM's blocks then
    holds ~1.75 of the router's. The replica reports both counts of its prompts (the estimate and
    vLLM's prefix-cache queries); the index's capacity follows their ratio, within bounds."""
    model = CostModel(RoutingConfig(), rng=random.Random(0))
    model.update({"r0": ReplicaLoad(block_size=16, num_blocks=40)})
    prompt = model.prompt("chat", chat(DOCS[3] + " Q?"))  # ~90 of the router's blocks
    model.routed("h1", None, "r0", prompt, None)
    assert model.index.size("r0") == 40
    model.update({"r0": ReplicaLoad(block_size=16, num_blocks=40, prefix_queries=10_000, estimated_prompt_tokens=17_500)})
    model.routed("h2", None, "r0", prompt, None)
    assert model.index.size("r0") == 70
    assert model.costs(prompt, ["r0"])[0].cached_tokens == 70 * 16
    # too little seen, or nothing reported: the cache's own size; a wild ratio: bounded
    assert ReplicaLoad(num_blocks=40, prefix_queries=100, estimated_prompt_tokens=1_000).block_scale() == 1.0
    assert ReplicaLoad(num_blocks=40, prefix_queries=10_000).block_scale() == 1.0
    assert ReplicaLoad(prefix_queries=10_000, estimated_prompt_tokens=1_000_000).block_scale() == 4.0
    assert ReplicaLoad(prefix_queries=10_000, estimated_prompt_tokens=1).block_scale() == 0.25


def _twelve_conversations_hit_rate(report_ratio: bool) -> float:
    sim = Sim(n=2, blocks=160, concurrency=1, seed=3)
    ratio = {"prefix_queries": 10_000, "estimated_prompt_tokens": 20_000} if report_ratio else {}
    sim.model.update({r: ReplicaLoad(block_size=16, num_blocks=80, **ratio) for r in sim.replicas})
    rng = random.Random(5)
    systems = [f"System prompt of group {g}. " + f"rule {g} applies here. " * 60 for g in range(12)]  # ~22 blocks
    for turn in (1, 3, 3):
        for g in rng.sample(range(12), 12):
            sim.send(chat(*[f"Question {g}.a", "ok", f"Question {g}.b"][:turn], system=systems[g]))
    return sim.hits / sim.queries


def test_conversations_keep_their_replica_longer_when_the_index_knows_vllms_block_holds_more():
    """The engine's cache holds 160 of the router's blocks per replica, reported as 80 of vLLM's
    blocks; with the replicas' ratio of estimate to tokens (2x) the index holds what the engine
    holds, and twelve conversations' later turns find their prefix more often (one request at a
    time, so affinity alone decides: 0.47 -> 0.66 of prompt tokens cached)."""
    without, with_ratio = _twelve_conversations_hit_rate(False), _twelve_conversations_hit_rate(True)
    assert with_ratio > without + 0.1, (without, with_ratio)
