"""The environment every Ray process of ours starts with, in one place (CLI, tests, cluster recipes).

Serve reads these when its controller and ingress start, so they must be in the environment of
`ray start` on every node, not only of `serve deploy`.
"""

from __future__ import annotations

# Ingress: Serve's HAProxy instead of the Python proxy (1.9-2.5x the throughput, docs/benchmarks.md).
# HAProxy replays a request on another router replica when it got no response at all: a refused
# connection, or a router that died (its node went) before answering. Without `empty-response` those
# requests are lost to their clients (test_removing_a_node_that_hosts_a_router_and_a_model_replica_...).
# Serve's throughput profile: user code on the replica's own event loop (no thread hop), the
# handle's router on the caller's loop, gRPC between deployments, GC frozen after start: 2.5x the
# gateway's throughput and half its latency here (docs/benchmarks.md). Our replicas never block
# their loop (forward passes run in threads, vLLM in its own process), which this requires.
SERVE_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # ...except its log buffering: it holds up to 1,000 request log lines per replica, so a request
    # id could not be found in the logs until much later. Operators get every line at once.
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
}

# A single machine: every Ray listener on loopback, no usage stats, no token auth (shared/ENVIRONMENT.md).
LOCAL_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keeps Ray on 127.0.0.1 instead of eth0
    "RAY_AUTH_MODE": "disabled",  # else `serve deploy` fails with "Missing authentication token"
}

RAY_ENV = {**LOCAL_ENV, **SERVE_ENV}
