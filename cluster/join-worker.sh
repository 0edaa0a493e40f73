#!/usr/bin/env bash
# Bare metal: join this machine to the Ray head as a worker (GPUs are detected).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${HEAD_IP:?set HEAD_IP to the private address of the head}"
: "${NODE_IP:?set NODE_IP to the private address of this machine}"
export RAY_USAGE_STATS_ENABLED=0
# Serve's ingress settings, read by the processes `ray start` launches (serve_app/ray_env.py SERVE_ENV).
export RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_HAPROXY_RETRY_ON="conn-failure empty-response" \
  RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE=1 RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=5 RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S=630
.venv/bin/ray start --address="$HEAD_IP:6379" --node-ip-address="$NODE_IP" --disable-usage-stats
