#!/usr/bin/env bash
# Bare metal: start the Ray head on this machine. Run from the repository after `make install`
# (or `PROFILE=gpu bash scripts/install.sh`). HEAD_IP: the address workers reach (private network).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${HEAD_IP:?set HEAD_IP to the private address of this machine}"
export RAY_USAGE_STATS_ENABLED=0
# Serve's ingress settings, read by the processes `ray start` launches (serve_app/ray_env.py SERVE_ENV).
export RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_HAPROXY_RETRY_ON="conn-failure empty-response" \
  RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE=1 RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=5 RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S=630
# GCS (6379) binds HEAD_IP for the workers; the dashboard (8265) stays on loopback: reach it with
# `ssh -L 8265:127.0.0.1:8265 head`. Firewall: 6379 and Ray's node ports from workers only.
.venv/bin/ray start --head --node-ip-address="$HEAD_IP" --port=6379 \
  --dashboard-host=127.0.0.1 --num-cpus="${HEAD_CPUS:-0}" --disable-usage-stats
echo "head up; on each worker: HEAD_IP=$HEAD_IP cluster/join-worker.sh; then: .venv/bin/serve deploy CONFIG"
