"""LLM capacity by tokens (serve_app/autoscaling/): the token policy as a pure function over
synthetic metric streams, the same policy behind Serve's own autoscaling-policy API, admission by
queued prompt tokens, batch lines that only take spare KV cache, the cold start's Retry-After, and
the replica's measured prefill rate. The real stack scales in tests/e2e/test_chaos_streams.py."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve_app.autoscaling.policy import ReplicaSignals, Targets, decide, pressure_terms
from serve_app.autoscaling.queue import TokenQueue
from serve_app.config import ConfigError, parse_app_config
from serve_app.errors import Overloaded

T = Targets(ttft_target_s=2.0, kv_cache_target=0.8, waiting_target=5, scale_down_below=0.5)


@dataclasses.dataclass
class Fleet:
    """A simulated LLM deployment: prompts arrive at `arrival` tokens/s, each replica prefills
    `rate` tokens/s, a replica asked to start is up `start_ticks` control-loop ticks later. The
    waiting tokens are what the arrival leaves undone; KV use follows the requests each holds."""

    arrival: float
    rate: float = 1000.0
    replicas: int = 1
    starting: list[int] = dataclasses.field(default_factory=list)  # ticks left per starting replica
    start_ticks: int = 3
    prompt_tokens: int = 2000  # per request: few requests, many tokens
    waiting_tokens: float = 0.0

    def signals(self) -> list[ReplicaSignals]:
        n = self.replicas
        per = self.waiting_tokens / n
        requests = self.arrival / self.prompt_tokens  # requests/s, a second in flight each
        served = min(self.arrival + self.waiting_tokens, self.rate * n) / n
        return [ReplicaSignals(kv_usage=min(1.0, 0.1 + 0.25 * requests / n), waiting=per / self.prompt_tokens,
                               running=requests / n, prompt_tokens_waiting=per, prompt_tokens_per_s=served,
                               prefill_tokens_per_s=self.rate, ttft_s=per / self.rate + self.prompt_tokens / self.rate)
                for _ in range(n)]

    def tick(self, want: int) -> None:
        """One control-loop second: the queue moves, then the decision is applied (Serve's delays 0)."""
        self.waiting_tokens = max(0.0, self.waiting_tokens + self.arrival - self.rate * self.replicas)
        self.starting = [t - 1 for t in self.starting]
        self.replicas += sum(1 for t in self.starting if t <= 0)
        self.starting = [t for t in self.starting if t > 0]
        target = self.replicas + len(self.starting)
        if want > target:
            self.starting += [self.start_ticks] * (want - target)
        elif want < self.replicas and not self.starting:
            self.replicas = want

    def run(self, ticks: int, lo: int = 1, hi: int = 4) -> list[int]:
        seen = []
        for _ in range(ticks):
            d = decide(self.replicas, self.replicas + len(self.starting), self.signals(), T, lo, hi,
                       requests=self.arrival / self.prompt_tokens * 1.0)
            self.tick(d.replicas)
            seen.append(self.replicas)
        return seen


def test_it_scales_up_on_kv_saturation_with_few_requests():
    """Three requests on one replica: Serve's default (target 8 ongoing) would not move; the KV
    cache is 90% full, past its 0.8 target."""
    s = [ReplicaSignals(kv_usage=0.9, waiting=0, running=3, prompt_tokens_waiting=0, prefill_tokens_per_s=5000)]
    d = decide(1, 1, s, T, 1, 4, requests=3, target_ongoing_requests=8)
    assert (d.replicas, d.action) == (2, "up") and "KV-cache use" in d.reason
    assert d.terms["kv_cache"] == pytest.approx(0.9 / 0.8, abs=1e-3)
    assert math.ceil(3 / 8) == 1  # what the request-count policy would have asked for


def test_it_scales_up_on_prompt_tokens_whose_drain_time_passes_the_ttft_target():
    """Two 30k-token prompts waiting at 6k tokens/s: 10 s of prefill ahead of the next request."""
    s = [ReplicaSignals(kv_usage=0.3, waiting=2, running=1, prompt_tokens_waiting=60_000, prefill_tokens_per_s=6000)]
    d = decide(1, 1, s, T, 1, 8, requests=3)
    assert d.terms["drain"] == pytest.approx(60_000 / 6000 / 2.0)
    assert (d.replicas, d.action) == (5, "up") and "drain" in d.reason  # ceil(1 x 5.0)


def test_it_holds_while_replicas_are_still_starting():
    s = [ReplicaSignals(kv_usage=1.0, waiting=20, prompt_tokens_waiting=90_000, prefill_tokens_per_s=1000)]
    d = decide(1, 2, s, T, 1, 4, requests=30)
    assert (d.replicas, d.action) == (2, "hold") and "starting" in d.reason


def test_it_scales_down_only_when_its_estimate_on_fewer_replicas_stays_inside_the_band():
    light = [ReplicaSignals(kv_usage=0.1, waiting=0, prompt_tokens_waiting=0, prefill_tokens_per_s=1000)] * 2
    d = decide(2, 2, light, T, 1, 4)
    assert (d.replicas, d.action) == (1, "down") and "estimated" in d.reason
    # 0.3 of target on two replicas is 0.6 on one: above scale_down_below 0.5, so both stay
    medium = [ReplicaSignals(kv_usage=0.24, waiting=0, prefill_tokens_per_s=1000)] * 2
    d = decide(2, 2, medium, T, 1, 4)
    assert (d.replicas, d.action) == (2, "hold") and "0.60x with one replica fewer" in d.reason
    # never below min_replicas, and to zero only with no work at all
    assert decide(1, 1, [ReplicaSignals()], T, 0, 2, requests=0).replicas == 0
    assert decide(1, 1, [ReplicaSignals(running=1, kv_usage=0.01)], T, 0, 2, requests=1).replicas == 1
    assert decide(1, 1, [ReplicaSignals()], T, 1, 2).replicas == 1
    assert decide(1, 1, [ReplicaSignals(running=0.05)], T, 0, 2, requests=0).replicas == 0  # a health probe's share
    # What the replica itself holds keeps it up when Serve's request count reads 0 (a starved replica
    # pushes it late) and no rate is measured yet (one long prompt's prefill: no drain or demand term).
    assert decide(1, 1, [ReplicaSignals(running=1)], T, 0, 2, requests=0).replicas == 1
    held = decide(1, 2, [ReplicaSignals(prompt_tokens_waiting=1450)], T, 0, 2, requests=0)  # a second starting
    assert (held.replicas, held.action) == (2, "hold")


def test_with_no_signals_it_scales_on_requests_and_says_so():
    d = decide(1, 1, [], T, 1, 4, requests=9, target_ongoing_requests=4)
    assert d.replicas == 3 and d.pressure is None and "no token signals" in d.reason
    d = decide(0, 0, [], T, 0, 2, requests=1)
    assert (d.replicas, d.action) == (1, "up") and "no replica running" in d.reason


def test_a_long_prompt_burst_scales_up_then_settles_back_without_flapping():
    fleet = Fleet(arrival=2500)  # 2.5x what one replica prefills, ~1 request/s
    up = fleet.run(30)
    # ceil(2.5) drains the arrivals; the backlog built while replicas started may ask one more
    assert up[-1] in (3, 4) and max(up) == up[-1], up
    assert fleet.waiting_tokens < 1000  # the queue drained
    steady = fleet.run(60)
    changes = sum(1 for a, b in zip(steady, steady[1:]) if a != b)
    assert changes == 0, steady  # steady load: no oscillation
    fleet.arrival = 300  # the burst ends: 0.1 of a replica's work each on 3
    down = fleet.run(30)
    assert down[-1] == 1, down
    assert all(b <= a for a, b in zip(down, down[1:])), down  # down only, one step at a time


@settings(max_examples=200, deadline=None)
@given(arrival=st.floats(50, 8000), rate=st.floats(500, 5000), start=st.integers(1, 5))
def test_under_any_steady_load_it_never_flaps_and_keeps_the_queue_inside_the_ttft_target(arrival, rate, start):
    """Property: under a steady load, once settled, the replica count never reverses (no up then
    down, or down then up); fewer replicas than the load needs only while the queue they build is
    still inside the TTFT target (a load just over one replica's rate builds it slowly); and a
    replica is kept only when the policy's own estimate says one fewer would leave the band."""
    fleet = Fleet(arrival=arrival, rate=rate, start_ticks=start)
    fleet.run(80, hi=8)
    settled = fleet.run(60, hi=8)
    steps = [b - a for a, b in zip(settled, settled[1:]) if b != a]
    assert all(x > 0 for x in steps) or all(x < 0 for x in steps), settled
    n = fleet.replicas
    terms = pressure_terms(fleet.signals(), n, T)
    if n < min(8, math.ceil(arrival / rate - 1e-9)):
        assert terms["drain"] <= 1.0 + 1e-6, (n, terms)
    if n > 1 and not steps:
        assert max(terms[k] for k in ("kv_cache", "waiting", "drain", "demand")) * n / (n - 1) >= T.scale_down_below


# --- the same decision behind Serve's autoscaling-policy API ------------------------------------------

def serve_context(running: int, target: int, metrics: dict[str, list[float]], requests: float = 0.0, state=None, lo=1, hi=4):
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    dep = DeploymentID(name="llm-chat", app_name="")  # no app: the policy reports to no board
    replicas = [ReplicaID(f"r{i}", dep) for i in range(running)]
    agg = {name: {r: v for r, v in zip(replicas, values)} for name, values in metrics.items()}
    cfg = AutoscalingConfig(min_replicas=lo, max_replicas=hi, upscale_delay_s=0, downscale_delay_s=0, target_ongoing_requests=4)
    return AutoscalingContext(
        deployment_id=dep, deployment_name=dep.name, app_name=None, current_num_replicas=running, target_num_replicas=target,
        running_replicas=replicas, total_num_requests=requests, total_queued_requests=0, aggregated_metrics=agg,
        raw_metrics={}, capacity_adjusted_min_replicas=lo, capacity_adjusted_max_replicas=hi, policy_state=state or {},
        last_scale_up_time=None, last_scale_down_time=None, current_time=time.time(), config=cfg)


def test_the_serve_policy_reads_the_replicas_custom_metrics_and_keeps_its_decision_in_the_policy_state():
    from serve_app.autoscaling.serve_policy import LlmTokenPolicy

    policy = LlmTokenPolicy(model="chat", **dataclasses.asdict(T))
    ctx = serve_context(2, 2, {"kv_usage": [0.95, 0.9], "waiting": [1, 1], "prompt_tokens_waiting": [100, 100],
                               "prefill_tokens_per_s": [2000, 2000]}, requests=4, state={"serve_internal": 1})
    replicas, state = policy(ctx)
    assert replicas == 3
    assert state["llm_last_decision"]["action"] == "up" and "KV-cache use" in state["llm_last_decision"]["reason"]
    assert state["serve_internal"] == 1  # Serve's own keys survive
    # a replica that reported nothing yet carries no load: two reporting of three running
    ctx = serve_context(3, 3, {"kv_usage": [0.1, 0.1]})
    assert policy.decide(ctx).terms["kv_cache"] == pytest.approx(0.2 / 3 / 0.8, abs=1e-3)


def test_the_board_keeps_the_last_decision_and_each_change_once_and_the_load_time_after_the_replica(monkeypatch):
    """A decision repeated each tick while Serve's delay runs is one change; the controller tells
    the board at a change and every REPORT_EVERY_S, from a thread of its own, looking the board up
    by name (never creating it); the board keeps the replicas' load time."""
    import concurrent.futures

    from deployments import status_board
    from serve_app.autoscaling import serve_policy

    board = status_board.StatusBoard.__ray_actor_class__()
    sent, looked_up = [], []

    class Ref:
        def __init__(self, value):
            self.value = value

        def future(self):
            f = concurrent.futures.Future()
            f.set_result(self.value)
            return f

    class Handle:
        class autoscaled:
            @staticmethod
            def remote(model, decision):
                sent.append(decision)
                return Ref(board.autoscaled(model, decision))

    monkeypatch.setattr(serve_policy.ray, "get_actor", lambda name, namespace: looked_up.append((name, namespace)) or Handle())
    policy = serve_policy.LlmTokenPolicy(model="chat", **dataclasses.asdict(T))

    def tick(ctx):
        ctx.app_name = "app"
        policy(ctx)
        policy._sender.submit(lambda: None).result()  # what the sender thread had to send is sent

    for kv in (0.99, 0.97, 0.95):  # wants 2 each tick, with a changing reason
        tick(serve_context(1, 1, {"kv_usage": [kv], "prefill_tokens_per_s": [1000]}, requests=1))
    assert len(sent) == 1 and looked_up == [("status_board::app", "serve_app")]  # told once, found by name
    tick(serve_context(2, 2, {"kv_usage": [0.5, 0.5], "prefill_tokens_per_s": [1000, 1000]}, requests=1))
    assert len(sent) == 2 and sent[1]["action"] == "hold"  # a change: told too
    board.autoscaled("chat", {**sent[0], "at": sent[0]["at"] + 5})  # the same up again, re-sent: not a new change
    board.post("chat", "r1", {"load_s": 41.5, "kv_usage": 0.2})
    state = board.scaling_state()["chat"]
    assert [c["action"] for c in state["changes"]] == ["up"] and state["last"]["action"] == "up"
    assert state["load_s"] == 41.5
    board.forget("chat", "r1")
    assert board.scaling_state()["chat"]["load_s"] == 41.5  # kept for the next cold start


def test_serves_wrapper_applies_its_delays_to_what_the_policy_wants():
    """Through Serve's own wrapper (what its controller runs): an upscale delay holds the decision."""
    from ray.serve.autoscaling_policy import _apply_autoscaling_config
    from ray.serve.config import AutoscalingConfig

    from serve_app.autoscaling.serve_policy import LlmTokenPolicy

    wrapped = _apply_autoscaling_config(LlmTokenPolicy(model="chat", **dataclasses.asdict(T)))
    hot = {"kv_usage": [0.99], "prefill_tokens_per_s": [1000]}
    ctx = serve_context(1, 1, hot, requests=1)
    ctx.config = AutoscalingConfig(min_replicas=1, max_replicas=4, upscale_delay_s=60, downscale_delay_s=600)
    replicas, state = wrapped(ctx)
    assert replicas == 1 and state["llm_last_decision"]["replicas"] == 2  # wanted 2, held by the 60 s delay
    ctx = serve_context(1, 1, hot, requests=1, state=state)
    ctx.config = AutoscalingConfig(min_replicas=1, max_replicas=4, upscale_delay_s=0, downscale_delay_s=600)
    assert wrapped(ctx)[0] == 2


def test_config_sends_llms_to_the_token_policy_and_keeps_serves_default_available():
    from serve_app.app import model_deployment

    def model(kind="llm", **auto):
        engine = "vllm" if kind == "llm" else "transformers"
        return {"name": "m", "kind": kind, "engine": engine, "source": "org/m",
                "deployment": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 2, **auto}}}

    cfg = parse_app_config({"models": [model(ttft_target_s=0.5)]})
    auto = model_deployment(cfg.models[0])._deployment_config.autoscaling_config
    assert auto.policy.policy_function == "serve_app.autoscaling.serve_policy:LlmTokenPolicy"
    assert auto.policy.policy_kwargs == {"model": "m", "ttft_target_s": 0.5, "kv_cache_target": 0.8,
                                         "waiting_target": 5, "scale_down_below": 0.5}
    cfg = parse_app_config({"models": [model(policy="requests")]})
    assert model_deployment(cfg.models[0])._deployment_config.autoscaling_config.policy.is_default_policy_function()
    cfg = parse_app_config({"models": [model("embed")]})  # encoders: Serve's default
    assert model_deployment(cfg.models[0])._deployment_config.autoscaling_config.policy.is_default_policy_function()
    for bad, words in ((model("embed", policy="tokens"), "applies to llm"), (model("embed", ttft_target_s=1), "applies to llm"),
                       (model(policy="requests", kv_cache_target=0.5), "apply to policy 'tokens'"),
                       (model(kv_cache_target=1.5), "kv_cache_target")):
        with pytest.raises(ConfigError, match=words):
            parse_app_config({"models": [bad]})
    emb = model("embed")
    emb["deployment"]["max_queued_tokens"] = 1000
    with pytest.raises(ConfigError, match="max_queued_tokens applies to llm"):
        parse_app_config({"models": [emb]})
    with pytest.raises(ConfigError, match="max_queued_tokens applies to llm"):
        parse_app_config({"gateway": {"deployment": {"max_queued_tokens": 5}}, "models": [model()]})


# --- admission by tokens ------------------------------------------------------------------------------

def test_the_token_queue_refuses_past_its_bound_with_a_retry_after_from_the_measured_drain_rate():
    now = [100.0]
    q = TokenQueue({"chat": 10_000}, clock=lambda: now[0])
    q.enter("chat", 5000)
    q.enter("chat", 4000)
    with pytest.raises(Overloaded) as err:
        q.enter("chat", 4000)  # 13,000 > 10,000; no rate measured yet: a short guess
    assert err.value.retry_after == 2 and "9,000 prompt tokens waiting" in err.value.message
    now[0] += 3
    q.leave("chat", 5000, drained=True)  # 5,000 tokens left the queue in 3 s of it not being empty
    assert q.drain_rate("chat") == pytest.approx(5000 / 3)
    now[0] += 0.1
    q.enter("chat", 5000)  # 9,000 waiting
    with pytest.raises(Overloaded) as err:
        q.enter("chat", 5000)  # 4,000 over: 2.4 s at 1,667 tokens/s
    assert err.value.retry_after == 3
    q.leave("chat", 4000, drained=False)
    q.leave("chat", 5000, drained=True)
    q.enter("chat", 50_000)  # nothing waits: a request over the bound still runs, counted as half the bound
    assert q.queued("chat") == 5000
    q.enter("chat", 4000)  # and others still pass beside it
    with pytest.raises(Overloaded):
        q.enter("chat", 2000)
    q.leave("chat", 50_000, drained=True)
    q.leave("chat", 4000, drained=True)
    assert q.queued("chat") == 0
    q.enter("embed-model", 10**9)  # a model without a bound is not counted


def test_the_token_queue_takes_every_routers_reports_and_their_rate_when_they_say_more():
    reported = {"chat": (9000, 1000.0)}
    q = TokenQueue({"chat": 10_000}, reported=lambda m: reported.get(m))
    with pytest.raises(Overloaded) as err:
        q.enter("chat", 4000)  # this router holds nothing, the replicas report 9,000 from others
    assert err.value.retry_after == 3  # 3,000 over at the replicas' 1,000 tokens/s
    reported["chat"] = (0, 1000.0)
    q.enter("chat", 2000)


def test_a_full_token_queue_sends_the_request_to_the_fallback_and_a_503_says_when_to_retry():
    from starlette.testclient import TestClient

    from serve_app.router import Router
    from tests.fakes import FakeModel

    models = [{"name": "big", "kind": "llm", "engine": "vllm", "source": "org/big", "fallbacks": ["small"],
               "deployment": {"max_queued_tokens": 50}},
              {"name": "small", "kind": "llm", "engine": "vllm", "source": "org/small", "deployment": {"max_queued_tokens": 50}}]
    cfg = parse_app_config({"gateway": {"retry_backoff_s": 0}, "models": models})
    router = Router(cfg.gateway, cfg.models, {"big": FakeModel("big", "llm"), "small": FakeModel("small", "llm")})
    c = TestClient(router.__serve_build_asgi_app__(), raise_server_exceptions=False)
    body = {"model": "big", "messages": [{"role": "user", "content": "word " * 60}], "max_tokens": 4}
    router.queue.waiting["big"] = 40  # other requests wait on big for their first token
    r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.headers["x-served-model"] == "small", r.text
    assert router.queue.waiting["small"] == 0 and router.queue.drain_rate("small") > 0  # it left the queue, drained
    router.queue.waiting["small"] = 40
    r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_overloaded"
    assert "deployment.max_queued_tokens" in r.json()["error"]["message"] and int(r.headers["retry-after"]) >= 1
    r = c.post("/v1/chat/completions", json={**body, "stream": True})
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_overloaded"
    router.queue.waiting.clear()
    r = c.post("/v1/chat/completions", json={**body, "stream": True})
    assert r.status_code == 200 and router.queue.waiting["big"] == 0


# --- batches on spare KV cache ---------------------------------------------------------------------

def test_llm_batch_lines_run_only_on_spare_kv_cache_and_yield_it_first_to_interactive_work(tmp_path):
    from serve_app.batches.traffic import Traffic
    from serve_app.batches.worker import BatchWorker
    from serve_app.config import BatchConfig
    from tests.test_batches_unit import config, line, never_done, stored_batch

    async def main():
        content = b"\n".join(line(i, "/v1/chat/completions", model="chat", messages=[{"role": "user", "content": "hi"}])
                             for i in range(4))
        store = stored_batch(tmp_path, content, "/v1/chat/completions")
        kv = {"chat": 0.9}
        cfg = config(keys=[])
        # busy_lines 4: the busy rule alone would keep every line running beside interactive work
        worker = BatchWorker(store, BatchConfig(busy_lines=4), {m.name: m for m in cfg.models}, Traffic(), never_done,
                             worker_id="w", kv_usage=kv.get)
        await worker._tick()
        await worker._tick()
        assert not worker.running.get("chat")  # 90% KV use: no line starts
        kv["chat"] = 0.2
        await worker._tick()
        await worker._tick()
        running = len(worker.running.get("chat", {}))
        assert running >= 1  # spare KV: lines run
        kv["chat"] = 0.75  # full, but only batch work on the model: its lines go on, no new one starts
        worker._beat_at = 0
        await worker._tick()
        await asyncio.sleep(0.1)
        assert len(worker.running.get("chat", {})) == running
        store.heartbeat("other-router", time.time(), [("chat", time.time())])  # interactive work, another router
        worker._beat_at = 0
        await worker._tick()
        await asyncio.sleep(0.3)
        assert not worker.running.get("chat")  # put back: batches give the KV cache back first
        with store.engine.begin() as conn:
            from sqlalchemy import text

            states = {tuple(r) for r in conn.execute(text("SELECT state, attempts FROM batch_lines"))}
        assert states == {("pending", 0)}, states

    asyncio.run(main())


# --- cold starts ------------------------------------------------------------------------------------

def test_a_cold_start_past_its_bound_says_how_long_a_start_takes_here():
    from serve_app.cold_start import ColdStart
    from serve_app.errors import ServiceUnavailable

    cfg = parse_app_config({"gateway": {"cold_start_timeout_s": 0.2}, "models": [
        {"name": "m", "kind": "llm", "engine": "vllm", "source": "org/m",
         "deployment": {"autoscaling_config": {"min_replicas": 0, "max_replicas": 1}}}]})

    async def load_time(name):
        return 45.0

    class Never:
        """A handle call that never answers: no replica comes up within the bound."""

        def __await__(self):
            return asyncio.sleep(60).__await__()

        def cancel(self):
            pass

    handle = SimpleNamespace(card=SimpleNamespace(remote=lambda: Never()))
    cold = ColdStart(cfg.gateway, {"m": cfg.models[0]}, {"m": handle}, load_time)
    with pytest.raises(ServiceUnavailable) as err:
        asyncio.run(cold.wait("m", 60))
    assert err.value.retry_after == 45 and "a start takes ~45s here" in err.value.message
    cold.waited_s["m"] = 30.0  # this router's own last wait for one wins
    with pytest.raises(ServiceUnavailable) as err:
        asyncio.run(cold.wait("m", 60))
    assert err.value.retry_after == 30


# --- the replica's measurements ----------------------------------------------------------------------

def test_the_replica_measures_its_prefill_rate_over_prefill_time_and_its_recent_ttft():
    from deployments.engines.vllm_load import EngineLoad

    cfg = SimpleNamespace(cache_config=SimpleNamespace(block_size=16, num_gpu_blocks=100))
    load = EngineLoad(cfg)

    def step(at, computed=0, generated=0, ttfts=(), running=1, waiting=0, outputs=True):
        it = SimpleNamespace(iteration_timestamp=at, prompt_token_stats=SimpleNamespace(computed=computed),
                             num_generation_tokens=generated, time_to_first_tokens_iter=list(ttfts), finished_requests=[])
        sched = SimpleNamespace(num_running_reqs=running, num_waiting_reqs=waiting, kv_cache_usage=0.5, prefix_cache_stats=None)
        load.record(sched, it if outputs else None)

    step(1000.0, 4000, 1)  # after idle: not measured (its start is unknown)
    step(1000.5, 1000, 0, ttfts=[0.4])  # 1,000 tokens in 0.5 s of prefill
    for i in range(1, 11):
        step(1000.5 + 0.1 * i, 0, 4)  # ten decode steps: no prefill time
    with pytest.MonkeyPatch.context() as mp:  # a long prompt's chunks: steps without outputs, all prefill
        for t in (1001.6, 1001.7):
            mp.setattr(time, "time", lambda t=t: t)
            step(t, outputs=False)
    step(1001.8, 1500, 2, ttfts=[0.9], running=0)  # its last chunk: 3 x 0.1 s for 1,500 tokens (2 generated beside)
    step(1030.0, 2000, 1, ttfts=[0.1])  # 28 s later: the idle gap is not work, and not measured
    rates = load.rates(1030.0)
    last = 0.1 * 1500 / 1502
    assert rates["prefill_tokens_per_s"] == round(2500 / (0.5 + 0.2 + last), 1)
    assert rates["prompt_tokens_per_s"] == round(2000 / 15, 1)  # every step's tokens over the last 15 s
    assert rates["ttft_s"] == 0.1  # only the last 15 s count
    assert load.rates(1200.0) == {"prompt_tokens_per_s": 0.0, "prefill_tokens_per_s": 0.0, "ttft_s": 0.0}
