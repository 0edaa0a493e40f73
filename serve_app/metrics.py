"""Prometheus metrics from the router, through Ray's metrics API (exported by every Ray node's
metrics agent as `ray_serve_app_*`; docs/grafana/serve_app.json charts them).

The metric objects are made by a factory so unit tests can count in memory; outside a Ray
worker the factory falls back to no-ops rather than failing a request over a metric.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from serve_app.traffic import Window

# Metrics exported outside the router: by the LLM token policy in the Serve controller
# (serve_app/autoscaling/serve_policy.py) and by each LLM replica (deployments/llm.py).
AUTOSCALER_DESIRED = "serve_app_autoscaler_desired_replicas"
AUTOSCALER_PRESSURE = "serve_app_autoscaler_pressure"
LLM_PROMPT_TOKENS_WAITING = "serve_app_llm_prompt_tokens_waiting"
EXPORTED_ELSEWHERE = (AUTOSCALER_DESIRED, AUTOSCALER_PRESSURE, LLM_PROMPT_TOKENS_WAITING)

LATENCY_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000]


def ray_factory(kind: str, name: str, description: str, tag_keys: tuple[str, ...]) -> Any:
    try:
        from ray.util import metrics

        if kind == "histogram":
            return metrics.Histogram(name, description=description, boundaries=LATENCY_MS, tag_keys=tag_keys)
        if kind == "gauge":
            return metrics.Gauge(name, description=description, tag_keys=tag_keys)
        return metrics.Counter(name, description=description, tag_keys=tag_keys)
    except Exception:  # noqa: BLE001 - not in a Ray worker
        return _NoOp()


class _NoOp:
    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None: ...

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None: ...

    def set(self, value: float, tags: dict[str, str] | None = None) -> None: ...


class RouterMetrics:
    def __init__(self, factory: Callable[..., Any] = ray_factory) -> None:
        c = lambda n, d, t: factory("counter", n, d, t)  # noqa: E731
        h = lambda n, d, t: factory("histogram", n, d, t)  # noqa: E731
        self.requests = c("serve_app_requests", "HTTP requests by model, route and status", ("model", "route", "status"))
        self.latency = h("serve_app_request_latency_ms", "time to the full response (streams: to the last byte)", ("model", "route"))
        self.ttft = h("serve_app_time_to_first_token_ms", "time to the first streamed token", ("model",))
        self.tokens = c("serve_app_tokens", "tokens by model and type (prompt, completion)", ("model", "type"))
        self.rejections = c("serve_app_rejections", "requests refused before a model ran them, by reason", ("model", "reason"))
        self.retries = c("serve_app_retries", "retries after a replica died mid-request", ("model",))
        self.fallbacks = c("serve_app_fallbacks", "requests served by a fallback model", ("model",))
        self.input_failures = c("serve_app_input_failures",
                                "requests whose input failed in the model while its probe passed (poison inputs)", ("model",))
        self.circuit_open = c("serve_app_circuit_rejections", "requests kept away from a model by its open circuit", ("model",))
        self.truncations = c("serve_app_truncated_inputs", "documents or inputs cut to fit the model", ("model",))
        # Per API key NAME (never the key): what each team used, as the durable usage store has it.
        self.key_requests = c("serve_app_key_requests", "requests served per key name and model", ("key", "model"))
        self.key_tokens = c("serve_app_key_tokens", "tokens per key name, model and type (prompt, completion)",
                            ("key", "model", "type"))
        # Batch lines per model (serve_app/batches/): finished by outcome here; pending as the store has it.
        self.batch_lines = c("serve_app_batch_lines", "batch lines finished by this router replica, by model and "
                             "outcome (completed: a 2xx answer; failed: in the error file)", ("model", "outcome"))
        self.batch_lines_pending = factory("gauge", "serve_app_batch_lines_pending",
                                           "batch lines waiting or running, by model (the whole store's count)", ("model",))
        self._pending_models: set[str] = set()
        # The same answers, counted for /status's charts of the last hour (serve_app/traffic.py): the
        # router hands this window to the status board every traffic.BUCKET_S. Charted under the
        # model whose replicas served (the router sets it: an adapter's answers join its base's).
        self.window = Window()
        self.chart_name: Callable[[str], str] = lambda model: model
        # The cost-aware LLM router's guesses (serve_app/llm_routing/), per replica: their ratio is the
        # predicted prefix-cache hit rate, beside vLLM's actual one (ray_vllm_prefix_cache_hits / _queries).
        self.routed_prompt_tokens = c("serve_app_routed_prompt_tokens", "prompt tokens the cost-aware router sent to "
                                      "each LLM replica (its estimate)", ("model", "replica"))
        self.routed_cached_tokens = c("serve_app_routed_predicted_cached_tokens", "of the prompt tokens sent to each "
                                      "LLM replica, those the router predicted cached there", ("model", "replica"))
        self.migrations = c("serve_app_stream_migrations", "LLM streams whose replica was lost after the first token, "
                            "by outcome (continued on another replica, failed, refused) and reason", ("model", "outcome", "reason"))
        self.store_errors = c("serve_app_quota_store_errors",
                              "quota/usage store calls that failed, or were decided on this router's memory while the "
                              "store was unreachable, by operation", ("op",))

    def response(self, model: str, route: str, status: int, latency_ms: float) -> None:
        self.requests.inc(1, {"model": model, "route": route, "status": str(status)})
        self.latency.observe(latency_ms, {"model": model, "route": route})
        if model != "-":  # a model's request (not a page, a probe or the status view): for /status's charts
            self.window.request(self.chart_name(model), status, latency_ms)
        reason = _REJECTIONS.get(status)
        if reason:
            self.rejections.inc(1, {"model": model, "reason": reason})

    def routed(self, model: str, replica: str, prompt_tokens: int, predicted_cached: int) -> None:
        tags = {"model": model, "replica": replica}
        if prompt_tokens > 0:  # Ray counters refuse 0
            self.routed_prompt_tokens.inc(prompt_tokens, tags)
        if predicted_cached > 0:
            self.routed_cached_tokens.inc(predicted_cached, tags)

    def first_token(self, model: str, ms: float) -> None:
        self.ttft.observe(ms, {"model": model})
        self.window.first_token(self.chart_name(model), ms)

    def served_for(self, key: str, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.window.tokens(self.chart_name(model), completion_tokens)
        self.key_requests.inc(1, {"key": key, "model": model})
        if prompt_tokens:  # Ray counters refuse 0
            self.key_tokens.inc(prompt_tokens, {"key": key, "model": model, "type": "prompt"})
        if completion_tokens:
            self.key_tokens.inc(completion_tokens, {"key": key, "model": model, "type": "completion"})

    def batch_line(self, model: str, ok: bool) -> None:
        self.batch_lines.inc(1, {"model": model, "outcome": "completed" if ok else "failed"})

    def batch_pending(self, pending: dict[str, int]) -> None:
        """Set every model's gauge, and 0 for models that had lines before: a finished batch reads 0."""
        for model in self._pending_models | set(pending):
            self.batch_lines_pending.set(pending.get(model, 0), {"model": model or "?"})
        self._pending_models |= set(pending)

    def migration(self, model: str, outcome: str, reason: str) -> None:
        self.migrations.inc(1, {"model": model, "outcome": outcome, "reason": reason})

    def event(self, event: str, model: str) -> None:
        {"retry": self.retries, "fallback": self.fallbacks, "circuit_open": self.circuit_open,
         "input_failed": self.input_failures}[event].inc(1, {"model": model})


_REJECTIONS = {401: "unauthorized", 403: "forbidden", 413: "too_large", 429: "quota", 503: "overloaded", 504: "deadline"}
