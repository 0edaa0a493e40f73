"""The environment every Ray process of ours starts with, in one place (CLI, tests, cluster recipes).

Serve reads these when its controller and ingress start, so they must be in the environment of
`ray start` on every node, not only of `serve deploy`.
"""

from __future__ import annotations

SERVE_ENV = {
    # Serve's HAProxy ingress instead of its Python proxy: ~2x the throughput here (docs/benchmarks.md).
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # HAProxy replays a request on another router replica when it got no response at all: a refused
    # connection, or a router that died with its node before answering. Without `empty-response`
    # those requests are lost to their clients (test_removing_a_node_that_hosts_a_router_and_...).
    "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
    # Serve's throughput profile: user code on the replica's own event loop (no thread hop), the
    # handle's router on the caller's loop, gRPC between deployments, GC frozen after start: 2.5x
    # the gateway's throughput and half its latency here. It needs replicas that never block their
    # loop; ours don't (forward passes run in threads, vLLM in its own process).
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # ...except its log buffering (up to 1,000 request log lines per replica): a request id must be
    # findable in the logs at once. Buffering was worth only 1.06x.
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
    # A stopping router replica stays reachable this long before it refuses new connections (then
    # drains its in-flight requests as before). Serve's 30 s floor is for cloud load balancers that
    # address replicas themselves; ours are addressed only by each node's HAProxy, which the proxy
    # reloads within a second of the change and which retries a refused connection elsewhere
    # (RETRY_ON above). 30 s made every router rollout and `serve shutdown` wait 30 s per replica.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
    # Every change of the ingress set (a router replica added or stopped, an app deployed) reloads
    # HAProxy: the old process keeps its open connections, and Serve's default ends them 120 s after
    # the reload. That cut every stream older than 120 s at an unrelated redeploy (eight at once in
    # the CI run of 2026-12-04, 120.0 s after a reload), whatever the router's grace. 630 s covers
    # any request the proxy lets live (serve_config.yaml's http_options.request_timeout_s, 600 s).
    # (Serve quarantines a freed router port for this + 30 s: 1,000 ports per node.)
    "RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S": "630",
}

# A single machine: every Ray listener on loopback, no usage stats, no token auth (shared/ENVIRONMENT.md).
LOCAL_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keeps Ray on 127.0.0.1 instead of eth0
    "RAY_AUTH_MODE": "disabled",  # else `serve deploy` fails with "Missing authentication token"
}

RAY_ENV = {**LOCAL_ENV, **SERVE_ENV}
