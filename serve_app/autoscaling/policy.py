"""The LLM autoscaling decision, as a pure function of what the replicas report.

Each replica reports (deployments/llm.py `record_autoscaling_stats`): its KV-cache use, the
requests waiting in vLLM's scheduler, the prompt tokens it holds not yet prefilled, the prompt
tokens it prefilled per second (demand) and per second of engine work (its prefill rate), and its
recent engine-side time to first token. Serve averages each over `look_back_period_s` and hands
them to the policy every control-loop tick.

The fleet's pressure is the worst of four ratios, each against its target:
- KV-cache use (mean per replica) / `kv_cache_target` (llm-d's saturation at 0.8);
- waiting requests per replica / `waiting_target`;
- drain time: prompt tokens waiting / the fleet's measured prefill rate, over `ttft_target_s`
  (the queue a new request waits behind, whatever the request count);
- prefill demand: prompt tokens prefilled per second / the prefill rate (1 = the engines prefill
  all the time; what a scale-down estimate needs, since a queue that is empty now says nothing
  about the queue one replica fewer would build).
Pressure spread over m replicas instead of n is pressure x n/m (the work moves, the targets stay).
The recent TTFT is reported beside them, not acted on: a long prompt's own prefill is not made
shorter by more replicas, only the queue ahead of it is (the drain term).

- pressure > 1: scale to ceil(n x pressure) (at most max), unless replicas are still starting:
  then hold, since the new ones take load as soon as they are up (llm-d waits the same way); a
  scale-down is still decided then (a replica that never comes up must not freeze the policy);
- pressure x n/(n-1) < `scale_down_below`: one replica fewer (the policy's own estimate says the
  rest stay well inside every target); from 1 to 0 only with no work at all and min_replicas 0
  (no request in Serve's count, every driver near 0, and no request or prompt token the replica
  itself reports holding);
- between: hold. The band from `scale_down_below` to 1 is the hysteresis; Serve's
  upscale/downscale delays apply on top (ray.serve.autoscaling_policy's wrapper).
With no replica reporting yet (just started, or an older release), it scales on requests as
Serve's default does, and says so.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

SIGNALS = ("kv_usage", "waiting", "running", "prompt_tokens_waiting", "prompt_tokens_per_s", "prefill_tokens_per_s", "ttft_s")
DRIVERS = ("kv_cache", "waiting", "drain", "demand")  # the terms that move replicas (ttft is shown)
IDLE = 0.02  # every driver below this share of its target, and no request ongoing: no work at all (the
# replica's own health probe, a one-token prompt each period, is not work that keeps it up)
HELD = 0.5  # requests vLLM holds (running + waiting, a mean over the look-back): a probe's share stays
# far below it, one real request held through the window reaches 1


@dataclasses.dataclass(frozen=True)
class ReplicaSignals:
    """One replica's report (each a mean over Serve's look-back window)."""

    kv_usage: float = 0.0  # 0..1
    waiting: float = 0.0  # requests vLLM has not scheduled yet
    running: float = 0.0
    prompt_tokens_waiting: float = 0.0  # prompt tokens of the requests it holds, not yet prefilled
    prompt_tokens_per_s: float = 0.0  # prompt tokens it prefilled per second of wall clock (the demand it met)
    prefill_tokens_per_s: float = 0.0  # per second of the engine's prefill time; 0: not measured yet
    ttft_s: float = 0.0  # engine-side time to first token of recent requests (p90); 0: none recently

    @classmethod
    def of(cls, report: Mapping[str, float]) -> "ReplicaSignals":
        return cls(**{k: max(0.0, float(report.get(k) or 0.0)) for k in SIGNALS})


@dataclasses.dataclass(frozen=True)
class Targets:
    """The model's `autoscaling_config` token fields (their defaults live there, in config.py)."""

    ttft_target_s: float
    kv_cache_target: float
    waiting_target: float
    scale_down_below: float


@dataclasses.dataclass(frozen=True)
class Decision:
    replicas: int
    action: str  # up | down | hold
    reason: str
    pressure: float | None  # None: decided without token signals
    terms: dict[str, float]  # each ratio to its target, fleet-wide on the running replicas

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def pressure_terms(signals: Sequence[ReplicaSignals], running: int, t: Targets) -> dict[str, float]:
    """Each ratio to its target for the load spread over `running` replicas."""
    n = max(1, running)
    tokens_waiting = sum(s.prompt_tokens_waiting for s in signals)
    rates = [s.prefill_tokens_per_s for s in signals if s.prefill_tokens_per_s > 0]
    # A replica without a measured rate counts at the others' mean (all unmeasured: no drain term).
    fleet_rate = (sum(rates) / len(rates)) * n if rates else 0.0
    ttfts = [s.ttft_s for s in signals if s.ttft_s > 0]
    demand = sum(s.prompt_tokens_per_s for s in signals)
    return {
        "kv_cache": round(sum(s.kv_usage for s in signals) / n / t.kv_cache_target, 4),
        "waiting": round(sum(s.waiting for s in signals) / n / t.waiting_target, 4),
        "drain": round(tokens_waiting / fleet_rate / t.ttft_target_s, 4) if fleet_rate else 0.0,
        "demand": round(demand / fleet_rate, 4) if fleet_rate else 0.0,
        "ttft": round(sum(ttfts) / len(ttfts) / t.ttft_target_s, 4) if ttfts else 0.0,
    }


def decide(running: int, target: int, signals: Sequence[ReplicaSignals], t: Targets, min_replicas: int,
           max_replicas: int, requests: float = 0.0, target_ongoing_requests: float = 2.0) -> Decision:
    """The replicas the model should run, and why. `running`: replicas up; `target`: Serve's
    current target (more than running while replicas start); `requests`: Serve's ongoing count
    (the fallback signal, and what tells an idle model at min 0 from a busy one)."""
    bound = lambda m: max(min_replicas, min(max_replicas, m))  # noqa: E731
    if running == 0:
        want = bound(max(target, 1 if requests > 0 else 0))
        return Decision(want, _action(want, target), "no replica running: "
                        + ("a request waits, start one" if requests > 0 else "nothing asked"), None, {})
    if target > running:  # replicas starting: no scale-up before they take load; a scale-down still may
        d = _decide_running(running, signals, t, bound, max_replicas, min_replicas, requests, target_ongoing_requests)
        if d.action == "down":
            return d
        return Decision(target, "hold", f"waiting for {target - running} starting replica(s) before scaling up again "
                        f"({d.reason})", d.pressure, d.terms)
    return _decide_running(running, signals, t, bound, max_replicas, min_replicas, requests, target_ongoing_requests)


def _decide_running(running: int, signals: Sequence[ReplicaSignals], t: Targets, bound, max_replicas: int,
                    min_replicas: int, requests: float, target_ongoing_requests: float) -> Decision:
    """The decision on the replicas that run now."""
    if not signals:
        want = bound(math.ceil(requests / target_ongoing_requests)) if requests else bound(running)
        return Decision(want, _action(want, running), f"no token signals reported yet: by requests ({requests:g} ongoing)", None, {})
    terms = pressure_terms(signals, running, t)
    worst = max(DRIVERS, key=terms.get)
    p = terms[worst]
    if p > 1:
        want = bound(math.ceil(running * p))
        why = f"{_words(worst)} at {p:.2f}x its target on {running} replica(s)"
        if want == running:
            return Decision(want, "hold", why + f"; already at max_replicas {max_replicas}", p, terms)
        return Decision(want, "up", why, p, terms)
    if running > min_replicas:
        if running == 1:  # to zero: only when nothing is asked or held at all
            if requests <= 0 and all(terms[k] < IDLE for k in DRIVERS) and not any(map(_holds_work, signals)):
                return Decision(0, "down", "no work at all on the only replica (min_replicas 0)", p, terms)
            return Decision(1, "hold", f"load {p:.2f}x target on the only replica", p, terms)
        fewer = p * running / (running - 1)
        if fewer < t.scale_down_below:
            return Decision(running - 1, "down", f"estimated {fewer:.2f}x target on {running - 1} replica(s), "
                            f"below {t.scale_down_below:g}", p, terms)
        return Decision(running, "hold", f"{p:.2f}x target now, {fewer:.2f}x with one replica fewer "
                        f"(scale down below {t.scale_down_below:g})", p, terms)
    return Decision(running, "hold", f"{p:.2f}x target, at min_replicas {min_replicas}", p, terms)


def _holds_work(s: ReplicaSignals) -> bool:
    """The replica's own report of work: what keeps it from zero even when Serve's request count
    reads 0 (a replica too busy to push it on time) and no rate is measured yet (one long prompt's
    first prefill: no drain or demand term)."""
    return s.prompt_tokens_waiting > 0 or s.running + s.waiting >= HELD


def _action(want: int, now: int) -> str:
    return "up" if want > now else "down" if want < now else "hold"


def _words(term: str) -> str:
    return {"kv_cache": "KV-cache use", "waiting": "waiting requests", "drain": "prompt-token drain time",
            "demand": "prefill demand"}[term]
